//! The forward kernel: online softmax ("flash") over the non-empty key tiles of each query
//! tile. Extra memory: the packed keys and values of the kv heads being worked on (O(L_k·d))
//! and a few tiles per thread — never `L_q × L_k`.
//!
//! The whole pass of one (query tile, key tile) pair is [`Step::with_simd`] (f32) or
//! [`step_bf16`] (bf16 dot products): `x = s·Q·Kᵀ + β`, masked; the running max, sum and
//! `P̃` ([`Online::update`]); `acc += P̃·V`. [`query_tile`] walks the key tiles and ends
//! with `O = acc / l`, `LSE = m + ln l` ([`Online::finish`]).

use rayon::prelude::*;

use crate::block::{BlockMask, Tile};
use crate::call::Call;
use crate::error::{AttnError, Result};
use crate::gemm::{gemm, gemm_add, MatMut, MatRef, Update};
use crate::pack::{self, pad16, Span};
use crate::params::Params;
use crate::shape::AttnDims;
use crate::simd::{self, Simd, WithSimd};
use crate::softmax::{Geom, Online, TileJob, Unseen};
use crate::view::{Element, View};

/// `out [B, H_q, L_q, d]` and `lse [B, H_q, L_q]` (−∞ where a row allows nothing, or its
/// head's sink logit with sinks; the LSE includes the sink term).
#[derive(Clone, Debug)]
pub struct Forward {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Keys and values of one `(b, kv head)`, packed once for every query tile that reads them:
/// `Kᵀ` per key tile (`d_pad × tk_pad`) and `V` rows (`tk_pad × d_pad` per tile).
/// On the bf16 dot-product path, `kp` and `vp` hold the same tiles as bf16 pairs instead
/// (see `gemm::bf16`) and `kt`, `v` stay empty.
struct PackedKv {
    kt: Vec<f32>,
    v: Vec<f32>,
    kp: Vec<u32>,
    vp: Vec<u32>,
    /// bf16 key rows (`tk_pad × d_pad` per tile), the A operand of the column form's
    /// `Sᵀ = K·Qᵀ` (bf16 path only).
    k16: Vec<u16>,
    v_finite: Vec<bool>,
}

/// Per-thread scratch for one query tile.
struct Scratch {
    /// `Qᵀ` of the tile's rows (`d_pad × rows_pad`, f32 path).
    qt: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    bias: Vec<f32>,
    unseen: Unseen,
    drop_keys: Vec<u32>,
    /// bf16 path: Q rows and `P̃` rounded to bf16 (rows in natural order: the row form's,
    /// and the column form's on AMX tiles).
    q16: Vec<u16>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    p16: Vec<u16>,
    /// bf16 column form: `Qᵀ` interleaved over features (`d_pad / 2 × tq_pad` pairs) and,
    /// on `vdpbf16ps`, `P̃ᵀ` interleaved over keys (`tk_pad / 2 × tq_pad` pairs).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qt_pairs: Vec<u32>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pt_pairs: Vec<u32>,
}

impl Scratch {
    fn new(tq: usize, g: &Geom, bias: bool, dot: bool) -> Self {
        let if_dot = |n: usize| if dot { n } else { 0 };
        // Scores as `tq × tk_pad` (row form) or `tk_pad × tq_pad` (column form), and the
        // running state over whole vectors of rows for the column form.
        let tq_pad = pad16(tq);
        Scratch {
            qt: vec![0.0; if dot { 0 } else { g.d_pad * tq_pad }],
            s: vec![0.0; tq_pad * g.tk_pad],
            acc: vec![0.0; tq * g.d_pad],
            m: vec![0.0; tq_pad],
            l: vec![0.0; tq_pad],
            bias: vec![0.0; if bias { tq * g.tk_pad } else { 0 }],
            unseen: Unseen::new(g.words, g.tk_pad * g.d_pad),
            drop_keys: vec![0; tq],
            q16: vec![0; if_dot(tq * g.d_pad)],
            p16: vec![0; if_dot(tq * g.tk_pad)],
            qt_pairs: vec![0; if_dot(g.d_pad / 2 * tq_pad)],
            pt_pairs: vec![0; if_dot(g.tk_pad / 2 * tq_pad)],
        }
    }
}

/// What every query tile of one (b, kv head) shares.
struct KvHead<'a, 'b, 'c, T> {
    call: &'a Call<'b, 'c, T>,
    kv: &'a PackedKv,
    g: Geom,
    b: usize,
    /// bf16 storage on the bf16 pair products (`gemm::bf16`, `gemm::amx`).
    dot: bool,
    /// Their engine and packing, decided once for the call.
    #[cfg(target_arch = "x86_64")]
    path: Option<crate::gemm::amx::DotPath>,
}

