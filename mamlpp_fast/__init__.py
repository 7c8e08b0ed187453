"""mamlpp_fast: a fast and faithful MAML++ (Antoniou, Edwards & Storkey, ICLR 2019).

Main entry points:

- `MetaLearner`: task-batched MAML++, a drop-in for the official `MAMLFewShotClassifier`;
- `MAMLConfig` and `preset`: the official configuration keys and the released configs;
- `mamlpp_fast.reference`: the readable per-task implementation used as the oracle;
- `describe_backends()`: which kernels (compiled C++/CUDA, Triton, ATen) this install can run.
"""

__version__ = "0.1.0"

from . import _backend
from ._backend import available_backends, describe_backends, has_extension
from .config import MAMLConfig, preset, preset_names
from .meta_learner import MetaLearner

__all__ = [
    "MetaLearner",
    "MAMLConfig",
    "preset",
    "preset_names",
    "available_backends",
    "describe_backends",
    "has_extension",
    "__version__",
]
