//! `MaskedMultiHeadAttention`: projections, heads (grouped-query or multi-query), optional
//! rotary positions, masked attention through the maskattn kernels, output projection.
//!
//! Shapes: `x [B, L_q, d_model]` (with keys' and values' inputs `[B, L_k, kdim]`,
//! `[B, L_k, vdim]` for cross-attention) → `[B, L_q, d_model]`.
//! Inside: `q [B, H_q, L_q, head_dim]`, `k, v [B, H_kv, L_k, head_dim]`.
//! Every op on the training path has a backward (no fused candle-nn softmax/norm/rotary op).
//!
//! As candle-nn's modules: the layer holds the weights, one [`forward`] takes the input and
//! the call's options ([`MhaOptions`]: mask, keys' and values' inputs, mode). The same
//! layer with attention in plain candle ops, for comparisons, is
//! [`crate::reference::mha_forward`].
//!
//! [`forward`]: MaskedMultiHeadAttention::forward

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use maskattn::{BlockMask, Dropout, Mask, MaskShape};

use crate::fused;
use crate::kv_cache::KvCache;
use crate::op::attention_with_block;
use crate::options::{AttnOptions, RelPos};
use crate::rope::Rope;
use crate::scores;

/// The layer's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct MhaConfig {
    pub d_model: usize,
    pub num_heads: usize,
    /// Key/value heads: `num_heads` for multi-head, 1 for multi-query, else grouped-query.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Feature size of the keys' input (cross attention).
    pub kdim: usize,
    /// Feature size of the values' input.
    pub vdim: usize,
    /// Biases on the four projections.
    pub bias: bool,
    /// Rotary position embedding base (`θ`, 10 000 in most models); `None` for none.
    pub rope_theta: Option<f32>,
    /// Attention dropout probability, applied in [`Mode::Train`].
    pub dropout: f32,
    /// Soft-capping `c · tanh(z / c)` of the scaled scores.
    pub softcap: Option<f32>,
    /// ALiBi: per-head linear distance penalties, fixed or trainable (parameter
    /// `alibi_slopes [H_q]`, starting at the standard slopes).
    pub alibi: Option<AlibiMode>,
    /// Attention sinks: a trainable logit per head in every softmax's sum (parameter
    /// `sinks [H_q]`, starting at 0).
    pub sinks: bool,
    /// T5 relative position biases (parameter `rel_bias [num_buckets, H_q]`, starting at 0).
    pub rel: Option<RelConfig>,
}

/// Where the ALiBi slopes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlibiMode {
    /// The standard slopes ([`maskattn::alibi_slopes`]), not a parameter.
    Fixed,
    /// A parameter `alibi_slopes [H_q]`, initialised to the standard slopes.
    Trainable,
}

/// The bucketing of T5 relative positions (Hugging Face T5's `_relative_position_bucket`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelConfig {
    pub num_buckets: usize,
    pub max_distance: usize,
    pub bidirectional: bool,
}

impl MhaConfig {
    /// Multi-head attention with `head_dim = d_model / num_heads`, biases, no rotary
    /// positions, no dropout.
    pub fn new(d_model: usize, num_heads: usize) -> Self {
        MhaConfig {
            d_model,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: d_model / num_heads.max(1),
            kdim: d_model,
            vdim: d_model,
            bias: true,
            rope_theta: None,
            dropout: 0.0,
            softcap: None,
            alibi: None,
            sinks: false,
            rel: None,
        }
    }

    pub fn with_softcap(mut self, c: f32) -> Self {
        self.softcap = Some(c);
        self
    }

    pub fn with_alibi(mut self, mode: AlibiMode) -> Self {
        self.alibi = Some(mode);
        self
    }

    pub fn with_sinks(mut self) -> Self {
        self.sinks = true;
        self
    }

    pub fn with_rel(
        mut self,
        num_buckets: usize,
        max_distance: usize,
        bidirectional: bool,
    ) -> Self {
        self.rel = Some(RelConfig {
            num_buckets,
            max_distance,
            bidirectional,
        });
        self
    }

    pub fn with_kv_heads(mut self, n: usize) -> Self {
        self.num_kv_heads = n;
        self
    }

    pub fn with_head_dim(mut self, n: usize) -> Self {
        self.head_dim = n;
        self
    }

