//! The forward kernel: online softmax ("flash") over the non-empty key tiles of each query
//! tile. Extra memory is a few tiles per thread, never `L_q × L_k`.

use rayon::prelude::*;

use crate::bias::Bias;
use crate::block::{BlockMask, Tile};
use crate::error::Result;
use crate::shape::AttnDims;
use crate::tile::{axpy, scores, visible, TilePos};
use crate::view::{Element, View};

/// `out [B, H_q, L_q, d]` and `lse [B, H_q, L_q]` (−∞ where a row allows nothing).
#[derive(Clone, Debug)]
pub struct Forward {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Per-thread scratch: one query tile, one key and value tile, one score tile, the running
/// statistics and the output accumulator.
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// Masked attention forward. `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]` (any strides),
/// `block` compiled for `(B, H_q, L_q, L_k)`; `scale` defaults to `1/sqrt(d)`.
pub fn forward<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    bias: Option<&Bias>,
    block: &BlockMask,
    scale: Option<f32>,
) -> Result<Forward> {
    let dims = AttnDims::of(q, k, v)?;
    dims.check_bias(bias)?;
    block.check_shape(dims.mask_shape())?;
    let scale = dims.scale(scale)?;
    let AttnDims {
        batch,
        q_heads,
        lq,
        d,
        ..
    } = dims;
    let (tq, tk) = (block.tile_q(), block.tile_k());
    let mut out = vec![0f32; batch * q_heads * lq * d];
    let mut lse = vec![0f32; batch * q_heads * lq];

    // One task per (b, h, query tile); each owns its slice of `out` and `lse`.
    let tasks = out
        .par_chunks_mut(lq * d)
        .zip(lse.par_chunks_mut(lq))
        .enumerate()
        .flat_map(|(bh, (o, l))| {
            o.par_chunks_mut(tq * d)
                .zip(l.par_chunks_mut(tq))
                .enumerate()
                .map(move |(qt, (o, l))| (bh, qt, o, l))
        });
    tasks.for_each_init(
        || Scratch {
            q: vec![0.0; tq * d],
            k: vec![0.0; tk * d],
            v: vec![0.0; tk * d],
            s: vec![0.0; tq * tk],
            m: vec![0.0; tq],
            l: vec![0.0; tq],
        },
        |sc, (bh, qt, out, lse)| {
            let (b, h) = (bh / q_heads, bh % q_heads);
            query_tile(q, k, v, bias, block, &dims, scale, b, h, qt, out, lse, sc);
        },
    );
    Ok(Forward { out, lse })
}

/// One query tile: rows `qt·tile_q ..` of head `(b, h)`; `out` is `rows × d`, `lse` `rows`.
#[allow(clippy::too_many_arguments)]
fn query_tile<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    bias: Option<&Bias>,
    block: &BlockMask,
    dims: &AttnDims,
    scale: f32,
    b: usize,
    h: usize,
    qt: usize,
    out: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    let (d, lk) = (dims.d, dims.lk);
    let (tk, words) = (block.tile_k(), block.words());
    let hk = h / dims.group();
    let rows = lse.len();
    let i0 = qt * block.tile_q();
    q.load_rows(b, h, i0, &mut sc.q[..rows * d]);
    let (m, l) = (&mut sc.m[..rows], &mut sc.l[..rows]);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    out.fill(0.0); // the accumulator: Σ_j exp(x_ij − m_i) v_j

    for kt in 0..block.grid().1 {
        let tile = block.tile(b, h, qt, kt);
        if let Tile::Empty = tile {
            continue;
        }
        let j0 = kt * tk;
        let cols = (lk - j0).min(tk);
        k.load_rows(b, hk, j0, &mut sc.k[..cols * d]);
        v.load_rows(b, hk, j0, &mut sc.v[..cols * d]);
        let pos = TilePos {
            b,
            h,
            i0,
            j0,
            rows,
            cols,
        };
        // x_ij = s · (q_i · k_j) + β_ij, −∞ where hidden.
        scores(
            &sc.q, &sc.k, d, scale, bias, tile, words, &pos, tk, &mut sc.s,
        );

        for r in 0..rows {
            let x = &mut sc.s[r * tk..r * tk + cols];
            let m_tile = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let m_new = m[r].max(m_tile);
            if m_new == f32::NEG_INFINITY {
                continue; // nothing visible yet: no −∞ − −∞ anywhere
            }
            // Rescale what was accumulated under the old running max (exp(−∞) = 0 at first).
            let alpha = (m[r] - m_new).exp();
            let acc = &mut out[r * d..(r + 1) * d];
            if alpha != 1.0 {
                acc.iter_mut().for_each(|a| *a *= alpha);
            }
            m[r] = m_new;
            // P̃_ij = exp(x_ij − m_i): 0 for hidden pairs (x = −∞).
            let mut sum = 0.0;
            for (c, xv) in x.iter_mut().enumerate() {
                *xv = (*xv - m_new).exp();
                sum += *xv;
                if visible(tile, words, r, c) {
                    axpy(*xv, &sc.v[c * d..(c + 1) * d], acc);
                }
            }
            l[r] = l[r] * alpha + sum;
        }
    }

    // O_i = acc / l_i and LSE_i = m_i + ln l_i; a row that saw nothing keeps O = 0, LSE = −∞.
    for r in 0..rows {
        if l[r] > 0.0 {
            let inv = 1.0 / l[r];
            out[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= inv);
            lse[r] = m[r] + l[r].ln();
        } else {
            out[r * d..(r + 1) * d].fill(0.0);
            lse[r] = f32::NEG_INFINITY;
        }
    }
}
