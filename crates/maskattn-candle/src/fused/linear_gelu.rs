//! The MLP's first half, `gelu(x·Wᵀ + b)` in either form (tanh: the LM's MLP; exact erf:
//! BERT's intermediate layer), as one candle op with a backward: the product, the bias and
//! the GELU of [`linear`](super::linear) and [`gelu_tanh`](super::gelu_tanh) /
//! [`gelu_erf`](super::gelu_erf) in one op, so that candle's backward zero-fills and adds
//! one `[rows, d_ff]` gradient buffer fewer (the widest activation of the model), and the
//! pre-activation the GELU's derivative needs is kept by the op rather than as a tensor of
//! the graph. The same arithmetic as the two ops, in the same order: the same bits.
//!
//! Shapes: `x [..., in]`, `W [out, in]`, `b [out]` → `[..., out]`.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, D};

use super::gelu::{contiguous_f32, erf_bwd_mv, erf_fwd_mv, tanh_bwd_mv, tanh_fwd_mv};
use super::linear::{backward_from, forward, shape_out};
use super::par::{map1, map2};

/// `gelu_tanh(x·Wᵀ + b)` over the last dimension of `x`; differentiable in all three. f32
/// CPU tensors take the fused op; others [`linear`](super::linear) and
/// [`gelu_tanh`](super::gelu_tanh) one after the other.
pub fn linear_gelu_tanh(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    linear_gelu(x, weight, bias, Form::Tanh)
}

/// `gelu_erf(x·Wᵀ + b)` (the exact GELU, BERT's `gelu`) over the last dimension of `x`;
/// differentiable in all three. f32 CPU tensors take the fused op; others
/// [`linear`](super::linear) and [`gelu_erf`](super::gelu_erf) one after the other.
pub fn linear_gelu_erf(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    linear_gelu(x, weight, bias, Form::Erf)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Erf,
    Tanh,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::Erf => "linear_gelu_erf",
            Form::Tanh => "linear_gelu_tanh",
        }
    }
}

fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor, form: Form) -> Result<Tensor> {
    let all_f32 = [x, weight, bias].iter().all(|t| t.dtype() == DType::F32);
    if !all_f32 || !x.device().is_cpu() {
        let pre = super::linear(x, weight, Some(bias))?;
        return match form {
            Form::Erf => super::gelu_erf(&pre),
            Form::Tanh => super::gelu_tanh(&pre),
        };
    }
    let (out, inp) = weight.dims2()?;
    if x.dim(D::Minus1)? != inp || bias.dims() != [out] {
        return Err(Error::Msg(format!(
            "{}: x {:?}, weight {:?}, bias {:?}: want x [..., {inp}], bias [{out}]",
            form.name(),
            x.dims(),
            weight.dims(),
            bias.dims()
        )));
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LinearGelu {
            form,
            pre: Arc::new(OnceLock::new()),
        },
    )
}

struct LinearGelu {
    form: Form,
    /// `x·Wᵀ + b`, from the forward for the backward.
    pre: Arc<OnceLock<Vec<f32>>>,
}

impl CustomOp3 for LinearGelu {
    fn name(&self) -> &'static str {
        "maskattn-linear-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("linear_gelu", s1, l1)?;
        let w = contiguous_f32("linear_gelu", s2, l2)?;
        let b = contiguous_f32("linear_gelu", s3, l3)?;
        let out = l2.dims()[0];
        let pre = forward(x, w, Some(b), out)?;
        let y = match self.form {
            Form::Erf => map1(&pre, erf_fwd_mv),
            Form::Tanh => map1(&pre, tanh_fwd_mv),
        };
        let _ = self.pre.set(pre);
        Ok((CpuStorage::F32(y), shape_out(l1, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pre = self
            .pre
            .get()
            .ok_or_else(|| Error::Msg("linear_gelu: backward before forward".into()))?;
        let dy = grad_res.contiguous()?;
        let (gs, gl) = dy.storage_and_layout();
        let candle_core::Storage::Cpu(gc) = &*gs else {
            return Err(Error::Msg("linear_gelu: CPU only".into()));
        };
        let g = contiguous_f32("linear_gelu", gc, gl)?;
        if g.len() != pre.len() {
            return Err(Error::Msg("linear_gelu: gradient of another shape".into()));
        }
        let dpre = match self.form {
            Form::Erf => map2(pre, g, erf_bwd_mv),
            Form::Tanh => map2(pre, g, tanh_bwd_mv),
        };
        let (dx, dw, db) = backward_from(x, w, &dpre, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}
