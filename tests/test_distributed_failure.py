"""A rank that dies mid-run: the survivor ends with a clear message instead of hanging, the last
checkpoint is intact, and rerunning the same two-rank command resumes from it and finishes.

Two `python -m mamlpp_fast train` processes are started with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on the synthetic tiny preset, over gloo on the CPU.
Rank 1 is killed with SIGKILL as soon as rank 0 has written its first checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mamlpp_fast.testing import free_port, read_until

EPOCHS = 12
ARGS = ["train", "--preset", "synthetic-tiny", "--set", f"total_epochs={EPOCHS}", "--iters-per-epoch", "2",
        "--no-test", "--no-progress", "--device", "cpu", "--threads", "1", "--output-dir", "runs"]
LATEST = os.path.join("runs", "synthetic_tiny_5way_1shot", "saved_models", "train_model_latest")


def _start_ranks(cwd, world_size=2, args=ARGS):
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   MAMLPP_DIST_TIMEOUT="120", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "mamlpp_fast", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout=180):
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a rank did not exit in time (hung in a collective?)")
        outs.append((proc.returncode, out, err))
    return outs


def _await_line(stream, prefix, procs, timeout=180):
    """The lines up to the first starting with `prefix`; if it never comes, stop every process
    and fail with what they printed (instead of signalling a run that is not where it should be)."""
    lines = read_until(stream, prefix, timeout=timeout)
    if not lines or not lines[-1].startswith(prefix):
        for proc in procs:
            proc.kill()
        printed = "".join(lines)
        for proc in procs:
            out, err = proc.communicate()
            printed += f"\n--- exit {proc.returncode}: stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-3000:] if err else ''}"
        pytest.fail(f"never printed a line starting with {prefix!r}:\n{printed}")
    return lines


def test_dead_rank_ends_the_run_with_a_message_and_a_resumable_checkpoint(tmp_path):
    procs = _start_ranks(tmp_path)
    latest = tmp_path / LATEST
    deadline = time.monotonic() + 180
    while not latest.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            outs = _finish(procs, timeout=5)
            pytest.fail(f"no checkpoint before a rank exited or the deadline: {outs}")
        time.sleep(0.05)
    procs[1].kill()  # SIGKILL: no cleanup, no goodbye on the socket beyond the OS closing it
    (code0, out0, err0), (code1, _, _) = _finish(procs, timeout=150)
    assert code1 != 0
    assert code0 == 1, (code0, out0[-2000:], err0[-3000:])
    assert "another rank died" in err0 and "train_model_latest" in err0, err0[-3000:]

    # The checkpoint is whole (atomic writes) and from a finished epoch before the kill.
    state = torch.load(latest, map_location="cpu", weights_only=False)
    saved_iter = int(state["current_iter"])
    assert 2 <= saved_iter < 2 * EPOCHS

    # Rerunning the same two-rank command resumes from it and completes the schedule.
    outs = _finish(_start_ranks(tmp_path))
    for code, out, err in outs:
        assert code == 0, (out[-2000:], err[-3000:])
    assert "resumed from" in outs[0][1] + outs[0][2]
    final = torch.load(latest, map_location="cpu", weights_only=False)
    assert int(final["current_iter"]) == 2 * EPOCHS


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_iteration_and_resumes(tmp_path):
    # torchrun forwards SIGTERM to every worker, but a rank may see it an iteration later than
    # another (or, here, only one rank gets it): one collective per iteration makes all stop
    # together, so none hangs in the next meta-gradient all-reduce, and rank 0 saves mid-epoch.
    args = [*ARGS[:ARGS.index("--iters-per-epoch")], "--iters-per-epoch", "30", *ARGS[ARGS.index("--no-test"):],
            "--checkpoint-minutes", "1e-9"]
    args[args.index(f"total_epochs={EPOCHS}")] = "total_epochs=1"
    procs = _start_ranks(tmp_path, args=args)
    lines = _await_line(procs[0].stdout, "saved progress at iteration 2 ", procs)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs, timeout=150)
    for code, out, err in outs:
        assert code == 128 + signal.SIGTERM, (code, "".join(lines) + out[-2000:], err[-3000:])
    assert "stop signal on another rank: stopped at iteration" in "".join(lines) + outs[0][1]
    state = torch.load(tmp_path / LATEST, map_location="cpu", weights_only=False)
    assert 2 <= int(state["current_iter"]) < 30
    assert state["epoch_in_progress"]["iterations"] == int(state["current_iter"])

    outs = _finish(_start_ranks(tmp_path, args=args))
    for code, out, err in outs:
        assert code == 0, (out[-2000:], err[-3000:])
    assert "epoch 1/1 in progress" in outs[0][1]
    final = torch.load(tmp_path / LATEST, map_location="cpu", weights_only=False)
    assert int(final["current_iter"]) == 30 and "epoch_in_progress" not in final


def test_torchrun_forwards_sigterm_and_the_workers_save_mid_epoch(tmp_path):
    # The real launcher: a scheduler's SIGTERM reaches the torchrun agent, which sends SIGTERM to
    # its workers (and SIGKILL some 30 s later); they stop after the same iteration and rank 0
    # saves the epoch's progress. torchrun itself then exits with its own error.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "mamlpp_fast", *ARGS[:ARGS.index("--iters-per-epoch")], "--iters-per-epoch", "3000",
               *ARGS[ARGS.index("--no-test"):], "--checkpoint-minutes", "1e-9"]
    command[command.index(f"total_epochs={EPOCHS}")] = "total_epochs=1"
    env = dict(os.environ, OMP_NUM_THREADS="1", MAMLPP_DIST_TIMEOUT="120", PYTHONUNBUFFERED="1")
    agent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        lines = _await_line(agent.stdout, "saved progress at iteration 2 ", [agent])
        agent.send_signal(signal.SIGTERM)
        rest, _ = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    output = "".join(lines) + rest
    assert "SIGTERM: stopped at iteration" in output, output[-3000:]
    state = torch.load(tmp_path / LATEST, map_location="cpu", weights_only=False)
    assert 2 <= int(state["current_iter"]) < 3000
    assert state["epoch_in_progress"]["iterations"] == int(state["current_iter"])
    assert f"stopped at iteration {int(state['current_iter'])} " in output
