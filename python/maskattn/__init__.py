"""maskattn: exact masked multi-head attention on the CPU, for PyTorch.

``maskattn.attention(q, k, v, mask)`` runs fused Rust kernels (online-softmax forward,
fused backward) over block masks that skip the tiles a mask hides. Masks share the Rust
crate's vocabulary and grammar (``True`` = may attend): they combine with ``&``, ``|``,
``~``, print as the grammar (``causal & !window(3,0)``) and ``mask(text, **data)`` reads it;
``from_mask_mod`` takes a FlexAttention-style ``mask_mod``. ``scaled_dot_product_attention``
and ``nn.MultiheadAttention`` are drop-ins for PyTorch's.
"""

from . import _maskattn as _native
from . import masks, nn
from .functional import scaled_dot_product_attention
# The structured constructors (causal, window, ...) are made from the kernel crate's list
# of terms; masks.__all__ names every one.
from .masks import *  # noqa: F401,F403
from .masks import BlockMask, Mask, dense, documents, from_mask_mod, key_padding, mask
from .ops import attention

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Run the kernels on ``n`` threads (0: rayon's default, one per core)."""
    _native.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the kernels run on."""
    return _native.get_num_threads()


__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "nn",
    *masks.__all__,
    "set_num_threads",
    "get_num_threads",
]
