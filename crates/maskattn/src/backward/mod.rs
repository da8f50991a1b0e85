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
mod score_grads;

use rayon::prelude::*;

use crate::block::{BlockMask, Tile};
use crate::call::Call;
use crate::error::{AttnError, Result};
use crate::gemm::{gemm, gemm_add, MatMut, MatRef, Update};
use crate::pack::{self, Span, Unseen};
use crate::params::Params;
use crate::shape::AttnDims;
use crate::simd::{self, Simd, WithSimd};
use crate::softmax::{self as sm, Geom, TileJob};
use crate::view::{Element, View};
use score_grads::{ModGrads, ModSpec};

/// `dq` like q `[B, H_q, L_q, d]`; `dk`, `dv` like k and v `[B, H_kv, L_k, d]`; the
/// gradients of the score modifiers the call had.
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub params: ParamGrads,
}

/// Gradients of the score modifiers (docs/design.md section 1): `Some` for exactly the
/// modifiers of the call's [`Params`] that have parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamGrads {
    /// Shaped like the bias's dims (`dS` summed over the dimensions it broadcasts over).
    pub dbias: Option<Vec<f32>>,
    /// `[H_q]`: `−Σ dS_ij |i' − j|`.
    pub dalibi: Option<Vec<f32>>,
    /// `[H_q]`: `−Σ_{b,i} e^{sink_h − LSE_i} D_i`.
    pub dsinks: Option<Vec<f32>>,
    /// `[num_buckets, H_q]`: `dS` summed over the pairs of each bucket.
    pub drel: Option<Vec<f32>>,
}

/// Buffers the caller owns for [`backward_into`], contiguous, shaped as in [`Grads`].
#[derive(Debug)]
pub struct GradsMut<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
    pub params: ParamGradsMut<'a>,
}

impl<'a> GradsMut<'a> {
    /// The three input gradients, and no parameter gradient.
    pub fn new(dq: &'a mut [f32], dk: &'a mut [f32], dv: &'a mut [f32]) -> Self {
        GradsMut {
            dq,
            dk,
            dv,
            params: ParamGradsMut::default(),
        }
    }
}

/// Buffers for the parameter gradients, shaped as in [`ParamGrads`] and overwritten;
/// `None` = not wanted (a dense bias's gradient costs an `L_q × L_k` write). A buffer for a
/// modifier the call does not have is an error.
#[derive(Debug, Default)]
pub struct ParamGradsMut<'a> {
    pub dbias: Option<&'a mut [f32]>,
    pub dalibi: Option<&'a mut [f32]>,
    pub dsinks: Option<&'a mut [f32]>,
    pub drel: Option<&'a mut [f32]>,
}

/// Chunks of key tiles per (b, kv head) aim for this many tasks in all, so that a call with
/// few heads still spreads over the cores...
const TARGET_TASKS: usize = 16;
/// ...but their private `dQ` buffers stay under this many bytes per (b, kv head).
const CHUNK_DQ_BYTES: usize = 32 << 20;

/// Everything the tasks share: the call, and what the backward adds to it.
struct Pass<'a, 'b, T> {
    call: Call<'a, 'b, T>,
    dout: &'a View<'b, f32>,
    lse: &'a [f32],
    /// `D_i = dO_i · O_i`, one per query row.
    delta: Vec<f32>,
    /// Per (b, query head, query tile): every Q and dO value of the tile is finite.
    rows_finite: Vec<bool>,
    g: Geom,
    /// The parameter gradients the caller wants (without the buckets: see [`Pass::mods`]).
    mods: ModSpec<'static>,
    want_rel: bool,
    /// The bf16 dot-product path's query-side operands, where it is taken.
    #[cfg(target_arch = "x86_64")]
    qs: Option<bf16::QuerySide>,
}

/// Scratch of one task: one key tile in three layouts, its gradients, one query tile and
/// its `dO`, and the `P`, `dS` tiles.
struct Scratch {
    k: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
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
    /// `tanh(z / c)` under soft-capping.
    tanh: Vec<f32>,
    unseen: Unseen,
}

