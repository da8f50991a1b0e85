"""``maskattn.scaled_dot_product_attention``: PyTorch's signature and semantics.

Runs our kernels for no mask, a bool ``attn_mask`` (``True`` = attend) and ``is_causal``
(top-left aligned when ``L ≠ S``, as PyTorch documents). Everything PyTorch itself runs
on its math path, or that our kernels do not take, goes to ``torch``'s own function:
``dropout_p > 0``, a float (additive) ``attn_mask``, tensors not on the CPU or not
float32 / bfloat16 / float16, inputs other than 3-d or 4-d, a value head dim that differs
from the query's, nested tensors, empty tensors (a dimension of size 0), a ``scale`` that
is not finite in float32, and every argument combination PyTorch rejects (a mask of fewer
than 2 dims, an ``is_causal`` that is not a bool, …: so its own error is raised).

A query row whose bool mask allows no key gives 0 here, never NaN (PyTorch 2.15's CPU
kernels give 0 as well; earlier PyTorch releases, and its math path with a float mask of
−∞, give NaN).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import masks as _masks
from .ops import _DTYPES, _call

__all__ = ["scaled_dot_product_attention"]

_CAUSAL_TL = _masks.causal_top_left()._id
_DENSE = _masks.dense(torch.ones(1, 1, dtype=torch.bool))._id
_FULL = _masks.full()._id


_F32_MAX = torch.finfo(torch.float32).max


def _ours(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    if dropout_p != 0.0 or type(is_causal) is not bool:
        return False
    ts = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and not t.is_nested for t in ts):
        return False
    if any(n == 0 for t in ts for n in t.shape):
        return False
    if scale is not None:
        try:
            scale = float(scale)
        except (TypeError, ValueError, RuntimeError):
            return False
        # The kernels take a finite float32 scale; torch takes any (and gives NaN or ±∞).
        if not (math.isfinite(scale) and abs(scale) <= _F32_MAX):
            return False
    if any(t.device.type != "cpu" or t.dtype not in _DTYPES for t in ts):
        return False
    if not (query.dtype == key.dtype == value.dtype):
        return False
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return False
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return False
    if key.shape[:-1] != value.shape[:-1] or key.shape[0] != query.shape[0]:
        return False
    if query.dim() == 4:
        hq, hkv = query.shape[1], key.shape[1]
        if hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0):
            return False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.is_nested:
            return False
        if is_causal or attn_mask.dtype != torch.bool or attn_mask.device.type != "cpu":
            return False
        if not 2 <= attn_mask.dim() <= query.dim():
            return False
        want = (*query.shape[:-1], key.shape[-2])
        got = (1,) * (len(want) - attn_mask.dim()) + tuple(attn_mask.shape)
        if any(g not in (1, w) for g, w in zip(got, want)):
            return False
    return True


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (see the module doc)."""
    if not _ours(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )
    three = query.dim() == 3
    if three:
        # (N, L, E): one head.
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if is_causal:
        mask_id, data = _CAUSAL_TL, []
    elif attn_mask is not None:
        m = attn_mask
        while m.dim() < (3 if three else 4):
            m = m.unsqueeze(0)
        if three:
            m = m.unsqueeze(1)
        mask_id, data = _DENSE, [m]
    else:
        mask_id, data = _FULL, []
    out, _ = _call(query, key, value, mask_id, data, scale)
    return out.squeeze(1) if three else out
