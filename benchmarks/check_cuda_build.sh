#!/usr/bin/env bash
# Build mamlpp_fast with its CUDA kernels on a machine without a GPU, and check that every op has
# a CUDA kernel registered: the step before a GPU lease that CI's nvcc syntax check cannot do
# (linking, registration, the real build's flags against a CUDA torch).
#
#   bash benchmarks/check_cuda_build.sh            # venv in /tmp/mamlpp_cu_venv (5.5 GB), ~8 min
#
# It installs torch==2.14.1 (the CUDA 13.0 build, from the local wheel mirror; see
# ../shared/docs/toolchain.md) into a throw-away venv, builds a clean clone of HEAD there with
# MAMLPP_FAST_BUILD_CUDA=1, and imports it. Nothing runs on a GPU. Exit status 0 when every op of
# csrc/registration.cpp has both a CPU and a CUDA kernel.
set -euo pipefail

VENV="${VENV:-/tmp/mamlpp_cu_venv}"
BUILD="$(mktemp -d /tmp/mamlpp_cu_build.XXXXXX)"
PY311="${PY311:-python3.11}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY311" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 'numpy<2.4' setuptools wheel ninja pytest
fi
git clone -q "$ROOT" "$BUILD/src"
NV="$("$VENV/bin/python" -c 'import nvidia, os; print(nvidia.__path__[0])')"
(cd "$BUILD/src" && CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAMLPP_FAST_BUILD_CUDA=1 CPATH="$NV/cu13/include" MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps .)

# Every op defined in registration.cpp must have a CPU and a CUDA kernel in the built library.
OPS="$(grep -o 'm.def("[a-z_]*' "$ROOT/csrc/registration.cpp" | sed 's/m.def("//' | tr '\n' ' ')"
cd /tmp && "$VENV/bin/python" - $OPS <<'PY'
import sys

import torch

from mamlpp_fast import _backend

print(_backend.describe_backends())
missing = [f"{op} ({key})" for op in sys.argv[1:] for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mamlpp_fast::{op}", key)]
print(f"{len(sys.argv) - 1} ops:", " ".join(sys.argv[1:]))
if missing or not _backend.has_cuda_extension():
    sys.exit(f"check_cuda_build: no kernel for {missing or 'the CUDA extension'}")
print("check_cuda_build: every op has CPU and CUDA kernels")
PY
rm -rf "$BUILD"
