//! The score modifiers' gradients, taken from each tile's `dS` (the gradient of `x`,
//! docs/design.md section 1), and the soft-cap's factor on the way to `z`:
//!
//! - `dbias = dS`, summed over the dimensions the bias broadcasts over;
//! - `dslope_h = −Σ dS_ij |i' − j|` and `drel[n, h] = Σ_{bucket(j − i') = n} dS_ij`: both
//!   depend on `j − i'` only, so a tile first sums `dS` along its diagonals (`rows + cols − 1`
//!   sums) and then weighs each diagonal once;
//! - `dz = dS · (1 − tanh²(z / c))` under soft-capping, in place, before `dS` meets `K`
//!   and `Q`.
//!
//! A task (one chunk of key tiles of one (b, kv head)) accumulates into its own
//! [`ModGrads`]; the caller adds the tasks' sums in a fixed order (chunk, then batch row
//! and kv head), so the results do not depend on the number of threads. Scalars are summed
//! in f64 across tiles (one add per diagonal), each tile's diagonals in f32.

use crate::simd::Simd;
use crate::softmax::TileJob;

/// Which parameter gradients a call wants, and what the tiles need to compute them.
#[derive(Clone, Copy)]
pub(super) struct ModSpec<'a> {
    /// The bias's dims `[B|1, H_q|1, L_q|1, L_k|1]`, if its gradient is wanted.
    pub bias: Option<[usize; 4]>,
    pub alibi: bool,
    /// The call's bucket of each offset (`PosTable::buckets`), if `drel` is wanted.
    pub buckets: Option<&'a [u32]>,
    pub num_buckets: usize,
    pub group: usize,
    pub lq: usize,
    pub lk: usize,
    /// The block mask's `position_shift` (0 unless a block of a larger problem).
    pub shift: i64,
}

impl ModSpec<'_> {
    /// Whether any gradient is taken from `dS` at all.
    pub fn any(&self) -> bool {
        self.bias.is_some() || self.alibi || self.buckets.is_some()
    }

    /// The bias gradient of one (b, kv head): `[gh, nq, nk]` with `gh` the group's heads
    /// (1 when the bias is shared by all heads), `nq`, `nk` the bias's `L_q`, `L_k` dims.
    pub fn bias_block(&self) -> Option<(usize, usize, usize)> {
        self.bias.map(|[_, dh, dq, dk]| {
            let gh = if dh == 1 { 1 } else { self.group };
            (gh, dq, dk)
        })
    }
}

/// One task's sums.
pub(super) struct ModGrads<'a> {
    pub spec: ModSpec<'a>,
    /// Per key tile the task owns, the bias gradient of its columns (`[gh, nq, tk]`), when
    /// the bias has an `L_k` dimension; the tile being worked on is `tile`.
    pub tile: Vec<f32>,
    pub tiles: Vec<(usize, Vec<f32>)>,
    /// `[gh, nq]`: the bias gradient summed over keys, when the bias broadcasts over them.
    pub cols: Vec<f32>,
    /// `[group]` and `[num_buckets, group]`, summed in f64.
    pub dalibi: Vec<f64>,
    pub drel: Vec<f64>,
    diag: Vec<f32>,
}

impl<'a> ModGrads<'a> {
    pub fn new(spec: ModSpec<'a>, tq: usize, tk: usize, tk_pad: usize) -> Self {
        let (tile, cols) = match spec.bias_block() {
            Some((gh, nq, 1)) => (Vec::new(), vec![0.0; gh * nq]),
            Some((gh, nq, _)) => (vec![0.0; gh * nq * tk], Vec::new()),
            None => (Vec::new(), Vec::new()),
        };
        ModGrads {
            spec,
            tile,
            tiles: Vec::new(),
            cols,
            dalibi: vec![0.0; if spec.alibi { spec.group } else { 0 }],
            drel: vec![
                0.0;
                if spec.buckets.is_some() {
                    spec.num_buckets * spec.group
                } else {
                    0
                }
            ],
            diag: vec![0.0; tq + tk_pad],
        }
    }

    /// A new key tile begins: its bias-gradient tile starts at 0.
    pub fn start_tile(&mut self) {
        self.tile.fill(0.0);
    }

    /// The key tile `kt` is done: keep its bias-gradient tile.
    pub fn end_tile(&mut self, kt: usize) {
        if !self.tile.is_empty() {
            self.tiles.push((kt, self.tile.clone()));
        }
    }
}

/// Takes the parameter gradients of one tile from `ds` (`rows × tk_pad`, the gradient of
/// `x`, 0 where hidden and past `cols`) for query head `hi` of the group and the tile's
/// first query `i0` and key `j0`; then, under soft-capping, turns `ds` into the gradient of
/// `z` with `tanh` (`rows × tk_pad`, 0 where hidden, as `softmax::probs` wrote it).
///
/// # Safety
/// `ds` and `tanh` are `rows × tk_pad`, `tk_pad` a multiple of `S::W`.
#[inline(always)]
pub(super) unsafe fn take<S: Simd>(
    job: &TileJob,
    (hi, i0, j0): (usize, usize, usize),
    ds: &mut [f32],
    tanh: Option<&[f32]>,
    acc: Option<&mut ModGrads>,
) {
    let (rows, cols, tk_pad) = (job.rows, job.cols, job.g.tk_pad);
    if let Some(acc) = acc {
        let spec = acc.spec;
        if let Some((gh, nq, nk)) = spec.bias_block() {
            let ghi = if gh == 1 { 0 } else { hi };
            for r in 0..rows {
                let iq = if nq == 1 { 0 } else { i0 + r };
                let src = &ds[r * tk_pad..r * tk_pad + cols];
                if nk == 1 {
                    acc.cols[ghi * nq + iq] += src.iter().sum::<f32>();
                } else {
                    let at = (ghi * nq + iq) * job.g.tk;
                    for (d, s) in acc.tile[at..at + cols].iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
        if spec.alibi || spec.buckets.is_some() {
            // Diagonal t = c − r + rows − 1 holds the pairs with j − i = j0 − i0 + t − rows + 1.
            let n = rows + cols - 1;
            let diag = &mut acc.diag[..n];
            diag.fill(0.0);
            for r in 0..rows {
                let d = &mut diag[rows - 1 - r..rows - 1 - r + cols];
                for (x, s) in d.iter_mut().zip(&ds[r * tk_pad..r * tk_pad + cols]) {
                    *x += s;
                }
            }
            // Table index of diagonal t: j − i + L_q − 1.
            let base = j0 + spec.lq - 1 - i0 - (rows - 1);
            for (t, &sum) in diag.iter().enumerate() {
                if sum == 0.0 {
                    continue;
                }
                let idx = base + t;
                if spec.alibi {
                    // |j − i'| with j − i' = idx − (L_k − 1)
                    let dist =
                        (idx as i64 - (spec.lk as i64 - 1) + spec.shift).unsigned_abs() as f64;
                    acc.dalibi[hi] -= sum as f64 * dist;
                }
                if let Some(b) = spec.buckets {
                    acc.drel[b[idx] as usize * spec.group + hi] += sum as f64;
                }
            }
        }
    }
    if let Some(tanh) = tanh {
        // SAFETY: every row is `tk_pad` long, a multiple of `W` (the contract).
        unsafe {
            let one = S::splat(1.0);
            for c0 in (0..rows * tk_pad).step_by(S::W) {
                let t = S::load(tanh.as_ptr().add(c0));
                let p = ds.as_mut_ptr().add(c0);
                S::store(p, S::mul(S::load(p), S::sub(one, S::mul(t, t))));
            }
        }
    }
}
