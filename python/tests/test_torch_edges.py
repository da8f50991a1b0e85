"""Where the drop-ins must behave as torch does, on torch's own edge cases: empty
dimensions, nested tensors, masks of fewer than 2 dims, a non-bool ``is_causal``, scales
that are not finite in float32, ``nn.MultiheadAttention`` shapes torch rejects. Each case
runs torch's function on the same input: the same result (shape and values), or an
exception of the same type. Also: ``maskattn.attention``'s own errors for such input, and
``set_num_threads``' bounds."""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import maskattn

warnings.filterwarnings("ignore", message=".*nested tensors.*prototype.*")


def outcome(f):
    try:
        return f(), None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return None, type(e)


def assert_like_torch(ours, theirs, what):
    got, got_err = outcome(ours)
    want, want_err = outcome(theirs)
    assert got_err == want_err, f"{what}: torch gives {want_err or 'a result'}, the drop-in {got_err or 'a result'}"
    if want_err is None:
        got, want = (got, want) if isinstance(want, torch.Tensor) else (got[0], want[0])
        if want.is_nested:
            assert got.is_nested
            got, want = torch.cat([t.flatten() for t in got.unbind()]), torch.cat([t.flatten() for t in want.unbind()])
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch {tuple(want.shape)}"
        assert got.dtype == want.dtype
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4, equal_nan=True), what


def sdpa_pair(*args, **kw):
    return (lambda: maskattn.scaled_dot_product_attention(*args, **kw),
            lambda: F.scaled_dot_product_attention(*args, **kw))


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)


EMPTY = [
    ("batch0", (0, 2, 3, 4), (0, 2, 5, 4)),
    ("heads0", (1, 0, 3, 4), (1, 0, 5, 4)),
    ("lq0", (1, 2, 0, 4), (1, 2, 5, 4)),
    ("lk0", (1, 2, 3, 4), (1, 2, 0, 4)),
    ("d0", (1, 2, 3, 0), (1, 2, 5, 0)),
    ("3d_batch0", (0, 3, 4), (0, 5, 4)),
    ("3d_lk0", (2, 3, 4), (2, 0, 4)),
]


@pytest.mark.parametrize("name,qs,ks", EMPTY, ids=[e[0] for e in EMPTY])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"scale": 0.5}], ids=["plain", "causal", "scale"])
def test_sdpa_empty_dims_follow_torch(name, qs, ks, kw):
    q, k, v = r(*qs), r(*ks), r(*ks)
    assert_like_torch(*sdpa_pair(q, k, v, **kw), f"{name} {kw}")


def test_sdpa_empty_dims_backward():
    q, k, v = [r(*s).requires_grad_(True) for s in ((1, 2, 3, 4), (1, 2, 0, 4), (1, 2, 0, 4))]
    maskattn.scaled_dot_product_attention(q, k, v).sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_attention_empty_and_zero_head_dim_errors_name_the_problem():
    with pytest.raises(ValueError, match="head dim 0"):
        maskattn.attention(r(1, 2, 3, 0), r(1, 2, 5, 0), r(1, 2, 5, 0))
    with pytest.raises(ValueError, match="batch"):
        maskattn.attention(r(0, 2, 3, 4), r(0, 2, 5, 4), r(0, 2, 5, 4))


def test_mha_empty_sequence_follows_torch():
    torch.manual_seed(0)
    ours = maskattn.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    for qs, ks in (((2, 0, 8), (2, 3, 8)), ((0, 3, 8), (0, 3, 8))):
        q, kv = r(*qs), r(*ks)
        assert_like_torch(lambda: ours(q, kv, kv), lambda: ref(q, kv, kv), f"mha {qs} {ks}")


def jagged(lengths, heads=2, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(len(lengths))
    parts = [torch.randn(n, heads, d, generator=g, dtype=dtype) for n in lengths]
    return torch.nested.nested_tensor(parts, layout=torch.jagged).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_nested_jagged_follows_torch(dtype):
    q, k, v = jagged((3, 5), dtype=dtype), jagged((3, 5), dtype=dtype), jagged((3, 5), dtype=dtype)
    got = maskattn.scaled_dot_product_attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v)
    assert got.is_nested
    for a, b in zip(got.unbind(), want.unbind()):
        assert torch.equal(a, b)


def test_sdpa_nested_strided_follows_torch():
    parts = [r(2, n, 4) for n in (3, 5)]
    nt = torch.nested.nested_tensor(parts)
    assert_like_torch(*sdpa_pair(nt, nt, nt), "strided nested")


