//! Rotary position embedding ("rotate half", as in GPT-NeoX and Llama) written with plain
//! candle ops, so gradients flow through it (candle-nn's fused rotary ops have no backward).

use candle_core::{Result, Tensor, D};

#[derive(Clone, Debug)]
pub struct Rope {
    /// `θ^(−2i/head_dim)` for `i < head_dim/2`.
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        Rope {
            inv_freq: (0..half)
                .map(|i| theta.powf(-((2 * i) as f32) / head_dim as f32))
                .collect(),
        }
    }

    /// `cos θ`, `sin θ` for positions `offset .. offset + len`, `[len, head_dim]` each (the
    /// values [`apply`](Self::apply) multiplies by; for the fused head split).
    pub fn table_values(&self, offset: usize, len: usize) -> crate::fused::RotaryTables {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * 2 * half);
        let mut sin = Vec::with_capacity(len * 2 * half);
        for p in offset..offset + len {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        crate::fused::RotaryTables {
            cos,
            sin,
            dim: 2 * half,
        }
    }

    /// `(cos, sin)`, each `[L, head_dim]`, for positions `offset .. offset + len`.
    fn tables(&self, offset: usize, len: usize, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = self.table_values(offset, len);
        let shape = (len, t.dim);
        Ok((
            Tensor::from_vec(t.cos, shape, like.device())?.to_dtype(like.dtype())?,
            Tensor::from_vec(t.sin, shape, like.device())?.to_dtype(like.dtype())?,
        ))
    }

    /// `x [B, H, L, head_dim]` rotated for positions `offset ..`: `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, l, hd) = x.dims4()?;
        let half = hd / 2;
        let (cos, sin) = self.tables(offset, l, x)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}
