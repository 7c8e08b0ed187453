"""Readable, unoptimised pure-PyTorch MAML++: the oracle for every test and benchmark.

- `MAMLFewShotClassifier`: the official per-task learner, quirks included.
- `bn_lrelu_pool_reference` and the other `*_reference` functions: plain compositions of
  ATen ops that the fused kernels must match.
"""

from .learner import MAMLFewShotClassifier
from .ops import bn_lrelu_pool_reference, task_cross_entropy_reference

__all__ = ["MAMLFewShotClassifier", "bn_lrelu_pool_reference", "task_cross_entropy_reference"]