def test_attention_nested_is_a_type_error_naming_q():
    with pytest.raises(TypeError, match="^q is a nested tensor"):
        maskattn.attention(jagged((3, 5)), r(2, 2, 5, 8), r(2, 2, 5, 8))


@pytest.mark.parametrize("mask", [torch.ones(5, dtype=torch.bool), torch.tensor(True), torch.tensor(False)],
                         ids=["1d", "0d_true", "0d_false"])
def test_sdpa_masks_under_2_dims_follow_torch(mask):
    q, k, v = r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4)
    assert_like_torch(*sdpa_pair(q, k, v, attn_mask=mask), f"mask of {mask.dim()} dims")


@pytest.mark.parametrize("is_causal", [1, 0, 2, torch.tensor(True)], ids=["1", "0", "2", "tensor"])
def test_sdpa_non_bool_is_causal_follows_torch(is_causal):
    q, k, v = r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4)
    assert_like_torch(*sdpa_pair(q, k, v, is_causal=is_causal), f"is_causal={is_causal!r}")


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 1e40, -1e39, 3e38, 0.0, -0.5],
                         ids=["inf", "-inf", "nan", "1e40", "-1e39", "3e38", "0", "-0.5"])
def test_sdpa_scales_follow_torch(scale):
    q, k, v = r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4)
    assert_like_torch(*sdpa_pair(q, k, v, scale=scale), f"scale={scale}")
    ours, theirs = sdpa_pair(q, k, v, scale=scale, is_causal=True)
    if -torch.finfo(torch.float32).max <= scale <= 0:
        # torch 2.x's fused CPU kernel gives NaN for a causal call with scale ≤ 0 (it
        # scales the −∞ it masked with); its math path is the definition. (Scales beyond
        # float32 go to torch's own function, so they match it as it is.)
        theirs = lambda: math_sdpa(q, k, v, scale=scale, is_causal=True)  # noqa: E731
    assert_like_torch(ours, theirs, f"causal scale={scale}")


def math_sdpa(*args, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


def test_attention_scale_error_says_what_is_wrong():
    q = r(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"finite and within float32's range, got 1e\+40"):
        maskattn.attention(q, q, q, scale=1e40)
    with pytest.raises(ValueError, match="got nan"):
        maskattn.attention(q, q, q, scale=math.nan)


def mha_pair(batch_first=False):
    torch.manual_seed(1)
    ours = maskattn.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


MHA_BAD = [
    ("2d_kv_batched_q", (4, 2, 8), (5, 8), None, None),
    ("3d_kv_unbatched_q", (4, 8), (5, 2, 8), None, None),
    ("kv_batch_differs", (4, 2, 8), (5, 3, 8), None, None),
    ("kpm_wrong_length", (4, 2, 8), (5, 2, 8), (2, 4), None),
    ("kpm_wrong_batch", (4, 2, 8), (5, 2, 8), (3, 5), None),
    ("kpm_1d_batched", (4, 2, 8), (5, 2, 8), (5,), None),
    ("attn_mask_wrong", (4, 2, 8), (5, 2, 8), None, (4, 4)),
    ("attn_mask_3d_wrong", (4, 2, 8), (5, 2, 8), None, (3, 4, 5)),
    ("embed_wrong", (4, 2, 6), (5, 2, 6), None, None),
    ("ok_kpm", (4, 2, 8), (5, 2, 8), (2, 5), None),
    ("ok_unbatched_kpm", (4, 8), (5, 8), (5,), (4, 5)),
]


@pytest.mark.parametrize("name,qs,ks,kpm,am", MHA_BAD, ids=[m[0] for m in MHA_BAD])
def test_mha_shapes_follow_torch(name, qs, ks, kpm, am):
    ours, ref = mha_pair()
    q, kv = r(*qs), r(*ks)
    kpm = None if kpm is None else torch.zeros(kpm, dtype=torch.bool)
    am = None if am is None else torch.zeros(am, dtype=torch.bool)
    kw = dict(key_padding_mask=kpm, attn_mask=am)
    assert_like_torch(lambda: ours(q, kv, kv, **kw), lambda: ref(q, kv, kv, **kw), name)


def test_set_num_threads_bounds():
    most = 4 * (os.cpu_count() or 1)
    for bad in (-1, most + 1, 10**9):
        with pytest.raises(ValueError, match=f"set_num_threads\\({bad}\\)"):
            maskattn.set_num_threads(bad)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError):
            maskattn.set_num_threads(bad)
    try:
        maskattn.set_num_threads(most)
        assert maskattn.get_num_threads() == most
        maskattn.set_num_threads(1)
        assert maskattn.get_num_threads() == 1
    finally:
        maskattn.set_num_threads(0)
    assert maskattn.get_num_threads() >= 1
