//! The backward's five products on bf16 pairs (see `gemm::bf16`, `gemm::amx`), for bf16
//! storage whose output gradient `dO` is bf16 as well (every value exactly a bf16 — what a
//! framework training in bf16 hands over). `P` and `dS` are rounded to bf16 for their
//! products, as PyTorch's flash kernel does; everything else is f32 as on the f32 path.
//!
//! The products reduce over three different dimensions, and a pair-product needs its
//! reduction dimension in pairs, so the operands come in these layouts:
//!
//! | product          | reduces over | A (bf16 rows)         | B (pairs)                 |
//! | ---------------- | ------------ | --------------------- | ------------------------- |
//! | `x  = s·Q·Kᵀ`    | features     | Q rows                | `Kᵀ` over features        |
//! | `dP = dO·Vᵀ`     | features     | dO rows               | `Vᵀ` over features        |
//! | `dVᵀ += dOᵀ·P`   | query rows   | `dOᵀ` rows            | P over query rows         |
//! | `dKᵀ += Qᵀ·dS`   | query rows   | `Qᵀ` rows             | dS over query rows        |
//! | `dQ += dS·K`     | keys         | dS rows               | K over keys               |
//!
//! `dK` and `dV` are accumulated transposed (features × keys) so that `P` and `dS` are the
//! pair-interleaved operand, which vector code builds from their rows; they are transposed
//! back (and `dK` scaled by `s`) once per key tile.

use rayon::prelude::*;

use super::score_grads::{self, ModGrads};
use super::step::ds_rows;
use crate::block::BlockMask;
use crate::gemm::amx::{DotPath, Engine};
use crate::gemm::bf16::Pairs;
use crate::gemm::pair_layouts::Packing;
use crate::gemm::{gemm_add, MatMut, MatRef, Update};
use crate::pack::{self, Span};
use crate::simd::{Simd, WithSimd};
use crate::softmax::{self as sm, Geom, TileJob, Unseen};
use crate::view::{Element, View};

/// The query-side operands of every (b, query head, query tile), made once per call.
pub(super) struct QuerySide {
    /// Which code runs the pair products (`gemm::amx`) and rounds `P` and `dS` for them,
    /// picked once per call (`DotPath::now`).
    pub engine: Engine,
    pub packing: Packing,
    /// `[B·H_q·n_q] × (tq × d_pad)`: Q and dO rows.
    pub q: Vec<u16>,
    pub dout: Vec<u16>,
    /// `[B·H_q·n_q] × (d_pad × tq_pad)`: Qᵀ and dOᵀ, query rows padded to even.
    pub qt: Vec<u16>,
    pub doutt: Vec<u16>,
    pub tq_pad: usize,
}

/// The query-side operands of the bf16 path (see [`QuerySide`]).
pub(super) fn query_side<T: Element>(
    q: &View<T>,
    dout: &View<f32>,
    block: &BlockMask,
    g: &Geom,
    path: DotPath,
) -> QuerySide {
    let [batch, heads, lq, _] = q.shape();
    let (tq, nq) = (block.tile_q(), block.grid().0);
    let tq_pad = tq.next_multiple_of(2);
    let (n_rows, n_t) = (tq * g.d_pad, g.d_pad * tq_pad);
    let tiles = batch * heads * nq;
    let mut qs = QuerySide {
        q: vec![0; tiles * n_rows],
        dout: vec![0; tiles * n_rows],
        qt: vec![0; tiles * n_t],
        doutt: vec![0; tiles * n_t],
        tq_pad,
        engine: path.engine,
        packing: path.packing,
    };
    qs.q.par_chunks_mut(n_rows)
        .zip(qs.dout.par_chunks_mut(n_rows))
        .zip(qs.qt.par_chunks_mut(n_t))
        .zip(qs.doutt.par_chunks_mut(n_t))
        .enumerate()
        .for_each(|(idx, (((qr, dr), qt), dt))| {
            let (bh, t) = (idx / nq, idx % nq);
            let (b, h, i0) = (bh / heads, bh % heads, t * tq);
            let span = Span {
                b,
                h,
                start: i0,
                len: (lq - i0).min(tq),
            };
            pack::rows_bf16(q, span, g.d_pad, qr);
            pack::rows_bf16(dout, span, g.d_pad, dr);
            pack::transposed_bf16(q, span, (tq_pad, g.d_pad), qt);
            pack::transposed_bf16(dout, span, (tq_pad, g.d_pad), dt);
        });
    qs
}

/// Every value of `dout` is exactly a bf16 (so the bf16 products lose nothing on it).
pub(super) fn exactly_bf16(dout: &View<f32>) -> bool {
    let [batch, heads, l, d] = dout.shape();
    let mut row = vec![0f32; d];
    (0..batch * heads * l).all(|n| {
        dout.load_rows(n / (heads * l), n / l % heads, n % l, &mut row);
        // NaN is a bf16 too (the products carry it as they should).
        row.iter()
            .all(|&x| x.is_nan() || half::bf16::from_f32(x).to_f32() == x)
    })
}

