//! The one home of "scores → masked, scaled → running max and sum → P", for the forward,
//! the decode path and the backward (docs/design.md section 1):
//!
//! - [`mask_row`]: `x_ij = cap(s·(q_i·k_j)) + β_ij − slope·|i' − j| + rel[bucket(j − i')]`
//!   where allowed, `−∞` where hidden (selected, never multiplied, so a NaN key's product
//!   cannot leak in);
//! - [`Online::update`]: the forward's running max `m_i` and sum `l_i` over key tiles, the
//!   accumulator rescaled by `e^(m_old − m_new)`, and `P̃_ij = e^(x_ij − m_i)`;
//! - [`Online::merge`]: states of the same rows over other keys (decode's chunks) added
//!   with the LSE rule;
//! - [`Online::finish`]: `O_i = acc_i / l_i`, `LSE_i = m_i + ln l_i` (a sink is where the
//!   state starts: `m = sink`, `l = 1`, see [`Online::reset`]);
//! - [`probs`]: the backward's `P_ij = e^(x_ij − LSE_i)`;
//! - [`Unseen`]: the guard that keeps a key no row of a tile sees out of the products that
//!   follow (`0 · NaN`).
//!
//! Two rules live here and nowhere else. A row that sees nothing (`l = 0`) has `O = 0`,
//! `LSE = −∞`, `P = 0`, with no `−∞ − −∞`. A NaN or +∞ among a row's allowed scores makes
//! its sum NaN (`e^NaN` is NaN on every instruction set, `+∞ − +∞` is NaN), so `O` and
//! `LSE` are NaN and the backward's `P` is NaN on that row's allowed pairs — as IEEE
//! arithmetic on the allowed pairs says.
//!
//! A score tile is `rows × tk_pad`; columns at or past `cols` are padding and count as hidden.

use crate::pack;
use crate::params::{keep_hash, DropTile};
use crate::simd::Simd;

/// Sizes every step needs.
#[derive(Clone, Copy)]
pub(crate) struct Geom {
    /// Features, and features padded to whole vectors.
    pub d: usize,
    pub d_pad: usize,
    /// Keys per tile, and padded to whole vectors.
    pub tk: usize,
    pub tk_pad: usize,
    /// `u64` words per bitmap row of a partial tile.
    pub words: usize,
}

/// One (query tile, key tile) pair as the softmax sees it: its size, its block-mask tile
/// and the call's score parameters.
#[derive(Clone, Copy)]
pub(crate) struct TileJob<'a> {
    pub g: Geom,
    pub rows: usize,
    pub cols: usize,
    /// The partial tile's bitmap; `None` for a full tile.
    pub bits: Option<&'a [u64]>,
    pub scale: f32,
    /// `rows × tk_pad` bias values.
    pub bias: Option<&'a [f32]>,
    pub drop: Option<DropTile<'a>>,
    /// Soft-cap `c`: `z ↦ c · tanh(z / c)` before the additive terms.
    pub softcap: Option<f32>,
    /// ALiBi and relative positions, read from the call's per-head diagonal table.
    pub pos: Option<PosRows<'a>>,
}

/// Where each tile row finds its `tk_pad` positional terms (ALiBi + T5 buckets) in the
/// call's `PosTable`: row `r` is query `i0 + r % per_head` of head `h0 + r / per_head`
/// (the tiled paths have one head per tile, `per_head = usize::MAX`; the decode path stacks
/// the queries of a group's heads).
#[derive(Clone, Copy)]
pub(crate) struct PosRows<'a> {
    pub table: &'a [f32],
    pub stride: usize,
    pub h0: usize,
    pub i0: usize,
    pub per_head: usize,
    pub j0: usize,
    pub lq: usize,
}

