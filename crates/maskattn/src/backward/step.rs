//! The backward's step on f32: the five products of one (query tile, key tile) pair, and
//! `dS` from `P` and `dP` (which the bf16 step shares).

use super::score_grads::{self, ModGrads};
use crate::gemm::{gemm, gemm_add, MatMut, MatRef, Update};
use crate::simd::{Simd, WithSimd};
use crate::softmax::{self as sm, TileJob};

/// The five products of one (query tile, key tile) pair, on f32.
pub(super) struct Step<'a, 'b> {
    pub job: TileJob<'a>,
    pub lse: &'a [f32],
    pub delta: &'a [f32],
    /// Q and dO rows over the padded features (`rows × d_pad`).
    pub q: MatRef<'a>,
    pub dout: MatRef<'a>,
    /// K rows (`cols × d_pad`), `Kᵀ` and `Vᵀ` (`d × tk_pad`).
    pub k: MatRef<'a>,
    pub kt: MatRef<'a>,
    pub vt: MatRef<'a>,
    /// K holds a non-finite value only some rows see; Q or dO a non-finite value in a
    /// partial tile: the products over those skip the hidden pairs.
    pub exact_k: bool,
    pub exact_rows: bool,
    /// `rows × tk_pad` score tiles (`tile_q` rows allocated).
    pub p: &'a mut [f32],
    pub pz: &'a mut [f32],
    pub ds: &'a mut [f32],
    /// `tanh(z / c)` under soft-capping (`rows × tk_pad`).
    pub tanh: Option<&'a mut [f32]>,
    /// (query head within the group, first query, first key) and the task's sums.
    pub at: (usize, usize, usize),
    pub mods: Option<&'a mut ModGrads<'b>>,
    /// `dk`, `dv` receive `dSᵀ·Q` (the caller applies `s`) and `Pᵀ·dO`; `dq` `dS·K`.
    pub dk: MatMut<'a>,
    pub dv: MatMut<'a>,
    pub dq: MatMut<'a>,
}

impl WithSimd for Step<'_, '_> {
    type Output = ();

    #[inline(always)]
    unsafe fn with_simd<S: Simd>(self) {
        let Step {
            job,
            lse,
            delta,
            q,
            dout,
            k,
            kt,
            vt,
            exact_k,
            exact_rows,
            p,
            pz,
            ds,
            mut tanh,
            at,
            mods,
            dk,
            dv,
            dq,
        } = self;
        let (rows, cols, tk_pad) = (job.rows, job.cols, job.g.tk_pad);
        let by_row = exact_rows.then_some(|c: usize, r: usize| job.visible(r, c));
        let by_key = exact_k.then_some(|r: usize, c: usize| job.visible(r, c));
        let scores = |x| MatMut::new(x, rows, tk_pad, tk_pad);
        // The score products reduce over the real features only (the padding is zero).
        let (q_d, dout_d) = (q.first_cols(job.g.d), dout.first_cols(job.g.d));
        // SAFETY: `S`'s features are present (`simd::run`); operands checked when made.
        unsafe {
            gemm::<S>(scores(p), q_d, kt, Update::Set); //     x  = Q·Kᵀ
            gemm::<S>(scores(ds), dout_d, vt, Update::Set); // dP = dO·Vᵀ
            sm::probs::<S>(&job, lse, p, tanh.as_deref_mut()); //  P  = e^(x − LSE)
            ds_rows::<S>(&job, (lse, delta), p, pz, ds); //            dS = P ∘ (z dP − D)
                                                         // dbias, dslope, drel from dS; dS ∘ (1 − tanh²) under soft-capping
            score_grads::take::<S>(&job, at, ds, tanh.as_deref(), mods);
            let pv = if job.drop.is_some() { &*pz } else { &*p };
            let (pv, ds) = (
                MatRef::new(pv, rows, cols, tk_pad),
                MatRef::new(ds, rows, cols, tk_pad),
            );
            gemm_add::<S>(dv, pv.t(), dout, by_row); //     dV += Pᵀ·dO
            gemm_add::<S>(dk, ds.t(), q, by_row); //        dK += dSᵀ·Q
            gemm_add::<S>(dq, ds, k, by_key); //                dQ += dS·K
        }
    }
}

/// Turns the `dP` tile `ds` into `dS = P ∘ (dP − D)` row by row, given `P` in `p`:
/// dropout's `z` into `dP` and into `pz = P ∘ z`, and `dS` selected to 0 where hidden
/// (dP may be NaN there). A row that sees nothing (`LSE = −∞`) has `P = 0` (softmax's
/// empty-row rule, applied by `probs`), so its `dS` is 0: written, not computed as
/// `0 · (dP − D)`, which a non-finite `dO` would make NaN.
///
/// # Safety
/// The tiles are `rows × tk_pad`.
#[inline(always)]
pub(super) unsafe fn ds_rows<S: Simd>(
    job: &TileJob,
    (lse, delta): (&[f32], &[f32]),
    p: &mut [f32],
    pz: &mut [f32],
    ds: &mut [f32],
) {
    let (tk_pad, cols) = (job.g.tk_pad, job.cols);
    // SAFETY: every row slice is `tk_pad` long, a multiple of `W` (`pad16`).
    unsafe {
        for r in 0..job.rows {
            let pr = &mut p[r * tk_pad..(r + 1) * tk_pad];
            let dsr = &mut ds[r * tk_pad..(r + 1) * tk_pad];
            if lse[r] == f32::NEG_INFINITY {
                dsr.fill(0.0);
                if job.drop.is_some() {
                    pz[r * tk_pad..(r + 1) * tk_pad].fill(0.0);
                }
                continue;
            }
            // Dropout: dP' = z ∘ dP, and dV takes P ∘ z; the z of padding columns is 0.
            if let Some(dt) = job.drop {
                let pzr = &mut pz[r * tk_pad..(r + 1) * tk_pad];
                dt.fill(r, &mut pzr[..cols]);
                pzr[cols..].fill(0.0);
                for c in 0..tk_pad {
                    dsr[c] *= pzr[c];
                    pzr[c] *= pr[c];
                }
            }
            let dv_ = S::splat(delta[r]);
            let zero = S::splat(0.0);
            for c0 in (0..tk_pad).step_by(S::W) {
                let pv = S::load(pr.as_ptr().add(c0));
                let x = S::mul(pv, S::sub(S::load(dsr.as_ptr().add(c0)), dv_));
                let vis = job.lane_bits::<S>(r, c0);
                S::store(dsr.as_mut_ptr().add(c0), S::select(vis, x, zero));
            }
        }
    }
}
