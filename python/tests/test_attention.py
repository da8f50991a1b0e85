"""maskattn.attention against the float64 reference: every mask kind, random shapes,
poisoned hidden keys, empty rows, strided inputs read in place, half types."""

import math
import random

import pytest
import torch

import maskattn
from reference import allowed_of, attend, check_against_reference


def run_with(mask):
    return lambda q, k, v: maskattn.attention(q, k, v, mask, return_lse=True)


def qkv(b, hq, hkv, lq, lk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    return q, k, v


# (name, B, H_q, H_kv, L_q, L_k, d): L = 1, odd lengths both ways, odd head dims, GQA / MQA.
SHAPES = [
    ("one", 1, 1, 1, 1, 1, 8),
    ("odd", 1, 2, 1, 113, 203, 59),
    ("odd_t", 2, 2, 2, 203, 113, 11),
    ("gqa", 2, 6, 2, 70, 70, 16),
    ("mqa", 1, 4, 1, 1, 130, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_full_and_causal_random_shapes(shape):
    _, b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d)
    check_against_reference(run_with(None), q, k, v, allowed_of("full", lq, lk))
    check_against_reference(run_with(maskattn.causal()), q, k, v, allowed_of("causal", lq, lk))


def test_random_shapes_and_scales():
    rnd = random.Random(7)
    for case in range(6):
        hkv = rnd.randint(1, 2)
        hq = hkv * rnd.randint(1, 3)
        b, lq, lk, d = rnd.randint(1, 2), rnd.randint(1, 140), rnd.randint(1, 140), rnd.randint(1, 40)
        scale = rnd.choice([None, 0.3])
        q, k, v = qkv(b, hq, hkv, lq, lk, d, seed=case)
        run = lambda q, k, v: maskattn.attention(q, k, v, maskattn.causal(), scale=scale, return_lse=True)  # noqa: E731
        check_against_reference(run, q, k, v, allowed_of("causal", lq, lk), scale=scale, seed=case)


STRUCTURED = [
    ("causal_top_left", maskattn.causal_top_left(), {}),
    ("window", maskattn.window(17, 5), {"left": 17, "right": 5}),
    ("chunks", maskattn.chunks(24), {"c": 24}),
    ("block_causal", maskattn.block_causal(20), {"c": 20}),
    ("prefix", maskattn.prefix(30), {"p": 30}),
]


@pytest.mark.parametrize("name,mask,kw", STRUCTURED, ids=[s[0] for s in STRUCTURED])
def test_structured_masks(name, mask, kw):
    # L_q ≤ L_k keeps i' = i + L_k − L_q non-negative, where the definitions are plain.
    for lq, lk in ((97, 97), (70, 150)):
        q, k, v = qkv(2, 4, 2, lq, lk, 16)
        check_against_reference(run_with(mask), q, k, v, allowed_of(name, lq, lk, **kw))


def test_neighbourhood():
    h, w, r = 9, 11, 2
    lk = h * w
    q, k, v = qkv(1, 2, 2, lk, lk, 16)
    allowed = allowed_of("neighbourhood", lk, lk, w=w, r=r)
    check_against_reference(run_with(maskattn.neighbourhood(h, w, r)), q, k, v, allowed)


def test_key_padding_and_documents_and_dense():
    b, hq, hkv, l, d = 3, 4, 2, 90, 16
    q, k, v = qkv(b, hq, hkv, l, l, d)
    lengths = torch.tensor([90, 41, 1])
    j = torch.arange(l)
    kp = (j.view(1, 1, 1, l) < lengths.view(b, 1, 1, 1))
    check_against_reference(run_with(maskattn.key_padding(lengths)), q, k, v, kp)

    ids = torch.stack([torch.arange(l) // 25, torch.arange(l) // 7, torch.zeros(l, dtype=torch.long)])
    docs = (ids.view(b, 1, l, 1) == ids.view(b, 1, 1, l))
    check_against_reference(run_with(maskattn.documents(ids)), q, k, v, docs)

    g = torch.Generator().manual_seed(3)
    for dims in ((1, 1, l, l), (b, 1, l, l), (1, hq, l, l), (b, hq, l, l), (b, 1, 1, l), (l, l)):
        dense = torch.rand(dims, generator=g) < 0.4
        check_against_reference(run_with(maskattn.dense(dense)), q, k, v, dense)


def test_combinations():
    b, hq, hkv, l, d = 2, 2, 1, 100, 8
    q, k, v = qkv(b, hq, hkv, l, l, d)
    ids = torch.stack([torch.arange(l) // 30, torch.arange(l) // 45])
    docs = ids.view(b, 1, l, 1) == ids.view(b, 1, 1, l)
    causal = allowed_of("causal", l, l)
    window = allowed_of("window", l, l, left=10, right=10)
    lengths = torch.tensor([100, 63])
    kp = torch.arange(l).view(1, 1, 1, l) < lengths.view(b, 1, 1, 1)
    cases = [
        (maskattn.documents(ids) & maskattn.causal(), docs & causal),
        (maskattn.causal() & maskattn.key_padding(lengths), causal & kp),
        (maskattn.window(10, 10) | maskattn.prefix(5), window | allowed_of("prefix", l, l, p=5)),
        (~maskattn.window(10, 10) & maskattn.key_padding(lengths), ~window & kp),
        (maskattn.key_padding(lengths) & maskattn.documents(ids) & ~maskattn.chunks(16),
         kp & docs & ~allowed_of("chunks", l, l, c=16)),
    ]
    for mask, allowed in cases:
        check_against_reference(run_with(mask), q, k, v, allowed)


def test_from_mask_mod():
    b, hq, hkv, lq, lk, d = 2, 4, 2, 130, 150, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d)
    lengths = torch.tensor([150, 77])

    def mask_mod(bi, h, qi, kv):
        # A sliding window that differs per head, and key padding per batch row.
        return ((qi - kv).abs() <= 8 * (h + 1)) & (kv < lengths[bi])

    block = maskattn.from_mask_mod(mask_mod, b, hq, lq, lk)
    assert block.shape == (b, hq, lq, lk)
    i = torch.arange(lq).view(1, 1, lq, 1)
    j = torch.arange(lk).view(1, 1, 1, lk)
    h = torch.arange(hq).view(1, hq, 1, 1)
    allowed = ((i - j).abs() <= 8 * (h + 1)) & (j < lengths.view(b, 1, 1, 1))
    check_against_reference(run_with(block), q, k, v, allowed)
    # Most tiles of a narrow window are empty, and the compiled mask says so.
    assert block.skipped_tile_fraction > 0
    hidden = 1 - allowed.expand(b, hq, lq, lk).double().mean().item()
    assert math.isclose(block.hidden_pair_fraction, hidden, rel_tol=1e-9)


def test_block_mask_reused_and_shape_checked():
    q, k, v = (t.float() for t in qkv(1, 2, 2, 300, 300, 16))
    block = maskattn.causal().compile(1, 2, 300, 300)
    # 5 × 5 tiles of 64: the 10 above the diagonal are empty.
    assert block.skipped_tile_fraction == pytest.approx(10 / 25)
    a = maskattn.attention(q, k, v, block)
    b = maskattn.attention(q, k, v, maskattn.causal())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="compiled for"):
        maskattn.attention(q[:, :, :200], k, v, block)


def test_poisoned_hidden_keys_change_nothing():
    b, hq, hkv, l, d = 2, 4, 2, 150, 16
    q, k, v = (t.float() for t in qkv(b, hq, hkv, l, l, d))
    lengths = torch.tensor([150, 70])
    mask = maskattn.causal() & maskattn.key_padding(lengths)
    dout = torch.randn(b, hq, l, d)

    def run(k, v):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = maskattn.attention(*leaves, mask)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    clean = run(k, v)
    kp, vp = k.clone(), v.clone()
    kp[1, :, 70:] = float("nan")
    vp[1, :, 70:] = float("inf")
    kp[1, 0, 100:] = -float("inf")
    poisoned = run(kp, vp)
    for name, a, p in zip(("out", "dq", "dk", "dv"), clean, poisoned):
        assert torch.equal(a, p), f"{name} changed when hidden keys held NaN / inf"


def test_rows_that_see_nothing_are_zero():
    b, hq, hkv, l, d = 2, 2, 2, 80, 16
    q, k, v = (t.float() for t in qkv(b, hq, hkv, l, l, d))
    # Batch row 1 has no valid key at all; in row 0, queries 10..19 see nothing (dense).
    allowed = torch.ones(b, 1, l, l, dtype=torch.bool)
    allowed[0, :, 10:20] = False
    mask = maskattn.dense(allowed) & maskattn.key_padding(torch.tensor([80, 0]))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = maskattn.attention(*leaves, mask, return_lse=True)
    out.backward(torch.randn_like(out))
    dq, dk, dv = (t.grad for t in leaves)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, 10:20], torch.zeros_like(out[0, :, 10:20]))
    assert torch.all(lse[1] == -math.inf) and torch.all(lse[0, :, 10:20] == -math.inf)
    assert torch.all(torch.isfinite(lse[0, :, :10]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dq[0, :, 10:20], torch.zeros_like(dq[0, :, 10:20]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))


def test_strided_inputs_are_read_in_place(monkeypatch):
    b, h, l, d = 2, 4, 96, 16
    g = torch.Generator().manual_seed(0)
    # [B, L, H, d] buffers, as a projection leaves them, viewed as [B, H, L, d].
    bases = [torch.randn(b, l, h, d, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in bases)
    assert not q.is_contiguous()
    seen = []
    real = maskattn.ops._native.forward

    def spy(qkv, *rest):
        seen.append(qkv)
        return real(qkv, *rest)

    monkeypatch.setattr(maskattn.ops._native, "forward", spy)
    out = maskattn.attention(q, k, v, maskattn.causal())
    (rq, rk, rv), = seen
    for raw, t, base in zip((rq, rk, rv), (q, k, v), bases):
        assert raw[0] == base.data_ptr(), "the kernel was handed a copy, not the caller's buffer"
        assert raw[2] == t.stride()
    expect, _ = attend(*(t.double() for t in (q, k, v)), allowed_of("causal", l, l))
    assert (out.double() - expect).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_types(dtype):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 100, 130, 32
    q, k, v = qkv(b, hq, hkv, lq, lk, d)
    mask = maskattn.causal() & maskattn.key_padding(torch.tensor([130, 99]))
    allowed = allowed_of("causal", lq, lk) & (torch.arange(lk).view(1, 1, 1, lk) < torch.tensor([130, 99]).view(2, 1, 1, 1))
    ours = check_against_reference(run_with(mask), q, k, v, allowed, dtype=dtype)
    assert ours[0].dtype == dtype


def test_bad_inputs_raise():
    q = torch.randn(1, 3, 8, 4)
    k = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        maskattn.attention(q, k, k)
    with pytest.raises(ValueError, match="4-d"):
        maskattn.attention(q[0], k[0], k[0])
    with pytest.raises(TypeError, match="dtype"):
        maskattn.attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="lengths|mask"):
        maskattn.attention(q, q, q, maskattn.key_padding(torch.tensor([8, 8, 8])))
    with pytest.raises(TypeError):
        maskattn.attention(q, q, q, torch.ones(8, 8, dtype=torch.bool))


def test_custom_op_and_eager_path_agree():
    # Plain eager calls skip the op's Python dispatch (see ops.py); the registered op with
    # its register_autograd backward must give the very same bits.
    b, hq, hkv, l, d = 2, 4, 2, 100, 16
    q, k, v = (t.float() for t in qkv(b, hq, hkv, l, l, d))
    dout = torch.randn(b, hq, l, d)
    lengths = torch.tensor([100, 33])
    mask = maskattn.causal() & maskattn.key_padding(lengths)
    block = maskattn.window(20, 3).compile(b, hq, l, l)
    for m in (mask, block):
        mask_id, data = maskattn.masks._handle(m)
        runs = []
        for via_op in (False, True):
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            if via_op:
                out, lse = torch.ops.maskattn.attention_fwd(*leaves, mask_id, data, 0.25)
            else:
                out, lse = maskattn.attention(*leaves, m, scale=0.25, return_lse=True)
            out.backward(dout)
            runs.append([out.detach(), lse] + [t.grad for t in leaves])
        for name, a, o in zip(("out", "lse", "dq", "dk", "dv"), *runs):
            assert torch.equal(a, o), f"{name}: the op and the eager path differ"


def test_broadcast_output_gradient_and_thread_counts():
    # `out.sum().backward()` hands the backward an expanded dout (all strides 0): read in
    # place like any other strided tensor.
    b, hq, hkv, l, d = 1, 2, 1, 130, 16
    q, k, v = (t.float() for t in qkv(b, hq, hkv, l, l, d))
    mask = maskattn.documents(torch.arange(l).view(1, l) // 50) & maskattn.causal()

    def grads(expanded):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = maskattn.attention(*leaves, mask)
        if expanded:
            out.sum().backward()
        else:
            out.backward(torch.ones(out.shape))
        return [t.grad for t in leaves]

    default = maskattn.get_num_threads()
    try:
        maskattn.set_num_threads(1)
        assert maskattn.get_num_threads() == 1
        one = grads(True)
    finally:
        maskattn.set_num_threads(0)
    assert maskattn.get_num_threads() == default
    for a, b_ in zip(one, grads(False)):
        # The backward is deterministic for any number of threads (the kernel crate's promise).
        assert torch.equal(a, b_)


def test_block_mask_made_inline_lives_until_the_backward():
    import gc

    q, k, v = (t.float().requires_grad_(True) for t in qkv(1, 2, 2, 70, 70, 8))
    # Nothing but the autograd graph holds this block mask once the call returns.
    out = maskattn.attention(q, k, v, maskattn.causal().compile(1, 2, 70, 70))
    gc.collect()
    out.sum().backward()
    expect = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    maskattn.attention(*expect, maskattn.causal()).sum().backward()
    for a, b_ in zip((q, k, v), expect):
        assert torch.equal(a.grad, b_.grad)
