//! A whole attention problem cut into (query block, key block) pairs, as context parallelism
//! cuts it: each block's forward through `BlockMask::new_block`, merged over key blocks with
//! `merge_partials`; each block's backward from the merged output and LSE, summed. And an f64
//! reference of the gradient of a loss that also uses the LSE (`dLSE`), which
//! `reference::backward` does not take.

use std::ops::Range;

use maskattn::reference::{RefForward, RefGrads};
use maskattn::{BlockMask, Element, Grads, Mask, MaskShape, Params, Qkv, Upstream, View};
use num_traits::Float;

use super::{assert_close, Rng, EPS_F32};

/// `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]` contiguous; `dout` like q; `dlse` `[B, H_q, L_q]`.
pub struct Problem {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub dout: Vec<f32>,
    pub dlse: Vec<f32>,
}

/// What a blocked run returns, shaped as the whole problem's results, and how many block
/// pairs it skipped because their block mask said every tile was empty.
pub struct Blocked {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub grads: Grads,
    pub skipped: usize,
}

impl Problem {
    pub fn new(seed: u64, [b, hq, hkv, lq, lk, d]: [usize; 6]) -> Self {
        let mut rng = Rng::new(seed);
        Problem {
            b,
            hq,
            hkv,
            lq,
            lk,
            d,
            q: rng.vec(b * hq * lq * d),
            k: rng.vec(b * hkv * lk * d),
            v: rng.vec(b * hkv * lk * d),
            dout: rng.vec(b * hq * lq * d),
            dlse: rng.vec(b * hq * lq),
        }
    }

    pub fn shape(&self) -> MaskShape {
        MaskShape::new(self.b, self.hq, self.lq, self.lk)
    }

    /// Rows `r` of a contiguous `[B, heads, len, d]` tensor, in place (strided).
    pub fn rows<'a, T: Element>(
        &self,
        name: &'static str,
        data: &'a [T],
        (heads, len): (usize, usize),
        r: &Range<usize>,
    ) -> View<'a, T> {
        let d = self.d;
        let shape = [self.b, heads, r.len(), d];
        View::strided(
            name,
            &data[r.start * d..],
            shape,
            [heads * len * d, len * d, d, 1],
        )
        .unwrap()
    }

    pub fn q_rows<'a, T: Element>(&self, q: &'a [T], r: &Range<usize>) -> View<'a, T> {
        self.rows("q", q, (self.hq, self.lq), r)
    }

    pub fn kv_rows<'a, T: Element>(
        &self,
        name: &'static str,
        x: &'a [T],
        r: &Range<usize>,
    ) -> View<'a, T> {
        self.rows(name, x, (self.hkv, self.lk), r)
    }

    /// The entries `r` of each (b, h) row of a `[B, H_q, L_q]` tensor, contiguous.
    pub fn lse_rows(&self, x: &[f32], r: &Range<usize>) -> Vec<f32> {
        x.chunks(self.lq)
            .flat_map(|row| row[r.clone()].to_vec())
            .collect()
    }

    /// Forward of every (query block, key block) merged over key blocks, then the backward of
    /// each from the merged output and LSE (and what `with` adds), gradients summed. `q`,
    /// `k`, `v` are the problem's data in the storage type `T`. A block pair whose block mask
    /// is all empty is skipped in both passes (and counted).
    pub fn run_blocked<T: Element>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        mask: &Mask,
        q_blocks: &[Range<usize>],
        k_blocks: &[Range<usize>],
        tiles: (usize, usize),
        with: With<'_>,
    ) -> Blocked {
        let (shape, d) = (self.shape(), self.d);
        let params = with.params;
        // The sinks' gradient: from one key block's backward per query block.
        let params_sinks = match with.sinks {
            Some(s) => params.with_sinks(s),
            None => params,
        };
        let mut out = vec![0f32; self.b * self.hq * self.lq * d];
        let mut lse = vec![f32::NEG_INFINITY; self.b * self.hq * self.lq];
        let compile = |qr: &Range<usize>, kr: &Range<usize>| {
            BlockMask::block_with_tiles(mask, shape, qr.clone(), kr.clone(), tiles).unwrap()
        };
        let mut skipped = 0;
        for qr in q_blocks {
            let n = self.b * self.hq * qr.len();
            let (mut o, mut l) = (vec![0f32; n * d], vec![f32::NEG_INFINITY; n]);
            for kr in k_blocks {
                let bm = compile(qr, kr);
                if bm.all_empty() {
                    skipped += 1;
                    continue;
                }
                let (kv, vv) = (self.kv_rows("k", k, kr), self.kv_rows("v", v, kr));
                let f = maskattn::forward(&self.q_rows(q, qr), &kv, &vv, &bm, &params).unwrap();
                maskattn::merge_partials(&mut o, &mut l, &f.out, &f.lse, d).unwrap();
            }
            // A sink is one more part: no value, `LSE = sink_h`, once per row.
            if let Some(sinks) = with.sinks {
                let sink_lse: Vec<f32> = (0..n).map(|r| sinks[r / qr.len() % self.hq]).collect();
                maskattn::merge_partials(&mut o, &mut l, &vec![0.0; n * d], &sink_lse, d).unwrap();
            }
            // Scatter the block's rows into the whole problem's [B, H, L_q, ·].
            for (bh, (orow, lrow)) in o.chunks(qr.len() * d).zip(l.chunks(qr.len())).enumerate() {
                let at = bh * self.lq + qr.start;
                out[at * d..(at + qr.len()) * d].copy_from_slice(orow);
                lse[at..at + qr.len()].copy_from_slice(lrow);
            }
        }
        let mut grads = Grads {
            dq: vec![0f32; self.q.len()],
            dk: vec![0f32; self.k.len()],
            dv: vec![0f32; self.v.len()],
            params: Default::default(),
        };
        for qr in q_blocks {
            let (o, dout) = (self.q_rows(&out, qr), self.q_rows(&self.dout, qr));
            let (l, dl) = (self.lse_rows(&lse, qr), self.lse_rows(&self.dlse, qr));
            let up = Upstream::new(&dout);
            let up = if with.dlse { up.with_dlse(&dl) } else { up };
            let mut sinks_done = false;
            for kr in k_blocks {
                let bm = compile(qr, kr);
                if bm.all_empty() {
                    continue;
                }
                let par = if sinks_done { &params } else { &params_sinks };
                sinks_done = true;
                let (kv, vv) = (self.kv_rows("k", k, kr), self.kv_rows("v", v, kr));
                let qkv = Qkv::new(&self.q_rows(q, qr), &kv, &vv);
                let g = maskattn::backward_upstream(&qkv, &o, &l, up, &bm, par).unwrap();
                let (all, part) = (&mut grads.params, g.params);
                for (all, part) in [
                    (&mut all.dsinks, part.dsinks),
                    (&mut all.dalibi, part.dalibi),
                    (&mut all.drel, part.drel),
                ] {
                    if let Some(part) = part {
                        let all = all.get_or_insert_with(|| vec![0f32; part.len()]);
                        all.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
                    }
                }
                add_rows(&mut grads.dq, &g.dq, (self.lq, qr), d);
                add_rows(&mut grads.dk, &g.dk, (self.lk, kr), d);
                add_rows(&mut grads.dv, &g.dv, (self.lk, kr), d);
            }
        }
        Blocked {
            out,
            lse,
            grads,
            skipped,
        }
    }
}

