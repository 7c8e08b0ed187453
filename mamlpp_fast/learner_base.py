"""The outer loop of MAML++, shared by the per-task reference and the task-batched MetaLearner.

`FewShotLearnerBase` has the official `MAMLFewShotClassifier` surface: construction from a
config, `run_train_iter`, `run_validation_iter`, `meta_update`, `save_model`, `load_model`,
`get_per_step_loss_importance_vector`, and the `classifier`, `inner_loop_optimizer`,
`optimizer` and `scheduler` attributes. Subclasses implement `forward`, the inner loop.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .config import IGNORED_KEYS, MAMLConfig
from .parameters import (
    build_classifier,
    adapts_in_inner_loop,
    build_inner_loop_optimizer,
    inner_loop_parameter_names,
    learning_rate_key,
    seed_like_official,
)
from .schedules import EpochCosineSchedule, per_step_loss_weights

__all__ = ["FewShotLearnerBase", "TaskBatch", "resolve_config", "atomic_torch_save"]

ArrayLike = Union[np.ndarray, torch.Tensor]
TaskBatch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_BATCH_NAMES = ("x_support_set", "x_target_set", "y_support_set", "y_target_set")


def _is_image_shape(value: Any) -> bool:
    """An official im_shape: (batch, C, H, W) as a tuple/list/torch.Size of 4 ints."""
    return (isinstance(value, (tuple, list, torch.Size)) and len(value) == 4
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value))


# Marks checkpoints whose Adam state orders the LSLR rates as the network orders its tensors.
LSLR_ORDER_KEY = "mamlpp_fast_lslr_order"
_RATES_PREFIX = "inner_loop_optimizer.names_learning_rates_dict."


def _keep_step_counters_on_host(optimizer: torch.optim.Optimizer) -> None:
    """Put Adam's step counters back on the CPU after a load with map_location=<GPU>.

    A non-capturable, non-fused Adam keeps them on the host and reads them there every step;
    `load_state_dict` leaves them on whatever device `torch.load` mapped them to, and on a GPU
    each read would then wait for the device (one synchronisation per parameter per step)."""
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                optimizer.state[param]["step"] = step.cpu()


def resolve_config(config: Any) -> MAMLConfig:
    """Accept a MAMLConfig, a dict of official keys, a JSON path, or an official args object."""
    if isinstance(config, MAMLConfig):
        return config
    if config is None:
        return MAMLConfig()
    if isinstance(config, (str, os.PathLike)):
        return MAMLConfig.from_json(config)
    if isinstance(config, dict):
        # Keys the official code ignores are accepted (recorded in ignored_keys), as from an
        # official JSON file; keys left out take this package's defaults (the released MAML++
        # Omniglot 5w1s config), not the official argparse defaults a JSON *file* gets.
        return MAMLConfig.from_dict(config, ignored="accept")
    if hasattr(config, "__dict__"):
        # An official argparse namespace or Bunch: its config keys are read like an official
        # file's (keys the official code ignores are recorded; samples_per_iter and num_of_gpus
        # must be 1). use_cuda, which the official get_args() always adds, is dropped silently
        # (the device argument decides); anything else unknown is dropped with a warning.
        values = {k: v for k, v in vars(config).items() if not k.startswith("_") and k != "use_cuda"}
        readable = (set(MAMLConfig.__dataclass_fields__) - {"ignored_keys"}) | set(IGNORED_KEYS)
        dropped = sorted(k for k in values if k not in readable)
        if dropped:
            warnings.warn(f"args: ignoring keys mamlpp_fast does not use: {dropped}", stacklevel=3)
        return MAMLConfig.from_dict({k: v for k, v in values.items() if k in readable}, ignored="accept")
    raise ValueError(
        f"config must be a MAMLConfig, a dict, a JSON path or an args object, got {type(config)}"
    )


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash never leaves a truncated checkpoint."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


class FewShotLearnerBase(nn.Module):
    """Meta-parameters, outer optimiser and official API of a MAML++ learner.

    Args:
        config: a `MAMLConfig`, a dict of official keys, a path to an official JSON config, or
            an official args object. Defaults to `MAMLConfig()`.
        device: where the learner computes. Defaults to the CPU.
        dtype: floating dtype of the meta-parameters (float32 by default; `learner.double()`
            works too).
        im_shape: accepted for drop-in compatibility with the official constructor, which takes
            `(batch, C, H, W)`; it must agree with the config.
        args: alias of `config`, as in the official constructor.
        validate_inputs: check each batch for shape, label range and finiteness before touching
            any state. On a GPU this costs one host-device synchronisation per call.
        official_outputs: return what the official `run_train_iter` / `run_validation_iter`
            return, for the official ExperimentBuilder: "accuracy" a Python float, the MSL
            weights numpy scalars, the target logits a list of per-task numpy arrays [N*T, N].
            Off by default: then metrics stay 0-dim tensors and the logits one tensor
            [B, N*T, N], with no host synchronisation.

    The official positional form `cls(im_shape, device, args)` works too: a first argument that
    is a 4-entry shape is read as im_shape, followed by device and args.
    """

    # Scale-out hooks (issue "scale"): None keeps the plain single-process meta-step.
    # task_chunk_size: run the meta-batch k tasks at a time, accumulating meta-gradients.
    # distributed: a `mamlpp_fast.distributed.DistributedContext` sharding tasks over ranks.
    task_chunk_size: Optional[int] = None
    distributed: Any = None
    # Set while a CUDA graph is captured: the static buffer the MSL weights are read from.
    _loss_weight_override: Optional[torch.Tensor] = None

    def __init__(
        self,
        config: Any = None,
        *official_positional: Any,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        im_shape: Optional[Sequence[int]] = None,
        args: Any = None,
        validate_inputs: bool = True,
        official_outputs: bool = False,
    ) -> None:
        super().__init__()
        if official_positional or _is_image_shape(config):
            # The official constructor's order: (im_shape, device, args).
            if not _is_image_shape(config) or len(official_positional) > 2:
                raise TypeError(
                    "positional arguments must be (config) or the official (im_shape, device, args), "
                    f"got {1 + len(official_positional)} starting with {config!r}"
                )
            for name, given in (("im_shape", im_shape), ("device", device), ("args", args)):
                if given is not None:
                    raise TypeError(f"{name} given both positionally and by keyword")
            im_shape, config = config, None
            device = official_positional[0] if len(official_positional) > 0 else None
            args = official_positional[1] if len(official_positional) > 1 else None
        if config is not None and args is not None:
            raise ValueError("pass either config or args, not both")
        self.config = resolve_config(config if config is not None else args)
        if im_shape is not None and tuple(im_shape[1:]) != self.config.image_shape:
            raise ValueError(
                f"im_shape {tuple(im_shape)} disagrees with the config image shape "
                f"(C, H, W) = {self.config.image_shape}"
            )
        self.validate_inputs = validate_inputs
        self.official_outputs = bool(official_outputs)
        self.current_epoch = 0
        self.batch_size = self.config.batch_size
        self.task_learning_rate = self.config.task_learning_rate
        self.im_shape = (2, *self.config.image_shape)

        # Parameter creation consumes the torch RNG exactly as the official constructor does.
        self.rng = seed_like_official(self.config.seed)
        self.classifier = build_classifier(self.config)
        self.inner_loop_parameter_names: List[str] = inner_loop_parameter_names(self.classifier, self.config)
        self.inner_loop_optimizer = build_inner_loop_optimizer(self.config, self.inner_loop_parameter_names)
        self.to(device=torch.device(device) if device is not None else torch.device("cpu"))
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
            self.to(dtype=dtype)

        self.optimizer = torch.optim.Adam(
            self.trainable_parameters(), lr=self.config.meta_learning_rate, amsgrad=False
        )
        self.scheduler = EpochCosineSchedule(
            self.optimizer, total_epochs=self.config.total_epochs, min_lr=self.config.min_learning_rate
        )
        self._loss_weight_cache: Dict[Any, torch.Tensor] = {}
        # When a list, the inner loop appends one record per step (tests and debugging).
        self.trace: Optional[List[Dict[str, Any]]] = None

    # ------------------------------------------------------------------ official helpers
    @property
    def args(self) -> MAMLConfig:
        """The config, under the name the official class uses."""
        return self.config

    @property
    def use_cuda(self) -> bool:
        """Whether the learner computes on a GPU (an official attribute)."""
        return self.device.type == "cuda"

    @property
    def device(self) -> torch.device:
        return self.classifier.layer_dict["conv0"].conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.layer_dict["conv0"].conv.weight.dtype

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """All parameters the outer loop trains (official order: classifier, then LSLR)."""
        for param in self.parameters():
            if param.requires_grad:
                yield param

    def get_inner_loop_parameter_dict(self, params) -> Dict[str, torch.Tensor]:
        """Official semantics: the trainable parameters, without the norm layers' unless
        `enable_inner_loop_optimizable_bn_params`."""
        return {name: param for name, param in params if adapts_in_inner_loop(name, param, self.config)}

    def get_per_step_loss_importance_vector(self) -> torch.Tensor:
        """MSL weights at `current_epoch`, shape (number_of_training_steps_per_iter,).

        Like the official code, the vector is built in numpy and stored in torch's default
        dtype; it is cached per epoch so a meta-step makes no host-to-device copy.
        """
        if self._loss_weight_override is not None:
            return self._loss_weight_override
        key = (self.current_epoch, self.device, torch.get_default_dtype())
        cached = self._loss_weight_cache.get(key)
        if cached is None:
            weights = per_step_loss_weights(
                self.config.number_of_training_steps_per_iter,
                self.config.multi_step_loss_num_epochs,
                self.current_epoch,
            )
            cached = torch.tensor(weights, dtype=torch.get_default_dtype()).to(self.device)
            self._loss_weight_cache = {key: cached}
        # A copy (a device op, no host-to-device transfer), as the official code builds a new
        # tensor per call: a caller editing it in place must not change later MSL weights.
        return cached.clone()

    def net_forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: Dict[str, torch.Tensor],
        backup_running_statistics: bool = False,
        training: bool = True,
        num_step: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The official per-task forward pass: x [n, C, H, W], y [n], weights {name: tensor} (one
        task's, as `get_inner_loop_parameter_dict` gives) -> (mean cross-entropy, logits [n, N]).

        `backup_running_statistics` is accepted and ignored: the official backup aliases the live
        statistics, so its restore does nothing (issue #42; `bn_restore_stats_after_evaluation`
        is the working fix). BN normalises with the batch's statistics, as in the official code,
        whatever `training` says; `training=False` (evaluation; the official code always passes
        True) matters only with the fixes `bn_use_running_stats_in_evaluation` (normalise with
        the running statistics) and `bn_restore_stats_after_evaluation` (leave them untouched).
        """
        return self._task_forward(x, y, weights, training, num_step)

    def _task_forward(
        self, x: torch.Tensor, y: torch.Tensor, weights: Dict[str, torch.Tensor], training: bool, num_step: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply_inner_loop_update(
        self,
        loss: torch.Tensor,
        names_weights_copy: Dict[str, torch.Tensor],
        use_second_order: bool,
        current_step_idx: int,
    ) -> Dict[str, torch.Tensor]:
        """The official LSLR step of one task: theta - alpha[param][step] * d loss / d theta for
        every tensor of `names_weights_copy` ({name: tensor}); second order keeps the graph."""
        grads = torch.autograd.grad(loss, list(names_weights_copy.values()), create_graph=use_second_order)
        rates = self.learning_rates_for(list(names_weights_copy))
        return {
            name: weight - rate[current_step_idx] * grad
            for (name, weight), rate, grad in zip(names_weights_copy.items(), rates, grads)
        }

    def learning_rates_for(self, names: Sequence[str]) -> List[nn.Parameter]:
        """The LSLR vector (length S+1) of each named inner-loop parameter."""
        rates = self.inner_loop_optimizer.names_learning_rates_dict
        return [rates[learning_rate_key(name)] for name in names]

    def running_statistics(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(running_mean, running_var) of each stage; rows are steps when per-step BN is on.
        Empty with layer norm, which keeps none."""
        if self.config.norm_layer != "batch_norm":
            return []
        return [
            (self.classifier.layer_dict[f"conv{i}"].norm_layer.running_mean,
             self.classifier.layer_dict[f"conv{i}"].norm_layer.running_var)
            for i in range(self.config.num_stages)
        ]

    def bn_row(self, tensor: torch.Tensor, step: int) -> torch.Tensor:
        """The step's row of a per-step BN running statistic, or the tensor itself without
        per-step BN statistics."""
        return tensor[step] if self.config.per_step_batch_norm else tensor

    def norm_affine(self, weights: Dict[str, torch.Tensor], stage: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) of a stage's norm layer at an inner step: the adapted ones of `weights`
        where the inner loop adapts them (`enable_inner_loop_optimizable_bn_params`), else the
        step's row of per-step BN parameters, else the shared tensors (layer norm: [C, H, W])."""
        norm = self.classifier.layer_dict[f"conv{stage}"].norm_layer
        prefix = f"layer_dict.conv{stage}.norm_layer."
        affine = []
        for name, tensor in (("weight", norm.weight), ("bias", norm.bias)):
            if prefix + name in weights:
                affine.append(weights[prefix + name])
            else:
                affine.append(tensor[step] if self.config.per_step_bn_affine else tensor)
        return affine[0], affine[1]

    # ------------------------------------------------------------------ inputs
    def prepare_batch(self, data_batch: Sequence[ArrayLike]) -> TaskBatch:
        """Validate a (x_support, x_target, y_support, y_target[, seed]) batch and convert it to
        the learner's device and dtype. Raises ValueError naming the bad argument."""
        if not isinstance(data_batch, (tuple, list)) or len(data_batch) not in (4, 5):
            raise ValueError(
                "data_batch must be a tuple (x_support_set, x_target_set, y_support_set, "
                f"y_target_set) (a fifth seed item is ignored), got {type(data_batch).__name__}"
                + (f" of length {len(data_batch)}" if isinstance(data_batch, (tuple, list)) else "")
            )
        images = [self._as_tensor(data_batch[i], _BATCH_NAMES[i], images=True) for i in (0, 1)]
        labels = [self._as_tensor(data_batch[i], _BATCH_NAMES[i], images=False) for i in (2, 3)]
        x_support, x_target = images
        y_support, y_target = labels
        for name, x in zip(_BATCH_NAMES[:2], images):
            if x.dim() != 6:
                raise ValueError(f"{name} must have shape [B, N, K, C, H, W], got {list(x.shape)}")
            if tuple(x.shape[3:]) != self.config.image_shape:
                raise ValueError(
                    f"{name} images must be (C, H, W) = {self.config.image_shape} as configured, "
                    f"got {tuple(x.shape[3:])}"
                )
        for name, y, x in zip(_BATCH_NAMES[2:], labels, images):
            if tuple(y.shape) != tuple(x.shape[:3]):
                raise ValueError(
                    f"{name} must have shape [B, N, K] = {list(x.shape[:3])} to match its images, "
                    f"got {list(y.shape)}"
                )
        if x_support.shape[0] != x_target.shape[0]:
            raise ValueError(
                f"x_target_set has {x_target.shape[0]} tasks but x_support_set has {x_support.shape[0]}"
            )
        if x_support.shape[1] != x_target.shape[1]:
            raise ValueError(
                f"x_target_set has {x_target.shape[1]} classes per task but x_support_set has "
                f"{x_support.shape[1]}"
            )
        n_way = x_support.shape[1]
        if n_way != self.config.num_classes_per_set:
            raise ValueError(
                f"x_support_set has {n_way} classes per task but the network was built for "
                f"num_classes_per_set={self.config.num_classes_per_set}"
            )
        if self.validate_inputs:
            self._check_values(images, labels, n_way)
        device, dtype = self.device, self.dtype
        images = [x.to(device=device, dtype=dtype) for x in images]
        labels = [y.to(device=device, dtype=torch.long) for y in labels]
        return images[0], images[1], labels[0], labels[1]

    def _as_tensor(self, value: ArrayLike, name: str, *, images: bool) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise ValueError(f"{name} must be a numeric array, got dtype object")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")
        if value.device.type != "cpu" and value.device != self.device:
            raise ValueError(
                f"{name} is on {value.device} but the learner is on {self.device}; move it there "
                f"(CPU tensors and numpy arrays are moved automatically)"
            )
        if images and not value.is_floating_point():
            raise ValueError(f"{name} must hold floating point images, got dtype {value.dtype}")
        if not images and (value.is_complex() or value.dtype == torch.bool):
            raise ValueError(f"{name} must hold integer class labels, got dtype {value.dtype}")
        return value

    def _check_values(self, images: List[torch.Tensor], labels: List[torch.Tensor], n_way: int) -> None:
        # One stacked reduction per batch, so a GPU batch costs a single synchronisation.
        flags = []
        for x in images:
            flags.append(torch.isfinite(x).all())
        for y in labels:
            if y.is_floating_point():
                flags.append((torch.isfinite(y) & (y == y.round())).all())
            else:
                flags.append(torch.ones((), dtype=torch.bool, device=y.device))
            flags.append(((y >= 0) & (y < n_way)).all())
        ok = torch.stack(flags).tolist()
        for name, good in zip(_BATCH_NAMES[:2], ok[:2]):
            if not good:
                raise ValueError(f"{name} contains NaN or infinite values")
        for index, name in enumerate(_BATCH_NAMES[2:]):
            if not ok[2 + 2 * index]:
                raise ValueError(f"{name} must hold whole-number class labels")
            if not ok[3 + 2 * index]:
                raise ValueError(f"{name} labels must be in [0, {n_way}) for {n_way}-way tasks")

    @staticmethod
    def _check_epoch(epoch: Any) -> int:
        try:
            value = int(epoch)
        except (TypeError, ValueError):
            raise ValueError(f"epoch must be a number, got {epoch!r}") from None
        if value < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        return value

    def _record(self, step: int, support_loss, fast_weights, target_loss) -> None:
        """Append one inner step to `self.trace` (when tracing): detached support loss, fast
        weights after the update, and target loss (None when the target was not evaluated)."""
        if self.trace is None:
            return
        self.trace.append({
            "step": step,
            "support_loss": support_loss.detach().clone(),
            "fast_weights": {name: value.detach().clone() for name, value in fast_weights.items()},
            "target_loss": None if target_loss is None else target_loss.detach().clone(),
        })

    # ------------------------------------------------------------------ the inner loop
    def forward(
        self,
        data_batch: TaskBatch,
        epoch: int,
        use_second_order: bool,
        use_multi_step_loss_optimization: bool,
        num_steps: int,
        training_phase: bool,
    ) -> Tuple[Dict[str, Any], Any]:
        raise NotImplementedError

    def train_forward_prop(self, data_batch: TaskBatch, epoch: int):
        return self.forward(
            data_batch=data_batch,
            epoch=epoch,
            use_second_order=self.config.uses_second_order(epoch),
            use_multi_step_loss_optimization=self.config.use_multi_step_loss_optimization,
            num_steps=self.config.number_of_training_steps_per_iter,
            training_phase=True,
        )

    def evaluation_forward_prop(self, data_batch: TaskBatch, epoch: int):
        return self.forward(
            data_batch=data_batch,
            epoch=epoch,
            use_second_order=False,
            use_multi_step_loss_optimization=True,
            num_steps=self.config.number_of_evaluation_steps_per_iter,
            training_phase=False,
        )

    # ------------------------------------------------------------------ the outer loop
    def meta_update(self, loss: Optional[torch.Tensor], distributed: Any = None) -> None:
        """Adam step on the meta-loss; imagenet datasets clamp classifier gradients to ±10.

        loss=None steps on the gradients already accumulated in .grad (chunked meta-batch).
        With `distributed` (a DistributedContext) the gradients are averaged over ranks first.
        """
        if loss is not None:
            self.optimizer.zero_grad()
            loss.backward()
        if distributed is not None:
            distributed.all_reduce_gradients(self.trainable_parameters())
        self.clamp_meta_gradients()
        self.optimizer.step()

    def clamp_meta_gradients(self) -> None:
        """Clamp the classifier's meta-gradients to ±10 in place on imagenet datasets, as the
        official `meta_update` does (a no-op elsewhere)."""
        if self.config.clamps_meta_gradients:
            for param in self.classifier.parameters():
                if param.requires_grad and param.grad is not None:
                    param.grad.data.clamp_(-10, 10)

    def run_train_iter(self, data_batch: Sequence[ArrayLike], epoch: Any):
        """One meta-iteration: inner loops on all tasks, then one outer Adam step.

        Args:
            data_batch: (x_support [B, N, K, C, H, W], x_target [B, N, T, C, H, W],
                y_support [B, N, K], y_target [B, N, T]) as numpy arrays or tensors.
            epoch: current epoch (the official trainer passes current_iter / 500; it is cast to
                int).

        Returns:
            (losses, target_logits): `losses` maps "loss", "accuracy" and
            "loss_importance_vector_{i}" to 0-dim tensors (no host synchronisation; call
            float() when needed) and "learning_rate" to a float; `target_logits` is a detached
            tensor [B, N*T, N] of the final step's target logits.
        """
        epoch = self._check_epoch(epoch)
        batch = self.prepare_batch(data_batch)
        self.scheduler.step(epoch)
        if self.current_epoch != epoch:
            self.current_epoch = epoch
        if not self.training:
            self.train()
        graphed = self._graphed_train_pass(batch, epoch)
        if graphed is not None:
            losses, preds, optimizer_stepped = graphed  # gradients already in .grad
            if not optimizer_stepped:
                self.meta_update(loss=None)
        elif self.task_chunk_size is None and self.distributed is None:
            losses, preds = self.train_forward_prop(data_batch=batch, epoch=epoch)
            self.meta_update(loss=losses["loss"])
            losses["loss"] = losses["loss"].detach()
        else:
            losses, preds = self._scaled_out_train_pass(batch, epoch)
        losses["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad()
        return self._outputs(losses, preds)

    def _graphed_train_pass(self, batch: TaskBatch, epoch: int):
        """Forward pass and outer backward (and, if recorded, the optimizer step) replayed from a
        CUDA graph, leaving the gradients in .grad and returning (losses, logits,
        optimizer_stepped); None runs the meta-step eagerly (the default)."""
        return None

    def _scaled_out_train_pass(self, batch: TaskBatch, epoch: int):
        """Meta-step with task chunking and/or task sharding over ranks (see `task_chunk_size`,
        `distributed`): this rank's tasks k at a time, each chunk's loss scaled by its share of
        the tasks so the accumulated gradient is the mean over the meta-batch, then one step.
        Running statistics are folded once at the end, in global task order."""
        distributed = self.distributed
        if distributed is not None:
            batch = distributed.shard_batch(batch)
        num_tasks = int(batch[0].shape[0])
        chunk = num_tasks if self.task_chunk_size is None else min(int(self.task_chunk_size), num_tasks)
        self.optimizer.zero_grad()
        self._begin_deferred_statistics()
        try:
            total: Dict[str, Any] = {}
            logits = []
            for start in range(0, num_tasks, chunk):
                part = tuple(t[start:start + chunk] for t in batch)
                share = part[0].shape[0] / num_tasks
                out, preds = self.train_forward_prop(data_batch=part, epoch=epoch)
                (out["loss"] * share if share != 1.0 else out["loss"]).backward()
                for key in ("loss", "accuracy"):
                    value = out[key].detach() * share if share != 1.0 else out[key].detach()
                    total[key] = value if key not in total else total[key] + value
                for key, value in out.items():
                    if key not in ("loss", "accuracy"):
                        total[key] = value
                logits.append(preds)
        finally:
            self._end_deferred_statistics(None if distributed is None else distributed.gather_tasks)
        self.meta_update(loss=None, distributed=distributed)
        preds = logits[0] if len(logits) == 1 else torch.cat(logits, dim=0)
        if distributed is not None:
            total = distributed.average_metrics(total)
            preds = distributed.gather_tasks(preds.detach())  # all B tasks, as one process returns
        return total, preds

    def _begin_deferred_statistics(self) -> None:
        """Start buffering the running-statistics updates of the training passes."""
        raise NotImplementedError(f"{type(self).__name__} does not support task chunking or sharding")

    def _end_deferred_statistics(self, gather=None) -> None:
        """Fold the buffered updates (after `gather` of each per-task tensor across ranks)."""
        raise NotImplementedError

    def run_validation_iter(self, data_batch: Sequence[ArrayLike]):
        """Evaluate a batch of tasks (first order, 5 steps, final-step target only).

        Same inputs and outputs as `run_train_iter`; no meta-parameter changes (the per-step
        BN running statistics are updated, as in the official code, unless
        `bn_restore_stats_after_evaluation` is set).
        """
        batch = self.prepare_batch(data_batch)
        if self.training:
            self.eval()
        losses, preds = self.evaluation_forward_prop(data_batch=batch, epoch=self.current_epoch)
        losses["loss"] = losses["loss"].detach()
        return self._outputs(losses, preds)

    def _outputs(self, losses: Dict[str, Any], preds: torch.Tensor):
        """(losses, preds) as this learner returns them (see `official_outputs`)."""
        if not self.official_outputs:
            return losses, preds
        official: Dict[str, Any] = dict(losses)
        official["accuracy"] = float(losses["accuracy"])
        for key, value in losses.items():
            if key.startswith("loss_importance_vector_"):
                official[key] = value.detach().cpu().numpy()
        return official, list(preds.detach().cpu().numpy())

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, model_save_dir: Union[str, os.PathLike], state: Dict[str, Any]) -> None:
        """Write `state` plus the network, optimizer and scheduler to the file `model_save_dir`,
        atomically (the official argument name is kept although it is a file path)."""
        state["network"] = self.state_dict()
        state["optimizer"] = self.optimizer.state_dict()
        state["scheduler"] = self.scheduler.state_dict()
        state["current_epoch"] = self.current_epoch
        state[LSLR_ORDER_KEY] = "network"  # see _optimizer_state_in_official_order
        atomic_torch_save(state, model_save_dir)

    def load_model(self, model_save_dir: Union[str, os.PathLike], model_name: str, model_idx: Any) -> Dict[str, Any]:
        """Load `{model_save_dir}/{model_name}_{model_idx}`; official checkpoints load too."""
        filepath = os.path.join(os.fspath(model_save_dir), f"{model_name}_{model_idx}")
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"no checkpoint at {filepath!r}")
        state = torch.load(filepath, map_location=self.device, weights_only=False)
        if "network" not in state:
            raise ValueError(f"{filepath!r} has no 'network' entry; not a MAML++ checkpoint")
        self.load_state_dict(state["network"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(self._optimizer_state_in_official_order(state))
            _keep_step_counters_on_host(self.optimizer)
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if "current_epoch" in state:
            self.current_epoch = int(state["current_epoch"])
        return state

    def _optimizer_state_in_official_order(self, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        """The checkpoint's Adam state, indexed as this optimizer's parameters are.

        Adam's state is indexed by position: the classifier's parameters, then the LSLR rates.
        The official code (and mamlpp_fast since the checkpoints carry `LSLR_ORDER_KEY`) orders
        the rates as the network orders its tensors; mamlpp_fast's checkpoints from before had
        them sorted by name. Those are recognised by what only mamlpp_fast writes (a scheduler
        entry, or the trainer's version key; the official save_model writes the network and
        the optimizer only) and re-indexed, so that each rate keeps its own moments.
        """
        optimizer_state = checkpoint["optimizer"]
        written_by_mamlpp_fast = "scheduler" in checkpoint or "mamlpp_fast_checkpoint_version" in checkpoint
        if LSLR_ORDER_KEY in checkpoint or not written_by_mamlpp_fast:
            return optimizer_state
        names = [name for name, param in self.named_parameters() if param.requires_grad]
        rate_names = [name for name in names if name.startswith(_RATES_PREFIX)]
        groups = optimizer_state.get("param_groups", [])
        if not rate_names or len(groups) != 1 or list(groups[0]["params"]) != list(range(len(names))):
            return optimizer_state  # not the one-group layout this learner writes
        first_rate = names.index(rate_names[0])
        position = {name: index for index, name in enumerate(names)}
        old_to_new = {first_rate + k: position[name] for k, name in enumerate(sorted(rate_names))}
        remapped = dict(optimizer_state)
        remapped["state"] = {old_to_new.get(int(index), int(index)): value
                             for index, value in optimizer_state["state"].items()}
        return remapped

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load meta-parameters; values are copied into the existing tensors so the optimizer
        keeps referring to them. Shapes must match the config."""
        own = self.state_dict()
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise ValueError(
                    f"state_dict does not match this config: missing {missing}, unexpected {unexpected}"
                )
        for key, value in state_dict.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
