"""maskattn as an attention backend of Hugging Face ``transformers`` (5.x).

``register()`` adds the name ``"maskattn"`` to both of transformers' registries:

* ``AttentionMaskInterface``: :func:`mask_interface` turns the mask transformers composes
  (causal, sliding window, padding, packed documents, with the cache's offsets) into a
  :class:`TransformersMask` — maskattn's own analytic masks, never an ``L_q × L_k`` matrix
  for the cases it recognises. transformers calls it once per forward per layer type, and
  every layer of that type compiles nothing more: the block mask is compiled on the first
  layer's call and reused.
* ``AttentionInterface``: :func:`attention_forward` runs ``maskattn.attention`` on the
  model's ``[B, H, L, d]`` views (grouped-query heads are not repeated) and returns
  ``[B, L, H, d]``.

Both are needed: a name with only an attention function gets ``attention_mask=None`` from
transformers and silently loses causality and padding.

The name has no "flash" in it on purpose: transformers routes such names to its kernel hub.
``transformers`` is imported only inside ``register()`` and the mask function's fallback, so
``import maskattn`` never needs it.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from . import masks as _masks
from .masks import BlockMask, Mask
from . import ops as _ops
from .ops import attention as _attention

__all__ = ["NAME", "register", "attention_forward", "mask_interface", "TransformersMask"]

NAME = "maskattn"


def register() -> None:
    """Register ``"maskattn"`` with transformers' attention and attention-mask interfaces.

    Afterwards ``from_pretrained(..., attn_implementation="maskattn")``,
    ``from_config(..., attn_implementation="maskattn")`` and
    ``model.set_attn_implementation("maskattn")`` select maskattn. Calling it again is harmless.
    """
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            'maskattn.transformers.register() needs transformers >= 5: pip install "maskattn[transformers]"'
        ) from e
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"maskattn.transformers needs transformers >= 5, found {transformers.__version__}")
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)


# ---------------------------------------------------------------------------------------
# The mask: transformers' composed index function, read as maskattn masks.


class TransformersMask:
    """The mask one forward hands every attention layer of one layer type.

    ``mask`` is the maskattn :class:`Mask` for ``(B, ·, L_q, L_k)``; ``analytic`` is
    ``False`` where transformers' index function was not recognised: it is then compiled by
    :func:`maskattn.from_mask_mod` tile by tile (``mask`` is ``None``, ``mask_mod`` the
    function in local indices, ``keep`` the key padding), or — for a function transformers
    would ``vmap`` — evaluated into a dense boolean mask (exact, but ``B × L_q × L_k`` bytes). ``shape`` is
    ``(B, 1, L_q, L_k)``, as transformers' own 4-d masks, so a model that checks a mask's
    rank finds four dimensions.
    """

    def __init__(
        self,
        mask: Mask,
        shape: Tuple[int, int, int],
        *,
        analytic: bool,
        relative: bool,
        has_documents: bool,
        padded: bool,
        offsets: Tuple[int, int],
        description: str,
    ):
        self.mask = mask
        self.batch_size, self.q_length, self.kv_length = shape
        self.analytic = analytic
        # Only band constraints and documents: unchanged by restarting positions per document.
        self.relative = relative
        self.has_documents = has_documents
        # A 2-d attention mask was given (transformers then never reads packing from position_ids).
        self.padded = padded
        self.q_offset, self.kv_offset = offsets
        self.description = description
        self._blocks: Dict[tuple, BlockMask] = {}
        self._late_source: Optional[torch.Tensor] = None
        self._late_ids: Optional[torch.Tensor] = None
        # Set where the index function was not recognised: compiled tile by tile instead.
        self.mask_mod: Optional[Callable] = None
        self.keep: Optional[torch.Tensor] = None

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def block(self, num_heads: int, documents: Optional[torch.Tensor] = None) -> BlockMask:
        """This mask (and ``documents``, ``[B, L]`` ids, if given) compiled for ``num_heads``
        query heads; compiled once per forward and reused by every layer."""
        key = (num_heads, None if documents is None else id(documents))
        block = self._blocks.get(key)
        if block is None and self.mask_mod is not None:
            # Documents are never added to such a mask (it is not `relative`).
            block = _masks._from_mask_mod(
                self.mask_mod, self.batch_size, num_heads, self.q_length, self.kv_length, keep=self.keep
            )
            self._blocks[key] = block
        if block is None:
            mask = self.mask if documents is None else self.mask & _masks.documents(documents)
            block = _compile(mask, self.batch_size, num_heads, self.q_length, self.kv_length)
            self._blocks[key] = block
        return block

    def late_documents(self, source: torch.Tensor, ids_of: Callable[[torch.Tensor], Optional[torch.Tensor]]):
        """Document ids read in the attention function (the same tensor reaches every layer,
        so they are computed once per forward)."""
        if self._late_source is not source:
            self._late_source = source
            self._late_ids = ids_of(source)
        return self._late_ids

    def __repr__(self) -> str:
        return f"maskattn.transformers.TransformersMask(shape={self.shape}, {self.description})"


def _compile(mask: Mask, B: int, H: int, L_q: int, L_k: int) -> BlockMask:
    # One place to compile, so tests can count compilations.
    return BlockMask(mask, B, H, L_q, L_k)


def mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    use_vmap: bool = False,
    **kwargs,
) -> TransformersMask:
    """transformers' ``AttentionMaskInterface`` entry for ``"maskattn"``.

    Receives what ``sdpa_mask`` receives: the composed index function ``mask_function``
    (absolute positions: ``q_idx + q_offset``, ``kv_idx + kv_offset``) and the 2-d padding
    mask ``attention_mask`` ``[B, ≥ kv_offset + kv_length]`` (``True`` = a real token).
    Causal, sliding-window (causal and bidirectional), bidirectional, padding and packed
    documents, combined with ``and``, become maskattn's analytic masks; anything else is
    compiled tile by tile by :func:`maskattn.from_mask_mod` (a function transformers would
    ``vmap`` is evaluated by its own ``sdpa_mask`` into a dense boolean mask).
    """
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    B, L_q, L_k = int(batch_size), int(q_length), int(kv_length)
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask: expected the 2-d padding mask [B, L], got {tuple(attention_mask.shape)}")
        padding = _local_keep(attention_mask.to(torch.bool), B, L_k, kv_offset)

    conj = _translate(mask_function, _Context(B, L_q, L_k, q_offset, kv_offset))
    if conj is not None and padding is not None:
        conj = conj.and_(_Conj(keep=padding))
    if conj is not None and conj.positions is not None and not conj.documents_match_positions():
        conj = None
    if conj is not None:
        mask, description = conj.to_mask(L_q, L_k)
        return TransformersMask(
            mask,
            (B, L_q, L_k),
            analytic=True,
            relative=conj.relative,
            has_documents=conj.docs is not None,
            padded=attention_mask is not None,
            offsets=(q_offset, kv_offset),
            description=description,
        )
    if use_vmap:
        # A function written for scalars (transformers vmaps it): evaluated as transformers does.
        return _dense_fallback(B, L_q, L_k, q_offset, kv_offset, mask_function, attention_mask, use_vmap, kwargs)
    return _tiled(B, L_q, L_k, q_offset, kv_offset, mask_function, padding, attention_mask is not None)


def _tiled(B, L_q, L_k, q_offset, kv_offset, mask_function, padding, padded):
    """An index function that is not recognised, evaluated tile by tile by
    :func:`maskattn.from_mask_mod` (only the tiles it cuts through pair by pair; memory in
    tiles, not ``L_q × L_k``), with the padding kept apart as a key keep vector."""

    def local(b, h, q, kv):
        # transformers' functions take absolute positions.
        return mask_function(b, h, q + q_offset, kv + kv_offset)

    name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
    local.__name__ = name
    m = TransformersMask(
        None,
        (B, L_q, L_k),
        analytic=False,
        relative=False,
        has_documents=False,
        padded=padded,
        offsets=(q_offset, kv_offset),
        description=f"evaluated tile by tile from {name}",
    )
    m.mask_mod, m.keep = local, padding
    return m


def _dense_fallback(B, L_q, L_k, q_offset, kv_offset, mask_function, attention_mask, use_vmap, kwargs):
    """An index function that is not recognised: transformers' own ``sdpa_mask`` evaluates
    it (exact by construction) into ``[B, 1, L_q, L_k]`` booleans."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    allowed = sdpa_mask(
        batch_size=B,
        q_length=L_q,
        kv_length=L_k,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function if mask_function is not None else causal_mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device="cpu",
    )
    name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
    return TransformersMask(
        _masks.dense(allowed.to(torch.bool)),
        (B, L_q, L_k),
        analytic=False,
        relative=False,
        has_documents=False,
        padded=attention_mask is not None,
        offsets=(q_offset, kv_offset),
        description=f"dense, evaluated from {name}",
    )


