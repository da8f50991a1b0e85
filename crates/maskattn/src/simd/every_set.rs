//! Test helper: a vector function of [`Simd`] applied on every instruction set this CPU
//! has (the portable set first), for `exp_tests.rs` and `tanh_tests.rs`.

use super::*;

/// The vector functions the tests check against f64.
#[derive(Clone, Copy)]
pub(super) enum Op {
    Exp,
    Tanh,
}

/// `op` of `xs` on set `S`, `W` lanes at a time.
///
/// # Safety
/// The CPU has `S`'s features.
pub(super) unsafe fn map_on<S: Simd>(op: Op, xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for (src, dst) in xs.chunks_exact(S::W).zip(out.chunks_exact_mut(S::W)) {
        // SAFETY: both chunks hold exactly `W` values; the features are the caller's.
        unsafe {
            let x = S::load(src.as_ptr());
            let y = match op {
                Op::Exp => S::exp(x),
                Op::Tanh => S::tanh(x),
            };
            S::store(dst.as_mut_ptr(), y);
        }
    }
    out
}

/// `(set name, op of xs)` for the portable set and every set the CPU has, printing a
/// SKIPPED line for each set it lacks. `xs.len()` is a multiple of 16.
pub(super) fn on_every_set(op: Op, xs: &[f32]) -> Vec<(String, Vec<f32>)> {
    // SAFETY: the portable set needs no feature.
    let mut out = vec![("Portable".to_string(), unsafe {
        map_on::<Portable>(op, xs)
    })];
    for isa in Isa::available() {
        let got = match isa {
            // SAFETY: `available` lists only sets the CPU has.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { map_on::<Avx512>(op, xs) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { map_on::<Avx2>(op, xs) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { map_on::<Neon>(op, xs) },
            _ => continue,
        };
        out.push((format!("{isa:?}"), got));
    }
    for isa in Isa::ALL.iter().filter(|i| !Isa::available().contains(i)) {
        println!("{isa:?}: SKIPPED (not on this CPU)");
    }
    out
}
