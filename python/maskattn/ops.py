"""``maskattn.attention``: the fused kernels as ``torch.library`` custom ops with autograd.

Two ops, ``maskattn::attention_fwd`` and ``maskattn::attention_bwd``, each with a fake
(meta) implementation, so ``torch.compile(fullgraph=True)`` traces through them without a
graph break, and ``register_autograd`` wires the fused backward in.

Tensors cross into Rust as raw parts — data pointer, shape, strides, dtype — and are read
in place: a transposed ``[B, L, H, d]`` view is not copied. The kernels write float32
results into buffers allocated here with torch; a bf16 or f16 call's ``out`` is rounded to
its input dtype afterwards (so autograd hands the backward a float32 ``dout``).

Second-order and forward-mode autograd (``create_graph=True``, ``hessian``, dual tensors,
``torch.func`` transforms) run the same attention as differentiable torch ops — exact, but
with the ``[B, H_q, L_q, L_k]`` score matrix in memory (O(L²)), where the fused kernels
keep O(L). Plain first-order training never takes that path.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch

from . import _maskattn as _native
from .masks import BlockMask, Mask, _blocks, _handle, _resolve

__all__ = ["attention", "RelativeBias"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_F32_MAX = torch.finfo(torch.float32).max
_F32 = torch.float32


def _raw(t: torch.Tensor) -> tuple:
    """``(data_ptr, shape, strides, dtype code)`` of a 4-d CPU tensor, read in place by Rust
    (which reads the ``torch.Size`` as the sequence it is: no tuple is built per call)."""
    return (t.data_ptr(), t.shape, t.stride(), _DTYPES[t.dtype])


def _raw_out(t: torch.Tensor) -> tuple:
    """``(data_ptr, numel)`` of a freshly allocated contiguous float32 tensor."""
    return (t.data_ptr(), t.numel())


def _raw_opt(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """:func:`_raw_out` of an optional tensor."""
    return None if t is None else _raw_out(t)


def _shape(q: torch.Tensor, k: torch.Tensor) -> Tuple[int, int, int, int]:
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` with PyTorch's lazy negation and conjugation bits applied: Rust reads the
    memory, and a tensor such as ``z.conj().imag`` (or a ``dout`` autograd produces through
    complex ops) holds the negated values there. A no-op (the same tensor) otherwise."""
    return t.resolve_neg().resolve_conj()


