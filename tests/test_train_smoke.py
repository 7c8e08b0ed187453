"""benchmarks/train_smoke.py, which gpu_check.sh runs on the GPU machine, works on the CPU (a
broken script would cost a lease's trainer check) and fails when the runs differ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_smoke.py"


def _run(*args):
    # cwd outside the repository: the installed package, not the source folder.
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                          timeout=300, cwd="/")


def test_train_smoke_passes_on_the_cpu():
    result = _run("--cuda-graphs")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("train_smoke:") and "stopped by SIGTERM at iteration 4, resumed to 9" in line
    assert line.endswith(": ok")


def test_train_smoke_fails_when_the_runs_differ():
    # A negative tolerance cannot be met: the script must say FAILED and exit 1.
    result = _run("--tolerance", "-1")
    assert result.returncode == 1 and result.stdout.strip().endswith(": FAILED"), result.stdout
