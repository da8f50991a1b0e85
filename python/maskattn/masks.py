"""Masks: one vocabulary and one written form with the Rust crate, ``True`` = may attend.

A :class:`Mask` prints the Rust crate's mask grammar (``repr(m)`` is Rust's ``Display``,
e.g. ``causal & !window(3,0)``) and :func:`mask` reads it back, with the data terms
(``key-padding``, ``documents``, ``dense``) bound to tensors by keyword. The structured
constructors (``causal()``, ``window(left, right)``, ...) are made at import from the
kernel crate's list of terms, so a new structured kind needs no Python.

A mask is a structure (which terms, combined how) plus the tensors it reads, in the order
its data terms appear in the text. The structure is interned as a small integer id, so
the attention custom op can take a mask as ``(int, list[Tensor])`` — something
``torch.library`` ops and ``torch.compile(fullgraph=True)`` both accept. An id names a
structure in this process only: a pickled mask carries its text and its tensors and is
interned again where it is loaded. Combining two masks costs O(1) in the structure (the
ids of the parts), so a chain of any length is built in linear time; the op builds the Rust
mask from the structure and the tensors at run time, and masks that read no tensor are
compiled once per shape and cached.

A :class:`BlockMask` is a mask compiled for one shape ``(B, H_q, L_q, L_k)``: every 64 × 64
tile of the score matrix classified empty (skipped), full or partial. Compile it once and
reuse it across calls and layers.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _intervals
from . import _maskattn as _native

# One id space for mask structures and compiled block masks, so an op argument names
# either without ambiguity.
_ids = itertools.count(1)
_lock = threading.Lock()
# A structure is one of
#   ("term", name, numbers)     a structured term of the kernel crate's list
#   ("data", name)              a data term, reading the next tensor
#   ("expr", text, names)       a parsed expression, its data terms `names` in order
#   ("and" | "or", id, id), ("not", id)
# Parts are named by their ids, so interning a combination hashes two ints, not a tree.
_structure_ids: Dict[tuple, int] = {}
_structures: Dict[int, tuple] = {}
# The grammar text of each structure printed so far (it does not depend on the data).
_texts: Dict[int, str] = {}
# Block masks are held weakly: one created per batch (as FlexAttention users do) must not
# live forever. The autograd context keeps the one a forward used alive for its backward.
_blocks: "weakref.WeakValueDictionary[int, BlockMask]" = weakref.WeakValueDictionary()
# Compiled block masks of tensor-free structures, per shape (a bounded LRU).
_cache: "OrderedDict[Tuple[int, int, int, int, int], object]" = OrderedDict()
_CACHE_SIZE = 64

# The kernel crate's terms: (name, params, repeats, is_data, doc).
_TERMS = [tuple(t) for t in _native.terms()]
# The data terms this package binds, and the keyword (and constructor) of each.
_DATA_KEYWORDS = {"key-padding": "key_padding", "documents": "documents", "dense": "dense"}


# Under torch.compile the id of a structure is a constant of the trace: Dynamo calls this
# once while tracing instead of stepping into the lock and the dicts.
@torch._dynamo.assume_constant_result
def _structure_id(spec: tuple) -> int:
    with _lock:
        sid = _structure_ids.get(spec)
        if sid is not None:
            return sid
    if spec[0] == "term":
        # Checked once, by the kernel crate, when first seen: `chunks(0)` fails here.
        _native.make(spec[1], list(spec[2]))
    with _lock:
        sid = _structure_ids.get(spec)
        if sid is None:
            sid = next(_ids)
            _structure_ids[spec] = sid
            _structures[sid] = spec
        return sid


class Mask:
    """An uncompiled mask; combine with ``&``, ``|``, ``~``.

    ``repr(m)`` is the mask in the Rust crate's grammar (``causal & !window(3,0)``), and
    ``maskattn.mask(repr(m), key_padding=..., documents=..., dense=...)`` builds it again.
    A mask pickles as that text and its tensors, so it means the same in another process.
    """

    __slots__ = ("_id", "_tensors")

    def __init__(self, spec: tuple, tensors: Sequence[torch.Tensor] = ()):
        self._id = _structure_id(spec)
        self._tensors = tuple(tensors)

    def __and__(self, other: "Mask") -> "Mask":
        return _combine("and", self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return _combine("or", self, other)

    def __invert__(self) -> "Mask":
        return Mask(("not", self._id), self._tensors)

    def compile(self, B: int, H: int, L_q: int, L_k: int) -> "BlockMask":
        """This mask compiled for ``(B, H_q, L_q, L_k)``."""
        return BlockMask(self, B, H, L_q, L_k)

    def __repr__(self) -> str:
        return _text(self._id)

    __str__ = __repr__

    def __reduce__(self):
        # Never the id: it names another structure (or none) in another process.
        return (_restore, (_text(self._id), self._tensors))


def _combine(op: str, a: Mask, b: Mask) -> Mask:
    if not isinstance(a, Mask) or not isinstance(b, Mask):
        return NotImplemented
    return Mask((op, a._id, b._id), a._tensors + b._tensors)


def _restore(text: str, tensors: Sequence[torch.Tensor]) -> Mask:
    """A pickled mask: its text parsed and interned in this process, its tensors in order."""
    names = tuple(name for name, _ in _parse(text))
    if len(names) != len(tensors):
        raise ValueError(f"a pickled mask {text!r} names {len(names)} data terms but carries {len(tensors)} tensors")
    return Mask(("expr", text, names), tensors)


def _parse(text: str) -> List[Tuple[str, int]]:
    """The data terms of ``text`` with their byte positions; a syntax error is a ValueError."""
    terms = _native.parse(text)
    for name, at in terms:
        if name not in _DATA_KEYWORDS:
            if any(t[0] == name and t[3] for t in _TERMS):
                raise ValueError(
                    f"mask expression {text!r}, at byte {at}: the data term `{name}` cannot be bound "
                    f"from Python; the package binds {', '.join(_DATA_KEYWORDS)}"
                )
            raise ValueError(
                f"mask expression {text!r}, at byte {at}: unknown mask term `{name}`; expected "
                f"{', '.join(_usage(t) for t in _TERMS if not t[3])}, or a data term "
                f"({', '.join(_DATA_KEYWORDS)})"
            )
    return terms


def mask(expr: str, **data) -> Mask:
    """A mask from the Rust crate's grammar: ``mask("causal & window(128,0)")``.

    ``&`` (and), ``|`` (or), ``!`` (not) and parentheses; ``!`` binds tightest, then ``&``,
    then ``|``. The structured terms take their numbers in the text; the data terms are
    bound by keyword: ``key-padding`` by ``key_padding=`` (an int tensor ``[B]`` of
    lengths), ``documents`` by ``documents=`` (an int tensor ``[B, L]`` of ids), ``dense``
    by ``dense=`` (a bool tensor ``[B|1, H|1, L_q, L_k]``).

    A keyword given one tensor binds every occurrence of its term to that tensor; given a
    list or tuple of tensors, it binds the occurrences in the order they appear in the
    text, one each (the list must have one tensor per occurrence). ``repr`` of a mask
    writes its data terms in that same order, so
    ``mask(repr(m), key_padding=[first, second])`` rebuilds a mask with two key paddings.

    A syntax error or an unknown term is a ``ValueError``; a keyword that is not a data
    term, a data term without its keyword, or a keyword whose term the text does not name
    is a ``TypeError``.
    """
    if not isinstance(expr, str):
        raise TypeError(f"mask: expr must be a str in the mask grammar, not {type(expr).__name__}")
    names = [name for name, _ in _parse(expr)]
    keywords = set(_DATA_KEYWORDS.values())
    for kw in data:
        if kw not in keywords:
            raise TypeError(
                f"mask() got an unexpected keyword argument {kw!r}; the data terms bind by "
                + ", ".join(f"{k}=" for k in _DATA_KEYWORDS.values())
            )
    counts = {n: names.count(n) for n in set(names)}
    bound: Dict[str, List[torch.Tensor]] = {}
    for term, kw in _DATA_KEYWORDS.items():
        n = counts.get(term, 0)
        if kw not in data:
            if n:
                raise TypeError(f"mask(): {expr!r} names the data term `{term}`; bind it with {kw}=")
            continue
        if not n:
            raise TypeError(f"mask(): keyword {kw}= given, but {expr!r} has no `{term}` term")
        value = data[kw]
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(
                    f"mask(): {kw}= lists {len(value)} tensors for the {n} `{term}` terms of {expr!r}"
                )
            values = list(value)
        else:
            values = [value] * n
        for t in values:
            _CHECK[term](t)
        bound[term] = values
    cursor = {term: iter(v) for term, v in bound.items()}
    tensors = [next(cursor[name]) for name in names]
    return Mask(("expr", expr, tuple(names)), tensors)


def _usage(term: tuple) -> str:
    """``window(LEFT,RIGHT)``, ``chunked(C[,LEFT])``, as the kernel crate writes a term in
    messages."""
    name, params, repeats, optional = term[0], term[1], term[2], term[5]
    if not params:
        return name
    more = f"[,{params[-1]}…]" if repeats else ""
    required, rest = params[: len(params) - optional], params[len(params) - optional :]
    return f"{name}({','.join(required)}{''.join(f'[,{p}]' for p in rest)}{more})"


def _structured(name: str, params: Sequence[str], repeats: bool, doc: str, optional: int = 0):
    """The Python constructor of one structured term of the kernel crate's list. The last
    ``optional`` numbers may be left out (``chunked(c)`` or ``chunked(c, left)``)."""
    pyname = name.replace("-", "_")
    args = [p.lower() for p in params]
    usage = _usage((name, params, repeats, None, doc, optional))
    required = len(args) - optional

    def constructor(*numbers, **named) -> Mask:
        for a in args[len(numbers):]:
            if a in named:
                numbers = numbers + (named.pop(a),)
        # An optional number given as None is left out: ``chunked(c, left=None)`` is ``chunked(c)``.
        while len(numbers) > required and len(numbers) <= len(args) and numbers[-1] is None:
            numbers = numbers[:-1]
        if named:
            raise TypeError(f"{pyname}() got an unexpected keyword argument {next(iter(named))!r}")
        if len(numbers) < required or (len(numbers) > len(args) and not repeats):
            count = f"{required} to {len(args)}" if optional else f"{len(args)}"
            raise TypeError(f"{pyname}() takes {count} numbers, {usage}; got {len(numbers)}")
        for n, x in enumerate(numbers):
            what = args[min(n, len(args) - 1)]
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"{pyname}: {what} must be an int ≥ 0, got {x!r}")
        return Mask(("term", name, tuple(numbers)))

    sig = [
        inspect.Parameter(
            a,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=int,
            **({} if n < required else {"default": None}),
        )
        for n, a in enumerate(args)
    ]
    if repeats:  # `prefix(p, *more)`: one number for every batch row, or one per row
        sig.append(inspect.Parameter("more", inspect.Parameter.VAR_POSITIONAL, annotation=int))
    constructor.__signature__ = inspect.Signature(sig, return_annotation=Mask)
    constructor.__name__ = constructor.__qualname__ = pyname
    constructor.__module__ = __name__
    constructor.__doc__ = f"``{usage}``: {doc}."
    return constructor


# The structured constructors, one per structured term of the kernel crate's list.
_STRUCTURED = []
for _term in _TERMS:
    if not _term[3]:
        _f = _structured(_term[0], _term[1], _term[2], _term[4], _term[5])
        globals()[_f.__name__] = _f
        _STRUCTURED.append(_f.__name__)
del _term, _f


def _check_key_padding(lengths) -> None:
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"key_padding takes an int tensor [B] of lengths, not {type(lengths).__name__}")
    if lengths.dtype == torch.bool:
        raise TypeError(
            "key_padding takes an int tensor [B] of lengths, not a torch.bool tensor; for a bool "
            "vector of keys [B, L_k] (True = may attend) use maskattn.dense(keep[:, None, None, :])"
        )
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(
            f"key_padding takes an int tensor [B] of lengths, got {lengths.dtype} of shape {tuple(lengths.shape)}"
        )


def _check_documents(ids) -> None:
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.dtype == torch.bool
        or ids.is_floating_point()
        or ids.is_complex()
    ):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"documents takes an int tensor [B, L] of document ids, got {got}")


def _check_dense(allowed) -> None:
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        got = allowed.dtype if isinstance(allowed, torch.Tensor) else type(allowed).__name__
        raise TypeError(f"dense takes a bool tensor, got {got}")
    if not 2 <= allowed.dim() <= 4:
        raise ValueError("dense takes a bool tensor of 2 to 4 dims, [B|1, H|1, L_q, L_k]")


_CHECK = {"key-padding": _check_key_padding, "documents": _check_documents, "dense": _check_dense}


def key_padding(lengths: torch.Tensor) -> Mask:
    """``key-padding``: ``j < lengths[b]``, an int tensor ``[B]`` of valid key counts."""
    _check_key_padding(lengths)
    return Mask(("data", "key-padding"), (lengths,))


def documents(ids: torch.Tensor) -> Mask:
    """``documents``: ``ids[b, i] == ids[b, j]``, packed sequences, an int tensor ``[B, L]`` of ids."""
    _check_documents(ids)
    return Mask(("data", "documents"), (ids,))


def dense(allowed: torch.Tensor) -> Mask:
    """``dense``: a bool tensor ``[B|1, H|1, L_q, L_k]`` (``True`` = may attend), broadcast over size-1 dims."""
    _check_dense(allowed)
    return Mask(("data", "dense"), (allowed,))


def _key_keep(keep: torch.Tensor) -> Mask:
    """Key padding as a bool ``[B|1, L_k]`` keep vector (``True`` = a real key); prints as
    ``key-padding``, and the tensor's dtype tells the two forms apart when it is built."""
    return Mask(("data", "key-padding"), (keep,))