/// Masked attention forward. `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]` (any strides),
/// `block` compiled for `(B, H_q, L_q, L_k)`; see [`Params`] for scale, bias, dropout and the
/// score modifiers (soft-cap, ALiBi, sinks, T5 relative positions).
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
///   value reaches the gradients the formulas of docs/design.md section 1 carry it to over
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
    params.check_mods(dims.q_heads)?;
    block.check_shape(dims.mask_shape())?;
    let scale = dims.scale(params.scale)?;
    let call = Call::new((q, k, v), block, params, dims, scale);
    if dims.lq <= crate::decode::DECODE_MAX_LQ {
        crate::decode::forward(&call, out, lse);
        return params.check_cancel();
    }
    let AttnDims { lq, d, .. } = dims;
    let (tq, g) = (block.tile_q(), call.geom());
    let group = dims.group();
    #[cfg(target_arch = "x86_64")]
    let path = T::IS_BF16.then(crate::gemm::amx::DotPath::now).flatten();
    #[cfg(target_arch = "x86_64")]
    let dot = path.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let dot = false;
    // Outer tasks: one (b, kv head) each, owning the outputs of the query heads it serves.
    out.par_chunks_mut(group * lq * d)
        .zip(lse.par_chunks_mut(group * lq))
        .enumerate()
        .for_each(|(bhk, (out, lse))| {
            let (b, hk) = (bhk / dims.kv_heads, bhk % dims.kv_heads);
            let kv = pack_kv(&call, &g, (b, hk), dot);
            let head = KvHead {
                call: &call,
                kv: &kv,
                g,
                b,
                dot,
                #[cfg(target_arch = "x86_64")]
                path,
            };
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
                    || Scratch::new(tq, &g, call.bias.is_some(), dot),
                    |sc, (h, qt, o, l)| {
                        // A cancelled call skips its remaining tiles (cancel.rs).
                        if !params.cancelled() {
                            query_tile(&head, (h, qt), o, l, sc)
                        }
                    },
                );
        });
    params.check_cancel()
}

fn pack_kv<T: Element>(call: &Call<T>, g: &Geom, (b, hk): (usize, usize), dot: bool) -> PackedKv {
    let (k, v, lk) = (call.k, call.v, call.dims.lk);
    let nk = call.block.grid().1;
    let (kt_len, v_len) = (g.d_pad * g.tk_pad, g.tk_pad * g.d_pad);
    let span = |t: usize| Span {
        b,
        h: hk,
        start: t * g.tk,
        len: (lk - t * g.tk).min(g.tk),
    };
    if dot {
        let (kp_len, vp_len) = (kt_len / 2, v_len / 2);
        let mut kv = PackedKv {
            kt: Vec::new(),
            v: Vec::new(),
            kp: vec![0; nk * kp_len],
            vp: vec![0; nk * vp_len],
            k16: vec![0; nk * kt_len],
            v_finite: vec![true; nk],
        };
        for t in 0..nk {
            let kp = &mut kv.kp[t * kp_len..(t + 1) * kp_len];
            pack::pairs_over_features(k, span(t), (g.tk_pad, g.d_pad), kp);
            let k16 = &mut kv.k16[t * kt_len..(t + 1) * kt_len];
            pack::rows_bf16(k, span(t), g.d_pad, k16);
            k16[span(t).len * g.d_pad..].fill(0);
            let vp = &mut kv.vp[t * vp_len..(t + 1) * vp_len];
            kv.v_finite[t] = pack::pairs_over_rows(v, span(t), (g.tk_pad, g.d_pad), vp);
        }
        return kv;
    }
    let mut kv = PackedKv {
        kt: vec![0.0; nk * kt_len],
        v: vec![0.0; nk * v_len],
        kp: Vec::new(),
        vp: Vec::new(),
        k16: Vec::new(),
        v_finite: vec![true; nk],
    };
    for t in 0..nk {
        let kt = &mut kv.kt[t * kt_len..(t + 1) * kt_len];
        pack::transposed(k, span(t), (g.tk_pad, g.d_pad), kt);
        let vt = &mut kv.v[t * v_len..(t + 1) * v_len];
        pack::rows(v, span(t), g.d_pad, vt);
        kv.v_finite[t] = pack::all_finite(vt);
    }
    kv
}

