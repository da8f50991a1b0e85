//! The backward kernel: recomputes `P` tile by tile from the forward's `LSE`.
//!
//! Work is split into tasks of (batch row, kv head, chunk of key tiles). A task owns the
//! `dK`, `dV` of its key tiles outright and accumulates `dQ` of the query heads it serves in
//! a buffer of its own; the chunks' `dQ` buffers are added in chunk order at the end. The
//! number of chunks depends on the shape only, and every sum runs in a fixed order, so the
//! gradients are bit-identical run to run and for any number of threads: the deterministic
//! mode is the only mode.

#[cfg(target_arch = "x86_64")]
mod bf16;

use rayon::prelude::*;

use crate::bias::Bias;
use crate::block::{BlockMask, Tile};
use crate::error::{AttnError, Result};
use crate::gemm::{gemm, gemm_visible, Strided};
use crate::pack::{self, pad16};
use crate::params::{DropTile, Dropout, Params};
use crate::shape::AttnDims;
use crate::simd::{current_isa, dispatch, Simd};
use crate::tile::{exp_row, lane_bits, mask_row, visible};
use crate::view::{Element, View};

/// `dq` like q `[B, H_q, L_q, d]`; `dk`, `dv` like k and v `[B, H_kv, L_k, d]`.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Buffers the caller owns for [`backward_into`], contiguous, shaped as in [`Grads`].
#[derive(Debug)]
pub struct GradsMut<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

/// Chunks of key tiles per (b, kv head) aim for this many tasks in all, so that a call with
/// few heads still spreads over the cores...
const TARGET_TASKS: usize = 16;
/// ...but their private `dQ` buffers stay under this many bytes per (b, kv head).
const CHUNK_DQ_BYTES: usize = 32 << 20;

/// Everything the tasks share.
struct Ctx<'a, 'b, T> {
    q: &'a View<'b, T>,
    k: &'a View<'b, T>,
    v: &'a View<'b, T>,
    dout: &'a View<'b, f32>,
    bias: Option<&'a Bias<'b>>,
    dropout: Option<Dropout>,
    block: &'a BlockMask,
    lse: &'a [f32],
    delta: Vec<f32>,
    /// Per (b, query head, query tile): every Q and dO value of the tile is finite.
    rows_finite: Vec<bool>,
    dims: AttnDims,
    scale: f32,
    g: Geom,
    /// The bf16 dot-product path's query-side operands, where it is taken.
    #[cfg(target_arch = "x86_64")]
    qs: Option<bf16::QuerySide>,
}

#[derive(Clone, Copy)]
struct Geom {
    d: usize,
    d_pad: usize,
    tk: usize,
    tk_pad: usize,
    words: usize,
}

/// Scratch of one task: one key tile in three layouts, its gradients, one query tile and
/// its `dO`, and the `P`, `dS` tiles.
struct Scratch {
    k: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    k_fix: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    q: Vec<f32>,
    dout: Vec<f32>,
    p: Vec<f32>,
    /// `P ∘ z` under dropout.
    pz: Vec<f32>,
    drop_keys: Vec<u32>,
    ds: Vec<f32>,
    bias: Vec<f32>,
    seen: Vec<u64>,
}

/// What one task hands back: its `dQ` buffer (`group · L_q × d_pad`) and its key tiles' gradients.
struct ChunkResult {
    dq: Vec<f32>,
    tiles: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

/// Masked attention backward: gradients of `q`, `k`, `v` given the forward's `out` and `lse`
/// and the output gradient `dout` (shaped like q). Same block mask and [`Params`] (scale,
/// bias, dropout) as the forward.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    block: &BlockMask,
    params: &Params,
) -> Result<Grads> {
    let dims = AttnDims::of(q, k, v)?;
    let mut grads = Grads {
        dq: vec![0f32; dims.q_len()],
        dk: vec![0f32; dims.kv_len()],
        dv: vec![0f32; dims.kv_len()],
    };
    let into = GradsMut {
        dq: &mut grads.dq,
        dk: &mut grads.dk,
        dv: &mut grads.dv,
    };
    backward_into(q, k, v, out, lse, dout, block, params, into)?;
    Ok(grads)
}

