//! The transformer every [`Task`](super::Task) shares: pre-norm blocks of masked multi-head
//! attention (the maskattn op, with the task's optional score bias) and a GELU MLP, then a
//! final norm. It takes embeddings, not token ids: the task embeds its own inputs.
//!
//! Its own blocks rather than [`maskattn_candle::model::TinyLm`]'s because a task's score
//! bias changes with every batch (and carries gradients), which the layer's options do not
//! take; the attention op does ([`maskattn_candle::AttnOptions::bias`]).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use maskattn::{BlockMask, Mask, MaskShape};
use maskattn_candle::model::LayerNorm;
use maskattn_candle::{attention_with_block, fused, reference, AttnOptions};
use serde::{Deserialize, Serialize};

/// The encoder's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trunk {
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    /// Hidden size of the MLP.
    pub d_ff: usize,
}

impl Trunk {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.d_model == 0 || self.layers == 0 || self.heads == 0 || self.d_ff == 0 {
            anyhow::bail!("--d-model, --layers, --heads must be at least 1: {self:?}");
        }
        if !self.d_model.is_multiple_of(self.heads) {
            anyhow::bail!(
                "--d-model {} must be a multiple of --heads {}",
                self.d_model,
                self.heads
            );
        }
        Ok(())
    }
}

struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

fn lin(x: &Tensor, l: &Linear) -> Result<Tensor> {
    fused::linear(x, l.weight(), l.bias())
}

/// Pre-norm encoder: `x + attn(ln1(x))`, `x + mlp(ln2(x))` per block, then `ln_f`.
pub struct Encoder {
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    trunk: Trunk,
}

impl Encoder {
    pub fn new(trunk: Trunk, vb: VarBuilder) -> Result<Self> {
        let d = trunk.d_model;
        let blocks = (0..trunk.layers)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    ln1: LayerNorm::new(d, vb.pp("ln1"))?,
                    q: candle_nn::linear(d, d, vb.pp("q_proj"))?,
                    k: candle_nn::linear(d, d, vb.pp("k_proj"))?,
                    v: candle_nn::linear(d, d, vb.pp("v_proj"))?,
                    o: candle_nn::linear(d, d, vb.pp("o_proj"))?,
                    ln2: LayerNorm::new(d, vb.pp("ln2"))?,
                    fc1: candle_nn::linear(d, trunk.d_ff, vb.pp("fc1"))?,
                    fc2: candle_nn::linear(trunk.d_ff, d, vb.pp("fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            blocks,
            ln_f: LayerNorm::new(d, vb.pp("ln_f"))?,
            trunk,
        })
    }

    pub fn trunk(&self) -> &Trunk {
        &self.trunk
    }

    /// `mask` compiled for `rows` rows of `len` positions.
    pub fn compile(&self, mask: &Mask, rows: usize, len: usize) -> Result<Arc<BlockMask>> {
        let shape = MaskShape::new(rows, self.trunk.heads, len, len);
        Ok(Arc::new(
            BlockMask::new(mask, shape).map_err(candle_core::Error::wrap)?,
        ))
    }

    /// `x [B, L, d_model]` under `mask` (compiled once for all layers), with the additive
    /// score `bias` in every layer → `[B, L, d_model]` after the final norm.
    pub fn forward(&self, x: &Tensor, mask: &Mask, bias: Option<&Tensor>) -> Result<Tensor> {
        self.forward_layers(x, std::slice::from_ref(mask), bias)
    }

    /// [`forward`](Self::forward) with layer `i` under `masks[i % masks.len()]` (each
    /// distinct mask compiled once).
    pub fn forward_layers(
        &self,
        x: &Tensor,
        masks: &[Mask],
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let compiled = self.compile_layers(masks, b, l)?;
        let mut x = x.clone();
        for (i, block) in compiled.iter().enumerate() {
            x = self.block(i, &x, |q, k, v| attend(&q, &k, &v, block.clone(), bias))?;
        }
        self.final_norm(&x)
    }

