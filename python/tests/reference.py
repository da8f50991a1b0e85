"""The oracle: attention materialised with plain torch ops, in float64 (golden) or in the
kernel's storage type (naive), and docs/design.md's accuracy rule

    |kernel − golden64|max ≤ 2 · |naive_same_dtype − golden64|max + ε.

Masks here are boolean matrices built from the vocabulary's written definitions with index
arithmetic — never from the package under test.
"""

from __future__ import annotations

import math

import torch

EPS = {torch.float32: 1e-5}


def attend(q, k, v, allowed, scale=None):
    """``(out, lse)``; ``allowed`` broadcasts to ``[B, H_q, L_q, L_k]``. Rows that see
    nothing give 0 and LSE −∞ (the definition), computed without a NaN on the way."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = allowed.expand(s.shape)
    s = torch.where(allowed, s, torch.full((), -math.inf, dtype=s.dtype))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(l > 0, l, torch.ones((), dtype=l.dtype))
    lse = torch.where(l > 0, torch.log(l) + m, torch.full((), -math.inf, dtype=l.dtype)).squeeze(-1)
    return out, lse


def max_err(a, b):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros((), dtype=a.dtype), (a - b).abs())
    return d.max().item() if d.numel() else 0.0


def assert_rule(name, kernel, naive, golden, eps):
    assert not torch.isnan(kernel).any(), f"{name}: NaN in the kernel's result"
    err = max_err(kernel, golden)
    bound = 2 * max_err(naive, golden) + eps
    assert err <= bound, f"{name}: error {err:.3e} exceeds the bound {bound:.3e}"


def ulp_eps(dtype, golden):
    """About one ulp of ``dtype`` at the data's scale (docs/design.md's ε for half types)."""
    if dtype == torch.float32:
        return 1e-5
    bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    scale = golden.abs().max().item() if golden.numel() else 1.0
    return max(scale, 1e-3) * 2.0 ** (1 - bits)


def check_against_reference(run, q, k, v, allowed, scale=None, dtype=torch.float32, seed=0):
    """Forward (out, LSE) and q/k/v gradients of ``run(q, k, v) -> (out, lse)`` under the rule.

    ``q, k, v`` are float64 masters; the kernel and the naive side get them rounded to
    ``dtype``, the golden side gets the rounded values in float64.
    """
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g, dtype=torch.float64)
    rounded = [t.to(dtype) for t in (q, k, v)]
    dout_r = dout.to(dtype)

    def grads(qkv, do, fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
        out, lse = fn(*leaves)
        out.backward(do.to(out.dtype))
        return out.detach(), lse.detach(), [t.grad for t in leaves]

    ref = lambda a, b, c: attend(a, b, c, allowed, scale)  # noqa: E731
    golden = grads([t.double() for t in rounded], dout_r.double(), ref)
    naive = grads(rounded, dout_r, ref)
    ours = grads(rounded, dout_r, run)
    for name, o, n, gd in (
        ("out", ours[0], naive[0], golden[0]),
        ("lse", ours[1], naive[1], golden[1]),
    ):
        assert_rule(name, o, n, gd, ulp_eps(dtype if name == "out" else torch.float32, gd))
    for name, o, n, gd in zip(("dq", "dk", "dv"), ours[2], naive[2], golden[2]):
        assert o.dtype == dtype, f"{name} has dtype {o.dtype}, expected {dtype}"
        assert_rule(name, o, n, gd, ulp_eps(dtype, gd))
    return ours


# ---- masks from their written definitions (i' = i + L_k − L_q) ----


def index(lq, lk):
    i = torch.arange(lq).view(lq, 1)
    j = torch.arange(lk).view(1, lk)
    return i, j, i + (lk - lq)


def allowed_of(kind, lq, lk, **kw):
    i, j, ib = index(lq, lk)
    if kind == "full":
        return torch.ones(lq, lk, dtype=torch.bool)
    if kind == "causal":
        return j <= ib
    if kind == "causal_top_left":
        return j <= i
    if kind == "window":
        return (ib - kw["left"] <= j) & (j <= ib + kw["right"])
    if kind == "chunks":
        return torch.div(j, kw["c"], rounding_mode="floor") == torch.div(ib, kw["c"], rounding_mode="floor")
    if kind == "block_causal":
        return torch.div(j, kw["c"], rounding_mode="floor") <= torch.div(ib, kw["c"], rounding_mode="floor")
    if kind == "neighbourhood":
        w, r = kw["w"], kw["r"]
        return ((ib // w - j // w).abs() <= r) & ((ib % w - j % w).abs() <= r)
    if kind == "prefix":
        return (j < kw["p"]) | (j <= ib)
    raise ValueError(kind)


# ---- score modifiers from their written definitions (docs/design.md section 1) ----


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """Hugging Face T5's ``_relative_position_bucket`` of an integer tensor ``rel = j − i'``
    (transcribed from transformers' modeling_t5.py)."""
    ret = torch.zeros_like(rel)
    n = num_buckets
    if bidirectional:
        n //= 2
        ret += (rel > 0).to(torch.long) * n
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = n // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (n - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, n - 1))
    return ret + torch.where(is_small, rel, large)


def attend_mods(q, k, v, allowed, scale=None, softcap=None, alibi=None, sinks=None, bias=None, rel=None):
    """``(out, lse)`` with score modifiers, in q's dtype: ``x = cap(z) + bias − slope·|i' − j|
    + table[bucket(j − i'), h]``, sinks joining each row's softmax without a value.
    ``rel = (table [N, H_q], max_distance, bidirectional)``."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    x = torch.matmul(q, k.transpose(-1, -2)) * scale
    lq, lk = x.shape[-2:]
    i, j, ib = index(lq, lk)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if bias is not None:
        x = x + bias.to(x.dtype)
    if alibi is not None:
        x = x - alibi.to(x.dtype).view(-1, 1, 1) * (ib - j).abs().to(x.dtype)
    if rel is not None:
        table, max_distance, bidirectional = rel
        b = t5_bucket(j - ib, bidirectional, table.shape[0], max_distance)
        x = x + table.to(x.dtype)[b].permute(2, 0, 1)
    x = torch.where(allowed.expand(x.shape), x, torch.full((), -math.inf, dtype=x.dtype))
    if sinks is not None:
        col = sinks.to(x.dtype).view(1, -1, 1, 1).expand(x.shape[0], -1, lq, 1)
        x = torch.cat([x, col], dim=-1)
    m = x.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
    p = torch.exp(x - m)
    l = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(l > 0, l, torch.ones((), dtype=l.dtype))
    if sinks is not None:
        p = p[..., :lk]
    out = torch.matmul(p, v)
    lse = torch.where(l > 0, torch.log(torch.where(l > 0, l, torch.ones((), dtype=l.dtype))) + m, torch.full((), -math.inf, dtype=l.dtype))
    return out, lse.squeeze(-1)
