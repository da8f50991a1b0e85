//! Tile-level building blocks shared by the forward and backward kernels: the scaled,
//! biased and masked score tile, and the two vector primitives everything else is made of.
//!
//! A tile holds up to `tile_q` query rows and `tile_k` key columns, each row of `d` features
//! contiguous in a scratch buffer (loaded from the strided views).

use crate::bias::Bias;
use crate::block::Tile;

/// `Σ a[x] b[x]`, with independent partial sums so the compiler can keep them in vector
/// registers instead of one serial chain.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (x, y) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in a_tail.iter().zip(b_tail) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha · x`.
#[inline]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

/// Whether column `c` of tile row `r` is allowed, given a partial tile's bitmap.
#[inline(always)]
pub(crate) fn bit(bits: &[u64], words: usize, r: usize, c: usize) -> bool {
    bits[r * words + c / 64] >> (c % 64) & 1 == 1
}

/// Where a score tile sits: the (b, h) it belongs to and its first query and key.
pub(crate) struct TilePos {
    pub b: usize,
    pub h: usize,
    pub i0: usize,
    pub j0: usize,
    pub rows: usize,
    pub cols: usize,
}

/// `s[r][c] = scale · (q_r · k_c) + bias`, and `−∞` where the tile's bitmap hides the pair.
/// Hidden pairs are overwritten, not multiplied, so NaN in a hidden key cannot survive.
/// `s` is `rows × tile_k` (row stride `tile_k`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores(
    q: &[f32],
    k: &[f32],
    d: usize,
    scale: f32,
    bias: Option<&Bias>,
    tile: Tile,
    words: usize,
    pos: &TilePos,
    tile_k: usize,
    s: &mut [f32],
) {
    for r in 0..pos.rows {
        let qr = &q[r * d..(r + 1) * d];
        let srow = &mut s[r * tile_k..r * tile_k + pos.cols];
        for (c, sv) in srow.iter_mut().enumerate() {
            *sv = scale * dot(qr, &k[c * d..(c + 1) * d]);
        }
        if let Some(bias) = bias {
            let brow = bias.row(pos.b, pos.h, pos.i0 + r);
            if brow.len() == 1 {
                srow.iter_mut().for_each(|sv| *sv += brow[0]);
            } else {
                let brow = &brow[pos.j0..pos.j0 + pos.cols];
                srow.iter_mut().zip(brow).for_each(|(sv, bv)| *sv += bv);
            }
        }
        if let Tile::Partial(bits) = tile {
            for (c, sv) in srow.iter_mut().enumerate() {
                if !bit(bits, words, r, c) {
                    *sv = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Whether pair (r, c) takes part in the products of this tile: always in a full tile,
/// per bit in a partial one. Products skip the rest (select, never multiply by zero).
#[inline(always)]
pub(crate) fn visible(tile: Tile, words: usize, r: usize, c: usize) -> bool {
    match tile {
        Tile::Partial(bits) => bit(bits, words, r, c),
        _ => true,
    }
}
