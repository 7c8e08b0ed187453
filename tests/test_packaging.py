"""The installed package: imported from outside the source tree, backends reported, fallbacks work."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mamlpp_fast

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_tests_import_the_installed_package():
    # Under `pytest tests -q` from the repo root the installed copy must be what is imported:
    # the source folder has no compiled _C and no mamlpp_fast.kernels.
    if _is_editable_install():
        pytest.skip("editable install: the source tree is the installed package")
    installed = Path(mamlpp_fast.__file__).resolve().parent
    assert installed != (REPO / "mamlpp_fast").resolve(), f"imported the source tree {installed}"
    assert (installed / "kernels" / "__init__.py").exists(), "kernels/ not installed as a subpackage"


def _is_editable_install() -> bool:
    try:
        direct_url = importlib.metadata.distribution("mamlpp_fast").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


def test_import_from_outside_the_source_tree(tmp_path):
    run = run_python(
        "import mamlpp_fast, mamlpp_fast.kernels, mamlpp_fast.ops; "
        "print(mamlpp_fast.__file__); print(mamlpp_fast._backend.describe_backends())",
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    path, summary = run.stdout.strip().splitlines()[-2:]
    assert "usable backends: reference, aten" in summary
    assert Path(path).resolve().parent != (REPO / "mamlpp_fast").resolve()


def test_kernels_package_does_not_import_triton(tmp_path):
    run = run_python("import sys, mamlpp_fast.kernels; print('triton' in sys.modules)", tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_describe_backends():
    text = mamlpp_fast._backend.describe_backends()
    assert text.startswith("mamlpp_fast with torch") and text.endswith(".")
    backends = mamlpp_fast._backend.available_backends()
    assert backends[:2] == ["reference", "aten"]
    assert ("cpp" in backends) == mamlpp_fast._backend.has_extension()
    if mamlpp_fast._backend.has_cuda_extension():
        assert "with CUDA kernels" in text
    if mamlpp_fast._backend.has_triton() and not torch.cuda.is_available() and not mamlpp_fast._backend.triton_interpret():
        # Installed but unusable here: said so, not "compiled" beside a backend list without it.
        assert "installed (its kernels need a GPU" in text and "triton" not in backends


@pytest.mark.skipif(not mamlpp_fast._backend.has_extension(), reason="needs the compiled extension")
def test_cpu_kernels_use_torchs_threads():
    # at::parallel_for compiles to a serial loop in an extension built without -fopenmp: the CPU
    # kernels then ignore torch.set_num_threads (a real past bug of this build).
    saved, threads = torch.get_num_threads(), 2
    try:
        torch.set_num_threads(threads)
        assert mamlpp_fast._backend.cpu_kernel_threads() == torch.get_num_threads() == threads
        assert f"on {threads} of {threads} threads" in mamlpp_fast._backend.describe_backends()
    finally:
        torch.set_num_threads(saved)


def test_disable_ext_env_var(tmp_path):
    code = ("from mamlpp_fast import _backend as b; "
            "print(b.has_extension(), b.has_cuda_extension(), b.available_backends(), b.extension_error())")
    run = run_python(code, tmp_path, MAMLPP_FAST_DISABLE_EXT="1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("False False ['reference', 'aten']")
    assert "MAMLPP_FAST_DISABLE_EXT" in run.stdout
    assert "Traceback" not in run.stderr


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for heading in ("Install", "Test"):
        section = re.search(rf"^## {heading}\s*$(.*?)(?=^## |\Z)", readme, re.M | re.S)
        assert section, f"README.md has no '## {heading}' section"
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", section.group(1), re.M | re.S)
        assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 1, heading
    ci = REPO / ".ci" / "run"
    if not ci.exists():
        pytest.skip(".ci/run is not shipped here")
    run = subprocess.run(["bash", str(ci), "--print-commands"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    install, test = run.stdout.strip().splitlines()
    assert "--no-build-isolation" in install and "torch==" in install
    assert test.startswith("pytest ") and "python -m pytest" not in test
    assert f"```bash\n{install}\n```" in readme and f"```bash\n{test}\n```" in readme


def test_plain_pip_install_explains_itself():
    # Without torch, setup.py must stop at once with instructions (what build isolation gives).
    code = (
        "import builtins, runpy, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise ImportError('no torch')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    if not (REPO / "setup.py").exists():
        pytest.skip("no setup.py")
    run = run_python(code, REPO, MAMLPP_FAST_SKIP_EXT="0")
    assert run.returncode != 0
    assert "--no-build-isolation" in run.stderr and "Install torch first" in run.stderr
    assert "pip install torch " not in run.stderr  # never advise an unpinned torch
