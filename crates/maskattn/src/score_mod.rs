//! Score modifiers that depend on positions and heads only: T5 relative-position buckets,
//! ALiBi slopes, and the per-call table of their sum along each diagonal
//! (docs/design.md section 1, "Score modifiers").
//!
//! `−slope_h · |i' − j| + rel[bucket(j − i'), h]` depends on `(h, j − i')` alone, so a call
//! builds it once per query head for every offset `j − i'` that occurs (`L_q + L_k − 1` of
//! them, plus one tile of padding): row `r` of a tile then reads its `tk_pad` values as one
//! contiguous slice of that table. O(H_q · L) memory, never `L_q × L_k`.

use crate::error::{AttnError, Result};

/// T5's learned relative-position bias: `table [num_buckets, H_q]` row-major (the layout of
/// Hugging Face's `relative_attention_bias.weight`), indexed by [`t5_bucket`]`(j − i')`.
#[derive(Clone, Copy, Debug)]
pub struct RelBias<'a> {
    table: &'a [f32],
    num_buckets: usize,
    max_distance: usize,
    bidirectional: bool,
}

impl<'a> RelBias<'a> {
    /// `table` is `[num_buckets, H_q]` row-major (T5's relative_attention_bias.weight layout).
    /// `num_buckets ≥ 2` (≥ 4 when bidirectional), `table.len()` a non-zero multiple of it
    /// (the call checks it is `num_buckets · H_q`), and `max_distance` larger than the exact
    /// range (`num_buckets / 2`, halved again when bidirectional).
    pub fn new(
        table: &'a [f32],
        num_buckets: usize,
        max_distance: usize,
        bidirectional: bool,
    ) -> Result<Self> {
        let half = if bidirectional {
            num_buckets / 2
        } else {
            num_buckets
        };
        // Hugging Face divides by `num_buckets / 2` (per direction): at least one exact
        // bucket is needed for the log branch to be defined.
        if half < 2 {
            return Err(AttnError::BadScoreMod(format!(
                "relative-position bias: num_buckets = {num_buckets} must be at least {}",
                if bidirectional { 4 } else { 2 }
            )));
        }
        if table.is_empty() || !table.len().is_multiple_of(num_buckets) {
            return Err(AttnError::BadScoreMod(format!(
                "relative-position bias: the table holds {} values, not a non-zero multiple \
                 of num_buckets = {num_buckets}",
                table.len()
            )));
        }
        let max_exact = half / 2;
        if max_distance <= max_exact {
            return Err(AttnError::BadScoreMod(format!(
                "relative-position bias: max_distance = {max_distance} must exceed the exact \
                 range {max_exact}"
            )));
        }
        Ok(RelBias {
            table,
            num_buckets,
            max_distance,
            bidirectional,
        })
    }

    pub fn num_buckets(&self) -> usize {
        self.num_buckets
    }

    pub fn max_distance(&self) -> usize {
        self.max_distance
    }

    pub fn bidirectional(&self) -> bool {
        self.bidirectional
    }

    /// `[num_buckets, H_q]` row-major.
    pub fn table(&self) -> &'a [f32] {
        self.table
    }

    /// The bucket of offset `j − i'`.
    pub fn bucket(&self, rel: i64) -> usize {
        t5_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
    }

    /// `rel[bucket, h]`.
    pub(crate) fn get(&self, bucket: usize, h: usize) -> f32 {
        self.table[bucket * self.heads() + h]
    }

    pub(crate) fn heads(&self) -> usize {
        self.table.len() / self.num_buckets
    }
}