def _allowed(mask_id: int, mask_data: List[torch.Tensor], shape) -> torch.Tensor:
    """The mask as a dense bool tensor ``[B, H_q, L_q, L_k]`` (O(L²) memory)."""
    # Built outside any torch.func transform: a tensor made inside one is a wrapper
    # without storage, and the mask is a constant of the transformed function anyway.
    with torch._C._DisableFuncTorch():
        block = _resolve(mask_id, mask_data, shape)
        allowed = torch.empty(shape, dtype=torch.bool)
        _native.allowed(block, (allowed.data_ptr(), allowed.numel()))
    return allowed


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    """k or v ``[B, H_kv, L_k, d]`` repeated to the query heads (grouped-query)."""
    return t if t.shape[1] == hq else t.repeat_interleave(hq // t.shape[1], dim=1)


class RelativeBias(NamedTuple):
    """T5's learned relative-position bias: ``table [num_buckets, H_q]`` (Hugging Face's
    ``relative_attention_bias.weight``), the bucket of key ``j`` for the aligned query
    position ``i' = i + L_k − L_q`` being T5's ``_relative_position_bucket(j − i',
    bidirectional, num_buckets, max_distance)``."""

    table: torch.Tensor
    max_distance: int = 128
    bidirectional: bool = True


# The score modifiers as the ops take them: ``(softcap, alibi, sinks, bias, rel, rel_cfg)``
# with ``rel_cfg = [max_distance, bidirectional]`` ([0, 0] without a T5 table).
_NO_MODS = (None, None, None, None, None, [0, 0])


def _t5_buckets(lq: int, lk: int, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """``[L_q, L_k]`` bucket indices, as Hugging Face T5 computes them (float32 log)."""
    rel = torch.arange(lk).view(1, lk) - (torch.arange(lq).view(lq, 1) + (lk - lq))
    n = num_buckets
    bucket = torch.zeros_like(rel)
    if bidirectional:
        n //= 2
        bucket = bucket + (rel > 0).long() * n
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = n // 2
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=n - 1)
    return bucket + torch.where(rel < max_exact, rel, large)


def _scores(q, k, allowed, scale, mods):
    """``x``: the masked scores ``[B, H_q, L_q, L_k]`` in float32 with every modifier
    (docs/design.md section 1), as differentiable torch ops; −∞ where the mask hides."""
    softcap, alibi, _sinks, bias, rel, rel_cfg = mods
    s = torch.matmul(q.float(), _expand_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = s.shape[-2], s.shape[-1]
    if bias is not None:
        s = s + bias.float()
    if alibi is not None:
        dist = (torch.arange(lk).view(1, lk) - (torch.arange(lq).view(lq, 1) + (lk - lq))).abs()
        s = s - alibi.float().view(-1, 1, 1) * dist.float()
    if rel is not None:
        b = _t5_buckets(lq, lk, rel.shape[0], rel_cfg[0], bool(rel_cfg[1]))
        s = s + rel.float()[b].permute(2, 0, 1)
    return torch.where(allowed, s, torch.full((), -math.inf))


def _probs(q, k, allowed, scale, mods=_NO_MODS):
    """``(P, lse)`` in float32 with differentiable torch ops: the masked softmax of the
    scores (sinks joining each row's sum); a row that sees nothing has P = 0 and LSE −∞
    (or the sink), with no NaN on the way, nor in any derivative."""
    s = _scores(q, k, allowed, scale, mods)
    sinks = mods[2]
    m = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(s.shape[:-1] + (1,))
    if sinks is not None:
        sk = sinks.float().view(-1, 1, 1).expand(m.shape)
        m = torch.maximum(m, sk.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros(()))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        l = l + torch.exp(sk - m)
    seen = l > 0
    p = p / torch.where(seen, l, torch.ones(()))
    lse = torch.where(seen, torch.log(torch.where(seen, l, torch.ones(()))) + m, torch.full((), -math.inf))
    return p, lse.squeeze(-1)


def _torch_attention(q, k, v, allowed, scale, mods=_NO_MODS):
    """``(out float32, lse)``: the kernels' result as differentiable torch ops, for
    ``torch.func`` transforms (grad, jvp, vmap, hessian) and every order of derivative."""
    p, lse = _probs(q, k, allowed, scale, mods)
    return torch.matmul(p, _expand_kv(v, q.shape[1]).float()), lse


def _sum_groups(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """A gradient over the query heads ``[B, H_q, …]`` summed back to ``H_kv`` heads."""
    B, hq = g.shape[:2]
    return g if hq == hkv else g.reshape(B, hkv, hq // hkv, *g.shape[2:]).sum(2)


def _torch_backward(q, k, v, dout, allowed, scale):
    """``(dq, dk, dv)`` float32 as differentiable torch ops of q, k, v and dout: the
    backward that ``create_graph=True`` differentiates again (gradient penalties, Hessians)."""
    p, _ = _probs(q, k, allowed, scale)
    hq, hkv = q.shape[1], k.shape[1]
    dout = dout.float()
    ve = _expand_kv(v, hq).float()
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, ve.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, _expand_kv(k, hq).float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    return dq, _sum_groups(dk, hkv), _sum_groups(dv, hkv)


def _torch_jvp(q, k, v, tq, tk, tv, allowed, scale):
    """Tangents ``(d out, d lse)`` float32 of the attention at q, k, v along tq, tk, tv
    (None: a zero tangent), for forward-mode autograd."""
    p, _ = _probs(q, k, allowed, scale)
    hq = q.shape[1]
    ke, ve = _expand_kv(k, hq).float(), _expand_kv(v, hq).float()
    ds = torch.zeros_like(p)
    if tq is not None:
        ds = ds + torch.matmul(_plain(tq).float(), ke.transpose(-1, -2)) * scale
    if tk is not None:
        ds = ds + torch.matmul(q.float(), _expand_kv(_plain(tk), hq).float().transpose(-1, -2)) * scale
    dlse = (p * ds).sum(dim=-1, keepdim=True)
    dout = torch.matmul(p * (ds - dlse), ve)
    if tv is not None:
        dout = dout + torch.matmul(p, _expand_kv(_plain(tv), hq).float())
    return dout, dlse.squeeze(-1)


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A modifier's parameter as the kernels read it: contiguous float32 (no copy when it
    already is one)."""
    return None if t is None else _plain(t).to(torch.float32).contiguous()


def _native_mods(softcap, alibi, sinks, bias, rel, rel_cfg, dropout_p=0.0, dropout_seed=0) -> tuple:
    """The ``Mods`` tuple the native module takes, from contiguous float32 tensors (which
    the caller holds for the call)."""
    return (
        softcap,
        _raw_opt(alibi),
        _raw_opt(sinks),
        None if bias is None else (_raw_out(bias), tuple(bias.shape)),
        None if rel is None else (_raw_out(rel), rel.shape[0], int(rel_cfg[0]), bool(rel_cfg[1])),
        (float(dropout_p), int(dropout_seed)) if dropout_p else None,
    )


# `_native_mods` of a call without modifiers or dropout.
_NATIVE_NO_MODS = (None,) * 6


def _forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_id: int,
    mask_data: List[torch.Tensor],
    scale: float,
    softcap: Optional[float] = None,
    alibi: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    rel: Optional[torch.Tensor] = None,
    rel_cfg: Optional[List[int]] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    block = _resolve(mask_id, mask_data, _shape(q, k))
    q, k, v = _plain(q), _plain(k), _plain(v)
    return _forward_native(q, k, v, block, scale, softcap, alibi, sinks, bias, rel, rel_cfg, dropout_p, dropout_seed)


def _forward_native(q, k, v, block, scale, softcap, alibi, sinks, bias, rel, rel_cfg, dropout_p, dropout_seed):
    """``(out, lse)`` float32 from the fused forward on a compiled (native) block mask, for
    q, k, v without lazy sign bits (:func:`_plain`)."""
    if alibi is None and sinks is None and bias is None and rel is None and softcap is None and not dropout_p:
        mods = _NATIVE_NO_MODS
    else:
        alibi, sinks, bias, rel = _f32(alibi), _f32(sinks), _f32(bias), _f32(rel)
        mods = _native_mods(softcap, alibi, sinks, bias, rel, rel_cfg, dropout_p, dropout_seed)
    B, H, L, _ = q.shape
    # Sizes as separate ints: torch parses them faster than a tuple (a decode step's
    # calls are this small).
    out = torch.empty(B, H, L, v.shape[3], dtype=_F32)
    lse = torch.empty(B, H, L, dtype=_F32)
    _native.forward((_raw(q), _raw(k), _raw(v)), block, scale, mods, ((out.data_ptr(), out.numel()), (lse.data_ptr(), lse.numel())))
    return out, lse


_attention_fwd = torch.library.custom_op("maskattn::attention_fwd", mutates_args=(), device_types="cpu")(
    _forward_impl
)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask_id, mask_data, scale, softcap=None, alibi=None, sinks=None, bias=None, rel=None, rel_cfg=None, dropout_p=0.0, dropout_seed=0):
    B, H, L, _ = q.shape
    out = q.new_empty((B, H, L, v.shape[3]), dtype=torch.float32)
    return out, q.new_empty((B, H, L), dtype=torch.float32)


def _backward_native(q, k, v, out, lse, dout, dlse, mask_id, mask_data, scale, mods, want, drop=(0.0, 0), block=None):
    """``(dq, dk, dv, [dalibi, dsinks, dbias, drel])`` float32 from the fused backward; a
    parameter gradient that ``want`` (alibi, sinks, bias, rel) does not ask for is None.
    ``block``: the forward's compiled mask, kept by the eager path (whose q, k, v are
    already without lazy bits); else compiled again here."""
    softcap, alibi, sinks, bias, rel, rel_cfg = mods
    if block is None:
        q, k, v = _plain(q), _plain(k), _plain(v)
        block = _resolve(mask_id, mask_data, _shape(q, k))
    # Resolved before the cast: `.to` keeps a float32 tensor as it is, lazy bit and all.
    dout = _plain(dout).to(torch.float32)
    if dlse is not None:
        dlse = _plain(dlse).to(torch.float32).contiguous()
    lse = lse.contiguous()
    # The kernels overwrite every value of the gradient buffers: no zero fill here.
    dq = torch.empty(*q.shape, dtype=_F32)
    dk = torch.empty(*k.shape, dtype=_F32)
    dv = torch.empty(*v.shape, dtype=_F32)
    if alibi is None and sinks is None and bias is None and rel is None and softcap is None and not drop[0]:
        pgrads = [None] * 4
        native_mods = _NATIVE_NO_MODS
    else:
        alibi, sinks, bias, rel = _f32(alibi), _f32(sinks), _f32(bias), _f32(rel)
        pgrads = [
            torch.empty(t.shape, dtype=torch.float32) if (t is not None and w) else None
            for t, w in zip((alibi, sinks, bias, rel), want or (False,) * 4)
        ]
        native_mods = _native_mods(softcap, alibi, sinks, bias, rel, rel_cfg, *drop)
    _native.backward(
        (_raw(q), _raw(k), _raw(v)),
        (_raw(out), _raw_out(lse), _raw(dout)),
        block,
        scale,
        native_mods,
        (_raw_out(dq), _raw_out(dk), _raw_out(dv)),
        (_raw_opt(pgrads[2]), _raw_opt(pgrads[0]), _raw_opt(pgrads[1]), _raw_opt(pgrads[3])),
        None if dlse is None else _raw_out(dlse),
    )
    return dq, dk, dv, pgrads


def _backward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    mask_id: int,
    mask_data: List[torch.Tensor],
    scale: float,
    softcap: Optional[float] = None,
    alibi: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    rel: Optional[torch.Tensor] = None,
    rel_cfg: Optional[List[int]] = None,
    want: Optional[List[bool]] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dalibi, dsinks, dbias, drel)`` float32; a parameter gradient that
    ``want`` (alibi, sinks, bias, rel) does not ask for is an empty tensor (an op cannot
    return None)."""
    mods = (softcap, alibi, sinks, bias, rel, rel_cfg)
    dq, dk, dv, pgrads = _backward_native(
        q, k, v, out, lse, dout, dlse, mask_id, mask_data, scale, mods, want, (dropout_p, dropout_seed)
    )
    return (dq, dk, dv, *(torch.empty(0) if g is None else g for g in pgrads))


_attention_bwd = torch.library.custom_op("maskattn::attention_bwd", mutates_args=(), device_types="cpu")(
    _backward_impl
)


@_attention_bwd.register_fake
def _attention_bwd_fake(q, k, v, out, lse, dout, dlse, mask_id, mask_data, scale, softcap=None, alibi=None, sinks=None, bias=None, rel=None, rel_cfg=None, want=None, dropout_p=0.0, dropout_seed=0):
    f32 = torch.float32
    pgrads = [
        q.new_empty(t.shape, dtype=f32) if (t is not None and w) else q.new_empty((0,), dtype=f32)
        for t, w in zip((alibi, sinks, bias, rel), want or (False,) * 4)
    ]
    return (q.new_empty(q.shape, dtype=f32), k.new_empty(k.shape, dtype=f32), v.new_empty(v.shape, dtype=f32), *pgrads)


def _cast_grads(dq, dk, dv, pgrads, q, k, v, params):
    """The gradients in their inputs' dtypes, ``None`` for a parameter that has none."""
    if q.dtype == torch.float32 and pgrads == [None] * 4:
        return [dq, dk, dv, None, None, None, None]
    out = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    for g, t in zip(pgrads, params):
        out.append(None if (t is None or g is None or g.numel() == 0 and t.numel() != 0) else g.to(t.dtype))
    return out


def _setup_context(ctx, inputs, output):
    q, k, v, mask_id, mask_data, scale, softcap, alibi, sinks, bias, rel, rel_cfg, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi, sinks, bias, rel, *mask_data)
    ctx.mask_id, ctx.scale, ctx.softcap, ctx.rel_cfg = mask_id, scale, softcap, rel_cfg
    ctx.drop = (dropout_p, dropout_seed)
    # A BlockMask is registered weakly; the backward must still find it.
    ctx.block = _blocks.get(mask_id) if isinstance(mask_id, int) else None


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi, sinks, bias, rel, *mask_data = ctx.saved_tensors
    params = (alibi, sinks, bias, rel)
    want = [t is not None and ctx.needs_input_grad[i] for i, t in zip((7, 8, 9, 10), params)]
    dq, dk, dv, *pgrads = _attention_bwd(
        q, k, v, out, lse, dout, dlse, ctx.mask_id, mask_data, ctx.scale, ctx.softcap, *params, ctx.rel_cfg, want, *ctx.drop
    )
    dq, dk, dv, da, ds, db, dr = _cast_grads(dq, dk, dv, pgrads, q, k, v, params)
    no_grads = [None] * len(mask_data)
    return dq, dk, dv, None, no_grads, None, None, da, ds, db, dr, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the ops' autograd, for plain eager calls.

    The custom op's Python dispatch (schema defaults, pytree flattening) costs more than
    the kernel at small shapes; outside torch.compile, on plain tensors, the same two
    functions run behind this autograd.Function instead (tested to agree with the op).

    A backward run with ``create_graph=True`` (grad mode on inside it) and forward-mode
    autograd (``jvp``) use the differentiable torch formulation instead of the fused kernel.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask_id, scale, mods, alibi, sinks, bias, rel, *mask_data):
        softcap, rel_cfg, *drop = mods
        # Kept for the backward: a mask with tensors (padding, documents) would otherwise
        # be compiled twice per step. Autograd's saved-tensor check below still rejects a
        # mask tensor modified in place in between.
        native = _resolve(mask_id, mask_data, _shape(q, k))
        out, lse = _forward_native(q, k, v, native, scale, softcap, alibi, sinks, bias, rel, rel_cfg, *drop)
        ctx.native = native
        ctx.save_for_backward(q, k, v, out, lse, alibi, sinks, bias, rel, *mask_data)
        if _forward_ad():
            # Only `jvp` reads these, and only inside a forward-AD level.
            ctx.save_for_forward(q, k, v, *mask_data)
        ctx.mask_id, ctx.scale, ctx.softcap, ctx.rel_cfg = mask_id, scale, softcap, rel_cfg
        ctx.has_mods = mods[:2] != (None, [0, 0]) or any(t is not None for t in (alibi, sinks, bias, rel))
        ctx.drop = tuple(drop) if drop else (0.0, 0)
        ctx.block = _blocks.get(mask_id)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, sinks, bias, rel, *mask_data = ctx.saved_tensors
        params = (alibi, sinks, bias, rel)
        if dout is None:
            dout = torch.zeros_like(out)
        if torch.is_grad_enabled() and ctx.drop[0]:
            raise NotImplementedError(
                "maskattn.attention: a differentiable backward (create_graph=True) with dropout_p > 0 "
                "is not supported"
            )
        if torch.is_grad_enabled() and (ctx.has_mods or dlse is not None):
            # create_graph=True with modifiers or an LSE gradient: the torch formulation,
            # differentiated by autograd itself (its result differentiable again).
            return _graph_backward(ctx, q, k, v, params, mask_data, dout, dlse)
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable.
            allowed = _allowed(ctx.mask_id, mask_data, _shape(q, k))
            dq, dk, dv = _torch_backward(q, k, v, _plain(dout), allowed, ctx.scale)
            pgrads = [None] * 4
        else:
            want = [t is not None and ctx.needs_input_grad[i] for i, t in zip((6, 7, 8, 9), params)]
            mods = (ctx.softcap, *params, ctx.rel_cfg)
            dq, dk, dv, pgrads = _backward_native(
                q, k, v, out, lse, dout, dlse, ctx.mask_id, mask_data, ctx.scale, mods, want, ctx.drop, ctx.native
            )
        grads = _cast_grads(dq, dk, dv, pgrads, q, k, v, params)
        return (*grads[:3], None, None, None, *grads[3:]) + (None,) * len(mask_data)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *rest):
        if ctx.has_mods or ctx.drop[0]:
            raise NotImplementedError(
                "maskattn.attention: forward-mode AD (dual tensors) with score modifiers is not "
                "supported; use torch.func.jvp"
            )
        q, k, v, *mask_data = ctx.saved_tensors
        allowed = _allowed(ctx.mask_id, mask_data, _shape(q, k))
        dout, dlse = _torch_jvp(q, k, v, tq, tk, tv, allowed, ctx.scale)
        return dout, dlse


