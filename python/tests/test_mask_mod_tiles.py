"""``from_mask_mod`` evaluated tile by tile: the interval pass settles whole tiles, only the
tiles a mask cuts through are evaluated pair by pair, and the result equals the dense
evaluation of the same ``mask_mod`` (the path before: every pair in one ``[B, H, L_q, L_k]``
tensor), on odd sizes, for masks the interval pass follows and masks it cannot."""

import math

import pytest
import torch

import maskattn
from maskattn import _maskattn as native
from maskattn.ops import _allowed


def dense_of(mask_mod, B, H, L_q, L_k):
    """``mask_mod`` on every pair at once, as from_mask_mod evaluated it before."""
    idx = [torch.arange(n).view([n if i == d else 1 for i in range(4)]) for d, n in enumerate((B, H, L_q, L_k))]
    return mask_mod(*idx).expand(B, H, L_q, L_k)


def allowed_of(block):
    return _allowed(block._id, [], block.shape)


LENGTHS = torch.tensor([150, 77, 3])
DOCS = torch.cat([torch.zeros(1, 40), torch.ones(1, 61), torch.full((1, 100), 2)], dim=1).long().repeat(3, 1)
DOCS[1] = torch.arange(201) // 17  # another packing in the second row


def causal(b, h, q, kv):
    return q >= kv


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < 37)


def per_head_window_and_padding(b, h, q, kv):
    return ((q - kv).abs() <= 8 * (h + 1)) & (kv < LENGTHS[b])


def documents_by_index(b, h, q, kv):
    # FlexAttention's packed-documents idiom: indexing a tensor by the indices.
    return (DOCS[b, q] == DOCS[b, kv]) & (q >= kv)


def chunked_and_prefix(b, h, q, kv):
    return (q // 50 == kv // 50) | (kv < 5) | torch.where(q > 120, kv % 7 == 0, False)


def not_followed(b, h, q, kv):
    # bitwise_and of two indices: no interval rule, so every tile is evaluated pair by pair.
    return torch.bitwise_and(q, kv) == 0


MASK_MODS = [causal, sliding, per_head_window_and_padding, documents_by_index, chunked_and_prefix, not_followed]
SHAPES = [(3, 2, 201, 201), (2, 3, 67, 150), (1, 2, 150, 67), (3, 1, 1, 129)]


@pytest.mark.parametrize("mask_mod", MASK_MODS, ids=[f.__name__ for f in MASK_MODS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tiles_equal_the_dense_evaluation(mask_mod, shape):
    B, H, L_q, L_k = shape
    if mask_mod is documents_by_index and not (L_q == L_k == DOCS.shape[1]):
        pytest.skip("the document ids are for L = 201")
    want = dense_of(mask_mod, B, H, L_q, L_k)
    block = maskattn.from_mask_mod(mask_mod, B, H, L_q, L_k)
    dense = maskattn.BlockMask(maskattn.dense(want.contiguous()), B, H, L_q, L_k)
    assert torch.equal(allowed_of(block), want)
    assert block.skipped_tile_fraction == dense.skipped_tile_fraction
    assert block.hidden_pair_fraction == dense.hidden_pair_fraction
    # The kernels read the same tiles: the same output, bit for bit.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, 16, generator=g) for n in (L_q, L_k, L_k))
    assert torch.equal(maskattn.attention(q, k, v, block), maskattn.attention(q, k, v, dense))
    tq, tk = native.tile_sizes(L_q, L_k)
    # One tile table per batch row (and head) only where the mask reads b (and h).
    rows = {per_head_window_and_padding: B * H, documents_by_index: B}.get(mask_mod, 1)
    table = rows * math.ceil(L_q / tq) * math.ceil(L_k / tk)
    if mask_mod is not_followed:
        # Not followed by the interval pass: every tile evaluated pair by pair.
        assert block._tiles_evaluated == table
    elif L_q > tq and L_k > tk:
        # Followed: only some tiles were evaluated pair by pair.
        assert block._tiles_evaluated < table


def test_a_causal_mask_mod_at_128k_compiles_in_tiles():
    L = 131072
    block = maskattn.from_mask_mod(causal, 1, 1, L, L)
    n = L // 64
    # Only the diagonal tiles were evaluated pair by pair; the rest are settled as full
    # (below the diagonal) or empty (above), and the counts say so exactly.
    assert block._tiles_evaluated == n
    assert block.skipped_tile_fraction == (n * (n - 1) // 2) / (n * n)
    assert block.hidden_pair_fraction == pytest.approx(1 - (L * (L + 1) // 2) / (L * L), abs=1e-12)
    assert block.shape == (1, 1, L, L)


def test_a_mask_mod_reading_b_and_h_keeps_a_table_per_row_and_head():
    block = maskattn.from_mask_mod(per_head_window_and_padding, 3, 2, 201, 201)
    want = dense_of(per_head_window_and_padding, 3, 2, 201, 201)
    assert torch.equal(allowed_of(block), want)
    # A mask reading neither shares one table across batch rows and heads.
    shared = maskattn.from_mask_mod(causal, 3, 2, 201, 201)
    assert torch.equal(allowed_of(shared), dense_of(causal, 3, 2, 201, 201))
    assert shared._tiles_evaluated == 4  # the 4 diagonal tiles of one table


def test_zero_sizes_and_bad_sizes():
    assert maskattn.from_mask_mod(causal, 0, 1, 5, 5).shape == (0, 1, 5, 5)
    assert maskattn.from_mask_mod(causal, 1, 1, 5, 0).shape == (1, 1, 5, 0)
    with pytest.raises(ValueError, match="L_q must be an int"):
        maskattn.from_mask_mod(causal, 1, 1, -1, 5)
    with pytest.raises(ValueError, match="H must be an int"):
        maskattn.from_mask_mod(causal, 1, 2.0, 5, 5)
