//! What every task of one kernel call shares: the inputs, the block mask, the checked sizes
//! and the score parameters (one type for the forward, the decode path and the backward).

use crate::bias::Bias;
use crate::block::BlockMask;
use crate::pack::pad16;
use crate::params::Dropout;
use crate::shape::AttnDims;
use crate::softmax::Geom;
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
}