/// One key tile's operands (see the table above).
pub(super) struct KeySide {
    /// `d_pad/2 × tk_pad` pairs each.
    pub kt: Vec<u32>,
    pub vt: Vec<u32>,
    /// `tk_pad/2 × d_pad` pairs.
    pub k: Vec<u32>,
    pub k_finite: bool,
    /// The guard against `0 · NaN` in `dS·K`.
    pub unseen: Unseen,
    /// Accumulated `dKᵀ`, `dVᵀ` (`d_pad × tk_pad`).
    pub dkt: Vec<f32>,
    pub dvt: Vec<f32>,
}

impl KeySide {
    pub fn new(g: &Geom) -> Self {
        let n = g.d_pad * g.tk_pad;
        KeySide {
            kt: vec![0; n / 2],
            vt: vec![0; n / 2],
            k: vec![0; n / 2],
            k_finite: true,
            unseen: Unseen::new(g.words, n),
            dkt: vec![0.0; n],
            dvt: vec![0.0; n],
        }
    }

    /// `dK = s · (dKᵀ)ᵀ`, `dV = (dVᵀ)ᵀ` into `tk_pad × d_pad` tiles.
    pub fn transpose_into(&self, g: &Geom, scale: f32, dk: &mut [f32], dv: &mut [f32]) {
        for x in 0..g.d_pad {
            for c in 0..g.tk_pad {
                dk[c * g.d_pad + x] = scale * self.dkt[x * g.tk_pad + c];
                dv[c * g.d_pad + x] = self.dvt[x * g.tk_pad + c];
            }
        }
    }
}

/// Per-task scratch of the bf16 step.
pub(super) struct Work16 {
    /// P (or P ∘ z) and dS interleaved over query rows, the pair operands of `dVᵀ` and
    /// `dKᵀ` (see the table above): `tq_pad/2 × tk_pad` pairs each.
    pub p_pairs: Vec<u32>,
    pub ds_pairs: Vec<u32>,
    /// dS rows in bf16: `tq × tk_pad`.
    pub ds16: Vec<u16>,
}

impl Work16 {
    pub fn new(g: &Geom, tq_pad: usize) -> Self {
        Work16 {
            p_pairs: vec![0; tq_pad / 2 * g.tk_pad],
            ds_pairs: vec![0; tq_pad / 2 * g.tk_pad],
            ds16: vec![0; tq_pad * g.tk_pad],
        }
    }
}

/// The query side of one (query tile, key tile) pair.
pub(super) struct QueryTile<'a> {
    pub job: TileJob<'a>,
    pub engine: Engine,
    pub packing: Packing,
    pub lse: &'a [f32],
    pub delta: &'a [f32],
    /// Q and dO rows as bf16 (`tile_q × d_pad`), and transposed (`d_pad × tq_pad`).
    pub q: &'a [u16],
    pub dout: &'a [u16],
    pub qt: &'a [u16],
    pub doutt: &'a [u16],
    pub tq_pad: usize,
    /// Every Q and dO value of the tile is finite.
    pub rows_finite: bool,
    /// (query head within the group, first query, first key).
    pub at: (usize, usize, usize),
}

/// The f32 tiles of the step: `P`, `P ∘ z`, `dS` (`tile_q × tk_pad`) and the `dQ` rows.
pub(super) struct F32Tiles<'a, 'b> {
    pub p: &'a mut [f32],
    pub pz: &'a mut [f32],
    pub ds: &'a mut [f32],
    /// `tanh(z / c)` under soft-capping (empty without).
    pub tanh: &'a mut [f32],
    pub dq: &'a mut [f32],
    /// The task's parameter-gradient sums.
    pub mods: Option<&'a mut ModGrads<'b>>,
}

/// The five products of one pair; `dq` receives `dS·K` (the caller applies `s`), `ks`
/// accumulates `dKᵀ` (unscaled) and `dVᵀ`. Run by `simd::run` on the kernels' instruction
/// set (the softmax's).
pub(super) struct Step<'t, 'a, 'b> {
    pub t: &'t QueryTile<'a>,
    pub ks: &'t mut KeySide,
    pub w: &'t mut Work16,
    pub f: F32Tiles<'a, 'b>,
}

impl WithSimd for Step<'_, '_, '_> {
    type Output = ();

    /// # Safety
    /// `t.engine` came from `DotPath::now`. (The operands are checked as they are made.)
    #[inline(always)]
    unsafe fn with_simd<S: Simd>(self) {
        // SAFETY: the contract.
        unsafe { step::<S>(self.t, self.ks, self.w, self.f) }
    }
}

