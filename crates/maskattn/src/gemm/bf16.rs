//! Tile products on AVX512-BF16 (`vdpbf16ps`): for bf16 storage only, where the inputs
//! already are bf16 and the widened f32 path spends its time converting and multiplying
//! at half the rate the CPU offers.
//!
//! `vdpbf16ps acc, a, b` adds `a[2l]·b[2l] + a[2l+1]·b[2l+1]` to f32 lane `l`: the products
//! of two bf16 are exact in f32, the sums are rounded as an f32 chain (denormal inputs and
//! results are flushed to zero — below 1.2e-38, far under every tolerance). The reduction
//! dimension therefore comes in *pairs*, which fixes the layouts:
//!
//! - `A [m × 2·kp]` is bf16 rows in natural order, read as `u32` pairs (row stride `lda`
//!   in pairs): `A[i][2p], A[i][2p+1]` form pair `p`, the broadcast operand.
//! - `B [2·kp × n]` is stored pair-interleaved, `kp` rows of `n` `u32`: entry `(p, c)`
//!   holds `B[2p][c]` in its low half and `B[2p+1][c]` in its high half.
//!
//! In the forward, `S = Q·Kᵀ` takes Q rows as A and `Kᵀ` interleaved over features; `P̃·V`
//! rounds `P̃` (in `[0, 1]`) to bf16 as A and takes V interleaved over keys — the rounding
//! PyTorch's flash kernel also makes, within a bf16 ulp and far inside the accuracy rule.

use std::arch::x86_64::*;

use super::{check_sizes, register_tiles, MatMut, Update};

const NV_MAX: usize = 4;
const W: usize = 16;

/// bf16 values in pairs, as the pair products read them: `rows` rows of `pairs` pairs
/// (`u32`: the first value in the low half), rows `rs` pairs apart — the A operand (bf16
/// rows in natural order) or the pair-interleaved B operand of the module comment.
#[derive(Clone, Copy)]
pub(crate) struct Pairs<'a> {
    pub(super) ptr: *const u32,
    pub(super) rows: usize,
    pub(super) pairs: usize,
    pub(super) rs: usize,
    /// Pair `p` of a row at `p · cs` (1 but for [`Pairs::by_pair`]).
    pub(super) cs: usize,
    _data: std::marker::PhantomData<&'a [u32]>,
}

impl<'a> Pairs<'a> {
    fn checked(ptr: *const u32, len: usize, rows: usize, pairs: usize, rs: usize) -> Self {
        let needed = if rows == 0 || pairs == 0 {
            0
        } else {
            (rows - 1) * rs + pairs
        };
        assert!(needed <= len, "pair operand outside its buffer");
        Pairs {
            ptr,
            rows,
            pairs,
            rs,
            cs: 1,
            _data: std::marker::PhantomData,
        }
    }

    /// An A operand stored pair by pair: entry `(i, p)` at `p · ld + i` — what
    /// [`interleave_rows`] makes of a transposed tile (`P̃ᵀ`, keys × query rows) read as the
    /// `P̃` rows of `P̃·V`. Only the `vdpbf16ps` products take it (AMX tiles load rows).
    pub fn by_pair(data: &'a [u32], rows: usize, pairs: usize, ld: usize) -> Self {
        let p = Self::checked(data.as_ptr(), data.len(), pairs, rows, ld);
        Pairs {
            rows,
            pairs,
            rs: 1,
            cs: ld,
            ..p
        }
    }

    /// Pairs stored as `u32`.
    pub fn of_u32(data: &'a [u32], rows: usize, pairs: usize, rs: usize) -> Self {
        Self::checked(data.as_ptr(), data.len(), rows, pairs, rs)
    }

    /// bf16 bits stored as `u16` and read two at a time (unaligned reads).
    pub fn of_u16(data: &'a [u16], rows: usize, pairs: usize, rs: usize) -> Self {
        Self::checked(data.as_ptr().cast(), data.len() / 2, rows, pairs, rs)
    }
}

