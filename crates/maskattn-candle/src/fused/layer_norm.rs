//! Layer normalisation over the last dimension as one candle op with a backward that returns
//! the gradients of the input, the weight and the bias (candle-nn's fused `layer_norm` has
//! none; written with tensor ops it is nine passes and nine buffers, each a candle op).
//!
//! Per row of `n` values: `μ = Σx/n`, `σ² = Σ(x − μ)²/n`, `r = 1/√(σ² + ε)`, `x̂ = (x − μ)·r`,
//! `y = x̂·w + b`. Backward with `g = dy·w`: `dx = r·(g − mean(g) − x̂·mean(g·x̂))`,
//! `dw = Σ_rows dy·x̂`, `db = Σ_rows dy`.

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use super::gelu::contiguous_f32;
use super::par::{lane_sum, multiversion};

/// Rows per parallel piece of the forward and of `dx`.
const ROWS_MIN_ELEMS: usize = 4096;
/// Rows per partial sum of `dw`, `db`: fixed, so that the sums (and their rounding) do not
/// depend on the number of threads.
const GRAD_BLOCK_ROWS: usize = 64;

/// `(x − μ)/√(σ² + eps)·weight + bias` over the last dimension of `x`; differentiable in all
/// three. f32 CPU tensors take the fused op; others the same formula in candle ops.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let all_f32 = [x, weight, bias].iter().all(|t| t.dtype() == DType::F32);
    if !all_f32 || !x.device().is_cpu() {
        return layer_norm_ops(x, weight, bias, eps);
    }
    let n = x.dim(D::Minus1)?;
    if weight.dims() != [n] || bias.dims() != [n] {
        return Err(Error::Msg(format!(
            "layer_norm: weight {:?} and bias {:?} must be [{n}]",
            weight.dims(),
            bias.dims()
        )));
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// The same in candle tensor ops (any dtype; what the model used before the fused op).
pub fn layer_norm_ops(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

struct LayerNormOp {
    eps: f32,
}

/// `(μ, r)` of one row.
#[inline(always)]
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x.len(), |i| x[i]) / n;
    let var = lane_sum(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn forward_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let n = w.len();
    for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let (mean, r) = stats(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * r * w + b;
        }
    }
}

/// `dx` of whole rows, and `dw`, `db` summed over them (added into `dw`, `db`).
#[inline(always)]
fn backward_rows(
    (x, dy, w): (&[f32], &[f32], &[f32]),
    eps: f32,
    dx: &mut [f32],
    (dw, db): (&mut [f32], &mut [f32]),
) {
    let n = w.len();
    let nf = n as f32;
    for ((x, dy), dx) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        // Every row slice is exactly `n` long: lets the compiler drop the bounds checks.
        let (x, dy, w) = (&x[..n], &dy[..n], &w[..n]);
        let (mean, r) = stats(x, eps);
        let sg = lane_sum(n, |i| dy[i] * w[i]);
        let sgx = lane_sum(n, |i| dy[i] * w[i] * ((x[i] - mean) * r));
        let (mg, mgx) = (sg / nf, sgx / nf);
        for (((((dx, &x), &dy), &w), dw), db) in dx
            .iter_mut()
            .zip(x)
            .zip(dy)
            .zip(w)
            .zip(dw.iter_mut())
            .zip(db.iter_mut())
        {
            let xh = (x - mean) * r;
            *dx = r * (dy * w - mg - xh * mgx);
            *dw += dy * xh;
            *db += dy;
        }
    }
}

multiversion!(fn forward_mv(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) => forward_rows);
multiversion!(fn backward_mv(
    inputs: (&[f32], &[f32], &[f32]),
    eps: f32,
    dx: &mut [f32],
    sums: (&mut [f32], &mut [f32])
) => backward_rows);

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "maskattn-layer-norm"
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
        let x = contiguous_f32("layer_norm", s1, l1)?;
        let w = contiguous_f32("layer_norm", s2, l2)?;
        let b = contiguous_f32("layer_norm", s3, l3)?;
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        let piece = n * ROWS_MIN_ELEMS.div_ceil(n).max(1);
        y.par_chunks_mut(piece)
            .zip(x.par_chunks(piece))
            .for_each(|(y, x)| forward_mv(x, w, b, self.eps, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.dim(0)?;
        let dy = grad_res.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = dy.storage_and_layout();
        let (Storage::Cpu(xc), Storage::Cpu(wc), Storage::Cpu(gc)) = (&*xs, &*ws, &*gs) else {
            return Err(Error::Msg("layer_norm: CPU only".into()));
        };
        let xv = contiguous_f32("layer_norm", xc, xl)?;
        let wv = contiguous_f32("layer_norm", wc, wl)?;
        let gv = contiguous_f32("layer_norm", gc, gl)?;
        let mut dx = vec![0f32; xv.len()];
        let block = GRAD_BLOCK_ROWS * n;
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(block)
            .zip(xv.par_chunks(block).zip(gv.par_chunks(block)))
            .map(|(dx, (x, dy))| {
                let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
                backward_mv((x, dy, wv), self.eps, dx, (&mut dw, &mut db));
                (dw, db)
            })
            .collect();
        // Blocks summed in order: the same bits for any number of threads.
        let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
        for (pw, pb) in &partial {
            for i in 0..n {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, n, dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}
