"""The drop-ins against PyTorch's own scaled_dot_product_attention and MultiheadAttention."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import maskattn

TOL = dict(rtol=2e-5, atol=1e-5)


def leaves(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]


def both(fn_ours, fn_torch, inputs):
    """Outputs and input gradients of both functions on the same inputs."""
    results = []
    for fn in (fn_ours, fn_torch):
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*xs)
        out.backward(torch.ones_like(out) * 0.1 + out.detach() * 0.01)
        results.append((out.detach(), [x.grad for x in xs]))
    return results


def assert_same(ours, theirs):
    (o, go), (t, gt) = ours, theirs
    assert torch.allclose(o, t, **TOL), (o - t).abs().max()
    for a, b in zip(go, gt):
        assert torch.allclose(a, b, **TOL), (a - b).abs().max()


SDPA_CASES = [
    # (name, q shape, k shape, kwargs, mask shape or None)
    ("plain", (2, 4, 50, 16), (2, 4, 70, 16), {}, None),
    ("causal_square", (2, 4, 65, 16), (2, 4, 65, 16), {"is_causal": True}, None),
    ("causal_top_left_short_q", (1, 2, 40, 16), (1, 2, 90, 16), {"is_causal": True}, None),
    ("causal_top_left_long_q", (1, 2, 90, 16), (1, 2, 40, 16), {"is_causal": True}, None),
    ("bool_2d", (2, 4, 50, 16), (2, 4, 70, 16), {}, (50, 70)),
    ("bool_4d", (2, 4, 50, 16), (2, 4, 70, 16), {}, (2, 4, 50, 70)),
    ("bool_key_padding", (2, 4, 50, 16), (2, 4, 70, 16), {}, (2, 1, 1, 70)),
    ("gqa", (2, 6, 50, 16), (2, 2, 70, 16), {"enable_gqa": True, "scale": 0.2}, (1, 6, 50, 70)),
    ("three_d", (3, 50, 16), (3, 70, 16), {}, (3, 50, 70)),
]


@pytest.mark.parametrize("name,qs,ks,kw,ms", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_matches_torch(name, qs, ks, kw, ms):
    q, k, v = leaves(qs, ks, ks)
    if ms is not None:
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(ms, generator=g) < 0.7
        # PyTorch gives NaN on rows that see nothing (ours: 0); keep every row seeing a key.
        mask[..., 0] = True
        kw = dict(kw, attn_mask=mask)
    ours = both(lambda a, b, c: maskattn.scaled_dot_product_attention(a, b, c, **kw),
                lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kw), [q, k, v])
    theirs = ours[1]
    assert_same(ours[0], theirs)


def test_sdpa_runs_our_kernels(monkeypatch):
    calls = []
    real = maskattn.ops._native.forward
    monkeypatch.setattr(maskattn.ops._native, "forward", lambda *a: (calls.append(1), real(*a))[1])
    q = torch.randn(1, 2, 30, 8)
    maskattn.scaled_dot_product_attention(q, q, q, is_causal=True)
    maskattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(30, 30, dtype=torch.bool))
    assert len(calls) == 2


def test_sdpa_falls_back_to_torch_for_dropout_and_float_masks(monkeypatch):
    calls = []
    real = maskattn.ops._native.forward
    monkeypatch.setattr(maskattn.ops._native, "forward", lambda *a: (calls.append(1), real(*a))[1])
    q, k, v = (t.detach() for t in leaves((2, 2, 20, 8), (2, 2, 20, 8), (2, 2, 20, 8)))
    bias = torch.randn(20, 20)
    assert torch.equal(maskattn.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    torch.manual_seed(5)
    a = maskattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert calls == []
    # Key heads that are neither equal nor enable_gqa: whatever PyTorch does (it broadcasts
    # a single head), the drop-in does, by handing the call over.
    assert torch.equal(maskattn.scaled_dot_product_attention(q, k[:, :1], v[:, :1]),
                       F.scaled_dot_product_attention(q, k[:, :1], v[:, :1]))
    assert calls == []


def test_sdpa_empty_rows_are_zero_not_nan():
    q = torch.randn(1, 1, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    theirs = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    ours = maskattn.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.equal(ours[0, 0, 2], torch.zeros(8))
    assert torch.allclose(ours[0, 0, [0, 1, 3]], theirs[0, 0, [0, 1, 3]], **TOL)


def mha_pair(batch_first, kdim=None, vdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
    ours = maskattn.nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return ours.eval(), theirs.eval()


def run_mha(module, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    module.zero_grad()
    out, w = module(q, k, v, **kw)
    out.backward(torch.ones_like(out) * 0.1 + out.detach() * 0.01)
    grads = [q.grad, k.grad, v.grad] + [p.grad for p in module.parameters()]
    return out.detach(), (None if w is None else w.detach()), grads


MHA_CASES = [
    ("seq_first", False, {}),
    ("batch_first", True, {}),
    ("key_padding", True, {"kpm": True}),
    ("attn_mask_2d", False, {"am": "2d"}),
    ("attn_mask_3d_unaveraged", True, {"am": "3d", "average_attn_weights": False}),
    ("causal_hint", True, {"causal": True}),
    ("causal_and_padding_no_weights", True, {"causal": True, "kpm": True, "need_weights": False}),
    ("kdim_vdim", True, {"kdim": 24, "vdim": 20, "kpm": True}),
]


@pytest.mark.parametrize("name,batch_first,kw", MHA_CASES, ids=[c[0] for c in MHA_CASES])
def test_mha_matches_torch(name, batch_first, kw, monkeypatch):
    calls = []
    real = maskattn.ops._native.forward
    monkeypatch.setattr(maskattn.ops._native, "forward", lambda *a: (calls.append(1), real(*a))[1])
    kw = dict(kw)
    kdim, vdim = kw.pop("kdim", None), kw.pop("vdim", None)
    ours, theirs = mha_pair(batch_first, kdim, vdim)
    n, l = 3, 40
    s = l
    g = torch.Generator().manual_seed(2)
    shape = (lambda length, e: (n, length, e)) if batch_first else (lambda length, e: (length, n, e))
    q = torch.randn(shape(l, 32), generator=g)
    k = torch.randn(shape(s, kdim or 32), generator=g)
    v = torch.randn(shape(s, vdim or 32), generator=g)
    args = {}
    if kw.pop("kpm", False):
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[1, 30:] = True
        kpm[2, 5:] = True
        args["key_padding_mask"] = kpm
    am = kw.pop("am", None)
    if kw.pop("causal", False):
        args["attn_mask"] = torch.ones(l, s, dtype=torch.bool).triu(1)
        args["is_causal"] = True
    elif am == "2d":
        args["attn_mask"] = torch.rand(l, s, generator=g) < 0.3
    elif am == "3d":
        args["attn_mask"] = torch.rand(n * 4, l, s, generator=g) < 0.3
    if "attn_mask" in args:
        args["attn_mask"][..., 0] = False  # every row sees a key (PyTorch: NaN otherwise)
    args.update(kw)
    a = run_mha(ours, q, k, v, **args)
    assert calls, "the drop-in did not run maskattn's kernels"
    b = run_mha(theirs, q, k, v, **args)
    assert torch.allclose(a[0], b[0], **TOL), (a[0] - b[0]).abs().max()
    if args.get("need_weights", True):
        assert a[1].shape == b[1].shape
        assert torch.allclose(a[1], b[1], **TOL), (a[1] - b[1]).abs().max()
    else:
        assert a[1] is None and b[1] is None
    for x, y in zip(a[2], b[2]):
        assert torch.allclose(x, y, **TOL), (x - y).abs().max()


def test_mha_unbatched_and_fallbacks(monkeypatch):
    ours, theirs = mha_pair(False)
    x = torch.randn(10, 32)
    a, wa = ours(x, x, x)
    b, wb = theirs(x, x, x)
    assert a.shape == b.shape == (10, 32)
    assert torch.allclose(a, b, **TOL) and torch.allclose(wa, wb, **TOL)
    # A float mask goes to PyTorch's own forward: identical results.
    calls = []
    real = maskattn.ops._native.forward
    monkeypatch.setattr(maskattn.ops._native, "forward", lambda *a: (calls.append(1), real(*a))[1])
    bias = torch.randn(10, 10)
    assert torch.equal(ours(x, x, x, attn_mask=bias)[0], theirs(x, x, x, attn_mask=bias)[0])
    assert calls == []
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x, x, x, is_causal=True)


def test_mha_empty_rows_are_zero():
    ours, _ = mha_pair(True)
    x = torch.randn(2, 6, 32)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True  # batch row 1 has no key to attend to
    out, w = ours(x, x, x, key_padding_mask=kpm)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert torch.equal(w[1], torch.zeros_like(w[1]))
    # Output of a row that sees nothing: the output projection of 0, i.e. its bias.
    assert torch.allclose(out[1], ours.out_proj.bias.detach().expand(6, 32))