def _local_keep(attention_mask: torch.Tensor, B: int, L_k: int, kv_offset: int) -> torch.Tensor:
    """The keys ``kv_offset .. kv_offset + L_k`` of a 2-d padding mask, as ``[B, L_k]``
    (positions past its end are padding, as transformers' ``prepare_padding_mask`` pads)."""
    keep = attention_mask[:, kv_offset : kv_offset + L_k]
    if keep.shape[1] < L_k:
        keep = torch.nn.functional.pad(keep, (0, L_k - keep.shape[1]), value=False)
    return keep.expand(B, L_k)


class _Context:
    __slots__ = ("B", "L_q", "L_k", "q_offset", "kv_offset")

    def __init__(self, B, L_q, L_k, q_offset, kv_offset):
        self.B, self.L_q, self.L_k, self.q_offset, self.kv_offset = B, L_q, L_k, q_offset, kv_offset


class _Conj:
    """A conjunction maskattn states analytically, in local indices (query ``i``, key ``j``):
    ``lo ≤ j − i ≤ hi`` (``None`` = unbounded), key keep ``[B, L_k]``, document ids ``[B, L]``.

    ``positions`` records position ids a remapped function read: remapping is exact here
    only inside documents built from the same position ids (positions then run on by one,
    so ``pos[q] − pos[kv] = q − kv``), which ``documents_match_positions`` checks.
    """

    __slots__ = ("lo", "hi", "keep", "docs", "relative", "positions")

    def __init__(self, lo=None, hi=None, keep=None, docs=None, relative=True, positions=None):
        self.lo, self.hi, self.keep, self.docs = lo, hi, keep, docs
        self.relative, self.positions = relative, positions

    def and_(self, other: "_Conj") -> Optional["_Conj"]:
        if self.docs is not None and other.docs is not None:
            return None
        if self.positions is not None and other.positions is not None:
            return None
        lo = self.lo if other.lo is None else other.lo if self.lo is None else max(self.lo, other.lo)
        hi = self.hi if other.hi is None else other.hi if self.hi is None else min(self.hi, other.hi)
        keep = self.keep if other.keep is None else other.keep if self.keep is None else self.keep & other.keep
        docs = self.docs if other.docs is None else other.docs
        positions = self.positions if other.positions is None else other.positions
        return _Conj(lo, hi, keep, docs, self.relative and other.relative, positions)

    def documents_match_positions(self) -> bool:
        if self.docs is None:
            return False
        pos = self.positions.expand(self.docs.shape[0], -1)
        return pos.shape == self.docs.shape and torch.equal(_documents_of_positions(pos), _renumber(self.docs))

    def to_mask(self, L_q: int, L_k: int) -> Tuple[Mask, str]:
        parts = []
        band = _band(self.lo, self.hi, L_q, L_k)
        if band is not None:
            parts.append(band)
        if self.keep is not None:
            keep = _keep(self.keep)
            if keep is not None:
                parts.append(keep)
        if self.docs is not None:
            parts.append(_masks.documents(self.docs))
        if not parts:
            parts.append(_masks.full())
        mask = parts[0]
        for p in parts[1:]:
            mask = mask & p
        return mask, f"analytic {mask!r}"