    /// Block `i` on `x [B, L, d_model]`, its attention computed by `attend(q, k, v)` from
    /// the heads `[B, heads, L, d_head]` (a stream attends over cached keys and values too).
    pub fn block(
        &self,
        i: usize,
        x: &Tensor,
        attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (blk, h) = (&self.blocks[i], self.trunk.heads);
        let n = blk.ln1.forward(x)?;
        let q = fused::split_heads(&lin(&n, &blk.q)?, h, None)?;
        let k = fused::split_heads(&lin(&n, &blk.k)?, h, None)?;
        let v = fused::split_heads(&lin(&n, &blk.v)?, h, None)?;
        let a = attend(q, k, v)?;
        let x = (x + lin(&fused::merge_heads(&a)?, &blk.o)?)?;
        let m = blk.ln2.forward(&x)?;
        let m = fused::linear_gelu_tanh(&m, blk.fc1.weight(), blk.fc1.bias().expect("bias"))?;
        &x + lin(&m, &blk.fc2)?
    }

    /// The norm after the last block.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.ln_f.forward(x)
    }

    /// The compiled mask of each layer: layer `i` gets `masks[i % masks.len()]`; equal masks
    /// share one compilation.
    pub fn compile_layers(
        &self,
        masks: &[Mask],
        rows: usize,
        len: usize,
    ) -> Result<Vec<Arc<BlockMask>>> {
        if masks.is_empty() {
            candle_core::bail!("the encoder needs at least one mask");
        }
        let mut done: Vec<(&Mask, Arc<BlockMask>)> = Vec::new();
        (0..self.blocks.len())
            .map(|i| {
                let m = &masks[i % masks.len()];
                if let Some((_, c)) = done.iter().find(|(d, _)| *d == m) {
                    return Ok(c.clone());
                }
                let c = self.compile(m, rows, len)?;
                done.push((m, c.clone()));
                Ok(c)
            })
            .collect()
    }

    /// The attention weights of layer `layer` (`[B, heads, L, L]`, each row summing to 1
    /// over the pairs its mask allows, 0 on the others), for pictures: the scores are
    /// materialised with candle ops, detached.
    pub fn attention_weights(
        &self,
        x: &Tensor,
        masks: &[Mask],
        bias: Option<&Tensor>,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        if layer >= self.blocks.len() {
            candle_core::bail!("layer {layer}: the encoder has {}", self.blocks.len());
        }
        let compiled = self.compile_layers(masks, b, l)?;
        let mut x = x.detach();
        for (i, block) in compiled.iter().enumerate().take(layer) {
            x = self.block(i, &x, |q, k, v| attend(&q, &k, &v, block.clone(), bias))?;
        }
        let blk = &self.blocks[layer];
        let h = self.trunk.heads;
        let n = blk.ln1.forward(&x)?;
        let q = fused::split_heads(&lin(&n, &blk.q)?, h, None)?;
        let k = fused::split_heads(&lin(&n, &blk.k)?, h, None)?;
        let opts = AttnOptions {
            bias: bias.map(|t| t.detach()),
            ..AttnOptions::default()
        };
        let s = reference::scores(&q, &k, &opts)?;
        let mask = &masks[layer % masks.len()];
        let keep = reference::dense_mask(mask, MaskShape::new(b, h, l, l), DType::F32, x.device())?
            .broadcast_as(s.shape())?;
        // Hidden pairs out of the softmax, and exactly 0 after it.
        let s = (s + ((&keep - 1.0)? * 1e9)?)?;
        candle_nn::ops::softmax_last_dim(&s)? * keep
    }
}

/// The maskattn op on heads `[B, heads, L, d_head]` under a compiled mask, with the optional
/// dense score bias.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Arc<BlockMask>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let opts = AttnOptions {
        bias: bias.cloned(),
        ..AttnOptions::default()
    };
    Ok(attention_with_block(q, k, v, mask, opts)?.out)
}
