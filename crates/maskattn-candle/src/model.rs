//! A small transformer language model built on [`MaskedMultiHeadAttention`]: token embedding
//! (+ learned positions; or rotary, ALiBi or T5 positions inside attention), N pre-norm blocks
//! (attention + GELU MLP, residuals), a final norm, and an LM head tied to the embedding.
//! The same model trains with a bidirectional (masked-token) or a causal objective; the
//! mask decides which.
//!
//! Shapes: `tokens [B, L]` (u32) → logits `[B, L, vocab]`.
//! Every op on the training path has a backward: the layer norm and the GELU are this
//! crate's fused ops ([`crate::fused`]; candle-nn's `LayerNorm` fast path and
//! `ops::layer_norm` drop gradients).

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use maskattn::{BlockMask, Mask, MaskShape};
use serde::{Deserialize, Serialize};

use crate::fused;
use crate::kv_cache::KvCache;
use crate::layer::{AlibiMode, MaskedMultiHeadAttention, MhaConfig, MhaOptions, Mode};
use crate::reference;

/// How the model knows positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// A learned embedding per position, added to the token embedding.
    Learned,
    /// Rotary embedding of queries and keys inside every attention layer.
    Rotary,
    /// ALiBi: every head's scores less a fixed standard slope times the distance.
    Alibi,
    /// T5 relative position biases: a trainable table per layer, [`T5_BUCKETS`] buckets up
    /// to [`T5_MAX_DISTANCE`], bidirectional (a causal mask simply never uses the future half).
    T5,
}

/// The T5 bucketing of [`Positions::T5`] (T5's own: 32 buckets, distances up to 128).
pub const T5_BUCKETS: usize = 32;
pub const T5_MAX_DISTANCE: usize = 128;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Hidden size of the MLP.
    pub d_ff: usize,
    /// Longest sequence (learned positions need it; rotary ones do not).
    pub max_len: usize,
    pub positions: Positions,
    pub dropout: f32,
    /// Soft-capping of the attention scores (absent from configs saved before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softcap: Option<f32>,
    /// An attention sink per head in every layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sinks: bool,
}

impl LmConfig {
    pub fn validate(&self) -> Result<()> {
        if self.vocab == 0
            || self.d_model == 0
            || self.layers == 0
            || self.d_ff == 0
            || self.max_len == 0
        {
            return Err(candle_core::Error::Msg(format!(
                "LmConfig: every size must be at least 1: {self:?}"
            )));
        }
        if self.heads == 0 || !self.d_model.is_multiple_of(self.heads) {
            return Err(candle_core::Error::Msg(format!(
                "LmConfig: d_model ({}) must be a multiple of heads ({})",
                self.d_model, self.heads
            )));
        }
        self.attention().validate()
    }

    fn attention(&self) -> MhaConfig {
        let mut c = MhaConfig::new(self.d_model, self.heads)
            .with_kv_heads(self.kv_heads)
            .with_dropout(self.dropout);
        c.softcap = self.softcap;
        c.sinks = self.sinks;
        match self.positions {
            Positions::Rotary => c.with_rope(10_000.0),
            Positions::Learned => c,
            Positions::Alibi => c.with_alibi(AlibiMode::Fixed),
            Positions::T5 => c.with_rel(T5_BUCKETS, T5_MAX_DISTANCE, true),
        }
    }
}

/// Layer normalisation over the last dimension (differentiable in input, weight and bias).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_eps(dim, 1e-5, vb)
    }

    pub fn with_eps(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    /// One fused op with a backward for all three of input, weight and bias.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// One pre-norm block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Clone, Debug)]
pub struct Block {
    ln1: LayerNorm,
    attn: MaskedMultiHeadAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(cfg: &LmConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Block {
            ln1: LayerNorm::new(cfg.d_model, vb.pp("ln1"))?,
            attn: MaskedMultiHeadAttention::new(cfg.attention(), vb.pp("attn"))?,
            ln2: LayerNorm::new(cfg.d_model, vb.pp("ln2"))?,
            fc1: candle_nn::linear(cfg.d_model, cfg.d_ff, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.d_ff, cfg.d_model, vb.pp("fc2"))?,
        })
    }

    /// `fc2(gelu(fc1(ln2(x))))` in three fused ops (`fc1` and the GELU are one).
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let (fc1, fc2) = (&self.fc1, &self.fc2);
        let h = self.ln2.forward(x)?;
        let h = match fc1.bias() {
            Some(b) => fused::linear_gelu_tanh(&h, fc1.weight(), b)?,
            None => fused::gelu_tanh(&fused::linear(&h, fc1.weight(), None)?)?,
        };
        fused::linear(&h, fc2.weight(), fc2.bias())
    }

    pub fn attention(&self) -> &MaskedMultiHeadAttention {
        &self.attn
    }
}