    pub fn with_kdim_vdim(mut self, kdim: usize, vdim: usize) -> Self {
        self.kdim = kdim;
        self.vdim = vdim;
        self
    }

    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    pub fn with_rope(mut self, theta: f32) -> Self {
        self.rope_theta = Some(theta);
        self
    }

    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(candle_core::Error::Msg(format!("MhaConfig: {m}")));
        for (n, what) in [
            (self.d_model, "d_model"),
            (self.num_heads, "num_heads"),
            (self.num_kv_heads, "num_kv_heads"),
            (self.head_dim, "head_dim"),
            (self.kdim, "kdim"),
            (self.vdim, "vdim"),
        ] {
            if n == 0 {
                return err(format!("{what} must be at least 1"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return err(format!(
                "num_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.rope_theta.is_some() && !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "rotary positions need an even head_dim, got {}",
                self.head_dim
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return err(format!("softcap must be finite and > 0, got {c}"));
            }
        }
        if let Some(r) = self.rel {
            if r.num_buckets == 0 || (r.bidirectional && r.num_buckets < 2) {
                return err(format!(
                    "rel: num_buckets must be at least 1 (2 when bidirectional), got {}",
                    r.num_buckets
                ));
            }
        }
        Ok(())
    }
}

/// Evaluation (no dropout) or a training step whose dropout pattern comes from `seed`
/// (pass a different seed each step; the same seed reproduces the step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

/// Masked multi-head attention. Weights are named `q_proj`, `k_proj`, `v_proj`, `o_proj`
/// (`.weight [out, in]`, `.bias [out]`) under the [`VarBuilder`] it is built from; with
/// score modifiers also `alibi_slopes [H_q]` (trainable ALiBi), `sinks [H_q]` and
/// `rel_bias [num_buckets, H_q]`.
#[derive(Clone, Debug)]
pub struct MaskedMultiHeadAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    rope: Option<Rope>,
    /// ALiBi slopes `[H_q]` (a parameter when trainable), sinks `[H_q]`, T5 table.
    alibi: Option<Tensor>,
    sinks: Option<Tensor>,
    rel: Option<RelPos>,
    cfg: MhaConfig,
}

/// The mask of one call: as written (compiled by the call for its shape), or compiled
/// beforehand ([`MaskedMultiHeadAttention::compile_mask`]) — once per model call rather than
/// once per layer. `From` either, so [`MhaOptions::new`] takes `&mask` or `&block`.
#[derive(Clone, Copy, Debug)]
pub enum MhaMask<'a> {
    /// As written; compiled by the call.
    Mask(&'a Mask),
    /// Compiled for `[B, H_q, L_q, L_k]`; one of another shape is refused.
    Block(&'a Arc<BlockMask>),
}

impl<'a> From<&'a Mask> for MhaMask<'a> {
    fn from(m: &'a Mask) -> Self {
        MhaMask::Mask(m)
    }
}

impl<'a> From<&'a Arc<BlockMask>> for MhaMask<'a> {
    fn from(b: &'a Arc<BlockMask>) -> Self {
        MhaMask::Block(b)
    }
}

/// The options of one [`MaskedMultiHeadAttention::forward`] call. [`MhaOptions::new`] is
/// self-attention in evaluation; set the other fields with struct update syntax:
///
/// ```
/// # use candle_core::{Result, Tensor};
/// # use maskattn::Mask;
/// # use maskattn_candle::{MaskedMultiHeadAttention, MhaOptions, Mode};
/// // Cross-attention of `x [B, L_q, d_model]` to `memory [B, L_k, kdim]`, a training step.
/// fn step(
///     attn: &MaskedMultiHeadAttention,
///     (x, memory): (&Tensor, &Tensor),
///     mask: &Mask,
///     seed: u64,
/// ) -> Result<Tensor> {
///     let opts = MhaOptions {
///         keys: Some(memory),
///         mode: Mode::Train { seed },
///         ..MhaOptions::new(mask)
///     };
///     attn.forward(x, &opts)
/// }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct MhaOptions<'a> {
    /// Over `[B, H_q, L_q, L_k]`.
    pub mask: MhaMask<'a>,
    /// The keys' input `[B, L_k, kdim]`; `None`: the queries' input (self-attention).
    pub keys: Option<&'a Tensor>,
    /// The values' input `[B, L_k, vdim]`; `None`: the keys' input.
    pub values: Option<&'a Tensor>,
    /// Evaluation, or a training step (dropout drawn from its seed).
    pub mode: Mode,
}

impl<'a> MhaOptions<'a> {
    /// Self-attention under `mask` (a [`Mask`] or a compiled `Arc<BlockMask>`), in
    /// [`Mode::Eval`].
    pub fn new(mask: impl Into<MhaMask<'a>>) -> Self {
        MhaOptions {
            mask: mask.into(),
            keys: None,
            values: None,
            mode: Mode::Eval,
        }
    }
}

