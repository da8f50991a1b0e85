"""``maskattn.nn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` on our kernels.

A subclass: the constructor, parameters, ``state_dict`` names and ``forward`` signature are
PyTorch's own, so a torch module's state dict loads as it is. ``forward`` runs our kernels
for no mask, bool masks (``key_padding_mask`` ``True`` = ignore, ``attn_mask`` ``True`` =
not allowed, ``[L, S]`` or ``[N·H, L, S]``) and ``is_causal``. Like PyTorch, ``is_causal``
needs ``attn_mask`` to be given and is trusted as a hint that it is the causal mask (top-
left aligned); our kernels then skip the hidden tiles instead of reading the mask.

It falls back to PyTorch's own forward for what PyTorch runs on its math path or our
kernels do not take: attention dropout while training, float (additive) masks,
``add_bias_kv``, ``add_zero_attn``, tensors not on the CPU or not float32 / bfloat16 /
float16, nested tensors, empty tensors, and every shape PyTorch rejects (so its own error is
raised: a 2-d key with a batched query, a ``key_padding_mask`` of the wrong shape, …).

``need_weights`` weights are recomputed from the kernel's log-sum-exp (``exp(s·qkᵀ − lse)``
where allowed, 0 elsewhere); they are for inspection and carry no gradient. Rows that see
nothing give output 0 and weights 0 (NaN in PyTorch).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import masks as _masks
from .ops import _DTYPES, _call

__all__ = ["MultiheadAttention"]

_keep = _masks._key_keep(torch.ones(1, 1, dtype=torch.bool))
_dense = _masks.dense(torch.ones(1, 1, dtype=torch.bool))
_causal = _masks.causal_top_left()
# Structure ids of every combination forward can need, interned once so that forward only
# picks integers (nothing to trace under torch.compile).
_IDS = {
    (False, None): _masks.full()._id,
    (False, "dense"): _dense._id,
    (False, "causal"): _causal._id,
    (True, None): _keep._id,
    (True, "dense"): (_keep & _dense)._id,
    (True, "causal"): (_keep & _causal)._id,
}


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with attention on maskattn's kernels (see the module doc)."""

    def _ours(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        if self.training and self.dropout > 0.0:
            return False
        if self.bias_k is not None or self.bias_v is not None or self.add_zero_attn:
            return False
        ts = (query, key, value)
        if any(t.is_nested or t.device.type != "cpu" or t.dtype not in _DTYPES for t in ts):
            return False
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return False
        if any(n == 0 for t in ts for n in t.shape):
            return False
        for m in (key_padding_mask, attn_mask):
            if m is not None and (
                not isinstance(m, torch.Tensor) or m.is_nested or m.dtype != torch.bool or m.device.type != "cpu"
            ):
                return False
        # Every shape PyTorch checks: anything else goes to its forward, which raises.
        batched = query.dim() == 3
        if batched and self.batch_first:
            N, L, E = query.shape
            S = key.shape[1]
            kv_batch = (key.shape[0], value.shape[0])
        elif batched:
            L, N, E = query.shape
            S = key.shape[0]
            kv_batch = (key.shape[1], value.shape[1])
        else:
            (L, E), N, S, kv_batch = query.shape, 1, key.shape[0], (1, 1)
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            return False
        if kv_batch != (N, N) or key.shape[:-1] != value.shape[:-1]:
            return False
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((N, S) if batched else (S,)):
            return False
        if attn_mask is not None and tuple(attn_mask.shape) not in ((L, S), (N * self.num_heads, L, S)):
            return False
        return True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self._ours(query, key, value, key_padding_mask, attn_mask):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        batched = query.dim() == 3
        if not batched:
            # (L, E): a batch of one in the sequence-first layout.
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Sequence first from here: (L, N, E), (S, N, kdim), (S, N, vdim).
        L, N, E = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        # (L, N, E) → [N, H, L, hd] as a view: the kernels read the projection in place.
        q = F.linear(query, w_q, b_q).view(L, N, H, hd).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).view(S, N, H, hd).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).view(S, N, H, hd).permute(1, 2, 0, 3)

        data = []
        has_kpm = key_padding_mask is not None
        if has_kpm:
            data.append(~key_padding_mask)
        if is_causal:
            kind = "causal"
        elif attn_mask is not None:
            kind = "dense"
            if attn_mask.dim() == 2:
                data.append((~attn_mask).view(1, 1, L, S))
            else:
                data.append((~attn_mask).view(N, H, L, S))
        else:
            kind = None
        out, lse = _call(q, k, v, _IDS[(has_kpm, kind)], data, None)

        attn = out.permute(2, 0, 1, 3).reshape(L, N, E)
        attn = F.linear(attn, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            attn = attn.squeeze(1)
        elif self.batch_first:
            attn = attn.transpose(0, 1)
        if not need_weights:
            return attn, None
        weights = self._weights(q, k, lse, key_padding_mask, attn_mask, is_causal)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return attn, weights.to(query.dtype)

    @torch.no_grad()
    def _weights(self, q, k, lse, key_padding_mask, attn_mask, is_causal) -> torch.Tensor:
        """``[N, H, L, S]`` attention weights from the LSE, 0 where the mask hides a pair."""
        N, H, L, hd = q.shape
        S = k.shape[2]
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (hd ** -0.5)
        allowed = torch.ones(1, 1, L, S, dtype=torch.bool)
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask.view(N, 1, 1, S)
        if is_causal:
            allowed = allowed & torch.ones(L, S, dtype=torch.bool).tril()
        elif attn_mask is not None:
            allowed = allowed & ~attn_mask.view(-1, H if attn_mask.dim() == 3 else 1, L, S)
        # `where`, not a product: exp(s − (−∞)) is +∞ on a row that sees nothing.
        return torch.where(allowed, torch.exp(s - lse.unsqueeze(-1)), torch.zeros((), dtype=s.dtype))