def _band(lo: Optional[int], hi: Optional[int], L_q: int, L_k: int) -> Optional[Mask]:
    """``lo ≤ j − i ≤ hi`` as maskattn masks, whose bands are aligned bottom-right:
    ``window(left, right)`` allows ``s − left ≤ j − i ≤ s + right`` with ``s = L_k − L_q``."""
    s = L_k - L_q
    big = L_k + L_q  # wider than any j − i of the call
    if lo is not None and lo <= -(L_q - 1):
        lo = None
    if hi is not None and hi >= L_k - 1:
        hi = None
    if lo is None and hi is None:
        return None
    if lo is not None and hi is not None and lo > hi:
        return ~_masks.full()
    if lo is None and hi == s:
        return _masks.causal()
    if lo is None and hi == 0:
        return _masks.causal_top_left()
    if (lo is None or lo <= s) and (hi is None or hi >= s):
        return _masks.window(big if lo is None else s - lo, big if hi is None else hi - s)
    # The band lies off the aligned diagonal: bound each side on its own (a side beyond the
    # diagonal is the complement of a window on the other side).
    parts = []
    if hi is not None:
        parts.append(_masks.window(big, hi - s) if hi >= s else ~_masks.window(s - hi - 1, big))
    if lo is not None:
        parts.append(_masks.window(s - lo, big) if lo <= s else ~_masks.window(big, lo - 1 - s))
    return parts[0] if len(parts) == 1 else parts[0] & parts[1]


