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
from typing import List, Optional, Tuple, Union

import torch

from . import _maskattn as _native
from .masks import BlockMask, Mask, _blocks, _handle, _resolve

__all__ = ["attention"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_F32_MAX = torch.finfo(torch.float32).max


def _raw(t: torch.Tensor) -> tuple:
    """``(data_ptr, shape, strides, dtype code)`` of a 4-d CPU tensor, read in place by Rust."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), _DTYPES[t.dtype])


def _raw_out(t: torch.Tensor) -> tuple:
    """``(data_ptr, numel)`` of a freshly allocated contiguous float32 tensor."""
    return (t.data_ptr(), t.numel())


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


def _probs(q, k, allowed, scale):
    """``(P, lse)`` in float32 with differentiable torch ops: the masked softmax of
    ``scale·q·kᵀ``; a row that sees nothing has P = 0 and LSE −∞ (the definition), with no
    NaN on the way, nor in any derivative."""
    s = torch.matmul(q.float(), _expand_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale
    s = torch.where(allowed, s, torch.full((), -math.inf))
    m = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros(()))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    seen = l > 0
    p = p / torch.where(seen, l, torch.ones(()))
    lse = torch.where(seen, torch.log(torch.where(seen, l, torch.ones(()))) + m, torch.full((), -math.inf))
    return p, lse.squeeze(-1)


def _torch_attention(q, k, v, allowed, scale):
    """``(out float32, lse)``: the kernels' result as differentiable torch ops, for
    ``torch.func`` transforms (grad, jvp, vmap, hessian) and every order of derivative."""
    p, lse = _probs(q, k, allowed, scale)
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


def _forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_id: int,
    mask_data: List[torch.Tensor],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    block = _resolve(mask_id, mask_data, _shape(q, k))
    q, k, v = _plain(q), _plain(k), _plain(v)
    B, H, L, _ = q.shape
    out = torch.empty((B, H, L, v.shape[3]), dtype=torch.float32)
    lse = torch.empty((B, H, L), dtype=torch.float32)
    _native.forward((_raw(q), _raw(k), _raw(v)), block, scale, (_raw_out(out), _raw_out(lse)))
    return out, lse


_attention_fwd = torch.library.custom_op("maskattn::attention_fwd", mutates_args=(), device_types="cpu")(
    _forward_impl
)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, mask_id, mask_data, scale):
    B, H, L, _ = q.shape
    out = q.new_empty((B, H, L, v.shape[3]), dtype=torch.float32)
    return out, q.new_empty((B, H, L), dtype=torch.float32)


def _backward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    mask_id: int,
    mask_data: List[torch.Tensor],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    block = _resolve(mask_id, mask_data, _shape(q, k))
    q, k, v = _plain(q), _plain(k), _plain(v)
    # Resolved before the cast: `.to` keeps a float32 tensor as it is, lazy bit and all.
    dout = _plain(dout).to(torch.float32)
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=torch.float32)
    dk = torch.empty(k.shape, dtype=torch.float32)
    dv = torch.empty(v.shape, dtype=torch.float32)
    _native.backward(
        (_raw(q), _raw(k), _raw(v)),
        (_raw(out), _raw_out(lse), _raw(dout)),
        block,
        scale,
        (_raw_out(dq), _raw_out(dk), _raw_out(dv)),
    )
    return dq, dk, dv


_attention_bwd = torch.library.custom_op("maskattn::attention_bwd", mutates_args=(), device_types="cpu")(
    _backward_impl
)


@_attention_bwd.register_fake
def _attention_bwd_fake(q, k, v, out, lse, dout, mask_id, mask_data, scale):
    f32 = torch.float32
    return q.new_empty(q.shape, dtype=f32), k.new_empty(k.shape, dtype=f32), v.new_empty(v.shape, dtype=f32)


def _setup_context(ctx, inputs, output):
    q, k, v, mask_id, mask_data, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *mask_data)
    ctx.mask_id = mask_id
    ctx.scale = scale
    # A BlockMask is registered weakly; the backward must still find it.
    ctx.block = _blocks.get(mask_id) if isinstance(mask_id, int) else None
    # The LSE's gradient is not computed by the fused backward.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *mask_data = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(q, k, v, out, lse, dout, ctx.mask_id, mask_data, ctx.scale)
    no_grads = [None] * len(mask_data)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, no_grads, None


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
    def forward(ctx, q, k, v, mask_id, scale, *mask_data):
        out, lse = _forward_impl(q, k, v, mask_id, list(mask_data), scale)
        ctx.save_for_backward(q, k, v, out, lse, *mask_data)
        ctx.save_for_forward(q, k, v, *mask_data)
        ctx.mask_id, ctx.scale = mask_id, scale
        ctx.block = _blocks.get(mask_id)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *mask_data = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable.
            allowed = _allowed(ctx.mask_id, mask_data, _shape(q, k))
            dq, dk, dv = _torch_backward(q, k, v, _plain(dout), allowed, ctx.scale)
        else:
            dq, dk, dv = _backward_impl(q, k, v, out, lse, dout, ctx.mask_id, mask_data, ctx.scale)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None) + (None,) * len(mask_data)

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v, *mask_data = ctx.saved_tensors
        allowed = _allowed(ctx.mask_id, mask_data, _shape(q, k))
        dout, _ = _torch_jvp(q, k, v, tq, tk, tv, allowed, ctx.scale)
        return dout, None  # the LSE is not differentiable (as in the backward)


def _plain_eager(*ts) -> bool:
    """True outside torch.compile / export and torch function or dispatch modes, on plain
    tensors (not fake, not subclasses, not functorch-wrapped): where the op's dispatch
    adds nothing but time."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
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


def _call(q, k, v, mask_id: int, mask_data: List[torch.Tensor], scale: Optional[float]):
    """The op on a mask handle; ``(out in q's dtype, lse float32)``."""
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    scale = float(scale)
    if not (math.isfinite(scale) and abs(scale) <= _F32_MAX):
        raise ValueError(f"scale must be finite and within float32's range, got {scale!r}")
    if not torch.compiler.is_compiling():
        # Lazy sign bits applied before autograd saves anything (a no-op when unset).
        q, k, v = _plain(q), _plain(k), _plain(v)
    if _plain_eager(q, k, v, *mask_data):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if needs_grad or _forward_ad():
            out, lse = _EagerAttention.apply(q, k, v, mask_id, scale, *mask_data)
        else:
            out, lse = _forward_impl(q, k, v, mask_id, mask_data, scale)
    elif not torch.compiler.is_compiling() and _functorch(q, k, v):
        allowed = _allowed(mask_id, mask_data, _shape(q, k))
        out, lse = _torch_attention(q, k, v, allowed, scale)
        lse = lse.detach()
    else:
        if not torch.compiler.is_compiling() and _forward_ad() and _has_tangent(q, k, v):
            # The op has no forward-mode formula: its output would silently carry none.
            raise NotImplementedError(
                "maskattn.attention: forward-mode AD (dual tensors) is not supported through "
                "the torch.library op, which runs under torch.compile, torch function or "
                "dispatch modes and tensor subclasses; call it eagerly on plain tensors, or "
                "through torch.func.jvp"
            )
        out, lse = _attention_fwd(q, k, v, mask_id, mask_data, scale)
    return out.to(q.dtype), lse


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
):
    """Exact masked attention.

    ``q [B, H_q, L_q, d]``, ``k, v [B, H_kv, L_k, d]`` (grouped-query when ``H_q`` is a
    multiple of ``H_kv``), any strides, float32 / bfloat16 / float16 on the CPU. ``mask``:
    ``None`` (full), a :class:`Mask` or a :class:`BlockMask` compiled for
    ``(B, H_q, L_q, L_k)``. ``scale`` defaults to ``1/sqrt(d)``.

    Returns ``out [B, H_q, L_q, d]`` in q's dtype, and with ``return_lse`` also
    ``lse [B, H_q, L_q]`` (float32, ``-inf`` where a row sees nothing; not differentiable).
    A row that sees nothing has output 0 and zero gradients, never NaN.

    First-order gradients run the fused backward (O(L) memory). ``create_graph=True``
    (gradient penalties, Hessians), forward-mode AD (dual tensors) and ``torch.func``
    transforms run the same attention as differentiable torch ops instead: exact, with the
    ``[B, H_q, L_q, L_k]`` scores in memory.
    """
    mask_id, data = _handle(mask)
    out, lse = _call(q, k, v, mask_id, data, scale)
    return (out, lse) if return_lse else out
