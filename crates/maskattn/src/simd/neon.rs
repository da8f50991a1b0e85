//! NEON (aarch64): 4 lanes, 32 registers. Every aarch64 CPU has it, so no detection: the
//! kernels use it on aarch64 unless `MASKATTN_ISA=portable`. Mirrors the AVX-512 set,
//! including its NaN behaviour (`e^NaN` is NaN; only `x < −87.3` gives 0).

use std::arch::aarch64::*;

use super::exp::*;
use super::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Neon;

// SAFETY: NEON is part of every aarch64 target.
unsafe impl Simd for Neon {
    const NV_MAX: usize = 4;
    const MR: usize = 4;
    const W: usize = 4;
    type V = float32x4_t;

    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vmaxq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn reduce_max(v: float32x4_t) -> f32 {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vmaxvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn reduce_add(v: float32x4_t) -> f32 {
        // SAFETY: NEON is part of every aarch64 target; no memory is touched.
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn exp(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; register arithmetic only.
        unsafe {
            let zero = vcltq_f32(x, vdupq_n_f32(MIN_X));
            let x = vminq_f32(x, vdupq_n_f32(MAX_X));
            let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(LOG2E)));
            let r = vfmsq_f32(x, n, vdupq_n_f32(LN2_HI));
            let r = vfmsq_f32(r, n, vdupq_n_f32(LN2_LO));
            let mut p = vdupq_n_f32(P0);
            for c in [P1, P2, P3, P4, P5] {
                p = vfmaq_f32(vdupq_n_f32(c), p, r);
            }
            let y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), vmulq_f32(p, r), r);
            // 2^n from the exponent bits; n ≥ −126 wherever the lane is kept.
            let n = vmaxq_f32(n, vdupq_n_f32(-126.0));
            let pow2 = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
                vcvtq_s32_f32(n),
                vdupq_n_s32(127),
            )));
            vbslq_f32(zero, vdupq_n_f32(0.0), vmulq_f32(y, pow2))
        }
    }
    #[inline(always)]
    unsafe fn tanh(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; register arithmetic only.
        unsafe {
            let z = vmulq_f32(x, x);
            let mut p = vdupq_n_f32(T0);
            for c in [T1, T2, T3, T4] {
                p = vfmaq_f32(vdupq_n_f32(c), p, z);
            }
            let small = vfmaq_f32(x, vmulq_f32(p, z), x);
            let a = vabsq_f32(x);
            // NaN compares false: it takes the `big` branch, which keeps it NaN.
            let is_small = vcltq_f32(a, vdupq_n_f32(TANH_SMALL));
            if vminvq_u32(is_small) == u32::MAX {
                // The usual case under soft-capping (|z| < 0.625 c): no e^x, no division.
                return small;
            }
            let e = Self::exp(vaddq_f32(a, a));
            let one = vdupq_n_f32(1.0);
            let big = vsubq_f32(one, vdivq_f32(vdupq_n_f32(2.0), vaddq_f32(e, one)));
            // copysign: the sign bit from `x`, the rest from `big`.
            let big = vbslq_f32(vdupq_n_u32(0x8000_0000), x, big);
            vbslq_f32(is_small, small, big)
        }
    }
    #[inline(always)]
    unsafe fn select(bits: u32, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of every aarch64 target; the load reads a local array of 4.
        unsafe {
            let lane_bit = vld1q_u32([1u32, 2, 4, 8].as_ptr());
            vbslq_f32(vtstq_u32(vdupq_n_u32(bits), lane_bit), a, b)
        }
    }
}
