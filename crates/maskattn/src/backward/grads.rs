//! The backward's public operand and result types: the three inputs as one operand, the
//! gradients returned, and the caller's buffers they can be written into.

use crate::view::{Element, View};

/// The three attention inputs, as the forward took them: `q [B, H_q, L_q, d]`,
/// `k, v [B, H_kv, L_k, d]` (any strides). The backward takes them as one operand.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a, T = f32> {
    pub q: View<'a, T>,
    pub k: View<'a, T>,
    pub v: View<'a, T>,
}

impl<'a, T: Element> Qkv<'a, T> {
    pub fn new(q: &View<'a, T>, k: &View<'a, T>, v: &View<'a, T>) -> Self {
        Qkv {
            q: *q,
            k: *k,
            v: *v,
        }
    }
}

/// `dq` like q `[B, H_q, L_q, d]`; `dk`, `dv` like k and v `[B, H_kv, L_k, d]`; the
/// gradients of the score modifiers the call had.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub params: ParamGrads,
}

/// Gradients of the score modifiers (docs/design.md section 1): `Some` for exactly the
/// modifiers of the call's [`Params`](crate::Params) that have parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamGrads {
    /// Shaped like the bias's dims (`dS` summed over the dimensions it broadcasts over).
    pub dbias: Option<Vec<f32>>,
    /// `[H_q]`: `−Σ dS_ij |i' − j|`.
    pub dalibi: Option<Vec<f32>>,
    /// `[H_q]`: `−Σ_{b,i} e^{sink_h − LSE_i} D_i`.
    pub dsinks: Option<Vec<f32>>,
    /// `[num_buckets, H_q]`: `dS` summed over the pairs of each bucket.
    pub drel: Option<Vec<f32>>,
}

/// Buffers the caller owns for [`backward_into`](super::backward_into), contiguous, shaped as in [`Grads`].
#[derive(Debug)]
pub struct GradsMut<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
    pub params: ParamGradsMut<'a>,
}

impl<'a> GradsMut<'a> {
    /// The three input gradients, and no parameter gradient.
    pub fn new(dq: &'a mut [f32], dk: &'a mut [f32], dv: &'a mut [f32]) -> Self {
        GradsMut {
            dq,
            dk,
            dv,
            params: ParamGradsMut::default(),
        }
    }
}

/// Buffers for the parameter gradients, shaped as in [`ParamGrads`] and overwritten;
/// `None` = not wanted (a dense bias's gradient costs an `L_q × L_k` write). A buffer for a
/// modifier the call does not have is an error.
#[derive(Debug, Default)]
pub struct ParamGradsMut<'a> {
    pub dbias: Option<&'a mut [f32]>,
    pub dalibi: Option<&'a mut [f32]>,
    pub dsinks: Option<&'a mut [f32]>,
    pub drel: Option<&'a mut [f32]>,
}
