//! The forward for few queries against many keys (a decode step with a KV cache).
//!
//! The work is memory-bound: every key and value is read once for a handful of queries. So
//! the keys of each (batch row, kv head) are split into chunks, one task each, and a task
//! streams its keys once past *all* query rows of the kv head's group (query heads ×
//! queries), reading an f32 cache in place. Scores are dot products (a key row against each
//! query row, no transposed copy of the keys); the online softmax and `P̃·V` are the tiled
//! forward's. Chunks are merged with the LSE rule of DESIGN.md section 1:
//! `LSE = logaddexp(LSE_a, LSE_b)`, `O = e^(LSE_a−LSE) O_a + e^(LSE_b−LSE) O_b`.
//! The number of chunks depends on the shape only, so results do not depend on threads.

use rayon::prelude::*;

use crate::bias::Bias;
use crate::block::{BlockMask, Tile};
use crate::forward::{softmax_pv, Geom};
use crate::gemm::{gemm, Strided};
use crate::pack::{self, pad16};
use crate::params::{DropTile, Dropout};
use crate::shape::AttnDims;
use crate::simd::{current_isa, dispatch, Simd};
use crate::view::{Element, View};

/// Calls with at most this many queries take the decode path.
pub(crate) const DECODE_MAX_LQ: usize = 4;
/// From this many query rows on, scores come from one product `K · Qᵀ` (every key element
/// broadcast once to all rows) instead of a dot product per (row, key), whose horizontal
/// sums then cost more than the product's idle lanes.
const PRODUCT_MIN_ROWS: usize = 12;
/// Key chunks per (b, kv head) aim for this many tasks in all.
const TARGET_TASKS: usize = 32;

/// Running softmax state of one chunk for every query row of a kv head's group.
struct State {
    m: Vec<f32>,
    l: Vec<f32>,
    /// `rows × d_pad`
    acc: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    bias: Option<&Bias>,
    dropout: Option<&Dropout>,
    block: &BlockMask,
    dims: &AttnDims,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let AttnDims {
        batch,
        kv_heads,
        lq,
        d,
        ..
    } = *dims;
    let group = dims.group();
    let g = Geom {
        d,
        d_pad: pad16(d),
        tk: block.tile_k(),
        tk_pad: pad16(block.tile_k()),
        words: block.words(),
    };
    let nk = block.grid().1;
    let chunks = TARGET_TASKS.div_ceil(batch * kv_heads).clamp(1, nk);
    let per_chunk = nk.div_ceil(chunks);
    out.par_chunks_mut(group * lq * d)
        .zip(lse.par_chunks_mut(group * lq))
        .enumerate()
        .for_each(|(bhk, (out, lse))| {
            let (b, hk) = (bhk / kv_heads, bhk % kv_heads);
            let states: Vec<State> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let tiles = c * per_chunk..((c + 1) * per_chunk).min(nk);
                    let io = Io {
                        q,
                        k,
                        v,
                        bias,
                        dropout,
                        block,
                        dims,
                        g: &g,
                        scale,
                    };
                    chunk(&io, b, hk, tiles)
                })
                .collect();
            merge(&states, &g, out, lse);
        });
}

/// Combines the chunks' states row by row with the LSE rule, in chunk order.
fn merge(states: &[State], g: &Geom, out: &mut [f32], lse: &mut [f32]) {
    for (r, (o, x)) in out.chunks_exact_mut(g.d).zip(lse.iter_mut()).enumerate() {
        let m = states.iter().fold(f32::NEG_INFINITY, |a, s| a.max(s.m[r]));
        o.fill(0.0);
        // A chunk saw something where its sum is not 0 (a NaN sum: it saw a NaN or +∞
        // score, and the row is NaN, see `forward::softmax_rows`).
        let saw = |s: &&State| s.l[r] != 0.0;
        if !states.iter().any(|s| saw(&s)) {
            *x = f32::NEG_INFINITY;
            continue;
        }
        let mut l = 0.0;
        for s in states.iter().filter(saw) {
            let w = (s.m[r] - m).exp();
            l += w * s.l[r];
            for (ov, a) in o.iter_mut().zip(&s.acc[r * g.d_pad..]) {
                *ov += w * a;
            }
        }
        let inv = 1.0 / l;
        o.iter_mut().for_each(|v| *v *= inv);
        *x = m + l.ln();
    }
}

