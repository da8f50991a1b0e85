//! What every task of one kernel call shares: the inputs, the block mask, the checked sizes
//! and the score parameters (one type for the forward, the decode path and the backward).

use crate::bias::Bias;
use crate::block::BlockMask;
use crate::cancel::Cancel;
use crate::pack::pad16;
use crate::params::{DropTile, Dropout, Params};
use crate::score_mod::PosTable;
use crate::shape::AttnDims;
use crate::softmax::{Geom, PosRows, TileJob};
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
    pub softcap: Option<f32>,
    pub sinks: Option<&'b [f32]>,
    /// ALiBi + relative positions per head and offset `j − i'` (with either of them).
    pub pos: Option<PosTable>,
    /// Set from another thread to stop the call between tiles.
    pub cancel: Option<&'b Cancel>,
}

impl<'a, 'b, T> Call<'a, 'b, T> {
    /// Whether the caller has asked the call to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_some_and(Cancel::is_cancelled)
    }

    /// The call of `params` on checked inputs (`dims`, the resolved `scale`): builds the
    /// positional table once (O(H_q · (L_q + L_k)) values) where ALiBi or T5 buckets are on.
    pub fn new(
        (q, k, v): (&'a View<'b, T>, &'a View<'b, T>, &'a View<'b, T>),
        block: &'a BlockMask,
        params: &'a Params<'b>,
        dims: AttnDims,
        scale: f32,
    ) -> Self {
        let pos = PosTable::new(
            params.alibi,
            params.rel.as_ref(),
            (dims.q_heads, dims.lq, dims.lk),
            pad16(block.tile_k()),
            block.position_shift(),
        );
        Call {
            q,
            k,
            v,
            bias: params.bias.as_ref(),
            dropout: params.dropout.as_ref(),
            block,
            dims,
            scale,
            softcap: params.softcap,
            sinks: params.sinks,
            pos,
            cancel: params.cancel,
        }
    }

    /// The sink logit of query head `h`, if the call has sinks.
    pub fn sink(&self, h: usize) -> Option<f32> {
        self.sinks.map(|s| s[h])
    }

    /// The positional rows of a tile whose row `r` is query `i0 + r % per_head` of head
    /// `h0 + r / per_head`, against keys from `j0`.
    pub fn pos_rows(
        &self,
        (h0, i0, per_head): (usize, usize, usize),
        j0: usize,
    ) -> Option<PosRows<'_>> {
        self.pos.as_ref().map(|p| PosRows {
            table: &p.data,
            stride: p.stride,
            h0,
            i0,
            per_head,
            j0,
            lq: self.dims.lq,
        })
    }

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
                *key = self.drop_key(dr, (b, h, i0 + r));
            }
        }
    }

    /// Dropout's key of query row `i` of head `(b, h)`, from the row's position in the whole
    /// problem (a block of a larger one draws the whole problem's pattern, not its own).
    pub fn drop_key(&self, dr: &Dropout, (b, h, i): (usize, usize, usize)) -> u32 {
        let q0 = self.block.offsets().0;
        let lq = self.block.global_shape().lq;
        dr.row_key(b, h, q0 + i, self.dims.q_heads, lq)
    }

    /// Dropout's tile of `rows` keys against the keys from `j0` (local), at the keys'
    /// positions in the whole problem.
    pub fn drop_tile<'s>(&self, rows: &'s [u32], j0: usize) -> Option<DropTile<'s>>
    where
        'a: 's,
    {
        let k0 = self.block.offsets().1;
        self.dropout.map(|dr| DropTile::new(dr, rows, k0 + j0))
    }

    /// The job of query rows `i0 ..` of head `(b, h)` against the key tile that starts at
    /// `j0` (rows and columns clipped to the sequence): the bias tile is written into
    /// `bias` (`tile_q × tk_pad`), and dropout reads the rows' keys from `drop_keys` (as
    /// [`Call::drop_keys`] wrote them). The forward and the backward build theirs here.
    pub fn tile_job<'s>(
        &'s self,
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
            drop: self.drop_tile(&drop_keys[..rows], j0),
            softcap: self.softcap,
            pos: self.pos_rows((h, i0, usize::MAX), j0),
        }
    }
}
