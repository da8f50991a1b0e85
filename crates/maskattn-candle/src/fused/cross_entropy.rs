//! The weighted cross-entropy of logits against targets as one candle op with a backward.
//!
//! Written with candle's ops it is a log-softmax (max, subtract, exp, sum, log, subtract:
//! six ops over `[N, V]`), a gather, a product with the weights and a sum, and the backward
//! of each; here the forward is one pass per row and the backward one more, which rebuilds
//! the softmax from the logits and the two numbers per row the forward kept.
//!
//! Per row `n` of `V` logits: `nll_n = ln Σ_v e^(x_v − m) − (x_t − m)` with `m = max_v x_v`
//! and `t` the row's target; the op's value is `Σ_n w_n·nll_n`. Gradient:
//! `∂/∂x_v = w_n·(softmax(x)_v − [v = t])`.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::approx;
use super::gelu::contiguous_f32;
use super::par::{lane_max, lane_sum, multiversion};

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
        stats: Arc::new(OnceLock::new()),
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
    /// `(m, ln Σ e^(x − m))` of every row, from the forward for the backward.
    stats: Arc<OnceLock<Vec<(f32, f32)>>>,
}

/// `(m, ln Σ e^(x − m))` of one row, as candle's `log_softmax` computes them (with the
/// vectorised [`approx::exp`] and interleaved partial sums).
#[inline(always)]
fn row_stats(x: &[f32]) -> (f32, f32) {
    let m = lane_max(x.len(), |i| x[i]);
    (m, lane_sum(x.len(), |i| approx::exp(x[i] - m)).ln())
}

/// `Σ w·log p(target)` over whole rows of `v` logits (`n0` the first row's index), each
/// row's stats written to `stats`.
#[inline(always)]
fn forward_rows(
    x: &[f32],
    v: usize,
    (targets, weights): (&[u32], &[f32]),
    stats: &mut [(f32, f32)],
) -> f32 {
    let mut sum = 0f32;
    for (((row, st), &t), &w) in x.chunks_exact(v).zip(stats).zip(targets).zip(weights) {
        *st = row_stats(row);
        let logp = (row[t as usize] - st.0) - st.1;
        sum += logp * w;
    }
    sum
}

/// `dx = g·w·(softmax(x) − onehot(target))` for whole rows.
#[inline(always)]
fn backward_rows(
    x: &[f32],
    (targets, weights): (&[u32], &[f32]),
    stats: &[(f32, f32)],
    g: f32,
    dx: &mut [f32],
) {
    let v = x.len() / targets.len().max(1);
    for ((((row, dr), &t), &w), &(m, lse)) in x
        .chunks_exact(v)
        .zip(dx.chunks_exact_mut(v))
        .zip(targets)
        .zip(weights)
        .zip(stats)
    {
        let gw = g * w;
        if gw == 0.0 {
            continue;
        }
        for (d, &xv) in dr.iter_mut().zip(row) {
            *d = gw * approx::exp((xv - m) - lse);
        }
        dr[t as usize] -= gw;
    }
}

multiversion!(fn forward_mv(
    x: &[f32],
    v: usize,
    tw: (&[u32], &[f32]),
    stats: &mut [(f32, f32)]
) -> f32 => forward_rows);
multiversion!(fn backward_mv(
    x: &[f32],
    tw: (&[u32], &[f32]),
    stats: &[(f32, f32)],
    g: f32,
    dx: &mut [f32]
) => backward_rows);

impl CustomOp1 for Nll {
    fn name(&self) -> &'static str {
        "maskattn-weighted-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("weighted_nll", s, l)?;
        let v = l.dims()[1].max(1);
        let mut stats = vec![(0f32, 0f32); self.targets.len()];
        let partial: Vec<f32> = x
            .par_chunks(BLOCK_ROWS * v)
            .zip(stats.par_chunks_mut(BLOCK_ROWS))
            .zip(self.targets.par_chunks(BLOCK_ROWS))
            .zip(self.weights.par_chunks(BLOCK_ROWS))
            .map(|(((x, st), t), w)| forward_mv(x, v, (t, w), st))
            .collect();
        let _ = self.stats.set(stats);
        // Blocks summed in order: the same bits for any number of threads.
        let total: f32 = partial.iter().sum();
        Ok((CpuStorage::F32(vec![-total]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let stats = self
            .stats
            .get()
            .ok_or_else(|| Error::Msg("weighted_nll: backward before forward".into()))?;
        let (s, l) = arg.storage_and_layout();
        let Storage::Cpu(c) = &*s else {
            return Err(Error::Msg("weighted_nll: CPU only".into()));
        };
        let x = contiguous_f32("weighted_nll", c, l)?;
        let v = l.dims()[1].max(1);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(BLOCK_ROWS * v)
            .zip(x.par_chunks(BLOCK_ROWS * v))
            .zip(self.targets.par_chunks(BLOCK_ROWS))
            .zip(self.weights.par_chunks(BLOCK_ROWS))
            .zip(stats.par_chunks(BLOCK_ROWS))
            .for_each(|((((dx, x), t), w), st)| backward_mv(x, (t, w), st, g, dx));
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
