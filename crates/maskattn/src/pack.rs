//! Moving tiles out of the strided views into padded `f32` scratch: rows padded with zeros
//! to a multiple of 16 features, and transposed tiles (`Kᵀ`, `Vᵀ`) whose columns are keys.
//! Storage types are widened here, once per element, so the vector code sees only `f32`.

use crate::view::{Element, View};

/// `x` rounded up to a multiple of 16 (the widest vector), so every product is whole vectors.
pub(crate) fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Rows `start..start + rows` of `(b, h)` into `out` (`rows × d_pad`, zero padded), times `scale`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    rows: usize,
    d_pad: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = view.shape()[3];
    for (r, dst) in out[..rows * d_pad].chunks_exact_mut(d_pad).enumerate() {
        view.load_rows(b, h, start + r, &mut dst[..d]);
        if scale != 1.0 {
            dst[..d].iter_mut().for_each(|x| *x *= scale);
        }
        dst[d..].fill(0.0);
    }
}

/// Rows `start..start + cols` of `(b, h)` transposed into `out` (`d_pad × ld`): column `c`
/// holds row `start + c`. Columns `cols..ld` and feature rows `d..d_pad` are zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transposed<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    cols: usize,
    ld: usize,
    d_pad: usize,
    out: &mut [f32],
) {
    let d = view.shape()[3];
    out[..d_pad * ld].fill(0.0);
    let mut row = [0f32; 16];
    // 16 features at a time, so a strided view is read row by row, not element by element.
    for x0 in (0..d).step_by(16) {
        let n = 16.min(d - x0);
        for c in 0..cols {
            for (i, slot) in row[..n].iter_mut().enumerate() {
                *slot = view.get(b, h, start + c, x0 + i).to_f32();
            }
            for (i, &val) in row[..n].iter().enumerate() {
                out[(x0 + i) * ld + c] = val;
            }
        }
    }
}

pub(crate) fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// Bit `c` of the returned mask: column `c` of a partial tile is visible to at least one of
/// its `rows` rows. Columns visible to none can hold anything; callers zero them before a
/// product that would multiply them by zero.
pub(crate) fn seen_columns(bits: &[u64], words: usize, rows: usize, out: &mut [u64]) {
    out[..words].fill(0);
    for r in 0..rows {
        for w in 0..words {
            out[w] |= bits[r * words + w];
        }
    }
}

/// Zeroes the rows of `tile` (`cols × ld`) whose key no query of the tile can see.
pub(crate) fn zero_unseen_rows(tile: &mut [f32], ld: usize, cols: usize, seen: &[u64]) {
    for c in 0..cols {
        if seen[c / 64] >> (c % 64) & 1 == 0 {
            tile[c * ld..(c + 1) * ld].fill(0.0);
        }
    }
}
