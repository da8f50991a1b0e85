"""Interval evaluation of a ``mask_mod``: what a whole tile of pairs may and must give.

``from_mask_mod`` calls the user's ``mask_mod`` once with the query and key indices of
whole tiles as :class:`Ival` values (each index known only to lie in ``[lo, hi]``), and gets
back a :class:`Tri`: per tile, whether the mask *must* allow every pair of it and whether it
*may* allow some. Every operation over-approximates (the true set of values always lies
inside what it returns), so ``must`` is never wrong when set and ``may`` never wrong when
clear: a tile that is ``must`` is full, one that is not ``may`` is empty, and only the rest
is evaluated pair by pair. For a causal or sliding mask that is a band of diagonal tiles, so
a mask at L = 131,072 costs its tile table and a few thousand tiles, not L² evaluations.

Anything the arithmetic does not cover (Python ``if`` on a value, ``.item()``, an op not
listed here) raises :class:`Unsupported`, and the caller evaluates every tile exactly
instead — slower, never wrong.
"""

from __future__ import annotations

from typing import Tuple

import torch


class Unsupported(Exception):
    """The ``mask_mod`` did something the interval arithmetic does not cover."""


def _point(x):
    """``x`` as ``(lo, hi)``: an ``Ival``'s bounds, or a number / numeric tensor twice."""
    if isinstance(x, Ival):
        return x.lo, x.hi
    if isinstance(x, bool) or isinstance(x, Tri):
        raise Unsupported("a boolean in arithmetic")
    if isinstance(x, (int, float)):
        return x, x
    if isinstance(x, torch.Tensor) and x.dtype != torch.bool and not x.is_complex():
        return x, x
    raise Unsupported(f"an operand of type {type(x).__name__}")