/// What a blocked run adds to plain attention: the loss's gradient through the LSE
/// (`dLSE`), the params of every block (soft-cap, ALiBi, T5 buckets, dropout: no sinks),
/// attention sinks (merged as a part of their own, `O = 0`, `LSE = sink_h`; their gradient
/// from one key block's backward per query block). Parameter gradients are summed over blocks.
#[derive(Clone, Copy, Default)]
pub struct With<'a> {
    pub dlse: bool,
    pub params: Params<'a>,
    pub sinks: Option<&'a [f32]>,
}

/// Adds a block's `[B, H, len(r), d]` into rows `r` of the whole `[B, H, len, d]`.
fn add_rows(whole: &mut [f32], part: &[f32], (len, r): (usize, &Range<usize>), d: usize) {
    for (bh, rows) in part.chunks(r.len() * d).enumerate() {
        let at = (bh * len + r.start) * d;
        for (w, p) in whole[at..at + rows.len()].iter_mut().zip(rows) {
            *w += p;
        }
    }
}

/// Document ids at global positions: documents end at 30, 75, 140, 190 (of 203) in batch
/// row 0 and at 97, 150 in row 1 — crossing the block boundaries 64, 97, 134 — scaled to
/// `len` positions.
pub fn doc_ids(len: usize) -> Vec<i64> {
    let at = |pos: usize, ends: &[usize]| {
        let p = pos * 203 / len;
        ends.iter().filter(|&&e| p >= e).count() as i64
    };
    let mut ids: Vec<i64> = (0..len).map(|i| at(i, &[30, 75, 140, 190])).collect();
    ids.extend((0..len).map(|i| 10 + at(i, &[97, 150])));
    ids
}

