//! Masked multi-head attention for [candle](https://github.com/huggingface/candle): an
//! autograd-connected attention op over the maskattn kernels, the multi-head layer (GQA,
//! cross attention, rotary positions, dropout), a KV cache for decoding, weight interop
//! with PyTorch and Hugging Face BERT, and explicit conversions from other mask
//! conventions. The kernel crate knows nothing of candle; this crate is the adapter.

pub mod interop;
mod kv_cache;
mod layer;
pub mod mask_convert;
mod op;
pub mod plain;
mod rope;

pub use interop::WeightFormat;
pub use kv_cache::KvCache;
pub use layer::{Backend, MaskedMultiHeadAttention, MhaConfig, Mode};
pub use op::{attention, attention_with_block, Attention, AttnOptions};
pub use rope::Rope;
