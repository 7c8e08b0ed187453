"""`MetaLearner`: MAML++ with the whole meta-batch of tasks in one pass.

A drop-in for the official `MAMLFewShotClassifier` (same constructor arguments, methods,
attributes and state_dict keys) whose inner loop runs all B tasks together: one grouped conv,
one fused BN + leaky ReLU + max-pool and one LSLR update launch per layer per step, instead of a
Python loop over tasks. It matches `mamlpp_fast.reference.MAMLFewShotClassifier` to rounding
(checked to 1e-10 relative in float64 by the test suite).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils.checkpoint import checkpoint

from . import _backend
from .cuda_graphs import MetaStepGraphs
from .learner_base import ArrayLike, FewShotLearnerBase, TaskBatch
from .mixed_precision import autocast_context, check_autocast_dtype, float32_conv, float32_output, runs_in_float32
from .ops.bn_lrelu_pool import bn_lrelu_pool, bn_lrelu_pool_backend, takes_bfloat16_natively
from .ops.lslr_update import lslr_update, lslr_update_backend
from .ops.task_conv import check_conv_geometry, per_layer_requests, task_conv, task_conv_strategies
from .ops.task_cross_entropy import task_cross_entropy, task_cross_entropy_backend
from .parameters import BN_EPS, BN_MOMENTUM, LEAKY_RELU_SLOPE
from .task_batched import (
    StageStatistics,
    fold_running_statistics,
    runs_fused_stage,
    task_batched_logits,
    to_task_channels,
)

__all__ = ["MetaLearner", "check_task_chunk_size"]

FastWeights = Dict[str, torch.Tensor]
_BACKENDS = ("auto", "aten", "reference", "cpp", "cuda", "triton")
_MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def check_task_chunk_size(value: Any) -> Optional[int]:
    """None, or a positive int number of tasks per chunk; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"task_chunk_size must be a positive integer number of tasks (or None), got {value!r}")
    return int(value)


