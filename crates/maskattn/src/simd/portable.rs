//! The portable set: 8 lanes as a plain array. The compiler vectorises the element loops for
//! whatever the build target has (SSE2 on baseline x86-64, NEON on aarch64).

use super::exp::{exp_scalar, tanh_scalar};
use super::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Portable;

const W: usize = 8;
type V = [f32; W];

#[inline(always)]
fn map2(a: V, b: V, f: impl Fn(f32, f32) -> f32) -> V {
    let mut o = [0.0; W];
    for l in 0..W {
        o[l] = f(a[l], b[l]);
    }
    o
}

// SAFETY: plain Rust; no CPU feature is assumed.
unsafe impl Simd for Portable {
    const NV_MAX: usize = 1;
    const MR: usize = 4;
    const W: usize = W;
    type V = V;

    #[inline(always)]
    unsafe fn splat(x: f32) -> V {
        [x; W]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { (p as *const V).read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: the `Simd` contract: `p` is valid for `W` lanes (the caller's bounds).
        unsafe { (p as *mut V).write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn fma(a: V, b: V, c: V) -> V {
        let mut o = [0.0; W];
        for l in 0..W {
            // SAFETY: `fma1` of the portable set is plain arithmetic.
            o[l] = unsafe { Self::fma1(a[l], b[l], c[l]) };
        }
        o
    }
    #[inline(always)]
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
        // Fused where the target has it natively; a software fma would be far slower.
        if cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    unsafe fn add(a: V, b: V) -> V {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: V, b: V) -> V {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: V, b: V) -> V {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn max(a: V, b: V) -> V {
        map2(a, b, f32::max)
    }
    #[inline(always)]
    unsafe fn reduce_max(v: V) -> f32 {
        v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
    #[inline(always)]
    unsafe fn reduce_add(v: V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn exp(x: V) -> V {
        x.map(exp_scalar)
    }
    #[inline(always)]
    unsafe fn tanh(x: V) -> V {
        x.map(tanh_scalar)
    }
    #[inline(always)]
    unsafe fn select(bits: u32, a: V, b: V) -> V {
        let mut o = b;
        for l in 0..W {
            if bits >> l & 1 == 1 {
                o[l] = a[l];
            }
        }
        o
    }
}
