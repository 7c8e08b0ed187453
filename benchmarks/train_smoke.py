"""The trainer end to end on a device: an interrupted run (SIGTERM mid-epoch, then resumed) must
end where an uninterrupted one ends. The CPU test suite checks this bit for bit; this script is
for the GPU machine, with CUDA graphs (the graphed meta-step, the recorded Adam step, their
re-recording after a resume), where the suite's trainer tests do not run.

    python benchmarks/train_smoke.py --device cuda --cuda-graphs     (gpu_check.sh runs this)
    python benchmarks/train_smoke.py --device cpu                    (dry run)

Prints one ``train_smoke:`` line; exits 1 when the runs differ by more than --tolerance (float64
relative, parameters and per-epoch statistics) or the stop did not happen where it should.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

import torch

from mamlpp_fast.cli import CLI_PRESETS
from mamlpp_fast.config import MAMLConfig
from mamlpp_fast.testing import call_after
from mamlpp_fast.trainer import Trainer

EPOCHS = 3
STOP_AFTER = 4  # meta-iterations: the first of epoch 2 (the tiny preset has 3 per epoch)


def make_trainer(folder: str, args: argparse.Namespace) -> Trainer:
    config = MAMLConfig.from_dict(dict(CLI_PRESETS["synthetic-tiny"], total_epochs=EPOCHS))
    return Trainer(config, folder, device=args.device, dtype=torch.float64, progress=False,
                   log=lambda message: None, learner_options={"cuda_graphs": args.cuda_graphs})


def final_state(trainer: Trainer) -> dict:
    return torch.load(trainer.checkpoint_path("latest"), map_location="cpu", weights_only=False)


def largest_difference(a: dict, b: dict) -> float:
    """Largest relative difference over the network's tensors and the per-epoch statistics."""
    worst = 0.0
    for key, value in a["network"].items():
        other = b["network"][key].to(value.dtype)
        scale = max(float(value.abs().max()), 1e-30)
        worst = max(worst, float((value - other).abs().max()) / scale)
    for key, values in a["per_epoch_statistics"].items():
        if key == "epoch_seconds":
            continue
        for x, y in zip(values, b["per_epoch_statistics"][key]):
            worst = max(worst, abs(float(x) - float(y)) / max(abs(float(x)), 1e-30))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--tolerance", type=float, default=1e-9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        whole = make_trainer(os.path.join(folder, "whole"), args)
        whole_outcome = whole.train()
        part = make_trainer(os.path.join(folder, "parts"), args)
        call_after(part.learner, STOP_AFTER, lambda: os.kill(os.getpid(), signal.SIGTERM))
        stopped = part.train()
        resumed = make_trainer(os.path.join(folder, "parts"), args)
        resumed_outcome = resumed.train()
        difference = largest_difference(final_state(whole), final_state(resumed))
    ok = (whole_outcome["finished"] and resumed_outcome["finished"] and stopped["stopped_because"] == "signal"
          and stopped["current_iter"] == STOP_AFTER and difference <= args.tolerance)
    captures = [getattr(getattr(t.learner, "graphs", None), "captures", 0) for t in (whole, part, resumed)]
    print(f"train_smoke: device {args.device}, cuda_graphs {args.cuda_graphs}, float64: stopped by "
          f"{stopped['signal']} at iteration {stopped['current_iter']}, resumed to "
          f"{resumed_outcome['current_iter']}; largest relative difference from the uninterrupted run "
          f"{difference:.2e} (tolerance {args.tolerance:.0e}); graphs recorded (whole, part, resumed) "
          f"{captures}: {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
