"""The README's Python examples run as written against the installed package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from mamlpp_fast.testing import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_metalearner_example_runs():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"### MetaLearner in your own loop.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its MetaLearner example"
    namespace: dict = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)
    assert namespace["logits"].shape == (8, 5, 5)
    assert namespace["query_logits"].shape == (8, 5, 5)
    assert set(namespace["fast_weights"]) == set(namespace["learner"].inner_loop_parameter_names)


# One rank: the README's torchrun example with two tiny meta-batches, then what it ends with.
_RANK_SCRIPT = """
import os, sys, torch
from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.testing import make_task_batch
torch.set_num_threads(1)
batches = [(0, make_task_batch(preset("maml++_omniglot_5w1s"), 4, seed=i, dtype=torch.float32)) for i in range(2)]
exec(compile(open(sys.argv[1]).read(), "README.md", "exec"))
from mamlpp_fast.distributed import gloo_threads
torch.save({"loss": float(losses["loss"]), "logits": logits, "state": learner.state_dict(),
            "world_size": learner.distributed.world_size, "gloo_threads": gloo_threads()}, os.environ["TEST_OUT"])
"""


def test_readme_torchrun_example_runs_on_two_ranks(tmp_path):
    text = README.read_text(encoding="utf-8")
    match = re.search(r"Under `torchrun.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its torchrun example"
    example = tmp_path / "example.py"
    example.write_text(match.group(1))
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    port = free_port()
    procs, logs = [], [tmp_path / f"rank{rank}.log" for rank in range(2)]
    for rank, log in enumerate(logs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", MAMLPP_DIST_TIMEOUT="60",
                   TEST_OUT=str(tmp_path / f"rank{rank}.pt"))
        with open(log, "wb") as handle:  # files, not pipes: a rank never blocks on its output
            procs.append(subprocess.Popen([sys.executable, str(script), str(example)], env=env,
                                          stdout=handle, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=180) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    output = "\n".join(f"--- rank {rank}:\n{log.read_text(errors='replace')[-2000:]}" for rank, log in enumerate(logs))
    assert codes == [0, 0], output
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert results[0]["world_size"] == results[1]["world_size"] == 2  # the learner was sharded
    assert results[0]["loss"] == results[1]["loss"]  # the mean over all tasks, on every rank
    assert results[0]["logits"].shape == results[1]["logits"].shape == (4, 5, 5)  # all tasks
    for name, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][name]), name
    assert results[0]["gloo_threads"] == results[1]["gloo_threads"] == []