impl Scratch {
    fn new(g: &Geom, tq: usize, bias: bool, dropout: bool, softcap: bool) -> Self {
        let tile = g.tk_pad * g.d_pad;
        let score = tq * g.tk_pad;
        Scratch {
            k: vec![0.0; tile],
            kt: vec![0.0; tile],
            vt: vec![0.0; tile],
            dk: vec![0.0; tile],
            dv: vec![0.0; tile],
            q: vec![0.0; tq * g.d_pad],
            dout: vec![0.0; tq * g.d_pad],
            p: vec![0.0; score],
            pz: vec![0.0; if dropout { score } else { 0 }],
            drop_keys: vec![0; tq],
            ds: vec![0.0; score],
            bias: vec![0.0; if bias { score } else { 0 }],
            tanh: vec![0.0; if softcap { score } else { 0 }],
            unseen: Unseen::new(g.words, tile),
        }
    }
}

/// What one task hands back: its `dQ` buffer (`group · L_q × d_pad`), its key tiles'
/// gradients and its sums for the parameter gradients.
struct ChunkResult<'a> {
    dq: Vec<f32>,
    tiles: Vec<(usize, Vec<f32>, Vec<f32>)>,
    mods: Option<ModGrads<'a>>,
}

/// The parameter-gradient sums of one (b, kv head), in the layouts of [`ModGrads`]:
/// the bias block `[gh, nq, nk]`, `dalibi [group]`, `drel [num_buckets, group]`.
struct HeadMods {
    bias: Vec<f32>,
    dalibi: Vec<f64>,
    drel: Vec<f64>,
}

/// The three attention inputs, as the forward took them: `q [B, H_q, L_q, d]`,
/// `k, v [B, H_kv, L_k, d]` (any strides). The backward takes them as one operand.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a, T = f32> {
    pub q: View<'a, T>,
    pub k: View<'a, T>,
    pub v: View<'a, T>,
}

impl<'a, T: Element> Qkv<'a, T> {
    pub fn new(q: &View<'a, T>, k: &View<'a, T>, v: &View<'a, T>) -> Self {
        Qkv {
            q: *q,
            k: *k,
            v: *v,
        }
    }
}

/// Masked attention backward: gradients of `q`, `k`, `v` given the forward's `out` and `lse`
/// and the output gradient `dout` (shaped like q). Same inputs, block mask and [`Params`]
/// (scale, bias, dropout, score modifiers) as the forward. `Grads::params` holds the
/// gradient of every modifier of `params` that has parameters (docs/design.md section 1).
pub fn backward<T: Element>(
    qkv: &Qkv<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    block: &BlockMask,
    params: &Params,
) -> Result<Grads> {
    let dims = AttnDims::of(&qkv.q, &qkv.k, &qkv.v)?;
    params.check_mods(dims.q_heads)?;
    let h = dims.q_heads;
    let mut grads = Grads {
        dq: vec![0f32; dims.q_len()],
        dk: vec![0f32; dims.kv_len()],
        dv: vec![0f32; dims.kv_len()],
        params: ParamGrads {
            dbias: params.bias.map(|bs| vec![0f32; bs.dims().iter().product()]),
            dalibi: params.alibi.map(|_| vec![0f32; h]),
            dsinks: params.sinks.map(|_| vec![0f32; h]),
            drel: params.rel.map(|rb| vec![0f32; rb.num_buckets() * h]),
        },
    };
    let p = &mut grads.params;
    let into = GradsMut {
        dq: &mut grads.dq,
        dk: &mut grads.dk,
        dv: &mut grads.dv,
        params: ParamGradsMut {
            dbias: p.dbias.as_deref_mut(),
            dalibi: p.dalibi.as_deref_mut(),
            dsinks: p.dsinks.as_deref_mut(),
            drel: p.drel.as_deref_mut(),
        },
    };
    backward_into(qkv, out, lse, dout, block, params, into)?;
    Ok(grads)
}

