//! The forward kernel: online softmax ("flash") over the non-empty key tiles of each query
//! tile. Extra memory: the packed keys and values of the kv heads being worked on (O(L_k·d))
//! and a few tiles per thread — never `L_q × L_k`.

use rayon::prelude::*;

use crate::bias::Bias;
use crate::block::{BlockMask, Tile};
use crate::error::{AttnError, Result};
use crate::gemm::{gemm, gemm_visible, Strided};
use crate::pack::{self, pad16};
use crate::params::{keep_hash, DropTile, Dropout, Params};
use crate::shape::AttnDims;
use crate::simd::{current_isa, dispatch, Simd};
use crate::tile::{exp_row, mask_row, scale as scale_row, visible};
use crate::view::{Element, View};

/// `out [B, H_q, L_q, d]` and `lse [B, H_q, L_q]` (−∞ where a row allows nothing).
#[derive(Clone, Debug)]
pub struct Forward {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Keys and values of one `(b, kv head)`, packed once for every query tile that reads them:
/// `Kᵀ` per key tile (`d_pad × tk_pad`) and `V` rows (`tk_pad × d_pad` per tile).
/// On the bf16 dot-product path, `kp` and `vp` hold the same tiles as bf16 pairs instead
/// (see `simd::bf16dot`) and `kt`, `v` stay empty.
struct PackedKv {
    kt: Vec<f32>,
    v: Vec<f32>,
    kp: Vec<u32>,
    vp: Vec<u32>,
    v_finite: Vec<bool>,
}

/// Per-thread scratch for one query tile.
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    bias: Vec<f32>,
    v_fix: Vec<f32>,
    seen: Vec<u64>,
    drop_keys: Vec<u32>,
    /// bf16 path: Q rows and `P̃` rounded to bf16.
    q16: Vec<u16>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    p16: Vec<u16>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vp_fix: Vec<u32>,
}

/// What every query tile of one (b, kv head) shares.
struct TileCtx<'a, 'b, T> {
    q: &'a View<'b, T>,
    kv: &'a PackedKv,
    bias: Option<&'a Bias<'b>>,
    dropout: Option<&'a Dropout>,
    block: &'a BlockMask,
    g: &'a Geom,
    scale: f32,
    /// bf16 storage on a CPU with bf16 dot products.
    dot: bool,
}

/// Sizes every step needs.
#[derive(Clone, Copy)]
pub(crate) struct Geom {
    pub d: usize,
    pub d_pad: usize,
    pub tk: usize,
    pub tk_pad: usize,
    pub words: usize,
}

/// Masked attention forward. `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]` (any strides),
/// `block` compiled for `(B, H_q, L_q, L_k)`; see [`Params`] for scale, bias and dropout.
///
/// Non-finite values follow IEEE arithmetic on the pairs the mask allows, and only on
/// those (the f64 [`reference`](crate::reference) is the definition):
/// - a row that may attend to nothing has output 0 and LSE −∞ (and zero gradients), whatever
///   its query, keys and values hold;
/// - NaN or ±∞ where the mask hides it (keys or values no allowed pair reads) changes
///   nothing, bit for bit;
/// - a row whose allowed scores include NaN or +∞ has NaN output and NaN LSE (an allowed
///   score of −∞ is a weight of 0); a NaN or ±∞ value reaches the outputs of the rows that
///   may see it, in its own feature; in the backward a non-finite `dO`, `Q`, `K` or `V`
///   value reaches the gradients the formulas of DESIGN.md section 1 carry it to over
///   allowed pairs (`0 · NaN` included), and no gradient of a pair the mask hides.
pub fn forward<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    block: &BlockMask,
    params: &Params,
) -> Result<Forward> {
    let dims = AttnDims::of(q, k, v)?;
    let mut out = vec![0f32; dims.q_len()];
    let mut lse = vec![0f32; dims.batch * dims.q_heads * dims.lq];
    forward_into(q, k, v, block, params, &mut out, &mut lse)?;
    Ok(Forward { out, lse })
}