/// Inputs and settings every chunk shares.
struct Io<'a, 'b, T> {
    q: &'a View<'b, T>,
    k: &'a View<'b, T>,
    v: &'a View<'b, T>,
    bias: Option<&'a Bias<'b>>,
    dropout: Option<&'a Dropout>,
    block: &'a BlockMask,
    dims: &'a AttnDims,
    g: &'a Geom,
    scale: f32,
}

/// Streams key tiles `tiles` of kv head `(b, hk)` past every query row of its group.
fn chunk<T: Element>(io: &Io<T>, b: usize, hk: usize, tiles: std::ops::Range<usize>) -> State {
    let Io {
        q,
        k,
        v,
        bias,
        dropout,
        block,
        dims,
        g,
        scale,
    } = *io;
    let (lq, lk, group, tq) = (dims.lq, dims.lk, dims.group(), block.tile_q());
    let rows = group * lq;
    // Row r of the group is query i = r % lq of head hk·group + r / lq.
    let head_row = |r: usize| (hk * group + r / lq, r % lq);
    let mut state = State {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0.0; rows],
        acc: vec![0.0; rows * g.d_pad],
    };
    // Q, a query row per row; and transposed (`d_pad × rows_pad`) for the product form.
    // The scale goes on the products in `softmax_pv`, as in the tiled forward.
    let mut qs = vec![0f32; rows * g.d_pad];
    for (r, dst) in qs.chunks_exact_mut(g.d_pad).enumerate() {
        let (h, i) = head_row(r);
        pack::rows(q, b, h, i, 1, g.d_pad, dst);
    }
    let drop_keys: Vec<u32> = match dropout {
        Some(dr) => (0..rows)
            .map(|r| {
                let (h, i) = head_row(r);
                dr.row_key(b, h, i, dims.q_heads, lq)
            })
            .collect(),
        None => Vec::new(),
    };
    let rows_pad = pad16(rows);
    let product = rows >= PRODUCT_MIN_ROWS;
    let mut qt = vec![0f32; if product { g.d_pad * rows_pad } else { 0 }];
    if product {
        for (r, row) in qs.chunks_exact(g.d_pad).enumerate() {
            for (x, &val) in row.iter().enumerate() {
                qt[x * rows_pad + r] = val;
            }
        }
    }
    let mut st = vec![0f32; if product { g.tk_pad * rows_pad } else { 0 }];
    let tile_len = g.tk_pad * g.d_pad;
    let (mut kbuf, mut vbuf) = (vec![0f32; tile_len], vec![0f32; tile_len]);
    let mut s = vec![0f32; rows * g.tk_pad];
    let mut bits = vec![0u64; rows * g.words];
    let mut bias_tile = vec![0f32; if bias.is_some() { rows * g.tk_pad } else { 0 }];
    let isa = current_isa();
    for kt in tiles {
        let j0 = kt * g.tk;
        let cols = (lk - j0).min(g.tk);
        // The rows' visibility of this key tile, gathered from their block-mask tiles.
        let (mut any, mut all) = (false, true);
        for r in 0..rows {
            let (h, i) = head_row(r);
            let dst = &mut bits[r * g.words..(r + 1) * g.words];
            match block.tile(b, h, i / tq, kt) {
                Tile::Empty => {
                    all = false;
                    dst.fill(0);
                }
                Tile::Full => {
                    any = true;
                    dst.fill(u64::MAX);
                }
                Tile::Partial(tb) => {
                    (any, all) = (true, false);
                    let row = i % tq;
                    dst.copy_from_slice(&tb[row * g.words..(row + 1) * g.words]);
                }
            }
        }
        if !any {
            continue;
        }
        // Where every row sees every key of the tile and the storage is f32, read the cache
        // in place; V then needs whole vectors per row, so d must be a multiple of 16.
        let direct = k
            .f32_rows(b, hk, j0)
            .zip(v.f32_rows(b, hk, j0))
            .filter(|_| all && g.d == g.d_pad);
        let ((k_tile, k_ld), (mut v_tile, v_ld)) = match direct {
            Some(x) => x,
            None => {
                pack::rows(k, b, hk, j0, cols, g.d_pad, &mut kbuf);
                pack::rows(v, b, hk, j0, cols, g.d_pad, &mut vbuf);
                ((&kbuf[..], g.d_pad), (&vbuf[..], g.d_pad))
            }
        };
        // As in the tiled forward: values no row sees are zeroed before they can meet a
        // zero weight; a non-finite value some rows see and others don't takes the select path.
        let mut exact = false;
        if !all && !pack::all_finite(&vbuf[..cols * g.d_pad]) {
            let mut seen = vec![0u64; g.words];
            pack::seen_columns(&bits, g.words, rows, &mut seen);
            pack::zero_unseen_rows(&mut vbuf, g.d_pad, cols, &seen);
            exact = !pack::all_finite(&vbuf[..cols * g.d_pad]);
            v_tile = &vbuf;
        }
        if let Some(bs) = bias {
            for (r, dst) in bias_tile.chunks_exact_mut(g.tk_pad).enumerate() {
                let (h, i) = head_row(r);
                bs.tile(b, h, i, 1, j0, cols, g.tk_pad, dst);
            }
        }
        dispatch!(isa => step(
            g: &Geom = g,
            rows: usize = rows,
            cols: usize = cols,
            q: &[f32] = &qs,
            k: &[f32] = k_tile,
            k_ld: usize = k_ld,
            v: &[f32] = v_tile,
            v_ld: usize = v_ld,
            scale: f32 = scale,
            bits: Option<&[u64]> = (!all).then_some(&bits[..]),
            bias: Option<&[f32]> = bias.map(|_| &bias_tile[..]),
            drop: Option<DropTile> = dropout.map(|dr| DropTile {
                rows: &drop_keys,
                j0,
                threshold: dr.threshold(),
                scale: dr.keep_scale(),
            }),
            exact: bool = exact,
            s: &mut [f32] = &mut s,
            qt: Option<&[f32]> = product.then_some(&qt[..]),
            st: &mut [f32] = &mut st,
            o: &mut [f32] = &mut state.acc,
            m: &mut [f32] = &mut state.m,
            l: &mut [f32] = &mut state.l,
        ));
    }
    state
}

