"""Masks: one vocabulary with the Rust crate, ``True`` = may attend.

A :class:`Mask` is a structure (which constructors, combined how) plus the tensors it reads
(key lengths, document ids, dense booleans). The structure is interned as a small integer
id, so the attention custom op can take a mask as ``(int, list[Tensor])`` — something
``torch.library`` ops and ``torch.compile(fullgraph=True)`` both accept. The op builds the
Rust mask from those at run time; masks that read no tensor are compiled once per shape and
cached.

A :class:`BlockMask` is a mask compiled for one shape ``(B, H_q, L_q, L_k)``: every 64 × 64
tile of the score matrix classified empty (skipped), full or partial. Compile it once and
reuse it across calls and layers.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _maskattn as _native

__all__ = [
    "Mask",
    "BlockMask",
    "full",
    "causal",
    "causal_top_left",
    "window",
    "chunks",
    "block_causal",
    "neighbourhood",
    "key_padding",
    "documents",
    "prefix",
    "dense",
    "from_mask_mod",
]

# One id space for mask structures and compiled block masks, so an op argument names
# either without ambiguity.
_ids = itertools.count(1)
_lock = threading.Lock()
_structure_ids: Dict[tuple, int] = {}
_structures: Dict[int, tuple] = {}
# Block masks are held weakly: one created per batch (as FlexAttention users do) must not
# live forever. The autograd context keeps the one a forward used alive for its backward.
_blocks: "weakref.WeakValueDictionary[int, BlockMask]" = weakref.WeakValueDictionary()
# Compiled block masks of tensor-free structures, per shape (a bounded LRU).
_cache: "OrderedDict[Tuple[int, int, int, int, int], object]" = OrderedDict()
_CACHE_SIZE = 64


# Under torch.compile the id of a structure is a constant of the trace: Dynamo calls this
# once while tracing instead of stepping into the lock and the dicts.
@torch._dynamo.assume_constant_result
def _structure_id(spec: tuple) -> int:
    with _lock:
        sid = _structure_ids.get(spec)
        if sid is None:
            sid = next(_ids)
            _structure_ids[spec] = sid
            _structures[sid] = spec
        return sid


class Mask:
    """An uncompiled mask; combine with ``&``, ``|``, ``~``."""

    __slots__ = ("_spec", "_tensors", "_id")

    def __init__(self, spec: tuple, tensors: Sequence[torch.Tensor] = ()):
        self._spec = spec
        self._tensors = tuple(tensors)
        self._id = _structure_id(spec)

    def __and__(self, other: "Mask") -> "Mask":
        return _combine("and", self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return _combine("or", self, other)

    def __invert__(self) -> "Mask":
        return Mask(("not", self._spec), self._tensors)

    def compile(self, B: int, H: int, L_q: int, L_k: int) -> "BlockMask":
        """This mask compiled for ``(B, H_q, L_q, L_k)``."""
        return BlockMask(self, B, H, L_q, L_k)

    def __repr__(self) -> str:
        return f"maskattn.Mask({_describe(self._spec)})"


def _combine(op: str, a: Mask, b: Mask) -> Mask:
    if not isinstance(a, Mask) or not isinstance(b, Mask):
        return NotImplemented
    return Mask((op, a._spec, _shift(b._spec, len(a._tensors))), a._tensors + b._tensors)


# Leaves that read a tensor carry its index into the mask's tensor list.
_DATA_LEAVES = ("key_padding", "key_keep", "documents", "dense")


def _shift(spec: tuple, n: int) -> tuple:
    kind = spec[0]
    if kind in _DATA_LEAVES:
        return (kind, spec[1] + n)
    if kind in ("and", "or"):
        return (kind, _shift(spec[1], n), _shift(spec[2], n))
    if kind == "not":
        return (kind, _shift(spec[1], n))
    return spec


def _describe(spec: tuple) -> str:
    kind = spec[0]
    if kind in ("and", "or"):
        sym = " & " if kind == "and" else " | "
        return f"({_describe(spec[1])}{sym}{_describe(spec[2])})"
    if kind == "not":
        return f"~{_describe(spec[1])}"
    if kind in _DATA_LEAVES:
        return f"{kind}(<tensor {spec[1]}>)"
    return f"{kind}({', '.join(map(str, spec[1:]))})"


def full() -> Mask:
    """Every query sees every key."""
    return Mask(("full",))


def causal() -> Mask:
    """``j ≤ i + (L_k − L_q)``: bottom-right aligned (the last query sees the last key)."""
    return Mask(("causal",))


def causal_top_left() -> Mask:
    """``j ≤ i``: PyTorch's ``is_causal`` when ``L_q ≠ L_k``."""
    return Mask(("causal_top_left",))


