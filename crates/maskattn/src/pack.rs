//! Moving tiles out of the strided views into padded `f32` scratch: rows padded with zeros
//! to a multiple of 16 features, and transposed tiles (`Kᵀ`, `Vᵀ`) whose columns are keys.
//! Storage types are widened here, once per element, so the vector code sees only `f32`;
//! the bf16 dot-product path instead packs bf16 bits in pairs (`pairs_over_*`, `*_bf16`).

#[cfg(target_arch = "x86_64")]
use crate::simd::Isa;
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
    if s.len < ld || d < d_pad {
        // Only the padding needs it: a whole tile is overwritten below.
        out[..d_pad * ld].fill(0.0);
    }
    // A row's features are read as one contiguous run where the view allows it (the usual
    // layouts), then scattered down their columns; this runs once per tile of Q and of K
    // on the f32 forward, where element-wise strided reads cost ~5% of the whole call.
    if let Some((data, rs)) = view.f32_rows(s.b, s.h, s.start) {
        // f32 rows with contiguous features: read in place. The backward packs Kᵀ and Vᵀ
        // of every key tile; with one query row (a decode step) this scatter, one value
        // per cache line written, took more time than the products, so blocks of 8 rows ×
        // 8 features go through registers where AVX2 is there.
        #[cfg(target_arch = "x86_64")]
        let (rows8, feats8) = if matches!(crate::simd::current_isa(), Isa::Avx2 | Isa::Avx512) {
            let blocks = (s.len / 8 * 8, d / 8 * 8);
            // SAFETY: the ISA has AVX2.
            unsafe { transpose_blocks(data, rs, out, ld, blocks) };
            blocks
        } else {
            (0, 0)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (rows8, feats8) = (0, 0);
        let scatter = |out: &mut [f32], c: usize, xs: std::ops::Range<usize>| {
            for x in xs {
                out[x * ld + c] = data[c * rs + x];
            }
        };
        for c in 0..rows8 {
            scatter(out, c, feats8..d);
        }
        for c in rows8..s.len {
            scatter(out, c, 0..d);
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

/// `out[x·ld + c] = data[c·rs + x]` for `c < rows`, `x < feats` (multiples of 8), in 8 × 8
/// blocks.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_blocks(
    data: &[f32],
    rs: usize,
    out: &mut [f32],
    ld: usize,
    (rows, feats): (usize, usize),
) {
    for c0 in (0..rows).step_by(8) {
        for x0 in (0..feats).step_by(8) {
            // SAFETY: as this function's; `transpose8` checks the slices' extents.
            unsafe { transpose8(&data[c0 * rs + x0..], rs, &mut out[x0 * ld + c0..], ld) };
        }
    }
}

/// `dst[j·ld + i] = src[i·rs + j]` for `i, j < 8`: an 8 × 8 block transposed in registers.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose8(src: &[f32], rs: usize, dst: &mut [f32], ld: usize) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 7 * rs + 8 && dst.len() >= 7 * ld + 8);
    // SAFETY: the extents were checked above; loads and stores are unaligned.
    unsafe {
        // Macros, not closures: a closure would not inherit this function's features.
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        macro_rules! r {
            ($i:expr) => {
                _mm256_loadu_ps(sp.add($i * rs))
            };
        }
        macro_rules! w {
            ($j:expr, $v:expr) => {
                _mm256_storeu_ps(dp.add($j * ld), $v)
            };
        }
        // Rows a..h: pairs interleaved, then quadruples, then the 128-bit halves swapped.
        let (t0, t1) = (
            _mm256_unpacklo_ps(r!(0), r!(1)),
            _mm256_unpackhi_ps(r!(0), r!(1)),
        );
        let (t2, t3) = (
            _mm256_unpacklo_ps(r!(2), r!(3)),
            _mm256_unpackhi_ps(r!(2), r!(3)),
        );
        let (t4, t5) = (
            _mm256_unpacklo_ps(r!(4), r!(5)),
            _mm256_unpackhi_ps(r!(4), r!(5)),
        );
        let (t6, t7) = (
            _mm256_unpacklo_ps(r!(6), r!(7)),
            _mm256_unpackhi_ps(r!(6), r!(7)),
        );
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2); // a0 b0 c0 d0 | a4 b4 c4 d4
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2); // a1 b1 c1 d1 | a5 b5 c5 d5
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3); // a2 … | a6 …
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3); // a3 … | a7 …
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6); // e0 f0 g0 h0 | e4 f4 g4 h4
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        w!(0, _mm256_permute2f128_ps::<0x20>(s0, s4));
        w!(1, _mm256_permute2f128_ps::<0x20>(s1, s5));
        w!(2, _mm256_permute2f128_ps::<0x20>(s2, s6));
        w!(3, _mm256_permute2f128_ps::<0x20>(s3, s7));
        w!(4, _mm256_permute2f128_ps::<0x31>(s0, s4));
        w!(5, _mm256_permute2f128_ps::<0x31>(s1, s5));
        w!(6, _mm256_permute2f128_ps::<0x31>(s2, s6));
        w!(7, _mm256_permute2f128_ps::<0x31>(s3, s7));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `transposed` against the element-wise definition, on every block remainder (rows
    /// and features not multiples of 8), padded row strides, an offset start and a
    /// buffer that held garbage before (the padding must come out zero).
    #[test]
    fn transposed_matches_elementwise() {
        for (len, ld, d, d_pad, rs) in [
            (64, 64, 64, 64, 64),
            (13, 16, 21, 32, 24),
            (8, 16, 8, 16, 8),
            (1, 16, 64, 64, 64),
            (7, 16, 3, 16, 5),
        ] {
            let (b, h, start) = (1, 1, 2);
            let lk = start + len + 1;
            let shape = [2, 2, lk, d];
            let strides = [2 * lk * rs, lk * rs, rs, 1];
            let data: Vec<f32> = (0..2 * 2 * lk * rs).map(|i| i as f32 * 0.5 - 3.0).collect();
            let view = View::strided("k", &data, shape, strides).unwrap();
            let mut out = vec![f32::NAN; d_pad * ld];
            transposed(&view, Span { b, h, start, len }, (ld, d_pad), &mut out);
            for x in 0..d_pad {
                for c in 0..ld {
                    let want = if x < d && c < len {
                        view.get(b, h, start + c, x).to_f32()
                    } else {
                        0.0
                    };
                    assert_eq!(out[x * ld + c], want, "len {len} d {d}: [{x}, {c}]");
                }
            }
        }
    }
}
