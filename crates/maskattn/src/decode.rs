//! The forward for few queries against many keys (a decode step with a KV cache).
//!
//! The work is memory-bound (every key and value is read once for a handful of queries), so
//! its shape differs from the tiled forward: the keys of each (batch row, kv head) are split
//! into chunks, one task each, and every task keeps *all* query rows of the kv head's group
//! (query heads × queries, up to 16 at a time) in the lanes of one vector while it streams its
//! keys once. Scores come out transposed (`Sᵀ = K · Qᵀ`, a key per vector, a query row per
//! lane), so the online softmax runs lane-wise with no horizontal reductions. Chunks are
//! merged with the LSE rule of DESIGN.md section 1:
//! `LSE = logaddexp(LSE_a, LSE_b)`, `O = e^(LSE_a−LSE) O_a + e^(LSE_b−LSE) O_b`.
//! The number of chunks depends on the shape only, so results do not depend on threads.

use rayon::prelude::*;

use crate::bias::Bias;
use crate::block::{BlockMask, Tile};
use crate::forward::Forward;
use crate::gemm::{gemm, Strided};
use crate::pack::{self, pad16};
use crate::shape::AttnDims;
use crate::simd::{current_isa, dispatch, Simd};
use crate::tile::axpy;
use crate::view::{Element, View};

/// Calls with at most this many queries take the decode path.
pub(crate) const DECODE_MAX_LQ: usize = 4;
/// Query rows per block: the lanes of the score vectors.
const LANES: usize = 16;
/// Key chunks per (b, kv head) aim for this many tasks in all.
const TARGET_TASKS: usize = 32;

/// Running softmax state of one chunk for every query row of a kv head's group.
struct State {
    m: Vec<f32>,
    l: Vec<f32>,
    /// `rows × d_pad`
    acc: Vec<f32>,
}

struct Geom {
    d: usize,
    d_pad: usize,
    tk: usize,
    tk_pad: usize,
    words: usize,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    bias: Option<&Bias>,
    block: &BlockMask,
    dims: &AttnDims,
    scale: f32,
) -> Forward {
    let AttnDims {
        batch,
        q_heads,
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
    let mut out = vec![0f32; batch * q_heads * lq * d];
    let mut lse = vec![0f32; batch * q_heads * lq];
    out.par_chunks_mut(group * lq * d)
        .zip(lse.par_chunks_mut(group * lq))
        .enumerate()
        .for_each(|(bhk, (out, lse))| {
            let (b, hk) = (bhk / kv_heads, bhk % kv_heads);
            let states: Vec<State> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let tiles = c * per_chunk..((c + 1) * per_chunk).min(nk);
                    chunk(q, k, v, bias, block, dims, &g, scale, b, hk, tiles)
                })
                .collect();
            merge(&states, &g, out, lse);
        });
    Forward { out, lse }
}

