//! Row operations on a score tile shared by the forward and backward steps: bias, mask
//! (select, never multiply), row max, exponentials. A score tile is `rows × tk_pad`;
//! columns at or past `cols` are padding and count as hidden.

use crate::simd::Simd;

/// Visibility bits of lanes `c0 .. c0 + W` of tile row `r`: from the partial tile's bitmap
/// (all visible in a full tile), and never past the tile's real columns.
#[inline(always)]
pub(crate) fn lane_bits<S: Simd>(
    bits: Option<&[u64]>,
    words: usize,
    r: usize,
    c0: usize,
    cols: usize,
) -> u32 {
    let all = (1u32 << S::W) - 1;
    let mut m = match bits {
        Some(b) => (b[r * words + c0 / 64] >> (c0 % 64)) as u32 & all,
        None => all,
    };
    if c0 + S::W > cols {
        m &= (1u32 << cols.saturating_sub(c0)) - 1;
    }
    m
}

/// Turns a row of raw products `q·k` into scores `x = scale·(q·k) + bias`, sets hidden and
/// padding columns to `−∞` (overwriting whatever a NaN key produced) and returns the row's
/// maximum.
///
/// Every path (forward, decode, backward) forms its scores here, from products summed in
/// the same order, so the backward's `e^(x − LSE)` meets the very `x` the forward's LSE
/// came from: where one key dominates a row, `P` is then exactly 1 and `dV`, which sums `P`
/// over many rows, carries no systematic error. (Folding the scale into `Q` in one pass
/// and not the other rounds `x` differently, and `dV` drifted past the accuracy bound.)
///
/// # Safety
/// `s` (and `bias`) hold `tk_pad` values; `tk_pad % S::W == 0`.
#[inline(always)]
pub(crate) unsafe fn mask_row<S: Simd>(
    s: &mut [f32],
    scale: f32,
    bias: Option<&[f32]>,
    bits: Option<&[u64]>,
    words: usize,
    r: usize,
    cols: usize,
) -> f32 {
    // SAFETY: every access is at `c0 < s.len()` for `W` lanes, inside `s` and `bias` because
    // both hold `tk_pad` values and `tk_pad % W == 0` (this function's contract).
    unsafe {
        let ninf = S::splat(f32::NEG_INFINITY);
        let sv = S::splat(scale);
        let mut mx = ninf;
        for c0 in (0..s.len()).step_by(S::W) {
            let p = s.as_mut_ptr().add(c0);
            let mut x = S::mul(S::load(p), sv);
            if let Some(bias) = bias {
                x = S::add(x, S::load(bias.as_ptr().add(c0)));
            }
            let vis = lane_bits::<S>(bits, words, r, c0, cols);
            if vis != (1u32 << S::W) - 1 {
                x = S::select(vis, x, ninf);
            }
            S::store(p, x);
            mx = S::max(mx, x);
        }
        S::reduce_max(mx)
    }
}

/// `s[c] = e^(s[c] − sub)` in place (0 where `s[c] = −∞`); returns the row sum.
///
/// # Safety
/// As for [`mask_row`].
#[inline(always)]
pub(crate) unsafe fn exp_row<S: Simd>(s: &mut [f32], sub: f32) -> f32 {
    // SAFETY: `c0 + W ≤ s.len()` because `s.len() % W == 0` (the contract).
    unsafe {
        let subv = S::splat(sub);
        let mut sum = S::splat(0.0);
        for c0 in (0..s.len()).step_by(S::W) {
            let p = s.as_mut_ptr().add(c0);
            let e = S::exp(S::sub(S::load(p), subv));
            S::store(p, e);
            sum = S::add(sum, e);
        }
        S::reduce_add(sum)
    }
}

/// `y *= a` over whole vectors.
///
/// # Safety
/// `y.len() % S::W == 0`.
#[inline(always)]
pub(crate) unsafe fn scale<S: Simd>(a: f32, y: &mut [f32]) {
    // SAFETY: `c0 + W ≤ y.len()` because `y.len() % W == 0` (the contract).
    unsafe {
        let av = S::splat(a);
        for c0 in (0..y.len()).step_by(S::W) {
            let yp = y.as_mut_ptr().add(c0);
            S::store(yp, S::mul(av, S::load(yp)));
        }
    }
}

/// Whether pair (r, c) is visible in a tile with optional bitmap.
#[inline(always)]
pub(crate) fn visible(bits: Option<&[u64]>, words: usize, r: usize, c: usize) -> bool {
    bits.is_none_or(|b| b[r * words + c / 64] >> (c % 64) & 1 == 1)
}