/// [`forward`] into buffers the caller owns: `out` `[B, H_q, L_q, d]` and `lse`
/// `[B, H_q, L_q]`, contiguous, every value overwritten. For writing straight into another
/// framework's tensor storage, or reusing the same buffers call after call.
pub fn forward_into<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    block: &BlockMask,
    params: &Params,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let dims = AttnDims::of(q, k, v)?;
    let rows = dims.batch * dims.q_heads * dims.lq;
    AttnDims::check_buffer("out", out.len(), dims.q_len(), "B * H_q * L_q * d")?;
    if lse.len() != rows {
        return Err(AttnError::LseLength {
            got: lse.len(),
            expected: rows,
        });
    }
    let bias = params.bias.as_ref();
    dims.check_bias(bias)?;
    block.check_shape(dims.mask_shape())?;
    let scale = dims.scale(params.scale)?;
    let dropout = params.dropout.as_ref();
    let AttnDims { lq, lk, d, .. } = dims;
    if lq <= crate::decode::DECODE_MAX_LQ {
        crate::decode::forward(q, k, v, bias, dropout, block, &dims, scale, out, lse);
        return Ok(());
    }
    let (tq, tk) = (block.tile_q(), block.tile_k());
    let g = Geom {
        d,
        d_pad: pad16(d),
        tk,
        tk_pad: pad16(tk),
        words: block.words(),
    };
    let nk = block.grid().1;
    let group = dims.group();
    let dot = T::IS_BF16 && crate::simd::bf16_dot();
    // Outer tasks: one (b, kv head) each, owning the outputs of the query heads it serves.
    out.par_chunks_mut(group * lq * d)
        .zip(lse.par_chunks_mut(group * lq))
        .enumerate()
        .for_each(|(bhk, (out, lse))| {
            let (b, hk) = (bhk / dims.kv_heads, bhk % dims.kv_heads);
            let kv = pack_kv(k, v, b, hk, lk, nk, &g, dot);
            // Inner tasks: one (query head of the group, query tile) each.
            out.par_chunks_mut(lq * d)
                .zip(lse.par_chunks_mut(lq))
                .enumerate()
                .flat_map(|(hi, (o, l))| {
                    o.par_chunks_mut(tq * d)
                        .zip(l.par_chunks_mut(tq))
                        .enumerate()
                        .map(move |(qt, (o, l))| (hk * group + hi, qt, o, l))
                })
                .for_each_init(
                    || Scratch {
                        q: vec![0.0; tq * g.d_pad],
                        s: vec![0.0; tq * g.tk_pad],
                        o: vec![0.0; tq * g.d_pad],
                        m: vec![0.0; tq],
                        l: vec![0.0; tq],
                        bias: vec![0.0; if bias.is_some() { tq * g.tk_pad } else { 0 }],
                        v_fix: vec![0.0; g.tk_pad * g.d_pad],
                        seen: vec![0; g.words],
                        drop_keys: vec![0; tq],
                        q16: vec![0; if dot { tq * g.d_pad } else { 0 }],
                        p16: vec![0; if dot { tq * g.tk_pad } else { 0 }],
                        vp_fix: vec![0; if dot { g.tk_pad * g.d_pad / 2 } else { 0 }],
                    },
                    |sc, (h, qt, o, l)| {
                        let ctx = TileCtx {
                            q,
                            kv: &kv,
                            bias,
                            dropout,
                            block,
                            g: &g,
                            scale,
                            dot,
                        };
                        query_tile(&ctx, b, h, qt, o, l, sc)
                    },
                );
        });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pack_kv<T: Element>(
    k: &View<T>,
    v: &View<T>,
    b: usize,
    hk: usize,
    lk: usize,
    nk: usize,
    g: &Geom,
    dot: bool,
) -> PackedKv {
    let (kt_len, v_len) = (g.d_pad * g.tk_pad, g.tk_pad * g.d_pad);
    if dot {
        let (kp_len, vp_len) = (kt_len / 2, v_len / 2);
        let mut kv = PackedKv {
            kt: Vec::new(),
            v: Vec::new(),
            kp: vec![0; nk * kp_len],
            vp: vec![0; nk * vp_len],
            v_finite: vec![true; nk],
        };
        for t in 0..nk {
            let (j0, cols) = (t * g.tk, (lk - t * g.tk).min(g.tk));
            let kp = &mut kv.kp[t * kp_len..(t + 1) * kp_len];
            pack::kt_pairs(k, b, hk, j0, cols, g.tk_pad, g.d_pad, kp);
            let vp = &mut kv.vp[t * vp_len..(t + 1) * vp_len];
            kv.v_finite[t] = pack::v_pairs(v, b, hk, j0, cols, g.tk_pad, g.d_pad, vp);
        }
        return kv;
    }
    let mut kv = PackedKv {
        kt: vec![0.0; nk * kt_len],
        v: vec![0.0; nk * v_len],
        kp: Vec::new(),
        vp: Vec::new(),
        v_finite: vec![true; nk],
    };
    for t in 0..nk {
        let (j0, cols) = (t * g.tk, (lk - t * g.tk).min(g.tk));
        pack::transposed(
            k,
            b,
            hk,
            j0,
            cols,
            g.tk_pad,
            g.d_pad,
            &mut kv.kt[t * kt_len..],
        );
        let vt = &mut kv.v[t * v_len..(t + 1) * v_len];
        pack::rows(v, b, hk, j0, cols, g.d_pad, vt);
        kv.v_finite[t] = pack::all_finite(vt);
    }
    kv
}

