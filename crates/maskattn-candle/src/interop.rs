//! The layer's weights under other names, so trained weights move both ways:
//! PyTorch `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj.weight`,
//! `out_proj.bias`; `q/k/v_proj_weight` when key or value sizes differ) and Hugging Face BERT
//! attention blocks (`{prefix}.self.query|key|value.*`, `{prefix}.output.dense.*`).
//! All of them store linear weights as `[out, in]`, as candle does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Error, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layer::{MaskedMultiHeadAttention, MhaConfig};

/// A naming scheme for the layer's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat<'a> {
    /// `q_proj.weight`, `q_proj.bias`, … `o_proj.bias`.
    Native,
    /// PyTorch `nn.MultiheadAttention`.
    TorchMha,
    /// A Hugging Face BERT attention block under `prefix`
    /// (e.g. `encoder.layer.0.attention`).
    Bert { prefix: &'a str },
}

const PROJ: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// `(native, BERT)` names of every BERT attention weight, both directions' one table.
fn bert_names(prefix: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let bert = ["self.query", "self.key", "self.value", "output.dense"];
    PROJ.iter().zip(bert).flat_map(move |(p, n)| {
        ["weight", "bias"].map(|part| (format!("{p}.{part}"), format!("{prefix}.{n}.{part}")))
    })
}

fn bad(m: String) -> Error {
    Error::Msg(format!("weights: {m}"))
}

fn take(t: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    t.get(name).cloned().ok_or_else(|| {
        let mut have: Vec<_> = t.keys().map(String::as_str).collect();
        have.sort();
        bad(format!("`{name}` is missing (have: {})", have.join(", ")))
    })
}

fn check_torch(cfg: &MhaConfig) -> Result<()> {
    if cfg.num_kv_heads != cfg.num_heads || cfg.num_heads * cfg.head_dim != cfg.d_model {
        return Err(bad(format!(
            "nn.MultiheadAttention has num_kv_heads = num_heads and head_dim = d_model / num_heads; the config has {} heads, {} kv heads, head_dim {}, d_model {}",
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
        )));
    }
    Ok(())
}

fn check_bert(cfg: &MhaConfig) -> Result<()> {
    check_torch(cfg)?;
    if !cfg.bias || cfg.kdim != cfg.d_model || cfg.vdim != cfg.d_model {
        return Err(bad(
            "BERT attention has biases and kdim = vdim = hidden size".into(),
        ));
    }
    Ok(())
}

/// Renames (and splits or joins) weights from `format` into native names.
pub fn to_native(
    tensors: &HashMap<String, Tensor>,
    format: WeightFormat,
    cfg: &MhaConfig,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match format {
        WeightFormat::Native => {
            for p in PROJ {
                out.insert(
                    format!("{p}.weight"),
                    take(tensors, &format!("{p}.weight"))?,
                );
                if cfg.bias {
                    out.insert(format!("{p}.bias"), take(tensors, &format!("{p}.bias"))?);
                }
            }
        }
        WeightFormat::TorchMha => {
            check_torch(cfg)?;
            let e = cfg.d_model;
            if let Some(w) = tensors.get("in_proj_weight") {
                for (i, p) in PROJ[..3].iter().enumerate() {
                    out.insert(format!("{p}.weight"), w.narrow(0, i * e, e)?.contiguous()?);
                }
            } else {
                for p in &PROJ[..3] {
                    out.insert(
                        format!("{p}.weight"),
                        take(tensors, &format!("{p}_weight"))?,
                    );
                }
            }
            out.insert("o_proj.weight".into(), take(tensors, "out_proj.weight")?);
            if cfg.bias {
                let b = take(tensors, "in_proj_bias")?;
                for (i, p) in PROJ[..3].iter().enumerate() {
                    out.insert(format!("{p}.bias"), b.narrow(0, i * e, e)?.contiguous()?);
                }
                out.insert("o_proj.bias".into(), take(tensors, "out_proj.bias")?);
            }
        }
        WeightFormat::Bert { prefix } => {
            check_bert(cfg)?;
            for (native, bert) in bert_names(prefix) {
                out.insert(native, take(tensors, &bert)?);
            }
        }
    }
    Ok(out)
}

/// Renames native weights into `format` (the inverse of [`to_native`]).
pub fn from_native(
    native: &HashMap<String, Tensor>,
    format: WeightFormat,
    cfg: &MhaConfig,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match format {
        WeightFormat::Native => return to_native(native, format, cfg),
        WeightFormat::TorchMha => {
            check_torch(cfg)?;
            let w: Vec<Tensor> = PROJ[..3]
                .iter()
                .map(|p| take(native, &format!("{p}.weight")))
                .collect::<Result<_>>()?;
            if cfg.kdim == cfg.d_model && cfg.vdim == cfg.d_model {
                out.insert("in_proj_weight".into(), Tensor::cat(&w, 0)?);
            } else {
                for (p, w) in PROJ[..3].iter().zip(w) {
                    out.insert(format!("{p}_weight"), w);
                }
            }
            out.insert("out_proj.weight".into(), take(native, "o_proj.weight")?);
            if cfg.bias {
                let b: Vec<Tensor> = PROJ[..3]
                    .iter()
                    .map(|p| take(native, &format!("{p}.bias")))
                    .collect::<Result<_>>()?;
                out.insert("in_proj_bias".into(), Tensor::cat(&b, 0)?);
                out.insert("out_proj.bias".into(), take(native, "o_proj.bias")?);
            }
        }
        WeightFormat::Bert { prefix } => {
            check_bert(cfg)?;
            for (native_name, bert) in bert_names(prefix) {
                out.insert(bert, take(native, &native_name)?);
            }
        }
    }
    Ok(out)
}

impl MaskedMultiHeadAttention {
    /// The layer's weights under native names.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (p, lin) in PROJ.iter().zip(self.projections()) {
            out.insert(format!("{p}.weight"), lin.weight().clone());
            if let Some(b) = lin.bias() {
                out.insert(format!("{p}.bias"), b.clone());
            }
        }
        out
    }

    /// Writes the weights in `format` to a safetensors file (a temporary file, then a rename).
    pub fn save(&self, path: impl AsRef<Path>, format: WeightFormat) -> Result<()> {
        let path = path.as_ref();
        let tensors = from_native(&self.weights(), format, self.config())?;
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| bad(format!("renaming {}: {e}", tmp.display())))
    }

    /// A layer (for inference: weights are constants) from weights in `format`.
    pub fn from_weights(
        cfg: MhaConfig,
        tensors: &HashMap<String, Tensor>,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let native = to_native(tensors, format, &cfg)?;
        let native = native
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        MaskedMultiHeadAttention::new(cfg, VarBuilder::from_tensors(native, DType::F32, device))
    }

    /// [`from_weights`](Self::from_weights) reading a safetensors file.
    pub fn load(
        cfg: MhaConfig,
        path: impl AsRef<Path>,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| bad(format!("reading {}: {e}", path.display())))?;
        Self::from_weights(cfg, &tensors, format, device)
    }
}
