//! The head split and merge around attention as one candle op each, the split optionally
//! rotating (rotary positions, "rotate half"), each with a backward.
//!
//! `split_heads`: `x [B, L, H·d]` (a projection's output) → `[B, H, L, d]`, contiguous,
//! rotated by the `(cos, sin)` tables when given. `merge_heads`: `[B, H, L, d]` →
//! `[B, L, H·d]` (attention's output into the output projection).
//!
//! Written with candle's ops the split is a reshape and a transpose, and rotary is two
//! narrows, a negation, a concatenation, two broadcast products and a sum — and in the
//! backward each of those ops zero-fills and adds a gradient buffer, the narrows pad theirs
//! with zeros. Here each direction is one pass: the backward of a rotation by the angle is
//! the rotation by minus the angle (the tables hold `cos θ`, `sin θ` per position and
//! dimension, as [`Rope`](crate::Rope) builds them, so the forward gives the composed ops'
//! bits: `x·cos + rotate_half(x)·sin`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::par::PAR_MIN;

use super::gelu::contiguous_f32;

/// `cos θ` and `sin θ` tables, `[L, d]` each (row `p` for the `p`-th position of the call).
#[derive(Clone, Debug)]
pub struct RotaryTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// `d`, the row length.
    pub dim: usize,
}

/// `x [B, L, heads·d]` → `[B, heads, L, d]` (contiguous), rotated by `rotary` when given
/// (its tables `[L, d]`); differentiable. f32 CPU tensors take the fused op; others the
/// reshape and transpose (and no rotation: the caller rotates those with candle's ops).
pub fn split_heads(x: &Tensor, heads: usize, rotary: Option<&Arc<RotaryTables>>) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    if heads == 0 || !hd.is_multiple_of(heads) {
        return Err(Error::Msg(format!(
            "split_heads: {hd} features do not split into {heads} heads"
        )));
    }
    let d = hd / heads;
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return x.reshape((b, l, heads, d))?.transpose(1, 2);
    }
    if let Some(r) = rotary {
        if r.dim != d || !d.is_multiple_of(2) || r.cos.len() != l * d || r.sin.len() != l * d {
            return Err(Error::Msg(format!(
                "split_heads: rotary tables of {} values, rows of {}, for L {l}, d {d}",
                r.cos.len(),
                r.dim
            )));
        }
    }
    x.contiguous()?.apply_op1(Heads {
        dir: Dir::Split,
        heads,
        rotary: rotary.cloned(),
    })
}

/// `y [B, H, L, d]` → `[B, L, H·d]` (contiguous); differentiable. f32 CPU tensors take the
/// fused op; others a transpose, a copy and a reshape.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = y.dims4()?;
    if y.dtype() != DType::F32 || !y.device().is_cpu() {
        return y.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d));
    }
    y.contiguous()?.apply_op1(Heads {
        dir: Dir::Merge,
        heads: h,
        rotary: None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// `[B, L, H·d]` → `[B, H, L, d]`.
    Split,
    /// `[B, H, L, d]` → `[B, L, H·d]`.
    Merge,
}

struct Heads {
    dir: Dir,
    heads: usize,
    /// Applied on the split (forward), undone on the merge of its gradient (backward).
    rotary: Option<Arc<RotaryTables>>,
}

/// `dst = src·cos + sign·rotate_half(src)·sin` for one row of `d` values, where
/// `rotate_half(x) = [−x₂, x₁]`: `sign` 1 rotates by θ, −1 by −θ (the backward).
#[inline(always)]
fn rotate(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = src.len() / 2;
    let (s1, s2) = src.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    let (c1, c2) = cos.split_at(half);
    let (n1, n2) = sin.split_at(half);
    for j in 0..half {
        d1[j] = s1[j] * c1[j] + (-sign * s2[j]) * n1[j];
        d2[j] = s2[j] * c2[j] + (sign * s1[j]) * n2[j];
    }
}

/// Moves (and rotates with `sign`) every `d`-row between the two layouts, in parallel over
/// the destination: `split` writes `[B, H, L, d]` from `[B, L, H, d]`, else the reverse.
fn permute(
    src: &[f32],
    (_, h, l, d): (usize, usize, usize, usize),
    split: bool,
    rotary: Option<(&RotaryTables, f32)>,
) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    if d == 0 || src.is_empty() {
        return dst;
    }
    // Destination rows of one (b, h) when splitting, of one (b, l) when merging.
    let (outer, inner) = if split { (h, l) } else { (l, h) };
    // The source index of the row (bi, i, j) of the destination [b, outer, inner, d].
    let src_row = |bi: usize, i: usize, j: usize| {
        let (hi, li) = if split { (i, j) } else { (j, i) };
        if split {
            ((bi * l + li) * h + hi) * d
        } else {
            ((bi * h + hi) * l + li) * d
        }
    };
    let fill = |(o, rows): (usize, &mut [f32])| {
        let (bi, i) = (o / outer, o % outer);
        for (j, row) in rows.chunks_exact_mut(d).enumerate() {
            let s = &src[src_row(bi, i, j)..][..d];
            match rotary {
                None => row.copy_from_slice(s),
                Some((t, sign)) => {
                    let pos = if split { j } else { i };
                    let (c, n) = (&t.cos[pos * d..][..d], &t.sin[pos * d..][..d]);
                    rotate(s, row, c, n, sign);
                }
            }
        }
    };
    // A decoding step's few rows cost less than waking rayon's threads.
    if src.len() < PAR_MIN {
        dst.chunks_mut(inner * d).enumerate().for_each(fill);
    } else {
        dst.par_chunks_mut(inner * d).enumerate().for_each(fill);
    }
    dst
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        match self.dir {
            Dir::Split => "maskattn-split-heads",
            Dir::Merge => "maskattn-merge-heads",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("heads", s, l)?;
        let h = self.heads;
        let (dims, shape): ((usize, usize, usize, usize), Shape) = match self.dir {
            Dir::Split => {
                let &[b, len, hd] = l.dims() else {
                    return Err(Error::Msg("split_heads: x must be [B, L, H·d]".into()));
                };
                let d = hd / h;
                ((b, h, len, d), (b, h, len, d).into())
            }
            Dir::Merge => {
                let &[b, hh, len, d] = l.dims() else {
                    return Err(Error::Msg("merge_heads: y must be [B, H, L, d]".into()));
                };
                ((b, hh, len, d), (b, len, hh * d).into())
            }
        };
        let rot = self.rotary.as_deref().map(|t| (t, 1.0));
        let y = permute(x, dims, self.dir == Dir::Split, rot);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The gradient goes the other way, rotated back (the derivative is not
        // differentiated again).
        let g = grad_res.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let candle_core::Storage::Cpu(gc) = &*gs else {
            return Err(Error::Msg("heads: CPU only".into()));
        };
        let gv = contiguous_f32("heads", gc, gl)?;
        let h = self.heads;
        let dims = match self.dir {
            Dir::Split => {
                let (b, _, len, d) = g.dims4()?;
                (b, h, len, d)
            }
            Dir::Merge => arg.dims4()?,
        };
        let rot = self.rotary.as_deref().map(|t| (t, -1.0));
        let dx = permute(gv, dims, self.dir == Dir::Merge, rot);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