def _keep(keep: torch.Tensor) -> Optional[Mask]:
    """Key padding ``[B, L_k]`` (``True`` = a real key). One run of real keys per row — right
    or left padding, or both — is stated with lengths; anything else as a keep vector."""
    if bool(keep.all()):
        return None
    B, L_k = keep.shape
    any_ = keep.any(dim=1)
    k = keep.to(torch.int8)
    start = torch.where(any_, k.argmax(dim=1), torch.full((B,), L_k))
    end = torch.where(any_, L_k - k.flip(1).argmax(dim=1), torch.zeros(B, dtype=torch.long))
    if torch.equal(keep.sum(dim=1), (end - start).clamp(min=0)):
        parts = []
        if bool((end < L_k).any()):
            parts.append(_masks.key_padding(end))
        if bool((start > 0).any()):
            parts.append(~_masks.key_padding(start))
        return parts[0] if len(parts) == 1 else parts[0] & parts[1]
    return _masks._key_keep(keep.contiguous())


def _documents_of_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document ids from position ids, as transformers' ``find_packed_sequence_indices``: a
    new document starts wherever the position does not run on by one."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def _renumber(ids: torch.Tensor) -> torch.Tensor:
    """Document ids renumbered 0, 1, 2 … along each row (a new id wherever it changes)."""
    return (torch.diff(ids, prepend=ids[:, :1], dim=-1) != 0).cumsum(-1)


def _documents_of_cu_seq_lens(cu_q: torch.Tensor, cu_k: Optional[torch.Tensor], B: int, L: int) -> torch.Tensor:
    """``[1, L]`` document ids from FlashAttention-style cumulative lengths."""
    cu = cu_q.to("cpu", torch.long).flatten()
    if cu_k is not None and not torch.equal(cu, cu_k.to("cpu", torch.long).flatten()):
        raise NotImplementedError("cu_seq_lens_k differs from cu_seq_lens_q: maskattn takes one packing for both")
    if B != 1:
        raise ValueError(f"cu_seq_lens_q describes one packed row, but the batch has {B} rows")
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != L or bool((cu.diff() < 0).any()):
        raise ValueError(f"cu_seq_lens_q must rise from 0 to the sequence length {L}, got {cu.tolist()}")
    return torch.bucketize(torch.arange(L), cu[1:], right=True).unsqueeze(0)


