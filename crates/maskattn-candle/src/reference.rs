//! The reference path in candle: attention written with candle ops (matmul, mask, softmax),
//! the comparison every test and benchmark of this crate measures against (the kernel crate's
//! `reference` is the same in f64; `maskattn bench --reference` times it). Materialises
//! `L_q × L_k` scores.
//!
//! Hidden pairs get a large negative score before the softmax and the probabilities are
//! multiplied by the 0/1 mask after it, so a row that sees nothing gives 0 instead of NaN.

use candle_core::{DType, Result, Tensor};
use maskattn::{Mask, MaskShape};

/// The mask as a 0/1 tensor `[B or 1, H_q or 1, L_q, L_k]` in `dtype` (1 where the mask
/// is the same for every batch row or head; it broadcasts).
pub fn dense_mask(
    mask: &Mask,
    shape: MaskShape,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    mask.validate(&shape).map_err(candle_core::Error::wrap)?;
    let MaskShape { lq, lk, .. } = shape;
    let batch = if mask.varies_with_batch() {
        shape.batch
    } else {
        1
    };
    let heads = if mask.varies_with_head() {
        shape.heads
    } else {
        1
    };
    let mut v = Vec::with_capacity(batch * heads * lq * lk);
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..lq {
                for j in 0..lk {
                    v.push(if mask.allowed(&shape, b, h, i, j) {
                        1f32
                    } else {
                        0.0
                    });
                }
            }
        }
    }
    Tensor::from_vec(v, (batch, heads, lq, lk), device)?.to_dtype(dtype)
}

/// `k [B, H_kv, L, d]` repeated to `[B, H_q, L, d]`: query head h reads kv head h / group.
pub fn repeat_kv(k: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(k.clone());
    }
    let (b, hkv, l, d) = k.dims4()?;
    k.unsqueeze(2)?
        .expand((b, hkv, group, l, d))?
        .reshape((b, hkv * group, l, d))
}

/// `softmax(s · Q Kᵀ, masked) V` with plain candle ops; the result and every gradient flow
/// through candle's own autograd.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    scale: Option<f32>,
) -> Result<Tensor> {
    let (b, hq, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let keep = dense_mask(mask, MaskShape::new(b, hq, lq, lk), q.dtype(), q.device())?;
    attention_with_keep(q, k, v, &keep, scale)
}

/// [`attention`] with the mask given as a 0/1 tensor that broadcasts to `[B, H_q, L_q, L_k]`
/// (as [`dense_mask`] makes it), so that it can be built once, outside a timed loop.
pub fn attention_with_keep(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &Tensor,
    scale: Option<f32>,
) -> Result<Tensor> {
    let (_, hq, _, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let q = q.contiguous()?;
    let (k, v) = (
        repeat_kv(k, hq / hkv)?.contiguous()?,
        repeat_kv(v, hq / hkv)?,
    );
    let keep = keep.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    // −1e30 where hidden (finite, so a fully hidden row is uniform, not NaN, before the
    // multiplication by the mask zeroes it).
    let hidden = ((keep.ones_like()? - &keep)? * -1e30)?;
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&hidden)?, 3)?;
    p.broadcast_mul(&keep)?.matmul(&v.contiguous()?)
}