impl MhaMask<'_> {
    /// The block mask for a call of `shape`: compiled now, or the given one after checking
    /// that it was compiled for this shape (the kernel would refuse it too, but in its own
    /// words, which do not say how to compile the right one).
    fn block(&self, shape: MaskShape) -> Result<Arc<BlockMask>> {
        match self {
            MhaMask::Mask(m) => Ok(Arc::new(
                BlockMask::new(m, shape).map_err(candle_core::Error::wrap)?,
            )),
            MhaMask::Block(b) if b.shape() == shape => Ok(Arc::clone(b)),
            MhaMask::Block(b) => Err(candle_core::Error::Msg(format!(
                "MaskedMultiHeadAttention: the block mask was compiled for {}, but this call \
                 is {} (compile it with MaskShape::new(batch, num_heads, L_q, L_k))",
                fmt_shape(b.shape()),
                fmt_shape(shape)
            ))),
        }
    }

    fn mask(&self) -> Result<&Mask> {
        match self {
            MhaMask::Mask(m) => Ok(m),
            MhaMask::Block(_) => Err(candle_core::Error::Msg(
                "MaskedMultiHeadAttention: this path needs the mask itself, not a block mask"
                    .into(),
            )),
        }
    }
}

fn fmt_shape(s: MaskShape) -> String {
    format!("[B {}, H {}, L_q {}, L_k {}]", s.batch, s.heads, s.lq, s.lk)
}

impl MaskedMultiHeadAttention {
    pub fn new(cfg: MhaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let lin = |i: usize, o: usize, name: &str| {
            if cfg.bias {
                candle_nn::linear(i, o, vb.pp(name))
            } else {
                candle_nn::linear_no_bias(i, o, vb.pp(name))
            }
        };
        let (hq, hkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let zeros = candle_nn::Init::Const(0.0);
        let alibi = match cfg.alibi {
            None => None,
            Some(AlibiMode::Fixed) => Some(Tensor::new(maskattn::alibi_slopes(hq), vb.device())?),
            Some(AlibiMode::Trainable) => {
                // A fresh parameter starts at the standard slopes (no `Init` says that);
                // one the builder already holds (loaded weights) is kept.
                let fresh = !vb.contains_tensor("alibi_slopes");
                let t = vb.get_with_hints(hq, "alibi_slopes", zeros)?;
                if fresh {
                    let std = Tensor::new(maskattn::alibi_slopes(hq), vb.device())?;
                    t.slice_set(&std.to_dtype(t.dtype())?, 0, 0)?;
                }
                Some(t)
            }
        };
        let sinks = if cfg.sinks {
            Some(vb.get_with_hints(hq, "sinks", zeros)?)
        } else {
            None
        };
        let rel = match cfg.rel {
            None => None,
            Some(r) => Some(RelPos {
                table: vb.get_with_hints((r.num_buckets, hq), "rel_bias", zeros)?,
                num_buckets: r.num_buckets,
                max_distance: r.max_distance,
                bidirectional: r.bidirectional,
            }),
        };
        Ok(MaskedMultiHeadAttention {
            alibi,
            sinks,
            rel,
            q_proj: lin(cfg.d_model, hq * hd, "q_proj")?,
            k_proj: lin(cfg.kdim, hkv * hd, "k_proj")?,
            v_proj: lin(cfg.vdim, hkv * hd, "v_proj")?,
            o_proj: lin(hq * hd, cfg.d_model, "o_proj")?,
            rope: cfg.rope_theta.map(|t| Rope::new(hd, t)),
            cfg,
        })
    }

    pub fn config(&self) -> &MhaConfig {
        &self.cfg
    }

    /// The call options of this layer's score modifiers (f32; the kernels take them so).
    pub(crate) fn modifier_options(&self, dropout: Option<Dropout>) -> Result<AttnOptions> {
        let f32 = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_dtype(DType::F32)).transpose();
        Ok(AttnOptions {
            scale: None,
            dropout,
            softcap: self.cfg.softcap,
            bias: None,
            alibi: f32(&self.alibi)?,
            sinks: f32(&self.sinks)?,
            rel: match &self.rel {
                None => None,
                Some(r) => Some(RelPos {
                    table: r.table.to_dtype(DType::F32)?,
                    ..r.clone()
                }),
            },
        })
    }