/// One key tile against every query row: products as dot products (a key row is loaded once
/// and met by each query row) or, given `qt`, as the matrix product `K · Qᵀ` into `st`;
/// then the tiled forward's softmax update (which scales them) and `P̃·V`.
///
/// The matrix product sums each `q·k` in the order the backward does, so its `P` is the
/// forward's to the bit; the dot products sum in another order (lanes over features), which
/// is as accurate but not bit-identical — they serve few rows, whose `dV` sums are short.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    q: &[f32],
    k: &[f32],
    k_ld: usize,
    v: &[f32],
    v_ld: usize,
    scale: f32,
    bits: Option<&[u64]>,
    bias: Option<&[f32]>,
    drop: Option<DropTile>,
    exact: bool,
    s: &mut [f32],
    qt: Option<&[f32]>,
    st: &mut [f32],
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let (tk_pad, d_pad) = (g.tk_pad, g.d_pad);
    // SAFETY: `chunk` sizes `q` as `rows × d_pad`, `s` as `rows × tk_pad`, `qt` and `st`
    // for `rows_pad`, and `k` is either a packed tile or an f32 cache read in place, whose
    // `cols` rows `k_ld` apart of `d` features `View::strided` checked (the trait is sealed,
    // so `as_f32` returns the view's own slice).
    unsafe {
        if let Some(qt) = qt {
            let rows_pad = pad16(rows);
            let ka = Strided {
                ptr: k.as_ptr(),
                rs: k_ld,
                cs: 1,
            };
            gemm::<S>(
                cols,
                rows_pad,
                g.d,
                ka,
                qt.as_ptr(),
                rows_pad,
                st.as_mut_ptr(),
                rows_pad,
                false,
            );
            for r in 0..rows {
                for c in 0..cols {
                    *s.get_unchecked_mut(r * tk_pad + c) = *st.get_unchecked(c * rows_pad + r);
                }
            }
            softmax_pv::<S>(
                g, rows, cols, v, v_ld, scale, bits, bias, drop, exact, s, o, m, l,
            );
            return;
        }
        for c in 0..cols {
            let kr = k.as_ptr().add(c * k_ld);
            for r in 0..rows {
                let qr = q.as_ptr().add(r * d_pad);
                let mut acc = S::splat(0.0);
                for x in (0..d_pad).step_by(S::W) {
                    acc = S::fma(S::load(qr.add(x)), S::load(kr.add(x)), acc);
                }
                *s.get_unchecked_mut(r * tk_pad + c) = S::reduce_add(acc);
            }
        }
        softmax_pv::<S>(
            g, rows, cols, v, v_ld, scale, bits, bias, drop, exact, s, o, m, l,
        );
    }
}
