"""torch.compile(fullgraph=True) traces through the custom ops: forward and the fused
backward, a mask that carries a tensor, and a precompiled BlockMask. One small compile
(inductor is slow on two cores)."""

import torch

import maskattn


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, l, d = 2, 4, 2, 80, 16
    q, k, v = (torch.randn(b, h, l, d, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
    lengths = torch.tensor([80, 50])
    block = maskattn.window(8, 0).compile(b, hq, l, l)

    def f(q, k, v, lengths):
        # A mask built inside the compiled function: its structure is a constant of the
        # trace, its tensor an input of the graph (new lengths need no recompile).
        a = maskattn.attention(q, k, v, maskattn.causal() & maskattn.key_padding(lengths))
        c = maskattn.attention(q, k, v, block)
        return (a * c).sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v, lengths)
    grads = torch.autograd.grad(loss, (q, k, v))
    expect_loss = f(q, k, v, lengths)
    expect = torch.autograd.grad(expect_loss, (q, k, v))
    assert torch.allclose(loss, expect_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expect):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)

    # Another batch's lengths run through the same graph, without a recompile.
    lengths2 = torch.tensor([30, 80])
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.allclose(compiled(q, k, v, lengths2), f(q, k, v, lengths2), rtol=1e-5, atol=1e-5)