def _data_native(name: str, t: torch.Tensor):
    """The Rust mask of one data term and its tensor (copied into the Rust mask)."""
    if name == "key-padding":
        if t.dtype == torch.bool:
            keep = t.to(device="cpu").contiguous()
            return _native.key_keep(keep.data_ptr(), keep.numel(), keep.shape[0])
        values = t.tolist()
        if any(x < 0 for x in values):
            raise ValueError("key_padding: lengths must be ≥ 0")
        return _native.key_padding(values)
    if name == "documents":
        ids = t.to(device="cpu", dtype=torch.int64).contiguous()
        return _native.documents(ids.data_ptr(), ids.numel(), ids.shape[0])
    if name == "dense":
        allowed = t.to(device="cpu", dtype=torch.bool)
        while allowed.dim() < 4:
            allowed = allowed.unsqueeze(0)
        allowed = allowed.contiguous()
        return _native.dense(allowed.data_ptr(), list(allowed.shape))
    raise ValueError(f"the data term `{name}` cannot be bound from Python")


# Stand-ins for the data when only the text is wanted (Display does not print data).
_PLACEHOLDERS = {
    "key-padding": torch.zeros(1, dtype=torch.int64),
    "documents": torch.zeros(1, 1, dtype=torch.int64),
    "dense": torch.ones(1, 1, dtype=torch.bool),
}


