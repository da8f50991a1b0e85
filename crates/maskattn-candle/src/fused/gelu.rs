//! GELU as one candle op with a backward, in both forms: the exact one `x·Φ(x)` (BERT's
//! `gelu`) and the tanh approximation (candle's `Tensor::gelu`, GPT-2's `gelu_new`).
//!
//! candle computes either element by element through libm (`erff`, `tanhf`: scalar calls),
//! and its backward of the tanh form is a dozen tensor ops. Here the forward is one pass
//! with the vectorised approximations of [`approx`](super::approx), and the backward one
//! more (the derivative in closed form, from `x`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};

use super::approx;
use super::par::{map1, map2, multiversion};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/sqrt(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
/// `sqrt(2/π)`, as candle writes it.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;

/// `x·Φ(x) = x/2·(1 + erf(x/√2))`, with erf within [`approx::ERF_MAX_ERR`]; differentiable.
/// f32 CPU tensors take the fused op; others candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu(Form::Erf))
}

/// `x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, candle's `Tensor::gelu`, with tanh within
/// [`approx::TANH_MAX_ERR`]; differentiable. f32 CPU tensors take the fused op; others candle's.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu(Form::Tanh))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Erf,
    Tanh,
}

struct Gelu(Form);
/// `dL/dx` from `(x, dL/dy)`.
struct GeluGrad(Form);

#[inline(always)]
fn erf_fwd(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + approx::erf(x * FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn tanh_fwd(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + approx::tanh(SQRT_2_OVER_PI * x * (1.0 + CUBIC * x * x)));
    }
}

/// `d/dx x·Φ(x) = Φ(x) + x·φ(x)`.
#[inline(always)]
fn erf_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + approx::erf(x * FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
        *dx = g * (cdf + x * pdf);
    }
}

/// `d/dx x/2·(1 + tanh u) = (1 + tanh u)/2 + x/2·(1 − tanh² u)·u'`, `u' = √(2/π)(1 + 3·0.044715·x²)`.
#[inline(always)]
fn tanh_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let x2 = x * x;
        let t = approx::tanh(SQRT_2_OVER_PI * x * (1.0 + CUBIC * x2));
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x2);
        *dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
    }
}

multiversion!(pub(super) fn erf_fwd_mv(x: &[f32], y: &mut [f32]) => erf_fwd);
multiversion!(pub(super) fn tanh_fwd_mv(x: &[f32], y: &mut [f32]) => tanh_fwd);
multiversion!(pub(super) fn erf_bwd_mv(x: &[f32], g: &[f32], dx: &mut [f32]) => erf_bwd);
multiversion!(pub(super) fn tanh_bwd_mv(x: &[f32], g: &[f32], dx: &mut [f32]) => tanh_bwd);

/// The f32 elements of a contiguous CPU storage.
pub(crate) fn contiguous_f32<'a>(what: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(Error::Msg(format!(
            "maskattn fused {what}: f32 only, got {:?}",
            s.dtype()
        )));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::Msg(format!(
            "maskattn fused {what}: the input must be contiguous"
        ))),
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "maskattn-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("gelu", s, l)?;
        let y = match self.0 {
            Form::Erf => map1(x, erf_fwd_mv),
            Form::Tanh => map1(x, tanh_fwd_mv),
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The derivative is not differentiated again (no second-order training here).
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &GeluGrad(self.0),
        )?))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "maskattn-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (
            contiguous_f32("gelu", s1, l1)?,
            contiguous_f32("gelu", s2, l2)?,
        );
        if x.len() != g.len() {
            return Err(Error::Msg(
                "maskattn fused gelu: gradient of another shape".into(),
            ));
        }
        let dx = match self.0 {
            Form::Erf => map2(x, g, erf_bwd_mv),
            Form::Tanh => map2(x, g, tanh_bwd_mv),
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