/// `C = A·B` or `C += A·B`, reducing over A's pairs (= B's rows), layouts as in the module
/// comment.
///
/// # Safety
/// [`bf16_instructions`](crate::simd::bf16_instructions) is true. (The operands' bounds
/// were checked when they were made.)
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn gemm(c: MatMut, a: Pairs, b: Pairs, update: Update) {
    check_sizes((c.rows, c.cols), (a.rows, a.pairs), (b.rows, b.pairs, b.cs));
    debug_assert!(b.pairs.is_multiple_of(W));
    let (m, n, kp, accumulate) = (a.rows, b.pairs, a.pairs, update == Update::Add);
    let (cp, ldc) = (c.data.as_mut_ptr(), c.rs);
    macro_rules! go {
        ($mr:literal, $nv:literal, $i:ident, $j:ident) => {{
            // SAFETY: `register_tiles!` hands out blocks with `i < m`, `j·W < n`: inside A, B
            // and C as `check_sizes` matched them; AVX512-BF16 is present
            // (`simd::bf16_instructions()`).
            let (a_blk, b_blk, c_blk) = unsafe {
                (
                    a.ptr.add($i * a.rs),
                    b.ptr.add($j * W),
                    cp.add($i * ldc + $j * W),
                )
            };
            unsafe {
                micro::<$mr, $nv>(
                    kp,
                    (a_blk, a.rs, a.cs),
                    (b_blk, b.rs),
                    (c_blk, ldc),
                    accumulate,
                )
            }
        }};
    }
    register_tiles!(m, n / W, super::MR, NV_MAX, |i, j| go);
}

#[inline(always)]
unsafe fn micro<const R: usize, const NV: usize>(
    kp: usize,
    (a, lda, cs): (*const u32, usize, usize),
    (b, ldb): (*const u32, usize),
    (c, ldc): (*mut f32, usize),
    accumulate: bool,
) {
    // SAFETY: the block is inside the operands (`gemm` hands out only such blocks); the
    // caller (`gemm`, a `target_feature` function) runs only where
    // `simd::bf16_instructions()` is true.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for p in 0..kp {
            let bp = b.add(p * ldb);
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(bp.add(v * W) as *const _);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    a.add(r * lda + p * cs).read_unaligned() as i32,
                ));
                for v in 0..NV {
                    row[v] = _mm512_dpbf16_ps(
                        row[v],
                        av,
                        std::mem::transmute::<__m512i, __m512bh>(bv[v]),
                    );
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let cp = c.add(r * ldc + v * W);
                let y = if accumulate {
                    _mm512_add_ps(_mm512_loadu_ps(cp), x)
                } else {
                    x
                };
                _mm512_storeu_ps(cp, y);
            }
        }
    }
}

/// Rounds `rows` rows of `src` (`ld` apart, `n` values each, `n % 16 == 0`) to bf16 (to
/// nearest, ties to even) into `dst` (rows `n` apart).
///
/// # Safety
/// [`bf16_instructions`](crate::simd::bf16_instructions) is true; the buffers hold what the sizes
/// say.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn round_rows(src: &[f32], rows: usize, ld: usize, n: usize, dst: &mut [u16]) {
    debug_assert!(n.is_multiple_of(W) && dst.len() >= rows * n);
    // SAFETY: `r < rows`, `c0 + W ≤ n ≤ ld`: inside `src` and `dst` as the contract sizes them.
    unsafe {
        for r in 0..rows {
            for c0 in (0..n).step_by(W) {
                let x = _mm512_loadu_ps(src.as_ptr().add(r * ld + c0));
                let y = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x));
                _mm256_storeu_si256(dst.as_mut_ptr().add(r * n + c0) as *mut __m256i, y);
            }
        }
    }
}

/// Rounds rows of `src` (`rows` rows `ld` apart, `n` values each, `n % 16 == 0`) to bf16
/// and interleaves them in pairs of rows: `dst` gets `rows.div_ceil(2)` rows of `n` pairs,
/// entry `(p, c)` = rows `2p` (low half) and `2p + 1` (high half) of column `c`; a missing
/// last row is zero. This is the `B` layout of a product that reduces over `src`'s rows.
///
/// # Safety
/// [`bf16_instructions`](crate::simd::bf16_instructions) is true; the buffers hold what the sizes
/// say.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn interleave_rows(
    src: &[f32],
    rows: usize,
    ld: usize,
    n: usize,
    dst: &mut [u32],
) {
    debug_assert!(n.is_multiple_of(W) && dst.len() >= rows.div_ceil(2) * n);
    // SAFETY: rows `r0, r1 < rows` (the second is read only when it exists), `c0 + W ≤ n`:
    // inside `src` and `dst` as the contract sizes them.
    unsafe {
        // Lane 2l takes element l of the first row, lane 2l + 1 element l of the second.
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for p in 0..rows.div_ceil(2) {
            let (r0, r1) = (2 * p, 2 * p + 1);
            for c0 in (0..n).step_by(W) {
                let a = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(
                    _mm512_loadu_ps(src.as_ptr().add(r0 * ld + c0)),
                ));
                let b: __m256i = if r1 < rows {
                    std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                        src.as_ptr().add(r1 * ld + c0),
                    )))
                } else {
                    _mm256_setzero_si256()
                };
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                let y = _mm512_permutexvar_epi16(idx, both);
                _mm512_storeu_si512(dst.as_mut_ptr().add(p * n + c0) as *mut _, y);
            }
        }
    }
}

