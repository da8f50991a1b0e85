//! The weighted cross-entropy of logits against targets as one candle op with a backward.
//!
//! Written with candle's ops it is a log-softmax (max, subtract, exp, sum, log, subtract:
//! six ops over `[N, V]`), a gather, a product with the weights and a sum, and the backward
//! of each; here the forward is one pass per row and the backward one more, which recomputes
//! the softmax from the logits (nothing of `[N, V]` is kept between the two).
//!
//! Per row `n` of `V` logits: `nll_n = ln Σ_v e^(x_v − m) − (x_t − m)` with `m = max_v x_v`
//! and `t` the row's target; the op's value is `Σ_n w_n·nll_n`. Gradient:
//! `∂/∂x_v = w_n·(softmax(x)_v − [v = t])`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::gelu::contiguous_f32;

/// Rows per partial sum (fixed, so the loss has the same bits for any number of threads).
const BLOCK_ROWS: usize = 64;

/// `Σ_n weights[n]·(−log softmax(logits[n])[targets[n]])` for `logits [N, V]` (any leading
/// dimensions flattened into `N`), a scalar; differentiable in the logits. f32 CPU tensors
/// take the fused op; others [`weighted_nll_ops`]. A target outside `0..V` is an error.
pub fn weighted_nll(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let n = logits.elem_count() / v.max(1);
    if targets.len() != n || weights.len() != n {
        return Err(Error::Msg(format!(
            "weighted_nll: {n} rows of logits, {} targets, {} weights",
            targets.len(),
            weights.len()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(Error::Msg(format!(
            "weighted_nll: target {t} outside the {v} classes"
        )));
    }
    if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
        return weighted_nll_ops(logits, targets, weights);
    }
    logits.reshape((n, v))?.contiguous()?.apply_op1(Nll {
        targets: Arc::new(targets.to_vec()),
        weights: Arc::new(weights.to_vec()),
    })
}

/// The same in candle's ops (any dtype; what the trainer used before the fused op).
pub fn weighted_nll_ops(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let dev = logits.device();
    let v = logits.dim(D::Minus1)?;
    let logp = candle_nn::ops::log_softmax(&logits.reshape(((), v))?, D::Minus1)?;
    let t = Tensor::from_slice(targets, targets.len(), dev)?;
    let picked = logp.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?;
    let w = Tensor::from_slice(weights, weights.len(), dev)?.to_dtype(logits.dtype())?;
    (picked * w)?.sum_all()?.neg()
}

struct Nll {
    targets: Arc<Vec<u32>>,
    weights: Arc<Vec<f32>>,
}

/// `(m, ln Σ e^(x − m))` of one row, as candle's `log_softmax` computes them.
#[inline]
fn row_stats(x: &[f32]) -> (f32, f32) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = x.iter().map(|&v| (v - m).exp()).sum();
    (m, s.ln())
}

impl CustomOp1 for Nll {
    fn name(&self) -> &'static str {
        "maskattn-weighted-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("weighted_nll", s, l)?;
        let v = l.dims()[1];
        let partial: Vec<f32> = x
            .par_chunks(BLOCK_ROWS * v.max(1))
            .enumerate()
            .map(|(blk, rows)| {
                let mut sum = 0f32;
                for (i, row) in rows.chunks_exact(v).enumerate() {
                    let n = blk * BLOCK_ROWS + i;
                    let (m, lse) = row_stats(row);
                    let logp = (row[self.targets[n] as usize] - m) - lse;
                    sum += logp * self.weights[n];
                }
                sum
            })
            .collect();
        let total: f32 = partial.iter().sum();
        Ok((CpuStorage::F32(vec![-total]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (s, l) = arg.storage_and_layout();
        let Storage::Cpu(c) = &*s else {
            return Err(Error::Msg("weighted_nll: CPU only".into()));
        };
        let x = contiguous_f32("weighted_nll", c, l)?;
        let v = l.dims()[1];
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(BLOCK_ROWS * v.max(1))
            .zip(x.par_chunks(BLOCK_ROWS * v.max(1)))
            .enumerate()
            .for_each(|(blk, (dx, x))| {
                for (i, (dr, row)) in dx.chunks_exact_mut(v).zip(x.chunks_exact(v)).enumerate() {
                    let n = blk * BLOCK_ROWS + i;
                    let gw = g * self.weights[n];
                    if gw == 0.0 {
                        continue;
                    }
                    let (m, lse) = row_stats(row);
                    for (d, &xv) in dr.iter_mut().zip(row) {
                        *d = gw * ((xv - m) - lse).exp();
                    }
                    dr[self.targets[n] as usize] -= gw;
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
