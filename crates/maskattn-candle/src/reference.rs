//! The reference path in candle: attention written with candle ops (matmul, mask, softmax),
//! the comparison every test and benchmark of this crate measures against (the kernel crate's
//! `reference` is the same in f64; `maskattn bench --reference` times it), both for the op
//! ([`attention`]) and for the layer ([`mha_forward`]: the layer's projections around it).
//! Materialises `L_q × L_k` scores.
//!
//! Hidden pairs get a large negative score before the softmax and the probabilities are
//! multiplied by the 0/1 mask after it, so a row that sees nothing gives 0 instead of NaN.

use candle_core::{Result, Tensor};
use maskattn::{Mask, MaskShape};

use crate::layer::{MaskedMultiHeadAttention, MhaMask, MhaOptions, Mode};
use crate::options::AttnOptions;
pub use crate::scores::{dense_mask, repeat_kv, scores};

/// `softmax(s · Q Kᵀ, masked) V` with plain candle ops; the result and every gradient flow
/// through candle's own autograd.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    scale: Option<f32>,
) -> Result<Tensor> {
    attention_with_options(
        q,
        k,
        v,
        mask,
        &AttnOptions {
            scale,
            ..Default::default()
        },
    )
}

/// [`attention`] with the score modifiers of `opts` (soft-capping, bias, ALiBi, sinks, T5
/// relative positions; not dropout), every one written in candle ops, so that each
/// parameter's gradient is candle's own.
pub fn attention_with_options(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    opts: &AttnOptions,
) -> Result<Tensor> {
    let (b, hq, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let keep = dense_mask(mask, MaskShape::new(b, hq, lq, lk), q.dtype(), q.device())?;
    attend(q, k, v, &keep, opts)
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
    attend(
        q,
        k,
        v,
        keep,
        &AttnOptions {
            scale,
            ..Default::default()
        },
    )
}

/// [`MaskedMultiHeadAttention::forward`] with the attention in plain candle ops: the
/// layer's projections, heads, rotary positions and score modifiers around
/// [`attention_with_options`]. `x [B, L_q, d_model]` and `opts` as for `forward`, →
/// `[B, L_q, d_model]`. No dropout: with `Mode::Train` the layer's dropout must be 0; the
/// mask must be a [`Mask`] (this path does not read a compiled block mask).
pub fn mha_forward(
    layer: &MaskedMultiHeadAttention,
    x: &Tensor,
    opts: &MhaOptions,
) -> Result<Tensor> {
    let MhaMask::Mask(mask) = opts.mask else {
        return Err(candle_core::Error::Msg(
            "reference::mha_forward: needs the mask itself, not a block mask".into(),
        ));
    };
    if matches!(opts.mode, Mode::Train { .. }) && layer.config().dropout > 0.0 {
        return Err(candle_core::Error::Msg(format!(
            "reference::mha_forward: no dropout on this path, but the layer has dropout {} \
             and the call is Mode::Train (call it with Mode::Eval)",
            layer.config().dropout
        )));
    }
    let (q, k, v) = layer.project(x, opts)?;
    let out = attention_with_options(&q, &k, &v, mask, &layer.modifier_options(None)?)?;
    layer.output(&out)
}

/// [`mha_forward`] for `x_q [B, L_q, d_model]` attending to `x_kv [B, L_k, kdim]` with the
/// mask as a ready 0/1 tensor that broadcasts to `[B, H_q, L_q, L_k]` ([`dense_mask`]), as
/// a benchmark of candle's own ops wants it. A layer with score modifiers is refused (use
/// [`mha_forward`]).
pub fn mha_forward_with_keep(
    layer: &MaskedMultiHeadAttention,
    x_q: &Tensor,
    x_kv: &Tensor,
    keep: &Tensor,
) -> Result<Tensor> {
    let full = Mask::full();
    let opts = MhaOptions {
        keys: Some(x_kv),
        ..MhaOptions::new(&full)
    };
    let (q, k, v) = layer.project(x_q, &opts)?;
    if layer.has_modifiers() {
        return Err(candle_core::Error::Msg(
            "reference::mha_forward_with_keep has no score modifiers; use reference::mha_forward"
                .into(),
        ));
    }
    layer.output(&attention_with_keep(&q, &k, &v, keep, None)?)
}

/// Attention from scores, mask and values, in plain candle ops.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, keep: &Tensor, opts: &AttnOptions) -> Result<Tensor> {
    let (b, hq, lq, _) = q.dims4()?;
    let (hkv, lk) = (k.dim(1)?, k.dim(2)?);
    let v = repeat_kv(v, hq / hkv)?;
    let keep = keep.to_dtype(q.dtype())?;
    let scores = scores(q, k, opts)?;
    // −1e30 where hidden (finite, so a fully hidden row is uniform, not NaN, before the
    // multiplication by the mask zeroes it).
    let hidden = ((keep.ones_like()? - &keep)? * -1e30)?;
    let mut x = scores.broadcast_add(&hidden)?;
    if let Some(sinks) = &opts.sinks {
        // One more column per row, the sink's logit: it joins the softmax's sum and is
        // dropped after it.
        let col = sinks
            .to_dtype(q.dtype())?
            .reshape((1, hq, 1, 1))?
            .broadcast_as((b, hq, lq, 1))?;
        x = Tensor::cat(&[&x, &col], 3)?;
    }
    let mut p = candle_nn::ops::softmax(&x, 3)?;
    if opts.sinks.is_some() {
        p = p.narrow(3, 0, lk)?;
    }
    p.broadcast_mul(&keep)?.matmul(&v.contiguous()?)
}