/// One query tile: rows `qt·tile_q ..` of head `(b, h)`; `out` is `rows × d`, `lse` `rows`.
fn query_tile<T: Element>(
    head: &KvHead<T>,
    (h, qt): (usize, usize),
    out: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    let KvHead {
        call,
        kv,
        g,
        b,
        dot,
        ..
    } = *head;
    let block = call.block;
    let rows = lse.len();
    let i0 = qt * block.tile_q();
    let span = Span {
        b,
        h,
        start: i0,
        len: rows,
    };
    if dot {
        // bf16 rows as they are; the scale is applied to the f32 scores.
        pack::rows_bf16(call.q, span, g.d_pad, &mut sc.q16);
        pack::pairs_over_features(call.q, span, (pad16(rows), g.d_pad), &mut sc.qt_pairs);
    } else {
        // `Qᵀ`, the B operand of the column form's `Sᵀ = K·Qᵀ` and (read through strides)
        // the A operand of the row form's `S = Q·Kᵀ`. The scale goes on the products, in
        // the softmax, as in the backward.
        pack::transposed(call.q, span, (pad16(rows), g.d_pad), &mut sc.qt);
    }
    call.drop_keys((b, h, i0), &mut sc.drop_keys[..rows]);
    let Scratch {
        qt: q_t,
        s,
        acc,
        m,
        l,
        bias,
        unseen,
        drop_keys,
        q16,
        p16,
        qt_pairs,
        pt_pairs,
    } = sc;
    let mut st = Online {
        m: &mut m[..],
        l: &mut l[..],
        acc: &mut acc[..],
    };
    st.reset(rows, g.d_pad, call.sink(h));
    // AMX or not: once per task; on AMX the tiles configured once for all its products.
    #[cfg(target_arch = "x86_64")]
    let (mut tiles, packing) = match head.path {
        // SAFETY: the engine came from `DotPath::now`; the task's products run on this
        // thread, one after another, no other tile code between them.
        Some(p) => (unsafe { p.engine.tiles() }, Some(p.packing)),
        None => (crate::gemm::amx::TaskTiles::Vnni, None),
    };

    for kt in 0..block.grid().1 {
        let bits = match block.tile(b, h, qt, kt) {
            Tile::Empty => continue,
            Tile::Full => None,
            Tile::Partial(bits) => Some(bits),
        };
        let job = call.tile_job(g, (b, h, i0, kt * g.tk), bits, bias, drop_keys);
        let cols = job.cols;
        #[cfg(target_arch = "x86_64")]
        if let Some(packing) = packing {
            let (kp_len, vp_len) = (g.d_pad * g.tk_pad / 2, g.tk_pad * g.d_pad / 2);
            let column = job.column_form().then(|| BfColumns {
                k16: &kv.k16[kt * 2 * kp_len..(kt + 1) * 2 * kp_len],
                qt: &qt_pairs[..],
                pt: &mut pt_pairs[..],
            });
            let t = BfStep {
                job,
                tiles: &mut tiles,
                packing,
                column,
                q16,
                kp: &kv.kp[kt * kp_len..(kt + 1) * kp_len],
                vp: &kv.vp[kt * vp_len..(kt + 1) * vp_len],
                v_finite: kv.v_finite[kt],
                p16,
                unseen,
                s,
                st: &mut st,
            };
            // SAFETY: the engine and packing came from `DotPath::now`; the operands were
            // checked as they were made, `s` and `st` sized by `Scratch::new`.
            unsafe { simd::run(t) };
            continue;
        }
        let (kt_len, v_len) = (g.d_pad * g.tk_pad, g.tk_pad * g.d_pad);
        let v_tile = &kv.v[kt * v_len..(kt + 1) * v_len];
        let (v_tile, exact) = unseen.rows(&job, v_tile, g.d_pad, kv.v_finite[kt]);
        let step = Step {
            job,
            qt: q_t,
            kt: &kv.kt[kt * kt_len..(kt + 1) * kt_len],
            v: MatRef::new(v_tile, cols, g.d_pad, g.d_pad),
            exact,
            s,
            st: &mut st,
        };
        // SAFETY: the operands were checked as they were made; `s` and `st` are sized by
        // `Scratch::new` for `tile_q ≥ rows` rows.
        unsafe { simd::run(step) };
    }
    st.finish(g.d, g.d_pad, out, lse);
}

/// One (query tile, key tile) step of the online softmax, on f32.
struct Step<'a, 'b, 'c> {
    job: TileJob<'a>,
    /// `Qᵀ` (`d_pad × rows_pad`), `Kᵀ` (`d_pad × tk_pad`), V rows (`cols × d_pad`).
    qt: &'a [f32],
    kt: &'a [f32],
    v: MatRef<'a>,
    /// V holds a non-finite value that only some rows see: skip the hidden pairs.
    exact: bool,
    /// The score tile, `tile_q × tk_pad`.
    s: &'a mut [f32],
    st: &'b mut Online<'c>,
}

