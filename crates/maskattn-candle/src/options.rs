//! What a call of the attention op takes besides its tensors and mask: the scale, dropout
//! and the score modifiers' tensors (docs/design.md section 1).

use candle_core::{Result, Tensor};
use maskattn::Dropout;

/// What [`attention`](crate::attention) takes besides tensors and mask: the scale, dropout, and the score
/// modifiers of docs/design.md section 1. The modifier tensors are f32 on the CPU; each
/// that is a [`candle_core::Var`] (or computed from one) gets its gradient through autograd.
#[derive(Clone, Debug, Default)]
pub struct AttnOptions {
    /// Score scale; `None` means `1/sqrt(d)`.
    pub scale: Option<f32>,
    /// Attention dropout (training); see [`maskattn::Dropout`].
    pub dropout: Option<Dropout>,
    /// Soft-capping `c · tanh(z / c)` of the scaled scores (`c > 0`).
    pub softcap: Option<f32>,
    /// A dense additive bias `[B|1, H_q|1, L_q, L_k]` (1 where it broadcasts).
    pub bias: Option<Tensor>,
    /// ALiBi slopes `[H_q]`: `− slope_h · |i' − j|` on the scores
    /// ([`maskattn::alibi_slopes`] gives the standard ones).
    pub alibi: Option<Tensor>,
    /// Attention sinks `[H_q]`: a logit per head that takes part in the softmax's sum.
    pub sinks: Option<Tensor>,
    /// T5 relative position biases.
    pub rel: Option<RelPos>,
}

impl AttnOptions {
    /// Whether any score modifier is set (without, the op is exactly what it was before
    /// modifiers existed).
    pub fn has_modifiers(&self) -> bool {
        self.softcap.is_some()
            || self.bias.is_some()
            || self.alibi.is_some()
            || self.sinks.is_some()
            || self.rel.is_some()
    }
}

/// T5 relative position biases: `table [num_buckets, H_q]` (trainable when a `Var`), the
/// bucket of key `j` for aligned query position `i'` being Hugging Face T5's
/// `_relative_position_bucket(j − i', bidirectional, num_buckets, max_distance)`.
#[derive(Clone, Debug)]
pub struct RelPos {
    pub table: Tensor,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub bidirectional: bool,
}

impl RelPos {
    pub fn new(table: Tensor, max_distance: usize, bidirectional: bool) -> Result<Self> {
        let (num_buckets, _) = table.dims2()?;
        Ok(RelPos {
            table,
            num_buckets,
            max_distance,
            bidirectional,
        })
    }
}
