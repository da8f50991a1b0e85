"""What the per-call fast paths reuse, and that reuse never hands a call the wrong thing:
the eager backward takes the forward's compiled mask (a padding or documents mask is
compiled once per step), the cache of tensor-free masks keeps structures, shapes and block
masks apart, and a decode step's backward (one query, many keys: every key tile packed,
gradient buffers never zero-filled) matches the float64 reference, with exact zeros for
keys no query sees."""

import pytest
import torch

import maskattn
from maskattn import ops
from reference import allowed_of, attend, check_against_reference


def _qkv(b, hq, hkv, lq, lk, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, lq, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
    )


class _OpPath(torch.overrides.TorchFunctionMode):
    """Any torch function mode sends maskattn.attention through the torch.library op,
    whose backward compiles the mask again."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _grads(q, k, v, mask, dout):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = maskattn.attention(*leaves, mask)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def test_backward_reuses_the_forwards_compiled_mask(monkeypatch):
    q, k, v = _qkv(2, 4, 2, 70, 90, 32)
    lengths = torch.tensor([90, 37])
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    with _OpPath():
        want = _grads(q, k, v, maskattn.key_padding(lengths), dout)
    calls = []
    resolve = ops._resolve

    def counting(*args):
        calls.append(args[2])
        return resolve(*args)

    monkeypatch.setattr(ops, "_resolve", counting)
    got = _grads(q, k, v, maskattn.key_padding(lengths), dout)
    assert calls == [(2, 4, 70, 90)], "the eager backward compiled the mask again"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name
    # Keys past batch row 1's length are seen by no query: exactly zero gradients.
    for grad in got[2:]:
        assert torch.equal(grad[1, :, 37:], torch.zeros_like(grad[1, :, 37:]))


def test_mask_tensor_changed_between_forward_and_backward_is_refused():
    """The backward runs on the forward's compiled mask; a mask tensor changed in place in
    between would make it stale, and autograd's saved-tensor check refuses it."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 2, 5, 40, 16))
    lengths = torch.tensor([40, 25])
    out = maskattn.attention(q, k, v, maskattn.key_padding(lengths))
    lengths[1] = 10
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("lq", [1, 48])
def test_cached_masks_stay_apart(lq):
    """The same shape with other masks, one after the other (each compiled mask is cached
    or registered under its own id), and the same masks at other strides and shapes: each
    call matches the reference of its own mask."""
    lk, d = 80, 16
    cases = [
        (maskattn.causal(), "causal", {}),
        (maskattn.window(3, 0), "window", {"left": 3, "right": 0}),
        (None, "full", {}),
        (maskattn.window(3, 0).compile(1, 2, lq, lk), "window", {"left": 3, "right": 0}),
        (maskattn.causal(), "causal", {}),
    ]
    for n, (mask, kind, kw) in enumerate(cases * 2):
        q, k, v = _qkv(1, 2, 2, lq, lk, d, seed=n)
        if n >= len(cases):
            # The same masks again on [B, L, H, d] storage: other strides, the same
            # compiled masks.
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        want, _ = attend(q.double(), k.double(), v.double(), allowed_of(kind, lq, lk, **kw))
        got = maskattn.attention(q, k, v, mask)
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (n, kind)
    # Another shape under a cached mask's structure.
    q, k, v = _qkv(1, 2, 2, lq + 3, lk - 5, d, seed=99)
    want, _ = attend(q.double(), k.double(), v.double(), allowed_of("causal", lq + 3, lk - 5))
    got = maskattn.attention(q, k, v, maskattn.causal())
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 12, 12, 1, 700, 64),  # the decode step of python/README's figures
        (2, 4, 2, 3, 300, 40),  # grouped heads, d not a multiple of 16 (padded tiles)
    ],
)
def test_decode_step_backward_against_reference(shape):
    b, hq, hkv, lq, lk, d = shape
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))

    def run(q, k, v):
        return maskattn.attention(q, k, v, return_lse=True)

    check_against_reference(run, q, k, v, torch.ones(lq, lk, dtype=torch.bool))
    # Key tiles no query sees (past 130 keys): their gradients exactly 0, though the
    # buffers come from torch.empty.
    lengths = torch.full((b,), 130)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out = maskattn.attention(*leaves, maskattn.key_padding(lengths))
    out.backward(torch.randn(out.shape, generator=g))
    for t in leaves[1:]:
        assert torch.equal(t.grad[:, :, 130:], torch.zeros_like(t.grad[:, :, 130:]))
        assert torch.isfinite(t.grad).all()
