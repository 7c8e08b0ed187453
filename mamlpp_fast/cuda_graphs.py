"""CUDA-graph replay of MetaLearner's training meta-step.

A MAML++ meta-step is many small kernels: for Omniglot 20-way with 5 inner steps about a
thousand launches (4 stages x 5 steps x forward, backward and double backward, plus the LSLR
updates and the outer backward). On a fast GPU the launches, not the arithmetic, set its time.
`MetaStepGraphs` captures the forward pass, the inner loop and the outer backward once per
"shape" of meta-step and replays the recording afterwards:

- a shape is the batch's shapes and dtypes plus the two epoch-dependent switches of MAML++, the
  derivative order (DA) and whether the multi-step loss is on (MSL); a new shape is captured on
  first use, so DA switching to second order costs one more capture;
- the batch is staged into static input tensors, and the MSL weights (which change every epoch)
  into a static buffer, before each replay;
- the gradients land in static tensors that are handed to the parameters' `.grad`;
- the imagenet +-10 gradient clamp and the outer Adam step are recorded too: `GraphAdam` (see
  `mamlpp_fast.graph_adam`) updates the optimizer's own state in place, reading the cosine-annealed
  learning rate and the bias corrections from device scalars written before each replay, and
  advances the optimizer's CPU step counters after it. The optimizer stays an ordinary Adam, so its
  state_dict and checkpoints are unchanged. An optimizer it cannot record (another class, amsgrad,
  weight decay, step hooks, ...) steps eagerly after each replay instead, with a warning;
- the per-step BN running statistics are folded inside the graph, in place, as in eager mode.

Warm-up passes (needed before capture, so that lazy initialisation such as cuDNN handles and
Triton compilation happens outside the recording) would fold the running statistics too; the
whole state_dict is saved before them and restored after, so capturing changes no learner state.
(The running statistics are parameters with requires_grad=False, as in the official code, not
buffers: an H200 run on 2026-11-30 caught an earlier version that restored buffers only.)

Where a graph cannot be used (not on CUDA, task chunking, distributed sharding, inner-step
checkpointing, tracing) or capture fails, the meta-step runs eagerly and a warning says why,
once per reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .graph_adam import GraphAdam

__all__ = ["MetaStepGraphs"]

_MAX_GRAPHS = 4  # shapes kept captured at once (DA and MSL give at most 3 per batch shape)


@dataclasses.dataclass
class _CapturedStep:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: Tuple[torch.Tensor, ...]
    importance: torch.Tensor
    params: List[torch.nn.Parameter]
    grads: List[Optional[torch.Tensor]]
    loss: torch.Tensor
    accuracy: torch.Tensor
    logits: torch.Tensor
    adam: Optional[GraphAdam]  # the recorded optimizer step (None: Adam runs eagerly after replay)
    stepped: List[torch.nn.Parameter]  # the parameters it updates (those with a gradient)


class MetaStepGraphs:
    """Captured meta-steps of one learner, keyed by shape (see the module docstring).

    Args:
        learner: a `MetaLearner` (anything with its `train_forward_prop` and buffers).
        warmup_iters: eager passes on a side stream before each capture.
        optimizer_in_graph: record the gradient clamp and the Adam step too (default); False
            leaves them to `learner.meta_update` after each replay.
    """

    def __init__(self, learner: Any, warmup_iters: int = 2, optimizer_in_graph: bool = True) -> None:
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1, got {warmup_iters}")
        self.learner = learner
        self.warmup_iters = int(warmup_iters)
        self.optimizer_in_graph = bool(optimizer_in_graph)
        self._adam: Optional[GraphAdam] = None
        self._graphs: "OrderedDict[Tuple, _CapturedStep]" = OrderedDict()
        self._failed: set = set()
        self._warned: set = set()
        self.captures = 0  # how many graphs were recorded (tests and benchmarks read it)
        self.replays = 0
        self.optimizer_replays = 0  # replays that took the optimizer step too

    def __deepcopy__(self, memo):
        # Recordings point at this learner's storage: a copied learner records its own.
        return MetaStepGraphs(copy.deepcopy(self.learner, memo), self.warmup_iters, self.optimizer_in_graph)

    # ------------------------------------------------------------------ eligibility
    def unsupported_reason(self) -> Optional[str]:
        """Why the learner's meta-step cannot be replayed now, or None when it can."""
        learner = self.learner
        if learner.device.type != "cuda":
            return f"CUDA graphs need a CUDA device; the learner is on {learner.device}"
        if learner.task_chunk_size is not None:
            return "CUDA graphs do not combine with task_chunk_size"
        if learner.distributed is not None:
            return "CUDA graphs do not combine with distributed task sharding"
        if learner.checkpoint_inner_steps:
            return "CUDA graphs do not combine with checkpoint_inner_steps"
        if learner.trace is not None:
            return "CUDA graphs are off while learner.trace records the inner loop"
        return None

    def _uncapturable_reason(self) -> Optional[str]:
        """Why a new recording would be wrong although capture might not fail (checked once per
        capture, not per step: it builds probe tensors)."""
        if self.learner.active_backends.get("lslr_update") == "triton":
            # Its launcher copies a table of data pointers from pageable host memory at every
            # call; a graph cannot record that copy (the CUDA kernel passes the table by value).
            return "CUDA graphs need the CUDA or ATen lslr_update (the Triton launcher copies from the host)"
        return None

    def _warn_once(self, message: str, fallback: str = "running the meta-step eagerly") -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"mamlpp_fast: {message}; {fallback}", stacklevel=4)

    def graph_adam(self) -> Optional[GraphAdam]:
        """The recordable form of the learner's optimizer step, or None (and a warning, once)
        when the step runs eagerly after each replay."""
        if not self.optimizer_in_graph:
            return None
        optimizer = self.learner.optimizer
        reason = GraphAdam.unsupported_reason(optimizer)
        if reason is not None:
            self._warn_once(f"the optimizer step cannot be recorded ({reason})",
                            fallback="it runs eagerly after each replay")
            return None
        if self._adam is None or self._adam.optimizer is not optimizer:
            self._adam = GraphAdam(optimizer)
        return self._adam

    def _key(self, batch: Sequence[torch.Tensor], epoch: int, adam: Optional[GraphAdam]) -> Tuple:
        learner = self.learner
        config = learner.config
        use_msl = bool(config.use_multi_step_loss_optimization and epoch < config.multi_step_loss_num_epochs)
        # Parameter and buffer addresses (a learner moved with .to() / .double() has new storage,
        # and a graph recorded on the old storage must not be replayed) and which of them the
        # recorded backward pass (and Adam step) reaches.
        storage = tuple((t.data_ptr(), t.requires_grad) for t in (*learner.parameters(), *learner.buffers()))
        return (
            tuple((tuple(t.shape), t.dtype) for t in batch),
            bool(config.uses_second_order(epoch)),
            use_msl,
            learner.backend,
            getattr(learner, "conv_strategy", None),
            # Settable after a recording: each changes which kernels the graph holds.
            getattr(learner, "memory_format", None),
            getattr(learner, "autocast_dtype", None),
            storage,
            # The recorded Adam step refers to the optimizer state's storage (replaced by
            # load_state_dict) and to its betas and eps.
            None if adam is None else (id(adam), adam.state_addresses()),
        )

    # ------------------------------------------------------------------ the meta-step
    def run(self, batch: Sequence[torch.Tensor], epoch: int):
        """Replay (capturing first if needed) the forward pass and outer backward of `batch`.

        Returns (losses, target_logits, optimizer_stepped): `losses` and `target_logits` as
        from `train_forward_prop`, with the gradients left in the parameters' `.grad`;
        `optimizer_stepped` is True when the replay also took the optimizer step (else the caller
        takes it). Returns None when the step must run eagerly.
        """
        reason = self.unsupported_reason()
        if reason is not None:
            self._warn_once(reason)
            return None
        adam = self.graph_adam()
        if adam is not None:
            adam.initialise_state()  # before the key, which holds the state's addresses
        # Capture and replay on the learner's device: torch.cuda.graph records the current
        # device's capture stream, which need not be the learner's (cuda:1 without set_device).
        with torch.cuda.device(self.learner.device):
            # If recording the optimizer step fails, a recording without it still removes the
            # launch overhead of the inner loop; Adam then steps after each replay.
            for recorded_adam in ((adam, None) if adam is not None else (None,)):
                key = self._key(batch, epoch, recorded_adam)
                if key in self._failed:
                    continue
                entry = self._graphs.get(key)
                if entry is None:
                    entry = self._try_capture(key, batch, epoch, recorded_adam)
                    if entry is None:
                        continue
                else:
                    self._graphs.move_to_end(key)
                return self._replay(entry, batch)
        return None

    def _try_capture(self, key: Tuple, batch: Sequence[torch.Tensor], epoch: int,
                     adam: Optional[GraphAdam]) -> Optional[_CapturedStep]:
        """Record and keep the meta-step for `key`, or mark the key failed (warning once)."""
        blocker = self._uncapturable_reason()
        if blocker is not None:
            self._failed.add(key)
            self._warn_once(blocker)
            return None
        try:
            entry = self._capture(batch, epoch, adam)
        except Exception as error:  # capture is an optimisation: fall back, say so once
            self._failed.add(key)
            what = f"{type(error).__name__}: {error}"
            if adam is None:
                self._warn_once(f"capturing the meta-step failed ({what})")
            else:
                self._warn_once(f"recording the optimizer step failed ({what})",
                                fallback="recording the meta-step without it; Adam runs after each replay")
            return None
        self._graphs[key] = entry
        while len(self._graphs) > _MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return entry

    def _replay(self, entry: _CapturedStep, batch: Sequence[torch.Tensor]):
        learner = self.learner
        for static, value in zip(entry.inputs, batch):
            static.copy_(value, non_blocking=True)
        importance = learner.get_per_step_loss_importance_vector()
        entry.importance.copy_(importance, non_blocking=True)
        if entry.adam is not None:
            entry.adam.stage(entry.stepped)  # this step's learning rate and bias corrections
        entry.graph.replay()
        if entry.adam is not None:
            entry.adam.commit(entry.stepped)
            self.optimizer_replays += 1
        self.replays += 1
        for param, grad in zip(entry.params, entry.grads):
            param.grad = grad
        # The static outputs are overwritten by the next replay: hand out copies.
        losses: Dict[str, Any] = {"loss": entry.loss.clone(), "accuracy": entry.accuracy.clone()}
        for index, item in enumerate(importance):
            losses[f"loss_importance_vector_{index}"] = item.detach()
        return losses, entry.logits.clone(), entry.adam is not None

    def _warm_up(self, inputs: Sequence[torch.Tensor], epoch: int) -> List[torch.nn.Parameter]:
        """Eager forward + outer backward passes (on a side stream on CUDA) so that lazy
        initialisation happens before recording, then every tensor of the state_dict (the
        per-step running statistics are parameters with requires_grad=False, not buffers, as in
        the official code) and every .grad are put back: warming up changes no learner state.

        Returns the trainable parameters that the backward pass gives a gradient."""
        learner = self.learner
        params = list(learner.trainable_parameters())
        state = learner.state_dict(keep_vars=True)
        saved_state = {name: tensor.detach().clone() for name, tensor in state.items()}
        saved_grads = [param.grad for param in params]
        cuda = learner.device.type == "cuda"
        try:
            side = torch.cuda.Stream(learner.device) if cuda else None
            if cuda:
                side.wait_stream(torch.cuda.current_stream(learner.device))
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for _ in range(self.warmup_iters):
                    for param in params:
                        param.grad = None
                    losses, _ = learner.train_forward_prop(data_batch=inputs, epoch=epoch)
                    losses["loss"].backward()
                with_grads = [param for param in params if param.grad is not None]
            if cuda:
                torch.cuda.current_stream(learner.device).wait_stream(side)
                torch.cuda.synchronize(learner.device)
        finally:
            with torch.no_grad():
                for name, tensor in state.items():
                    tensor.detach().copy_(saved_state[name])
            for param, grad in zip(params, saved_grads):
                param.grad = grad
        return with_grads

    def _capture(self, batch: Sequence[torch.Tensor], epoch: int, adam: Optional[GraphAdam]) -> _CapturedStep:
        learner = self.learner
        params = list(learner.trainable_parameters())
        inputs = tuple(t.clone() for t in batch)
        importance = learner.get_per_step_loss_importance_vector().clone()
        saved_grads = [param.grad for param in params]
        learner._loss_weight_override = importance
        try:
            stepped = self._warm_up(inputs, epoch)
            if adam is not None:
                adam.stage(stepped)  # allocates its device scalars outside the recording
            for param in params:
                param.grad = None  # backward inside the capture allocates them in the graph's pool
            graph = torch.cuda.CUDAGraph()
            # Recording runs no kernels, so neither the running statistics nor the parameters
            # and optimizer state change until the first replay.
            with torch.cuda.graph(graph):
                losses, logits = learner.train_forward_prop(data_batch=inputs, epoch=epoch)
                losses["loss"].backward()
                if adam is not None:
                    recorded = [id(param) for param in params if param.grad is not None]
                    if recorded != [id(param) for param in stepped]:
                        raise RuntimeError("the recorded backward pass reached other parameters than the eager one")
                    learner.clamp_meta_gradients()
                    adam.update(stepped, [param.grad for param in stepped])
            grads = [param.grad for param in params]
        except BaseException:
            for param, grad in zip(params, saved_grads):
                param.grad = grad
            raise
        finally:
            learner._loss_weight_override = None
        self.captures += 1
        return _CapturedStep(graph, inputs, importance, params, grads,
                             losses["loss"].detach(), losses["accuracy"], logits, adam, stepped)
