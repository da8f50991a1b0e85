//! AVX2 with FMA: 8 lanes; selects expand the bit mask into a lane mask.

use std::arch::x86_64::*;

use super::exp::*;
use super::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: every method enables exactly AVX2+FMA, and `dispatch!` reaches this set only
// where `Isa::available` found them.
unsafe impl Simd for Avx2 {
    // The register tile is shaped for 16 ymm registers and two 256-bit FMA ports (Zen 2/3,
    // Haswell–Skylake client), not copied from AVX-512's 4 × 4 zmm: 6 rows × 2 vectors is
    // 12 accumulators + 2 B vectors + 1 broadcast = 15 of 16 registers. 12 independent FMA
    // chains cover the FMA latency (4–5 cycles) × 2 ports with room to spare, where the old
    // 4 × 2 (8 chains) sat exactly at the limit and stalled on any late load; and each
    // k step issues 8 loads for 12 FMAs (4 × 2: 6 for 8), so the loads stay off the
    // critical path on Haswell's 2 load ports too. (`llvm-mca` figures: docs/kernels.md.)
    const NV_MAX: usize = 2;
    const MR: usize = 6;
    const W: usize = 8;
    type V = __m256;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_max(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        _mm_cvtss_f32(m)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_add(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        // Unordered "not less than": NaN lanes are kept, and `min` returns its second
        // operand where one is NaN, so e^NaN = NaN.
        let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(MIN_X));
        let x = _mm256_min_ps(_mm256_set1_ps(MAX_X), x);
        // `n = round(x / ln 2)` and `2^n` from one fused add (see `exp.rs`, `ROUND_BIAS`):
        // no round, no float-to-int conversion, no integer add.
        let a = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(ROUND_BIAS));
        let n = _mm256_sub_ps(a, _mm256_set1_ps(ROUND_BIAS));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P0);
        for c in [P1, P2, P3, P4, P5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // The exponent bits of `a` hold `n + 127` wherever the lane is kept (`n ≥ −126`).
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(a)));
        _mm256_and_ps(_mm256_mul_ps(p, pow2), keep)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tanh(x: __m256) -> __m256 {
        let z = _mm256_mul_ps(x, x);
        let mut p = _mm256_set1_ps(T0);
        for c in [T1, T2, T3, T4] {
            p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(c));
        }
        let small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
        let sign = _mm256_set1_ps(-0.0);
        let a = _mm256_andnot_ps(sign, x);
        // NaN compares false (ordered): it takes the `big` branch, which keeps it NaN.
        let is_small = _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(TANH_SMALL));
        if _mm256_movemask_ps(is_small) == 0xFF {
            // The usual case under soft-capping (|z| < 0.625 c): no e^x, no division.
            return small;
        }
        // SAFETY: `exp` needs AVX2 and FMA, enabled here.
        let e = unsafe { Self::exp(_mm256_add_ps(a, a)) };
        let one = _mm256_set1_ps(1.0);
        let big = _mm256_sub_ps(
            one,
            _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)),
        );
        let big = _mm256_or_ps(big, _mm256_and_ps(sign, x)); // `big` ≥ 0: copysign
        _mm256_blendv_ps(big, small, is_small)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn select(bits: u32, a: __m256, b: __m256) -> __m256 {
        let lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let m = _mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_set1_epi32(bits as i32), lane_bit),
            lane_bit,
        );
        _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m))
    }
}