def _channels_last_output(conv: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
    """conv(x, weight, bias), made channels-last where the convolution returned NCHW: where x
    was both layouts at once (one task of 1-channel images: oneDNN then answers NCHW) or for the
    "bmm" and "triton" strategies, whose output is contiguous."""
    return conv(x, weight, bias).contiguous(memory_format=torch.channels_last)  # no copy if it is already


class MetaLearner(FewShotLearnerBase):
    """MAML++ (all six components) over task-batched fast weights.

    Args:
        config: `MAMLConfig`, dict of official keys, official JSON path or official args
            object (see `FewShotLearnerBase`).
        backend: which kernels run the fused ops: "auto" (compiled kernels when loaded, else
            the ATen composition), "aten", "cpp", "cuda" or "triton". `active_backends`
            reports the choice per op.
        device, dtype, im_shape, args, validate_inputs: as in `FewShotLearnerBase`.
        task_chunk_size: memory-bounded meta-step: `run_train_iter` runs the meta-batch this
            many tasks at a time and accumulates the meta-gradients (each chunk's loss scaled
            by its share of the tasks), then takes one Adam step. Same gradients, metrics and
            target logits as the whole batch at once (to rounding). None: all tasks at once.
        checkpoint_inner_steps: recompute each training inner step (support forward, inner
            gradient, LSLR update, target forward) in the backward pass instead of keeping its
            activations (torch.utils.checkpoint, use_reentrant=False; works with second order).
        conv_strategy: how the task-batched convolutions run: "auto" (default: "explicit" on
            the CPU, "grouped" on CUDA, as measured end to end; see `mamlpp_fast.ops.task_conv`),
            "grouped" (one grouped conv under ATen's autograd), "explicit" (the
            grouped kernels under mamlpp_fast's own double-backward formulas), "bmm" (im2col +
            batched matmul), "triton" (implicit-GEMM Triton kernels, CUDA) or "blockdiag" (one
            dense conv with a block-diagonal weight, for few-channel layers); or one of these per
            conv layer, e.g. ("triton", "auto", "auto", "auto") for a Triton first layer.
            `active_backends["task_conv"]` reports the strategy that runs (per layer, comma-
            separated, when they differ).
        cuda_graphs: on CUDA, record the training meta-step (inner loops, outer backward and
            the Adam step) as a CUDA graph once per batch shape, derivative order and MSL phase,
            and replay it. Same results and optimizer state_dict as eager mode. Elsewhere, or
            combined with task chunking, sharding or checkpointing, it warns once and runs
            eagerly. See `mamlpp_fast.cuda_graphs`.
        memory_format: the layout of the activations: "contiguous" (NCHW), "channels_last"
            (NHWC: oneDNN's grouped convolutions are faster in it on the CPU, and the fused
            batch-norm stage has channels-last CPU kernels), or "auto" (default: channels-last
            where the fused stage runs on the compiled CPU kernels, else contiguous; see
            `active_memory_format`). The results are the same to rounding in either layout.
        autocast_dtype: None (default: full precision, as the official code) or "bfloat16":
            run the convolutions and the classifier under `torch.autocast` in bfloat16, with
            weights, batch-norm arithmetic, losses and updates in float32 (opt-in speed: on a
            CPU with bfloat16 dot products, second-order meta-iterations 22-30% faster; see
            `mamlpp_fast.mixed_precision`). No effect on a float64 learner.

    Example:
        >>> from mamlpp_fast import MetaLearner, preset
        >>> learner = MetaLearner(preset("maml++_omniglot_5w1s"))
        >>> losses, logits = learner.run_train_iter(batch, epoch=0)   # doctest: +SKIP
        >>> fast = learner.adapt(support_x, support_y)                # doctest: +SKIP
        >>> query_logits = learner.predict(query_x, fast)             # doctest: +SKIP
    """

    def __init__(
        self,
        config: Any = None,
        *official_positional: Any,
        backend: str = "auto",
        task_chunk_size: Optional[int] = None,
        checkpoint_inner_steps: bool = False,
        cuda_graphs: bool = False,
        conv_strategy: Union[str, Sequence[str]] = "auto",
        memory_format: str = "auto",
        autocast_dtype: Union[None, str, torch.dtype] = None,
        **kwargs: Any,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        super().__init__(config, *official_positional, **kwargs)
        self.memory_format = memory_format
        self.autocast_dtype = autocast_dtype
        self.conv_strategy = conv_strategy
        self.backend = backend
        self.task_chunk_size = check_task_chunk_size(task_chunk_size)
        self.checkpoint_inner_steps = bool(checkpoint_inner_steps)
        self._deferred_statistics: Optional[Dict[int, List[Any]]] = None
        self.cuda_graphs = bool(cuda_graphs)
        self.graphs = MetaStepGraphs(self)
        self._check_runs_on_device()

    def _check_runs_on_device(self) -> None:
        """An explicit backend or conv strategy that this learner's device cannot run fails here,
        naming the argument, instead of at the first meta-step."""
        default = _backend.get_default_backend()
        if self.backend == "auto" and default not in ("auto", *_backend.BACKENDS):
            raise ValueError(f"the environment variable MAMLPP_FAST_BACKEND={default!r} is not a backend; "
                             f"expected 'auto' or one of {_backend.BACKENDS}")
        if self.backend not in ("auto", "reference", "aten"):
            try:
                _backend.select_backend("MetaLearner", self.device, self.backend)
            except RuntimeError:
                raise ValueError(f"backend: {self.backend!r} cannot run on {self.device} here; usable here: "
                                 f"{['auto', *_backend.available_backends()]}") from None
        try:
            self._describe_conv_strategies()
        except RuntimeError:
            raise ValueError(f"conv_strategy: {self.conv_strategy!r} cannot run on {self.device} here (the "
                             f"'triton' strategy needs a CUDA device, or TRITON_INTERPRET=1)") from None

    # ------------------------------------------------------------------ layout
    @property
    def memory_format(self) -> str:
        """The requested activation layout: "auto", "contiguous" or "channels_last"."""
        return self._memory_format

    @memory_format.setter
    def memory_format(self, value: str) -> None:
        if value not in _MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {_MEMORY_FORMATS}, got {value!r}")
        self._memory_format = value

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype the network passes autocast to (torch.bfloat16), or None."""
        return self._autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, value: Union[None, str, torch.dtype]) -> None:
        dtype = check_autocast_dtype(value)
        if dtype is not None and not torch.amp.is_autocast_available(self.device.type):
            raise ValueError(f"autocast_dtype: torch has no autocast for device {self.device.type!r}")
        self._autocast_dtype = dtype

    def _autocasts(self) -> bool:
        # Autocast leaves float64 alone, so a float64 learner runs as without it.
        return self._autocast_dtype is not None and self.dtype != torch.float64

    @property
    def active_memory_format(self) -> str:
        """The layout the activations run in. "auto" is "channels_last" where the fused stage runs
        on the compiled CPU kernels, which have a channels-last version (second order, 2 threads:
        Omniglot 20w1s 8-16% faster, mini-ImageNet 5w1s 3-13%; benchmarks/RESULTS.md), and
        "contiguous" elsewhere: the CUDA kernels are NCHW-only, and the ATen composition of the
        stage was slower in channels-last."""
        if self._memory_format != "auto":
            return self._memory_format
        fused_stage = runs_fused_stage(self.config.norm_layer, self.config.max_pooling)
        if fused_stage and self.device.type == "cpu":
            probe = torch.empty(1, 1, 2, 2, dtype=self.dtype)
            if bn_lrelu_pool_backend(probe, backend=self._op_backend()) == "cpp":
                return "channels_last"
        return "contiguous"

    def _to_task_channels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, K, C, H, W] -> [N*K, B*C, H, W] in the active layout."""
        out = to_task_channels(images)
        if self.active_memory_format == "channels_last":
            return out.contiguous(memory_format=torch.channels_last)
        return out

    # ------------------------------------------------------------------ backends
    def _op_backend(self) -> Optional[str]:
        return None if self.backend == "auto" else self.backend

    @property
    def active_backends(self) -> Dict[str, str]:
        """The kernel each fused op runs on, for this learner's device and dtype."""
        probe = torch.empty(1, 1, 2, 2, device=self.device, dtype=self.dtype)
        rates = torch.empty(1, device=self.device, dtype=self.dtype)
        fused_stage = runs_fused_stage(self.config.norm_layer, self.config.max_pooling)
        return {
            "bn_lrelu_pool": bn_lrelu_pool_backend(probe, backend=self._op_backend()) if fused_stage else "aten",
            "lslr_update": lslr_update_backend([probe], [probe], rates, backend=self._op_backend()),
            "task_conv": self._describe_conv_strategies(),
            "task_cross_entropy": task_cross_entropy_backend(probe, backend=self._op_backend()),
        }

    @property
    def conv_strategy(self) -> Union[str, Tuple[str, ...]]:
        """The requested task_conv strategy: one name, or a tuple of one per conv layer."""
        return self._conv_strategy

    @conv_strategy.setter
    def conv_strategy(self, value: Union[str, Sequence[str]]) -> None:
        requests = per_layer_requests(value, self.config.num_stages, argument="conv_strategy")
        for request in requests:
            check_conv_geometry(request, self.config.conv_stride, self.config.conv_padding_size,
                                argument="conv_strategy")
        self._conv_requests = requests
        # A tuple when per layer: hashable, so it can key the recorded CUDA graphs.
        self._conv_strategy = value if isinstance(value, str) else tuple(value)

    def _describe_conv_strategies(self) -> str:
        strategies = task_conv_strategies(self.device, self._conv_requests, len(self._conv_requests),
                                          self.config.conv_stride, self.config.conv_padding_size)
        return strategies[0] if len(set(strategies)) == 1 else ",".join(strategies)

    def _convs(self, fused_stage: bool = True) -> List[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The task-batched convolution of each conv layer, with that layer's strategy (and, for
        channels-last activations, its output in channels-last). `fused_stage`: the pass runs
        the fused batch-norm stage (it does not when evaluating with running statistics)."""
        geometry = dict(stride=self.config.conv_stride, padding=self.config.conv_padding_size)
        convs = [functools.partial(task_conv, strategy=request, **geometry) for request in self._conv_requests]
        if self.active_memory_format == "channels_last":
            convs = [functools.partial(_channels_last_output, conv) for conv in convs]
        if self._autocasts() and not (fused_stage and self._stage_reads_bfloat16()):
            # The batch-norm stage computes in float32 from float32 inputs: each bfloat16 output
            # is cast up, except the few-channel first layer's, which stays float32 throughout.
            c_in = [self.config.image_channels] + [self.config.cnn_num_filters] * (len(convs) - 1)
            convs = [functools.partial(float32_conv if runs_in_float32(c) else float32_output, conv)
                     for conv, c in zip(convs, c_in)]
        return convs

    def _stage_reads_bfloat16(self) -> bool:
        """Whether the fused stage's kernels read and write bfloat16 activations themselves (the
        compiled CPU kernels on channels-last activations): then under bfloat16 autocast every
        convolution's output goes to them as it is, with no casts around the stage."""
        if not runs_fused_stage(self.config.norm_layer, self.config.max_pooling):
            return False
        if self.active_memory_format != "channels_last":
            return False
        probe = torch.empty(1, 2, 2, 2, dtype=torch.bfloat16, device=self.device).contiguous(
            memory_format=torch.channels_last)
        return takes_bfloat16_natively(probe, backend=self._op_backend())

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each task's mean cross-entropy and accuracy: logits [B, n, N], labels [B, n] -> [B], [B]."""
        return task_cross_entropy(logits, labels, backend=self._op_backend())

    def _stage(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        return bn_lrelu_pool(x, weight, bias, eps=BN_EPS, negative_slope=LEAKY_RELU_SLOPE,
                             backend=self._op_backend())

    # ------------------------------------------------------------------ network
    def _logits(
        self, images: torch.Tensor, fast: FastWeights, step: int, training_phase: bool
    ) -> Tuple[torch.Tensor, List[StageStatistics]]:
        """images [n, B*C, H, W] -> (logits [B, n, N], per-stage batch statistics)."""
        stages = range(self.config.num_stages)
        affine = [self.norm_affine(fast, i, step) for i in stages]  # [C] or [B, C] (BN); [(B,) C, H, W] (LN)
        running = None
        if not training_phase and self.config.bn_use_running_stats_in_evaluation:
            running = [(self.bn_row(mean, step), self.bn_row(var, step)) for mean, var in self.running_statistics()]
        autocasts = self._autocasts()
        with autocast_context(self.device, self._autocast_dtype if autocasts else None):
            logits, stats = task_batched_logits(
                images,
                [fast[f"layer_dict.conv{i}.conv.weight"] for i in stages],
                [fast[f"layer_dict.conv{i}.conv.bias"] for i in stages],
                fast["layer_dict.linear.weights"],
                fast["layer_dict.linear.bias"],
                [weight for weight, _ in affine],
                [bias for _, bias in affine],
                self._stage,
                running_stats=running,
                conv=self._convs(fused_stage=running is None),
                norm_layer=self.config.norm_layer,
                max_pooling=self.config.max_pooling,
            )
        # The loss (and the logits handed to users) in float32, as autocast runs cross-entropy.
        return (logits.float() if autocasts else logits), stats

    def _initial_fast_weights(self, num_tasks: int, track_meta_gradients: bool) -> FastWeights:
        """Step-0 fast weights: the meta-parameters, broadcast (not copied) over the tasks."""
        fast = {}
        for name, param in self.get_inner_loop_parameter_dict(self.classifier.named_parameters()).items():
            base = param if track_meta_gradients else param.detach().requires_grad_()
            fast[name] = base.unsqueeze(0).expand(num_tasks, *param.shape)
        return fast

    def _inner_update(
        self, support_loss: torch.Tensor, fast: FastWeights, step: int, create_graph: bool
    ) -> FastWeights:
        """LSLR step for all tasks at once: theta - alpha[param, step] * grad."""
        names = list(fast)
        grads = torch.autograd.grad(support_loss.sum(), [fast[n] for n in names], create_graph=create_graph)
        rates = torch.stack([rate[step] for rate in self.learning_rates_for(names)])
        updated = lslr_update([fast[n] for n in names], list(grads), rates, backend=self._op_backend())
        return dict(zip(names, updated))

    def _tracks_running_statistics(self, training_phase: bool) -> bool:
        if not self.config.per_step_batch_norm:
            return False  # the official layer passes running_mean=None then (layer norm keeps none)
        if training_phase:
            return True
        return not (self.config.bn_restore_stats_after_evaluation
                    or self.config.bn_use_running_stats_in_evaluation)

    # ------------------------------------------------------------------ the official per-task call
    def _task_forward(
        self, x: torch.Tensor, y: torch.Tensor, weights: Dict[str, torch.Tensor], training: bool, num_step: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`net_forward` (see the base class) as a meta-batch of one task; its batch statistics
        are folded into step `num_step`'s running statistics, as the official forward does."""
        fast = {name: weight.unsqueeze(0) for name, weight in weights.items()}
        logits, stats = self._logits(x, fast, num_step, training)
        if self._tracks_running_statistics(training):
            self._update_running_statistics(num_step, [stats])
        return torch.nn.functional.cross_entropy(logits[0], y.reshape(-1).long()), logits[0]

    # ------------------------------------------------------------------ inner loop
    def forward(
        self,
        data_batch: TaskBatch,
        epoch: int,
        use_second_order: bool,
        use_multi_step_loss_optimization: bool,
        num_steps: int,
        training_phase: bool,
    ):
        """Inner loops of all B tasks together (official `forward` semantics).

        Returns:
            (losses, target_logits): losses["loss"] is the mean over tasks of each task's
            (MSL-weighted) target loss, with its graph in training; target_logits [B, N*T, N].
        """
        x_support, x_target, y_support, y_target = data_batch
        num_tasks = x_support.shape[0]
        support, target = self._to_task_channels(x_support), self._to_task_channels(x_target)
        y_support, y_target = y_support.reshape(num_tasks, -1), y_target.reshape(num_tasks, -1)
        use_msl = (use_multi_step_loss_optimization and training_phase
                   and epoch < self.config.multi_step_loss_num_epochs)
        final_step = self.config.number_of_training_steps_per_iter - 1
        create_graph = use_second_order and training_phase
        track_stats = self._tracks_running_statistics(training_phase)
        importance = self.get_per_step_loss_importance_vector()

        fast = self._initial_fast_weights(num_tasks, track_meta_gradients=training_phase)
        task_losses: Optional[torch.Tensor] = None
        target_logits: Optional[torch.Tensor] = None
        target_accuracy: Optional[torch.Tensor] = None
        checkpointed = self.checkpoint_inner_steps and training_phase
        for step in range(num_steps):
            evaluate_target = use_msl or step == final_step
            if checkpointed:
                support_loss, fast, support_stats, target_logits_step, target_stats = self._checkpointed_step(
                    support, target, y_support, fast, step, create_graph, evaluate_target)
            else:
                logits, support_stats = self._logits(support, fast, step, training_phase)
                support_loss, _ = self._cross_entropy(logits, y_support)
                fast = self._inner_update(support_loss, fast, step, create_graph)
            if not training_phase:
                # Evaluation never differentiates the meta-parameters: drop the graph early.
                fast = {name: value.detach().requires_grad_() for name, value in fast.items()}
            passes = [support_stats]
            target_loss = None
            if evaluate_target:
                if checkpointed:
                    target_logits = target_logits_step
                else:
                    with torch.set_grad_enabled(training_phase):
                        target_logits, target_stats = self._logits(target, fast, step, training_phase)
                target_loss, target_accuracy = self._cross_entropy(target_logits, y_target)
                weighted = importance[step] * target_loss if use_msl else target_loss
                task_losses = weighted if task_losses is None else task_losses + weighted
                passes.append(target_stats)
            self._record(step, support_loss, fast, target_loss)
            if track_stats:
                self._update_running_statistics(step, passes)
        assert task_losses is not None and target_logits is not None and target_accuracy is not None
        # The last step's accuracy (every task has N*T targets: the mean of the task means is the
        # official mean over all targets).
        losses: Dict[str, Any] = {"loss": task_losses.mean(), "accuracy": target_accuracy.mean().detach()}
        for index, item in enumerate(importance):
            losses[f"loss_importance_vector_{index}"] = item.detach()
        return losses, target_logits.detach()

    def _checkpointed_step(self, support, target, y_support, fast: FastWeights, step: int,
                           create_graph: bool, evaluate_target: bool):
        """One training inner step under torch.utils.checkpoint (non-reentrant): its
        activations are recomputed during the meta-backward instead of being kept."""
        names = list(fast)

        def run(*values):
            weights = dict(zip(names, values))
            logits, support_stats = self._logits(support, weights, step, True)
            support_loss, _ = self._cross_entropy(logits, y_support)
            updated = self._inner_update(support_loss, weights, step, create_graph)
            outputs = [support_loss, *[updated[n] for n in names]]
            stats = list(support_stats)
            if evaluate_target:
                target_logits, target_stats = self._logits(target, updated, step, True)
                outputs.append(target_logits)
                stats += list(target_stats)
            # Statistics leave the region as plain tensors (they are only folded, no_grad).
            flat_stats = [t.detach() for s in stats for t in (s.mean, s.invstd)]
            return (*outputs, *flat_stats), [s.count for s in stats]

        counts: List[int] = []

        def wrapped(*values):
            outputs, stage_counts = run(*values)
            counts[:] = stage_counts
            return outputs

        outputs = checkpoint(wrapped, *[fast[n] for n in names], use_reentrant=False)
        support_loss = outputs[0]
        updated = dict(zip(names, outputs[1:1 + len(names)]))
        rest = list(outputs[1 + len(names):])
        target_logits = rest.pop(0) if evaluate_target else None
        stats = [StageStatistics(rest[2 * i], rest[2 * i + 1], counts[i]) for i in range(len(counts))]
        stages = self.config.num_stages
        return support_loss, updated, stats[:stages], target_logits, stats[stages:] if evaluate_target else None

    def _graphed_train_pass(self, batch, epoch: int):
        return self.graphs.run(batch, epoch) if self.cuda_graphs else None

    # ------------------------------------------------------------------ running statistics
    def _begin_deferred_statistics(self) -> None:
        self._deferred_statistics = {}

    def _end_deferred_statistics(self, gather=None) -> None:
        """Fold the buffered per-step statistics of all chunks in task order; with `gather`
        (an all-gather over ranks along the task axis) every rank folds all B tasks."""
        buffered, self._deferred_statistics = self._deferred_statistics, None
        if not buffered:
            return
        for step in sorted(buffered):
            chunks = buffered[step]  # per chunk: passes, each a list of StageStatistics per stage
            num_passes, stages = len(chunks[0]), len(chunks[0][0])
            tensors = [torch.cat([chunk[p][i].mean for chunk in chunks]) for p in range(num_passes)
                       for i in range(stages)]
            tensors += [torch.cat([chunk[p][i].invstd for chunk in chunks]) for p in range(num_passes)
                        for i in range(stages)]
            if gather is not None:
                widths = [t.shape[1] for t in tensors]
                tensors = list(gather(torch.cat(tensors, dim=1)).split(widths, dim=1))
            half = num_passes * stages
            passes = [
                [StageStatistics(tensors[p * stages + i], tensors[half + p * stages + i], chunks[0][p][i].count)
                 for i in range(stages)]
                for p in range(num_passes)
            ]
            self._fold_running_statistics(step, passes)

    def _update_running_statistics(self, step: int, passes: Sequence[List[StageStatistics]]) -> None:
        if self._deferred_statistics is not None:
            detached = [[StageStatistics(s.mean.detach(), s.invstd.detach(), s.count) for s in stats]
                        for stats in passes]
            self._deferred_statistics.setdefault(step, []).append(detached)
            return
        self._fold_running_statistics(step, passes)

    def _fold_running_statistics(self, step: int, passes: Sequence[List[StageStatistics]]) -> None:
        for stage, (running_mean, running_var) in enumerate(self.running_statistics()):
            fold_running_statistics(running_mean[step], running_var[step],
                                    [stats[stage] for stats in passes], BN_MOMENTUM)

    # ------------------------------------------------------------------ modern API
    def meta_step(self, batch: Sequence[ArrayLike], epoch: Optional[int] = None) -> Dict[str, Any]:
        """One outer step on a batch; returns the metrics of `run_train_iter` (tensors)."""
        losses, _ = self.run_train_iter(batch, self.current_epoch if epoch is None else epoch)
        return losses

    def adapt(
        self,
        support_x: ArrayLike,
        support_y: ArrayLike,
        steps: Optional[int] = None,
        *,
        second_order: bool = False,
    ) -> FastWeights:
        """Run the inner loop on support sets and return the adapted fast weights.

        Args:
            support_x: [B, N, K, C, H, W] support images.
            support_y: [B, N, K] labels in [0, N).
            steps: inner steps (default: number_of_evaluation_steps_per_iter). At most the
                number of per-step BN/LSLR rows.
            second_order: keep the graph, so a loss on the result can be differentiated into
                the meta-parameters to second order. With False (default) the result still
                depends on the meta-parameters to first order.

        Returns:
            Fast weights by official parameter name, each [B, *shape].
        """
        steps = self.config.number_of_evaluation_steps_per_iter if steps is None else int(steps)
        if not 1 <= steps <= self.config.number_of_training_steps_per_iter:
            raise ValueError(
                f"steps must be in [1, {self.config.number_of_training_steps_per_iter}] (one per-step "
                f"BN and LSLR row each), got {steps}"
            )
        dummy_target = support_x[:, :, :1] if isinstance(support_x, torch.Tensor) else support_x[:, :, :1].copy()
        x, _, y, _ = self.prepare_batch((support_x, dummy_target, support_y, support_y[:, :, :1]))
        images = self._to_task_channels(x)
        labels = y.reshape(x.shape[0], -1)
        fast = self._initial_fast_weights(x.shape[0], track_meta_gradients=True)
        for step in range(steps):
            logits, _ = self._logits(images, fast, step, training_phase=True)
            fast = self._inner_update(self._cross_entropy(logits, labels)[0], fast, step, second_order)
        return fast

    def _fast_weights_tasks(self, fast_weights: FastWeights) -> int:
        """The number of tasks B that `fast_weights` (what `adapt` returns: {name: [B, *shape]})
        were adapted on; ValueError naming what is missing or misshapen."""
        if not isinstance(fast_weights, Mapping):
            raise ValueError(f"fast_weights must be the dict that adapt() returns, got {type(fast_weights).__name__}")
        missing = [name for name in self.inner_loop_parameter_names if name not in fast_weights]
        if missing:
            raise ValueError(f"fast_weights lacks {missing}: expected the dict that adapt() returns, with "
                             f"{self.inner_loop_parameter_names}")
        shapes = dict(self.classifier.named_parameters())
        counts = set()
        for name in self.inner_loop_parameter_names:
            weight, shape = fast_weights[name], list(shapes[name].shape)
            if not isinstance(weight, torch.Tensor) or list(weight.shape[1:]) != shape:
                got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(f"fast_weights[{name!r}] must have shape [B, *{shape}] (one row per task, as "
                                 f"adapt() returns), got {got}")
            counts.add(int(weight.shape[0]))
        if len(counts) != 1:
            raise ValueError(f"fast_weights hold different numbers of tasks: {sorted(counts)}")
        return counts.pop()

    def predict(self, query_x: ArrayLike, fast_weights: FastWeights, step: Optional[int] = None) -> torch.Tensor:
        """Logits of query images under adapted fast weights.

        Args:
            query_x: [B, M, C, H, W] or [B, N, T, C, H, W] query images.
            fast_weights: the result of `adapt`.
            step: BN row to use (default: the last inner step). BN uses the query batch's own
                statistics, as the official code does.

        Returns:
            logits [B, M, N] (M = N*T for 6-D input).
        """
        x = torch.as_tensor(query_x)
        if x.dim() == 5:
            x = x.unsqueeze(2)
        if x.dim() != 6 or tuple(x.shape[3:]) != self.config.image_shape:
            raise ValueError(
                f"query_x must have shape [B, M, C, H, W] with (C, H, W) = {self.config.image_shape}, "
                f"got {list(torch.as_tensor(query_x).shape)}"
            )
        num_tasks = self._fast_weights_tasks(fast_weights)
        if x.shape[0] != num_tasks:
            raise ValueError(f"query_x has {x.shape[0]} tasks but fast_weights were adapted on {num_tasks} tasks")
        step = self.config.number_of_training_steps_per_iter - 1 if step is None else int(step)
        images = self._to_task_channels(x.to(device=self.device, dtype=self.dtype))
        logits, _ = self._logits(images, fast_weights, step, training_phase=True)
        return logits