def _graph_backward(ctx, q, k, v, params, mask_data, dout, dlse):
    """The backward as differentiable torch ops (``create_graph=True``): autograd of the
    torch formulation at the saved inputs, which carry their own graph."""
    allowed = _allowed(ctx.mask_id, mask_data, _shape(q, k))
    mods = (ctx.softcap, *params, ctx.rel_cfg)
    out, lse = _torch_attention(q, k, v, allowed, ctx.scale, mods)
    inputs = [(i, t) for i, t in enumerate((q, k, v, *params)) if t is not None and t.requires_grad]
    outs, gouts = [out], [_plain(dout).float()]
    if dlse is not None:
        outs.append(lse)
        gouts.append(torch.where(torch.isfinite(lse), _plain(dlse).float(), torch.zeros(())))
    got = torch.autograd.grad(outs, [t for _, t in inputs], gouts, create_graph=True, allow_unused=True)
    grads = [None] * 7
    for (i, t), g in zip(inputs, got):
        grads[i] = None if g is None else g.to(t.dtype)
    return (*grads[:3], None, None, None, *grads[3:]) + (None,) * len(mask_data)


def _plain_eager(*ts) -> bool:
    """True outside torch function or dispatch modes, on plain tensors (not fake, not
    subclasses, not functorch-wrapped): where the op's dispatch adds nothing but time. The
    caller has ruled out torch.compile / export (``torch.compiler.is_compiling()``)."""
    if torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() != 0:
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(type(t) is torch.Tensor and not is_wrapped(t) for t in ts)


