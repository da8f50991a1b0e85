//! The attention scores with the score modifiers, and a mask as a 0/1 tensor, in candle
//! ops: what the reference path ([`crate::reference`]) builds its attention from and what
//! the layer's attention weights ([`crate::MaskedMultiHeadAttention::forward_with_weights`])
//! are recomputed from. Their own file so that the layer and its reference path both read
//! them without either reading the other's file.

use candle_core::{DType, Result, Tensor};
use maskattn::{Mask, MaskShape};

use crate::options::AttnOptions;

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

/// The scores `x [B, H_q, L_q, L_k]` before the mask and the softmax, in q's dtype:
/// `cap(s · q·kᵀ) + bias − slope_h·|i' − j| + rel[bucket(j − i'), h]` (each term present
/// in `opts`), `i' = i + L_k − L_q`.
pub fn scores(q: &Tensor, k: &Tensor, opts: &AttnOptions) -> Result<Tensor> {
    let (_, hq, lq, d) = q.dims4()?;
    let (hkv, lk) = (k.dim(1)?, k.dim(2)?);
    let (dt, dev) = (q.dtype(), q.device());
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let k = repeat_kv(k, hq / hkv)?.contiguous()?;
    let mut x = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(c) = opts.softcap {
        x = ((x / c as f64)?.tanh()? * c as f64)?;
    }
    if let Some(bias) = &opts.bias {
        x = x.broadcast_add(&bias.to_dtype(dt)?)?;
    }
    // j − i' for every (i, j), row-major [L_q, L_k].
    let rel_pos =
        || (0..lq).flat_map(move |i| (0..lk).map(move |j| j as i64 - (i + lk - lq) as i64));
    if let Some(slopes) = &opts.alibi {
        let dist: Vec<f32> = rel_pos().map(|r| r.unsigned_abs() as f32).collect();
        let dist = Tensor::from_vec(dist, (1, 1, lq, lk), dev)?.to_dtype(dt)?;
        let slopes = slopes.to_dtype(dt)?.reshape((1, hq, 1, 1))?;
        x = x.broadcast_sub(&dist.broadcast_mul(&slopes)?)?;
    }
    if let Some(rel) = &opts.rel {
        let idx: Vec<u32> = rel_pos()
            .map(|r| {
                maskattn::t5_bucket(r, rel.bidirectional, rel.num_buckets, rel.max_distance) as u32
            })
            .collect();
        let idx = Tensor::from_vec(idx, lq * lk, dev)?;
        // [N, H] → [L_q·L_k, H] → [1, H, L_q, L_k].
        let r = rel
            .table
            .to_dtype(dt)?
            .index_select(&idx, 0)?
            .reshape((lq, lk, hq))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        x = x.broadcast_add(&r)?;
    }
    Ok(x)
}
