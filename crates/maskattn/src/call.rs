//! What every task of one kernel call shares: the inputs, the block mask, the checked sizes
//! and the score parameters (one type for the forward, the decode path and the backward).

use crate::bias::Bias;
use crate::block::BlockMask;
use crate::pack::pad16;
use crate::params::{DropTile, Dropout};
use crate::shape::AttnDims;
use crate::softmax::{Geom, TileJob};
use crate::view::View;

pub(crate) struct Call<'a, 'b, T> {
    pub q: &'a View<'b, T>,
    pub k: &'a View<'b, T>,
    pub v: &'a View<'b, T>,
    pub bias: Option<&'a Bias<'b>>,
    pub dropout: Option<&'a Dropout>,
    pub block: &'a BlockMask,
    pub dims: AttnDims,
    /// The score scale `s`, resolved (`1/sqrt(d)` by default).
    pub scale: f32,
}

impl<T> Call<'_, '_, T> {
    /// The tile geometry of this call's block mask and head size.
    pub fn geom(&self) -> Geom {
        Geom {
            d: self.dims.d,
            d_pad: pad16(self.dims.d),
            tk: self.block.tile_k(),
            tk_pad: pad16(self.block.tile_k()),
            words: self.block.words(),
        }
    }

    /// Dropout's key of each query row `i0 ..` of head `(b, h)`, one per entry of `keys`
    /// (nothing without dropout).
    pub fn drop_keys(&self, (b, h, i0): (usize, usize, usize), keys: &mut [u32]) {
        if let Some(dr) = self.dropout {
            for (r, key) in keys.iter_mut().enumerate() {
                *key = dr.row_key(b, h, i0 + r, self.dims.q_heads, self.dims.lq);
            }
        }
    }

    /// The job of query rows `i0 ..` of head `(b, h)` against the key tile that starts at
    /// `j0` (rows and columns clipped to the sequence): the bias tile is written into
    /// `bias` (`tile_q × tk_pad`), and dropout reads the rows' keys from `drop_keys` (as
    /// [`Call::drop_keys`] wrote them). The forward and the backward build theirs here.
    pub fn tile_job<'s>(
        &self,
        g: Geom,
        (b, h, i0, j0): (usize, usize, usize, usize),
        bits: Option<&'s [u64]>,
        bias: &'s mut [f32],
        drop_keys: &'s [u32],
    ) -> TileJob<'s> {
        let rows = (self.dims.lq - i0).min(self.block.tile_q());
        let cols = (self.dims.lk - j0).min(g.tk);
        let bias = self.bias.map(|bs| {
            bs.tile((b, h), (i0, rows), (j0, cols), (g.tk_pad, bias));
            &bias[..]
        });
        TileJob {
            g,
            rows,
            cols,
            bits,
            scale: self.scale,
            bias,
            drop: self
                .dropout
                .map(|dr| DropTile::new(dr, &drop_keys[..rows], j0)),
        }
    }
}
