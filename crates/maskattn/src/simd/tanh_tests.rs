//! The vector `tanh` of every instruction set against `f64::tanh`: its stated error bound,
//! and NaN / ±∞ as documented on [`Simd::tanh`].

use super::*;

/// `tanh` of `xs` on set `S`, `W` lanes at a time.
///
/// # Safety
/// The CPU has `S`'s features.
unsafe fn tanh_all<S: Simd>(xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for (src, dst) in xs.chunks_exact(S::W).zip(out.chunks_exact_mut(S::W)) {
        // SAFETY: both chunks hold exactly `W` values; the features are the caller's.
        unsafe { S::store(dst.as_mut_ptr(), S::tanh(S::load(src.as_ptr()))) };
    }
    out
}

fn check(name: &str, xs: &[f32], got: &[f32]) {
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    for (&x, &g) in xs.iter().zip(got) {
        let want = (x as f64).tanh();
        if x.is_nan() {
            assert!(g.is_nan(), "{name}: tanh(NaN) = {g}");
            continue;
        }
        let abs = (g as f64 - want).abs();
        worst_abs = worst_abs.max(abs);
        if want != 0.0 {
            worst_rel = worst_rel.max(abs / want.abs());
        }
        // The bound stated on `Simd::tanh`: 2 · 2⁻²³ absolute, 4 · 2⁻²⁴ relative.
        assert!(
            abs <= 2.0 * f32::EPSILON as f64,
            "{name}: tanh({x}) = {g}, exact {want}"
        );
        assert!(
            abs <= 4.0 * f32::EPSILON as f64 / 2.0 * want.abs().max(f32::MIN_POSITIVE as f64),
            "{name}: tanh({x}) = {g}, exact {want}: relative error {}",
            abs / want.abs()
        );
    }
    println!("{name}: tanh max abs error {worst_abs:.3e}, max rel error {worst_rel:.3e}");
}

fn inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (-200_000..200_000).map(|i| i as f32 * 1e-4).collect();
    xs.extend((0..2000).map(|i| 1e-30f32 * 1.05f32.powi(i)));
    xs.extend((0..2000).map(|i| -1e-30f32 * 1.05f32.powi(i)));
    xs.extend([
        0.625,
        -0.625,
        0.624_999_9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        f32::MAX,
        f32::MIN,
        88.0,
        44.2,
    ]);
    xs.resize(xs.len().next_multiple_of(16), 0.5);
    xs
}

#[test]
fn tanh_within_its_bound_on_every_set() {
    let xs = inputs();
    // SAFETY: the portable set needs no feature.
    check("Portable", &xs, &unsafe { tanh_all::<Portable>(&xs) });
    for isa in Isa::available() {
        let got = match isa {
            // SAFETY: `available` lists only sets the CPU has.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { tanh_all::<Avx512>(&xs) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { tanh_all::<Avx2>(&xs) },
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { tanh_all::<Neon>(&xs) },
            _ => continue,
        };
        check(&format!("{isa:?}"), &xs, &got);
    }
    for isa in Isa::ALL.iter().filter(|i| !Isa::available().contains(i)) {
        println!("{isa:?}: SKIPPED (not on this CPU)");
    }
    // ±∞ → ±1.
    // SAFETY: the portable set needs no feature.
    let s = unsafe {
        tanh_all::<Portable>(&[
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            1.0,
            1.0,
            1.0,
            1.0,
        ])
    };
    assert_eq!(&s[..3], &[1.0, -1.0, 0.0]);
}
