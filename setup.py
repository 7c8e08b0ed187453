"""Build script for mamlpp_fast: the Python package plus the compiled ops library `mamlpp_fast._C`.

Install with the torch that will run the code already installed:

    pip install --no-build-isolation .

Build knobs (environment variables):

    MAMLPP_FAST_BUILD_CUDA=auto|0|1  auto (default): compile csrc/cuda/*.cu when the installed torch is
                                     a CUDA build (torch.version.cuda) and nvcc is found. A CUDA torch
                                     without nvcc is an error in auto mode, never a silent CPU-only
                                     build; set 0 to accept one. 1: require the CUDA build.
    MAMLPP_FAST_SKIP_EXT=1           no compiled extension: a pure-Python install (every op has a
                                     pure-PyTorch path).
    TORCH_CUDA_ARCH_LIST             GPU architectures, e.g. "9.0" (H200) or "8.0;9.0". When unset and no
                                     GPU is visible we use "9.0" and say so (cpp_extension fails without it).
    CUDA_HOME                        toolkit root; set it when torch guesses wrong (e.g. /usr/local/cuda).
    MAX_JOBS                         parallel compile jobs (read by torch's ninja build).
    DEBUG=1                          -O0 -g instead of -O3 -g0.

The GPU is never queried: build machines often have none. The decision uses only the installed torch
and the toolkit.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Packages are listed explicitly because the top-level kernels/ folder is mapped onto
# mamlpp_fast.kernels (auto-discovery does not handle a custom package_dir). Add new ones here.
PACKAGES = [
    "mamlpp_fast",
    "mamlpp_fast.ops",
    "mamlpp_fast.reference",
    "mamlpp_fast.data",
    "mamlpp_fast.kernels",
]
PACKAGE_DIR = {"mamlpp_fast.kernels": "kernels"}


def log(msg: str) -> None:
    print(f"[mamlpp_fast setup] {msg}", file=sys.stderr, flush=True)


def existing_packages() -> list:
    """Drop listed packages whose folder does not exist yet (the tree is being built up)."""
    keep = []
    for pkg in PACKAGES:
        folder = PACKAGE_DIR.get(pkg, pkg.replace(".", os.sep))
        if os.path.isdir(os.path.join(ROOT, folder)):
            keep.append(pkg)
        else:
            log(f"package {pkg} skipped: folder {folder}/ does not exist")
    return keep


def want_cuda(torch, cuda_home) -> bool:
    mode = os.environ.get("MAMLPP_FAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MAMLPP_FAST_BUILD_CUDA must be auto, 0 or 1 (got {mode!r})")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    has_nvcc = bool(nvcc and os.path.exists(nvcc))
    if mode == "0":
        log("CUDA kernels skipped: MAMLPP_FAST_BUILD_CUDA=0")
        return False
    if not torch.version.cuda:
        if mode == "1":
            sys.exit(f"MAMLPP_FAST_BUILD_CUDA=1 but the installed torch {torch.__version__} has no CUDA")
        log(f"CUDA kernels skipped: torch {torch.__version__} is a CPU-only build")
        return False
    if not has_nvcc:
        sys.exit(
            f"torch {torch.__version__} is a CUDA build but nvcc was not found (CUDA_HOME={cuda_home}). "
            "Set CUDA_HOME to the toolkit root, or MAMLPP_FAST_BUILD_CUDA=0 for a CPU-only build."
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Asking for a device count is safe (it does not initialise a context), and without a
        # visible GPU cpp_extension cannot guess an arch list.
        if torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            log("TORCH_CUDA_ARCH_LIST unset and no GPU visible: building for 9.0 (H100/H200)")
    log(f"building CUDA kernels with {nvcc} for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(auto)')}")
    return True


def extension_setup_kwargs() -> dict:
    if os.environ.get("MAMLPP_FAST_SKIP_EXT") == "1":
        log("compiled extension skipped: MAMLPP_FAST_SKIP_EXT=1 (pure-Python install)")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "mamlpp_fast: torch is not importable in the build environment (plain `pip install .` "
            "builds in an isolated environment without torch). Install torch first (pin it, e.g. "
            "torch==2.13.0), then build against it without build isolation:\n"
            "    pip install --no-build-isolation .\n"
            "(or set MAMLPP_FAST_SKIP_EXT=1 for a pure-Python install)"
        )

    debug = os.environ.get("DEBUG") == "1"
    use_cuda = want_cuda(torch, cpp_extension.CUDA_HOME)
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # gcc flags; nvcc has no -g0
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The stable-ABI tag only affects the tiny PyInit__C stub: the ops talk to torch, not Python.
    # at::parallel_for is header code: with torch's OpenMP backend it is a `#pragma omp parallel`
    # in our own objects, so without -fopenmp every CPU kernel would silently run on one thread.
    # The DT_NEEDED libgomp.so.1 resolves to the copy torch has already loaded (same soname).
    openmp = ["-fopenmp"] if torch._C.has_openmp else []
    # `#pragma omp simd` (vectorised reductions, csrc/cpu/simd.h) needs only -fopenmp-simd.
    # -fno-trapping-math lets gcc turn the kernels' selects (leaky ReLU, argmax) into vector blends:
    # we never rely on floating-point exceptions, and values (NaN included) are unchanged.
    vector = ["-fno-trapping-math"] + ([] if openmp else ["-fopenmp-simd"])
    extra = {"cxx": opt + openmp + vector + ["-DPy_LIMITED_API=0x030A0000"]}
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = nvcc_flags(debug)
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        "mamlpp_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=openmp + ([] if debug else ["-Wl,--strip-debug"]),
        py_limited_api=True,
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension},
        "options": {"bdist_wheel": {"py_limited_api": "cp310"}},
    }


def nvcc_flags(debug: bool) -> list:
    """nvcc's own flags (CI compiles csrc/cuda/*.cu with exactly these: `setup.py --print-nvcc-flags`)."""
    opt = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"]
    return opt + ["-DPy_LIMITED_API=0x030A0000", "--expt-relaxed-constexpr"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--print-nvcc-flags"]:
        print(" ".join(nvcc_flags(os.environ.get("DEBUG") == "1")))
        sys.exit(0)
    if shutil.which("ninja") is None:
        log("ninja not found: torch will fall back to a slow serial distutils build")
    setup(packages=existing_packages(), package_dir=PACKAGE_DIR, **extension_setup_kwargs())