/// Hugging Face T5's `_relative_position_bucket`, exactly.
///
/// `relative_position = j − i'` (key minus query, T5's `memory_position − context_position`).
/// Half the buckets (per direction when bidirectional) are exact offsets; the rest grow
/// logarithmically up to `max_distance`, and everything farther shares the last bucket.
/// The log branch is computed in `f32` and truncated, as the original does with
/// `torch.float32` ops and `.to(torch.long)`, so bucket boundaries fall where Hugging Face's
/// do (pinned by a table generated from it, `tests/hf_tables.rs`).
pub fn t5_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut n = num_buckets as i64;
    let mut bucket = 0i64;
    let rel = if bidirectional {
        n /= 2;
        if relative_position > 0 {
            bucket += n;
        }
        relative_position.unsigned_abs()
    } else {
        // −min(rel, 0): positions after the query all fall in bucket 0.
        relative_position.min(0).unsigned_abs()
    };
    let max_exact = (n / 2) as u64;
    if rel < max_exact {
        return (bucket + rel as i64) as usize;
    }
    // torch: log(rel.float() / max_exact) / math.log(max_distance / max_exact)
    //        * (num_buckets - max_exact), all f32 (the Python floats enter as f32).
    let ratio = rel as f32 / max_exact as f32;
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = ratio.ln() / denom * (n - max_exact as i64) as f32;
    // `.to(torch.long)` truncates towards zero; +∞ (max_distance == max_exact) saturates.
    let large = (max_exact as i64).saturating_add(large as i64).min(n - 1);
    (bucket + large) as usize
}

/// The standard ALiBi slopes for `heads` heads (Press et al.; BLOOM's `build_alibi_tensor`
/// slopes, including the non-power-of-two rule): for the largest power of two `n ≤ heads`,
/// `2^(−8k/n)` for `k = 1..=n`, then `2^(−4k/n)` for odd `k = 1, 3, …` for the remaining heads.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    if heads == 0 {
        return Vec::new();
    }
    let n = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    // BLOOM: base = 2^(−2^−(log2 n − 3)) = 2^(−8/n) rounded to f32, slopes = base^k by
    // torch.pow, which rounds the exact power of the f32 base once.
    let pow = |base: f32, k: usize| (base as f64).powi(k as i32) as f32;
    let base = (2f64.powf(-8.0 / n as f64)) as f32;
    let mut slopes: Vec<f32> = (1..=n).map(|k| pow(base, k)).collect();
    if n != heads {
        let extra = (2f64.powf(-4.0 / n as f64)) as f32;
        let rest = (heads - n).min(n);
        slopes.extend((0..rest).map(|k| pow(extra, 2 * k + 1)));
    }
    slopes
}

/// The positional part of the scores of one call, per query head and offset: entry
/// `h · stride + t` is `−slope_h · |Δ| + rel[bucket(Δ), h]` for `Δ = t − (L_k − 1) + shift`
/// (that is `j − i'` with `t = j − i + L_q − 1`, plus the block mask's `position_shift`: on a
/// block of a larger problem, `Δ` is the whole problem's `j − i'`); the last `pad` entries
/// of each head are 0 (the padding columns of the last key tile read them).
pub(crate) struct PosTable {
    pub data: Vec<f32>,
    pub stride: usize,
    /// With T5 buckets: the bucket of each offset (`L_q + L_k − 1`, indexed as `data`).
    pub buckets: Vec<u32>,
}

impl PosTable {
    pub fn new(
        alibi: Option<&[f32]>,
        rel: Option<&RelBias>,
        (heads, lq, lk): (usize, usize, usize),
        pad: usize,
        shift: i64,
    ) -> Option<Self> {
        if alibi.is_none() && rel.is_none() {
            return None;
        }
        let span = lq + lk - 1;
        let stride = span + pad;
        let mut data = vec![0f32; heads * stride];
        // The bucket of every offset, once for all heads.
        let buckets: Vec<u32> = match rel {
            Some(rb) => (0..span)
                .map(|t| rb.bucket(t as i64 - (lk as i64 - 1) + shift) as u32)
                .collect(),
            None => Vec::new(),
        };
        for (h, row) in data.chunks_exact_mut(stride).enumerate() {
            for (t, x) in row[..span].iter_mut().enumerate() {
                let delta = t as i64 - (lk as i64 - 1) + shift;
                let mut v = 0f32;
                if let Some(sl) = alibi {
                    v -= sl[h] * delta.unsigned_abs() as f32;
                }
                if let Some(rb) = rel {
                    v += rb.get(buckets[t] as usize, h);
                }
                *x = v;
            }
        }
        Some(PosTable {
            data,
            stride,
            buckets,
        })
    }

    /// The table index of query `i`, key `j` (`j − i + L_q − 1`).
    #[inline(always)]
    pub fn index(lq: usize, i: usize, j: usize) -> usize {
        j + lq - 1 - i
    }
}
