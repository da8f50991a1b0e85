"""maskattn.attention's score modifiers (softcap, sinks, bias, ALiBi, T5 buckets) and the
differentiable LSE against the float64 reference (reference.attend_mods, written from
docs/design.md section 1): out, LSE, dq/dk/dv and each modifier's own gradient, under the
design's accuracy rule. Each test names the path it runs: the eager autograd.Function
(plain calls) or the torch.library op (reached under a TorchFunctionMode, as
torch.compile reaches it)."""

import math

import pytest
import torch

import maskattn
from reference import allowed_of, assert_rule, attend_mods, ulp_eps


class _OpPath(torch.overrides.TorchFunctionMode):
    """Any torch function mode sends maskattn.attention through the torch.library op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _data(b, hq, hkv, lq, lk, d, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(b, hq, lq, d), r(b, hkv, lk, d), r(b, hkv, lk, d), r(b, hq, lq, d), r(b, hq, lq), g


def check_mods(path, shape, mask_kind, mods, lse_weight=0.0, seed=0):
    """Runs maskattn and the reference on the same float32-rounded inputs; ``mods`` maps
    names to float64 master tensors (or floats). The loss is ``Σ out·w + lse_weight·Σ lse·u``
    (over rows whose LSE is finite). Checks out, lse and every gradient under the rule."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v, w, u, g = _data(b, hq, hkv, lq, lk, d, seed)
    allowed = allowed_of(mask_kind, lq, lk)
    mask = {"full": None, "causal": maskattn.causal()}[mask_kind]
    names = [n for n in ("alibi_slopes", "sinks", "bias", "table") if n in mods]

    def run(fn, dtype):
        leaves = [t.to(torch.float32).to(dtype).requires_grad_(True) for t in (q, k, v)]
        params = {n: mods[n].to(torch.float32).to(dtype).requires_grad_(True) for n in names}
        out, lse = fn(*leaves, params)
        fin = torch.isfinite(lse)
        loss = (out * w.to(out.dtype)).sum() + lse_weight * torch.where(fin, lse * u.to(lse.dtype), torch.zeros((), dtype=lse.dtype)).sum()
        grads = torch.autograd.grad(loss, leaves + [params[n] for n in names])
        return [out.detach(), lse.detach(), *grads]

    softcap = mods.get("softcap")
    rel_cfg = mods.get("rel_cfg", (128, True))

    def ours(q_, k_, v_, p):
        rb = maskattn.RelativeBias(p["table"], *rel_cfg) if "table" in p else None
        kw = dict(softcap=softcap, alibi_slopes=p.get("alibi_slopes"), sinks=p.get("sinks"), bias=p.get("bias"), relative_bias=rb)
        if path == "op":
            with _OpPath():
                return maskattn.attention(q_, k_, v_, mask, return_lse=True, **kw)
        return maskattn.attention(q_, k_, v_, mask, return_lse=True, **kw)

    def ref(q_, k_, v_, p):
        rel = (p["table"], *rel_cfg) if "table" in p else None
        return attend_mods(q_, k_, v_, allowed, softcap=softcap, alibi=p.get("alibi_slopes"), sinks=p.get("sinks"), bias=p.get("bias"), rel=rel)

    got = run(ours, torch.float32)
    naive = run(ref, torch.float32)
    golden = run(ref, torch.float64)
    for name, o, n, gd in zip(["out", "lse", "dq", "dk", "dv", *("d" + x for x in names)], got, naive, golden):
        assert o.shape == gd.shape, f"{name}: shape {tuple(o.shape)} != {tuple(gd.shape)}"
        eps = ulp_eps(torch.float32, gd)
        if name.startswith("d") and name not in ("dq", "dk", "dv"):
            # docs/design.md: parameter gradients sum over every pair of the call, so ε
            # is taken at their own scale, 1e-5 · max(1, |golden|max).
            eps = 1e-5 * max(1.0, gd.abs().max().item())
        assert_rule(f"{path} {name}", o, n, gd, eps)
    return got


PATHS = ["eager", "op"]
GQA = (2, 4, 2, 37, 53, 16)


@pytest.mark.parametrize("path", PATHS)
def test_softcap_causal_gqa(path):
    check_mods(path, GQA, "causal", {"softcap": 2.0})


