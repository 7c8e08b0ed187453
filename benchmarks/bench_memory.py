"""Memory of a second-order MAML++ meta-step: plain vs task-chunked vs inner-step checkpointed.

What is measured (per mode, one meta-forward + meta-backward of `MetaLearner`):

- CPU: the bytes of distinct tensor storages that autograd keeps for the backward
  (`torch.autograd.graph.saved_tensors_hooks` around the forward; storages counted once).
  This is the memory the meta-step holds between its forward and its backward, which is what
  grows with inner steps and tasks.
  * plain: the whole meta-batch's graph;
  * chunked (task_chunk_size=k): the graph of one chunk of k tasks (each chunk's graph is freed by
    its backward before the next chunk runs), measured as a k-task forward;
  * checkpointed (checkpoint_inner_steps=True): what stays saved outside the checkpointed steps;
    the backward additionally recomputes one step at a time (about plain / steps more,
    transiently), which this measure does not include.
- CUDA (--device cuda): torch.cuda.max_memory_allocated() over the whole run_train_iter minus the
  memory allocated before it (includes the transient recomputation).

    python benchmarks/bench_memory.py --quick     # tiny CPU sweep, < 3 minutes
    python benchmarks/bench_memory.py --device cuda --filters 64
    python benchmarks/bench_memory.py --target [--device cuda]   # the scale issue's target, below

--target: the scale issue's target, mini-ImageNet 5w1s (48 filters), B=32, second order: the
peak memory of one plain 5-step run_train_iter against one 20-step run_train_iter with task
chunking (--chunk, default 1 here: 4) and inner-step checkpointing, each in a fresh process
(CPU: growth of peak RSS, an upper bound of the live peak; CUDA: max_memory_allocated growth).

Writes benchmarks/figures/memory_bounded.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from mamlpp_fast import MetaLearner, preset

HERE = os.path.dirname(os.path.abspath(__file__))


def make_batch(config, num_tasks, dtype, device):
    gen = torch.Generator().manual_seed(0)
    n, k, t = config.num_classes_per_set, config.num_samples_per_class, config.num_target_samples
    x_s = torch.randn(num_tasks, n, k, *config.image_shape, generator=gen).to(device, dtype)
    x_t = torch.randn(num_tasks, n, t, *config.image_shape, generator=gen).to(device, dtype)
    labels = torch.arange(n).view(1, n, 1)
    return x_s, x_t, labels.expand(num_tasks, n, k).clone(), labels.expand(num_tasks, n, t).clone()


def saved_bytes(learner, batch, epoch=0) -> int:
    """Distinct storage bytes autograd saves during one training forward (then backward)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    learner.zero_grad(set_to_none=True)
    prepared = learner.prepare_batch(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, _ = learner.train_forward_prop(prepared, epoch)
    held = sum(storages.values())
    losses["loss"].backward()
    return held


def cuda_peak(learner, batch) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    learner.run_train_iter(batch, 0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(mode, steps, tasks, args, device, dtype) -> int:
    config = preset("maml++_omniglot_5w1s", cnn_num_filters=args.filters, number_of_training_steps_per_iter=steps,
                    number_of_evaluation_steps_per_iter=steps, second_order=True, batch_size=tasks)
    options = {"checkpoint_inner_steps": True} if mode == "checkpointed" else {}
    if mode == "chunked":
        options["task_chunk_size"] = args.chunk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config, device=device, dtype=dtype, **options)
    if device.type == "cuda":
        batch = make_batch(config, tasks, dtype, device)
        cuda_peak(learner, batch)  # warm-up
        return cuda_peak(learner, batch)
    # CPU: a chunk's graph is what a k-task forward saves.
    learner.task_chunk_size = None
    batch = make_batch(config, min(args.chunk, tasks) if mode == "chunked" else tasks, dtype, device)
    return saved_bytes(learner, batch)


TARGET_TASKS, TARGET_PLAIN_STEPS, TARGET_BOUNDED_STEPS = 32, 5, 20


def target_child(mode: str, args, device) -> None:
    """Be one fresh process of --target: build the learner, run one run_train_iter, report."""
    from memory_probe import MARKER, measure_child

    steps = TARGET_PLAIN_STEPS if mode == "plain" else TARGET_BOUNDED_STEPS
    config = preset("maml++_mini-imagenet_5w1s", batch_size=TARGET_TASKS, second_order=True,
                    number_of_training_steps_per_iter=steps, number_of_evaluation_steps_per_iter=steps)
    options = {} if mode == "plain" else {"task_chunk_size": args.chunk, "checkpoint_inner_steps": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config, device=device, **options)
    batch = make_batch(config, TARGET_TASKS, torch.float32, device)
    result = measure_child(lambda b: float(learner.run_train_iter(b, 0)[0]["loss"]), batch, 1, str(device))
    import json

    print(MARKER + json.dumps(result), flush=True)


def run_target(args, device) -> int:
    from memory_probe import run_in_subprocess

    results = {}
    for mode in ("plain", "bounded"):
        child = ["--target-child", mode, "--device", str(device), "--threads", str(args.threads),
                 "--chunk", str(args.chunk)]
        try:
            results[mode] = run_in_subprocess(__file__, child)
        except RuntimeError as error:  # e.g. killed by the kernel's out-of-memory killer (-9)
            results[mode] = {"failed": str(error).splitlines()[0]}
        print(f"# {mode}: {results[mode]}", flush=True)
    what = "peak RSS growth" if device.type == "cpu" else "peak allocated growth"
    print(f"\nmini-ImageNet 5w1s, B={TARGET_TASKS}, second order, float32, {device.type} ({what}):")
    print("| run | inner steps | options | MiB | s/iter |\n|---|---|---|---|---|")
    rows = (("plain", TARGET_PLAIN_STEPS, "-"),
            ("bounded", TARGET_BOUNDED_STEPS, f"task_chunk_size={args.chunk}, checkpoint_inner_steps"))
    for mode, steps, options in rows:
        r = results[mode]
        cells = ("failed: " + r["failed"], "-") if "failed" in r else (f"{r['peak_mib']:.0f}",
                                                                      f"{r['seconds_per_iter']:.1f}")
        print(f"| {mode} | {steps} | {options} | {cells[0]} | {cells[1]} |")
    plain, bounded = results["plain"], results["bounded"]
    if "failed" in bounded:
        verdict = "NOT met (the bounded run failed)"
    elif "failed" in plain:
        verdict = "met: the plain 5-step run did not fit in this machine's memory at all, the bounded 20-step run did"
    else:
        ratio = bounded["peak_mib"] / plain["peak_mib"]
        verdict = f"{'met' if ratio <= 1 else 'NOT met'} ({ratio:.2f}x the plain 5-step peak)"
    print(f"\ntarget (bounded 20-step peak <= plain 5-step peak): {verdict}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="store_true", help="the scale issue's memory target (see above)")
    parser.add_argument("--target-child", choices=["plain", "bounded"], help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sweep for a busy CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--filters", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None,
                        help="task_chunk_size of the chunked mode (default 1; --target: 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "figures", "memory_bounded.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.chunk is None:
        args.chunk = 4 if (args.target or args.target_child) else 1
    if args.target_child:
        target_child(args.target_child, args, device)
        return 0
    if args.target:
        return run_target(args, device)
    dtype = torch.float32
    if args.filters is None:
        args.filters = 16 if args.quick else 64
    step_values = [1, 2, 3, 5] if args.quick else [1, 2, 3, 5, 8]
    task_values = [1, 2, 4, 8] if args.quick else [2, 4, 8, 16, 32]
    fixed_tasks, fixed_steps = (4, 3) if args.quick else (16, 5)
    modes = ["plain", "chunked", "checkpointed"]
    start = time.time()
    by_steps = {m: [measure(m, s, fixed_tasks, args, device, dtype) for s in step_values] for m in modes}
    by_tasks = {m: [measure(m, fixed_steps, b, args, device, dtype) for b in task_values] for m in modes}
    mib = 1 / 2 ** 20
    what = "saved-tensor MiB" if device.type == "cpu" else "peak allocated MiB"
    print(f"device {device}, float32, Omniglot 5w1s, {args.filters} filters, second order, "
          f"chunk {args.chunk}; {what}; {time.time() - start:.1f}s")
    print(f"\n| inner steps (B={fixed_tasks}) | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for i, s in enumerate(step_values):
        print(f"| {s} | " + " | ".join(f"{by_steps[m][i] * mib:.2f}" for m in modes) + " |")
    print(f"\n| tasks B (steps={fixed_steps}) | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for i, b in enumerate(task_values):
        print(f"| {b} | " + " | ".join(f"{by_tasks[m][i] * mib:.2f}" for m in modes) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:
        print(f"no plot: {error}", file=sys.stderr)
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in modes:
        axes[0].plot(step_values, [v * mib for v in by_steps[m]], "o-", label=m)
        axes[1].plot(task_values, [v * mib for v in by_tasks[m]], "o-", label=m)
    axes[0].set_xlabel(f"inner steps (B={fixed_tasks})")
    axes[1].set_xlabel(f"tasks per meta-batch (steps={fixed_steps})")
    for ax in axes:
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"second-order meta-step memory ({device.type}, {args.filters} filters, chunk={args.chunk})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
