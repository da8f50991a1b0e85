//! The backward kernel: recomputes `P` tile by tile from the forward's `LSE`.
//!
//! Two passes, each owning what it writes, so no thread ever adds into another's result:
//! 1. over key tiles (per `(b, kv head)`): `dK`, `dV` of that tile, summed over the query
//!    heads that share the kv head (GQA) and over the non-empty query tiles;
//! 2. over query tiles (per `(b, q head)`): `dQ` of that tile, over the non-empty key tiles.
//!
//! Every sum runs in a fixed order that does not depend on scheduling, so the gradients are
//! bit-identical run to run and for any number of threads (the deterministic mode is the only
//! mode). The price is recomputing `Q·Kᵀ` and `dO·Vᵀ` in the second pass.

use rayon::prelude::*;

use crate::bias::Bias;
use crate::block::{BlockMask, Tile};
use crate::error::{AttnError, Result};
use crate::shape::AttnDims;
use crate::tile::{axpy, dot, scores, visible, TilePos};
use crate::view::{Element, View};

/// `dq` like q `[B, H_q, L_q, d]`; `dk`, `dv` like k and v `[B, H_kv, L_k, d]`.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// What both passes share: inputs, shape, scale and `D_i = dO_i · O_i`.
struct Ctx<'a, 'b, T> {
    q: &'a View<'b, T>,
    k: &'a View<'b, T>,
    v: &'a View<'b, T>,
    dout: &'a View<'b, f32>,
    bias: Option<&'a Bias<'b>>,
    block: &'a BlockMask,
    lse: &'a [f32],
    delta: Vec<f32>,
    dims: AttnDims,
    scale: f32,
}

/// Per-thread scratch for one (query tile, key tile) pair.
struct Scratch {
    q: Vec<f32>,
    dout: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Scores, then `P`.
    p: Vec<f32>,
    /// `dS`.
    ds: Vec<f32>,
}

impl Scratch {
    fn new(tq: usize, tk: usize, d: usize) -> Self {
        Scratch {
            q: vec![0.0; tq * d],
            dout: vec![0.0; tq * d],
            k: vec![0.0; tk * d],
            v: vec![0.0; tk * d],
            p: vec![0.0; tq * tk],
            ds: vec![0.0; tq * tk],
        }
    }
}

/// Masked attention backward: gradients of `q`, `k`, `v` given the forward's `out` and `lse`
/// and the output gradient `dout` (shaped like q). Same mask, bias and scale as the forward.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    bias: Option<&Bias>,
    block: &BlockMask,
    scale: Option<f32>,
) -> Result<Grads> {
    let dims = AttnDims::of(q, k, v)?;
    dims.check_bias(bias)?;
    dims.check_like_q("out", out)?;
    dims.check_like_q("dout", dout)?;
    block.check_shape(dims.mask_shape())?;
    let AttnDims {
        batch,
        q_heads,
        kv_heads,
        lq,
        lk,
        d,
    } = dims;
    if lse.len() != batch * q_heads * lq {
        return Err(AttnError::LseLength {
            got: lse.len(),
            expected: batch * q_heads * lq,
        });
    }
    let scale = dims.scale(scale)?;

    // D_i = dO_i · O_i, one per query row.
    let mut delta = vec![0f32; batch * q_heads * lq];
    delta.par_chunks_mut(lq).enumerate().for_each(|(bh, dl)| {
        let (b, h) = (bh / q_heads, bh % q_heads);
        let (mut o, mut g) = (vec![0f32; d], vec![0f32; d]);
        for (i, x) in dl.iter_mut().enumerate() {
            out.load_rows(b, h, i, &mut o);
            dout.load_rows(b, h, i, &mut g);
            *x = dot(&o, &g);
        }
    });

    let ctx = Ctx {
        q,
        k,
        v,
        dout,
        bias,
        block,
        lse,
        delta,
        dims,
        scale,
    };
    let (tq, tk) = (block.tile_q(), block.tile_k());

    let mut dk = vec![0f32; batch * kv_heads * lk * d];
    let mut dv = vec![0f32; batch * kv_heads * lk * d];
    dk.par_chunks_mut(lk * d)
        .zip(dv.par_chunks_mut(lk * d))
        .enumerate()
        .flat_map(|(bhk, (dk, dv))| {
            dk.par_chunks_mut(tk * d)
                .zip(dv.par_chunks_mut(tk * d))
                .enumerate()
                .map(move |(kt, (dk, dv))| (bhk, kt, dk, dv))
        })
        .for_each_init(
            || Scratch::new(tq, tk, d),
            |sc, (bhk, kt, dk, dv)| ctx.key_tile(bhk / kv_heads, bhk % kv_heads, kt, dk, dv, sc),
        );

    let mut dq = vec![0f32; batch * q_heads * lq * d];
    dq.par_chunks_mut(lq * d)
        .enumerate()
        .flat_map(|(bh, dq)| {
            dq.par_chunks_mut(tq * d)
                .enumerate()
                .map(move |(qt, dq)| (bh, qt, dq))
        })
        .for_each_init(
            || Scratch::new(tq, tk, d),
            |sc, (bh, qt, dq)| ctx.query_tile(bh / q_heads, bh % q_heads, qt, dq, sc),
        );

    Ok(Grads { dq, dk, dv })
}

