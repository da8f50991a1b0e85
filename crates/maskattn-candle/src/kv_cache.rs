//! Keys and values of past positions for autoregressive decoding, `[B, H_kv, L, head_dim]`,
//! grown in place (candle-nn's cache); attention reads the filled part as a strided view.

use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct KvCache {
    inner: candle_nn::kv_cache::KvCache,
}

impl KvCache {
    /// A cache that grows by `chunk` positions whenever it is full.
    pub fn new(chunk: usize) -> Self {
        KvCache {
            inner: candle_nn::kv_cache::KvCache::new(2, chunk.max(1)),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.inner.current_seq_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&mut self) {
        self.inner.reset()
    }

    /// Appends `k, v [B, H_kv, L_new, head_dim]`; returns all keys and values so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner.append(&k.contiguous()?, &v.contiguous()?)
    }
}