/// Where the 256 values of a 16 × 16 block of bf16 sit while [`transpose_rows`] moves them:
/// a value is named by 8 bits (`C0..C3` its source row, the key; `R0..R3` its source
/// column, the query row) and held in one of 8 registers of 32 words; `reg[i]` is the value
/// bit that bit `i` of the register index carries, `word[b]` the one bit `b` of the word
/// index carries.
#[derive(Clone, Copy)]
struct Layout {
    reg: [u8; 3],
    word: [u8; 5],
}

const C0: u8 = 0;
const C1: u8 = 1;
const C2: u8 = 2;
const C3: u8 = 3;
const R0: u8 = 4;
const R1: u8 = 5;
const R2: u8 = 6;
const R3: u8 = 7;

/// Source rows `2x, 2x + 1` in register `x` (16 words each).
const LOADED: Layout = Layout {
    reg: [C1, C2, C3],
    word: [R0, R1, R2, R3, C0],
};
/// Each step trades one register bit for one word bit, the last also puts the words in
/// their final order: output rows `2x, 2x + 1` in register `x`.
const STEPS: [Layout; 4] = [
    LOADED,
    Layout {
        reg: [R1, C2, C3],
        word: [R0, C1, R2, R3, C0],
    },
    Layout {
        reg: [R1, R2, C3],
        word: [R0, C1, C2, R3, C0],
    },
    Layout {
        reg: [R1, R2, R3],
        word: [C0, C1, C2, C3, R0],
    },
];

/// The `vpermt2w` selectors of the step from `from` to `to`, which differ in register bit
/// `k` only: `[v][w]` is where word `w` of the output register with bit `k` = `v` comes from
/// in the pair of input registers with bit `k` = 0 (selector bit 5 clear) and 1 (set).
const fn swap_selectors(from: Layout, to: Layout, k: usize) -> [[u16; 32]; 2] {
    let mut i = 0;
    while i < 3 {
        assert!(
            i == k || from.reg[i] == to.reg[i],
            "a step moves one register bit"
        );
        i += 1;
    }
    let mut sel = [[0u16; 32]; 2];
    let mut v = 0;
    while v < 2 {
        let mut w = 0;
        while w < 32 {
            // The value bits of output word `w` (the other register bits agree on both
            // sides and play no part).
            let mut bits = [0u16; 8];
            bits[to.reg[k] as usize] = v as u16;
            let mut b = 0;
            while b < 5 {
                bits[to.word[b] as usize] = (w >> b) as u16 & 1;
                b += 1;
            }
            let mut src = bits[from.reg[k] as usize] << 5;
            b = 0;
            while b < 5 {
                src |= bits[from.word[b] as usize] << b;
                b += 1;
            }
            sel[v][w] = src;
            w += 1;
        }
        v += 1;
    }
    sel
}

/// Step `i`'s selectors (register bit `i` traded).
const SELECTORS: [[[u16; 32]; 2]; 3] = [
    swap_selectors(STEPS[0], STEPS[1], 0),
    swap_selectors(STEPS[1], STEPS[2], 1),
    swap_selectors(STEPS[2], STEPS[3], 2),
];