def window(left: int, right: int) -> Mask:
    """``i' − left ≤ j ≤ i' + right`` with ``i' = i + (L_k − L_q)``."""
    return Mask(("window", _count(left, "left"), _count(right, "right")))


def chunks(c: int) -> Mask:
    """``⌊j/c⌋ = ⌊i'/c⌋``: local attention in fixed chunks."""
    return Mask(("chunks", _count(c, "chunk size", 1)))


def block_causal(c: int) -> Mask:
    """``⌊j/c⌋ ≤ ⌊i'/c⌋``: a whole chunk and every earlier one."""
    return Mask(("block_causal", _count(c, "chunk size", 1)))


def neighbourhood(h: int, w: int, r: int) -> Mask:
    """Positions on an ``h × w`` grid in raster order; rows and columns at most ``r`` apart."""
    return Mask(("neighbourhood", _count(h, "height", 1), _count(w, "width", 1), _count(r, "radius")))


def key_padding(lengths: torch.Tensor) -> Mask:
    """``j < lengths[b]``: an int tensor ``[B]`` of valid key counts."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise TypeError("key_padding takes an int tensor [B] of lengths")
    return Mask(("key_padding", 0), (lengths,))


def documents(ids: torch.Tensor) -> Mask:
    """``ids[b, i] == ids[b, j]``: packed sequences, an int tensor ``[B, L]`` of document ids."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise TypeError("documents takes an int tensor [B, L] of document ids")
    return Mask(("documents", 0), (ids,))


def prefix(p: int) -> Mask:
    """Prefix-LM: ``j < p`` or causal (bottom-right)."""
    return Mask(("prefix", _count(p, "prefix length")))


def dense(allowed: torch.Tensor) -> Mask:
    """A bool tensor ``[B|1, H|1, L_q, L_k]`` (``True`` = may attend), broadcast over size-1 dims."""
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        raise TypeError("dense takes a bool tensor")
    if not 2 <= allowed.dim() <= 4:
        raise ValueError("dense takes a bool tensor of 2 to 4 dims, [B|1, H|1, L_q, L_k]")
    return Mask(("dense", 0), (allowed,))


def _key_keep(keep: torch.Tensor) -> Mask:
    """Key padding as a bool ``[B|1, L_k]`` keep vector (``True`` = a real key)."""
    return Mask(("key_keep", 0), (keep,))