/// [`backward`] into buffers the caller owns (every value overwritten): for writing straight
/// into another framework's gradient storage, or reusing buffers call after call.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    block: &BlockMask,
    params: &Params,
    grads: GradsMut<'_>,
) -> Result<()> {
    let dims = AttnDims::of(q, k, v)?;
    let GradsMut { dq, dk, dv } = grads;
    AttnDims::check_buffer("dq", dq.len(), dims.q_len(), "B * H_q * L_q * d")?;
    AttnDims::check_buffer("dk", dk.len(), dims.kv_len(), "B * H_kv * L_k * d")?;
    AttnDims::check_buffer("dv", dv.len(), dims.kv_len(), "B * H_kv * L_k * d")?;
    let bias = params.bias.as_ref();
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
    let scale = dims.scale(params.scale)?;

    // D_i = dO_i · O_i, one per query row; and which query tiles hold a non-finite Q or dO
    // value (their products over query rows must skip the pairs the mask hides).
    let (tq, nq) = (block.tile_q(), block.grid().0);
    let mut delta = vec![0f32; batch * q_heads * lq];
    let mut rows_finite = vec![true; batch * q_heads * nq];
    let isa = current_isa();
    delta
        .par_chunks_mut(lq)
        .zip(rows_finite.par_chunks_mut(nq))
        .enumerate()
        .for_each(|(bh, (dl, fin))| {
            let (b, h) = (bh / q_heads, bh % q_heads);
            let (mut o, mut g, mut qr) = (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
            for (i, x) in dl.iter_mut().enumerate() {
                out.load_rows(b, h, i, &mut o);
                dout.load_rows(b, h, i, &mut g);
                q.load_rows(b, h, i, &mut qr);
                *x = dispatch!(isa => dot_in_order(a: &[f32] = &o, b: &[f32] = &g) -> f32);
                fin[i / tq] &= pack::all_finite(&g) & pack::all_finite(&qr);
            }
        });

    let g = Geom {
        d,
        d_pad: pad16(d),
        tk: block.tile_k(),
        tk_pad: pad16(block.tile_k()),
        words: block.words(),
    };
    let ctx = Ctx {
        q,
        k,
        v,
        dout,
        bias,
        dropout: params.dropout,
        block,
        lse,
        delta,
        rows_finite,
        dims,
        scale,
        g,
        #[cfg(target_arch = "x86_64")]
        qs: (T::IS_BF16 && crate::simd::bf16_dot() && exactly_bf16(dout))
            .then(|| query_side(q, dout, block, &g)),
    };
    let group = dims.group();
    let nk = block.grid().1;
    let dq_bytes = group * lq * g.d_pad * 4;
    let chunks = TARGET_TASKS
        .div_ceil(batch * kv_heads)
        .min(CHUNK_DQ_BYTES / dq_bytes.max(1))
        .clamp(1, nk);

    // Key tiles no query sees give no result (`chunk` skips them): their gradients are 0.
    dk.fill(0.0);
    dv.fill(0.0);
    dq.par_chunks_mut(group * lq * d)
        .zip(dk.par_chunks_mut(lk * d))
        .zip(dv.par_chunks_mut(lk * d))
        .enumerate()
        .for_each(|(bhk, ((dq, dk), dv))| {
            let (b, hk) = (bhk / kv_heads, bhk % kv_heads);
            let results: Vec<ChunkResult> = (0..chunks)
                .into_par_iter()
                .map(|c| ctx.chunk(b, hk, c, chunks))
                .collect();
            // dQ = s · Σ_chunks (dS · K), summed in chunk order.
            for (r, dst) in dq.chunks_exact_mut(d).enumerate() {
                let row = r * g.d_pad;
                for (x, o) in dst.iter_mut().enumerate() {
                    let sum = results.iter().fold(0f32, |a, c| a + c.dq[row + x]);
                    *o = scale * sum;
                }
            }
            for (kt, dkt, dvt) in results.iter().flat_map(|c| &c.tiles) {
                let j0 = kt * g.tk;
                let cols = (lk - j0).min(g.tk);
                for c in 0..cols {
                    let src = c * g.d_pad..c * g.d_pad + d;
                    dk[(j0 + c) * d..(j0 + c + 1) * d].copy_from_slice(&dkt[src.clone()]);
                    dv[(j0 + c) * d..(j0 + c + 1) * d].copy_from_slice(&dvt[src]);
                }
            }
        });
    Ok(())
}

impl<T: Element> Ctx<'_, '_, T> {
    /// Key tiles `c, c + chunks, …` of kv head `(b, hk)` (interleaved, so that a causal
    /// mask's work is shared evenly).
    fn chunk(&self, b: usize, hk: usize, c: usize, chunks: usize) -> ChunkResult {
        let g = self.g;
        let (tq, lq, lk) = (self.block.tile_q(), self.dims.lq, self.dims.lk);
        let group = self.dims.group();
        let (nq, nk) = self.block.grid();
        let tile = g.tk_pad * g.d_pad;
        let mut sc = Scratch {
            k: vec![0.0; tile],
            kt: vec![0.0; tile],
            vt: vec![0.0; tile],
            k_fix: vec![0.0; tile],
            dk: vec![0.0; tile],
            dv: vec![0.0; tile],
            q: vec![0.0; tq * g.d_pad],
            dout: vec![0.0; tq * g.d_pad],
            p: vec![0.0; tq * g.tk_pad],
            pz: vec![
                0.0;
                if self.dropout.is_some() {
                    tq * g.tk_pad
                } else {
                    0
                }
            ],
            drop_keys: vec![0; tq],
            ds: vec![0.0; tq * g.tk_pad],
            bias: vec![
                0.0;
                if self.bias.is_some() {
                    tq * g.tk_pad
                } else {
                    0
                }
            ],
            seen: vec![0; g.words],
        };
        let mut dq = vec![0f32; group * lq * g.d_pad];
        let mut tiles = Vec::new();
        #[cfg(target_arch = "x86_64")]
        let mut bf = self
            .qs
            .as_ref()
            .map(|qs| (bf16::KeySide::new(&g), bf16::Work16::new(&g, qs.tq_pad)));
        // Every (query head of the group, query tile) that sees the current key tile.
        let mut pairs: Vec<(usize, usize, Option<&[u64]>)> = Vec::with_capacity(group * nq);
        for kt in (c..nk).step_by(chunks) {
            let j0 = kt * g.tk;
            let cols = (lk - j0).min(g.tk);
            pairs.clear();
            pairs.extend(
                (0..group)
                    .flat_map(|hi| (0..nq).map(move |qt| (hi, qt)))
                    .filter_map(
                        |(hi, qt)| match self.block.tile(b, hk * group + hi, qt, kt) {
                            Tile::Empty => None,
                            Tile::Full => Some((hi, qt, None)),
                            Tile::Partial(bits) => Some((hi, qt, Some(bits))),
                        },
                    ),
            );
            if pairs.is_empty() {
                continue; // no query sees these keys: their gradients stay the caller's zeros
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some(qs), Some((ks, w))) = (&self.qs, &mut bf) {
                pack::kt_pairs(self.k, b, hk, j0, cols, g.tk_pad, g.d_pad, &mut ks.kt);
                pack::kt_pairs(self.v, b, hk, j0, cols, g.tk_pad, g.d_pad, &mut ks.vt);
                ks.k_finite = pack::v_pairs(self.k, b, hk, j0, cols, g.tk_pad, g.d_pad, &mut ks.k);
                ks.dkt.fill(0.0);
                ks.dvt.fill(0.0);
                for &(hi, qt, bits) in &pairs {
                    let i0 = qt * tq;
                    let rows = (lq - i0).min(tq);
                    let dq = &mut dq[(hi * lq + i0) * g.d_pad..];
                    let h = hk * group + hi;
                    self.pair16(qs, ks, w, &mut sc, dq, b, h, qt, rows, j0, cols, bits);
                }
                ks.transpose_into(&g, self.scale, &mut sc.dk, &mut sc.dv);
                tiles.push((kt, sc.dk.clone(), sc.dv.clone()));
                continue;
            }
            pack::rows(self.k, b, hk, j0, cols, g.d_pad, &mut sc.k);
            sc.k[cols * g.d_pad..].fill(0.0);
            pack::transposed(self.k, b, hk, j0, cols, g.tk_pad, g.d_pad, &mut sc.kt);
            pack::transposed(self.v, b, hk, j0, cols, g.tk_pad, g.d_pad, &mut sc.vt);
            let k_finite = pack::all_finite(&sc.k);
            sc.dk.fill(0.0);
            sc.dv.fill(0.0);
            for &(hi, qt, bits) in &pairs {
                let h = hk * group + hi;
                let i0 = qt * tq;
                let rows = (lq - i0).min(tq);
                self.pair(
                    &mut sc,
                    &mut dq[(hi * lq + i0) * g.d_pad..],
                    b,
                    h,
                    i0,
                    rows,
                    j0,
                    cols,
                    bits,
                    k_finite,
                );
            }
            // dK = s · dSᵀ·Q
            sc.dk.iter_mut().for_each(|x| *x *= self.scale);
            tiles.push((kt, sc.dk.clone(), sc.dv.clone()));
        }
        ChunkResult { dq, tiles }
    }

    /// [`Ctx::pair`] on the bf16 dot-product path.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn pair16(
        &self,
        qs: &bf16::QuerySide,
        ks: &mut bf16::KeySide,
        w: &mut bf16::Work16,
        sc: &mut Scratch,
        dq: &mut [f32],
        b: usize,
        h: usize,
        qt: usize,
        rows: usize,
        j0: usize,
        cols: usize,
        bits: Option<&[u64]>,
    ) {
        let g = &self.g;
        let (tq, nq) = (self.block.tile_q(), self.block.grid().0);
        let i0 = qt * tq;
        let tile_bias = self.bias.map(|bs| {
            bs.tile(b, h, i0, rows, j0, cols, g.tk_pad, &mut sc.bias);
            &sc.bias[..]
        });
        let row0 = (b * self.dims.q_heads + h) * self.dims.lq + i0;
        if let Some(dr) = &self.dropout {
            for (r, key) in sc.drop_keys[..rows].iter_mut().enumerate() {
                *key = dr.row_key(b, h, i0 + r, self.dims.q_heads, self.dims.lq);
            }
        }
        let idx = (b * self.dims.q_heads + h) * nq + qt;
        let (n_rows, n_t) = (tq * g.d_pad, g.d_pad * qs.tq_pad);
        let t = bf16::QueryTile {
            rows,
            cols,
            lse: &self.lse[row0..row0 + rows],
            delta: &self.delta[row0..row0 + rows],
            q: &qs.q[idx * n_rows..(idx + 1) * n_rows],
            dout: &qs.dout[idx * n_rows..(idx + 1) * n_rows],
            qt: &qs.qt[idx * n_t..(idx + 1) * n_t],
            doutt: &qs.doutt[idx * n_t..(idx + 1) * n_t],
            tq_pad: qs.tq_pad,
            bits,
            bias: tile_bias,
            drop: self.dropout.map(|dr| DropTile {
                rows: &sc.drop_keys[..rows],
                j0,
                threshold: dr.threshold(),
                scale: dr.keep_scale(),
            }),
            scale: self.scale,
            rows_finite: self.rows_finite[idx],
        };
        // SAFETY: `qs` exists only where `bf16_dot()` found AVX512-BF16; buffers sized by
        // `QuerySide`, `KeySide::new`, `Work16::new` and `Scratch`.
        unsafe { bf16::step(g, &t, ks, w, &mut sc.p, &mut sc.pz, &mut sc.ds, dq) };
    }

    /// One (query tile, key tile) pair: loads the query side, then runs the vector step.
    #[allow(clippy::too_many_arguments)]
    fn pair(
        &self,
        sc: &mut Scratch,
        dq: &mut [f32],
        b: usize,
        h: usize,
        i0: usize,
        rows: usize,
        j0: usize,
        cols: usize,
        bits: Option<&[u64]>,
        k_finite: bool,
    ) {
        let g = &self.g;
        // Q and dO rows are read in place where they are f32 rows of exactly `d_pad`
        // features (every (query tile, key tile) pair reads them: no copy per pair), else
        // copied into padded rows.
        let (q, q_ld) = in_place(self.q.f32_rows(b, h, i0), g).unwrap_or_else(|| {
            pack::rows(self.q, b, h, i0, rows, g.d_pad, &mut sc.q);
            (&sc.q[..], g.d_pad)
        });
        let (dout, dout_ld) = in_place(self.dout.f32_rows(b, h, i0), g).unwrap_or_else(|| {
            pack::rows(self.dout, b, h, i0, rows, g.d_pad, &mut sc.dout);
            (&sc.dout[..], g.d_pad)
        });
        let tile_bias = self.bias.map(|bs| {
            bs.tile(b, h, i0, rows, j0, cols, g.tk_pad, &mut sc.bias);
            &sc.bias[..]
        });
        // As in the forward: keys that no row of this tile sees are zeroed before dS·K, and a
        // non-finite key some rows see and others don't sends dQ down the select path.
        let mut k_tile = &sc.k[..];
        let mut exact = false;
        if let (Some(bits), false) = (bits, k_finite) {
            pack::seen_columns(bits, g.words, rows, &mut sc.seen);
            sc.k_fix.copy_from_slice(&sc.k);
            pack::zero_unseen_rows(&mut sc.k_fix, g.d_pad, cols, &sc.seen);
            exact = !pack::all_finite(&sc.k_fix);
            k_tile = &sc.k_fix;
        }
        let row0 = (b * self.dims.q_heads + h) * self.dims.lq + i0;
        if let Some(dr) = &self.dropout {
            for (r, key) in sc.drop_keys[..rows].iter_mut().enumerate() {
                *key = dr.row_key(b, h, i0 + r, self.dims.q_heads, self.dims.lq);
            }
        }
        let (tq, nq) = (self.block.tile_q(), self.block.grid().0);
        let rows_finite = self.rows_finite[(b * self.dims.q_heads + h) * nq + i0 / tq];
        let isa = current_isa();
        dispatch!(isa => step(
            g: &Geom = g,
            rows: usize = rows,
            cols: usize = cols,
            lse: &[f32] = &self.lse[row0..row0 + rows],
            delta: &[f32] = &self.delta[row0..row0 + rows],
            scale: f32 = self.scale,
            q: &[f32] = q,
            q_ld: usize = q_ld,
            dout: &[f32] = dout,
            dout_ld: usize = dout_ld,
            k: &[f32] = k_tile,
            kt: &[f32] = &sc.kt,
            vt: &[f32] = &sc.vt,
            bits: Option<&[u64]> = bits,
            bias: Option<&[f32]> = tile_bias,
            drop: Option<DropTile> = self.dropout.map(|dr| DropTile {
                rows: &sc.drop_keys[..rows],
                j0,
                threshold: dr.threshold(),
                scale: dr.keep_scale(),
            }),
            exact: bool = exact,
            exact_rows: bool = bits.is_some() && !rows_finite,
            p: &mut [f32] = &mut sc.p,
            pz: &mut [f32] = &mut sc.pz,
            ds: &mut [f32] = &mut sc.ds,
            dk: &mut [f32] = &mut sc.dk,
            dv: &mut [f32] = &mut sc.dv,
            dq: &mut [f32] = dq,
        ));
    }
}

