//! The shape of one attention call, read off the input views and checked once.

use crate::bias::Bias;
use crate::error::{mismatch, AttnError, Result};
use crate::mask::MaskShape;
use crate::view::{Element, View};

/// `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
}

impl AttnDims {
    /// Checks `q`, `k`, `v` against each other and returns their common shape.
    pub fn of<T: Element>(q: &View<T>, k: &View<T>, v: &View<T>) -> Result<Self> {
        let [b, hq, lq, d] = q.shape();
        let [kb, hkv, lk, kd] = k.shape();
        if k.shape() != v.shape() {
            return Err(mismatch(format!(
                "k {:?} and v {:?} must have the same shape",
                k.shape(),
                v.shape()
            )));
        }
        if kb != b {
            return Err(mismatch(format!("q has batch {b}, k and v have {kb}")));
        }
        if kd != d {
            return Err(mismatch(format!("q has head dim {d}, k and v have {kd}")));
        }
        for (n, what) in [(b, "batch"), (lq, "L_q"), (lk, "L_k"), (d, "head dim")] {
            if n == 0 {
                return Err(AttnError::ZeroDim { what });
            }
        }
        if hkv == 0 || hq == 0 || hq % hkv != 0 {
            return Err(AttnError::HeadRatio {
                q_heads: hq,
                kv_heads: hkv,
            });
        }
        // The kernels allocate f32 results shaped like q (and LSE), k and v: their sizes in
        // bytes must fit. Views with stride 0 can be far larger than their buffers.
        for (name, factors) in [("q", [b, hq, lq, d]), ("k", [b, hkv, lk, d])] {
            let fits = factors
                .iter()
                .try_fold(std::mem::size_of::<f32>(), |n, &x| n.checked_mul(x))
                .is_some_and(|bytes| bytes <= isize::MAX as usize);
            if !fits {
                return Err(AttnError::SizeOverflow {
                    name,
                    what: "bytes of an f32 result",
                    factors: factors.to_vec(),
                });
            }
        }
        Ok(AttnDims {
            batch: b,
            q_heads: hq,
            kv_heads: hkv,
            lq,
            lk,
            d,
        })
    }

    pub fn mask_shape(&self) -> MaskShape {
        MaskShape::new(self.batch, self.q_heads, self.lq, self.lk)
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// `1/sqrt(d)` unless given; non-finite scales are rejected.
    pub fn scale(&self, scale: Option<f32>) -> Result<f32> {
        let s = scale.unwrap_or(1.0 / (self.d as f32).sqrt());
        if !s.is_finite() {
            return Err(AttnError::NonFiniteScale(s));
        }
        Ok(s)
    }

    pub fn check_bias(&self, bias: Option<&Bias>) -> Result<()> {
        match bias {
            Some(b) => b.check([self.batch, self.q_heads, self.lq, self.lk]),
            None => Ok(()),
        }
    }

    /// Values in a contiguous tensor shaped like q, `B · H_q · L_q · d`.
    pub fn q_len(&self) -> usize {
        self.batch * self.q_heads * self.lq * self.d
    }

    /// Values in a contiguous tensor shaped like k and v, `B · H_kv · L_k · d`.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.lk * self.d
    }

    /// Checks an output buffer the caller provides: `len` values where `want` are needed.
    pub(crate) fn check_buffer(name: &str, len: usize, want: usize, what: &str) -> Result<()> {
        if len != want {
            return Err(mismatch(format!(
                "{name} holds {len} values, expected {what} = {want}"
            )));
        }
        Ok(())
    }

    /// Checks a tensor that must have q's shape (the output and its gradient).
    pub fn check_like_q<T: Element>(&self, name: &str, t: &View<T>) -> Result<()> {
        let want = [self.batch, self.q_heads, self.lq, self.d];
        if t.shape() != want {
            return Err(mismatch(format!(
                "{name} has shape {:?}, expected {want:?}",
                t.shape()
            )));
        }
        Ok(())
    }
}
