//! Moving tiles out of the strided views into padded `f32` scratch: rows padded with zeros
//! to a multiple of 16 features, and transposed tiles (`Kᵀ`, `Vᵀ`) whose columns are keys.
//! Storage types are widened here, once per element, so the vector code sees only `f32`;
//! the bf16 dot-product path instead packs bf16 bits in pairs (`*_pairs`, `*_bf16`).

use crate::view::{Element, View};

/// `x` rounded up to a multiple of 16 (the widest vector), so every product is whole vectors.
pub(crate) fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Rows `start..start + rows` of `(b, h)` into `out` (`rows × d_pad`, zero padded).
pub(crate) fn rows<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    rows: usize,
    d_pad: usize,
    out: &mut [f32],
) {
    let d = view.shape()[3];
    for (r, dst) in out[..rows * d_pad].chunks_exact_mut(d_pad).enumerate() {
        view.load_rows(b, h, start + r, &mut dst[..d]);
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

/// Rows `start..start + rows` of `(b, h)` as bf16 bits into `out` (`rows × d_pad`, zero
/// padded): the pair-read `A` operand of the bf16 products.
pub(crate) fn rows_bf16<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    rows: usize,
    d_pad: usize,
    out: &mut [u16],
) {
    let d = view.shape()[3];
    for (r, dst) in out[..rows * d_pad].chunks_exact_mut(d_pad).enumerate() {
        for (x, o) in dst[..d].iter_mut().enumerate() {
            *o = view.get(b, h, start + r, x).bf16_bits();
        }
        dst[d..].fill(0);
    }
}

/// Keys `start..start + cols` of `(b, h)` as `Kᵀ` interleaved over features for the bf16
/// products: `out` is `d_pad / 2` rows of `ld` pairs, entry `(p, c)` = features `2p, 2p+1`
/// of key `start + c`. Columns past `cols` and features past `d` are zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kt_pairs<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    cols: usize,
    ld: usize,
    d_pad: usize,
    out: &mut [u32],
) {
    let d = view.shape()[3];
    out[..d_pad / 2 * ld].fill(0);
    for c in 0..cols {
        for x in 0..d {
            let bits = view.get(b, h, start + c, x).bf16_bits() as u32;
            out[x / 2 * ld + c] |= bits << (16 * (x % 2));
        }
    }
}

/// Values `start..start + cols` of `(b, h)` interleaved over keys for the bf16 products:
/// `out` is `rows_pad / 2` rows of `d_pad` pairs, entry `(p, x)` = feature `x` of keys
/// `start + 2p` and `start + 2p + 1`. Keys past `cols` and features past `d` are zero.
/// Returns whether every value is finite.
#[allow(clippy::too_many_arguments)]
pub(crate) fn v_pairs<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    cols: usize,
    rows_pad: usize,
    d_pad: usize,
    out: &mut [u32],
) -> bool {
    let d = view.shape()[3];
    out[..rows_pad / 2 * d_pad].fill(0);
    let mut finite = true;
    for c in 0..cols {
        let (p, half) = (c / 2, 16 * (c % 2));
        for x in 0..d {
            let bits = view.get(b, h, start + c, x).bf16_bits();
            finite &= bits & 0x7f80 != 0x7f80;
            out[p * d_pad + x] |= (bits as u32) << half;
        }
    }
    finite
}

#[cfg(target_arch = "x86_64")]
/// Unpacks a [`v_pairs`] tile into `f32` rows (`rows_pad × d_pad`), exactly.
pub(crate) fn v_from_pairs(pairs: &[u32], rows_pad: usize, d_pad: usize, out: &mut [f32]) {
    for c in 0..rows_pad {
        let (p, half) = (c / 2, 16 * (c % 2));
        for x in 0..d_pad {
            let bits = (pairs[p * d_pad + x] >> half) as u16;
            out[c * d_pad + x] = half::bf16::from_bits(bits).to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Rows `start..start + rows` of `(b, h)` transposed, as bf16 bits, into `out`
/// (`d_pad × ld`): row `x` holds feature `x` of every row, zero past `rows` and `d`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transposed_bf16<T: Element>(
    view: &View<T>,
    b: usize,
    h: usize,
    start: usize,
    rows: usize,
    ld: usize,
    d_pad: usize,
    out: &mut [u16],
) {
    let d = view.shape()[3];
    out[..d_pad * ld].fill(0);
    for r in 0..rows {
        for x in 0..d {
            out[x * ld + r] = view.get(b, h, start + r, x).bf16_bits();
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// In a tile interleaved over keys ([`v_pairs`] layout, rows `ld` pairs long), zeroes the
/// keys no query of the tile sees (the bf16 counterpart of [`zero_unseen_rows`]).
pub(crate) fn zero_unseen_pairs(pairs: &mut [u32], ld: usize, cols: usize, seen: &[u64]) {
    for c in 0..cols {
        if seen[c / 64] >> (c % 64) & 1 == 0 {
            let keep = if c % 2 == 0 { 0xffff_0000 } else { 0x0000_ffff };
            pairs[c / 2 * ld..(c / 2 + 1) * ld]
                .iter_mut()
                .for_each(|x| *x &= keep);
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Whether both bf16 halves of every pair are finite.
pub(crate) fn pairs_finite(pairs: &[u32]) -> bool {
    pairs.iter().fold(true, |ok, &x| {
        ok & (x & 0x7f80 != 0x7f80) & (x & 0x7f80_0000 != 0x7f80_0000)
    })
}