impl WithSimd for Step<'_, '_, '_> {
    type Output = ();

    #[inline(always)]
    unsafe fn with_simd<S: Simd>(self) {
        let Step {
            job,
            qt,
            kt,
            v,
            exact,
            s,
            st,
        } = self;
        let (rows, cols, d, tk_pad) = (job.rows, job.cols, job.g.d, job.g.tk_pad);
        let rows_pad = pad16(rows);
        // Over the real features only (their padding is zero).
        let (qt_all, kt_all) = (qt, kt);
        let qt = MatRef::new(qt_all, d, rows_pad, rows_pad);
        let kt = MatRef::new(kt_all, d, tk_pad, tk_pad);
        // acc += P̃·V. Called once per form, not once after them: each call inlines with
        // its `P̃`'s strides as constants (column form: rows 1 apart), so the micro-kernel
        // broadcasts from fixed offsets. One call on a `P̃` of either form made the row
        // stride a run-time value and cost five address additions per step of its loop
        // (`perf annotate`, AVX2), beside the twelve FMAs.
        #[inline(always)]
        unsafe fn add_pv<S: Simd>(
            st: &mut Online,
            job: &TileJob,
            p: MatRef,
            v: MatRef,
            exact: bool,
        ) {
            let acc = MatMut::new(&mut *st.acc, job.rows, job.g.d_pad, job.g.d_pad);
            // SAFETY: the caller's (`S`'s features are present).
            unsafe { gemm_add::<S>(acc, p, v, exact.then_some(|r, c| job.visible(r, c))) }
        }
        // SAFETY: `S`'s features are present (`simd::run`); operands checked when made.
        unsafe {
            if job.column_form() {
                // xᵀ = K·Qᵀ (keys × query rows); m, l, P̃ᵀ = e^(x − m) with the lanes
                // over rows (`Online::update_cols`: no horizontal sums).
                let k = MatRef::new(kt_all, d, cols, tk_pad).t();
                gemm::<S>(MatMut::new(s, cols, rows_pad, rows_pad), k, qt, Update::Set);
                st.update_cols::<S>(&job, s, rows_pad);
                let p = MatRef::new(s, cols, rows, rows_pad).t();
                add_pv::<S>(st, &job, p, v, exact);
            } else {
                // x = Q·Kᵀ; scaled and masked, m, l, P̃ = e^(x − m) row by row.
                let q = MatRef::new(qt_all, d, rows, rows_pad).t();
                gemm::<S>(MatMut::new(s, rows, tk_pad, tk_pad), q, kt, Update::Set);
                st.update::<S>(&job, s);
                let p = MatRef::new(s, rows, cols, tk_pad);
                add_pv::<S>(st, &job, p, v, exact);
            }
        }
    }
}

/// One key tile of the bf16 [`Step`]: both products on bf16 pairs (see `gemm::bf16`), the
/// softmax in f32 as everywhere else, on the kernels' instruction set.
#[cfg(target_arch = "x86_64")]
struct BfStep<'a, 'b, 'c> {
    job: TileJob<'a>,
    /// Which code runs the pair products (`gemm::amx`), configured for the task.
    tiles: &'a mut crate::gemm::amx::TaskTiles,
    /// Which code rounds `P̃` to bf16 for them.
    packing: crate::gemm::pair_layouts::Packing,
    /// A full tile: the column form's operands.
    column: Option<BfColumns<'a>>,
    /// Q rows as bf16 (`rows × d_pad`); `Kᵀ` over features and V over keys in pairs.
    q16: &'a [u16],
    kp: &'a [u32],
    vp: &'a [u32],
    v_finite: bool,
    p16: &'a mut [u16],
    unseen: &'a mut Unseen,
    s: &'a mut [f32],
    st: &'b mut Online<'c>,
}

/// The bf16 column form's operands (see [`Online::update_cols`]): the key tile's bf16 rows
/// (`tk_pad × d_pad`), `Qᵀ` interleaved over features, and room for `P̃ᵀ` interleaved
/// over keys (used on `vdpbf16ps`; AMX tiles take `P̃` rows in `p16`).
#[cfg(target_arch = "x86_64")]
struct BfColumns<'a> {
    k16: &'a [u16],
    qt: &'a [u32],
    pt: &'a mut [u32],
}