/// One query tile: rows `qt·tile_q ..` of head `(b, h)`; `out` is `rows × d`, `lse` `rows`.
fn query_tile<T: Element>(
    ctx: &TileCtx<T>,
    b: usize,
    h: usize,
    qt: usize,
    out: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    let TileCtx {
        q,
        kv,
        bias,
        dropout,
        block,
        g,
        scale,
        dot,
    } = *ctx;
    let rows = lse.len();
    let i0 = qt * block.tile_q();
    let lk = block.shape().lk;
    if dot {
        // bf16 rows as they are; the scale is applied to the f32 scores.
        pack::rows_bf16(q, b, h, i0, rows, g.d_pad, &mut sc.q16);
    } else {
        // The scale goes on the products, in `mask_row`, as in the backward.
        pack::rows(q, b, h, i0, rows, g.d_pad, &mut sc.q);
    }
    let shape = block.shape();
    if let Some(dr) = dropout {
        for (r, key) in sc.drop_keys[..rows].iter_mut().enumerate() {
            *key = dr.row_key(b, h, i0 + r, shape.heads, shape.lq);
        }
    }
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    sc.o[..rows * g.d_pad].fill(0.0); // Σ_j e^(x_ij − m_i) v_j, rescaled as m_i grows

    for kt in 0..block.grid().1 {
        let bits = match block.tile(b, h, qt, kt) {
            Tile::Empty => continue,
            Tile::Full => None,
            Tile::Partial(bits) => Some(bits),
        };
        let j0 = kt * g.tk;
        let cols = (lk - j0).min(g.tk);
        let tile_bias = bias.map(|bs| {
            bs.tile(b, h, i0, rows, j0, cols, g.tk_pad, &mut sc.bias);
            &sc.bias[..]
        });
        let drop = dropout.map(|dr| DropTile {
            rows: &sc.drop_keys[..rows],
            j0,
            threshold: dr.threshold(),
            scale: dr.keep_scale(),
        });
        #[cfg(target_arch = "x86_64")]
        if dot {
            let (kp_len, vp_len) = (g.d_pad * g.tk_pad / 2, g.tk_pad * g.d_pad / 2);
            let t = BfTile {
                rows,
                cols,
                bits,
                bias: tile_bias,
                drop,
                scale,
                kp: &kv.kp[kt * kp_len..(kt + 1) * kp_len],
                vp: &kv.vp[kt * vp_len..(kt + 1) * vp_len],
                v_finite: kv.v_finite[kt],
            };
            let w = BfWork {
                q16: &sc.q16,
                p16: &mut sc.p16,
                vp_fix: &mut sc.vp_fix,
                v_fix: &mut sc.v_fix,
                seen: &mut sc.seen,
                s: &mut sc.s,
                o: &mut sc.o,
                m: &mut sc.m,
                l: &mut sc.l,
            };
            // SAFETY: `dot` is only set where `bf16dot::enabled()` said the CPU has AVX512-BF16.
            unsafe { step_bf16(g, &t, w) };
            continue;
        }
        let v_len = g.tk_pad * g.d_pad;
        let mut v_tile = &kv.v[kt * v_len..(kt + 1) * v_len];
        // Non-finite values in keys no row of this tile sees must not meet a zero weight in
        // the product (0 · NaN = NaN): zero those rows; if a non-finite value remains in a
        // key some rows see and others don't, take the per-element (select) path.
        let mut exact = false;
        if let (Some(bits), false) = (bits, kv.v_finite[kt]) {
            pack::seen_columns(bits, g.words, rows, &mut sc.seen);
            sc.v_fix.copy_from_slice(v_tile);
            pack::zero_unseen_rows(&mut sc.v_fix, g.d_pad, cols, &sc.seen);
            exact = !pack::all_finite(&sc.v_fix);
            v_tile = &sc.v_fix;
        }
        let kt_tile = &kv.kt[kt * g.d_pad * g.tk_pad..(kt + 1) * g.d_pad * g.tk_pad];
        let isa = current_isa();
        dispatch!(isa => step(
            g: &Geom = g,
            rows: usize = rows,
            cols: usize = cols,
            q: &[f32] = &sc.q,
            kt: &[f32] = kt_tile,
            v: &[f32] = v_tile,
            scale: f32 = scale,
            bits: Option<&[u64]> = bits,
            bias: Option<&[f32]> = tile_bias,
            drop: Option<DropTile> = drop,
            exact: bool = exact,
            s: &mut [f32] = &mut sc.s,
            o: &mut [f32] = &mut sc.o,
            m: &mut [f32] = &mut sc.m,
            l: &mut [f32] = &mut sc.l,
        ));
    }

    // O_i = acc_i / l_i, LSE_i = m_i + ln l_i; a row that saw nothing (l = 0) keeps O = 0,
    // LSE = −∞. A NaN or +∞ score made l NaN: O and LSE are NaN.
    for r in 0..rows {
        let dst = &mut out[r * g.d..(r + 1) * g.d];
        if sc.l[r] != 0.0 {
            let inv = 1.0 / sc.l[r];
            for (o, a) in dst.iter_mut().zip(&sc.o[r * g.d_pad..]) {
                *o = a * inv;
            }
            lse[r] = sc.m[r] + sc.l[r].ln();
        } else {
            dst.fill(0.0);
            lse[r] = f32::NEG_INFINITY;
        }
    }
}

