"""``maskattn.attention``: the fused kernels as ``torch.library`` custom ops with autograd.

Two ops, ``maskattn::attention_fwd`` and ``maskattn::attention_bwd``, each with a fake
(meta) implementation, so ``torch.compile(fullgraph=True)`` traces through them without a
graph break, and ``register_autograd`` wires the fused backward in.

Tensors cross into Rust as raw parts — data pointer, shape, strides, dtype — and are read
in place: a transposed ``[B, L, H, d]`` view is not copied. The kernels write float32
results into buffers allocated here with torch; a bf16 or f16 call's ``out`` is rounded to
its input dtype afterwards (so autograd hands the backward a float32 ``dout``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from . import _maskattn as _native
from .masks import BlockMask, Mask, _blocks, _handle, _resolve

__all__ = ["attention"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _raw(t: torch.Tensor) -> tuple:
    """``(data_ptr, shape, strides, dtype code)`` of a 4-d CPU tensor, read in place by Rust."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), _DTYPES[t.dtype])


def _raw_out(t: torch.Tensor) -> tuple:
    """``(data_ptr, numel)`` of a freshly allocated contiguous float32 tensor."""
    return (t.data_ptr(), t.numel())


def _shape(q: torch.Tensor, k: torch.Tensor) -> Tuple[int, int, int, int]:
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_id: int,
    mask_data: List[torch.Tensor],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    block = _resolve(mask_id, mask_data, _shape(q, k))
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
    dout = dout.to(torch.float32)
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
    """

    @staticmethod
    def forward(ctx, q, k, v, mask_id, scale, *mask_data):
        out, lse = _forward_impl(q, k, v, mask_id, list(mask_data), scale)
        ctx.save_for_backward(q, k, v, out, lse, *mask_data)
        ctx.mask_id, ctx.scale = mask_id, scale
        ctx.block = _blocks.get(mask_id)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *mask_data = ctx.saved_tensors
        dq, dk, dv = _backward_impl(q, k, v, out, lse, dout, ctx.mask_id, mask_data, ctx.scale)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None) + (None,) * len(mask_data)


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


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
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


def _call(q, k, v, mask_id: int, mask_data: List[torch.Tensor], scale: Optional[float]):
    """The op on a mask handle; ``(out in q's dtype, lse float32)``."""
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    scale = float(scale)
    if _plain_eager(q, k, v, *mask_data):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = _EagerAttention.apply(q, k, v, mask_id, scale, *mask_data)
        else:
            out, lse = _forward_impl(q, k, v, mask_id, mask_data, scale)
    else:
        out, lse = _attention_fwd(q, k, v, mask_id, mask_data, scale)
    return out.to(q.dtype), lse


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
    """
    mask_id, data = _handle(mask)
    out, lse = _call(q, k, v, mask_id, data, scale)
    return (out, lse) if return_lse else out
