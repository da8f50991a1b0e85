//! Masked multi-head attention for [candle](https://github.com/huggingface/candle): an
//! autograd-connected attention op over the maskattn kernels, the multi-head layer (GQA,
//! cross attention, rotary positions, dropout), a KV cache for decoding, weight interop
//! with PyTorch and Hugging Face BERT, and explicit conversions from other mask
//! conventions. The kernel crate knows nothing of candle; this crate is the adapter.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
//! use maskattn::Mask;
//! use maskattn_candle::{mask_convert, MaskedMultiHeadAttention, MhaConfig, MhaOptions, Mode};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let vars = VarMap::new();
//! // 64 features, 8 query heads sharing 2 key/value heads, rotary positions, dropout 0.1.
//! let cfg = MhaConfig::new(64, 8).with_kv_heads(2).with_rope(10_000.0).with_dropout(0.1);
//! let attn = MaskedMultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev).pp("attn"))?;
//!
//! // Two sequences of length 10; the second has 3 padding positions at the end.
//! let x = Tensor::randn(0f32, 1.0, (2, 10, 64), &dev)?;
//! let padding = Mask::key_padding(vec![10, 7]);
//! // The same mask from PyTorch's convention (true = ignore), converted explicitly:
//! let ignore = Tensor::new(&[[0u8; 10], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]], &dev)?;
//! let same = mask_convert::from_torch_key_padding(&ignore)?;
//!
//! // Forward (causal and padded), a loss, backward, one AdamW step.
//! let mask = Mask::causal() & padding;
//! let y = attn.forward(&x, &MhaOptions { mode: Mode::Train { seed: 1 }, ..MhaOptions::new(&mask) })?;
//! let loss = y.sqr()?.mean_all()?;
//! let mut opt = AdamW::new(vars.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
//! opt.backward_step(&loss)?;
//!
//! // Inference with the attention weights, for inspection.
//! let (_, weights) = attn.forward_with_weights(&x, &MhaOptions::new(&(Mask::causal() & same)))?;
//! assert_eq!(weights.dims(), &[2, 8, 10, 10]);
//! # Ok(())
//! # }
//! ```

pub mod bert;
pub mod fused;
pub mod interop;
mod kv_cache;
mod layer;
pub mod mask_convert;
pub mod model;
mod mods;
mod op;
mod openblas;
mod options;
pub mod products;
pub mod reference;
mod rope;
mod scores;
mod storage;

pub use interop::WeightFormat;
pub use kv_cache::KvCache;
pub use layer::{
    AlibiMode, MaskedMultiHeadAttention, MhaConfig, MhaMask, MhaOptions, Mode, RelConfig,
};
#[doc(hidden)]
pub use op::kernel_backward_calls;
pub use op::{attention, attention_with_block, Attention};
pub use options::{AttnOptions, RelPos};
pub use rope::Rope;
