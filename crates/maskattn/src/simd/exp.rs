//! Constants of the vectorised `e^x` (Cephes `expf`): `x = n ln 2 + r`, `|r| ≤ ln 2 / 2`,
//! `e^r` by a degree-7 polynomial (`1 + r + r²·P(r)`, evaluated as one Horner chain),
//! `e^x = e^r · 2^n`. Within 2 units of 2⁻²⁴ relatively on the range used here
//! (`exp_tests.rs`).
//!
//! The softmax spends most of its vector work here, and on Intel cores that work shares
//! ports 0 and 1 with the products' FMAs, so each operation saved is time saved. The vector
//! sets get `n` and `2^n` from one fused add of [`ROUND_BIAS`] instead of a round, a
//! conversion to integers and an integer add.

pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two so that `x − n ln 2` is exact for the `n` that occur.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
pub(crate) const P0: f32 = 1.987_569_1e-4;
pub(crate) const P1: f32 = 1.398_199_9e-3;
pub(crate) const P2: f32 = 8.333_452e-3;
pub(crate) const P3: f32 = 4.166_579_6e-2;
pub(crate) const P4: f32 = 1.666_666_5e-1;
pub(crate) const P5: f32 = 0.5;
/// `1.5 · 2²³ + 127`: `x / ln 2 + ROUND_BIAS` lands in `[2²³, 2²⁴)`, where floats are the
/// integers, so the sum is `round(x / ln 2) + ROUND_BIAS` (round to nearest); subtracting
/// it again gives `n` exactly, and the sum's low 9 mantissa bits hold `n + 127`, the
/// exponent field of `2^n` (for `n` in `[−127, 128]`): shifted left by 23 they are `2^n`.
pub(crate) const ROUND_BIAS: f32 = 12_583_039.0;
/// Below this, `e^x` is under the smallest normal float: the result is 0.
pub(crate) const MIN_X: f32 = -87.336_55;
/// Above this, `e^x` overflows (kept for completeness; scores minus their max are ≤ 0).
pub(crate) const MAX_X: f32 = 88.376_26;

/// The scalar form of the same computation; the portable set uses it lane by lane.
#[inline(always)]
pub(crate) fn exp_scalar(x: f32) -> f32 {
    if x < MIN_X {
        return 0.0; // also −∞
    }
    // Not `f32::min`, which would turn NaN into MAX_X: e^NaN must be NaN.
    let x = if x > MAX_X { MAX_X } else { x };
    let n = (x * LOG2E + ROUND_BIAS) - ROUND_BIAS;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = [P1, P2, P3, P4, P5, 1.0, 1.0]
        .iter()
        .fold(P0, |p, &c| p * r + c);
    // 2^n for n in [−126, 128]
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

// `tanh x` (Cephes `tanhf`): for `|x| < 0.625` the odd polynomial
// `x + x·x²·T(x²)`; above, `1 − 2 / (e^{2|x|} + 1)` with the sign of `x` (no cancellation:
// the result is ≥ 0.55 there). NaN stays NaN; ±∞ and large `|x|` give ±1.
pub(crate) const TANH_SMALL: f32 = 0.625;
pub(crate) const T0: f32 = -5.704_988_7e-3;
pub(crate) const T1: f32 = 2.063_909e-2;
pub(crate) const T2: f32 = -5.373_971_6e-2;
pub(crate) const T3: f32 = 1.333_144_2e-1;
pub(crate) const T4: f32 = -3.333_328e-1;

/// The scalar form of the vector `tanh`; the portable set uses it lane by lane.
#[inline(always)]
pub(crate) fn tanh_scalar(x: f32) -> f32 {
    let a = x.abs();
    if a < TANH_SMALL {
        let z = x * x;
        let p = (((T0 * z + T1) * z + T2) * z + T3) * z + T4;
        return p * z * x + x;
    }
    let t = 1.0 - 2.0 / (exp_scalar(a + a) + 1.0);
    t.copysign(x)
}
