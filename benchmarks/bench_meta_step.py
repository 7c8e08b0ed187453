"""End-to-end seconds per meta-iteration (`run_train_iter`): MetaLearner against the per-task
reference, in the same run.

    python benchmarks/bench_meta_step.py                      # Omniglot 20w1s + mini-ImageNet 5w1s
    python benchmarks/bench_meta_step.py --settings maml++_omniglot_20w1s --reps 5 --json out.json
    python benchmarks/bench_meta_step.py --providers all --settings all --first-order
    python benchmarks/bench_meta_step.py --providers all --memory   # peak memory, fresh process each

Providers: reference, mamlpp_fast[:backend][+graphs[+eageradam]][+grouped|+explicit|+bmm|+triton][+cudnnbench][+nchw|+nhwc][+bf16][+onednnwgrad]
(+graphs: CUDA-graph replay of the meta-step, `MetaLearner(cuda_graphs=True)`, the Adam step recorded
too; +eageradam: with Adam run eagerly after each replay instead; +grouped / +explicit / +bmm / +triton:
every convolution with that task_conv strategy instead of "auto"; +S1/S2/S3/S4: one strategy per conv
layer, e.g. +triton/auto/auto/auto; +cudnnbench: with
torch.backends.cudnn.benchmark on, for that provider only; +nchw / +nhwc: the activations contiguous or
channels-last instead of "auto", `MetaLearner(memory_format=...)`; +bf16: opt-in mixed precision,
`MetaLearner(autocast_dtype="bfloat16")`; +onednnwgrad: every convolution's weight gradient from
oneDNN, without mamlpp_fast's few-channel CPU kernel, `task_conv.CPU_WEIGHT_GRAD_MAX_C_IN = 0`,
for that provider only), and the peers of benchmarks/peers (torchfunc,
learn2learn, higher; same MAML++ semantics, differences in their docstrings). The reference and
the peers take +bf16 too (e.g. reference+bf16, learn2learn+bf16): each network pass under bfloat16
autocast with float32 logits, MetaLearner's autocast scope, so that mamlpp_fast+bf16 has
like-for-like baselines. `--providers all` is the reference, mamlpp_fast and every peer whose
library imports.

Providers are timed round-robin (one iteration of each in turn, repeated), so machine drift
hits them alike and the ratio to the reference is reliable even when absolute times wander.
Inputs are random images with the official shapes; each iteration is a full meta-step
(inner loops, outer backward, Adam), second order at epoch 0 unless `--first-order`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import env_info, markdown_table, write_json  # noqa: E402

from mamlpp_fast import MetaLearner, preset  # noqa: E402
from mamlpp_fast.ops.task_conv import STRATEGIES as CONV_STRATEGIES  # noqa: E402
from mamlpp_fast.reference import MAMLFewShotClassifier  # noqa: E402
from peers import PEERS, available_peers, make_peer  # noqa: E402

DEFAULT_SETTINGS = ("maml++_omniglot_20w1s", "maml++_mini-imagenet_5w1s")
ALL_SETTINGS = ("maml++_omniglot_5w1s", "maml++_omniglot_20w1s", "maml++_omniglot_20w5s",
                "maml++_mini-imagenet_5w1s", "maml++_mini-imagenet_5w5s")


@dataclasses.dataclass(frozen=True)
class Config:
    setting: str
    second_order: bool
    batch_size: int
    dtype: str = "float32"
    device: str = "cpu"


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    provider: str
    seconds_median: float
    seconds_min: float
    reps: int
    speedup_vs_reference: float
    # Against the reference in the provider's own precision: reference+bf16 for a +bf16 provider
    # when the run timed it, else the float32 reference (NaN without one).
    speedup_vs_same_precision_reference: float


def random_batch(config, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, n = config.batch_size, config.num_classes_per_set
    k, t = config.num_samples_per_class, config.num_target_samples
    labels = torch.arange(n).view(1, n, 1)
    return (torch.rand(b, n, k, *config.image_shape, generator=gen),
            torch.rand(b, n, t, *config.image_shape, generator=gen),
            labels.expand(b, n, k).clone(), labels.expand(b, n, t).clone())


# The "+" options of a mamlpp_fast provider that are not a conv strategy.
PROVIDER_FLAGS = ("graphs", "eageradam", "cudnnbench", "nchw", "nhwc", "bf16", "onednnwgrad")


def make_provider(name: str, config, dtype: torch.dtype, device: str) -> Callable[[tuple], None]:
    """A function that runs one full meta-iteration of provider `name` on a batch."""
    options: List[str] = []  # "+" options of a mamlpp_fast provider
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, *options = name.split("+")
        if base == "reference" or base in PEERS:
            if options not in ([], ["bf16"]):
                raise ValueError(f"{name!r}: the reference and the peers take one option, +bf16 (each "
                                 f"network pass under bfloat16 autocast, as MetaLearner's), got {options}")
            autocast_dtype = torch.bfloat16 if options else None
            if base == "torchfunc" and options:
                # vmap(grad(...)) of F.batch_norm on bfloat16 activations with float32 weight and
                # bias fails in its backward ("expected scalar type BFloat16 but found Float",
                # torch 2.13); outside vmap the same call works.
                raise ValueError(f"{name!r}: torch.func's vmap cannot differentiate batch norm on bfloat16 "
                                 "activations with float32 parameters (torch 2.13), so this peer has no "
                                 "bfloat16 variant")
        if base == "reference":
            cls = AutocastReference if autocast_dtype is not None else MAMLFewShotClassifier
            learner = cls(config, device=device, dtype=dtype)
        elif base.startswith("mamlpp_fast"):
            # Besides the flags, at most one conv strategy: a name, or one per layer joined by "/".
            conv_options = [o for o in options if o not in PROVIDER_FLAGS]
            unknown = [o for o in conv_options if not set(o.split("/")) <= set(CONV_STRATEGIES) | {"auto"}]
            if "eageradam" in options and "graphs" not in options:
                raise ValueError(f"{name!r}: +eageradam is a variant of +graphs (Adam after each replay)")
            if unknown or len(conv_options) > 1:
                raise ValueError(f"unknown or conflicting provider option(s) {sorted(unknown or conv_options)} in "
                                 f"{name!r}: flags {PROVIDER_FLAGS} and at most one conv strategy from "
                                 f"{('auto',) + CONV_STRATEGIES}, or one per layer joined by '/'")
            conv = conv_options[0] if conv_options else "auto"
            conv = tuple(conv.split("/")) if "/" in conv else conv
            backend = base.split(":", 1)[1] if ":" in base else "auto"
            if "nchw" in options and "nhwc" in options:
                raise ValueError(f"{name!r}: +nchw and +nhwc are two layouts; pick one")
            memory_format = ("contiguous" if "nchw" in options else "channels_last" if "nhwc" in options
                             else "auto")
            learner = MetaLearner(config, backend=backend, device=device, dtype=dtype,
                                  cuda_graphs="graphs" in options, conv_strategy=conv,
                                  memory_format=memory_format,
                                  autocast_dtype="bfloat16" if "bf16" in options else None)
            learner.graphs.optimizer_in_graph = "eageradam" not in options
        elif base in PEERS:
            peer = make_peer(base, config, dtype, device, autocast_dtype)

            def peer_step(batch):
                float(peer.run_train_iter(batch, epoch=0))

            return peer_step
        else:
            raise ValueError(f"unknown provider {name!r}")

    def step(batch):
        losses, _ = learner.run_train_iter(batch, epoch=0)
        float(losses["loss"])  # wait for the work (a sync on GPU) so the timing is complete

    if "onednnwgrad" in options:
        step = without_cpu_weight_grad_kernel(step)
    return with_cudnn_benchmark(step) if "cudnnbench" in options else step


class AutocastReference(MAMLFewShotClassifier):
    """The per-task reference with MetaLearner(autocast_dtype="bfloat16")'s scope: each network
    pass under bfloat16 autocast, the logits and the loss float32, every derivative outside
    autocast (provider "reference+bf16", for a like-for-like ratio of MetaLearner's bfloat16 mode)."""

    def _task_forward(self, x, y, weights, training, num_step):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            _, logits = super()._task_forward(x, y, weights, training, num_step)
        logits = logits.float()
        return F.cross_entropy(logits, y), logits


def without_cpu_weight_grad_kernel(step: Callable[[tuple], None]) -> Callable[[tuple], None]:
    """`step` with mamlpp_fast's few-channel CPU weight-gradient kernel off (oneDNN's grouped
    weight gradient and an ATen channel sum instead), restored afterwards."""
    # The module (mamlpp_fast.ops.task_conv is also the name of the function the package exports).
    module = importlib.import_module("mamlpp_fast.ops.task_conv")

    def wrapped(batch):
        previous = module.CPU_WEIGHT_GRAD_MAX_C_IN
        module.CPU_WEIGHT_GRAD_MAX_C_IN = 0
        try:
            step(batch)
        finally:
            module.CPU_WEIGHT_GRAD_MAX_C_IN = previous

    return wrapped


def with_cudnn_benchmark(step: Callable[[tuple], None]) -> Callable[[tuple], None]:
    """`step` with torch.backends.cudnn.benchmark on (cuDNN times its algorithms for each new conv
    shape and keeps the fastest; the warm-up pass pays for it), restored afterwards so that the
    other providers of the run keep PyTorch's default."""

    def wrapped(batch):
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            step(batch)
        finally:
            torch.backends.cudnn.benchmark = previous

    return wrapped


def run_experiment(config: Config, providers: List[str], reps: int) -> List[Result]:
    settings = preset(config.setting, batch_size=config.batch_size, second_order=config.second_order)
    dtype = getattr(torch, config.dtype)
    batch = tuple(t.to(config.device) for t in random_batch(settings))  # staged once, as a loader would
    steps: Dict[str, Callable] = {p: make_provider(p, settings, dtype, config.device) for p in providers}
    for step in steps.values():  # warm-up (allocator, oneDNN primitive caches)
        step(batch)
    samples: Dict[str, List[float]] = {p: [] for p in providers}
    for _ in range(reps):
        for provider, step in steps.items():
            start = time.perf_counter()
            step(batch)
            samples[provider].append(time.perf_counter() - start)
    medians = {p: statistics.median(s) for p, s in samples.items()}
    reference = medians.get("reference", float("nan"))
    reference_bf16 = medians.get("reference+bf16", float("nan"))

    def same_precision_reference(provider: str) -> float:
        return reference_bf16 if "bf16" in provider.split("+")[1:] else reference

    return [
        Result(config, p, medians[p], min(s), len(s), reference / medians[p],
               same_precision_reference(p) / medians[p])
        for p, s in samples.items()
    ]


def print_results(results: List[Result]) -> str:
    rows = [
        (r.config.setting, "2nd" if r.config.second_order else "1st", r.config.batch_size, r.config.dtype,
         r.provider, r.seconds_median, r.seconds_min, r.reps, r.speedup_vs_reference,
         r.speedup_vs_same_precision_reference)
        for r in results
    ]
    table = markdown_table(
        ["setting", "order", "B", "dtype", "provider", "s/iter (median)", "s/iter (min)", "reps", "speed-up vs reference",
         "vs reference in its precision"],
        rows,
    )
    print(table)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma-separated preset names")
    parser.add_argument("--providers", default="reference,mamlpp_fast:aten,mamlpp_fast",
                        help="reference, mamlpp_fast (auto backend), mamlpp_fast:<backend>")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's tasks per batch")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--allocator", default="system", choices=("system", "keep"),
                        help="keep: mamlpp_fast.allocator.keep_freed_memory() first (as mamlpp-train "
                             "does); system (default): glibc's defaults, as a plain script gets")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory instead of timing: each provider in a fresh process")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        from mamlpp_fast.allocator import keep_freed_memory

        keep_freed_memory()
    print(f"# {env_info()}")
    providers = [p for p in args.providers.split(",") if p]
    if providers == ["all"]:
        providers = ["reference", "mamlpp_fast", *available_peers()]
    settings_list = list(ALL_SETTINGS) if args.settings == "all" else args.settings.split(",")
    if args.memory_child or args.memory:
        run_memory(args, providers, settings_list, argv)
        return
    results: List[Result] = []
    for setting in settings_list:
        batch_size = args.batch_size or preset(setting).batch_size
        config = Config(setting, not args.first_order, batch_size, args.dtype, args.device)
        results += run_experiment(config, providers, args.reps)
        if len(settings_list) > 1:  # long sweeps: each setting's rows as soon as it is done
            print_results(results[-len(providers):])
            print(flush=True)
    print_results(results)
    if args.json:
        write_json(args.json, "bench_meta_step", results)


