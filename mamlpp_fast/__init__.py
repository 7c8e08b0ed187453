"""mamlpp_fast: a fast and faithful MAML++ (Antoniou, Edwards & Storkey, ICLR 2019)."""

__version__ = "0.1.0"

from . import _backend  # noqa: F401  (loads the compiled extension when present)
