"""PyTorch's lazy negation bit (``z.conj().imag``, ``x.is_neg()``): the memory holds the
values un-negated, and the kernels read memory. Every tensor crossing into Rust — q, k, v
and the backward's ``dout`` (which autograd itself produces with the bit through complex
ops) — must give what its plain copy gives, on the eager path and through the SDPA drop-in."""

import torch
import torch.nn.functional as F

import maskattn


def neg_view(x):
    """``x``'s values as a lazily negated view of memory that holds ``-x`` (``is_neg()``),
    made as users meet it: the imaginary part of a conjugate (bfloat16 and float16 have no
    complex type: torch's own ``_neg_view`` there)."""
    if x.dtype in (torch.float32, torch.float64):
        t = torch.complex(torch.zeros_like(x), -x).conj().imag
    else:
        t = torch._neg_view(-x)
    assert t.is_neg() and torch.equal(t.resolve_neg(), x)
    return t


def qkv(seed=0, shape=(2, 3, 37, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(3)]


def run(f, q, k, v, dout):
    leaves = [t.detach().requires_grad_(True) if not t.is_neg() else t for t in (q, k, v)]
    out = f(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def test_neg_bit_inputs_forward_and_backward_eager():
    q, k, v = qkv()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    f = lambda q, k, v: maskattn.attention(q, k, v, maskattn.causal())  # noqa: E731
    want_out, want_grads = run(f, q, k, v, dout)
    # Leaves with the bit: requires_grad on the neg view's base would not reach it, so the
    # view itself is made a leaf.
    lazy = [neg_view(t).detach().requires_grad_(True) for t in (q, k, v)]
    assert all(t.is_neg() for t in lazy)
    out = f(*lazy)
    out.backward(neg_view(dout))
    assert torch.equal(out.detach(), want_out)
    for name, t, w in zip("qkv", lazy, want_grads):
        assert torch.equal(t.grad, w), f"d{name} differs for a neg-bit input"


def test_neg_bit_dout_from_a_complex_op():
    """``|conj(i·out)|`` hands attention's backward a ``dout`` with the bit (checked by the
    probe below); dq, dk, dv must equal those from the plain ``dout = sign(out)``."""
    q, k, v = [t.requires_grad_(True) for t in qkv(2)]
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            seen.append(g.is_neg())
            return g

    out = maskattn.attention(q, k, v)
    torch.complex(torch.zeros_like(out), Probe.apply(out)).conj().abs().sum().backward()
    assert seen == [True], "the construction no longer makes a neg-bit dout"
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    maskattn.attention(q, k, v).backward(torch.sign(out.detach()))
    for name, g, t in zip("qkv", got, (q, k, v)):
        assert torch.equal(g, t.grad), f"d{name}: the neg-bit dout was read with the wrong sign"


def test_neg_bit_through_the_sdpa_drop_in():
    q, k, v = qkv(4, (1, 2, 19, 16))
    lazy = [neg_view(t) for t in (q, k, v)]
    plain = [q, k, v]
    for kw in ({}, {"is_causal": True}, {"attn_mask": torch.rand(19, 19) > 0.3}):
        got = maskattn.scaled_dot_product_attention(*lazy, **kw)
        assert torch.equal(got, maskattn.scaled_dot_product_attention(*plain, **kw)), kw
        assert (got - F.scaled_dot_product_attention(*plain, **kw)).abs().max() < 1e-5, kw


def test_neg_bit_half_types():
    q, k, v = qkv(5, (1, 2, 20, 8))
    for dtype in (torch.bfloat16, torch.float16):
        lazy = [neg_view(t.to(dtype)) for t in (q, k, v)]
        want = maskattn.attention(*[t.to(dtype) for t in (q, k, v)])
        assert torch.equal(maskattn.attention(*lazy), want), dtype