/// Transposes `src` (`cols` rows `ld` apart: a tile computed transposed, `P̃ᵀ` as keys ×
/// query rows) into `rows` rows of `dst` (`n` apart) rounded to bf16 as [`round_rows`]
/// rounds (to nearest, ties to even, by the same instruction: the same bits):
/// `dst[r·n + c] = bf16(src[c·ld + r])` for `c < cols`, 0 for `cols ≤ c < n`. This is
/// `P̃` as the natural-order A operand that AMX tiles load (`Pairs::of_u16`).
///
/// 16 × 16 blocks: 16 rows rounded to 16 bf16 each, two to a register, then three steps of
/// two-register word permutes (`vpermt2w`, [`SELECTORS`]) leave two output rows in each.
/// Lanes `rows ..< ld` of `src` are read (as whole vectors) and dropped; rows `cols..` are
/// never read.
///
/// # Safety
/// [`bf16_instructions`](crate::simd::bf16_instructions) is true (AVX512-BF16 and AVX512-BW).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn transpose_rows(
    src: &[f32],
    (cols, ld): (usize, usize),
    (rows, n): (usize, usize),
    dst: &mut [u16],
) {
    assert!(ld.is_multiple_of(W) && ld >= rows && src.len() >= cols * ld);
    assert!(n.is_multiple_of(W) && n >= cols && dst.len() >= rows * n);
    // Whole blocks of 16 columns past `cols` hold nothing: zero.
    let c_end = cols.div_ceil(W) * W;
    for r in 0..rows {
        dst[r * n + c_end..(r + 1) * n].fill(0);
    }
    // SAFETY: reads are rows `c < cols`, lanes `r0 .. r0 + 16 ≤ ld` of `src`; writes rows
    // `r < rows`, columns `c0 .. c0 + 16 ≤ c_end ≤ n` of `dst`: inside both (the asserts).
    // The selectors are 64-byte arrays.
    unsafe {
        let mut sel = [[_mm512_setzero_si512(); 2]; 3];
        for (s, sel) in sel.iter_mut().enumerate() {
            for (v, sel) in sel.iter_mut().enumerate() {
                *sel = _mm512_loadu_si512(SELECTORS[s][v].as_ptr().cast());
            }
        }
        let sp = src.as_ptr();
        let dp = dst.as_mut_ptr();
        for c0 in (0..cols).step_by(W) {
            let kc = (cols - c0).min(W);
            for r0 in (0..rows).step_by(W) {
                let at = sp.add(c0 * ld + r0);
                let y = if kc == W {
                    rounded_rows::<false>(at, ld, kc)
                } else {
                    rounded_rows::<true>(at, ld, kc)
                };
                let mut z = [_mm512_setzero_si512(); 8];
                for (x, z) in z.iter_mut().enumerate() {
                    *z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(y[2 * x]), y[2 * x + 1]);
                }
                for (k, sel) in sel.iter().enumerate() {
                    let mut t = z;
                    for x in (0..8).filter(|x| x & (1 << k) == 0) {
                        let (lo, hi) = (z[x], z[x | 1 << k]);
                        t[x] = _mm512_permutex2var_epi16(lo, sel[0], hi);
                        t[x | 1 << k] = _mm512_permutex2var_epi16(lo, sel[1], hi);
                    }
                    z = t;
                }
                let out = dp.add(r0 * n + c0);
                if rows - r0 >= W {
                    stored_rows::<false>(&z, out, n, W);
                } else {
                    stored_rows::<true>(&z, out, n, rows - r0);
                }
            }
        }
    }
}

/// Stores rows `2x` (low half) and `2x + 1` (high half) of register `x` at `out`, rows `n`
/// apart; with `EDGE`, only rows `< kr`.
///
/// # Safety
/// AVX-512F; rows `0 .. kr` (all 16 without `EDGE`) of 16 values at `out` are writable.
#[inline(always)]
unsafe fn stored_rows<const EDGE: bool>(z: &[__m512i; 8], out: *mut u16, n: usize, kr: usize) {
    // SAFETY: only rows `< kr` (`EDGE`) or `< 16` are written (the contract).
    unsafe {
        for (x, &z) in z.iter().enumerate() {
            let r = 2 * x;
            if !EDGE || r < kr {
                let lo = _mm512_castsi512_si256(z);
                _mm256_storeu_si256(out.add(r * n) as *mut __m256i, lo);
            }
            if !EDGE || r + 1 < kr {
                let hi = _mm512_extracti64x4_epi64::<1>(z);
                _mm256_storeu_si256(out.add((r + 1) * n) as *mut __m256i, hi);
            }
        }
    }
}

