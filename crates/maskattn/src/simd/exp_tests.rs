//! The vector `e^x` of every instruction set against `f64::exp`: its stated error bound,
//! and the edges documented on [`Simd::exp`] (exactly 0 below `MIN_X` and at −∞, NaN for
//! NaN).

use super::exp::{MAX_X, MIN_X};
use super::*;

/// `e^x` of `xs` on set `S`, `W` lanes at a time.
///
/// # Safety
/// The CPU has `S`'s features.
unsafe fn exp_all<S: Simd>(xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for (src, dst) in xs.chunks_exact(S::W).zip(out.chunks_exact_mut(S::W)) {
        // SAFETY: both chunks hold exactly `W` values; the features are the caller's.
        unsafe { S::store(dst.as_mut_ptr(), S::exp(S::load(src.as_ptr()))) };
    }
    out
}

/// The bound stated on [`Simd::exp`], in units of `2⁻²⁴` relative to the exact value.
const BOUND: f64 = 3.0;

fn check(name: &str, xs: &[f32], got: &[f32]) {
    let mut worst = 0f64;
    for (&x, &g) in xs.iter().zip(got) {
        if x.is_nan() {
            assert!(g.is_nan(), "{name}: exp(NaN) = {g}");
            continue;
        }
        if x < MIN_X {
            assert!(g == 0.0, "{name}: exp({x}) = {g}, not 0");
            continue;
        }
        if x > 88.0 {
            continue; // the last half binade before overflow: not reached by the kernels
        }
        let want = (x as f64).exp();
        let rel = (g as f64 - want).abs() / want / (f32::EPSILON as f64 / 2.0);
        worst = worst.max(rel);
        assert!(
            rel <= BOUND,
            "{name}: exp({x}) = {g}, exact {want}: {rel:.2} units of 2^-24"
        );
    }
    println!("{name}: exp max relative error {worst:.2} units of 2^-24");
}

fn inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (-900_000..=880_000).map(|i| i as f32 * 1e-4).collect();
    // Around the rounding points of `n = round(x / ln 2)` and the cut-offs.
    for k in -127..=127 {
        let x = (k as f32 + 0.5) * std::f32::consts::LN_2;
        xs.extend([
            x,
            f32::from_bits(x.to_bits() + 1),
            f32::from_bits(x.to_bits() - 1),
        ]);
    }
    xs.extend([
        MIN_X,
        f32::from_bits(MIN_X.to_bits() + 1),
        f32::from_bits(MIN_X.to_bits() - 1),
        MAX_X,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        0.0,
        -0.0,
        f32::MIN,
        -1e-30,
        1e-30,
    ]);
    xs.resize(xs.len().next_multiple_of(16), 0.5);
    xs
}

#[test]
fn exp_within_its_bound_on_every_set() {
    let xs = inputs();
    // SAFETY: the portable set needs no feature.
    check("Portable", &xs, &unsafe { exp_all::<Portable>(&xs) });
    for isa in Isa::available() {
        let got = match isa {
            // SAFETY: `available` lists only sets the CPU has.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { exp_all::<Avx512>(&xs) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { exp_all::<Avx2>(&xs) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { exp_all::<Neon>(&xs) },
            _ => continue,
        };
        check(&format!("{isa:?}"), &xs, &got);
    }
    for isa in Isa::ALL.iter().filter(|i| !Isa::available().contains(i)) {
        println!("{isa:?}: SKIPPED (not on this CPU)");
    }
}