    /// The four projections, in the order q, k, v, o.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    pub(crate) fn has_modifiers(&self) -> bool {
        self.cfg.softcap.is_some()
            || self.alibi.is_some()
            || self.sinks.is_some()
            || self.rel.is_some()
    }

    /// `[B, L, in] → [B, H, L, head_dim]` (contiguous), with rotary positions from `offset`
    /// when configured: the fused projection and head split (rotating as it goes) for f32
    /// CPU tensors, candle's ops for others.
    fn heads(
        &self,
        x: &Tensor,
        proj: &Linear,
        heads: usize,
        offset: Option<usize>,
    ) -> Result<Tensor> {
        let l = x.dim(1)?;
        let y = fused::linear(x, proj.weight(), proj.bias())?;
        let fused_path = y.dtype() == DType::F32 && y.device().is_cpu();
        match (&self.rope, offset) {
            (Some(rope), Some(off)) if fused_path => {
                fused::split_heads(&y, heads, Some(&Arc::new(rope.table_values(off, l))))
            }
            (Some(rope), Some(off)) => rope.apply(&fused::split_heads(&y, heads, None)?, off),
            _ => fused::split_heads(&y, heads, None),
        }
    }

    fn check_inputs(&self, x_q: &Tensor, x_k: &Tensor, x_v: &Tensor) -> Result<()> {
        let (b, _, dq) = x_q.dims3()?;
        let (bk, lk, dk) = x_k.dims3()?;
        let (bv, lv, dv) = x_v.dims3()?;
        let bad = |m: String| {
            Err(candle_core::Error::Msg(format!(
                "MaskedMultiHeadAttention: {m}"
            )))
        };
        if dq != self.cfg.d_model {
            return bad(format!(
                "x_q has {dq} features, d_model is {}",
                self.cfg.d_model
            ));
        }
        if dk != self.cfg.kdim || dv != self.cfg.vdim {
            return bad(format!(
                "keys/values inputs have {dk}/{dv} features, kdim/vdim are {}/{}",
                self.cfg.kdim, self.cfg.vdim
            ));
        }
        if bk != b || bv != b || lk != lv {
            return bad(format!(
                "batch/length mismatch: x_q batch {b}, x_k [{bk}, {lk}], x_v [{bv}, {lv}]"
            ));
        }
        Ok(())
    }

    /// Self- or cross-attention: `x [B, L_q, d_model]` attends to `opts.keys`
    /// (`[B, L_k, kdim]`, `x` itself when `None`) and `opts.values` (`[B, L_k, vdim]`, the
    /// keys' input when `None`) under `opts.mask` (over `[B, H_q, L_q, L_k]`), with dropout
    /// in `Mode::Train` → `[B, L_q, d_model]`. A compiled mask gives the same bits as the
    /// mask it was compiled from; one compiled for another shape is an error.
    pub fn forward(&self, x: &Tensor, opts: &MhaOptions) -> Result<Tensor> {
        Ok(self.run(x, opts, false)?.0)
    }

    /// [`forward`](Self::forward) and the attention weights `[B, H_q, L_q, L_k]` (f32,
    /// recomputed from the kernel's LSE, without dropout; detached — for inspection and
    /// pictures, not training). Needs `opts.mask` as a [`Mask`], not a compiled one.
    pub fn forward_with_weights(&self, x: &Tensor, opts: &MhaOptions) -> Result<(Tensor, Tensor)> {
        opts.mask.mask()?; // refused before any work
        let (out, weights) = self.run(x, opts, true)?;
        Ok((out, weights.expect("asked for weights")))
    }

    /// Compiles `mask` for this layer's calls on `batch` rows of `lq` queries and `lk` keys
    /// (`[B, H_q, L_q, L_k]`), for [`MhaOptions::new`]: a model compiles its mask once per
    /// call and hands it to every layer.
    pub fn compile_mask(
        &self,
        mask: &Mask,
        batch: usize,
        lq: usize,
        lk: usize,
    ) -> Result<Arc<BlockMask>> {
        let shape = MaskShape::new(batch, self.cfg.num_heads, lq, lk);
        Ok(Arc::new(
            BlockMask::new(mask, shape).map_err(candle_core::Error::wrap)?,
        ))
    }

    fn run(
        &self,
        x: &Tensor,
        opts: &MhaOptions,
        weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (q, k, v) = self.project(x, opts)?;
        let out = self.attend(&q, &k, &v, opts.mask, opts.mode, weights)?;
        Ok((self.output(&out.0)?, out.1))
    }

    /// The inputs checked and projected to heads, with rotary positions from 0: `q [B, H_q,
    /// L_q, head_dim]`, `k, v [B, H_kv, L_k, head_dim]` (for [`forward`](Self::forward) and
    /// the reference path).
    pub(crate) fn project(
        &self,
        x: &Tensor,
        opts: &MhaOptions,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let x_k = opts.keys.unwrap_or(x);
        let x_v = opts.values.or(opts.keys).unwrap_or(x);
        self.check_inputs(x, x_k, x_v)?;
        let (hq, hkv) = (self.cfg.num_heads, self.cfg.num_kv_heads);
        if let MhaMask::Block(_) = opts.mask {
            // Refuse a block mask of another shape before any work is done.
            let ((b, lq, _), lk) = (x.dims3()?, x_k.dim(1)?);
            opts.mask.block(MaskShape::new(b, hq, lq, lk))?;
        }
        let q = self.heads(x, &self.q_proj, hq, Some(0))?;
        let k = self.heads(x_k, &self.k_proj, hkv, Some(0))?;
        let v = self.heads(x_v, &self.v_proj, hkv, None)?;
        Ok((q, k, v))
    }

    /// `[B, H, L_q, head_dim]` → `[B, L_q, H·head_dim]` → the output projection.
    pub(crate) fn output(&self, heads: &Tensor) -> Result<Tensor> {
        let out = fused::merge_heads(heads)?;
        let o = &self.o_proj;
        fused::linear(&out, o.weight(), o.bias())
    }

    /// The kernels' attention of the heads (and the weights when asked), before the output
    /// projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: MhaMask,
        mode: Mode,
        weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, hq, lq, _) = q.dims4()?;
        let lk = k.dim(2)?;
        let shape = MaskShape::new(b, hq, lq, lk);
        let block = mask.block(shape)?;
        let dropout = match mode {
            Mode::Train { seed } if self.cfg.dropout > 0.0 => {
                Some(Dropout::new(self.cfg.dropout, seed).map_err(candle_core::Error::wrap)?)
            }
            _ => None,
        };
        let opts = self.modifier_options(dropout)?;
        let a = attention_with_block(q, k, v, block, opts)?;
        let w = if weights {
            let opts = self.modifier_options(None)?;
            Some(attention_weights(q, k, &a.lse, mask.mask()?, shape, &opts)?)
        } else {
            None
        };
        Ok((a.out, w))
    }

    /// One decoding step: `x [B, L_new, d_model]` (usually `L_new = 1`) attends to everything
    /// in `cache` plus itself, causally (bottom-right aligned), and is appended to the cache.
    /// `extra` further restricts the mask (for example key padding of the prompt), evaluated
    /// over `[B, H_q, L_new, L_cache + L_new]`.
    pub fn forward_step(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        extra: Option<&Mask>,
    ) -> Result<Tensor> {
        if self.cfg.kdim != self.cfg.d_model || self.cfg.vdim != self.cfg.d_model {
            return Err(candle_core::Error::Msg(
                "forward_step decodes self-attention: kdim and vdim must equal d_model".into(),
            ));
        }
        self.check_inputs(x, x, x)?;
        let offset = cache.len();
        let (hq, hkv) = (self.cfg.num_heads, self.cfg.num_kv_heads);
        let q = self.heads(x, &self.q_proj, hq, Some(offset))?;
        let k = self.heads(x, &self.k_proj, hkv, Some(offset))?;
        let v = self.heads(x, &self.v_proj, hkv, None)?;
        let (k, v) = cache.append(&k, &v)?;
        let mask = match extra {
            Some(m) => Mask::causal() & m.clone(),
            None => Mask::causal(),
        };
        let (out, _) = self.attend(&q, &k, &v, MhaMask::Mask(&mask), Mode::Eval, false)?;
        self.output(&out)
    }
}

/// `P = e^(x − LSE)` where allowed, 0 elsewhere: `[B, H_q, L_q, L_k]`, f32, detached; `x`
/// the scores with the layer's modifiers ([`scores::scores`]). With sinks a row sums to
/// less than 1: the sink's share is in `LSE`.
fn attention_weights(
    q: &Tensor,
    k: &Tensor,
    lse: &Tensor,
    mask: &Mask,
    shape: MaskShape,
    opts: &AttnOptions,
) -> Result<Tensor> {
    let (q, k) = (
        q.detach().to_dtype(DType::F32)?,
        k.detach().to_dtype(DType::F32)?,
    );
    let mut opts = opts.clone();
    opts.alibi = opts.alibi.map(|t| t.detach());
    opts.rel = opts.rel.map(|r| RelPos {
        table: r.table.detach(),
        ..r
    });
    let x = scores::scores(&q, &k, &opts)?;
    let p = x.broadcast_sub(&lse.unsqueeze(3)?)?.exp()?;
    let keep = scores::dense_mask(mask, shape, DType::U8, q.device())?.broadcast_as(p.shape())?;
    keep.where_cond(&p, &p.zeros_like()?)
}