/// How the layers of one forward pass attend.
#[derive(Clone, Copy)]
enum Layers<'a> {
    /// The kernels, with the mask compiled once for the pass.
    Block(&'a Arc<BlockMask>),
    /// The kernels, and each layer's attention weights (recomputed from the mask).
    Weights(&'a Mask),
    /// Plain candle ops (comparisons).
    Reference(&'a Mask),
}

/// What a forward pass can also hand back.
pub struct Outputs {
    pub logits: Tensor,
    /// Per layer `[B, H, L, L]`, when asked for.
    pub weights: Vec<Tensor>,
}

#[derive(Clone, Debug)]
pub struct TinyLm {
    tok: Embedding,
    pos: Option<Embedding>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    cfg: LmConfig,
    /// Attention in plain candle ops instead of the kernels (for comparisons only).
    plain: bool,
}

impl TinyLm {
    pub fn new(cfg: LmConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let tok = candle_nn::embedding(cfg.vocab, cfg.d_model, vb.pp("tok_emb"))?;
        let pos = match cfg.positions {
            Positions::Learned => Some(candle_nn::embedding(
                cfg.max_len,
                cfg.d_model,
                vb.pp("pos_emb"),
            )?),
            Positions::Rotary | Positions::Alibi | Positions::T5 => None,
        };
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(&cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(TinyLm {
            tok,
            pos,
            blocks,
            ln_f: LayerNorm::new(cfg.d_model, vb.pp("ln_f"))?,
            cfg,
            plain: false,
        })
    }

    /// Runs attention with plain candle ops (matmul, mask, softmax) instead of the maskattn
    /// kernels: the same model, for measuring what the kernels change. No dropout there.
    pub fn set_reference_attention(&mut self, plain: bool) {
        self.plain = plain;
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    fn embed(&self, tokens: &Tensor, offset: usize) -> Result<Tensor> {
        let x = self.tok.forward(tokens)?;
        match &self.pos {
            None => Ok(x),
            Some(pos) => {
                let l = tokens.dim(1)?;
                if offset + l > self.cfg.max_len {
                    return Err(candle_core::Error::Msg(format!(
                        "sequence of {} positions exceeds the model's max_len {}",
                        offset + l,
                        self.cfg.max_len
                    )));
                }
                let ids = Tensor::arange(offset as u32, (offset + l) as u32, tokens.device())?;
                x.broadcast_add(&pos.forward(&ids)?)
            }
        }
    }

    /// Tied LM head: `h · E_tokᵀ` (the fused linear op, `E_tok [vocab, d_model]` as its weight).
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.ln_f.forward(h)?;
        fused::linear(&h, self.tok.embeddings(), None)
    }

    /// Logits `[B, L, vocab]` for `tokens [B, L]` under `mask` (`[B, heads, L, L]`), compiled
    /// once for the call and used by every layer.
    pub fn forward(&self, tokens: &Tensor, mask: &Mask, mode: Mode) -> Result<Tensor> {
        if self.plain {
            return Ok(self.run(tokens, Layers::Reference(mask), mode)?.logits);
        }
        let (b, l) = tokens.dims2()?;
        let block = self.compile_mask(mask, b, l)?;
        self.forward_with_block(tokens, &block, mode)
    }

    /// `mask` compiled for this model's attention on `batch` rows of `len` tokens
    /// (`[batch, heads, len, len]`), for [`forward_with_block`](Self::forward_with_block).
    pub fn compile_mask(&self, mask: &Mask, batch: usize, len: usize) -> Result<Arc<BlockMask>> {
        let shape = MaskShape::new(batch, self.cfg.heads, len, len);
        Ok(Arc::new(
            BlockMask::new(mask, shape).map_err(candle_core::Error::wrap)?,
        ))
    }

    /// As [`forward`](Self::forward) with the mask compiled beforehand
    /// ([`compile_mask`](Self::compile_mask)); the same bits as `forward` with the mask it
    /// was compiled from. Always the kernels, even with plain attention set. A block mask of
    /// another shape is an error.
    pub fn forward_with_block(
        &self,
        tokens: &Tensor,
        block: &Arc<BlockMask>,
        mode: Mode,
    ) -> Result<Tensor> {
        Ok(self.run(tokens, Layers::Block(block), mode)?.logits)
    }

    /// The forward and every layer's attention weights (for pictures).
    pub fn forward_with_weights(&self, tokens: &Tensor, mask: &Mask) -> Result<Outputs> {
        self.run(tokens, Layers::Weights(mask), Mode::Eval)
    }

    fn run(&self, tokens: &Tensor, layers: Layers, mode: Mode) -> Result<Outputs> {
        let mut x = self.embed(tokens, 0)?;
        let mut all = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.ln1.forward(&x)?;
            // Each layer draws its own dropout pattern from the step's seed.
            let layer_mode = match mode {
                Mode::Train { seed } => Mode::Train {
                    seed: seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                },
                Mode::Eval => Mode::Eval,
            };
            let a = match layers {
                Layers::Weights(mask) => {
                    let (a, w) = b.attn.forward_with_weights(&h, &MhaOptions::new(mask))?;
                    all.push(w);
                    a
                }
                Layers::Reference(mask) => {
                    reference::mha_forward(&b.attn, &h, &MhaOptions::new(mask))?
                }
                Layers::Block(block) => b.attn.forward(
                    &h,
                    &MhaOptions {
                        mode: layer_mode,
                        ..MhaOptions::new(block)
                    },
                )?,
            };
            x = (x + a)?;
            x = (&x + b.mlp(&x)?)?;
        }
        Ok(Outputs {
            logits: self.head(&x)?,
            weights: all,
        })
    }

    /// Fresh KV caches, one per layer.
    pub fn caches(&self) -> Vec<KvCache> {
        self.blocks.iter().map(|_| KvCache::new(256)).collect()
    }

    /// Causal decoding: `tokens [B, L_new]` after everything in `caches`; logits `[B, L_new, vocab]`.
    pub fn step(&self, tokens: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        let offset = caches.first().map_or(0, KvCache::len);
        let mut x = self.embed(tokens, offset)?;
        for (b, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            let a = b.attn.forward_step(&b.ln1.forward(&x)?, cache, None)?;
            x = (x + a)?;
            x = (&x + b.mlp(&x)?)?;
        }
        self.head(&x)
    }

    /// Parameter count.
    pub fn parameters(vars: &candle_nn::VarMap) -> usize {
        vars.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}
