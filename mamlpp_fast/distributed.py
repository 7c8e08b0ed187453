"""Data-parallel MAML++ over tasks: `torchrun --nproc_per_node N mamlpp-train ...`.

Every rank holds the same meta-parameters and reads the same meta-batch [B, ...]; rank r keeps
the contiguous slice of tasks [r*B/N, (r+1)*B/N). After the local backward the meta-gradients
are all-reduced (one explicit flattened all-reduce, summed then divided by N), so every rank
steps Adam with the mean over all B tasks, exactly what one process would compute (up to
rounding). The per-step BN running statistics, which the official code folds sequentially
over the tasks, are all-gathered in task order and folded identically on every rank.

Backends: gloo on CPU, NCCL on CUDA (one GPU per rank, ``cuda:{LOCAL_RANK}``).

Failure handling: the process group is created with a timeout (``MAMLPP_DIST_TIMEOUT`` seconds,
default 600). When a rank dies, the others fail in their next collective (gloo: at once when
the peer's socket closes, else after the timeout) and `mamlpp-train` exits with a message
naming the rank. Only rank 0 writes checkpoints, always atomically, so ``train_model_latest``
is the last saved state (an epoch end, or a mid-epoch save every ``--checkpoint-minutes``);
rerunning the same torchrun command resumes from it. SIGTERM (torchrun forwards it to every
worker) stops all ranks after the same meta-iteration: each iteration ends with one small
collective that tells every rank whether any rank was asked to stop.
"""

from __future__ import annotations

import datetime
import importlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "torchrun_world_size",
    "init_from_env",
    "shard_batch",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 600.0


def torchrun_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def shard_batch(batch: Sequence[torch.Tensor], rank: int, world_size: int) -> tuple:
    """This rank's contiguous slice of the tasks of every tensor of a batch [B, ...].

    Raises ValueError when world_size does not divide B (unequal shards would weight tasks
    unequally in the averaged meta-gradient).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    num_tasks = int(batch[0].shape[0])
    for tensor in batch:
        if int(tensor.shape[0]) != num_tasks:
            raise ValueError(f"every batch item must have {num_tasks} tasks, got {int(tensor.shape[0])}")
    if num_tasks % world_size != 0:
        raise ValueError(
            f"the meta-batch has {num_tasks} tasks, which {world_size} ranks cannot share equally; "
            f"use a batch_size divisible by the number of processes (--nproc_per_node)"
        )
    size = num_tasks // world_size
    return tuple(tensor[rank * size:(rank + 1) * size] for tensor in batch)


@dataclass
class DistributedContext:
    """This process's place in the group and the collectives MAML++ needs."""

    rank: int
    world_size: int
    local_rank: int = 0
    device: Optional[torch.device] = None
    group: Any = None
    # Small host-side agreements (stop? out of time? same checkpoint?) go over gloo even when
    # the tensors go over NCCL: an NCCL flag would make the host wait for the GPU each time.
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def shard_batch(self, batch: Sequence[torch.Tensor]) -> tuple:
        return shard_batch(batch, self.rank, self.world_size)

    # ------------------------------------------------------------------ collectives
    def all_reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each .grad by its mean over ranks (one flattened all-reduce).

        Every rank runs the same graph, so the set of parameters with a gradient is the same
        everywhere; a parameter without one on this rank is treated as zero and left None.
        """
        params = list(parameters)
        if not params:
            return
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
        ])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.world_size)
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is not None:
                p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def gather_tasks(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-gather a per-task tensor [b, ...] into [world_size * b, ...] in rank (= task) order."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=0)

    def average_metrics(self, losses: Dict[str, Any]) -> Dict[str, Any]:
        """Mean over ranks of the tensor metrics "loss" and "accuracy" (each rank's value is a
        mean over an equal number of tasks, so this is the mean over all tasks)."""
        keys = [k for k in ("loss", "accuracy") if isinstance(losses.get(k), torch.Tensor)]
        if not keys:
            return losses
        stacked = torch.stack([losses[k].detach().reshape(()) for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
        stacked.div_(self.world_size)
        out = dict(losses)
        for index, key in enumerate(keys):
            out[key] = stacked[index]
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0, group=self.group)

    def same_on_all_ranks(self, value: int) -> bool:
        """Whether every rank passes the same integer as rank 0 (a collective: call on all ranks)."""
        group, device = self._control()
        mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
        main = mine.clone()
        dist.broadcast(main, src=0, group=group)
        return self.all_ok(bool(torch.equal(main, mine)))

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def all_ok(self, ok: bool) -> bool:
        """True when every rank passes ok=True (a collective: call on all ranks)."""
        group, device = self._control()
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
        return int(flag.item()) == 0

    def _control(self) -> Tuple[Any, torch.device]:
        """The group and device of the host-side agreements."""
        if self.control_group is not None:
            return self.control_group, torch.device("cpu")
        return self.group, self._collective_device()

    def _collective_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return self.device if self.device is not None else torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_from_env(
    backend: Optional[str] = None,
    device: Optional[torch.device] = None,
    timeout_s: Optional[float] = None,
) -> Optional[DistributedContext]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Returns None when WORLD_SIZE is 1 or unset.

    Args:
        backend: "gloo" or "nccl"; default NCCL when `device` is CUDA, else gloo.
        device: this rank's device; on CUDA it defaults to cuda:LOCAL_RANK.
        timeout_s: collective timeout (default ``$MAMLPP_DIST_TIMEOUT`` or 600 s).
    """
    world_size = torchrun_world_size()
    if world_size <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {missing} are not set; launch with torchrun")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device("cuda", local_rank) if torch.device(device).index is None else torch.device(device)
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("MAMLPP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        _import_modules_that_keep_the_default_group()
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    control_group = None
    if dist.get_backend() != "gloo":  # every rank takes this branch: new_group is a collective
        control_group = dist.new_group(backend="gloo", timeout=timeout)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank,
                              device=None if device is None else torch.device(device),
                              control_group=control_group)