def _min(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(torch.as_tensor(out), torch.as_tensor(x))
    return out


def _max(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(torch.as_tensor(out), torch.as_tensor(x))
    return out


def _positive(d) -> bool:
    if isinstance(d, (int, float)):
        return d > 0
    return bool((d > 0).all())


class Ival:
    """Numbers known only to lie in ``[lo, hi]`` (elementwise, broadcasting tensors)."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    # Arithmetic.
    def __add__(self, o):
        lo, hi = _point(o)
        return Ival(self.lo + lo, self.hi + hi)

    __radd__ = __add__

    def __sub__(self, o):
        lo, hi = _point(o)
        return Ival(self.lo - hi, self.hi - lo)

    def __rsub__(self, o):
        lo, hi = _point(o)
        return Ival(lo - self.hi, hi - self.lo)

    def __neg__(self):
        return Ival(-self.hi, -self.lo)

    def __pos__(self):
        return self

    def __mul__(self, o):
        lo, hi = _point(o)
        ends = (self.lo * lo, self.lo * hi, self.hi * lo, self.hi * hi)
        return Ival(_min(*ends), _max(*ends))

    __rmul__ = __mul__

    def __abs__(self):
        lo, hi = torch.as_tensor(self.lo), torch.as_tensor(self.hi)
        a, b = lo.abs(), hi.abs()
        straddles = (lo < 0) & (hi > 0)
        return Ival(torch.where(straddles, torch.zeros_like(a), torch.minimum(a, b)), torch.maximum(a, b))

    device = torch.device("cpu")

    def abs(self):
        return self.__abs__()

    # transformers' and_masks / or_masks start from `q_idx.new_ones((), dtype=torch.bool)`.
    def new_ones(self, size, dtype=None):
        return torch.ones(size, dtype=dtype)

    def new_zeros(self, size, dtype=None):
        return torch.zeros(size, dtype=dtype)

    def __floordiv__(self, o):
        # Monotone in the numerator for a positive divisor (elementwise constant).
        if isinstance(o, Ival) or not _positive(_point(o)[0]):
            raise Unsupported("floor division by other than a positive constant")
        return Ival(self.lo // o, self.hi // o)

    def __mod__(self, o):
        if isinstance(o, Ival) or not _positive(_point(o)[0]):
            raise Unsupported("modulo by other than a positive constant")
        same = torch.as_tensor(self.lo // o) == torch.as_tensor(self.hi // o)
        lo = torch.where(same, torch.as_tensor(self.lo % o), torch.zeros_like(torch.as_tensor(self.lo % o)))
        hi = torch.where(same, torch.as_tensor(self.hi % o), torch.as_tensor(o - 1) + torch.zeros_like(lo))
        return Ival(lo, hi)

    # Comparisons: a ≥ b exactly where a − b ≥ 0.
    def __ge__(self, o):
        d = self - o
        return Tri(torch.as_tensor(d.lo >= 0), torch.as_tensor(d.hi >= 0))

    def __gt__(self, o):
        d = self - o
        return Tri(torch.as_tensor(d.lo > 0), torch.as_tensor(d.hi > 0))

    def __le__(self, o):
        d = self - o
        return Tri(torch.as_tensor(d.hi <= 0), torch.as_tensor(d.lo <= 0))

    def __lt__(self, o):
        d = self - o
        return Tri(torch.as_tensor(d.hi < 0), torch.as_tensor(d.lo < 0))

    def __eq__(self, o):  # type: ignore[override]
        lo, hi = _point(o)
        must = torch.as_tensor((self.lo == self.hi) & (lo == hi) & (self.lo == lo))
        may = torch.as_tensor((self.lo <= hi) & (lo <= self.hi))
        return Tri(must, may)

    def __ne__(self, o):  # type: ignore[override]
        return ~(self == o)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise Unsupported("a Python truth test on an index")

    def __index__(self):
        raise Unsupported("an index used as a Python int")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, args, kwargs or {})


class Tri:
    """Per element: ``must`` (true for every pair it stands for) and ``may`` (for some)."""

    __slots__ = ("must", "may")

    def __init__(self, must: torch.Tensor, may: torch.Tensor):
        self.must, self.may = must, may

    @staticmethod
    def of(x) -> "Tri":
        if isinstance(x, Tri):
            return x
        if isinstance(x, bool):
            t = torch.tensor(x)
            return Tri(t, t)
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            return Tri(x, x)
        raise Unsupported(f"a logical operand of type {type(x).__name__}")

    def __and__(self, o):
        o = Tri.of(o)
        return Tri(self.must & o.must, self.may & o.may)

    __rand__ = __and__

    def __or__(self, o):
        o = Tri.of(o)
        return Tri(self.must | o.must, self.may | o.may)

    __ror__ = __or__

    def __invert__(self):
        return Tri(~self.may, ~self.must)

    def __xor__(self, o):
        o = Tri.of(o)
        must = (self.must & ~o.may) | (~self.may & o.must)
        may = (self.may & ~o.must) | (~self.must & o.may)
        return Tri(must, may)

    __rxor__ = __xor__

    device = torch.device("cpu")
    dtype = torch.bool

    def to(self, *args, **kwargs):
        # `.to(device)` / `.to(torch.bool)`: the bounds stay as they are (CPU, bool).
        if any(a not in (torch.bool,) and not isinstance(a, (str, torch.device)) for a in args) or kwargs:
            raise Unsupported("Tri.to other than a device or torch.bool")
        return self

    def __eq__(self, o):  # type: ignore[override]
        return ~(self ^ o)

    def __ne__(self, o):  # type: ignore[override]
        return self ^ o

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self):
        raise Unsupported("a Python truth test on a mask value")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, args, kwargs or {})


def _where(cond, x, y):
    c = Tri.of(cond)
    if any(isinstance(v, (Tri, bool)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool) for v in (x, y)):
        a, b = Tri.of(x), Tri.of(y)
        # Sure where the condition is settled; either side's bounds where it is not.
        must = torch.where(c.must, a.must, torch.where(~c.may, b.must, a.must & b.must))
        may = torch.where(c.must, a.may, torch.where(~c.may, b.may, a.may | b.may))
        return Tri(must, may)
    (xl, xh), (yl, yh) = _point(x), _point(y)
    xl, xh, yl, yh = (torch.as_tensor(v) for v in (xl, xh, yl, yh))
    lo = torch.where(c.must, xl, torch.where(~c.may, yl, torch.minimum(xl, yl)))
    hi = torch.where(c.must, xh, torch.where(~c.may, yh, torch.maximum(xh, yh)))
    return Ival(lo, hi)


def _minimum(a, b):
    (al, ah), (bl, bh) = _point(a), _point(b)
    return Ival(_min(al, bl), _min(ah, bh))


def _maximum(a, b):
    (al, ah), (bl, bh) = _point(a), _point(b)
    return Ival(_max(al, bl), _max(ah, bh))


# The widest index range a gather reduces over (a tile's side, or a little more).
_GATHER_WIDTH = 256


def _getitem(t, index):
    """``t[index]`` where one index is an :class:`Ival` of narrow ranges: the min and max of
    ``t`` over each range (a bool ``t`` gives a :class:`Tri`: all of it / any of it)."""
    if not isinstance(t, torch.Tensor) or isinstance(t, (Ival, Tri)):
        raise Unsupported("indexing a non-tensor")
    parts = list(index) if isinstance(index, tuple) else [index]
    at = [n for n, p in enumerate(parts) if isinstance(p, Ival)]
    if len(at) != 1 or any(isinstance(p, Tri) or not isinstance(p, (Ival, int, torch.Tensor)) for p in parts):
        raise Unsupported("an index other than one interval among ints and integer tensors")
    if len(parts) > t.dim():
        raise Unsupported("too many indices")
    n = at[0]
    iv = parts[n]
    lo, hi = torch.as_tensor(iv.lo), torch.as_tensor(iv.hi)
    if lo.is_floating_point() or hi.is_floating_point():
        raise Unsupported("a floating-point index")
    size = t.shape[n]
    if bool((lo < 0).any()) or bool((hi >= size).any()) or bool((lo > hi).any()):
        raise Unsupported("an index range outside the tensor")
    width = int((hi - lo).max()) + 1 if lo.numel() else 1
    if width > _GATHER_WIDTH:
        raise Unsupported("an index range too wide to reduce")
    lo_v = hi_v = None
    for k in range(width):
        parts[n] = torch.minimum(lo + k, hi)
        v = t[tuple(parts)]
        lo_v = v if lo_v is None else (lo_v & v if v.dtype == torch.bool else torch.minimum(lo_v, v))
        hi_v = v if hi_v is None else (hi_v | v if v.dtype == torch.bool else torch.maximum(hi_v, v))
    if t.dtype == torch.bool:
        return Tri(lo_v, hi_v)
    return Ival(lo_v, hi_v)


def _torch_function(func, args, kwargs):
    name = getattr(func, "__name__", "")
    if kwargs:
        raise Unsupported(f"torch.{name} with keyword arguments")
    if name == "__getitem__":
        return _getitem(*args)
    table = {
        "__add__": lambda a, b: _lift(a) + b,
        "__radd__": lambda a, b: _lift(b) + a,
        "add": lambda a, b: _lift(a) + b,
        "__sub__": lambda a, b: _lift(a) - b,
        "sub": lambda a, b: _lift(a) - b,
        "__rsub__": lambda a, b: _lift(b) - a,
        "__mul__": lambda a, b: _lift(a) * b,
        "__rmul__": lambda a, b: _lift(b) * a,
        "mul": lambda a, b: _lift(a) * b,
        "abs": lambda a: abs(a),
        "__ge__": lambda a, b: _lift(a) >= b,
        "ge": lambda a, b: _lift(a) >= b,
        "greater_equal": lambda a, b: _lift(a) >= b,
        "__gt__": lambda a, b: _lift(a) > b,
        "gt": lambda a, b: _lift(a) > b,
        "greater": lambda a, b: _lift(a) > b,
        "__le__": lambda a, b: _lift(a) <= b,
        "le": lambda a, b: _lift(a) <= b,
        "less_equal": lambda a, b: _lift(a) <= b,
        "__lt__": lambda a, b: _lift(a) < b,
        "lt": lambda a, b: _lift(a) < b,
        "less": lambda a, b: _lift(a) < b,
        "__eq__": lambda a, b: _lift(a) == b,
        "eq": lambda a, b: _lift(a) == b,
        "__ne__": lambda a, b: _lift(a) != b,
        "ne": lambda a, b: _lift(a) != b,
        "__and__": lambda a, b: Tri.of(a) & b,
        "__rand__": lambda a, b: Tri.of(b) & a,
        "logical_and": lambda a, b: Tri.of(a) & b,
        "bitwise_and": lambda a, b: Tri.of(a) & b,
        "__or__": lambda a, b: Tri.of(a) | b,
        "__ror__": lambda a, b: Tri.of(b) | a,
        "logical_or": lambda a, b: Tri.of(a) | b,
        "bitwise_or": lambda a, b: Tri.of(a) | b,
        "__xor__": lambda a, b: Tri.of(a) ^ b,
        "logical_xor": lambda a, b: Tri.of(a) ^ b,
        "logical_not": lambda a: ~Tri.of(a),
        "bitwise_not": lambda a: ~Tri.of(a),
        "__invert__": lambda a: ~Tri.of(a),
        "where": _where,
        "minimum": _minimum,
        "maximum": _maximum,
    }
    op = table.get(name)
    if op is None:
        raise Unsupported(f"torch.{name}")
    return op(*args)


def _lift(x):
    """A plain operand as a one-point :class:`Ival`, so that its operator methods apply."""
    if isinstance(x, (Ival, Tri)):
        return x
    lo, hi = _point(x)
    return Ival(lo, hi)


def tile_bounds(length: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first and last index of each tile of ``length`` indices."""
    lo = torch.arange(0, length, tile)
    return lo, torch.clamp(lo + tile - 1, max=length - 1)
