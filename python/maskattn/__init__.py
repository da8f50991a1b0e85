"""maskattn: exact masked multi-head attention on the CPU, for PyTorch.

``maskattn.attention(q, k, v, mask)`` runs fused Rust kernels (online-softmax forward,
fused backward) over block masks that skip the tiles a mask hides. Masks share the Rust
crate's vocabulary and grammar (``True`` = may attend): they combine with ``&``, ``|``,
``~``, print as the grammar (``causal & !window(3,0)``) and ``mask(text, **data)`` reads it;
``from_mask_mod`` takes a FlexAttention-style ``mask_mod``. ``scaled_dot_product_attention``
and ``nn.MultiheadAttention`` are drop-ins for PyTorch's.
"""

import os

from . import _maskattn as _native
from . import masks, nn
from .functional import scaled_dot_product_attention
# The structured constructors (causal, window, ...) are made from the kernel crate's list
# of terms; masks.__all__ names every one.
from .masks import *  # noqa: F401,F403
from .masks import BlockMask, Mask, dense, documents, from_mask_mod, key_padding, mask
from .ops import RelativeBias, attention, dropout_keep

__version__ = "0.1.0"


def __getattr__(name: str):
    # `maskattn.distributed` (context parallelism over torch.distributed) is imported on
    # first use, not with the package: most users never need it.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'maskattn' has no attribute {name!r}")


def set_num_threads(n: int) -> None:
    """Run the kernels on ``n`` threads (0: rayon's default, one per core), at most
    4 × the cores (as the CLI's ``--threads``): more only adds switching, and far more
    spends seconds creating threads."""
    if isinstance(n, bool) or not hasattr(type(n), "__index__"):
        raise TypeError(f"set_num_threads takes an int, got {type(n).__name__}")
    n = n.__index__()
    cores = os.cpu_count() or 1
    if not 0 <= n <= 4 * cores:
        raise ValueError(f"set_num_threads({n}): n must be between 0 and {4 * cores} (4 × the {cores} cores)")
    _native.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the kernels run on."""
    return _native.get_num_threads()


__all__ = [
    "attention",
    "dropout_keep",
    "RelativeBias",
    "scaled_dot_product_attention",
    "nn",
    *masks.__all__,
    "set_num_threads",
    "get_num_threads",
]
