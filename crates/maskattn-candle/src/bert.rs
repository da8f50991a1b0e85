//! A BERT encoder on the masked attention layer, loading any Hugging Face BERT checkpoint
//! folder (`config.json` + `model.safetensors`, BERT-base names, with or without a `bert.`
//! prefix). Post-norm blocks, exact-erf GELU, absolute positions, token type 0.
//!
//! Shapes: `ids [B, L]` (u32) and the real length of each row → hidden states `[B, L, hidden]`.
//! Padding positions are hidden from every query by a key padding mask.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Error, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use maskattn::{BlockMask, Mask, MaskShape};
use serde::Deserialize;

use crate::fused;
use crate::interop::WeightFormat;
use crate::layer::{MaskedMultiHeadAttention, MhaConfig, MhaOptions};
use crate::model::LayerNorm;

/// The fields of a Hugging Face BERT `config.json` this encoder reads.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
}

fn gelu() -> String {
    "gelu".into()
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

struct BertLayer {
    attn: MaskedMultiHeadAttention,
    ln_attn: LayerNorm,
    inter: Linear,
    out: Linear,
    ln_out: LayerNorm,
}

impl BertLayer {
    /// `out(gelu_erf(inter(x)))` in two fused ops (the product, bias and GELU of `inter` are
    /// one), on the products' instruction set (`crate::products`: `MASKATTN_ISA=avx2`
    /// reaches them; `candle_nn::Linear` would keep gemm's own choice).
    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (inter, out) = (&self.inter, &self.out);
        let h = match inter.bias() {
            Some(b) => fused::linear_gelu_erf(x, inter.weight(), b)?,
            None => fused::gelu_erf(&fused::linear(x, inter.weight(), None)?)?,
        };
        fused::linear(&h, out.weight(), out.bias())
    }
}

pub struct Bert {
    word: Embedding,
    pos: Embedding,
    typ: Embedding,
    ln: LayerNorm,
    layers: Vec<BertLayer>,
    cfg: BertConfig,
}

fn bad(m: String) -> Error {
    Error::Msg(m)
}

impl Bert {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            bad(format!(
                "{}: cannot read config.json ({e}); is this a BERT model folder?",
                dir.display()
            ))
        })?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not a BERT config ({e})", cfg_path.display())))?;
        if cfg.hidden_act != "gelu" {
            return Err(bad(format!(
                "{}: hidden_act {:?} is not supported (gelu only)",
                cfg_path.display(),
                cfg.hidden_act
            )));
        }
        let weights = dir.join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights, device)
            .map_err(|e| bad(format!("{}: cannot load ({e})", weights.display())))?;
        // Checkpoints saved from `BertForX` carry a `bert.` prefix.
        if tensors.keys().any(|k| k.starts_with("bert.")) {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix("bert.").map(|s| (s.to_string(), v)))
                .collect();
        }
        Self::from_tensors(cfg, tensors, device)
    }

    pub fn from_tensors(
        cfg: BertConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || !h.is_multiple_of(cfg.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                cfg.num_attention_heads
            )));
        }
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, device);
        let e = vb.pp("embeddings");
        let word = candle_nn::embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?;
        let pos =
            candle_nn::embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?;
        let typ = candle_nn::embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?;
        let ln = LayerNorm::with_eps(h, cfg.layer_norm_eps, e.pp("LayerNorm"))?;
        let mha = MhaConfig::new(h, cfg.num_attention_heads);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let prefix = format!("encoder.layer.{i}.attention");
                Ok(BertLayer {
                    attn: MaskedMultiHeadAttention::from_weights(
                        mha.clone(),
                        &tensors,
                        WeightFormat::Bert { prefix: &prefix },
                        device,
                    )?,
                    ln_attn: LayerNorm::with_eps(
                        h,
                        cfg.layer_norm_eps,
                        l.pp("attention.output.LayerNorm"),
                    )?,
                    inter: candle_nn::linear(h, cfg.intermediate_size, l.pp("intermediate.dense"))?,
                    out: candle_nn::linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                    ln_out: LayerNorm::with_eps(h, cfg.layer_norm_eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            word,
            pos,
            typ,
            ln,
            layers,
            cfg,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Hidden states `[B, L, hidden]` of `ids [B, L]`; row `b` has `lengths[b]` real tokens
    /// (the rest is padding, which no query attends to). The padding mask is compiled once
    /// for the call and used by every layer.
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let block = self.compile_mask(&Mask::key_padding(lengths.to_vec()), b, l)?;
        self.forward_with_block(ids, &block)
    }

    /// `mask` compiled for this encoder's attention on `batch` rows of `len` tokens
    /// (`[batch, heads, len, len]`), for [`forward_with_block`](Self::forward_with_block).
    pub fn compile_mask(&self, mask: &Mask, batch: usize, len: usize) -> Result<Arc<BlockMask>> {
        let shape = MaskShape::new(batch, self.cfg.num_attention_heads, len, len);
        Ok(Arc::new(BlockMask::new(mask, shape).map_err(Error::wrap)?))
    }

    /// Hidden states `[B, L, hidden]` of `ids [B, L]` under a mask compiled beforehand
    /// ([`compile_mask`](Self::compile_mask)); `forward` is this with the key padding mask
    /// of its lengths. A block mask of another shape is an error.
    pub fn forward_with_block(&self, ids: &Tensor, block: &Arc<BlockMask>) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        if l > self.cfg.max_position_embeddings {
            return Err(bad(format!(
                "{l} tokens exceed the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let positions = Tensor::arange(0u32, l as u32, ids.device())?;
        let types = ids.zeros_like()?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.pos.forward(&positions)?)?
            .add(&self.typ.forward(&types)?)?;
        let mut x = self.ln.forward(&x)?;
        for layer in &self.layers {
            let a = layer.attn.forward(&x, &MhaOptions::new(block))?;
            x = layer.ln_attn.forward(&(x + a)?)?;
            x = layer.ln_out.forward(&(&x + layer.feed_forward(&x)?)?)?;
        }
        Ok(x)
    }
}
