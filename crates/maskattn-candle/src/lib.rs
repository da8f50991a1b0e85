//! Masked multi-head attention for [candle](https://github.com/huggingface/candle): an
//! autograd-connected attention op over the maskattn kernels, the multi-head layer (GQA,
//! cross attention, rotary positions, dropout), a KV cache for decoding, weight interop
//! with PyTorch and Hugging Face BERT, and explicit conversions from other mask
//! conventions. The kernel crate knows nothing of candle; this crate is the adapter.

mod op;
pub mod plain;

pub use op::{attention, attention_with_block, Attention, AttnOptions};