/// 16 rows `ld` apart from `at`, 16 lanes each, rounded to bf16 (to nearest even); with
/// `EDGE`, rows `kc..` are zero and never read (row `kc − 1` is loaded in their place and
/// masked off, which keeps the loop free of branches and the rows in registers).
///
/// # Safety
/// AVX512-BF16; rows `0 .. kc` (all 16 without `EDGE`) of 16 lanes are inside the buffer.
#[inline(always)]
unsafe fn rounded_rows<const EDGE: bool>(at: *const f32, ld: usize, kc: usize) -> [__m256i; W] {
    let mut y = [_mm256_setzero_si256(); W];
    // SAFETY: the rows read are `< kc` (`EDGE`) or `< 16`: inside the buffer (the contract).
    unsafe {
        for (c, y) in y.iter_mut().enumerate() {
            let (row, keep): (usize, __mmask16) = if EDGE {
                (c.min(kc - 1), if c < kc { 0xffff } else { 0 })
            } else {
                (c, 0xffff)
            };
            let x = _mm512_loadu_ps(at.add(row * ld));
            *y = std::mem::transmute::<__m256bh, __m256i>(_mm512_maskz_cvtneps_pbh(keep, x));
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::{round_rows, transpose_rows};
    use crate::pack::pad16;
    use crate::rng::SplitMix64;
    use crate::simd::bf16_instructions;

    /// Random f32 bits: normal numbers of either sign, a quarter of them exactly halfway
    /// between two bf16 (ties to even), some zeros; with `odd`, also denormals and NaNs
    /// (which `vcvtneps2bf16` flushes or quiets its own way).
    fn value(rng: &mut SplitMix64, odd: bool) -> f32 {
        let r = rng.next_u64();
        let sign = (r as u32 & 1) << 31;
        let exp = 100 + (r >> 8) as u32 % 50;
        let mut mant = (r >> 16) as u32 & 0x7f_ffff;
        if r % 4 == 1 {
            mant = (mant & !0xffff) | 0x8000;
        }
        let bits = match (r >> 40) % 16 {
            0 => sign,
            1 if odd => sign | (mant >> 3),
            2 if odd => 0x7fc0_0000 | mant,
            _ => sign | exp << 23 | mant,
        };
        f32::from_bits(bits)
    }

    /// Sizes `(cols, ld, rows, n)`: edges of every kind (single rows and columns, one past a
    /// block, strides wider than needed).
    const SIZES: [(usize, usize, usize, usize); 10] = [
        (1, 16, 1, 16),
        (5, 16, 3, 16),
        (16, 16, 16, 16),
        (17, 32, 31, 48),
        (33, 48, 47, 64),
        (64, 64, 64, 64),
        (63, 16, 1, 64),
        (1, 64, 63, 16),
        (48, 32, 32, 48),
        (101, 96, 77, 128),
    ];

    /// `dst` of `transpose_rows` after a sentinel fill (rows past `rows` must keep it).
    fn run(src: &[f32], (cols, ld, rows, n): (usize, usize, usize, usize)) -> Vec<u16> {
        let mut dst = vec![0xdeadu16; (rows + 1) * n];
        // SAFETY: the caller checked `bf16_instructions()`.
        unsafe { transpose_rows(src, (cols, ld), (rows, n), &mut dst) };
        assert!(
            dst[rows * n..].iter().all(|&x| x == 0xdead),
            "wrote past row {rows}"
        );
        dst
    }

    #[test]
    fn transpose_rows_transposes_and_rounds_as_the_row_form() {
        if !bf16_instructions() {
            eprintln!("transpose_rows: SKIPPED (no AVX512-BF16 path here)");
            return;
        }
        eprintln!("transpose_rows: ran the AVX512-BW/BF16 transpose");
        let mut rng = SplitMix64::new(5);
        for size @ (cols, ld, rows, n) in SIZES {
            assert!(ld == pad16(ld) && ld >= rows && n == pad16(n) && n >= cols);
            // Against a scalar transpose and `half`'s rounding, on normal numbers and zeros.
            let src: Vec<f32> = (0..cols * ld).map(|_| value(&mut rng, false)).collect();
            let dst = run(&src, size);
            for r in 0..rows {
                for c in 0..n {
                    let want = if c < cols {
                        half::bf16::from_f32(src[c * ld + r]).to_bits()
                    } else {
                        0
                    };
                    let got = dst[r * n + c];
                    assert_eq!(got, want, "{size:?}: ({r}, {c})");
                }
            }
            // The same bits as `round_rows` of the transposed f32 (zero past `cols`, as the
            // row form's `P̃`), denormals and NaNs included.
            let src: Vec<f32> = (0..cols * ld).map(|_| value(&mut rng, true)).collect();
            let mut t = vec![0f32; rows * n];
            for r in 0..rows {
                for c in 0..cols {
                    t[r * n + c] = src[c * ld + r];
                }
            }
            let mut want = vec![0u16; rows * n];
            // SAFETY: `bf16_instructions()`; `t` and `want` hold `rows` rows of `n`.
            unsafe { round_rows(&t, rows, n, n, &mut want) };
            assert!(
                run(&src, size)[..rows * n] == want[..],
                "{size:?}: bits differ"
            );
        }
    }
}