/// [`Step`]'s work.
///
/// # Safety
/// As for its `with_simd`, and the CPU has `S`'s features.
#[inline(always)]
unsafe fn step<S: Simd>(t: &QueryTile, ks: &mut KeySide, w: &mut Work16, f: F32Tiles) {
    let F32Tiles {
        p,
        pz,
        ds,
        tanh,
        dq,
        mods,
    } = f;
    let mut tanh = t.job.softcap.map(|_| tanh);
    let job = &t.job;
    let g = job.g;
    let (rows, cols, tk_pad, d_pad) = (job.rows, job.cols, g.tk_pad, g.d_pad);
    let (fp, rp) = (d_pad / 2, t.tq_pad / 2);
    let scores = |x| MatMut::new(x, rows, tk_pad, tk_pad);
    // SAFETY: the engine's and `S`'s features are this function's contract; operands
    // checked when made.
    unsafe {
        let (q, dout) = (
            Pairs::of_u16(t.q, rows, fp, fp),
            Pairs::of_u16(t.dout, rows, fp, fp),
        );
        t.engine.gemm(
            scores(p),
            q,
            Pairs::of_u32(&ks.kt, fp, tk_pad, tk_pad),
            Update::Set,
        ); // x = Q·Kᵀ
        t.engine.gemm(
            scores(ds),
            dout,
            Pairs::of_u32(&ks.vt, fp, tk_pad, tk_pad),
            Update::Set,
        ); // dP = dO·Vᵀ
        sm::probs::<S>(job, t.lse, p, tanh.as_deref_mut()); // P  = e^(x − LSE)
        ds_rows::<S>(job, (t.lse, t.delta), p, pz, ds); //     dS = P ∘ (z dP − D)
                                                        // dbias, dslope, drel from dS; dS ∘ (1 − tanh²) under soft-capping
        score_grads::take::<S>(job, t.at, ds, tanh.as_deref(), mods);
        let pv = if job.drop.is_some() { &*pz } else { &*p };
        t.packing.round_rows(ds, rows, tk_pad, tk_pad, &mut w.ds16);
        let dvt = MatMut::new(&mut ks.dvt, g.d, tk_pad, tk_pad);
        let dkt = MatMut::new(&mut ks.dkt, g.d, tk_pad, tk_pad);
        if let (false, Some(bits)) = (t.rows_finite, job.bits) {
            // A non-finite Q or dO value in a row that some keys must not see: `0 · NaN`
            // would reach those keys' gradients, so the visible pairs are summed one by one
            // (on the bf16-rounded P and dS, as the products below take them).
            let _ = (dvt, dkt);
            let round = |x: f32| half::bf16::from_f32(x).to_f32();
            let wide = |x: u16| half::bf16::from_bits(x).to_f32();
            for r in 0..rows {
                for c in (0..cols).filter(|&c| sm::visible(Some(bits), g.words, r, c)) {
                    let (pr, dsr) = (round(pv[r * tk_pad + c]), round(ds[r * tk_pad + c]));
                    for x in 0..g.d {
                        ks.dvt[x * tk_pad + c] += pr * wide(t.dout[r * d_pad + x]);
                        ks.dkt[x * tk_pad + c] += dsr * wide(t.q[r * d_pad + x]);
                    }
                }
            }
        } else {
            // Over the query rows, in pairs; padding rows are 0.
            let pairs = rows.div_ceil(2);
            t.packing
                .interleave_rows(pv, rows, tk_pad, tk_pad, &mut w.p_pairs);
            t.packing
                .interleave_rows(ds, rows, tk_pad, tk_pad, &mut w.ds_pairs);
            let (qt, doutt) = (
                Pairs::of_u16(t.qt, g.d, pairs, rp),
                Pairs::of_u16(t.doutt, g.d, pairs, rp),
            );
            t.engine.gemm(
                dvt,
                doutt,
                Pairs::of_u32(&w.p_pairs, pairs, tk_pad, tk_pad),
                Update::Add,
            ); // dVᵀ += dOᵀ·P
            t.engine.gemm(
                dkt,
                qt,
                Pairs::of_u32(&w.ds_pairs, pairs, tk_pad, tk_pad),
                Update::Add,
            ); // dKᵀ += Qᵀ·dS
        }
        // dQ += dS·K, over the keys in pairs (dS past `cols` is 0, and so are padding keys),
        // with the guard against 0 · NaN: on the exact f32 values where a non-finite key
        // some rows see remains.
        let dq = MatMut::new(dq, rows, d_pad, d_pad);
        match ks.unseen.pairs(job, &ks.k, d_pad, ks.k_finite) {
            Ok(k) => {
                let kp = cols.div_ceil(2);
                let ds16 = Pairs::of_u16(&w.ds16, rows, kp, tk_pad / 2);
                t.engine
                    .gemm(dq, ds16, Pairs::of_u32(k, kp, d_pad, d_pad), Update::Add);
            }
            Err(k) => {
                let ds = MatRef::new(ds, rows, cols, tk_pad);
                let k = MatRef::new(k, cols, d_pad, d_pad);
                gemm_add::<S>(dq, ds, k, Some(|r, c| job.visible(r, c)));
            }
        }
    }
}