def _program(sid: int) -> Tuple[List[tuple], List[str]]:
    """The structure as a postfix program for ``_native.build``, and the data terms it
    reads in order. A loop with a stack of its own: a chain built term by term is a tree
    as deep as it is long."""
    program: List[tuple] = []
    names: List[str] = []
    todo: list = [sid]
    while todo:
        x = todo.pop()
        if isinstance(x, tuple):  # an operator whose operands are done
            program.append(x)
            continue
        spec = _structures[x]
        kind = spec[0]
        if kind in ("and", "or"):
            todo += [(kind, "", []), spec[2], spec[1]]
        elif kind == "not":
            todo += [("not", "", []), spec[1]]
        elif kind == "term":
            program.append(("term", spec[1], list(spec[2])))
        elif kind == "data":
            program.append(("data", "", []))
            names.append(spec[1])
        else:  # "expr"
            program.append(("expr", spec[1], []))
            names.extend(spec[2])
    return program, names


def _build(sid: int, tensors: Sequence[torch.Tensor]):
    """The Rust mask for a structure and its tensors (copied into the Rust mask)."""
    program, names = _program(sid)
    if len(names) != len(tensors):
        raise ValueError(f"mask {_text(sid)!r} reads {len(names)} tensors, got {len(tensors)}")
    return _native.build(program, [_data_native(n, t) for n, t in zip(names, tensors)])