impl<'a> PosRows<'a> {
    /// The `len` positional terms of row `r`, columns `j0 ..`: the table entries
    /// `j − i + L_q − 1` of its head, contiguous because the terms depend on `j − i` only.
    #[inline(always)]
    pub fn row(&self, r: usize, len: usize) -> &'a [f32] {
        let (h, i) = (self.h0 + r / self.per_head, self.i0 + r % self.per_head);
        let start = h * self.stride + crate::score_mod::PosTable::index(self.lq, i, self.j0);
        &self.table[start..start + len]
    }

    /// For the column form (one head per tile): the first `n` terms of the tile's run
    /// reversed, `run[u]` the term of row `r`, key `c` at `u = r − c + cols − 1` (the head's
    /// table row at the index of row 0, key `cols − 1`, minus `u`); 0 past the table.
    #[inline(always)]
    pub fn reversed_run(&self, cols: usize, n: usize) -> [f32; POS_RUN] {
        debug_assert_eq!(self.per_head, usize::MAX);
        let row = &self.table[self.h0 * self.stride..(self.h0 + 1) * self.stride];
        let at = crate::score_mod::PosTable::index(self.lq, self.i0, self.j0 + cols - 1);
        let mut run = [0f32; POS_RUN];
        for (u, x) in run[..n].iter_mut().enumerate() {
            *x = at
                .checked_sub(u)
                .and_then(|t| row.get(t))
                .map_or(0.0, |&v| v);
        }
        run
    }
}

impl TileJob<'_> {
    /// Whether pair (r, c) of the tile is allowed.
    #[inline(always)]
    pub fn visible(&self, r: usize, c: usize) -> bool {
        visible(self.bits, self.g.words, r, c)
    }

    /// Whether [`Online::update_cols`] may take this tile: nothing hidden (a full tile), no
    /// bias (its tile is laid out along rows), and positional terms only where their
    /// reversed run fits [`POS_RUN`]. Soft-capping and dropout are element-wise and go
    /// either way.
    #[inline(always)]
    pub fn column_form(&self) -> bool {
        self.bits.is_none()
            && self.bias.is_none()
            && (self.pos.is_none() || pack::pad16(self.rows) + self.cols <= POS_RUN)
    }

    /// Visibility bits of lanes `c0 .. c0 + W` of tile row `r`: from the partial tile's
    /// bitmap (all visible in a full tile), and never past the tile's real columns.
    #[inline(always)]
    pub fn lane_bits<S: Simd>(&self, r: usize, c0: usize) -> u32 {
        let all = (1u32 << S::W) - 1;
        let mut m = match self.bits {
            Some(b) => (b[r * self.g.words + c0 / 64] >> (c0 % 64)) as u32 & all,
            None => all,
        };
        if c0 + S::W > self.cols {
            m &= (1u32 << self.cols.saturating_sub(c0)) - 1;
        }
        m
    }
}

/// The longest run of positional terms the column form reads from the stack: a tile's
/// query rows (padded to whole vectors) plus its keys.
pub(crate) const POS_RUN: usize = 512;

/// Whether pair (r, c) is visible in a tile with optional bitmap.
#[inline(always)]
pub(crate) fn visible(bits: Option<&[u64]>, words: usize, r: usize, c: usize) -> bool {
    bits.is_none_or(|b| b[r * words + c / 64] >> (c % 64) & 1 == 1)
}

/// The guard against `0 · NaN` (the NaN rule above, for the products that follow the
/// softmax), written once for every product that reads keys or values
/// over a partial tile (the forward's and decode's `P̃·V`, the backward's `dS·K`, on f32 and
/// on bf16 pairs). Non-finite values in keys no row of the tile sees must not meet a zero
/// weight in the product (`0 · NaN = NaN`): those keys are zeroed in a copy. If a
/// non-finite value remains in a key some rows see and others don't, the product must
/// skip the hidden pairs (`gemm_visible`); where every value is finite, nothing is copied.
pub(crate) struct Unseen {
    seen: Vec<u64>,
    fix: Vec<f32>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fix_pairs: Vec<u32>,
}

