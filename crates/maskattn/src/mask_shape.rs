//! The shape a mask is evaluated over. A leaf of the crate's module graph: the errors
//! (which name shapes) and the masks (which return errors) both import it, and it imports
//! neither, so `error.rs` and `mask.rs` do not import each other.

/// The shape a mask is evaluated over: batch, query heads, query length, key length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskShape {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
}

/// `B 2, H 8, L_q 128, L_k 256`, for messages.
impl std::fmt::Display for MaskShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "B {}, H {}, L_q {}, L_k {}",
            self.batch, self.heads, self.lq, self.lk
        )
    }
}

impl MaskShape {
    pub fn new(batch: usize, heads: usize, lq: usize, lk: usize) -> Self {
        MaskShape {
            batch,
            heads,
            lq,
            lk,
        }
    }

    /// `L_k − L_q`: exact for the shapes [`crate::Mask::validate`] accepts (lengths up to
    /// `i64::MAX`). How far query `i` is shifted to line up with key positions when a mask
    /// is aligned bottom-right (the last query sees the last key, as in KV-cache decoding).
    pub fn bottom_right_offset(&self) -> i64 {
        self.lk as i64 - self.lq as i64
    }
}
