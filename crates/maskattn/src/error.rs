//! Typed errors: every bad input is reported before a kernel starts, never as a panic inside one.

use thiserror::Error;

use crate::mask_shape::MaskShape;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum AttnError {
    /// A tensor view whose shape and strides reach past the end of its buffer.
    #[error("{name}: shape {shape:?} with strides {strides:?} needs {needed} elements but the buffer holds {len}")]
    ViewOutOfBounds {
        name: &'static str,
        shape: [usize; 4],
        strides: [usize; 4],
        needed: usize,
        len: usize,
    },

    /// Two tensors disagree on a dimension they must share.
    #[error("shape mismatch: {what}")]
    ShapeMismatch { what: String },

    /// Grouped-query attention needs every key/value head to serve the same number of query heads.
    #[error("query heads ({q_heads}) must be a non-zero multiple of key/value heads ({kv_heads})")]
    HeadRatio { q_heads: usize, kv_heads: usize },

    /// A dimension that must be non-zero is zero.
    #[error("{what} must be at least 1")]
    ZeroDim { what: &'static str },

    #[error("scale must be finite, got {0}")]
    NonFiniteScale(f32),

    /// A mask's data does not fit the attention shape (wrong length, does not broadcast, ...).
    #[error("mask does not fit the attention shape: {0}")]
    Mask(String),

    /// A mask nested deeper than [`crate::Mask::MAX_DEPTH`] levels of `&`, `|`, `!` and
    /// per-head masks (long chains of one operator are flat and never this deep).
    #[error("mask is nested {depth} levels deep; at most {max} are allowed")]
    MaskTooDeep { depth: usize, max: usize },

    /// A mask expression that does not parse, or names a data term nobody supplied.
    #[error("mask expression, at byte {at}: {message}")]
    MaskSyntax { at: usize, message: String },

    /// A block mask compiled for another shape or tile size than the call it is used with.
    #[error("block mask was compiled for {compiled}, but the call has {call}")]
    BlockMaskShape {
        compiled: MaskShape,
        call: MaskShape,
    },

    /// More partial tiles than a block mask can index (`u32` indices).
    #[error("the mask compiles to more than {max} partial tiles")]
    TooManyPartialTiles { max: usize },

    #[error("tile sizes must be at least 1, got {tile_q} x {tile_k}")]
    BadTiles { tile_q: usize, tile_k: usize },

    #[error("dropout probability must be in [0, 1), got {0}")]
    BadDropout(f32),

    /// A soft-cap `c` that is not positive and finite (`c · tanh(z / c)` needs both).
    #[error("soft-cap must be positive and finite, got {0}")]
    BadSoftcap(f32),

    /// A score modifier (ALiBi slopes, sinks, relative-position bias) that cannot be used.
    #[error("score modifier: {0}")]
    BadScoreMod(String),

    /// A parameter-gradient buffer of the wrong length, or for a modifier the call lacks.
    #[error("parameter gradient {name}: {what}")]
    ParamGrad { name: &'static str, what: String },

    /// A size computed from a shape (a product of dimensions, strides or tile counts) does
    /// not fit in `usize`, or is more memory than can be allocated.
    #[error("{name}: {what} = the product of {factors:?} is too large")]
    SizeOverflow {
        name: &'static str,
        what: &'static str,
        factors: Vec<usize>,
    },

    /// A block of a larger problem ([`crate::BlockMask::new_block`]) whose query or key
    /// range does not lie within the whole problem's length.
    #[error("{what} {start}..{end} is not a range within the whole problem's length {len}")]
    BlockRange {
        what: &'static str,
        start: usize,
        end: usize,
        len: usize,
    },

    /// The backward was handed an LSE of the wrong length.
    #[error("lse has {got} entries, expected {expected} (B * H_q * L_q)")]
    LseLength { got: usize, expected: usize },

    /// The call's [`Cancel`](crate::Cancel) flag was set while it ran; its outputs are
    /// unspecified.
    #[error("the call was cancelled before it finished; its outputs are not valid")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, AttnError>;

pub(crate) fn mismatch(what: impl Into<String>) -> AttnError {
    AttnError::ShapeMismatch { what: what.into() }
}