def _count(x: int, what: str, least: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < least:
        raise ValueError(f"{what} must be an int ≥ {least}, got {x!r}")
    return x


class BlockMask:
    """A mask compiled for ``(B, H_q, L_q, L_k)``; reuse it across calls and layers.

    ``skipped_tile_fraction`` is the fraction of tiles the kernels never touch,
    ``hidden_pair_fraction`` the fraction of (query, key) pairs the mask hides.
    """

    def __init__(self, mask: Mask, B: int, H: int, L_q: int, L_k: int):
        if not isinstance(mask, Mask):
            raise TypeError("BlockMask compiles a maskattn.Mask")
        self._native = _native.NativeBlockMask(_build(mask._spec, mask._tensors), B, H, L_q, L_k)
        self._id = next(_ids)
        _blocks[self._id] = self

    @classmethod
    def _from_native(cls, native) -> "BlockMask":
        self = cls.__new__(cls)
        self._native = native
        self._id = next(_ids)
        _blocks[self._id] = self
        return self

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, H_q, L_q, L_k)``."""
        return tuple(self._native.shape)

    @property
    def skipped_tile_fraction(self) -> float:
        return self._native.skipped_tile_fraction

    @property
    def hidden_pair_fraction(self) -> float:
        return self._native.hidden_pair_fraction

    def __repr__(self) -> str:
        return (
            f"maskattn.BlockMask(shape={self.shape}, "
            f"skipped_tile_fraction={self.skipped_tile_fraction:.3f})"
        )


def from_mask_mod(
    mask_mod: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    B: int,
    H: int,
    L_q: int,
    L_k: int,
) -> BlockMask:
    """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` compiled into a block mask.

    ``mask_mod`` is evaluated once, vectorised, on broadcast index tensors (``b [B,1,1,1]``,
    ``h [1,H,1,1]``, ``q_idx [1,1,L_q,1]``, ``kv_idx [1,1,1,L_k]``); a mask that ignores
    ``b`` or ``h`` stays broadcast over them. The result is classified tile by tile, so
    tiles it hides entirely are skipped.
    """
    idx = [torch.arange(n).view([n if i == d else 1 for i in range(4)]) for d, n in enumerate((B, H, L_q, L_k))]
    allowed = mask_mod(*idx)
    if not isinstance(allowed, torch.Tensor):
        allowed = torch.tensor(bool(allowed))
    allowed = allowed.to(torch.bool)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    # Keep broadcast (size-1) dims as they are; only sizes in between are expanded.
    target = [n if allowed.shape[i] != 1 else 1 for i, n in enumerate((B, H, L_q, L_k))]
    allowed = allowed.expand(target)
    return BlockMask(dense(allowed), B, H, L_q, L_k)


def _build(spec: tuple, tensors: Sequence[torch.Tensor]):
    """The Rust mask for a structure and its tensors (copied into the Rust mask)."""
    kind = spec[0]
    if kind == "and":
        return _build(spec[1], tensors).and_(_build(spec[2], tensors))
    if kind == "or":
        return _build(spec[1], tensors).or_(_build(spec[2], tensors))
    if kind == "not":
        return _build(spec[1], tensors).not_()
    if kind == "key_padding":
        lengths = tensors[spec[1]]
        values = lengths.tolist()
        if any(x < 0 for x in values):
            raise ValueError("key_padding: lengths must be ≥ 0")
        return _native.key_lengths(values)
    if kind == "key_keep":
        keep = tensors[spec[1]].to(device="cpu", dtype=torch.bool).contiguous()
        return _native.key_keep(keep.data_ptr(), keep.numel(), keep.shape[0])
    if kind == "documents":
        ids = tensors[spec[1]].to(device="cpu", dtype=torch.int64).contiguous()
        return _native.documents(ids.data_ptr(), ids.numel(), ids.shape[0])
    if kind == "dense":
        allowed = tensors[spec[1]].to(device="cpu", dtype=torch.bool)
        while allowed.dim() < 4:
            allowed = allowed.unsqueeze(0)
        allowed = allowed.contiguous()
        return _native.dense(allowed.data_ptr(), list(allowed.shape))
    return getattr(_native, kind)(*spec[1:])


def _resolve(mask_id: int, data: List[torch.Tensor], shape: Tuple[int, int, int, int]):
    """The compiled Rust block mask a mask handle names, for one call's shape."""
    block = _blocks.get(mask_id)
    if block is not None:
        if block.shape != tuple(shape):
            raise ValueError(
                f"block mask was compiled for (B, H_q, L_q, L_k) = {block.shape}, "
                f"but the call has {tuple(shape)}"
            )
        return block._native
    spec = _structures.get(mask_id)
    if spec is None:
        raise ValueError(f"unknown mask handle {mask_id} (a BlockMask that was freed?)")
    if data:
        return _native.NativeBlockMask(_build(spec, data), *shape)
    key = (mask_id, *shape)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    native = _native.NativeBlockMask(_build(spec, ()), *shape)
    with _lock:
        _cache[key] = native
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return native


def _handle(mask: Optional[object]) -> Tuple[int, List[torch.Tensor]]:
    """``(id, tensors)`` for a mask argument: ``None``, a :class:`Mask` or a :class:`BlockMask`."""
    if mask is None:
        return _FULL_ID, []
    if isinstance(mask, BlockMask):
        return mask._id, []
    if isinstance(mask, Mask):
        return mask._id, list(mask._tensors)
    raise TypeError(f"mask must be None, a maskattn.Mask or a maskattn.BlockMask, not {type(mask).__name__}")


_FULL_ID = full()._id