impl Unseen {
    /// For tiles of `tile_len` f32 values (pair tiles: half as many `u32`).
    pub fn new(words: usize, tile_len: usize) -> Self {
        Unseen {
            seen: vec![0; words],
            fix: vec![0.0; tile_len],
            fix_pairs: Vec::new(),
        }
    }

    /// Bit `c` of `seen`: column `c` of the job's partial tile is visible to at least one
    /// of its rows.
    fn seen_columns(&mut self, bits: &[u64], job: &TileJob) {
        let words = job.g.words;
        self.seen.fill(0);
        for r in 0..job.rows {
            for w in 0..words {
                self.seen[w] |= bits[r * words + w];
            }
        }
    }

    /// `tile` (key rows `ld` apart, `job.cols` keys) as the job's product may read it, and
    /// whether that product must skip the hidden pairs. `finite`: every value of `tile` is.
    pub fn rows<'a>(
        &'a mut self,
        job: &TileJob,
        tile: &'a [f32],
        ld: usize,
        finite: bool,
    ) -> (&'a [f32], bool) {
        let Some(bits) = job.bits.filter(|_| !finite) else {
            return (tile, false);
        };
        self.seen_columns(bits, job);
        let fix = &mut self.fix[..tile.len()];
        fix.copy_from_slice(tile);
        let seen = &self.seen;
        for c in (0..job.cols).filter(|&c| seen[c / 64] >> (c % 64) & 1 == 0) {
            fix[c * ld..(c + 1) * ld].fill(0.0);
        }
        (
            &self.fix[..tile.len()],
            !pack::all_finite(&self.fix[..tile.len()]),
        )
    }

    /// [`Unseen::rows`] for a tile interleaved over keys ([`pack::pairs_over_rows`] layout, rows `ld`
    /// pairs long): `Ok` the pairs to multiply, or `Err` the tile widened to f32 rows
    /// (`tk_pad × ld`) for a product that skips the hidden pairs.
    #[cfg(target_arch = "x86_64")]
    pub fn pairs<'a>(
        &'a mut self,
        job: &TileJob,
        pairs: &'a [u32],
        ld: usize,
        finite: bool,
    ) -> Result<&'a [u32], &'a [f32]> {
        let Some(bits) = job.bits.filter(|_| !finite) else {
            return Ok(pairs);
        };
        self.seen_columns(bits, job);
        self.fix_pairs.resize(pairs.len(), 0);
        self.fix_pairs.copy_from_slice(pairs);
        let seen = &self.seen;
        for c in (0..job.cols).filter(|&c| seen[c / 64] >> (c % 64) & 1 == 0) {
            let keep = if c % 2 == 0 { 0xffff_0000 } else { 0x0000_ffff };
            self.fix_pairs[c / 2 * ld..(c / 2 + 1) * ld]
                .iter_mut()
                .for_each(|x| *x &= keep);
        }
        if pairs_finite(&self.fix_pairs) {
            return Ok(&self.fix_pairs);
        }
        let rows_pad = job.g.tk_pad;
        let fix = &mut self.fix[..rows_pad * ld];
        for c in 0..rows_pad {
            let (p, half) = (c / 2, 16 * (c % 2));
            for x in 0..ld {
                let bits = (self.fix_pairs[p * ld + x] >> half) as u16;
                fix[c * ld + x] = half::bf16::from_bits(bits).to_f32();
            }
        }
        Err(&self.fix[..rows_pad * ld])
    }
}