def run_memory(args, providers: List[str], settings_list: List[str], argv) -> None:
    """--memory: one fresh process per (setting, provider); --memory-child: be that process."""
    import json

    from memory_probe import MARKER, MemoryResult, measure_child, print_memory, run_in_subprocess

    if args.memory_child:
        (setting,), (provider,) = settings_list, providers
        config = preset(setting, batch_size=args.batch_size or preset(setting).batch_size,
                        second_order=not args.first_order)
        step = make_provider(provider, config, getattr(torch, args.dtype), args.device)
        print(MARKER + json.dumps(measure_child(step, random_batch(config), args.reps, args.device)),
              flush=True)
        return
    results = []
    for setting in settings_list:
        batch_size = args.batch_size or preset(setting).batch_size
        for provider in providers:
            child = ["--memory-child", "--settings", setting, "--providers", provider,
                     "--reps", str(args.reps), "--dtype", args.dtype, "--device", args.device,
                     "--batch-size", str(batch_size)]
            child += ["--first-order"] if args.first_order else []
            child += ["--threads", str(args.threads)] if args.threads else []
            child += ["--allocator", args.allocator]
            out = run_in_subprocess(__file__, child)
            results.append(MemoryResult(setting, not args.first_order, batch_size, args.dtype,
                                        args.device, provider, **out))
            print(f"# {setting} {provider}: {out['peak_mib']:.1f} MiB", flush=True)
    print_memory(results)
    if args.json:
        write_json(args.json, "bench_meta_step_memory", results)


if __name__ == "__main__":
    main()
