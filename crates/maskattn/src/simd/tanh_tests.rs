//! The vector `tanh` of every instruction set against `f64::tanh`: its stated error bound,
//! and NaN / ±∞ as documented on [`Simd::tanh`].

use super::every_set::{map_on, on_every_set, Op};
use super::*;

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
    for (name, got) in on_every_set(Op::Tanh, &xs) {
        check(&name, &xs, &got);
    }
    // ±∞ → ±1.
    // SAFETY: the portable set needs no feature.
    let s = unsafe {
        map_on::<Portable>(
            Op::Tanh,
            &[
                f32::INFINITY,
                f32::NEG_INFINITY,
                -0.0,
                0.0,
                1.0,
                1.0,
                1.0,
                1.0,
            ],
        )
    };
    assert_eq!(&s[..3], &[1.0, -1.0, 0.0]);
}