/// Turns row `r` of raw products `q·k` into scores
/// `x = cap(scale·(q·k)) + bias + pos`, sets hidden and padding columns to `−∞`
/// (overwriting whatever a NaN key produced) and returns the row's maximum (which may skip
/// a NaN; [`Online::update`] catches those). Under soft-capping, `tanh` (when given)
/// receives `tanh(z / c)` of the row, 0 where hidden, for the backward's `1 − tanh²`.
///
/// Every path (forward, decode, backward) forms its scores here, from products summed in
/// the same order, so the backward's `e^(x − LSE)` meets the very `x` the forward's LSE
/// came from: where one key dominates a row, `P` is then exactly 1 and `dV`, which sums `P`
/// over many rows, carries no systematic error. (Folding the scale into `Q` in one pass
/// and not the other rounds `x` differently, and `dV` drifted past the accuracy bound.)
///
/// # Safety
/// `x` (and the job's bias rows, and `tanh`) hold `tk_pad` values, a multiple of `S::W`.
#[inline(always)]
pub(crate) unsafe fn mask_row<S: Simd>(
    job: &TileJob,
    r: usize,
    x: &mut [f32],
    tanh: Option<&mut [f32]>,
) -> f32 {
    let tk_pad = job.g.tk_pad;
    let bias = job.bias.map(|b| &b[r * tk_pad..(r + 1) * tk_pad]);
    let pos = job.pos.map(|p| p.row(r, tk_pad));
    let tanh = tanh.map(|t| t.as_mut_ptr());
    // SAFETY: every access is at `c0 < x.len()` for `W` lanes, inside `x`, the bias and
    // positional rows and `tanh`, because all hold `tk_pad` values and `tk_pad % W == 0`
    // (this function's contract; `PosRows::row` slices `tk_pad` values).
    unsafe {
        let ninf = S::splat(f32::NEG_INFINITY);
        let sv = S::splat(job.scale);
        let cap = job.softcap.map(|c| (S::splat(c), S::splat(1.0 / c)));
        let mut mx = ninf;
        for c0 in (0..x.len()).step_by(S::W) {
            let p = x.as_mut_ptr().add(c0);
            let mut v = S::mul(S::load(p), sv);
            let vis = job.lane_bits::<S>(r, c0);
            if let Some((c, inv_c)) = cap {
                let t = S::tanh(S::mul(v, inv_c));
                if let Some(tp) = tanh {
                    S::store(tp.add(c0), S::select(vis, t, S::splat(0.0)));
                }
                v = S::mul(c, t);
            }
            if let Some(bias) = bias {
                v = S::add(v, S::load(bias.as_ptr().add(c0)));
            }
            if let Some(pos) = pos {
                v = S::add(v, S::load(pos.as_ptr().add(c0)));
            }
            if vis != (1u32 << S::W) - 1 {
                v = S::select(vis, v, ninf);
            }
            S::store(p, v);
            mx = S::max(mx, v);
        }
        S::reduce_max(mx)
    }
}

/// `s[c] = e^(s[c] − sub)` in place (0 where `s[c] = −∞`); returns the row sum.
///
/// # Safety
/// `s.len() % S::W == 0`.
#[inline(always)]
unsafe fn exp_row<S: Simd>(s: &mut [f32], sub: f32) -> f32 {
    // SAFETY: `c0 + W ≤ s.len()` because `s.len() % W == 0` (the contract).
    unsafe {
        let subv = S::splat(sub);
        let mut sum = S::splat(0.0);
        for c0 in (0..s.len()).step_by(S::W) {
            let p = s.as_mut_ptr().add(c0);
            let e = S::exp(S::sub(S::load(p), subv));
            S::store(p, e);
            sum = S::add(sum, e);
        }
        S::reduce_add(sum)
    }
}

/// `y *= a` over whole vectors.
///
/// # Safety
/// `y.len() % S::W == 0`.
#[inline(always)]
unsafe fn scale<S: Simd>(a: f32, y: &mut [f32]) {
    // SAFETY: `c0 + W ≤ y.len()` because `y.len() % W == 0` (the contract).
    unsafe {
        let av = S::splat(a);
        for c0 in (0..y.len()).step_by(S::W) {
            let yp = y.as_mut_ptr().add(c0);
            S::store(yp, S::mul(av, S::load(yp)));
        }
    }
}

/// The forward's running state of a block of query rows: max `m`, sum `l` (of
/// `e^(x − m)`, undropped), and the accumulator `acc = Σ_j P̃_ij z_ij v_j` (`rows × d_pad`).
pub(crate) struct Online<'a> {
    pub m: &'a mut [f32],
    pub l: &'a mut [f32],
    pub acc: &'a mut [f32],
}