def _functorch(*ts) -> bool:
    """True when a ``torch.func`` transform (grad, jvp, vmap, jacrev, hessian) wraps an
    input: the fused kernels cannot read such a tensor, nor carry its tangents."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(is_wrapped(t) for t in ts)


def _forward_ad() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()``: inputs may carry tangents."""
    return torch.autograd.forward_ad._current_level >= 0


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    # The common case in one expression (a decode step makes a call per layer): plain
    # dense 4-d CPU tensors of one supported dtype, equal head dims; else the full checks
    # below say what is wrong.
    T = torch.Tensor
    if (
        isinstance(q, T) and isinstance(k, T) and isinstance(v, T)
        and q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype
        and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
        and q.shape[3] == v.shape[3] and q.shape[3] != 0
        and q.is_cpu and k.is_cpu and v.is_cpu
        and not (q.is_nested or k.is_nested or v.is_nested)
    ):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.is_nested:
            raise TypeError(
                f"{name} is a nested tensor: maskattn.attention takes dense tensors "
                "(maskattn.scaled_dot_product_attention passes nested ones to torch)"
            )
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d: q [B, H_q, L_q, d], k and v [B, H_kv, L_k, d]; got {tuple(t.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}: maskattn runs on the CPU")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; maskattn takes float32, bfloat16 or float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape[3] != q.shape[3]:
        raise ValueError(f"v's head dim ({v.shape[3]}) must equal q's ({q.shape[3]})")
    if q.shape[3] == 0:
        raise ValueError("q, k and v have head dim 0: maskattn needs d ≥ 1")


def _check_mods(q, k, softcap, alibi_slopes, sinks, bias, relative_bias):
    """The modifiers in the form the ops take: ``(softcap, alibi, sinks, bias 4-d, rel,
    rel_cfg)``; a clear error naming the argument otherwise."""
    B, H, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if softcap is not None:
        softcap = float(softcap)
        if not (math.isfinite(softcap) and 0 < softcap <= _F32_MAX):
            raise ValueError(f"softcap must be positive and finite, got {softcap!r}")

    def tensor(name, t, shape=None):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}: maskattn runs on the CPU")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (one per query head), got {list(t.shape)}")
        return t

    if alibi_slopes is not None:
        tensor("alibi_slopes", alibi_slopes, (H,))
    if sinks is not None:
        tensor("sinks", sinks, (H,))
    if bias is not None:
        tensor("bias", bias)
        if bias.dim() > 4:
            raise ValueError(f"bias must broadcast to [B, H_q, L_q, L_k]; got {bias.dim()} dims")
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)) if bias.dim() < 4 else bias
        want = (B, H, lq, lk)
        if any(n not in (1, w) for n, w in zip(bias.shape, want)):
            raise ValueError(f"bias of shape {list(bias.shape)} does not broadcast to [B, H_q, L_q, L_k] = {list(want)}")
        if not bias.requires_grad:
            # An expanded (stride-0) dimension is a broadcast one: read it once.
            idx = tuple(slice(0, 1) if (st == 0 and n > 1) else slice(None) for n, st in zip(bias.shape, bias.stride()))
            bias = bias[idx]
    rel, rel_cfg = None, [0, 0]
    if relative_bias is not None:
        if not isinstance(relative_bias, RelativeBias):
            raise TypeError("relative_bias must be a maskattn.RelativeBias(table, max_distance, bidirectional)")
        rel = tensor("relative_bias.table", relative_bias.table)
        if rel.dim() != 2 or rel.shape[1] != H:
            raise ValueError(f"relative_bias.table must be [num_buckets, H_q = {H}], got {list(rel.shape)}")
        n, md = rel.shape[0], int(relative_bias.max_distance)
        half = n // 2 if relative_bias.bidirectional else n
        if half < 2:
            raise ValueError(f"relative_bias.table has {n} buckets: T5 needs at least {4 if relative_bias.bidirectional else 2}")
        if md <= half // 2:
            raise ValueError(f"relative_bias.max_distance = {md} must exceed the exact range {half // 2}")
        rel_cfg = [md, int(bool(relative_bias.bidirectional))]
    return softcap, alibi_slopes, sinks, bias, rel, rel_cfg