impl<T: Element> Ctx<'_, '_, T> {
    /// Fills `sc.p` with `P` and `sc.ds` with `dS` for query tile `qt` of head `h` against the
    /// key tile already in `sc.k`, `sc.v`. Hidden pairs and rows that see nothing get exactly 0.
    fn probs_and_ds(&self, tile: Tile, pos: &TilePos, sc: &mut Scratch) {
        let d = self.dims.d;
        let (tk, words) = (self.block.tile_k(), self.block.words());
        let row0 = (pos.b * self.dims.q_heads + pos.h) * self.dims.lq + pos.i0;
        self.q
            .load_rows(pos.b, pos.h, pos.i0, &mut sc.q[..pos.rows * d]);
        self.dout
            .load_rows(pos.b, pos.h, pos.i0, &mut sc.dout[..pos.rows * d]);
        // x_ij, −∞ where hidden
        scores(
            &sc.q, &sc.k, d, self.scale, self.bias, tile, words, pos, tk, &mut sc.p,
        );
        for r in 0..pos.rows {
            let (lse, delta) = (self.lse[row0 + r], self.delta[row0 + r]);
            let p = &mut sc.p[r * tk..r * tk + pos.cols];
            let ds = &mut sc.ds[r * tk..r * tk + pos.cols];
            if lse == f32::NEG_INFINITY {
                p.fill(0.0); // the row sees nothing: no gradient flows through it
                ds.fill(0.0);
                continue;
            }
            let g = &sc.dout[r * d..(r + 1) * d];
            for c in 0..pos.cols {
                if visible(tile, words, r, c) {
                    // P_ij = exp(x_ij − LSE_i); dS_ij = P_ij (dO_i · v_j − D_i)
                    p[c] = (p[c] - lse).exp();
                    ds[c] = p[c] * (dot(g, &sc.v[c * d..(c + 1) * d]) - delta);
                } else {
                    p[c] = 0.0;
                    ds[c] = 0.0;
                }
            }
        }
    }

    /// Pass 1: `dK`, `dV` for key tile `kt` of kv head `(b, hk)`; `dk`, `dv` are `cols × d`.
    fn key_tile(
        &self,
        b: usize,
        hk: usize,
        kt: usize,
        dk: &mut [f32],
        dv: &mut [f32],
        sc: &mut Scratch,
    ) {
        let AttnDims { lq, d, .. } = self.dims;
        let (tq, tk, words) = (self.block.tile_q(), self.block.tile_k(), self.block.words());
        let j0 = kt * tk;
        let cols = dk.len() / d;
        self.k.load_rows(b, hk, j0, &mut sc.k[..cols * d]);
        self.v.load_rows(b, hk, j0, &mut sc.v[..cols * d]);
        let group = self.dims.group();
        for h in hk * group..(hk + 1) * group {
            for qt in 0..self.block.grid().0 {
                let tile = self.block.tile(b, h, qt, kt);
                if let Tile::Empty = tile {
                    continue;
                }
                let i0 = qt * tq;
                let pos = TilePos {
                    b,
                    h,
                    i0,
                    j0,
                    rows: (lq - i0).min(tq),
                    cols,
                };
                self.probs_and_ds(tile, &pos, sc);
                for r in 0..pos.rows {
                    let (qr, gr) = (&sc.q[r * d..(r + 1) * d], &sc.dout[r * d..(r + 1) * d]);
                    for c in 0..cols {
                        if visible(tile, words, r, c) {
                            // dV_j += P_ij dO_i ; dK_j += s dS_ij q_i
                            axpy(sc.p[r * tk + c], gr, &mut dv[c * d..(c + 1) * d]);
                            axpy(
                                self.scale * sc.ds[r * tk + c],
                                qr,
                                &mut dk[c * d..(c + 1) * d],
                            );
                        }
                    }
                }
            }
        }
    }

    /// Pass 2: `dQ` for query tile `qt` of head `(b, h)`; `dq` is `rows × d`.
    fn query_tile(&self, b: usize, h: usize, qt: usize, dq: &mut [f32], sc: &mut Scratch) {
        let AttnDims { lk, d, .. } = self.dims;
        let (tq, tk, words) = (self.block.tile_q(), self.block.tile_k(), self.block.words());
        let hk = h / self.dims.group();
        let i0 = qt * tq;
        let rows = dq.len() / d;
        for kt in 0..self.block.grid().1 {
            let tile = self.block.tile(b, h, qt, kt);
            if let Tile::Empty = tile {
                continue;
            }
            let j0 = kt * tk;
            let cols = (lk - j0).min(tk);
            self.k.load_rows(b, hk, j0, &mut sc.k[..cols * d]);
            self.v.load_rows(b, hk, j0, &mut sc.v[..cols * d]);
            let pos = TilePos {
                b,
                h,
                i0,
                j0,
                rows,
                cols,
            };
            self.probs_and_ds(tile, &pos, sc);
            for r in 0..rows {
                let g = &mut dq[r * d..(r + 1) * d];
                for c in 0..cols {
                    if visible(tile, words, r, c) {
                        // dQ_i += s dS_ij k_j (hidden keys skipped: they may hold NaN)
                        axpy(self.scale * sc.ds[r * tk + c], &sc.k[c * d..(c + 1) * d], g);
                    }
                }
            }
        }
    }
}