/// Rows read in place when they hold exactly the padded number of features.
fn in_place<'a>(rows: Option<(&'a [f32], usize)>, g: &Geom) -> Option<(&'a [f32], usize)> {
    rows.filter(|_| g.d == g.d_pad)
}

/// Every value of `dout` is exactly a bf16 (so the bf16 products lose nothing on it).
#[cfg(target_arch = "x86_64")]
fn exactly_bf16(dout: &View<f32>) -> bool {
    let [batch, heads, l, d] = dout.shape();
    let mut row = vec![0f32; d];
    (0..batch * heads * l).all(|n| {
        dout.load_rows(n / (heads * l), n / l % heads, n % l, &mut row);
        // NaN is a bf16 too (the products carry it as they should).
        row.iter()
            .all(|&x| x.is_nan() || half::bf16::from_f32(x).to_f32() == x)
    })
}

/// The query-side operands of the bf16 path (see [`bf16::QuerySide`]).
#[cfg(target_arch = "x86_64")]
fn query_side<T: Element>(
    q: &View<T>,
    dout: &View<f32>,
    block: &BlockMask,
    g: &Geom,
) -> bf16::QuerySide {
    let [batch, heads, lq, _] = q.shape();
    let (tq, nq) = (block.tile_q(), block.grid().0);
    let tq_pad = tq.next_multiple_of(2);
    let (n_rows, n_t) = (tq * g.d_pad, g.d_pad * tq_pad);
    let tiles = batch * heads * nq;
    let mut qs = bf16::QuerySide {
        q: vec![0; tiles * n_rows],
        dout: vec![0; tiles * n_rows],
        qt: vec![0; tiles * n_t],
        doutt: vec![0; tiles * n_t],
        tq_pad,
    };
    qs.q.par_chunks_mut(n_rows)
        .zip(qs.dout.par_chunks_mut(n_rows))
        .zip(qs.qt.par_chunks_mut(n_t))
        .zip(qs.doutt.par_chunks_mut(n_t))
        .enumerate()
        .for_each(|(idx, (((qr, dr), qt), dt))| {
            let (bh, t) = (idx / nq, idx % nq);
            let (b, h, i0) = (bh / heads, bh % heads, t * tq);
            let rows = (lq - i0).min(tq);
            pack::rows_bf16(q, b, h, i0, rows, g.d_pad, qr);
            pack::rows_bf16(dout, b, h, i0, rows, g.d_pad, dr);
            pack::transposed_bf16(q, b, h, i0, rows, tq_pad, g.d_pad, qt);
            pack::transposed_bf16(dout, b, h, i0, rows, tq_pad, g.d_pad, dt);
        });
    qs
}

