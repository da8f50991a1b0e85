//! The vector `e^x` of every instruction set against `f64::exp`: its stated error bound,
//! and the edges documented on [`Simd::exp`] (exactly 0 below `MIN_X` and at −∞, NaN for
//! NaN).

use super::every_set::{on_every_set, Op};
use super::exp::{MAX_X, MIN_X};

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
    for (name, got) in on_every_set(Op::Exp, &xs) {
        check(&name, &xs, &got);
    }
}