/// One (query tile, key tile) step of the online softmax.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    scale: f32,
    bits: Option<&[u64]>,
    bias: Option<&[f32]>,
    drop: Option<DropTile>,
    exact: bool,
    s: &mut [f32],
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let (tk_pad, d_pad) = (g.tk_pad, g.d_pad);
    // SAFETY: `Scratch` sizes `q`, `o` as `tile_q × d_pad` and `s` as `tile_q × tk_pad`
    // (`rows ≤ tile_q`); `pack_kv` sizes the `Kᵀ` tile `d_pad × tk_pad` and the V tile
    // `tk_pad × d_pad`; `tk_pad`, `d_pad` are multiples of 16 (`pad16`).
    unsafe {
        // Q·Kᵀ over the real features (the padding is zero); scaled in `mask_row`.
        let qa = Strided {
            ptr: q.as_ptr(),
            rs: d_pad,
            cs: 1,
        };
        gemm::<S>(
            rows,
            tk_pad,
            g.d,
            qa,
            kt.as_ptr(),
            tk_pad,
            s.as_mut_ptr(),
            tk_pad,
            false,
        );
        softmax_pv::<S>(
            g, rows, cols, v, d_pad, scale, bits, bias, drop, exact, s, o, m, l,
        );
    }
}

/// One key tile for [`step_bf16`].
#[cfg(target_arch = "x86_64")]
struct BfTile<'a> {
    rows: usize,
    cols: usize,
    bits: Option<&'a [u64]>,
    bias: Option<&'a [f32]>,
    drop: Option<DropTile<'a>>,
    scale: f32,
    kp: &'a [u32],
    vp: &'a [u32],
    v_finite: bool,
}

