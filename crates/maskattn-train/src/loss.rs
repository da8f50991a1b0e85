//! The training objective, one definition for the training step and the held-out
//! evaluation.

use anyhow::Result;
use candle_core::Tensor;

use crate::batch::Batch;

/// The weighted mean cross-entropy of `logits [B, L, V]` against the batch's targets where
/// its weights are 1 (one fused op with its backward: `maskattn_candle::fused::weighted_nll`).
pub fn loss(logits: &Tensor, b: &Batch) -> Result<Tensor> {
    let count = b.weights.iter().sum::<f32>().max(1.0) as f64;
    let sum = maskattn_candle::fused::weighted_nll(logits, &b.targets, &b.weights)?;
    Ok((sum * (1.0 / count))?)
}