@pytest.mark.parametrize("path", PATHS)
def test_sinks_gradient(path):
    g = torch.Generator().manual_seed(5)
    check_mods(path, GQA, "causal", {"sinks": torch.randn(4, generator=g, dtype=torch.float64)})


def test_sinks_rows_that_see_nothing():
    """L_q > L_k causal: the first rows see no key; their LSE is the sink, their output 0,
    and their gradient reaches the sink only through the LSE."""
    g = torch.Generator().manual_seed(6)
    got = check_mods("eager", (1, 2, 2, 9, 4, 8), "causal", {"sinks": torch.randn(2, generator=g, dtype=torch.float64)}, lse_weight=1.0)
    assert (got[0][:, :, :5] == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_softcap_and_sinks_together(path):
    g = torch.Generator().manual_seed(7)
    check_mods(path, (1, 3, 1, 20, 20, 32), "causal", {"softcap": 1.5, "sinks": torch.randn(3, generator=g, dtype=torch.float64)})


BIAS_SHAPES = [(2, 4, 37, 53), (1, 4, 37, 53), (2, 1, 1, 53), (4, 37, 1), (53,)]


@pytest.mark.parametrize("bshape", BIAS_SHAPES, ids=[str(s) for s in BIAS_SHAPES])
@pytest.mark.parametrize("path", PATHS)
def test_bias_broadcast_gradient(path, bshape):
    g = torch.Generator().manual_seed(8)
    check_mods(path, GQA, "causal", {"bias": torch.randn(*bshape, generator=g, dtype=torch.float64)})


def test_bias_expanded_float_mask():
    """A non-learnable additive float mask expanded (stride 0) over batch and heads, as
    transformers passes T5's: read once, same result as the materialised one."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(3, 4, 12, 8, generator=g) for _ in range(3))
    m = torch.where(torch.rand(12, 12, generator=g) < 0.3, -math.inf, torch.randn(12, 12, generator=g))
    m[:, 0] = 0.0
    exp = m.view(1, 1, 12, 12).expand(3, 4, 12, 12)
    a = maskattn.attention(q, k, v, bias=exp)
    b = maskattn.attention(q, k, v, bias=exp.contiguous())
    ref, _ = attend_mods(q.double(), k.double(), v.double(), torch.ones(1, dtype=torch.bool), bias=m.double())
    assert torch.equal(a, b)
    assert (a.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_alibi_gradient(path):
    slopes = torch.tensor(maskattn_slopes(4), dtype=torch.float64)
    check_mods(path, GQA, "causal", {"alibi_slopes": slopes})


def maskattn_slopes(h):
    """The standard geometric ALiBi slopes for a power-of-two head count."""
    return [2 ** (-8 * (i + 1) / h) for i in range(h)]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_t5_buckets_gradient(path, bidirectional):
    g = torch.Generator().manual_seed(10)
    table = torch.randn(16, 4, generator=g, dtype=torch.float64)
    mask = "full" if bidirectional else "causal"
    check_mods(path, (2, 4, 2, 40, 90, 16), mask, {"table": table, "rel_cfg": (20, bidirectional)})


@pytest.mark.parametrize("path", PATHS)
def test_every_modifier_at_once_with_lse_gradient(path):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    mods = {
        "softcap": 3.0,
        "sinks": r(4),
        "bias": r(1, 4, 37, 53),
        "alibi_slopes": r(4).abs() * 0.1,
        "table": r(8, 4),
        "rel_cfg": (30, True),
    }
    check_mods(path, GQA, "causal", mods, lse_weight=0.7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask_kind", ["full", "causal"])
def test_lse_gradient_enters_the_backward(path, mask_kind):
    """A loss on both out and lse: dq, dk, dv equal float64 autograd's (D − dLSE)."""
    check_mods(path, (2, 4, 4, 33, 33, 16), mask_kind, {}, lse_weight=1.3)


@pytest.mark.parametrize("path", PATHS)
def test_lse_only_loss(path):
    """A loss on the LSE alone (out unused: autograd hands the backward no dout)."""
    q, k, v, _, u, _ = _data(1, 2, 2, 10, 14, 8, 3)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    if path == "op":
        with _OpPath():
            _, lse = maskattn.attention(*leaves, return_lse=True)
    else:
        _, lse = maskattn.attention(*leaves, return_lse=True)
    got = torch.autograd.grad((lse * u.float()).sum(), leaves[:2])
    ref_leaves = [t.float().double().requires_grad_(True) for t in (q, k, v)]
    _, rlse = attend_mods(*ref_leaves, torch.ones(1, dtype=torch.bool))
    want = torch.autograd.grad((rlse * u).sum(), ref_leaves[:2])
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 1e-5


def test_modifiers_under_torch_compile():
    """torch.compile(fullgraph=True) traces the op with its modifiers and their gradients."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    sinks = torch.randn(2, generator=g)
    bias = torch.randn(1, 2, 16, 16, generator=g)

    def f(q, k, v, sinks, bias):
        out, lse = maskattn.attention(q, k, v, maskattn.causal(), softcap=2.0, sinks=sinks, bias=bias, return_lse=True)
        return out.sum() + lse.sum()

    def grads(fn):
        ts = [t.clone().requires_grad_(True) for t in (q, k, v, sinks, bias)]
        return torch.autograd.grad(fn(*ts), ts)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(compiled), grads(f)):
        assert torch.allclose(a, b, atol=1e-6)


def test_create_graph_with_modifiers():
    """create_graph=True with sinks: the gradient is differentiable again (torch formulation)."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(2, generator=g, dtype=torch.float64)
    qf = q.float().requires_grad_(True)
    sf = sinks.float().requires_grad_(True)
    out = maskattn.attention(qf, k.float(), v.float(), sinks=sf)
    (gq,) = torch.autograd.grad(out.sum(), qf, create_graph=True)
    (gs,) = torch.autograd.grad(gq.pow(2).sum(), sf)
    qd, sd = q.clone().requires_grad_(True), sinks.clone().requires_grad_(True)
    rout, _ = attend_mods(qd, k, v, torch.ones(1, dtype=torch.bool), sinks=sd)
    (rq,) = torch.autograd.grad(rout.sum(), qd, create_graph=True)
    (rs,) = torch.autograd.grad(rq.pow(2).sum(), sd)
    assert (gs.double() - rs).abs().max() < 1e-4


BAD = [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks"),
    (dict(alibi_slopes=torch.zeros(2, 1)), ValueError, "alibi_slopes"),
    (dict(bias=torch.zeros(3, 5, 5)), ValueError, "bias"),
    (dict(bias=torch.zeros(1, 1, 1, 1, 5)), ValueError, "bias"),
    (dict(bias=torch.zeros(5, 5, dtype=torch.long)), TypeError, "bias"),
    (dict(relative_bias=maskattn.RelativeBias(torch.zeros(8, 3))), ValueError, "relative_bias"),
    (dict(relative_bias=maskattn.RelativeBias(torch.zeros(2, 2))), ValueError, "relative_bias"),
    (dict(relative_bias=maskattn.RelativeBias(torch.zeros(16, 2), max_distance=3)), ValueError, "max_distance"),
    (dict(relative_bias=torch.zeros(16, 2)), TypeError, "relative_bias"),
]


@pytest.mark.parametrize("kw,err,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_modifier_names_the_argument(kw, err, name):
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(err, match=name):
        maskattn.attention(q, q, q, **kw)


def test_nonfinite_sinks_are_an_error():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="sinks"):
        maskattn.attention(q, q, q, sinks=torch.tensor([0.0, math.nan]))


def test_out_and_lse_gradients_from_one_buffer():
    """A loss through torch.cat of out and lse: autograd hands the backward dout and dlse
    as slices of one gradient buffer (read-only, allowed to share storage)."""
    q, k, v, w, u, _ = _data(1, 2, 2, 7, 9, 4, 4)
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    out, lse = maskattn.attention(*leaves, return_lse=True)
    flat = torch.cat([out.flatten(), lse.flatten()])
    wu = torch.cat([w.float().flatten(), u.float().flatten()])
    got = torch.autograd.grad((flat * wu).sum(), leaves)
    ref_leaves = [t.float().double().requires_grad_(True) for t in (q, k, v)]
    rout, rlse = attend_mods(*ref_leaves, torch.ones(1, dtype=torch.bool))
    want = torch.autograd.grad((rout * w).sum() + (rlse * u).sum(), ref_leaves)
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 1e-5