impl Online<'_> {
    /// Nothing seen yet: `m = −∞`, `l = 0`, `acc = 0` for the first `rows` rows; with an
    /// attention sink, its term is already in: `m = sink`, `l = e^(sink − sink) = 1` (so a
    /// row that sees nothing ends with `O = 0`, `LSE = sink`). `m` and `l` are reset whole:
    /// the column form also runs the padding lanes past `rows`, which then hold the same
    /// start, not whatever an earlier tile left there.
    pub fn reset(&mut self, rows: usize, d_pad: usize, sink: Option<f32>) {
        let (m, l) = start(sink);
        self.m.fill(m);
        self.l.fill(l);
        self.acc[..rows * d_pad].fill(0.0);
    }

    /// One key tile of products `s` (`rows × tk_pad`, `q·k` before scale and bias): `s`
    /// becomes `P̃` (times dropout's `z`; zero where hidden and past `cols`), `m` and `l`
    /// move to the new maximum and `acc` is rescaled to it. The caller adds `P̃·V` to `acc`.
    ///
    /// # Safety
    /// `s` is `rows × tk_pad`, `acc` `rows × d_pad`, as in the job's geometry.
    #[inline(always)]
    pub unsafe fn update<S: Simd>(&mut self, job: &TileJob, s: &mut [f32]) {
        let (tk_pad, d_pad) = (job.g.tk_pad, job.g.d_pad);
        // SAFETY: each row slice is `tk_pad` long (a multiple of `W`), `acc` rows `d_pad`:
        // what `mask_row`, `exp_row` and `scale` require.
        unsafe {
            for r in 0..job.rows {
                let x = &mut s[r * tk_pad..(r + 1) * tk_pad];
                let m_tile = mask_row::<S>(job, r, x, None);
                let m_new = self.m[r].max(m_tile);
                if m_new == f32::NEG_INFINITY {
                    // Nothing visible yet, or only NaN scores (the maxima skip NaN): a NaN
                    // marks the row's sum, which stays NaN, so the row ends NaN, not empty.
                    if x.iter().any(|v| v.is_nan()) {
                        self.l[r] = f32::NAN;
                    }
                    x.fill(0.0); // P̃ = 0, and no −∞ − −∞
                    continue;
                }
                // P̃_ij = e^(x_ij − m_new); rescale what was summed under the old max.
                let alpha = (self.m[r] - m_new).exp();
                let sum = exp_row::<S>(x, m_new);
                self.l[r] = self.l[r] * alpha + sum;
                if alpha != 1.0 {
                    scale::<S>(alpha, &mut self.acc[r * d_pad..(r + 1) * d_pad]);
                }
                self.m[r] = m_new;
                // Dropout weights the values, not the normaliser: l keeps the undropped sum.
                if let Some(dt) = job.drop {
                    let key = dt.rows[r];
                    for (c, xv) in x[..job.cols].iter_mut().enumerate() {
                        if keep_hash(key, dt.j0 + c) >= dt.threshold {
                            *xv *= dt.scale;
                        } else {
                            *xv = 0.0;
                        }
                    }
                }
            }
        }
    }

    /// [`update`](Self::update) for a tile whose products were formed transposed, `st`
    /// (`cols × ld`: row `c` holds key `c`'s products with the tile's query rows, one per
    /// lane, `ld ≥ rows` a multiple of `W`), and which hides nothing: a full tile with no
    /// bias or positional terms ([`TileJob::column_form`]). `st` becomes `P̃ᵀ` (times
    /// dropout's `z`).
    ///
    /// Why a second form: with the lanes over query rows, each row's maximum and sum are
    /// vertical (lane-wise) over the tile's keys, and `m`, `l` and `α` are vectors — the row
    /// form spends a horizontal reduction, a scalar `e^x` and a branch per row and tile,
    /// about a fifth of the full forward's time on Zen 5. The scores are the row form's
    /// to the bit (the same `x = cap(s·(q·k))`, the products summed in the same order), so
    /// the backward's `e^(x − LSE)` meets the same `x`; only `l` is summed in another order.
    /// The rules of the row form hold: a NaN or +∞ score makes the row's sum NaN; a row
    /// whose scores are all −∞ gets `P̃ = 0` (the maximum subtracted is then finite).
    ///
    /// # Safety
    /// `st` holds `cols × ld` values, `m` and `l` at least `ld`, `acc` `rows × d_pad`.
    #[inline(always)]
    pub unsafe fn update_cols<S: Simd>(&mut self, job: &TileJob, st: &mut [f32], ld: usize) {
        debug_assert!(job.column_form() && ld.is_multiple_of(S::W) && ld >= job.rows);
        debug_assert!(st.len() >= job.cols * ld && self.m.len() >= ld && self.l.len() >= ld);
        let (cols, d_pad) = (job.cols, job.g.d_pad);
        // Up to this many vectors of rows at once: independent max and sum chains.
        const NB: usize = 4;
        // SAFETY: `st` rows `c < cols` hold `ld` lanes, `m`, `l` at least `ld` (the
        // contract); every access below is at lane offset `v0·W + b·W < ld`.
        unsafe {
            let ninf = S::splat(f32::NEG_INFINITY);
            let (zero, sv) = (S::splat(0.0), S::splat(job.scale));
            let least = S::splat(f32::MIN);
            let cap = job.softcap.map(|c| (S::splat(c), S::splat(1.0 / c)));
            let sp = st.as_mut_ptr();
            let mut alpha = [0f32; 64];
            // ALiBi and T5 terms depend on `j − i` only: for key `c` the lanes (rows `r`
            // ascending) read the table backwards. Reversed once per tile, `run[u]` is the
            // term of `(r, c)` at `u = r − c + cols − 1`, contiguous in `r` for each `c`;
            // zero past the table (padding lanes).
            // (Filled only where there are such terms: no 2 KiB cleared per plain tile.)
            let run: [f32; POS_RUN];
            let pos = match job.pos {
                Some(pr) => {
                    run = pr.reversed_run(cols, ld + cols - 1);
                    Some(run.as_ptr())
                }
                None => None,
            };
            for v0 in (0..ld / S::W).step_by(NB) {
                let nb = NB.min(ld / S::W - v0);
                // x = cap(s · (q·k)) and the running maxima, NB vectors of rows side by side.
                let mut mx = [ninf; NB];
                for c in 0..cols {
                    for (b, mx) in mx.iter_mut().enumerate().take(nb) {
                        let p = sp.add(c * ld + (v0 + b) * S::W);
                        let mut v = S::mul(S::load(p), sv);
                        if let Some((c, inv_c)) = cap {
                            v = S::mul(c, S::tanh(S::mul(v, inv_c)));
                        }
                        if let Some(run) = pos {
                            v = S::add(v, S::load(run.add((v0 + b) * S::W + cols - 1 - c)));
                        }
                        S::store(p, v);
                        *mx = S::max(*mx, v);
                    }
                }
                let mut sub = [zero; NB];
                let mut sum = [zero; NB];
                let mut m_old = [zero; NB];
                for b in 0..nb {
                    let lane = (v0 + b) * S::W;
                    m_old[b] = S::load(self.m.as_ptr().add(lane));
                    // `max(m_old, mx)` returns `mx` where either is NaN: a NaN score leaves
                    // a NaN maximum (its row ends NaN) or is met again by `e^(NaN − m)`.
                    let m_new = S::max(m_old[b], mx[b]);
                    S::store(self.m.as_mut_ptr().add(lane), m_new);
                    // All −∞ so far: subtract the least finite float instead, so that
                    // `e^(−∞ − MIN) = 0`, not `e^NaN` (`max` keeps a NaN `m_new` here).
                    sub[b] = S::max(least, m_new);
                }
                // P̃ = e^(x − m), summed per row.
                for c in 0..cols {
                    for b in 0..nb {
                        let p = sp.add(c * ld + (v0 + b) * S::W);
                        let e = S::exp(S::sub(S::load(p), sub[b]));
                        S::store(p, e);
                        sum[b] = S::add(sum[b], e);
                    }
                }
                // l = l·α + Σ P̃, α = e^(m_old − m) (0 where nothing was seen before:
                // `m_old = −∞`; `l` and `acc` are 0 then).
                for b in 0..nb {
                    let lane = (v0 + b) * S::W;
                    let a = S::exp(S::sub(m_old[b], sub[b]));
                    let lp = self.l.as_mut_ptr().add(lane);
                    S::store(lp, S::fma(S::load(lp), a, sum[b]));
                    S::store(alpha.as_mut_ptr().add(b * S::W), a);
                }
                // acc rows rescaled to the new maximum, where it moved (past the first key
                // tiles, few rows' maxima do: the branch is mostly predicted, and a row
                // of `d_pad` multiplies costs more than the odd misprediction).
                let n = (nb * S::W).min(job.rows.saturating_sub(v0 * S::W));
                for (r, &a) in alpha[..n].iter().enumerate() {
                    if a != 1.0 {
                        let row = v0 * S::W + r;
                        scale::<S>(a, &mut self.acc[row * d_pad..(row + 1) * d_pad]);
                    }
                }
            }
        }
        // Dropout weights the values, not the normaliser, as in the row form.
        if let Some(dt) = job.drop {
            for (c, xs) in st.chunks_exact_mut(ld).take(cols).enumerate() {
                for (xv, &key) in xs.iter_mut().zip(&dt.rows[..job.rows]) {
                    if keep_hash(key, dt.j0 + c) >= dt.threshold {
                        *xv *= dt.scale;
                    } else {
                        *xv = 0.0;
                    }
                }
            }
        }
    }

    /// Adds to the first `rows` rows of this state the states `parts` of the same rows over
    /// other keys (decode's chunks, each over its own key tiles), with the LSE rule of
    /// docs/design.md section 1, in the order given; [`finish`](Self::finish) then gives `O`
    /// and `LSE` over all the keys. Every sum runs from the largest maximum `m` of them all:
    /// `l = Σ e^(m_k − m) l_k`, `acc = Σ e^(m_k − m) acc_k`. A state that saw nothing
    /// (`l = 0`) adds nothing, so a row no state saw keeps `l = 0` and `finish` makes it
    /// empty; a NaN sum makes the row's sum NaN.
    pub fn merge(&mut self, parts: &[OnlineBufs], rows: usize, d_pad: usize) {
        let saw = |l: f32| l != 0.0;
        for r in 0..rows {
            let m = parts.iter().fold(self.m[r], |a, s| a.max(s.m[r]));
            if !parts.iter().any(|s| saw(s.l[r])) {
                continue;
            }
            let acc = &mut self.acc[r * d_pad..(r + 1) * d_pad];
            let mut l = 0.0;
            if saw(self.l[r]) {
                let w = (self.m[r] - m).exp();
                l = self.l[r] * w;
                acc.iter_mut().for_each(|a| *a *= w);
            }
            for s in parts.iter().filter(|s| saw(s.l[r])) {
                let w = (s.m[r] - m).exp();
                l += w * s.l[r];
                for (a, x) in acc.iter_mut().zip(&s.acc[r * d_pad..(r + 1) * d_pad]) {
                    *a += w * x;
                }
            }
            (self.m[r], self.l[r]) = (m, l);
        }
    }

    /// `O_i = acc_i / l_i` into `out` (`rows × d`), `LSE_i = m_i + ln l_i` into `lse`; a row
    /// that saw nothing (`l = 0`) gets `O = 0`, `LSE = −∞`, and a NaN sum NaN.
    pub fn finish(&self, d: usize, d_pad: usize, out: &mut [f32], lse: &mut [f32]) {
        for (r, (dst, x)) in out.chunks_exact_mut(d).zip(lse.iter_mut()).enumerate() {
            if self.l[r] != 0.0 {
                let inv = 1.0 / self.l[r];
                for (o, a) in dst.iter_mut().zip(&self.acc[r * d_pad..]) {
                    *o = a * inv;
                }
                *x = self.m[r] + self.l[r].ln();
            } else {
                dst.fill(0.0);
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// A row's state before any key: nothing seen (`m = −∞`, `l = 0`), or, with an attention
/// sink, its term already in (`m = sink`, `l = e^(sink − sink) = 1`).
fn start(sink: Option<f32>) -> (f32, f32) {
    sink.map_or((f32::NEG_INFINITY, 0.0), |s| (s, 1.0))
}

/// The buffers of an [`Online`] state that outlives its loop over key tiles: a decode
/// chunk's, kept until the chunks are merged ([`Online::merge`]).
pub(crate) struct OnlineBufs {
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    /// `rows × d_pad`
    pub acc: Vec<f32>,
}

impl OnlineBufs {
    /// `rows` rows of `d_pad` features before any key, row `r` with the sink `sink(r)`.
    pub fn new(rows: usize, d_pad: usize, sink: impl Fn(usize) -> Option<f32>) -> Self {
        let (m, l) = (0..rows).map(|r| start(sink(r))).unzip();
        OnlineBufs {
            m,
            l,
            acc: vec![0.0; rows * d_pad],
        }
    }

    pub fn online(&mut self) -> Online<'_> {
        Online {
            m: &mut self.m,
            l: &mut self.l,
            acc: &mut self.acc,
        }
    }
}

/// The backward's `P = e^(x − LSE)` from the products `p` (`rows × tk_pad`, `q·k` before
/// scale and bias), in place: 0 where hidden, and on a row that sees nothing
/// (`LSE = −∞`; with a sink its finite `LSE` meets only `−∞` scores, `e^−∞ = 0`); NaN on
/// the allowed pairs of a row whose forward met a NaN or +∞ score (`LSE` NaN;
/// `e^(−∞ − NaN)` would put NaN on its hidden pairs too). Under soft-capping `tanh`
/// (`rows × tk_pad`) receives `tanh(z / c)`, 0 where hidden and on empty rows.
///
/// # Safety
/// `p` (and `tanh`, when given) is `rows × tk_pad`.
#[inline(always)]
pub(crate) unsafe fn probs<S: Simd>(
    job: &TileJob,
    lse: &[f32],
    p: &mut [f32],
    mut tanh: Option<&mut [f32]>,
) {
    let tk_pad = job.g.tk_pad;
    // SAFETY: every row slice is `tk_pad` long, a multiple of `W` (`pad16`).
    unsafe {
        for r in 0..job.rows {
            let pr = &mut p[r * tk_pad..(r + 1) * tk_pad];
            let tr = tanh
                .as_deref_mut()
                .map(|t| &mut t[r * tk_pad..(r + 1) * tk_pad]);
            if lse[r] == f32::NEG_INFINITY {
                pr.fill(0.0);
                if let Some(tr) = tr {
                    tr.fill(0.0);
                }
                continue;
            }
            mask_row::<S>(job, r, pr, tr);
            if lse[r].is_nan() {
                let (nan, zero) = (S::splat(f32::NAN), S::splat(0.0));
                for c0 in (0..tk_pad).step_by(S::W) {
                    let vis = job.lane_bits::<S>(r, c0);
                    S::store(pr.as_mut_ptr().add(c0), S::select(vis, nan, zero));
                }
            } else {
                exp_row::<S>(pr, lse[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Whether both bf16 halves of every pair are finite.
fn pairs_finite(pairs: &[u32]) -> bool {
    pairs.iter().fold(true, |ok, &x| {
        ok & (x & 0x7f80 != 0x7f80) & (x & 0x7f80_0000 != 0x7f80_0000)
    })
}
