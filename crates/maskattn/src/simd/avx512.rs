//! AVX-512F: 16 lanes, mask registers for selects, `scalef` for the exponent of `e^x`.

use std::arch::x86_64::*;

use super::exp::*;
use super::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

// SAFETY: every method enables exactly AVX-512F (+FMA), and `dispatch!` reaches this set
// only where `Isa::available` found it.
unsafe impl Simd for Avx512 {
    const NV_MAX: usize = 4;
    /// 4 × 4 zmm accumulators + 4 B vectors + 1 broadcast: 21 of 32 registers.
    const MR: usize = 4;
    const W: usize = 16;
    type V = __m512;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce_max(v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce_add(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let zero = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(MIN_X));
        // `min` returns its second operand where one is NaN: NaN stays NaN (e^NaN = NaN).
        let x = _mm512_min_ps(_mm512_set1_ps(MAX_X), x);
        // `n = round(x / ln 2)` from one fused add (see `exp.rs`, `ROUND_BIAS`).
        let n = _mm512_sub_ps(
            _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND_BIAS)),
            _mm512_set1_ps(ROUND_BIAS),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P0);
        for c in [P1, P2, P3, P4, P5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_scalef_ps(!zero, p, n)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tanh(x: __m512) -> __m512 {
        let z = _mm512_mul_ps(x, x);
        let mut p = _mm512_set1_ps(T0);
        for c in [T1, T2, T3, T4] {
            p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(c));
        }
        let small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
        // NaN compares false: it takes the `big` branch, which keeps it NaN.
        let a = _mm512_abs_ps(x);
        let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(TANH_SMALL));
        if is_small == u16::MAX {
            // The usual case under soft-capping (|z| < 0.625 c): no e^x, no division.
            return small;
        }
        // SAFETY: `exp` needs AVX-512F, enabled here.
        let e = unsafe { Self::exp(_mm512_add_ps(a, a)) };
        let one = _mm512_set1_ps(1.0);
        let big = _mm512_sub_ps(
            one,
            _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)),
        );
        // `big` ≥ 0: copysign is an or with the sign bit of `x`.
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        let big = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), sign));
        _mm512_mask_mov_ps(big, is_small, small)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn select(bits: u32, a: __m512, b: __m512) -> __m512 {
        _mm512_mask_mov_ps(b, bits as u16, a)
    }
}