/// `a · b` as one fused multiply-add chain in feature order: the rounding of every entry of
/// the micro-kernel's products. `D_i` computed this way cancels `dP_ij` exactly where the
/// mathematics says it does (a row with one visible key has `dS = 0`, as in the reference).
#[inline(always)]
unsafe fn dot_in_order<S: Simd>(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        // SAFETY: `fma1` is scalar arithmetic on a set `dispatch!` checked.
        .fold(0.0, |acc, (&x, &y)| unsafe { S::fma1(x, y, acc) })
}

/// The five products of one (query tile, key tile) pair. `q` and `dout` rows are `q_ld`
/// and `dout_ld` apart; `dq` receives `dS·K` and `dk` `dSᵀ·Q` (the caller applies `s`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    lse: &[f32],
    delta: &[f32],
    scale: f32,
    q: &[f32],
    q_ld: usize,
    dout: &[f32],
    dout_ld: usize,
    k: &[f32],
    kt: &[f32],
    vt: &[f32],
    bits: Option<&[u64]>,
    bias: Option<&[f32]>,
    drop: Option<DropTile>,
    exact: bool,
    exact_rows: bool,
    p: &mut [f32],
    pz: &mut [f32],
    ds: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dq: &mut [f32],
) {
    let (tk_pad, d_pad, words) = (g.tk_pad, g.d_pad, g.words);
    let rowwise = |ptr: *const f32, ld: usize| Strided { ptr, rs: ld, cs: 1 };
    let colwise = |ptr: *const f32, ld: usize| Strided { ptr, rs: 1, cs: ld };
    // SAFETY: `Scratch` sizes the key tiles (`k`, `kt`, `vt`, `dk`, `dv`) `tk_pad × d_pad`
    // and `p`, `pz`, `ds` `tile_q × tk_pad`; `q`, `dout` hold `rows` rows `q_ld`/`dout_ld`
    // apart (a padded copy, or rows read in place that `View::strided` checked); `dq` holds
    // the tile's `rows × d_pad` (`chunk` sizes it for every query row of the group).
    unsafe {
        // x = Q·Kᵀ (scaled in `ds_rows`)
        gemm::<S>(
            rows,
            tk_pad,
            g.d,
            rowwise(q.as_ptr(), q_ld),
            kt.as_ptr(),
            tk_pad,
            p.as_mut_ptr(),
            tk_pad,
            false,
        );
        // dP = dO·Vᵀ
        gemm::<S>(
            rows,
            tk_pad,
            g.d,
            rowwise(dout.as_ptr(), dout_ld),
            vt.as_ptr(),
            tk_pad,
            ds.as_mut_ptr(),
            tk_pad,
            false,
        );
        ds_rows::<S>(
            g, rows, cols, lse, delta, scale, bits, bias, drop, p, pz, ds,
        );
        // dV += Pᵀ·dO ; dK += dSᵀ·Q
        let pv = if drop.is_some() {
            pz.as_ptr()
        } else {
            p.as_ptr()
        };
        if !exact_rows {
            gemm::<S>(
                cols,
                d_pad,
                rows,
                colwise(pv, tk_pad),
                dout.as_ptr(),
                dout_ld,
                dv.as_mut_ptr(),
                d_pad,
                true,
            );
            gemm::<S>(
                cols,
                d_pad,
                rows,
                colwise(ds.as_ptr(), tk_pad),
                q.as_ptr(),
                q_ld,
                dk.as_mut_ptr(),
                d_pad,
                true,
            );
        } else {
            // A non-finite Q or dO value in a row that some keys must not see: `0 · NaN`
            // would reach those keys' gradients, so the hidden pairs are skipped.
            let vis = |c: usize, r: usize| visible(bits, words, r, c);
            gemm_visible::<S>(
                (cols, d_pad, rows),
                colwise(pv, tk_pad),
                (dout.as_ptr(), dout_ld),
                (dv.as_mut_ptr(), d_pad),
                vis,
            );
            gemm_visible::<S>(
                (cols, d_pad, rows),
                colwise(ds.as_ptr(), tk_pad),
                (q.as_ptr(), q_ld),
                (dk.as_mut_ptr(), d_pad),
                vis,
            );
        }
        // dQ += dS·K
        if !exact {
            gemm::<S>(
                rows,
                d_pad,
                cols,
                rowwise(ds.as_ptr(), tk_pad),
                k.as_ptr(),
                d_pad,
                dq.as_mut_ptr(),
                d_pad,
                true,
            );
        } else {
            gemm_visible::<S>(
                (rows, d_pad, cols),
                rowwise(ds.as_ptr(), tk_pad),
                (k.as_ptr(), d_pad),
                (dq.as_mut_ptr(), d_pad),
                |r, c| visible(bits, words, r, c),
            );
        }
    }
}

