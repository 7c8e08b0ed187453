"""Fused MAML++ ops. Each op lives in its own module with a typed public function.

Every op has a pure-PyTorch path, so all of them work without the compiled extension;
``has_extension()`` says whether the C++/CUDA kernels are loaded.
"""

from .._backend import available_backends, describe_backends, has_extension
from .bn_lrelu_pool import bn_lrelu_pool, bn_lrelu_pool_backend
from .lslr_update import lslr_update, lslr_update_backend
from .task_conv import task_conv, task_conv_strategies, task_conv_strategy, task_conv_weight_grad
from .task_cross_entropy import task_cross_entropy, task_cross_entropy_backend

__all__ = [
    "available_backends",
    "bn_lrelu_pool",
    "bn_lrelu_pool_backend",
    "describe_backends",
    "has_extension",
    "lslr_update",
    "lslr_update_backend",
    "task_conv",
    "task_conv_strategy",
    "task_conv_strategies",
    "task_conv_weight_grad",
    "task_cross_entropy",
    "task_cross_entropy_backend",
]
