"""Second-order and forward-mode autograd: a backward run with ``create_graph=True`` (the
eager path's differentiable torch formulation), ``hessian``, dual tensors and the
``torch.func`` transforms, against the float64 reference under the design's accuracy rule
(the kernels take no float64, so gradcheck in float64 does not apply)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import maskattn
from reference import allowed_of, assert_rule, attend

# B, H_q, H_kv, L_q, L_k, d: grouped-query, L_q ≠ L_k, a causal row that sees nothing.
SHAPE = (2, 4, 2, 5, 7, 3)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, lq, lk, d = SHAPE
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    # Rounded to float32 once: every side sees the same values.
    return [t.float().double() for t in (q, k, v)]


def ref(mask_kind):
    b, hq, hkv, lq, lk, d = SHAPE
    allowed = allowed_of(mask_kind, lq, lk)
    return lambda q, k, v: attend(q, k, v, allowed)[0]


def ours(mask):
    return lambda q, k, v: maskattn.attention(q, k, v, mask)


MASKS = [("full", None), ("causal_top_left", maskattn.causal_top_left())]


def gradient_penalty(f, q, k, v, dtype):
    """``loss = |out|² + |∂Σout/∂q|²`` and its gradients: the WGAN-GP pattern."""
    q, k, v = [t.detach().to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
    out = f(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    loss = out.pow(2).sum() + gq.pow(2).sum()
    loss.backward()
    return [loss.detach().reshape(1), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("kind,mask", MASKS, ids=[m[0] for m in MASKS])
def test_eager_create_graph_gradient_penalty(kind, mask):
    q, k, v = inputs()
    golden = gradient_penalty(ref(kind), q, k, v, torch.float64)
    naive = gradient_penalty(ref(kind), q, k, v, torch.float32)
    got = gradient_penalty(ours(mask), q, k, v, torch.float32)
    for name, o, n, g in zip(("loss", "dq", "dk", "dv"), got, naive, golden):
        assert_rule(name, o, n, g, 1e-5)


def test_eager_hessian_matches_reference():
    q, k, v = inputs(1)
    f = lambda fn, dt: (lambda x: fn(x, k.to(dt), v.to(dt)).pow(2).sum())  # noqa: E731
    golden = torch.autograd.functional.hessian(f(ref("causal_top_left"), torch.float64), q)
    naive = torch.autograd.functional.hessian(f(ref("causal_top_left"), torch.float32), q.float())
    got = torch.autograd.functional.hessian(f(ours(maskattn.causal_top_left()), torch.float32), q.float())
    assert golden.abs().max() > 0.1
    assert_rule("hessian", got, naive, golden, 1e-5)


def test_eager_first_order_still_uses_the_fused_backward():
    """Without create_graph the backward is the fused kernel's, not the torch formulation:
    its gradient carries no graph."""
    q, k, v = [t.float().requires_grad_(True) for t in inputs(2)]
    out = maskattn.attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert gq.grad_fn is None
    (gq,) = torch.autograd.grad(maskattn.attention(q, k, v).sum(), q, create_graph=True)
    assert gq.grad_fn is not None


def tangents(seed=3):
    return inputs(seed)


def test_forward_ad_dual_tensors():
    q, k, v = inputs(4)
    tq, tk, tv = tangents()
    results = {}
    for side, f, dt in (("golden", ref("causal_top_left"), torch.float64),
                        ("naive", ref("causal_top_left"), torch.float32),
                        ("ours", ours(maskattn.causal_top_left()), torch.float32)):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.to(dt), t.to(dt)) for p, t in zip((q, k, v), (tq, tk, tv))]
            tangent = fwAD.unpack_dual(f(*duals)).tangent
        assert tangent is not None, f"{side}: the output carries no tangent"
        results[side] = tangent
    assert results["golden"].abs().max() > 0.1
    assert_rule("jvp", results["ours"], results["naive"], results["golden"], 1e-5)


def test_forward_ad_tangent_on_one_input_only():
    q, k, v = inputs(5)
    tv = tangents()[2]
    with fwAD.dual_level():
        out = maskattn.attention(q.float(), k.float(), fwAD.make_dual(v.float(), tv.float()))
        got = fwAD.unpack_dual(out).tangent
    # Linear in v: the tangent is the attention of the tangent.
    want = attend(q, k, tv, torch.ones(1, 1, dtype=torch.bool))[0]
    assert (got.double() - want).abs().max() < 1e-5


def test_torch_func_jvp_grad_hessian_vmap():
    """torch.func transforms wrap the inputs: the torch formulation runs (exact)."""
    q, k, v = inputs(6)
    tq = tangents()[0]
    mask = maskattn.causal_top_left()
    f_ref = lambda x: ref("causal_top_left")(x, k, v).pow(2).sum()  # noqa: E731
    f_ours = lambda x: ours(mask)(x, k.float(), v.float()).pow(2).sum()  # noqa: E731
    _, j_ref = torch.func.jvp(lambda x: ref("causal_top_left")(x, k, v), (q,), (tq,))
    _, j_ours = torch.func.jvp(lambda x: ours(mask)(x, k.float(), v.float()), (q.float(),), (tq.float(),))
    assert j_ref.abs().max() > 0.1
    assert (j_ours.double() - j_ref).abs().max() < 1e-5
    assert (torch.func.grad(f_ours)(q.float()).double() - torch.func.grad(f_ref)(q)).abs().max() < 1e-4
    h_ours = torch.func.hessian(f_ours)(q.float())
    assert (h_ours.double() - torch.func.hessian(f_ref)(q)).abs().max() < 1e-4
    batched = torch.func.vmap(lambda x: ours(mask)(x, k.float(), v.float()))(q.float().unsqueeze(0).expand(3, *q.shape))
    assert (batched - ours(mask)(q.float(), k.float(), v.float())).abs().max() < 1e-5


def test_custom_op_path_double_backward_raises_naming_the_op():
    """The torch.library op (torch.compile, modes, subclasses) has a first-order backward
    only: create_graph through it raises, naming the op, instead of a silent zero."""

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    q, k, v = [t.float().requires_grad_(True) for t in inputs(7)]
    with Passthrough():
        out = maskattn.attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_bwd"):
        gq.sum().backward()


def test_custom_op_path_forward_ad_raises_naming_the_feature():
    """Dual tensors on the op path (here: under a torch function mode) get an error naming
    forward-mode AD, not an output without a tangent."""

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    q, k, v = [t.float() for t in inputs(8)]
    with fwAD.dual_level(), Passthrough():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            maskattn.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)
