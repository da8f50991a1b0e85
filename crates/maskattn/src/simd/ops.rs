//! The vector operations every instruction set provides: what the kernels are written
//! against (their implementations are the sibling files, chosen in `simd/mod.rs`).

/// Vector operations on `W` lanes of `f32`.
///
/// # Safety
/// Implementations use instructions that exist only when the matching CPU feature is
/// present; callers reach them only through [`Isa::detect`](super::Isa::detect). Pointer arguments must be
/// valid for `W` elements.
pub(crate) unsafe trait Simd: Copy + 'static {
    const W: usize;
    /// Vectors per row of the matrix-product register tile (what the register file holds).
    const NV_MAX: usize;
    /// Rows of C per register tile (`gemm`): `MR × NV_MAX` accumulators, with the `NV_MAX`
    /// vectors of one B row and a broadcast of A, fill the register file.
    const MR: usize;
    type V: Copy;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a · b + c` on one lane, fused exactly when [`Simd::fma`] is, so that a scalar dot
    /// product can reproduce the micro-kernel's rounding.
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn reduce_max(v: Self::V) -> f32;
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// `e^x`, within 3 units of 2⁻²⁴ of the exact value relatively (measured: 1.23 on AVX2
    /// and AVX-512, 1.59 portable; `exp_tests.rs`); exactly 0 for `x < −87.3` (so
    /// `e^−∞ = 0`, and a hidden score never turns into a tiny non-zero weight); NaN for NaN
    /// (a NaN score must reach the row sum, see `forward`).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// Lane `l` from `a` where bit `l` of `bits` is set, else from `b`.
    unsafe fn select(bits: u32, a: Self::V, b: Self::V) -> Self::V;
    /// `tanh x` (soft-capping): within 2⁻²³ of the exact value and within 3 · 2⁻²⁴ of it
    /// relatively (measured: 7.1e-8 and 1.3e-7; `exp.rs` has the method, `tanh_tests.rs`
    /// checks every set against `f64::tanh`); NaN for NaN, ±1 for ±∞.
    unsafe fn tanh(x: Self::V) -> Self::V;
}
