//! Branch-free f32 approximations of `erf` and `tanh` (rational minimax fits, the ones Eigen
//! and XLA use) and `exp` (Cephes' `expf`), so that a loop over a slice vectorises: libm's
//! `erff` / `tanhf` / `expf` are scalar calls with branches, and they were most of the
//! GELU's and the cross-entropy's cost.
//!
//! Maximum absolute errors against f64 (measured over a dense grid of [−10, 10] and the
//! special values, `tests/fused.rs` holds them):

/// `|erf(x) − erf64(x)| ≤ ERF_MAX_ERR` for every finite f32 `x` (about 3.5 ulp of 1, near |x| = 3.3).
pub const ERF_MAX_ERR: f32 = 5e-7;
/// `|tanh(x) − tanh64(x)| ≤ TANH_MAX_ERR` for every finite f32 `x`.
pub const TANH_MAX_ERR: f32 = 5e-7;
/// `|exp(x) − exp64(x)| ≤ EXP_MAX_REL_ERR · exp64(x)` for `x` in [−87, 88] (about 1 ulp).
pub const EXP_MAX_REL_ERR: f32 = 1.2e-7;

/// `erf(x)`: `x·P(x²)/Q(x²)` on `x` clamped to [−4, 4] (beyond it erf is ±1 within 2e-8).
/// NaN stays NaN.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906_3e-4;
    let p = p * x2 - 2.954_6e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5_f32;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329e-3;
    let q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// `tanh(x)`: `x·P(x²)/Q(x²)` on `x` clamped to ±7.905 (beyond it tanh is ±1 in f32).
/// NaN stays NaN.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = -2.760_768_5e-16_f32;
    let p = p * x2 + 2.000_188e-13;
    let p = p * x2 - 8.604_672e-11;
    let p = p * x2 + 5.122_297e-8;
    let p = p * x2 + 1.485_722_4e-5;
    let p = p * x2 + 6.372_619_3e-4;
    let p = p * x2 + 4.893_524_6e-3;
    let q = 1.198_258_4e-6_f32;
    let q = q * x2 + 1.185_347e-4;
    let q = q * x2 + 2.268_434_6e-3;
    let q = q * x2 + 4.893_525e-3;
    x * p / q
}

/// `eˣ`: `2ⁿ·e^r` with `n = ⌊x·log₂e + ½⌋`, `r = x − n·ln 2` (in two parts, Cody–Waite) and
/// Cephes' degree-7 polynomial for `e^r`, on `x` clamped to [−87.34, 88] (below, the result
/// is the smallest normal 2⁻¹²⁶ instead of a subnormal or 0; above, `e⁸⁸` instead of ∞:
/// the callers only take exponents ≤ 0). NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from its exponent bits: n is in [−126, 127] after the clamp.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}
