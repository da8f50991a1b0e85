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
use std::sync::OnceLock;

use super::{check_sizes, register_tiles, MatMut, Update};
use crate::simd::{current_isa, Isa};

const NV_MAX: usize = 4;
const W: usize = 16;

/// Whether the bf16 products are used now: the CPU has AVX512-BF16 (and BW), the kernels run on
/// AVX-512 (so `set_isa`/`MASKATTN_ISA` forcing a narrower set also turns them off), and
/// `MASKATTN_BF16_DOT=0` has not switched them off (for comparison).
pub(crate) fn enabled() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    current_isa() == Isa::Avx512
        && *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
                && std::env::var("MASKATTN_BF16_DOT").as_deref() != Ok("0")
        })
}

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
/// [`enabled`] is true. (The operands' bounds were checked when they were made.)
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn gemm(c: MatMut, a: Pairs, b: Pairs, update: Update) {
    check_sizes((c.rows, c.cols), (a.rows, a.pairs), (b.rows, b.pairs, b.cs));
    debug_assert!(b.pairs.is_multiple_of(W));
    let (m, n, kp, accumulate) = (a.rows, b.pairs, a.pairs, update == Update::Add);
    let (cp, ldc) = (c.data.as_mut_ptr(), c.rs);
    macro_rules! go {
        ($mr:literal, $nv:literal, $i:ident, $j:ident) => {{
            // SAFETY: `register_tiles!` hands out blocks with `i < m`, `j·W < n`: inside A, B
            // and C as `check_sizes` matched them; AVX512-BF16 is present (`enabled()`).
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
    register_tiles!(m, n / W, NV_MAX, |i, j| go);
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
    // caller (`gemm`, a `target_feature` function) runs only where `enabled()` is true.
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
/// [`enabled`] is true; the buffers hold what the sizes say.
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
/// [`enabled`] is true; the buffers hold what the sizes say.
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