/// [`backward`] into buffers the caller owns (every value overwritten): for writing straight
/// into another framework's gradient storage, or reusing buffers call after call. The
/// parameter gradients are computed for exactly the buffers given in `grads.params`
/// (checked: each belongs to a modifier of `params` and has its length).
pub fn backward_into<T: Element>(
    qkv: &Qkv<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    block: &BlockMask,
    params: &Params,
    grads: GradsMut<'_>,
) -> Result<()> {
    let Qkv { q, k, v } = qkv;
    let dims = AttnDims::of(q, k, v)?;
    let GradsMut {
        dq,
        dk,
        dv,
        params: mut pg,
    } = grads;
    AttnDims::check_buffer("dq", dq.len(), dims.q_len(), "B * H_q * L_q * d")?;
    AttnDims::check_buffer("dk", dk.len(), dims.kv_len(), "B * H_kv * L_k * d")?;
    AttnDims::check_buffer("dv", dv.len(), dims.kv_len(), "B * H_kv * L_k * d")?;
    let bias = params.bias.as_ref();
    dims.check_bias(bias)?;
    params.check_mods(dims.q_heads)?;
    check_param_grads(&pg, params, dims.q_heads)?;
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
    let sinks = params.sinks.filter(|_| pg.dsinks.is_some());
    let dsink_rows: Vec<f64> = delta
        .par_chunks_mut(lq)
        .zip(rows_finite.par_chunks_mut(nq))
        .enumerate()
        .map(|(bh, (dl, fin))| {
            let (b, h) = (bh / q_heads, bh % q_heads);
            let (mut o, mut g, mut qr) = (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
            let mut dsink = 0f64;
            for (i, x) in dl.iter_mut().enumerate() {
                out.load_rows(b, h, i, &mut o);
                dout.load_rows(b, h, i, &mut g);
                q.load_rows(b, h, i, &mut qr);
                // SAFETY: `DotInOrder` reads only its two slices.
                *x = unsafe { simd::run(DotInOrder(&o, &g)) };
                fin[i / tq] &= pack::all_finite(&g) & pack::all_finite(&qr);
                // dsink_h −= e^(sink_h − LSE_i) D_i. A row that allows nothing has O = 0 and
                // so D = 0, unless its dO is not finite (0 · NaN): such a row has no
                // gradient (its LSE is the sink whatever the sink), so it is skipped.
                if let Some(sk) = sinks {
                    let lse_i = lse[bh * lq + i];
                    if x.is_finite() || !row_sees_nothing(block, (b, h, i)) {
                        dsink -= ((sk[h] - lse_i) as f64).exp() * *x as f64;
                    }
                }
            }
            dsink
        })
        .collect();
    if let (Some(dst), Some(_)) = (pg.dsinks.take(), sinks) {
        // Summed over batch rows in order.
        for (h, x) in dst.iter_mut().enumerate() {
            *x = (0..batch).map(|b| dsink_rows[b * q_heads + h]).sum::<f64>() as f32;
        }
    }

    let call = Call::new((q, k, v), block, params, dims, scale);
    let g = call.geom();
    let mods = ModSpec {
        bias: params.bias.filter(|_| pg.dbias.is_some()).map(|b| b.dims()),
        alibi: params.alibi.is_some() && pg.dalibi.is_some(),
        // Filled from the call's table by `Pass::mods`.
        buckets: None,
        num_buckets: params.rel.map_or(0, |r| r.num_buckets()),
        group: dims.group(),
        lq,
        lk,
    };
    let want_rel = params.rel.is_some() && pg.drel.is_some();
    let pass = Pass {
        call,
        dout,
        lse,
        delta,
        rows_finite,
        g,
        mods,
        want_rel,
        #[cfg(target_arch = "x86_64")]
        qs: (T::IS_BF16 && exactly_bf16(dout))
            .then(crate::gemm::amx::DotPath::now)
            .flatten()
            .map(|path| query_side(q, dout, block, &g, path)),
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
    let head_mods: Vec<Option<HeadMods>> = dq
        .par_chunks_mut(group * lq * d)
        .zip(dk.par_chunks_mut(lk * d))
        .zip(dv.par_chunks_mut(lk * d))
        .enumerate()
        .map(|(bhk, ((dq, dk), dv))| {
            let (b, hk) = (bhk / kv_heads, bhk % kv_heads);
            let results: Vec<ChunkResult> = (0..chunks)
                .into_par_iter()
                .map(|c| pass.chunk((b, hk), c, chunks))
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
            pass.head_mods(&results)
        })
        .collect();
    let spec = pass.mods();
    if spec.any() {
        let hm: Vec<HeadMods> = head_mods.into_iter().flatten().collect();
        add_head_mods(&spec, &hm, (kv_heads, q_heads), params, pg);
    }
    Ok(())
}

/// Adds the (b, kv head) sums into the caller's buffers, in (b, kv head) order, over the
/// dimensions the parameters broadcast over (batch rows always; heads for a bias shared
/// by all heads).
fn add_head_mods(
    spec: &ModSpec,
    hm: &[HeadMods],
    (kv_heads, q_heads): (usize, usize),
    params: &Params,
    pg: ParamGradsMut,
) {
    let group = spec.group;
    let at = |bhk: usize| (bhk / kv_heads, bhk % kv_heads);
    if let (Some(dst), Some([db, dh, dq, dk]), Some((gh, nq, nk))) =
        (pg.dbias, spec.bias, spec.bias_block())
    {
        dst.fill(0.0);
        for (bhk, m) in hm.iter().enumerate() {
            let (b, hk) = at(bhk);
            let bb = if db == 1 { 0 } else { b };
            for ghi in 0..gh {
                let hh = if dh == 1 { 0 } else { hk * group + ghi };
                let dst = &mut dst[(bb * dh + hh) * dq * dk..][..dq * dk];
                let src = &m.bias[ghi * nq * nk..(ghi + 1) * nq * nk];
                for (x, s) in dst.iter_mut().zip(src) {
                    *x += s;
                }
            }
        }
    }
    if let (Some(dst), true) = (pg.dalibi, spec.alibi) {
        let mut sum = vec![0f64; q_heads];
        for (bhk, m) in hm.iter().enumerate() {
            let hk = at(bhk).1;
            for (hi, x) in m.dalibi.iter().enumerate() {
                sum[hk * group + hi] += x;
            }
        }
        dst.iter_mut().zip(&sum).for_each(|(d, s)| *d = *s as f32);
    }
    if let (Some(dst), Some(_)) = (pg.drel, spec.buckets) {
        let nb = params.rel.map_or(0, |r| r.num_buckets());
        let mut sum = vec![0f64; nb * q_heads];
        for (bhk, m) in hm.iter().enumerate() {
            let hk = at(bhk).1;
            for n in 0..nb {
                for hi in 0..group {
                    sum[n * q_heads + hk * group + hi] += m.drel[n * group + hi];
                }
            }
        }
        dst.iter_mut().zip(&sum).for_each(|(d, s)| *d = *s as f32);
    }
}

/// Whether row `i` of head `(b, h)` may attend to no key at all (from its block-mask tiles).
fn row_sees_nothing(block: &BlockMask, (b, h, i): (usize, usize, usize)) -> bool {
    let (tq, words) = (block.tile_q(), block.words());
    (0..block.grid().1).all(|kt| match block.tile(b, h, i / tq, kt) {
        Tile::Empty => true,
        Tile::Full => false,
        Tile::Partial(bits) => bits[(i % tq) * words..(i % tq + 1) * words]
            .iter()
            .all(|&w| w == 0),
    })
}

/// Each parameter-gradient buffer belongs to a modifier of the call and has its length.
fn check_param_grads(pg: &ParamGradsMut, params: &Params, heads: usize) -> Result<()> {
    let want = [
        (
            "dbias",
            pg.dbias.as_deref(),
            params.bias.map(|b| b.dims().iter().product::<usize>()),
        ),
        ("dalibi", pg.dalibi.as_deref(), params.alibi.map(|_| heads)),
        ("dsinks", pg.dsinks.as_deref(), params.sinks.map(|_| heads)),
        (
            "drel",
            pg.drel.as_deref(),
            params.rel.map(|r| r.num_buckets() * heads),
        ),
    ];
    for (name, buf, n) in want {
        match (buf, n) {
            (Some(_), None) => {
                return Err(AttnError::ParamGrad {
                    name,
                    what: "a buffer was given, but the call has no such modifier".into(),
                })
            }
            (Some(b), Some(n)) if b.len() != n => {
                return Err(AttnError::ParamGrad {
                    name,
                    what: format!("the buffer holds {} values, the call needs {n}", b.len()),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

impl<T: Element> Pass<'_, '_, T> {
    /// The parameter gradients wanted, with the call's buckets where `drel` is one of them.
    fn mods(&self) -> ModSpec<'_> {
        ModSpec {
            buckets: self
                .call
                .pos
                .as_ref()
                .filter(|_| self.want_rel)
                .map(|p| &p.buckets[..]),
            ..self.mods
        }
    }

    /// Key tiles `c, c + chunks, …` of kv head `(b, hk)` (interleaved, so that a causal
    /// mask's work is shared evenly).
    fn chunk(&self, (b, hk): (usize, usize), c: usize, chunks: usize) -> ChunkResult<'_> {
        let (g, call) = (self.g, &self.call);
        let (tq, lq, lk) = (call.block.tile_q(), call.dims.lq, call.dims.lk);
        let group = call.dims.group();
        let (nq, nk) = call.block.grid();
        let mut sc = Scratch::new(
            &g,
            tq,
            call.bias.is_some(),
            call.dropout.is_some(),
            call.softcap.is_some(),
        );
        let spec = self.mods();
        let mut mods = spec.any().then(|| ModGrads::new(spec, tq, g.tk, g.tk_pad));
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
                        |(hi, qt)| match call.block.tile(b, hk * group + hi, qt, kt) {
                            Tile::Empty => None,
                            Tile::Full => Some((hi, qt, None)),
                            Tile::Partial(bits) => Some((hi, qt, Some(bits))),
                        },
                    ),
            );
            if pairs.is_empty() {
                continue; // no query sees these keys: their gradients stay the caller's zeros
            }
            let keys = Span {
                b,
                h: hk,
                start: j0,
                len: cols,
            };
            let kv_tile = (g.tk_pad, g.d_pad);
            if let Some(m) = &mut mods {
                m.start_tile();
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some(qs), Some((ks, w))) = (&self.qs, &mut bf) {
                pack::kt_pairs(call.k, keys, kv_tile, &mut ks.kt);
                pack::kt_pairs(call.v, keys, kv_tile, &mut ks.vt);
                ks.k_finite = pack::v_pairs(call.k, keys, kv_tile, &mut ks.k);
                ks.dkt.fill(0.0);
                ks.dvt.fill(0.0);
                for &(hi, qt, bits) in &pairs {
                    let dq = &mut dq[(hi * lq + qt * tq) * g.d_pad..];
                    let at = (b, hk * group + hi, qt, kt, bits);
                    self.pair16(qs, (ks, w), &mut sc, dq, at, mods.as_mut());
                }
                ks.transpose_into(&g, call.scale, &mut sc.dk, &mut sc.dv);
                tiles.push((kt, sc.dk.clone(), sc.dv.clone()));
                if let Some(m) = &mut mods {
                    m.end_tile(kt);
                }
                continue;
            }
            pack::rows(call.k, keys, g.d_pad, &mut sc.k);
            sc.k[cols * g.d_pad..].fill(0.0);
            pack::transposed(call.k, keys, kv_tile, &mut sc.kt);
            pack::transposed(call.v, keys, kv_tile, &mut sc.vt);
            let k_finite = pack::all_finite(&sc.k);
            sc.dk.fill(0.0);
            sc.dv.fill(0.0);
            for &(hi, qt, bits) in &pairs {
                let dq = &mut dq[(hi * lq + qt * tq) * g.d_pad..];
                let at = (b, hk * group + hi, qt, kt, bits);
                self.pair(&mut sc, dq, at, k_finite, mods.as_mut());
            }
            // dK = s · dSᵀ·Q
            sc.dk.iter_mut().for_each(|x| *x *= call.scale);
            tiles.push((kt, sc.dk.clone(), sc.dv.clone()));
            if let Some(m) = &mut mods {
                m.end_tile(kt);
            }
        }
        ChunkResult { dq, tiles, mods }
    }

    /// The parameter-gradient sums of one (b, kv head) from its chunks, in chunk order.
    fn head_mods(&self, results: &[ChunkResult]) -> Option<HeadMods> {
        let spec = self.mods();
        if !spec.any() {
            return None;
        }
        let (g, lk) = (self.g, spec.lk);
        let chunks = || results.iter().filter_map(|c| c.mods.as_ref());
        let bias = match spec.bias_block() {
            None => Vec::new(),
            Some((gh, nq, 1)) => {
                let mut sum = vec![0f32; gh * nq];
                for m in chunks() {
                    sum.iter_mut().zip(&m.cols).for_each(|(s, x)| *s += x);
                }
                sum
            }
            Some((gh, nq, nk)) => {
                // Every key tile belongs to one chunk: its columns are copied, not summed.
                let mut all = vec![0f32; gh * nq * nk];
                for (kt, tile) in chunks().flat_map(|m| &m.tiles) {
                    let j0 = kt * g.tk;
                    let cols = (lk - j0).min(g.tk);
                    for (row, src) in tile.chunks_exact(g.tk).enumerate() {
                        all[row * nk + j0..row * nk + j0 + cols].copy_from_slice(&src[..cols]);
                    }
                }
                all
            }
        };
        let (mut dalibi, mut drel) = (Vec::new(), Vec::new());
        for m in chunks() {
            dalibi.resize(m.dalibi.len(), 0f64);
            drel.resize(m.drel.len(), 0f64);
            dalibi.iter_mut().zip(&m.dalibi).for_each(|(a, x)| *a += x);
            drel.iter_mut().zip(&m.drel).for_each(|(a, x)| *a += x);
        }
        Some(HeadMods { bias, dalibi, drel })
    }

    /// The job of one (query tile, key tile) pair, with its bias tile and dropout keys
    /// written into the scratch, and the first row's index among all query rows.
    fn job<'s>(
        &'s self,
        bias: &'s mut [f32],
        drop_keys: &'s mut [u32],
        (b, h, qt, kt, bits): PairAt<'s>,
    ) -> (TileJob<'s>, usize) {
        let (g, call) = (self.g, &self.call);
        let (tq, dims) = (call.block.tile_q(), call.dims);
        let (i0, j0) = (qt * tq, kt * g.tk);
        let rows = (dims.lq - i0).min(tq);
        call.drop_keys((b, h, i0), &mut drop_keys[..rows]);
        let job = call.tile_job(g, (b, h, i0, j0), bits, bias, drop_keys);
        (job, (b * dims.q_heads + h) * dims.lq + i0)
    }

    /// Whether every Q and dO value of the pair's query tile is finite.
    fn rows_finite(&self, (b, h, qt): (usize, usize, usize)) -> bool {
        let nq = self.call.block.grid().0;
        self.rows_finite[(b * self.call.dims.q_heads + h) * nq + qt]
    }

    /// [`Pass::pair`] on the bf16 dot-product path.
    #[cfg(target_arch = "x86_64")]
    fn pair16(
        &self,
        qs: &bf16::QuerySide,
        (ks, w): (&mut bf16::KeySide, &mut bf16::Work16),
        sc: &mut Scratch,
        dq: &mut [f32],
        at: PairAt,
        mods: Option<&mut ModGrads>,
    ) {
        let g = &self.g;
        let (b, h, qt, kt, _) = at;
        let nq = self.call.block.grid().0;
        let rows_finite = self.rows_finite((b, h, qt));
        let (job, row0) = self.job(&mut sc.bias, &mut sc.drop_keys, at);
        let rows = job.rows;
        let idx = (b * self.call.dims.q_heads + h) * nq + qt;
        let (n_rows, n_t) = (self.call.block.tile_q() * g.d_pad, g.d_pad * qs.tq_pad);
        let t = bf16::QueryTile {
            job,
            engine: qs.engine,
            packing: qs.packing,
            lse: &self.lse[row0..row0 + rows],
            delta: &self.delta[row0..row0 + rows],
            q: &qs.q[idx * n_rows..(idx + 1) * n_rows],
            dout: &qs.dout[idx * n_rows..(idx + 1) * n_rows],
            qt: &qs.qt[idx * n_t..(idx + 1) * n_t],
            doutt: &qs.doutt[idx * n_t..(idx + 1) * n_t],
            tq_pad: qs.tq_pad,
            rows_finite,
            at: (
                h % self.call.dims.group(),
                qt * self.call.block.tile_q(),
                kt * g.tk,
            ),
        };
        let f32_tiles = bf16::F32Tiles {
            p: &mut sc.p,
            pz: &mut sc.pz,
            ds: &mut sc.ds,
            tanh: &mut sc.tanh,
            dq,
            mods,
        };
        // SAFETY: `qs.engine` came from `DotPath::now`; buffers sized by `QuerySide`,
        // `KeySide::new`, `Work16::new` and `Scratch::new`.
        unsafe {
            simd::run(bf16::Step {
                t: &t,
                ks,
                w,
                f: f32_tiles,
            })
        };
    }

    /// One (query tile, key tile) pair: loads the query side, then runs the vector step.
    fn pair(
        &self,
        sc: &mut Scratch,
        dq: &mut [f32],
        at: PairAt,
        k_finite: bool,
        mods: Option<&mut ModGrads>,
    ) {
        let (g, call) = (self.g, &self.call);
        let (b, h, qt, kt_at, _) = at;
        let rows_finite = self.rows_finite((b, h, qt));
        let Scratch {
            k,
            kt,
            vt,
            dk,
            dv,
            q,
            dout,
            p,
            pz,
            drop_keys,
            ds,
            bias,
            tanh,
            unseen,
        } = sc;
        let (job, row0) = self.job(bias, drop_keys, at);
        let (rows, cols, i0) = (job.rows, job.cols, qt * call.block.tile_q());
        let span = Span {
            b,
            h,
            start: i0,
            len: rows,
        };
        // Q and dO rows are read in place where they are f32 rows of exactly `d_pad`
        // features (every (query tile, key tile) pair reads them: no copy per pair), else
        // copied into padded rows.
        let (q, q_ld) = in_place(call.q.f32_rows(b, h, i0), &g).unwrap_or_else(|| {
            pack::rows(call.q, span, g.d_pad, q);
            (&q[..], g.d_pad)
        });
        let (dout, dout_ld) = in_place(self.dout.f32_rows(b, h, i0), &g).unwrap_or_else(|| {
            pack::rows(self.dout, span, g.d_pad, dout);
            (&dout[..], g.d_pad)
        });
        // The guard against 0 · NaN for dS·K, as on every path.
        let (k, exact_k) = unseen.rows(&job, k, g.d_pad, k_finite);
        let (tk_pad, d_pad) = (g.tk_pad, g.d_pad);
        let step = Step {
            job,
            lse: &self.lse[row0..row0 + rows],
            delta: &self.delta[row0..row0 + rows],
            q: MatRef::new(q, rows, d_pad, q_ld),
            dout: MatRef::new(dout, rows, d_pad, dout_ld),
            k: MatRef::new(k, cols, d_pad, d_pad),
            kt: MatRef::new(kt, g.d, tk_pad, tk_pad),
            vt: MatRef::new(vt, g.d, tk_pad, tk_pad),
            exact_k,
            exact_rows: job.bits.is_some() && !rows_finite,
            p,
            pz,
            ds,
            tanh: call.softcap.map(|_| &mut tanh[..]),
            at: (h % call.dims.group(), i0, kt_at * g.tk),
            mods,
            dk: MatMut::new(dk, cols, d_pad, d_pad),
            dv: MatMut::new(dv, cols, d_pad, d_pad),
            dq: MatMut::new(dq, rows, d_pad, d_pad),
        };
        // SAFETY: the operands were checked as they were made; the score tiles are sized by
        // `Scratch::new` for `tile_q ≥ rows` rows.
        unsafe { simd::run(step) };
    }
}

/// Where one (query tile, key tile) pair is: `(b, query head, query tile, key tile, bitmap)`.
type PairAt<'a> = (usize, usize, usize, usize, Option<&'a [u64]>);

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
    path: crate::gemm::amx::DotPath,
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

/// `a · b` as one fused multiply-add chain in feature order: the rounding of every entry of
/// the micro-kernel's products. `D_i` computed this way cancels `dP_ij` exactly where the
/// mathematics says it does (a row with one visible key has `dS = 0`, as in the reference).
struct DotInOrder<'a>(&'a [f32], &'a [f32]);

impl WithSimd for DotInOrder<'_> {
    type Output = f32;

    #[inline(always)]
    unsafe fn with_simd<S: Simd>(self) -> f32 {
        self.0
            .iter()
            .zip(self.1)
            // SAFETY: `fma1` is scalar arithmetic on a set `simd::run` checked.
            .fold(0.0, |acc, (&x, &y)| unsafe { S::fma1(x, y, acc) })
    }
}