_CODES: Optional[Dict[object, str]] = None


def _codes() -> Dict[object, str]:
    """transformers' mask building blocks, by code object: closures made by one factory share
    it, so a function is recognised by what it is, not by its name. A block this version of
    transformers lacks is simply not recognised (and falls back to dense evaluation)."""
    global _CODES
    if _CODES is not None:
        return _CODES
    from transformers import masking_utils as mu

    table: Dict[object, str] = {}
    one = torch.ones(1, 1, dtype=torch.bool)
    zero = torch.zeros(1, 1, dtype=torch.long)
    makers = {
        "causal": lambda: mu.causal_mask_function,
        "bidirectional": lambda: mu.bidirectional_mask_function,
        "sliding": lambda: mu.sliding_window_overlay(1),
        "sliding_bidirectional": lambda: mu.sliding_window_bidirectional_overlay(1),
        "padding": lambda: mu.padding_mask_function(one),
        "packed": lambda: mu.packed_sequence_mask_function(zero),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, zero),
        "and": lambda: mu.and_masks(mu.causal_mask_function),
        "or": lambda: mu.or_masks(mu.causal_mask_function),
    }
    for kind, make in makers.items():
        try:
            table[make().__code__] = kind
        except (AttributeError, TypeError):
            pass
    _CODES = table
    return table


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _translate(fn, ctx: _Context) -> Optional[_Conj]:
    """``fn`` (absolute positions) as a conjunction in local indices, or ``None``."""
    if fn is None:
        kind, env = "causal", {}
    else:
        kind = _codes().get(getattr(fn, "__code__", None))
        if kind is None:
            return None
        env = _closure(fn)
    # Absolute positions: q = i + q_offset, kv = j + kv_offset, so kv − q = (j − i) − d.
    d = ctx.q_offset - ctx.kv_offset
    if kind == "causal":  # kv ≤ q
        return _Conj(hi=d)
    if kind == "bidirectional":  # q ≥ 0
        return _Conj()
    if kind == "sliding":  # kv > q − w
        return _Conj(lo=d - int(env["sliding_window"]) + 1)
    if kind == "sliding_bidirectional":  # |q − kv| ≤ w
        w = int(env["sliding_window"])
        return _Conj(lo=d - w, hi=d + w)
    if kind == "padding":
        pm = env["padding_mask"]
        if not isinstance(pm, torch.Tensor) or pm.dim() != 2:
            return None
        return _Conj(keep=_local_keep(pm.to(torch.bool), ctx.B, ctx.L_k, ctx.kv_offset))
    if kind == "packed":
        ids = env["packed_sequence_mask"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        if ctx.q_offset or ctx.kv_offset or not (ctx.L_q == ctx.L_k == ids.shape[1]):
            return None
        return _Conj(docs=ids.expand(ctx.B, -1))
    if kind == "remap":
        inner = _translate(env["mask_function"], ctx)
        pos = env["position_ids"]
        if inner is None or not inner.relative or inner.keep is not None or inner.docs is not None:
            return None
        if inner.positions is not None or not isinstance(pos, torch.Tensor) or pos.dim() != 2:
            return None
        if ctx.q_offset or ctx.kv_offset:
            return None
        return _Conj(inner.lo, inner.hi, positions=pos)
    if kind in ("and", "or"):
        fns = env["mask_functions"]
        if kind == "or" and len(fns) != 1:
            return None
        conj = _Conj()
        for f in fns:
            part = _translate(f, ctx)
            if part is None:
                return None
            conj = conj.and_(part)
            if conj is None:
                return None
        return conj
    return None


# ---------------------------------------------------------------------------------------
# The attention function.

_UNSUPPORTED = {
    # Inkling 2 passes a logit per query row (computed from the hidden states); maskattn's
    # sinks are one learnable logit per head, as GPT-OSS's `s_aux`.
    "sinks": "per-token attention sinks",
}


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    **kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' ``AttentionInterface`` entry for ``"maskattn"``.

    ``query [B, H_q, L_q, d]``, ``key, value [B, H_kv, L_k, d]`` (``H_kv`` divides ``H_q``;
    heads are not repeated). ``attention_mask`` is what :func:`mask_interface` built (the
    layer type's mask, authoritative as in SDPA), ``None`` (causal per ``is_causal`` /
    the module's ``is_causal``, as SDPA, within ``sliding_window`` if given), or a 4-d
    boolean or float tensor (an additive float mask: its finite values are added to the
    scores as maskattn's ``bias``, its ``-inf`` / dtype-minimum entries mask). Packed
    documents read from ``cu_seq_lens_q/k`` or from ``position_ids`` restarts are enforced
    here even where a cache object kept transformers from seeing them.

    Score modifiers, as transformers' eager attention applies them: ``softcap`` (Gemma 2:
    ``c·tanh(z/c)`` of the scaled scores, before the mask), ``s_aux`` (GPT-OSS: one logit per
    query head joining every row's softmax, dropped after it — maskattn's ``sinks``, with
    their gradient), ``position_bias`` (T5: added to the scores — maskattn's ``bias``, with
    the gradient reaching ``relative_attention_bias``). Returns ``([B, L_q, H_q, d]``
    contiguous, ``None)``.

    ``dropout`` (transformers passes the module's attention dropout while training): the
    kernels' dropout, its pattern regenerated in the backward. ``output_attentions``
    (the call's keyword or the config's): the weights are returned as the second value,
    computed from the kernels' LSE (:func:`_weights`), else ``None``.

    Not supported, a ``NotImplementedError`` naming the argument: per-token ``sinks``.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation='maskattn' does not support `{name}` ({what}) yet; "
                "use attn_implementation='eager' for this model"
            )
    # transformers passes the module's attention dropout while training and 0 otherwise.
    drop_p, drop_seed = _dropout(dropout)
    config = getattr(module, "config", None)
    want_weights = bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, L, d]")
    B, H_q, L_q, _ = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"query has batch {B} but key/value have {key.shape[0]}/{value.shape[0]}")
    if H_q % key.shape[1] != 0:
        raise ValueError(f"key/value heads ({key.shape[1]}) must divide query heads ({H_q})")
    L_k = key.shape[2]

    mask, mask_bias = _layer_mask(module, attention_mask, B, H_q, L_q, L_k, is_causal, sliding_window, kwargs)
    bias = _bias(kwargs.get("position_bias"), mask_bias, B, H_q, L_q, L_k)
    softcap, sinks = _softcap(kwargs.get("softcap")), _sinks(kwargs.get("s_aux"), H_q)
    out, lse = _attention(
        query,
        key,
        value,
        mask,
        scale=scaling,
        softcap=softcap,
        sinks=sinks,
        bias=bias,
        dropout_p=drop_p,
        dropout_seed=drop_seed,
        return_lse=True,
    )
    weights = None
    if want_weights:
        mods = (softcap, None, sinks, bias, None, [0, 0])
        weights = _weights(query, key, lse, mask, scaling, mods, (drop_p, drop_seed))
    return out.transpose(1, 2).contiguous(), weights


