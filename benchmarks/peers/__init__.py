"""Peer MAML++ implementations for the benchmarks (torch.func, learn2learn, higher).

`make_peer(name, config, dtype, device)` builds one; `available_peers()` lists those whose
library imports here. Each has `run_train_iter(batch, epoch)`, `meta_loss(tasks, epoch)` and
`meta_parameters()` (official names). See `common.py` for the shared semantics.
"""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

PEERS: Dict[str, Tuple[str, str]] = {
    "torchfunc": ("torchfunc_maml", "TorchFuncMAML"),
    "learn2learn": ("l2l_maml", "L2LMAML"),
    "higher": ("higher_maml", "HigherMAML"),
}


def peer_class(name: str):
    """The peer's class; raises ImportError when its library is missing."""
    module, cls = PEERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_peer(name: str, config, dtype, device, autocast_dtype=None):
    """Peer `name`; with autocast_dtype (torch.bfloat16), each network pass under autocast."""
    return peer_class(name)(config, dtype=dtype, device=device, autocast_dtype=autocast_dtype)


def available_peers():
    out = []
    for name in PEERS:
        try:
            peer_class(name)
        except ImportError:
            continue
        out.append(name)
    return out
