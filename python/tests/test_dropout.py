"""Attention dropout through ``maskattn.attention(..., dropout_p, dropout_seed)``: the
kernels' own dropout, forward and backward on one keep pattern (regenerated from the seed,
never stored), against a float64 reference that applies the same pattern.

The pattern is recomputed here from its written definition (crates/maskattn/src/params.rs,
``Dropout``: a hash of ``(seed, b, h, i, j)``), not taken from the package under test."""

import math

import pytest
import torch

import maskattn
from reference import max_err

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def keep_pattern(p, seed, B, H, L_q, L_k):
    """Pair (b, h, i, j) is kept where the hash of its row key and j is ≥ p · 2³²."""
    threshold = int(p * 4294967296.0) & M32
    out = torch.empty(B, H, L_q, L_k, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(L_q):
                row = (b * H + h) * L_q + i
                z = seed ^ ((row * 0xD1B54A32D192ED03) & M64)
                z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
                key = (z ^ (z >> 31)) & M32
                for j in range(L_k):
                    x = key ^ ((j * 0x9E3779B9) & M32)
                    x ^= x >> 16
                    x = (x * 0x85EBCA6B) & M32
                    x ^= x >> 13
                    x = (x * 0xC2B2AE35) & M32
                    x ^= x >> 16
                    out[b, h, i, j] = x >= threshold
    return out


def reference(q, k, v, allowed, keep, p, scale=None):
    """``(out, lse)`` in q's dtype: ``O = (P ∘ keep / (1 − p)) V``, ``LSE`` of the undropped P."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.where(allowed, q @ k.transpose(-1, -2) * scale, torch.full((), -math.inf, dtype=q.dtype))
    lse = torch.logsumexp(s, dim=-1)
    prob = torch.where(allowed, torch.exp(s - lse.unsqueeze(-1)), torch.zeros((), dtype=q.dtype))
    return (prob * keep / (1 - p)) @ v, lse


def inputs(seed, B=2, Hq=4, Hkv=2, L_q=37, L_k=75, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g, dtype=torch.float64) for h, n in ((Hq, L_q), (Hkv, L_k), (Hkv, L_k))]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize(
    "shape",
    [(2, 4, 2, 37, 75, 16), (1, 3, 3, 1, 130, 32), (1, 2, 1, 70, 70, 8)],
    ids=["tiled", "one_query", "square"],
)
def test_forward_and_backward_equal_the_reference_with_the_same_pattern(p, shape):
    B, Hq, Hkv, L_q, L_k, d = shape
    seed = 1234 + int(p * 10)
    q64, k64, v64 = inputs(7, *shape)
    keep = keep_pattern(p, seed, B, Hq, L_q, L_k)
    assert torch.equal(maskattn.dropout_keep(p, seed, (B, Hq, L_q, L_k)), keep)
    # Causal, aligned bottom-right as maskattn's causal().
    i = torch.arange(L_q).view(L_q, 1) + (L_k - L_q)
    allowed = (torch.arange(L_k).view(1, L_k) <= i).expand(B, Hq, L_q, L_k)

    dout64 = torch.randn(B, Hq, L_q, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dlse64 = torch.randn(B, Hq, L_q, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grads(q, k, v, run):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = run(q, k, v)
        torch.autograd.backward([out, lse], [dout64.to(out.dtype), dlse64.to(lse.dtype)])
        return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]

    golden = grads(q64, k64, v64, lambda q, k, v: reference(q, k, v, allowed, keep, p))
    naive = grads(q64.float(), k64.float(), v64.float(), lambda q, k, v: reference(q, k, v, allowed, keep, p))
    kernel = grads(
        q64.float(),
        k64.float(),
        v64.float(),
        lambda q, k, v: maskattn.attention(
            q, k, v, maskattn.causal(), return_lse=True, dropout_p=p, dropout_seed=seed
        ),
    )
    for name, kern, nai, gold in zip(["out", "lse", "dq", "dk", "dv"], kernel, naive, golden):
        err, bound = max_err(kern, gold), 2 * max_err(nai, gold) + 1e-5
        assert err <= bound, f"{name}: error {err:.3e} exceeds {bound:.3e}"


def test_dropout_keeps_the_mean():
    # v = 1: each output is Σ_j P_ij z_ij, whose mean over the pattern is Σ_j P_ij = 1.
    B, H, L, d, p = 2, 4, 256, 8, 0.3
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, L, d, generator=g), torch.randn(B, H, L, d, generator=g)
    v = torch.ones(B, H, L, d)
    outs = torch.stack([maskattn.attention(q, k, v, dropout_p=p, dropout_seed=s)[..., 0] for s in range(40)])
    # 40 patterns × 2048 rows: the mean of z over ~10⁷ pairs, P-weighted.
    assert abs(outs.mean().item() - 1.0) < 0.01
    kept = maskattn.dropout_keep(p, 5, (B, H, L, L)).double().mean().item()
    assert abs(kept - (1 - p)) < 0.005


def test_same_seed_same_result_lse_undropped_and_torch_seed_reproduces():
    q, k, v = (t.float() for t in inputs(1))
    a, lse_a = maskattn.attention(q, k, v, return_lse=True, dropout_p=0.4, dropout_seed=9)
    b, _ = maskattn.attention(q, k, v, return_lse=True, dropout_p=0.4, dropout_seed=9)
    c, lse_c = maskattn.attention(q, k, v, return_lse=True, dropout_p=0.4, dropout_seed=10)
    _, lse_none = maskattn.attention(q, k, v, return_lse=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(lse_a, lse_c) and torch.equal(lse_a, lse_none)
    torch.manual_seed(0)
    x = maskattn.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(0)
    y = maskattn.attention(q, k, v, dropout_p=0.4)
    assert torch.equal(x, y)
    assert torch.equal(maskattn.attention(q, k, v, dropout_p=0.0, dropout_seed=3), maskattn.attention(q, k, v))


def test_the_op_path_runs_the_same_dropout():
    # Under a torch function mode the custom op (the torch.compile path) runs instead of the
    # eager autograd.Function: the same pattern, forward and backward.
    q, k, v = (t.float() for t in inputs(2))

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = maskattn.attention(qq, kk, vv, maskattn.causal(), dropout_p=0.3, dropout_seed=77)
        out.square().sum().backward()
        return out.detach(), qq.grad, kk.grad, vv.grad

    eager = run()

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        op = run()
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_bad_dropout_arguments_are_errors_naming_them():
    q, k, v = (t.float() for t in inputs(3))
    for p in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            maskattn.attention(q, k, v, dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p"):
        maskattn.attention(q, k, v, dropout_p="0.1")
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match="dropout_seed"):
            maskattn.attention(q, k, v, dropout_p=0.1, dropout_seed=seed)
    qq = q.clone().requires_grad_()
    out = maskattn.attention(qq, k, v, dropout_p=0.2, dropout_seed=1)
    with pytest.raises(NotImplementedError, match="create_graph"):
        torch.autograd.grad(out.sum(), qq, create_graph=True)