/// The scratch [`step_bf16`] writes.
#[cfg(target_arch = "x86_64")]
struct BfWork<'a> {
    q16: &'a [u16],
    p16: &'a mut [u16],
    vp_fix: &'a mut [u32],
    v_fix: &'a mut [f32],
    seen: &'a mut [u64],
    s: &'a mut [f32],
    o: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
}

/// [`step`] for bf16 storage on AVX512-BF16: both products on bf16 pairs (see
/// `simd::bf16dot`), the softmax in f32 as everywhere else.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `sc` was sized for the bf16 path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx2,fma")]
unsafe fn step_bf16(g: &Geom, t: &BfTile, sc: BfWork) {
    use crate::simd::{bf16dot, Avx512};
    let (rows, cols, tk_pad, d_pad) = (t.rows, t.cols, g.tk_pad, g.d_pad);
    let BfWork {
        q16,
        p16,
        vp_fix,
        v_fix,
        seen,
        s,
        o,
        m,
        l,
    } = sc;
    // SAFETY: as in `step`, with the bf16 buffers (`q16`, `p16`, `vp_fix`, the pair tiles)
    // sized for the bf16 path in `forward_into` and `pack_kv`; AVX512-BF16 is this
    // function's contract.
    unsafe {
        // Q · Kᵀ, scaled in `softmax_rows` as on every path
        bf16dot::gemm(
            rows,
            tk_pad,
            d_pad / 2,
            q16.as_ptr().cast(),
            d_pad / 2,
            t.kp.as_ptr(),
            tk_pad,
            s.as_mut_ptr(),
            tk_pad,
            false,
        );

        softmax_rows::<Avx512>(g, rows, cols, t.scale, t.bits, t.bias, t.drop, s, o, m, l);
        // As on the f32 path: values no row of the tile sees are zeroed before the product
        // (0 · NaN = NaN); one that is non-finite and seen by some rows only sends the tile
        // down the per-element path, on the exact f32 values.
        let mut vp = t.vp;
        if let (false, Some(bits)) = (t.v_finite, t.bits) {
            pack::seen_columns(bits, g.words, rows, seen);
            vp_fix.copy_from_slice(t.vp);
            pack::zero_unseen_pairs(vp_fix, d_pad, cols, seen);
            if !pack::pairs_finite(vp_fix) {
                pack::v_from_pairs(vp_fix, tk_pad, d_pad, v_fix);
                pv::<Avx512>(g, rows, cols, v_fix, d_pad, t.bits, true, s, o);
                return;
            }
            vp = vp_fix;
        }
        // acc += bf16(P̃) · V; P̃ past `cols` is 0 and so are the padding keys of V.
        bf16dot::round_rows(s, rows, tk_pad, tk_pad, p16);
        bf16dot::gemm(
            rows,
            d_pad,
            cols.div_ceil(2),
            p16.as_ptr().cast(),
            tk_pad / 2,
            vp.as_ptr(),
            d_pad,
            o.as_mut_ptr(),
            d_pad,
            true,
        );
    }
}