def _dropout(dropout) -> Tuple[float, Optional[int]]:
    """transformers' ``dropout`` as ``(p, seed)``: the seed drawn here from torch's generator
    (``torch.manual_seed`` reproduces a run), so that returned weights can show the same
    pattern."""
    if dropout is None:
        return 0.0, None
    try:
        p = float(dropout)
    except (TypeError, ValueError):
        raise TypeError(f"dropout must be a probability in [0, 1), got {dropout!r}") from None
    if p == 0.0:
        return 0.0, None
    return _ops._dropout(p, None)


def _weights(query, key, lse, mask, scaling, mods, drop) -> torch.Tensor:
    """The attention weights ``[B, H_q, L_q, L_k]`` transformers returns with
    ``output_attentions``, from the kernels' LSE: ``P = exp(x − LSE)`` with ``x`` the scores
    with every modifier (a sink's share is left out, as GPT-OSS's eager attention drops its
    column), 0 where the mask hides; after dropout (kept weights scaled by ``1/(1 − p)``) as
    transformers' eager attention returns them. Differentiable (through ``x`` and the LSE);
    ``L_q × L_k`` memory per layer, as eager's."""
    B, H_q, L_q, _ = query.shape
    L_k = key.shape[2]
    mask_id, data = _masks._handle(mask)
    shape = (B, H_q, L_q, L_k)
    allowed = _ops._allowed(mask_id, data, shape)
    scale = 1.0 / math.sqrt(query.shape[3]) if scaling is None else float(scaling)
    x = _ops._scores(query, key, allowed, scale, mods)
    finite = torch.isfinite(lse)
    p = torch.exp(x - torch.where(finite, lse, torch.zeros(())).unsqueeze(-1))
    p = torch.where(allowed & finite.unsqueeze(-1), p, torch.zeros(()))
    if drop[0]:
        p = p * _ops.dropout_keep(drop[0], drop[1], shape) / (1.0 - drop[0])
    return p.to(query.dtype)


