//! What an attention call takes besides its tensors and its mask.

use crate::bias::Bias;
use crate::error::{AttnError, Result};

/// Options of one attention call. The backward must be given the same ones as the forward.
#[derive(Clone, Copy, Debug, Default)]
pub struct Params<'a> {
    /// Score scale `s`; `None` means `1/sqrt(d)`.
    pub scale: Option<f32>,
    /// Additive bias `β` on the scores.
    pub bias: Option<Bias<'a>>,
    /// Attention dropout (training): applied to `P` before it weights the values.
    pub dropout: Option<Dropout>,
}

impl<'a> Params<'a> {
    pub fn scale(scale: f32) -> Self {
        Params {
            scale: Some(scale),
            ..Default::default()
        }
    }

    pub fn with_bias(mut self, bias: Bias<'a>) -> Self {
        self.bias = Some(bias);
        self
    }

    pub fn with_dropout(mut self, dropout: Dropout) -> Self {
        self.dropout = Some(dropout);
        self
    }
}

/// Attention dropout with probability `p`, reproducible from `seed`.
///
/// Pair `(b, h, i, j)` is kept or dropped by a hash of `(seed, b, h, i, j)` — no random state,
/// so the forward and the backward (and any thread) agree on every pair, and the same seed
/// gives the same result. A kept weight is scaled by `1/(1 − p)`:
/// `O_i = Σ_j P_ij z_ij v_j` with `z_ij = keep_ij / (1 − p)`. `LSE` is that of the undropped
/// `P`. Backward: `dV_j = Σ_i P_ij z_ij dO_i`, `dS_ij = P_ij (z_ij dO_i·v_j − D_i)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    p: f32,
    seed: u64,
}

impl Dropout {
    /// `p` in `[0, 1)`.
    pub fn new(p: f32, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(AttnError::BadDropout(p));
        }
        Ok(Dropout { p, seed })
    }

    pub fn p(&self) -> f32 {
        self.p
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The weight of a kept pair, `1/(1 − p)`.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Hashes below this are dropped.
    pub(crate) fn threshold(&self) -> u32 {
        (self.p as f64 * 4_294_967_296.0) as u32
    }

    /// The key of query row `(b, h, i)` in a call with `heads` query heads and `lq` queries.
    pub(crate) fn row_key(&self, b: usize, h: usize, i: usize, heads: usize, lq: usize) -> u32 {
        let row = ((b * heads + h) * lq + i) as u64;
        let mut z = self.seed ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as u32
    }

    /// Whether pair `(b, h, i, j)` is kept.
    pub fn keep(&self, b: usize, h: usize, i: usize, j: usize, heads: usize, lq: usize) -> bool {
        keep_hash(self.row_key(b, h, i, heads, lq), j) >= self.threshold()
    }
}

/// The hash of column `j` in the row with key `row_key` (murmur3's finaliser).
#[inline(always)]
pub(crate) fn keep_hash(row_key: u32, j: usize) -> u32 {
    let mut h = row_key ^ (j as u32).wrapping_mul(0x9E37_79B9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Dropout as a step sees it: per tile row its key, and the first column's index.
#[derive(Clone, Copy)]
pub(crate) struct DropTile<'a> {
    pub rows: &'a [u32],
    pub j0: usize,
    pub threshold: u32,
    pub scale: f32,
}

impl<'a> DropTile<'a> {
    /// `dropout` on the key tile that starts at column `j0`, for rows with keys `rows`.
    pub fn new(dropout: &Dropout, rows: &'a [u32], j0: usize) -> Self {
        DropTile {
            rows,
            j0,
            threshold: dropout.threshold(),
            scale: dropout.keep_scale(),
        }
    }

    /// `z[c] = 1/(1 − p)` where pair (r, j0 + c) is kept, else 0, for `c < z.len()`.
    #[inline(always)]
    pub fn fill(&self, r: usize, z: &mut [f32]) {
        let key = self.rows[r];
        for (c, zv) in z.iter_mut().enumerate() {
            *zv = if keep_hash(key, self.j0 + c) >= self.threshold {
                self.scale
            } else {
                0.0
            };
        }
    }
}