/// `q_blocks` cut at the given points: `cuts(203, &[64, 134])` is `0..64, 64..134, 134..203`.
pub fn cuts(len: usize, at: &[usize]) -> Vec<Range<usize>> {
    let mut ends: Vec<usize> = at.to_vec();
    ends.push(len);
    let mut start = 0;
    ends.into_iter()
        .map(|e| {
            let r = start..e;
            start = e;
            r
        })
        .collect()
}

/// Gradients of `loss = Σ dO ∘ O + Σ dLSE ∘ LSE` in `T`, literally (no score modifiers,
/// default scale): `∂LSE_i/∂x_ij = P_ij`, so `dS_ij = P_ij (dP_ij − D_i + dLSE_i)` with
/// `D_i = dO_i · O_i`. Returns (dq, dk, dv) shaped like q, k, v.
pub fn lse_loss_grads<T: Float>(p: &Problem, mask: &Mask) -> [Vec<T>; 3] {
    let (d, s) = (p.d, p.shape());
    let c = |x: f32| T::from(x).unwrap();
    let scale = c(1.0 / (d as f32).sqrt());
    let mut dq = vec![T::zero(); p.q.len()];
    let (mut dk, mut dv) = (vec![T::zero(); p.k.len()], vec![T::zero(); p.v.len()]);
    for b in 0..p.b {
        for h in 0..p.hq {
            let hk = h / (p.hq / p.hkv);
            let qi = |i: usize| (b * p.hq + h) * p.lq + i;
            let kj = |j: usize| (b * p.hkv + hk) * p.lk + j;
            let dot = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .fold(T::zero(), |a, (&x, &y)| a + c(x) * c(y))
            };
            let row = |x: &[f32], r: usize| x[r * d..(r + 1) * d].to_vec();
            for i in 0..p.lq {
                let allowed: Vec<usize> = (0..p.lk)
                    .filter(|&j| mask.allowed(&s, b, h, i, j))
                    .collect();
                if allowed.is_empty() {
                    continue;
                }
                let x: Vec<T> = allowed
                    .iter()
                    .map(|&j| scale * dot(&row(&p.q, qi(i)), &row(&p.k, kj(j))))
                    .collect();
                let m = x.iter().fold(T::neg_infinity(), |a, &v| a.max(v));
                let sum = x.iter().fold(T::zero(), |a, &v| a + (v - m).exp());
                let lse = m + sum.ln();
                let pr: Vec<T> = x.iter().map(|&v| (v - lse).exp()).collect();
                let go = row(&p.dout, qi(i));
                let mut o = vec![T::zero(); d];
                for (&pj, &j) in pr.iter().zip(&allowed) {
                    for (ox, &vx) in o.iter_mut().zip(&p.v[kj(j) * d..(kj(j) + 1) * d]) {
                        *ox = *ox + pj * c(vx);
                    }
                }
                let delta = o
                    .iter()
                    .zip(&go)
                    .fold(T::zero(), |a, (&x, &g)| a + x * c(g));
                for (&pj, &j) in pr.iter().zip(&allowed) {
                    let dp = dot(&go, &row(&p.v, kj(j)));
                    let ds = pj * (dp - delta + c(p.dlse[qi(i)]));
                    for x in 0..d {
                        dq[qi(i) * d + x] = dq[qi(i) * d + x] + scale * ds * c(p.k[kj(j) * d + x]);
                        dk[kj(j) * d + x] = dk[kj(j) * d + x] + scale * ds * c(p.q[qi(i) * d + x]);
                        dv[kj(j) * d + x] = dv[kj(j) * d + x] + pj * c(go[x]);
                    }
                }
            }
        }
    }
    [dq, dk, dv]
}

impl Blocked {
    /// Out, LSE and dq/dk/dv of the blocked run against the whole problem's f64 golden and
    /// f32 naive results, under the accuracy rule; `at` names the case.
    pub fn assert_matches(
        &self,
        at: &str,
        (gold, naive): (&RefForward<f64>, &RefForward<f32>),
        (gg, ng): (&RefGrads<f64>, &RefGrads<f32>),
    ) {
        assert_close(
            &format!("out ({at})"),
            &self.out,
            &gold.out,
            &naive.out,
            EPS_F32,
        );
        assert_close(
            &format!("lse ({at})"),
            &self.lse,
            &gold.lse,
            &naive.lse,
            EPS_F32,
        );
        let g = &self.grads;
        assert_close(&format!("dq ({at})"), &g.dq, &gg.dq, &ng.dq, EPS_F32);
        assert_close(&format!("dk ({at})"), &g.dk, &gg.dk, &ng.dk, EPS_F32);
        assert_close(&format!("dv ({at})"), &g.dv, &gg.dv, &ng.dv, EPS_F32);
    }
}