def _softcap(softcap) -> Optional[float]:
    if softcap is None:
        return None
    try:
        c = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a positive number, got {softcap!r}") from None
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be positive and finite, got {softcap!r}")
    return c


def _sinks(s_aux, H_q: int) -> Optional[torch.Tensor]:
    """GPT-OSS's ``s_aux``: one logit per query head (``module.sinks``, ``[H_q]``), taken as it
    is so that its gradient reaches the parameter."""
    if s_aux is None:
        return None
    if not isinstance(s_aux, torch.Tensor) or not s_aux.is_floating_point():
        raise TypeError(
            f"s_aux must be a floating-point tensor of one logit per query head, got {type(s_aux).__name__}"
        )
    if tuple(s_aux.shape) != (H_q,):
        raise NotImplementedError(
            f"attn_implementation='maskattn' takes `s_aux` as one sink logit per query head, shape [{H_q}]; "
            f"got {list(s_aux.shape)}"
        )
    return s_aux


def _bias(position_bias, mask_bias, B: int, H_q: int, L_q: int, L_k: int) -> Optional[torch.Tensor]:
    """T5's ``position_bias`` plus an additive float mask's finite part, as maskattn's ``bias``
    (broadcasting to ``[B, H_q, L_q, L_k]``). A bias of zeros that needs no gradient (T5's
    cross attention passes one) is left out: the kernels then skip reading it."""
    if position_bias is not None:
        if not isinstance(position_bias, torch.Tensor) or not position_bias.is_floating_point():
            raise TypeError(f"position_bias must be a floating-point tensor, got {type(position_bias).__name__}")
        want = (B, H_q, L_q, L_k)
        shape = (1,) * (4 - position_bias.dim()) + tuple(position_bias.shape)
        if position_bias.dim() > 4 or any(n not in (1, w) for n, w in zip(shape, want)):
            raise ValueError(
                f"position_bias of shape {list(position_bias.shape)} does not broadcast to "
                f"[B, H_q, L_q, L_k] = {list(want)}"
            )
        if not position_bias.requires_grad and not bool(position_bias.any()):
            position_bias = None
    if position_bias is None:
        return mask_bias
    if mask_bias is None:
        return position_bias
    return position_bias + mask_bias


