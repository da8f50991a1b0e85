"""A seeded property test: random shapes, dtypes, masks, scales and tensor layouts —
transposed views, storage offsets, strided head dims, PyTorch's lazy negation bit, zero
sizes, float64 — through ``maskattn.attention`` and the SDPA drop-in, forward and backward,
against the float64 reference under docs/design.md's accuracy rule (reference.py). Inputs
the kernels do not take must give torch's own result (the drop-in) or a typed error
(``maskattn.attention``), never a wrong one."""

import random

import pytest
import torch
import torch.nn.functional as F

import maskattn
from reference import assert_rule, attend, ulp_eps

CASES = 100
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16]


def relayout(x, kind, rnd):
    """``x``'s values in another layout, differentiably (gradients reach ``x``)."""
    if kind == "transposed":  # [B, L, H, d] memory read as [B, H, L, d]
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "offset":  # a view starting inside a larger storage
        pad = rnd.randint(1, 7)
        return torch.cat([x.new_zeros(pad), x.flatten()])[pad:].view(x.shape)
    if kind == "strided_d":  # every other element of the last dim
        return torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    if kind == "neg_bit":  # memory holds −x, the lazy bit negates it back
        return torch._neg_view(-x)
    return x


LAYOUTS = ["plain", "transposed", "offset", "strided_d", "neg_bit"]


def case(i):
    rnd = random.Random(1000 + i)
    hkv = rnd.randint(1, 2)
    c = dict(
        api=rnd.choice(["attention", "sdpa", "sdpa"]),
        dtype=rnd.choice(DTYPES),
        b=rnd.randint(1, 2), hq=hkv * rnd.randint(1, 2), hkv=hkv,
        lq=rnd.randint(1, 40), lk=rnd.randint(1, 40), d=rnd.randint(1, 16),
        mask=rnd.choice(["none", "causal", "bool"]),
        scale=rnd.choice([None, None, rnd.uniform(0.05, 1.5)]),
        layouts=[rnd.choice(LAYOUTS) for _ in range(4)],  # q, k, v, dout
        seed=i,
    )
    if rnd.random() < 0.06:
        c["zero"] = rnd.choice(["b", "lq", "lk", "d"])
    elif rnd.random() < 0.04:
        c["dtype"] = torch.float64
    return c


def allowed_for(c, g):
    lq, lk = c["lq"], c["lk"]
    if c["mask"] == "causal":  # top-left, as SDPA's is_causal; maskattn.causal_top_left()
        return torch.ones(lq, lk, dtype=torch.bool).tril()
    if c["mask"] == "bool":
        return torch.rand(c["b"], 1, lq, lk, generator=g) > 0.3
    return torch.ones(1, 1, dtype=torch.bool)


def call(c, q, k, v, allowed):
    if c["api"] == "attention":
        mask = {"none": None, "causal": maskattn.causal_top_left(), "bool": None}[c["mask"]]
        if c["mask"] == "bool":
            mask = maskattn.dense(allowed)
        return maskattn.attention(q, k, v, mask, scale=c["scale"])
    kw = dict(scale=c["scale"], enable_gqa=c["hq"] != c["hkv"])
    if c["mask"] == "causal":
        kw["is_causal"] = True
    elif c["mask"] == "bool":
        kw["attn_mask"] = allowed
    return maskattn.scaled_dot_product_attention(q, k, v, **kw)


def torch_call(c, q, k, v, allowed):
    kw = dict(scale=c["scale"], enable_gqa=c["hq"] != c["hkv"])
    if c["mask"] == "causal":
        kw["is_causal"] = True
    elif c["mask"] == "bool":
        kw["attn_mask"] = allowed
    return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("i", range(CASES))
def test_random_layouts_against_the_reference(i):
    c = case(i)
    g = torch.Generator().manual_seed(c["seed"])
    b, hq, hkv, lq, lk, d = (c[n] for n in ("b", "hq", "hkv", "lq", "lk", "d"))
    if "zero" in c:
        b, lq, lk, d = [0 if c["zero"] == n else x for n, x in zip(("b", "lq", "lk", "d"), (b, lq, lk, d))]
        c.update(b=b, lq=lq, lk=lk, d=d)
    dtype = c["dtype"]
    master = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
              for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))]
    allowed = allowed_for(c, g)
    dout = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64).to(dtype)
    rnd = random.Random(i)

    def ours():
        leaves = [t.clone().requires_grad_(True) for t in master]
        views = [relayout(t, kind, rnd) for t, kind in zip(leaves, c["layouts"])]
        out = call(c, *views, allowed)
        out.backward(relayout(dout, c["layouts"][3], rnd))
        return out.detach(), [t.grad for t in leaves]

    if "zero" in c or dtype == torch.float64:
        # Not the kernels' input: the drop-in gives torch's own result, attention a typed error.
        if c["api"] == "attention":
            with pytest.raises((ValueError, TypeError)):
                ours()
            return
        out, grads = ours()
        leaves = [t.clone().requires_grad_(True) for t in master]
        want = torch_call(c, *leaves, allowed)
        want.backward(dout)
        assert out.shape == want.shape and out.dtype == want.dtype
        assert torch.allclose(out, want.detach(), equal_nan=True)
        for got, w in zip(grads, (t.grad for t in leaves)):
            assert torch.allclose(got, w, equal_nan=True)
        return

    out, grads = ours()

    def ref(dt):
        leaves = [t.to(dt).requires_grad_(True) for t in master]
        o, _ = attend(*leaves, allowed, c["scale"])
        o.backward(dout.to(dt))
        return o.detach(), [t.grad for t in leaves]

    golden, naive = ref(torch.float64), ref(dtype)
    what = f"case {i} {c}"
    assert out.dtype == dtype, what
    assert_rule(f"out, {what}", out, naive[0], golden[0], ulp_eps(dtype, golden[0]))
    for name, o, n, gd in zip(("dq", "dk", "dv"), grads, naive[1], golden[1]):
        assert o.dtype == dtype, what
        assert_rule(f"{name}, {what}", o, n, gd, ulp_eps(dtype, gd))
