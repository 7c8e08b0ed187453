#!/usr/bin/env bash
# Builds .whl/ (git-ignored): the peer libraries for the GPU machine, which has no network.
#
#   bash benchmarks/prepare_gpu_payload.sh          # here, with network; then on the device:
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"]
#
# The H200 image has Python 3.12, torch, torchvision, numpy, scipy, requests, pillow, cloudpickle
# and Cython, but not learn2learn, higher or gym (../.library/device/KINDS.md). gpu_check.sh
# installs whatever is in .whl/ with `pip install --no-index --no-deps --target` and then times the
# peers on the GPU. learn2learn has Cython extensions, so its wheel is built here for CPython 3.12
# (the .c files in its sdist predate 3.12 and are regenerated first); the others are pure Python.
# Needs a python3.12 (PY312=...; pyenv's works) and about 3 MB of disk for the wheels.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.whl"
is_py312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
if [[ -z "${PY312:-}" ]]; then
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if is_py312 "$candidate"; then PY312="$candidate"; break; fi
  done
fi
if [[ -z "${PY312:-}" ]] || ! is_py312 "$PY312"; then
  echo "prepare_gpu_payload: need CPython 3.12 (the GPU image's); set PY312" >&2
  exit 2
fi
WORK="$(mktemp -d /tmp/gpu_payload.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
"$PY312" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q cython setuptools wheel

rm -rf "$DEST" && mkdir -p "$DEST"
"$VPY" -m pip download -q --no-deps -d "$DEST" higher==0.2.1 gym_notices==0.1.0
"$VPY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" gym==0.26.2 learn2learn==0.2.0
"$VPY" -m pip wheel -q --no-deps -w "$DEST" "$WORK/gym-0.26.2.tar.gz"
tar xzf "$WORK/learn2learn-0.2.0.tar.gz" -C "$WORK"
(cd "$WORK/learn2learn-0.2.0" && "$WORK/venv/bin/cythonize" -q -3 -f learn2learn/data/*.pyx \
  && "$VPY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .)
ls -la "$DEST"