def _layer_mask(module, attention_mask, B, H_q, L_q, L_k, is_causal, sliding_window, kwargs):
    """The layer's mask for maskattn, and the additive part of a float mask (or ``None``)."""
    if isinstance(attention_mask, TransformersMask):
        m = attention_mask
        if (m.batch_size, m.q_length, m.kv_length) != (B, L_q, L_k):
            raise ValueError(
                f"the mask was built for (B, L_q, L_k) = {(m.batch_size, m.q_length, m.kv_length)}, "
                f"but the layer's attention has {(B, L_q, L_k)}"
            )
        docs = None
        if not m.has_documents:
            docs = _late_documents(m, kwargs, B, L_q, L_k)
        return m.block(H_q, docs), None
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal:
            if sliding_window is not None:
                raise NotImplementedError("sliding_window without a mask on a non-causal layer is not supported")
            return None, None
        # As SDPA: a single query sees every key; otherwise `is_causal`'s top-left alignment
        # (transformers leaves the mask out only with L_q = L_k or an empty static cache).
        # `sliding_window` as transformers' mask functions state it: kv > q − w.
        if L_q == 1:
            lo = None if sliding_window is None else L_k - int(sliding_window)
            return _band(lo, None, L_q, L_k), None
        lo = None if sliding_window is None else 1 - int(sliding_window)
        return _band(lo, 0, L_q, L_k), None
    if isinstance(attention_mask, (Mask, BlockMask)):
        return attention_mask, None
    if isinstance(attention_mask, torch.Tensor):
        allowed, additive = _tensor_mask(attention_mask, L_k)
        return _masks.dense(allowed), additive
    raise TypeError(
        f"attention_mask of type {type(attention_mask).__name__} is not understood by attn_implementation='maskattn'"
    )


def _tensor_mask(mask: torch.Tensor, L_k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A 4-d mask a model or user built itself (keys cut to ``L_k`` as transformers' eager
    attention does), as booleans and, for a float mask with other values than 0 and the
    masking value, the additive rest (``None`` otherwise).

    A float mask's ``-inf`` / dtype-minimum entries (≤ half the minimum) become masked pairs
    rather than huge biases, so a row that sees nothing gives 0, not an average of its values;
    the others are added to the scores with their gradient."""
    if mask.dim() != 4:
        raise ValueError(f"attention_mask: expected a 4-d mask [B|1, H|1, L_q, L_k], got {tuple(mask.shape)}")
    mask = mask[..., :L_k]
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask: expected bool or float, got {mask.dtype}")
    if bool((torch.isnan(mask) | torch.isposinf(mask)).any()):
        raise ValueError("attention_mask holds NaN or +inf")
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    additive = mask.masked_fill(hidden, 0.0)
    if not additive.requires_grad and not bool(additive.any()):
        additive = None
    return ~hidden, additive


def _late_documents(m: TransformersMask, kwargs, B: int, L_q: int, L_k: int) -> Optional[torch.Tensor]:
    """Packed documents transformers did not put in the mask: given as ``cu_seq_lens_q/k``, or
    as ``position_ids`` restarts with a cache object present (transformers reads packing from
    ``position_ids`` only without one, e.g. not in training with the default ``use_cache``)."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if L_q != L_k:
            raise NotImplementedError("cu_seq_lens_q with keys of another length (a cache) is not supported")
        ids = m.late_documents(cu_q, lambda t: _documents_of_cu_seq_lens(t, kwargs.get("cu_seq_lens_k"), B, L_q))
    else:
        pos = kwargs.get("position_ids")
        # As transformers' own detection: only without a 2-d padding mask (left padding also
        # restarts positions) and with nothing cached before these tokens.
        if pos is None or m.padded or L_q != L_k or m.q_offset or m.kv_offset:
            return None
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != L_q:
            return None
        ids = m.late_documents(pos, lambda t: _documents_of_positions(t.expand(B, -1)))
    if ids is None or not bool((ids[:, -1] != ids[:, 0]).any()):
        return None
    if not m.relative:
        raise NotImplementedError(
            f"packed documents (from position_ids / cu_seq_lens) on top of this mask ({m.description}) "
            "are not supported: pass the batch without a cache (use_cache=False) so transformers builds "
            "the documents into the mask"
        )
    return ids