/// The online-softmax update of one tile of products `s` (`rows × tk_pad`, `q·k` before
/// `scale` and bias) and the product `acc += P̃ · V` (`v` rows `v_ld` apart). Shared with the decode path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn softmax_pv<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    v: &[f32],
    v_ld: usize,
    scale: f32,
    bits: Option<&[u64]>,
    bias: Option<&[f32]>,
    drop: Option<DropTile>,
    exact: bool,
    s: &mut [f32],
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    // SAFETY: the callers' buffers are sized as `step` documents.
    unsafe {
        softmax_rows::<S>(g, rows, cols, scale, bits, bias, drop, s, o, m, l);
        pv::<S>(g, rows, cols, v, v_ld, bits, exact, s, o);
    }
}

/// The online-softmax update: `s` becomes `P̃` (zero where hidden and past `cols`), `m` and
/// `l` move to the new maximum and `o` is rescaled to it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_rows<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    scale: f32,
    bits: Option<&[u64]>,
    bias: Option<&[f32]>,
    drop: Option<DropTile>,
    s: &mut [f32],
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let (tk_pad, d_pad) = (g.tk_pad, g.d_pad);
    // SAFETY: each row slice is `tk_pad` long (a multiple of `W`), as are the bias rows;
    // `o` rows are `d_pad` long: what `mask_row`, `exp_row` and `scale` require.
    unsafe {
        for r in 0..rows {
            let x = &mut s[r * tk_pad..(r + 1) * tk_pad];
            let brow = bias.map(|b| &b[r * tk_pad..(r + 1) * tk_pad]);
            let m_tile = mask_row::<S>(x, scale, brow, bits, g.words, r, cols);
            let m_new = m[r].max(m_tile);
            if m_new == f32::NEG_INFINITY {
                // Nothing visible yet, or only NaN scores (the maxima skip NaN): a NaN
                // marks the row's sum, which stays NaN, so the row ends NaN, not empty.
                if x.iter().any(|v| v.is_nan()) {
                    l[r] = f32::NAN;
                }
                x.fill(0.0); // P̃ = 0, and no −∞ − −∞
                continue;
            }
            // P̃_ij = e^(x_ij − m_new); rescale what was summed under the old max.
            let alpha = (m[r] - m_new).exp();
            let sum = exp_row::<S>(x, m_new);
            l[r] = l[r] * alpha + sum;
            if alpha != 1.0 {
                scale_row::<S>(alpha, &mut o[r * d_pad..(r + 1) * d_pad]);
            }
            m[r] = m_new;
            // Dropout weights the values, not the normaliser: l keeps the undropped sum.
            if let Some(dt) = drop {
                let key = dt.rows[r];
                for (c, xv) in x[..cols].iter_mut().enumerate() {
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

/// `acc += P̃ · V` in f32; `exact` takes the per-element path that never multiplies a
/// hidden key's value (it may be non-finite) by its zero weight.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<S: Simd>(
    g: &Geom,
    rows: usize,
    cols: usize,
    v: &[f32],
    v_ld: usize,
    bits: Option<&[u64]>,
    exact: bool,
    s: &[f32],
    o: &mut [f32],
) {
    let (tk_pad, d_pad) = (g.tk_pad, g.d_pad);
    // SAFETY: `s` is `rows × tk_pad`, `o` `rows × d_pad`, `v` holds `cols` rows `v_ld`
    // apart of at least `d_pad` values (the callers' tiles, or a cache row of exactly `d`
    // when `d == d_pad`, checked by `View::strided`).
    unsafe {
        if !exact {
            let pa = Strided {
                ptr: s.as_ptr(),
                rs: tk_pad,
                cs: 1,
            };
            gemm::<S>(
                rows,
                d_pad,
                cols,
                pa,
                v.as_ptr(),
                v_ld,
                o.as_mut_ptr(),
                d_pad,
                true,
            );
        } else {
            let pa = Strided {
                ptr: s.as_ptr(),
                rs: tk_pad,
                cs: 1,
            };
            gemm_visible::<S>(
                (rows, d_pad, cols),
                pa,
                (v.as_ptr(), v_ld),
                (o.as_mut_ptr(), d_pad),
                |r, c| visible(bits, g.words, r, c),
            );
        }
    }
}