def _text(sid: int) -> str:
    """The structure in the Rust crate's grammar: the Rust mask's ``Display``."""
    text = _texts.get(sid)
    if text is None:
        program, names = _program(sid)
        stand_ins = [_data_native(n, _PLACEHOLDERS[n]) for n in names]
        text = str(_native.build(program, stand_ins))
        with _lock:
            _texts[sid] = text
    return text


def _compile_again(mask: Mask, shape: Tuple[int, int, int, int]) -> "BlockMask":
    """An unpickled :class:`BlockMask`: its mask compiled again for its shape."""
    return BlockMask(mask, *shape)


class BlockMask:
    """A mask compiled for ``(B, H_q, L_q, L_k)``; reuse it across calls and layers.

    ``skipped_tile_fraction`` is the fraction of tiles the kernels never touch,
    ``hidden_pair_fraction`` the fraction of (query, key) pairs the mask hides. A copy
    shares the compiled (immutable) tiles and is registered under its own id; a pickled
    block mask carries its mask and shape and is compiled again where it is loaded.
    """

    def __init__(self, mask: Mask, B: int, H: int, L_q: int, L_k: int):
        if not isinstance(mask, Mask):
            raise TypeError("BlockMask compiles a maskattn.Mask")
        self._native = _native.NativeBlockMask(_build(mask._id, mask._tensors), B, H, L_q, L_k)
        self._mask = mask
        self._id = next(_ids)
        _blocks[self._id] = self

    @classmethod
    def _from_native(cls, native, mask: Optional[Mask] = None) -> "BlockMask":
        self = cls.__new__(cls)
        self._native = native
        self._mask = mask
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

    def __copy__(self) -> "BlockMask":
        # The default copy would keep the original's id, which names nothing once the
        # original is freed (block masks are registered weakly).
        return BlockMask._from_native(self._native, self._mask)

    def __deepcopy__(self, memo) -> "BlockMask":
        # The compiled tiles are immutable, so a deep copy may share them too.
        return self.__copy__()

    def __reduce__(self):
        if self._mask is None:
            raise TypeError("this BlockMask was made without a maskattn.Mask and cannot be pickled")
        return (_compile_again, (self._mask, self.shape))

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
    """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` compiled into a block mask.

    ``mask_mod`` is evaluated tile by tile, never on all ``L_q × L_k`` pairs at once: memory
    is the tile table plus the bits of the tiles the mask cuts through, so a causal or
    sliding-window ``mask_mod`` at L = 131,072 compiles in a fraction of a second.

    First it is called once with whole tiles' index ranges (interval arithmetic: ``+ - *
    // % abs``, comparisons, ``& | ~ ^``, ``torch.where/minimum/maximum``, and indexing a
    tensor by an index, as in ``doc_ids[q_idx] == doc_ids[kv_idx]``), which settles every
    tile it must allow entirely (full) or cannot allow at all (empty). Then only the other
    tiles are evaluated pair by pair, vectorised, on broadcast index tensors of shape
    ``[P, 1, tile_q, 1]`` / ``[P, 1, 1, tile_k]`` (``b``, ``h`` ``[P, 1, 1, 1]``) for ``P``
    tiles at a time. A ``mask_mod`` the interval pass cannot follow (a Python ``if`` on a
    value, ``.item()``, other ops) is evaluated pair by pair on every tile — exact, just
    slower (``L_q · L_k`` evaluations, still in bounded memory).

    As in FlexAttention it must return a bool tensor (a Python ``bool`` is taken as a
    constant) whose shape broadcasts to the index tensors'; anything else is a
    ``TypeError`` (``ValueError`` for the shape). A mask that ignores ``b`` or ``h`` keeps
    one tile table for all batch rows or heads.
    """
    for what, n in (("B", B), ("H", H), ("L_q", L_q), ("L_k", L_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"from_mask_mod: {what} must be an int ≥ 0, got {n!r}")
    block = _from_mask_mod(mask_mod, B, H, L_q, L_k)
    # Kept for callers that must evaluate the mask elsewhere than its tiles (context
    # parallelism compiles blocks of the whole problem from it).
    block._mask_mod = mask_mod
    return block


def _from_mask_mod(mask_mod, B: int, H: int, L_q: int, L_k: int, keep: Optional[torch.Tensor] = None) -> BlockMask:
    """:func:`from_mask_mod`, with ``keep`` (a bool ``[B|1, L_k]`` key padding, ``True`` = a
    real key) ANDed in: transformers' mask function keeps its padding apart."""
    name = getattr(mask_mod, "__name__", type(mask_mod).__name__)
    tq, tk = _native.tile_sizes(L_q, L_k)
    nq, nk = -(-L_q // tq), -(-L_k // tk)
    shape = (B, H, L_q, L_k)
    if B * H * nq * nk == 0:
        # No pair to evaluate: the kernel crate's block mask of an empty problem.
        block = BlockMask._from_native(_native.NativeBlockMask(_build(_FULL_ID, ()), *shape))
        block._tiles_evaluated = 0
        return block

    classes = _interval_classes(mask_mod, B, H, L_q, L_k, (tq, tk), keep)
    if classes is None:
        # Not followed by the interval pass: learn which of b and h the mask reads from
        # one row band (with the type and shape checks), then evaluate every tile.
        probe = _checked(mask_mod, name, _band_indices(B, H, min(tq, L_q), L_k), (B, H, min(tq, L_q), L_k))
        classes = torch.full((probe.shape[0], probe.shape[1], nq, nk), 2, dtype=torch.uint8)
        if keep is not None and keep.shape[0] != 1 and classes.shape[0] == 1:
            classes = classes.expand(B, -1, -1, -1).contiguous()
    rows_b, rows_h = classes.shape[0], classes.shape[1]

    # The tiles left undecided, pair by pair, a chunk of tiles at a time.
    where = (classes == 2).nonzero()
    chunk = max(1, (1 << 20) // (tq * tk))
    bits = []
    settled = []
    for start in range(0, where.shape[0], chunk):
        w = where[start : start + chunk]
        P = w.shape[0]
        b = w[:, 0].view(P, 1, 1, 1)
        h = w[:, 1].view(P, 1, 1, 1)
        q = (w[:, 2].view(P, 1) * tq + torch.arange(tq)).view(P, 1, tq, 1)
        kv = (w[:, 3].view(P, 1) * tk + torch.arange(tk)).view(P, 1, 1, tk)
        ragged = L_q % tq or L_k % tk
        if ragged:
            # Past a last tile's edge: evaluated at the last index (a mask_mod may index a
            # tensor of length L), then cleared.
            valid = ((q < L_q) & (kv < L_k)).reshape(P, tq, tk)
            q, kv = q.clamp(max=L_q - 1), kv.clamp(max=L_k - 1)
        allowed = _checked(mask_mod, name, (b, h, q, kv), (P, 1, tq, tk)).expand(P, 1, tq, tk)
        if keep is not None:
            allowed = allowed & keep[b if keep.shape[0] != 1 else 0, kv]
        allowed = allowed.reshape(P, tq, tk)
        if ragged:
            allowed = allowed & valid
            full = (allowed | ~valid).flatten(1).all(1)
        else:
            full = allowed.flatten(1).all(1)
        cls = torch.where(full, 1, torch.where(allowed.flatten(1).any(1), 2, 0)).to(torch.uint8)
        settled.append(cls)
        bits.append(allowed[cls == 2])
    if settled:
        classes[tuple(where.T)] = torch.cat(settled)
    partial = torch.cat(bits).contiguous() if bits else torch.zeros(0, dtype=torch.bool)
    classes = classes.contiguous()
    native = _native.NativeBlockMask.from_tiles(
        shape,
        (rows_b, rows_h),
        (classes.data_ptr(), classes.numel()),
        (partial.data_ptr(), partial.numel()),
    )
    block = BlockMask._from_native(native)
    # How many tiles were evaluated pair by pair (the rest the interval pass settled).
    block._tiles_evaluated = int(where.shape[0])
    return block


def _band_indices(B: int, H: int, rows: int, L_k: int):
    return (
        torch.arange(B).view(B, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(rows).view(1, 1, rows, 1),
        torch.arange(L_k).view(1, 1, 1, L_k),
    )


def _checked(mask_mod, name: str, idx, full_shape) -> torch.Tensor:
    """``mask_mod(*idx)`` as a 4-d bool tensor broadcasting to ``full_shape`` (size-1 dims
    kept), or the TypeError / ValueError FlexAttention users expect."""
    allowed = mask_mod(*idx)
    if isinstance(allowed, bool):
        allowed = torch.tensor(allowed)
    if not isinstance(allowed, torch.Tensor):
        hint = " (a missing `return`?)" if allowed is None else ""
        raise TypeError(
            f"from_mask_mod: mask_mod {name!r} returned {type(allowed).__name__}{hint}; it must return "
            "a bool tensor (True = may attend), e.g. `q_idx >= kv_idx`"
        )
    if allowed.dtype != torch.bool:
        raise TypeError(
            f"from_mask_mod: mask_mod {name!r} returned a {allowed.dtype} tensor; it must return a bool "
            "tensor (True = may attend), e.g. `q_idx >= kv_idx`"
        )
    full_shape = tuple(full_shape)
    try:
        fits = allowed.dim() <= 4 and torch.broadcast_shapes(allowed.shape, full_shape) == full_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"from_mask_mod: mask_mod {name!r} returned shape {tuple(allowed.shape)}, which does not "
            f"broadcast to the index tensors' shape {full_shape}"
        )
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed


def _interval_classes(mask_mod, B, H, L_q, L_k, tiles, keep) -> Optional[torch.Tensor]:
    """The tile classes ``[rows_b, rows_h, nq, nk]`` (0 empty, 1 full, 2 undecided) the
    interval pass settles, or ``None`` where it cannot follow ``mask_mod``."""
    tq, tk = tiles
    q_lo, q_hi = _intervals.tile_bounds(L_q, tq)
    k_lo, k_hi = _intervals.tile_bounds(L_k, tk)
    nq, nk = q_lo.numel(), k_lo.numel()
    q = _intervals.Ival(q_lo.view(1, 1, nq, 1), q_hi.view(1, 1, nq, 1))
    kv = _intervals.Ival(k_lo.view(1, 1, 1, nk), k_hi.view(1, 1, 1, nk))
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    try:
        out = mask_mod(b, h, q, kv)
        if isinstance(out, bool):
            out = _intervals.Tri.of(out)
        if not isinstance(out, _intervals.Tri):
            return None  # a plain tensor, or a wrong type: the exact pass checks it
        must, may = torch.as_tensor(out.must), torch.as_tensor(out.may)
        if must.dtype != torch.bool or may.dtype != torch.bool:
            return None
        target = (B, H, nq, nk)
        dims = torch.broadcast_shapes(must.shape, may.shape)
        if len(dims) > 4 or torch.broadcast_shapes(dims, target) != target:
            return None
    except Exception:  # noqa: BLE001 - whatever the pass cannot follow, the exact pass evaluates
        return None
    while must.dim() < 4:
        must, may = must.unsqueeze(0), may.unsqueeze(0)
    if keep is not None:
        # Per key tile: all of it real, or none of it.
        kk = keep.to(torch.bool)
        pad = nk * tk - L_k
        every = torch.nn.functional.pad(kk, (0, pad), value=True).view(kk.shape[0], nk, tk).all(-1)
        some = torch.nn.functional.pad(kk, (0, pad), value=False).view(kk.shape[0], nk, tk).any(-1)
        must = must & every.view(-1, 1, 1, nk)
        may = may & some.view(-1, 1, 1, nk)
    rows = [B if must.shape[0] != 1 or may.shape[0] != 1 else 1, H if must.shape[1] != 1 or may.shape[1] != 1 else 1]
    shape = (rows[0], rows[1], nq, nk)
    must, may = must.expand(shape), may.expand(shape)
    return torch.where(must, 1, torch.where(may, 2, 0)).to(torch.uint8).contiguous()


def _resolve(mask_id: int, data: List[torch.Tensor], shape: Tuple[int, int, int, int]):
    """The compiled Rust block mask a mask handle names, for one call's shape."""
    if not data:
        # A tensor-free structure seen at this shape before (a decode step's every call):
        # structures and block masks draw their ids from one counter, so no block mask's
        # id is a key here.
        key = (mask_id, *shape)
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit
    block = _blocks.get(mask_id)
    if block is not None:
        if block.shape != tuple(shape):
            raise ValueError(
                f"block mask was compiled for (B, H_q, L_q, L_k) = {block.shape}, "
                f"but the call has {tuple(shape)}"
            )
        return block._native
    if mask_id not in _structures:
        raise ValueError(f"unknown mask handle {mask_id} (a BlockMask that was freed?)")
    if data:
        return _native.NativeBlockMask(_build(mask_id, data), *shape)
    key = (mask_id, *shape)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    native = _native.NativeBlockMask(_build(mask_id, ()), *shape)
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


_FULL_ID = full()._id  # noqa: F821 (made from the kernel crate's list above)

# `torch.load` reads only allow-listed globals by default (weights_only): these two rebuild
# a mask from its text and tensors, and a block mask from its mask and shape, and run no
# other code, so a saved mask loads like a saved tensor.
torch.serialization.add_safe_globals([_restore, _compile_again])

__all__ = [
    "Mask",
    "BlockMask",
    "mask",
    *_STRUCTURED,
    "key_padding",
    "documents",
    "dense",
    "from_mask_mod",
]
