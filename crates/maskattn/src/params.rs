//! What an attention call takes besides its tensors and its mask.

use crate::bias::Bias;
use crate::cancel::Cancel;
use crate::error::{AttnError, Result};
use crate::score_mod::RelBias;

/// Options of one attention call. The backward must be given the same ones as the forward.
#[derive(Clone, Copy, Debug, Default)]
pub struct Params<'a> {
    /// Score scale `s`; `None` means `1/sqrt(d)`.
    pub scale: Option<f32>,
    /// Additive bias `β` on the scores.
    pub bias: Option<Bias<'a>>,
    /// Attention dropout (training): applied to `P` before it weights the values.
    pub dropout: Option<Dropout>,
    /// Soft-capping `z ↦ c · tanh(z / c)` of the scaled products, before every additive
    /// term (Gemma 2, Grok); `c > 0` and finite.
    pub softcap: Option<f32>,
    /// ALiBi slopes, one per query head (`H_q`): `−slope_h · |i' − j|` on the scores
    /// ([`crate::alibi_slopes`] gives the standard ones).
    pub alibi: Option<&'a [f32]>,
    /// Attention sinks: one logit per query head (`H_q`) that joins every row's softmax
    /// without a value (`LSE_i = log(e^{sink_h} + Σ_j e^{x_ij})`, so the weights of a row sum
    /// to less than 1, and a row that allows nothing has `LSE = sink_h`).
    pub sinks: Option<&'a [f32]>,
    /// T5's learned relative-position bias `rel[bucket(j − i'), h]`.
    pub rel: Option<RelBias<'a>>,
    /// A flag that stops the call between tiles when set ([`Cancel`]).
    pub cancel: Option<&'a Cancel>,
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

    /// Soft-capping at `c` (checked by the call: `c > 0` and finite).
    pub fn with_softcap(mut self, c: f32) -> Self {
        self.softcap = Some(c);
        self
    }

    /// ALiBi with these slopes, one per query head.
    pub fn with_alibi(mut self, slopes: &'a [f32]) -> Self {
        self.alibi = Some(slopes);
        self
    }

    /// Attention sinks, one logit per query head.
    pub fn with_sinks(mut self, sinks: &'a [f32]) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// T5 relative-position bias.
    pub fn with_rel(mut self, rel: RelBias<'a>) -> Self {
        self.rel = Some(rel);
        self
    }

    /// Stops the call between tiles once `flag` is set.
    pub fn with_cancel(mut self, flag: &'a Cancel) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Whether the call's cancellation flag is set.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.is_some_and(Cancel::is_cancelled)
    }

    /// [`AttnError::Cancelled`] once the flag is set: the call's last word after its work.
    pub(crate) fn check_cancel(&self) -> Result<()> {
        if self.cancelled() {
            return Err(AttnError::Cancelled);
        }
        Ok(())
    }

    /// Checks the score modifiers against the call's query heads: the soft-cap is positive
    /// and finite, slopes and sinks are finite with one per head, the relative-position
    /// table has one column per head.
    pub(crate) fn check_mods(&self, q_heads: usize) -> Result<()> {
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(AttnError::BadSoftcap(c));
            }
        }
        for (name, v) in [("alibi slopes", self.alibi), ("sinks", self.sinks)] {
            let Some(v) = v else { continue };
            if v.len() != q_heads {
                return Err(AttnError::ShapeMismatch {
                    what: format!(
                        "{name} hold {} values, one per query head needs {q_heads}",
                        v.len()
                    ),
                });
            }
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                return Err(AttnError::BadScoreMod(format!(
                    "{name} must be finite, got {x}"
                )));
            }
        }
        if let Some(rb) = &self.rel {
            if rb.table().len() != rb.num_buckets() * q_heads {
                return Err(AttnError::ShapeMismatch {
                    what: format!(
                        "relative-position table holds {} values, [num_buckets = {}, H_q = {q_heads}] needs {}",
                        rb.table().len(),
                        rb.num_buckets(),
                        rb.num_buckets() * q_heads
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Attention dropout with probability `p`, reproducible from `seed`.
///
/// Pair `(b, h, i, j)` is kept or dropped by a hash of `(seed, b, h, i, j)` — no random state,
/// so the forward and the backward (and any thread) agree on every pair, and the same seed
/// gives the same result. A kept weight is scaled by `1/(1 − p)`:
/// `O_i = Σ_j P_ij z_ij v_j` with `z_ij = keep_ij / (1 − p)`. `LSE` is that of the undropped
/// `P`. Backward: `dV_j = Σ_i P_ij z_ij dO_i`, `dS_ij = P_ij (z_ij dO_i·v_j − D_i)`; every
/// score modifier's gradient is taken from this `dS`.
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