def _call(q, k, v, mask_id: int, mask_data: List[torch.Tensor], scale: Optional[float], mods=_NO_MODS, drop=(0.0, 0)):
    """The op on a mask handle; ``(out in q's dtype, lse float32)``."""
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    scale = float(scale)
    if not (math.isfinite(scale) and abs(scale) <= _F32_MAX):
        raise ValueError(f"scale must be finite and within float32's range, got {scale!r}")
    compiling = torch.compiler.is_compiling()
    softcap, alibi, sinks, bias, rel, rel_cfg = mods
    params = [t for t in (alibi, sinks, bias, rel) if t is not None] if mods is not _NO_MODS else []
    if not compiling:
        # Lazy sign bits applied before autograd saves anything (a no-op when unset). The
        # conjugation bit exists only on complex tensors, which `_check` turned away.
        q, k, v = q.resolve_neg(), k.resolve_neg(), v.resolve_neg()
    if not compiling and _plain_eager(q, k, v, *params, *mask_data):
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in params)
        )
        if needs_grad or _forward_ad():
            out, lse = _EagerAttention.apply(
                q, k, v, mask_id, scale, (softcap, rel_cfg, *drop), alibi, sinks, bias, rel, *mask_data
            )
        else:
            block = _resolve(mask_id, mask_data, _shape(q, k))
            out, lse = _forward_native(q, k, v, block, scale, softcap, alibi, sinks, bias, rel, rel_cfg, *drop)
    elif not compiling and _functorch(q, k, v, *params):
        if drop[0]:
            raise NotImplementedError("maskattn.attention: dropout_p > 0 under torch.func transforms is not supported")
        allowed = _allowed(mask_id, mask_data, _shape(q, k))
        out, lse = _torch_attention(q, k, v, allowed, scale, mods)
    else:
        if not compiling and _forward_ad() and _has_tangent(q, k, v, *params):
            # The op has no forward-mode formula: its output would silently carry none.
            raise NotImplementedError(
                "maskattn.attention: forward-mode AD (dual tensors) is not supported through "
                "the torch.library op, which runs under torch.compile, torch function or "
                "dispatch modes and tensor subclasses; call it eagerly on plain tensors, or "
                "through torch.func.jvp"
            )
        out, lse = _attention_fwd(q, k, v, mask_id, mask_data, scale, softcap, alibi, sinks, bias, rel, rel_cfg, *drop)
    return (out if out.dtype == q.dtype else out.to(q.dtype)), lse