#[cfg(target_arch = "x86_64")]
impl WithSimd for BfStep<'_, '_, '_> {
    type Output = ();

    /// # Safety
    /// `tiles` was made from a [`DotPath::now`](crate::gemm::amx::DotPath::now) engine.
    #[inline(always)]
    unsafe fn with_simd<S: Simd>(self) {
        // SAFETY: the contract.
        unsafe { step_bf16::<S>(self) }
    }
}

/// [`BfStep`]'s work.
///
/// # Safety
/// As for its `with_simd`, and the CPU has `S`'s features.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step_bf16<S: Simd>(t: BfStep) {
    use crate::gemm::bf16::Pairs;
    let BfStep {
        job,
        tiles,
        packing,
        column,
        q16,
        kp,
        vp,
        v_finite,
        p16,
        unseen,
        s,
        st,
    } = t;
    let (rows, cols, tk_pad, d_pad) = (job.rows, job.cols, job.g.tk_pad, job.g.d_pad);
    if let Some(BfColumns { k16, qt, pt }) = column {
        let rows_pad = crate::pack::pad16(rows);
        // SAFETY: the engine's and `S`'s features are this function's contract; operands
        // checked when made (`s` holds `cols` rows of `rows_pad`, `p16` `rows` rows of
        // `tk_pad`).
        unsafe {
            // xᵀ = K·Qᵀ (keys × query rows), then m, l, P̃ᵀ with the lanes over rows.
            let k = Pairs::of_u16(k16, cols, d_pad / 2, d_pad / 2);
            let q = Pairs::of_u32(qt, d_pad / 2, rows_pad, rows_pad);
            tiles.gemm(MatMut::new(s, cols, rows_pad, rows_pad), k, q, Update::Set);
            st.update_cols::<S>(&job, s, rows_pad);
            // acc += bf16(P̃)·V. A full tile hides no pair, so no 0·NaN guard; P̃ past
            // `cols` is 0 and so are the padding keys of V.
            let p = if tiles.is_vnni() {
                // P̃ᵀ interleaved over keys is P̃ read pair by pair.
                packing.interleave_rows(s, cols, rows_pad, rows_pad, pt);
                Pairs::by_pair(pt, rows, cols.div_ceil(2), rows_pad)
            } else {
                // AMX tiles load rows of pairs: P̃ transposed back, rows of bf16.
                if tiles.is_model() {
                    crate::gemm::amx::MODEL_COLUMN_TILES.bump();
                }
                packing.transpose_rows(s, (cols, rows_pad), (rows, tk_pad), p16);
                Pairs::of_u16(p16, rows, cols.div_ceil(2), tk_pad / 2)
            };
            let acc = MatMut::new(&mut *st.acc, rows, d_pad, d_pad);
            let v = Pairs::of_u32(vp, cols.div_ceil(2), d_pad, d_pad);
            tiles.gemm(acc, p, v, Update::Add);
        }
        return;
    }
    // SAFETY: the engine's and `S`'s features are this function's contract; operands
    // checked when made.
    unsafe {
        // x = Q·Kᵀ, scaled and masked in `update` as on every path
        let q = Pairs::of_u16(q16, rows, d_pad / 2, d_pad / 2);
        let s_mat = MatMut::new(s, rows, tk_pad, tk_pad);
        tiles.gemm(
            s_mat,
            q,
            Pairs::of_u32(kp, d_pad / 2, tk_pad, tk_pad),
            Update::Set,
        );
        // m, l, P̃ = e^(x − m)
        st.update::<S>(&job, s);
        let acc = MatMut::new(&mut *st.acc, rows, d_pad, d_pad);
        // acc += P̃·V, with the guard against 0 · NaN: on the exact f32 values where a
        // non-finite value some rows see remains.
        match unseen.pairs(&job, vp, d_pad, v_finite) {
            Ok(vp) => {
                // bf16(P̃) · V; P̃ past `cols` is 0 and so are the padding keys of V.
                packing.round_rows(s, rows, tk_pad, tk_pad, p16);
                let p = Pairs::of_u16(p16, rows, cols.div_ceil(2), tk_pad / 2);
                tiles.gemm(
                    acc,
                    p,
                    Pairs::of_u32(vp, cols.div_ceil(2), d_pad, d_pad),
                    Update::Add,
                );
            }
            Err(v) => {
                let p = MatRef::new(s, rows, cols, tk_pad);
                let v = MatRef::new(v, cols, d_pad, d_pad);
                gemm_add::<S>(acc, p, v, Some(|r, c| job.visible(r, c)));
            }
        }
    }
}