/// Turns the product tile `p` (`Q·Kᵀ`, scaled here by `scale`) into `P` and the `dP` tile
/// `ds` into `dS`, row by row:
/// `P = e^(x − LSE)` (0 where hidden or where the row sees nothing), dropout's `z` into
/// `dP` and into `pz = P ∘ z`, and `dS = P ∘ (dP − D)` selected to 0 where hidden (dP may
/// be NaN there).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn ds_rows<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    lse: &[f32],
    delta: &[f32],
    scale: f32,
    bits: Option<&[u64]>,
    bias: Option<&[f32]>,
    drop: Option<DropTile>,
    p: &mut [f32],
    pz: &mut [f32],
    ds: &mut [f32],
) {
    let (tk_pad, words) = (g.tk_pad, g.words);
    // SAFETY: every row slice is `tk_pad` long, a multiple of `W` (`pad16`).
    unsafe {
        for r in 0..rows {
            let pr = &mut p[r * tk_pad..(r + 1) * tk_pad];
            let dsr = &mut ds[r * tk_pad..(r + 1) * tk_pad];
            if lse[r] == f32::NEG_INFINITY {
                pr.fill(0.0);
                dsr.fill(0.0);
                if drop.is_some() {
                    pz[r * tk_pad..(r + 1) * tk_pad].fill(0.0);
                }
                continue;
            }
            let brow = bias.map(|b| &b[r * tk_pad..(r + 1) * tk_pad]);
            mask_row::<S>(pr, scale, brow, bits, words, r, cols);
            if lse[r].is_nan() {
                // The forward met a NaN or +∞ score in this row: P is NaN on every pair
                // the row may see and 0 elsewhere (e^(−∞ − NaN) would be NaN too).
                let (nan, zero) = (S::splat(f32::NAN), S::splat(0.0));
                for c0 in (0..tk_pad).step_by(S::W) {
                    let vis = lane_bits::<S>(bits, words, r, c0, cols);
                    S::store(pr.as_mut_ptr().add(c0), S::select(vis, nan, zero));
                }
            } else {
                exp_row::<S>(pr, lse[r]);
            }
            // Dropout: dP' = z ∘ dP, and dV takes P ∘ z; the z of padding columns is 0.
            if let Some(dt) = drop {
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
                let vis = lane_bits::<S>(bits, words, r, c0, cols);
                S::store(dsr.as_mut_ptr().add(c0), S::select(vis, x, zero));
            }
        }
    }
}