def _has_tangent(*ts) -> bool:
    return any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in ts)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Union[None, Mask, BlockMask] = None,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    relative_bias: Optional[RelativeBias] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
):
    """Exact masked attention.

    ``q [B, H_q, L_q, d]``, ``k, v [B, H_kv, L_k, d]`` (grouped-query when ``H_q`` is a
    multiple of ``H_kv``), any strides, float32 / bfloat16 / float16 on the CPU. ``mask``:
    ``None`` (full), a :class:`Mask` or a :class:`BlockMask` compiled for
    ``(B, H_q, L_q, L_k)``. ``scale`` defaults to ``1/sqrt(d)``.

    Score modifiers (docs/design.md section 1), with ``z = scale · q·k`` and the aligned
    query position ``i' = i + L_k − L_q``::

        x_ij = cap(z_ij) + bias[b,h,i,j] − slope_h·|i' − j| + rel[bucket(j − i'), h]

    ``softcap`` ``c``: ``cap(z) = c·tanh(z/c)`` (Gemma 2). ``bias``: an additive float
    tensor broadcasting to ``[B, H_q, L_q, L_k]`` (T5's position bias, a soft mask).
    ``alibi_slopes [H_q]``. ``sinks [H_q]``: one logit per head joining every row's
    softmax without a value (GPT-OSS). ``relative_bias``: a :class:`RelativeBias` (T5's
    bucketed table ``[num_buckets, H_q]``). Every tensor among them that requires grad gets
    its gradient from the fused backward.

    Returns ``out [B, H_q, L_q, d]`` in q's dtype, and with ``return_lse`` also
    ``lse [B, H_q, L_q]`` (float32, ``-inf`` where a row sees nothing — the sink's logit
    with sinks), differentiable: its gradient enters the fused backward.
    A row that sees nothing has output 0 and zero gradients, never NaN.

    ``dropout_p``: attention dropout, the kernels' own (``O_i = Σ_j P_ij z_ij v_j`` with
    ``z_ij = keep_ij / (1 − p)``; the LSE is that of the undropped weights). Which pairs are
    kept is a hash of ``(dropout_seed, b, h, i, j)``, so the backward regenerates exactly
    the forward's pattern without storing it. ``dropout_seed`` (an int in ``[0, 2⁶³)``)
    defaults to one drawn from torch's CPU generator, so ``torch.manual_seed`` makes a run
    reproducible. ``maskattn.dropout_keep(p, seed, shape)`` gives the pattern itself.

    First-order gradients run the fused backward (O(L) memory). ``create_graph=True``
    (gradient penalties, Hessians), forward-mode AD (dual tensors) and ``torch.func``
    transforms run the same attention as differentiable torch ops instead: exact, with the
    ``[B, H_q, L_q, L_k]`` scores in memory.
    """
    mask_id, data = _handle(mask)
    if softcap is None and alibi_slopes is None and sinks is None and bias is None and relative_bias is None:
        mods = _NO_MODS
    else:
        _check(q, k, v)
        mods = _check_mods(q, k, softcap, alibi_slopes, sinks, bias, relative_bias)
    drop = _dropout(dropout_p, dropout_seed)
    out, lse = _call(q, k, v, mask_id, data, scale, mods, drop)
    return (out, lse) if return_lse else out


def _dropout(p, seed) -> Tuple[float, int]:
    """``(p, seed)`` checked; a seed drawn from torch's generator when none is given."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {p!r}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if p == 0.0:
        return (0.0, 0)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"dropout_seed must be an int in [0, 2**63), got {seed!r}")
    return (p, seed)


def dropout_keep(p: float, seed: int, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """The pairs ``attention(..., dropout_p=p, dropout_seed=seed)`` keeps for a call of
    ``(B, H_q, L_q, L_k)``, as a bool tensor of that shape (``True`` = kept)."""
    p, seed = _dropout(p, seed)
    out = torch.empty(tuple(shape), dtype=torch.bool)
    _native.dropout_keep(p, seed, list(shape), (out.data_ptr(), out.numel()))
    return out