# Modules whose function defaults are `group.WORLD`, bound when the module is first imported: an
# import after init_process_group keeps the default group alive for good (torch.distributed.nn
# alone holds ten references), so destroy_process_group() cannot free it and gloo's worker
# threads outlive the interpreter. A worker that then drops the last reference to a collective's
# tensor needs the GIL of a finalizing interpreter and the process dies with "terminate called
# without an active exception" (SIGABRT) after its work is done. torch.optim.Adam imports
# torch._dynamo, which imports all of these, so every MetaLearner built after the group would.
_MODULES_BINDING_THE_WORLD_GROUP = (
    "torch.distributed.nn.functional",
    "torch.distributed.fsdp.sharded_grad_scaler",
    "torch.distributed.optim.zero_redundancy_optimizer",
)


def _import_modules_that_keep_the_default_group() -> None:
    """Import them while there is no group yet, so that their defaults bind None."""
    for name in _MODULES_BINDING_THE_WORLD_GROUP:
        try:
            importlib.import_module(name)
        except ImportError:  # other torch versions: nothing to pin
            pass


def gloo_threads() -> List[str]:
    """Names of this process's gloo threads (Linux; empty elsewhere). After `destroy` there are
    none, unless something still holds a process group."""
    tasks = f"/proc/{os.getpid()}/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as handle:
                name = handle.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names


def destroy(context: Optional[DistributedContext] = None) -> None:
    """Destroy every process group, and with them gloo's threads, while the interpreter is alive.

    A group is freed (its threads joined) when the last reference goes: pass the context that
    holds the groups, so that its references go too (under NCCL it holds the gloo control group).
    A default group created before `init_from_env` (by your own ``init_process_group``) may be
    held for good by torch modules imported after it; import torch._dynamo first in that case.
    """
    if context is not None:
        context.group = None
        context.control_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