/// Combines the chunks' states row by row with the LSE rule, in chunk order.
fn merge(states: &[State], g: &Geom, out: &mut [f32], lse: &mut [f32]) {
    for (r, (o, x)) in out.chunks_exact_mut(g.d).zip(lse.iter_mut()).enumerate() {
        let m = states.iter().fold(f32::NEG_INFINITY, |a, s| a.max(s.m[r]));
        if m == f32::NEG_INFINITY {
            o.fill(0.0);
            *x = f32::NEG_INFINITY;
            continue;
        }
        o.fill(0.0);
        let mut l = 0.0;
        for s in states.iter().filter(|s| s.m[r] != f32::NEG_INFINITY) {
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

/// Streams key tiles `tiles` of kv head `(b, hk)` past every query row of its group.
#[allow(clippy::too_many_arguments)]
fn chunk<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    bias: Option<&Bias>,
    block: &BlockMask,
    dims: &AttnDims,
    g: &Geom,
    scale: f32,
    b: usize,
    hk: usize,
    tiles: std::ops::Range<usize>,
) -> State {
    let (lq, lk, group) = (dims.lq, dims.lk, dims.group());
    let rows = group * lq;
    let blocks = rows.div_ceil(LANES);
    // Row r of the group is query i = r % lq of head hk·group + r / lq.
    let head_row = |r: usize| (hk * group + r / lq, r % lq);
    let mut st = State {
        m: vec![f32::NEG_INFINITY; blocks * LANES],
        l: vec![0.0; blocks * LANES],
        acc: vec![0.0; blocks * LANES * g.d_pad],
    };
    // Qᵀ per block of rows, scaled: `d_pad × LANES`, a query row per column.
    let mut qt = vec![0f32; blocks * g.d_pad * LANES];
    let mut row = vec![0f32; g.d_pad];
    for r in 0..rows {
        let (h, i) = head_row(r);
        pack::rows(q, b, h, i, 1, g.d_pad, scale, &mut row);
        let (blk, lane) = (r / LANES, r % LANES);
        for (x, &val) in row.iter().enumerate() {
            qt[(blk * g.d_pad + x) * LANES + lane] = val;
        }
    }
    let tile_len = g.tk_pad * g.d_pad;
    let (mut kbuf, mut vbuf, mut vfix) = (
        vec![0f32; tile_len],
        vec![0f32; tile_len],
        vec![0f32; tile_len],
    );
    let mut s = vec![0f32; g.tk_pad * LANES];
    let mut lanes = vec![0u32; g.tk_pad];
    let isa = current_isa();
    for kt in tiles {
        let j0 = kt * g.tk;
        let cols = (lk - j0).min(g.tk);
        let mut loaded = false;
        for blk in 0..blocks {
            let brows = (rows - blk * LANES).min(LANES);
            // Visibility per key as a lane mask over this block's rows.
            lanes[..cols].fill(0);
            let mut any = false;
            let mut all = true;
            for lane in 0..brows {
                let (h, i) = head_row(blk * LANES + lane);
                match block.tile(b, h, i / block.tile_q(), kt) {
                    Tile::Empty => all = false,
                    Tile::Full => {
                        any = true;
                        lanes[..cols].iter_mut().for_each(|m| *m |= 1 << lane);
                    }
                    Tile::Partial(bits) => {
                        any = true;
                        all = false;
                        let r = i % block.tile_q();
                        for (c, m) in lanes[..cols].iter_mut().enumerate() {
                            *m |= ((bits[r * g.words + c / 64] >> (c % 64) & 1) as u32) << lane;
                        }
                    }
                }
            }
            if !any {
                continue;
            }
            if !loaded {
                pack::rows(k, b, hk, j0, cols, g.d_pad, 1.0, &mut kbuf);
                pack::rows(v, b, hk, j0, cols, g.d_pad, 1.0, &mut vbuf);
                loaded = true;
            }
            // A value that no row of this block sees must not meet a zero weight (0 · NaN);
            // one that some rows see and others don't sends the block down the select path.
            let mut v_tile = &vbuf[..];
            let mut exact = false;
            if !all && !pack::all_finite(&vbuf[..cols * g.d_pad]) {
                vfix.copy_from_slice(&vbuf);
                for (c, &m) in lanes[..cols].iter().enumerate() {
                    if m == 0 {
                        vfix[c * g.d_pad..(c + 1) * g.d_pad].fill(0.0);
                    }
                }
                exact = !pack::all_finite(&vfix[..cols * g.d_pad]);
                v_tile = &vfix;
            }
            let full_lanes = if all { (1u32 << brows) - 1 } else { 0 };
            let bias_at = |lane: usize, c: usize| {
                bias.map_or(0.0, |bs| {
                    let (h, i) = head_row(blk * LANES + lane);
                    bs.get(b, h, i, j0 + c)
                })
            };
            let sl = blk * LANES;
            dispatch!(isa => step(
                g: &Geom = g,
                cols: usize = cols,
                brows: usize = brows,
                qt: &[f32] = &qt[blk * g.d_pad * LANES..(blk + 1) * g.d_pad * LANES],
                k: &[f32] = &kbuf,
                v: &[f32] = v_tile,
                lanes: &[u32] = &lanes[..cols],
                full_lanes: u32 = full_lanes,
                bias: Option<&dyn Fn(usize, usize) -> f32> = bias.map(|_| &bias_at as &dyn Fn(usize, usize) -> f32),
                exact: bool = exact,
                s: &mut [f32] = &mut s,
                m: &mut [f32] = &mut st.m[sl..sl + LANES],
                l: &mut [f32] = &mut st.l[sl..sl + LANES],
                acc: &mut [f32] = &mut st.acc[sl * g.d_pad..(sl + LANES) * g.d_pad],
            ));
        }
    }
    st.m.truncate(rows);
    st.l.truncate(rows);
    st
}

/// One key tile against one block of query rows (rows in lanes).
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn step<S: Simd>(
    g: &Geom,
    cols: usize,
    brows: usize,
    qt: &[f32],
    k: &[f32],
    v: &[f32],
    lanes: &[u32],
    full_lanes: u32,
    bias: Option<&dyn Fn(usize, usize) -> f32>,
    exact: bool,
    s: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
) {
    let d_pad = g.d_pad;
    let nv = LANES / S::W;
    let ninf = unsafe { S::splat(f32::NEG_INFINITY) };
    unsafe {
        // Sᵀ = K · (s·Q)ᵀ: a key per row of `s`, a query row per lane.
        let ka = Strided {
            ptr: k.as_ptr(),
            rs: d_pad,
            cs: 1,
        };
        gemm::<S>(
            cols,
            LANES,
            g.d,
            ka,
            qt.as_ptr(),
            LANES,
            s.as_mut_ptr(),
            LANES,
            false,
        );
        if let Some(bias) = bias {
            for c in 0..cols {
                for lane in 0..brows {
                    s[c * LANES + lane] += bias(lane, c);
                }
            }
        }
        // Hidden pairs (and unused lanes) to −∞, then the tile's max per lane.
        let mut mt = [ninf; 4];
        for (c, &vis) in lanes.iter().enumerate() {
            for (h, mtv) in mt.iter_mut().enumerate().take(nv) {
                let p = s.as_mut_ptr().add(c * LANES + h * S::W);
                let mut x = S::load(p);
                if vis != full_lanes || full_lanes == 0 {
                    let bits = (vis >> (h * S::W)) & ((1u32 << S::W) - 1);
                    x = S::select(bits, x, ninf);
                    S::store(p, x);
                }
                *mtv = S::max(*mtv, x);
            }
        }
        // m_new = max(m, m_tile); rows that have seen nothing use 0 so that e^(−∞ − 0) = 0.
        let mut alpha = [0f32; LANES];
        let mut m_safe = [ninf; 4];
        for h in 0..nv {
            let mp = m.as_mut_ptr().add(h * S::W);
            let m_old = S::load(mp);
            let m_new = S::max(m_old, mt[h]);
            m_safe[h] = S::select(S::ninf_bits(m_new), S::splat(0.0), m_new);
            S::store(
                alpha.as_mut_ptr().add(h * S::W),
                S::exp(S::sub(m_old, m_safe[h])),
            );
            S::store(mp, m_new);
        }
        // P̃ = e^(x − m_new), summed per lane.
        let mut sum = [S::splat(0.0); 4];
        for c in 0..cols {
            for h in 0..nv {
                let p = s.as_mut_ptr().add(c * LANES + h * S::W);
                let e = S::exp(S::sub(S::load(p), m_safe[h]));
                S::store(p, e);
                sum[h] = S::add(sum[h], e);
            }
        }
        for h in 0..nv {
            let lp = l.as_mut_ptr().add(h * S::W);
            let av = S::load(alpha.as_ptr().add(h * S::W));
            S::store(lp, S::fma(S::load(lp), av, sum[h]));
        }
        for (r, &a) in alpha.iter().enumerate().take(brows) {
            if a != 1.0 {
                crate::tile::scale::<S>(a, &mut acc[r * d_pad..(r + 1) * d_pad]);
            }
        }
        // acc += P̃ · V, P̃ read transposed out of `s`.
        if !exact {
            let pa = Strided {
                ptr: s.as_ptr(),
                rs: 1,
                cs: LANES,
            };
            gemm::<S>(
                brows,
                d_pad,
                cols,
                pa,
                v.as_ptr(),
                d_pad,
                acc.as_mut_ptr(),
                d_pad,
                true,
            );
        } else {
            for r in 0..brows {
                for (c, &vis) in lanes.iter().enumerate() {
                    if vis >> r & 1 == 1 {
                        axpy::<S>(
                            s[c * LANES + r],
                            &v[c * d_pad..(c + 1) * d_pad],
                            &mut acc[r * d_pad..(r + 1) * d_pad],
                        );
                    }
                }
            }
        }
    }
}