/// The five products of one (query tile, key tile) pair, on f32.
struct Step<'a, 'b> {
    job: TileJob<'a>,
    lse: &'a [f32],
    delta: &'a [f32],
    /// Q and dO rows over the padded features (`rows × d_pad`).
    q: MatRef<'a>,
    dout: MatRef<'a>,
    /// K rows (`cols × d_pad`), `Kᵀ` and `Vᵀ` (`d × tk_pad`).
    k: MatRef<'a>,
    kt: MatRef<'a>,
    vt: MatRef<'a>,
    /// K holds a non-finite value only some rows see; Q or dO a non-finite value in a
    /// partial tile: the products over those skip the hidden pairs.
    exact_k: bool,
    exact_rows: bool,
    /// `rows × tk_pad` score tiles (`tile_q` rows allocated).
    p: &'a mut [f32],
    pz: &'a mut [f32],
    ds: &'a mut [f32],
    /// `tanh(z / c)` under soft-capping (`rows × tk_pad`).
    tanh: Option<&'a mut [f32]>,
    /// (query head within the group, first query, first key) and the task's sums.
    at: (usize, usize, usize),
    mods: Option<&'a mut ModGrads<'b>>,
    /// `dk`, `dv` receive `dSᵀ·Q` (the caller applies `s`) and `Pᵀ·dO`; `dq` `dS·K`.
    dk: MatMut<'a>,
    dv: MatMut<'a>,
    dq: MatMut<'a>,
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
/// (dP may be NaN there); a row that sees nothing (`LSE = −∞`) gets 0.
///
/// # Safety
/// The tiles are `rows × tk_pad`.
#[inline(always)]
unsafe fn ds_rows<S: Simd>(
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
