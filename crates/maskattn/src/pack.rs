//! Moving tiles out of the strided views into padded `f32` scratch: rows padded with zeros
//! to a multiple of 16 features, and transposed tiles (`Kᵀ`, `Vᵀ`) whose columns are keys.
//! Storage types are widened here, once per element, so the vector code sees only `f32`;
//! the bf16 dot-product path instead packs bf16 bits in pairs (`pairs_over_*`, `*_bf16`).

use crate::view::{Element, View};

/// `x` rounded up to a multiple of 16 (the widest vector), so every product is whole vectors.
pub(crate) fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Rows `start..start + len` of `(b, h)`: the part of a view one tile packs.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    pub b: usize,
    pub h: usize,
    pub start: usize,
    pub len: usize,
}

/// The span's rows into `out` (`len × d_pad`, zero padded).
pub(crate) fn rows<T: Element>(view: &View<T>, s: Span, d_pad: usize, out: &mut [f32]) {
    let d = view.shape()[3];
    for (r, dst) in out[..s.len * d_pad].chunks_exact_mut(d_pad).enumerate() {
        view.load_rows(s.b, s.h, s.start + r, &mut dst[..d]);
        dst[d..].fill(0.0);
    }
}

/// The span's rows transposed into `out` (`d_pad × ld`): column `c` holds row `start + c`.
/// Columns `len..ld` and feature rows `d..d_pad` are zero.
pub(crate) fn transposed<T: Element>(
    view: &View<T>,
    s: Span,
    (ld, d_pad): (usize, usize),
    out: &mut [f32],
) {
    let d = view.shape()[3];
    out[..d_pad * ld].fill(0.0);
    // A row's features are read as one contiguous run where the view allows it (the usual
    // layouts), then scattered down their columns; this runs once per tile of Q and of K
    // on the f32 forward, where element-wise strided reads cost ~5% of the whole call.
    if let Some((data, rs)) = view.f32_rows(s.b, s.h, s.start) {
        // f32 rows with contiguous features: read in place.
        for c in 0..s.len {
            for (x, &val) in data[c * rs..c * rs + d].iter().enumerate() {
                out[x * ld + c] = val;
            }
        }
        return;
    }
    let mut row = [0f32; 64];
    for x0 in (0..d).step_by(64) {
        let n = 64.min(d - x0);
        for c in 0..s.len {
            view.load_features(s.b, s.h, s.start + c, x0, &mut row[..n]);
            for (i, &val) in row[..n].iter().enumerate() {
                out[(x0 + i) * ld + c] = val;
            }
        }
    }
}

pub(crate) fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// The span's rows as bf16 bits into `out` (`len × d_pad`, zero padded): the pair-read `A`
/// operand of the bf16 products.
pub(crate) fn rows_bf16<T: Element>(view: &View<T>, s: Span, d_pad: usize, out: &mut [u16]) {
    let d = view.shape()[3];
    for (r, dst) in out[..s.len * d_pad].chunks_exact_mut(d_pad).enumerate() {
        match view.row(s.b, s.h, s.start + r) {
            Some(row) => {
                for (o, x) in dst[..d].iter_mut().zip(row) {
                    *o = x.bf16_bits();
                }
            }
            None => {
                for (x, o) in dst[..d].iter_mut().enumerate() {
                    *o = view.get(s.b, s.h, s.start + r, x).bf16_bits();
                }
            }
        }
        dst[d..].fill(0);
    }
}

/// The span's rows transposed and interleaved over features, the pair-read `B` operand of
/// a bf16 product over features (`Kᵀ` for `Q·Kᵀ`; `Vᵀ`, `Qᵀ` in the column form and the
/// backward): `out` is `d_pad / 2` rows of `ld` pairs, entry `(p, c)` = features `2p, 2p+1`
/// of row `start + c`. Columns past `len` and features past `d` are zero.
pub(crate) fn pairs_over_features<T: Element>(
    view: &View<T>,
    s: Span,
    (ld, d_pad): (usize, usize),
    out: &mut [u32],
) {
    let d = view.shape()[3];
    out[..d_pad / 2 * ld].fill(0);
    // Once per key tile and (bf16 column form) per query tile: rows read in place where
    // the view allows, two features to a pair, one store each (element-wise strided reads
    // and read-modify-writes cost ~8% of the bf16 forward).
    for c in 0..s.len {
        let bits = |x: usize, row: Option<&[T]>| match row {
            Some(row) => row[x].bf16_bits() as u32,
            None => view.get(s.b, s.h, s.start + c, x).bf16_bits() as u32,
        };
        let row = view.row(s.b, s.h, s.start + c);
        for p in 0..d / 2 {
            out[p * ld + c] = bits(2 * p, row) | bits(2 * p + 1, row) << 16;
        }
        if d % 2 == 1 {
            out[d / 2 * ld + c] = bits(d - 1, row);
        }
    }
}

/// The span's rows interleaved over rows, the pair-read `B` operand of a bf16 product over
/// keys (`V` for `P̃·V`, `K` for the backward's `dS·K`): `out` is `rows_pad / 2` rows of
/// `d_pad` pairs, entry `(p, x)` = feature `x` of rows `start + 2p` and `start + 2p + 1`.
/// Rows past `len` and features past `d` are zero. Returns whether every value is finite.
pub(crate) fn pairs_over_rows<T: Element>(
    view: &View<T>,
    s: Span,
    (rows_pad, d_pad): (usize, usize),
    out: &mut [u32],
) -> bool {
    let d = view.shape()[3];
    out[..rows_pad / 2 * d_pad].fill(0);
    let mut finite = true;
    for c in 0..s.len {
        let (p, half) = (c / 2, 16 * (c % 2));
        let dst = &mut out[p * d_pad..p * d_pad + d];
        let mut put = |x: usize, bits: u16| {
            finite &= bits & 0x7f80 != 0x7f80;
            dst[x] |= (bits as u32) << half;
        };
        match view.row(s.b, s.h, s.start + c) {
            Some(row) => row
                .iter()
                .enumerate()
                .for_each(|(x, v)| put(x, v.bf16_bits())),
            None => (0..d).for_each(|x| put(x, view.get(s.b, s.h, s.start + c, x).bf16_bits())),
        }
    }
    finite
}

#[cfg(target_arch = "x86_64")]
/// The span's rows transposed, as bf16 bits, into `out` (`d_pad × ld`): row `x` holds
/// feature `x` of every row, zero past `len` and `d`.
pub(crate) fn transposed_bf16<T: Element>(
    view: &View<T>,
    s: Span,
    (ld, d_pad): (usize, usize),
    out: &mut [u16],
) {
    let d = view.shape()[3];
    out[..d_pad * ld].fill(0);
    for r in 0..s.len {
        for x in 0..d {
            out[x * ld + r] = view.get(s.b, s.h, s.start + r, x).bf16_bits();
        }
    }
}
