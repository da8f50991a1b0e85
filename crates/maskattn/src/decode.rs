//! The forward for few queries against many keys (a decode step with a KV cache).
//!
//! The work is memory-bound: every key and value is read once for a handful of queries. So
//! the keys of each (batch row, kv head) are split into chunks, one task each, and a task
//! streams its keys once past *all* query rows of the kv head's group (query heads ×
//! queries), reading an f32 cache in place. Scores are dot products (a key row against each
//! query row, no transposed copy of the keys); the online softmax is `softmax`'s, as
//! on every path, and so is the merge of the chunks' states ([`Online::merge`], the LSE rule
//! of docs/design.md section 1: `LSE = logaddexp(LSE_a, LSE_b)`,
//! `O = e^(LSE_a−LSE) O_a + e^(LSE_b−LSE) O_b`).
//! The number of chunks depends on the shape only, so results do not depend on threads.

use rayon::prelude::*;

use crate::block::Tile;
use crate::call::Call;
use crate::gemm::{gemm, gemm_add, MatMut, MatRef, Update};
use crate::pack::{self, pad16, Span};
use crate::params::DropTile;
use crate::simd::{self, Simd, WithSimd};
use crate::softmax::{Geom, Online, OnlineBufs, TileJob, Unseen};
use crate::view::{Element, View};

/// Calls with at most this many queries take the decode path.
pub(crate) const DECODE_MAX_LQ: usize = 4;
/// From this many query rows on, scores come from one product `K · Qᵀ` (every key element
/// broadcast once to all rows) instead of a dot product per (row, key), whose horizontal
/// sums then cost more than the product's idle lanes.
const PRODUCT_MIN_ROWS: usize = 12;
/// Key chunks per (b, kv head) aim for this many tasks in all.
const TARGET_TASKS: usize = 32;

pub(crate) fn forward<T: Element>(call: &Call<T>, out: &mut [f32], lse: &mut [f32]) {
    let (dims, g) = (call.dims, call.geom());
    let (group, lq, d) = (dims.group(), dims.lq, dims.d);
    let nk = call.block.grid().1;
    let chunks = TARGET_TASKS
        .div_ceil(dims.batch * dims.kv_heads)
        .clamp(1, nk);
    let per_chunk = nk.div_ceil(chunks);
    out.par_chunks_mut(group * lq * d)
        .zip(lse.par_chunks_mut(group * lq))
        .enumerate()
        .for_each(|(bhk, (out, lse))| {
            let (b, hk) = (bhk / dims.kv_heads, bhk % dims.kv_heads);
            let parts: Vec<OnlineBufs> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    chunk(
                        call,
                        &g,
                        (b, hk),
                        c * per_chunk..((c + 1) * per_chunk).min(nk),
                    )
                })
                .collect();
            // The chunks start without the sink (each would count it once more): it is in
            // the state they are merged into, once. Row r of the group is a query of head
            // hk·group + r / lq.
            let rows = group * lq;
            let mut all = OnlineBufs::new(rows, g.d_pad, |r| call.sink(hk * group + r / lq));
            let mut all = all.online();
            all.merge(&parts, rows, g.d_pad);
            all.finish(d, g.d_pad, out, lse);
        });
}

/// The query rows of one kv head's group, as every key tile of a chunk meets them: row `r`
/// is query `r % L_q` of head `hk·group + r / L_q`.
struct Queries {
    rows: usize,
    /// Q rows (`rows × d_pad`); the scale goes on the products in `Online::update`, as in
    /// the tiled forward.
    q: Vec<f32>,
    /// Scores come from the product `K · Qᵀ` ([`PRODUCT_MIN_ROWS`]); then `Qᵀ`
    /// (`d_pad × rows_pad`) and the product's tile (`tk_pad × rows_pad`), else empty.
    product: bool,
    qt: Vec<f32>,
    st: Vec<f32>,
    rows_pad: usize,
    /// Dropout's key per row (empty without dropout).
    drop_keys: Vec<u32>,
}

impl Queries {
    fn new<T: Element>(call: &Call<T>, g: &Geom, (b, hk): (usize, usize)) -> Self {
        let dims = call.dims;
        let (lq, group) = (dims.lq, dims.group());
        let rows = group * lq;
        let head_row = |r: usize| (hk * group + r / lq, r % lq);
        let mut q = vec![0f32; rows * g.d_pad];
        for (r, dst) in q.chunks_exact_mut(g.d_pad).enumerate() {
            let (h, i) = head_row(r);
            let span = Span {
                b,
                h,
                start: i,
                len: 1,
            };
            pack::rows(call.q, span, g.d_pad, dst);
        }
        let drop_keys: Vec<u32> = match call.dropout {
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
            for (r, row) in q.chunks_exact(g.d_pad).enumerate() {
                for (x, &val) in row.iter().enumerate() {
                    qt[x * rows_pad + r] = val;
                }
            }
        }
        let st = vec![0f32; if product { g.tk_pad * rows_pad } else { 0 }];
        Queries {
            rows,
            q,
            product,
            qt,
            st,
            rows_pad,
            drop_keys,
        }
    }
}

/// The rows' visibility of key tile `kt` into `bits` (`rows × words`), gathered from their
/// block-mask tiles: `None` where no row sees the tile, else whether every row sees all of
/// it.
fn tile_bits<T: Element>(
    call: &Call<T>,
    g: &Geom,
    (b, hk, kt): (usize, usize, usize),
    bits: &mut [u64],
) -> Option<bool> {
    let (lq, group, tq) = (call.dims.lq, call.dims.group(), call.block.tile_q());
    let (mut any, mut all) = (false, true);
    for (r, dst) in bits.chunks_exact_mut(g.words).enumerate() {
        let (h, i) = (hk * group + r / lq, r % lq);
        match call.block.tile(b, h, i / tq, kt) {
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
    any.then_some(all)
}

/// Rows of a tile and the distance between them.
type Rows<'a> = (&'a [f32], usize);

/// A key tile's key and value rows (`cols × d_pad`) with their row strides, and whether
/// the values may skip the guard against `0 · NaN` (every row sees every key, or every
/// value is finite). Where every row sees every key and the storage is f32, the cache is
/// read in place (V then needs whole vectors per row, so `d` must be a multiple of 16);
/// else the rows are packed into `kbuf`, `vbuf`.
fn keys_values<'a, T: Element>(
    (k, v): (&'a View<T>, &'a View<T>),
    span: Span,
    (g, all): (&Geom, bool),
    (kbuf, vbuf): (&'a mut [f32], &'a mut [f32]),
) -> (Rows<'a>, Rows<'a>, bool) {
    let direct = k
        .f32_rows(span.b, span.h, span.start)
        .zip(v.f32_rows(span.b, span.h, span.start))
        .filter(|_| all && g.d == g.d_pad);
    if let Some((kr, vr)) = direct {
        return (kr, vr, true);
    }
    pack::rows(k, span, g.d_pad, kbuf);
    pack::rows(v, span, g.d_pad, vbuf);
    let finite = all || pack::all_finite(&vbuf[..span.len * g.d_pad]);
    ((&kbuf[..], g.d_pad), (&vbuf[..], g.d_pad), finite)
}

/// Streams key tiles `tiles` of kv head `(b, hk)` past every query row of its group: per
/// tile, the rows' visibility, the bias tile, the keys and values (read in place or
/// packed), the guard against `0 · NaN`, then the [`Step`].
fn chunk<T: Element>(
    call: &Call<T>,
    g: &Geom,
    (b, hk): (usize, usize),
    tiles: std::ops::Range<usize>,
) -> OnlineBufs {
    let (k, v, bias) = (call.k, call.v, call.bias);
    let (lq, lk, group) = (call.dims.lq, call.dims.lk, call.dims.group());
    let g = *g;
    let mut qs = Queries::new(call, &g, (b, hk));
    let rows = qs.rows;
    let mut state = OnlineBufs::new(rows, g.d_pad, |_| None);
    let tile_len = g.tk_pad * g.d_pad;
    let (mut kbuf, mut vbuf) = (vec![0f32; tile_len], vec![0f32; tile_len]);
    let mut s = vec![0f32; rows * g.tk_pad];
    let mut bits = vec![0u64; rows * g.words];
    let mut bias_tile = vec![0f32; if bias.is_some() { rows * g.tk_pad } else { 0 }];
    let mut unseen = Unseen::new(g.words, tile_len);
    for kt in tiles {
        let j0 = kt * g.tk;
        let cols = (lk - j0).min(g.tk);
        let Some(all) = tile_bits(call, &g, (b, hk, kt), &mut bits) else {
            continue;
        };
        if let Some(bs) = bias {
            for (r, dst) in bias_tile.chunks_exact_mut(g.tk_pad).enumerate() {
                let (h, i) = (hk * group + r / lq, r % lq);
                bs.tile((b, h), (i, 1), (j0, cols), (g.tk_pad, dst));
            }
        }
        let job = TileJob {
            g,
            rows,
            cols,
            bits: (!all).then_some(&bits[..]),
            scale: call.scale,
            bias: bias.map(|_| &bias_tile[..]),
            drop: call.dropout.map(|dr| DropTile::new(dr, &qs.drop_keys, j0)),
            softcap: call.softcap,
            pos: call.pos_rows((hk * group, 0, lq), j0),
        };
        let span = Span {
            b,
            h: hk,
            start: j0,
            len: cols,
        };
        let ((k_tile, k_ld), (v_tile, v_ld), finite) =
            keys_values((k, v), span, (&g, all), (&mut kbuf, &mut vbuf));
        // The guard against 0 · NaN, as on every path.
        let (v_tile, exact) = unseen.rows(&job, v_tile, v_ld, finite);
        let step = Step {
            job,
            q: MatRef::new(&qs.q, rows, g.d_pad, g.d_pad),
            k: MatRef::new(k_tile, cols, g.d_pad, k_ld),
            qt: qs
                .product
                .then(|| MatRef::new(&qs.qt, g.d, qs.rows_pad, qs.rows_pad)),
            v: MatRef::new(v_tile, cols, g.d_pad, v_ld),
            exact,
            s: &mut s,
            st: &mut qs.st,
            state: state.online(),
        };
        // SAFETY: the operands were checked as they were made; `s`, `st` and the state are
        // sized above for `rows` rows.
        unsafe { simd::run(step) };
    }
    state
}

/// One key tile against every query row: products as dot products (a key row is loaded once
/// and met by each query row) or, given `qt`, as the matrix product `K · Qᵀ` into `st`;
/// then the softmax update (which scales them) and `P̃·V`.
///
/// The matrix product sums each `q·k` in the order the backward does, so its `P` is the
/// forward's to the bit; the dot products sum in another order (lanes over features), which
/// is as accurate but not bit-identical — they serve few rows, whose `dV` sums are short.
struct Step<'a> {
    job: TileJob<'a>,
    /// Q rows and key rows over the padded features (`rows × d_pad`, `cols × d_pad`: a
    /// packed tile, or a cache read in place where `d = d_pad`), `Qᵀ` (`d × rows_pad`) for
    /// the product form, value rows (`cols × d_pad`).
    q: MatRef<'a>,
    k: MatRef<'a>,
    qt: Option<MatRef<'a>>,
    v: MatRef<'a>,
    exact: bool,
    /// Scores `rows × tk_pad`; `K·Qᵀ` `tk_pad × rows_pad` for the product form.
    s: &'a mut [f32],
    st: &'a mut [f32],
    state: Online<'a>,
}

impl WithSimd for Step<'_> {
    type Output = ();

    #[inline(always)]
    unsafe fn with_simd<S: Simd>(self) {
        let Step {
            job,
            q,
            k,
            qt,
            v,
            exact,
            s,
            st,
            mut state,
        } = self;
        let (rows, cols, tk_pad, d_pad) = (job.rows, job.cols, job.g.tk_pad, job.g.d_pad);
        // SAFETY: `S`'s features are present (`simd::run`); operands checked when made,
        // and the raw reads below stay inside them (`r < rows`, `c < cols`, `x < d_pad`).
        unsafe {
            if let Some(qt) = qt {
                // x = (K·Qᵀ)ᵀ
                let rows_pad = qt.cols();
                let kq = MatMut::new(&mut *st, cols, rows_pad, rows_pad);
                gemm::<S>(kq, k.first_cols(job.g.d), qt, Update::Set);
                for r in 0..rows {
                    for c in 0..cols {
                        *s.get_unchecked_mut(r * tk_pad + c) = *st.get_unchecked(c * rows_pad + r);
                    }
                }
            } else {
                // x_ij = q_i · k_j, one dot product each
                let (qp, kp, k_ld) = (q.as_ptr(), k.as_ptr(), k.row_stride());
                for c in 0..cols {
                    let kr = kp.add(c * k_ld);
                    for r in 0..rows {
                        let qr = qp.add(r * d_pad);
                        let mut acc = S::splat(0.0);
                        for x in (0..d_pad).step_by(S::W) {
                            acc = S::fma(S::load(qr.add(x)), S::load(kr.add(x)), acc);
                        }
                        *s.get_unchecked_mut(r * tk_pad + c) = S::reduce_add(acc);
                    }
                }
            }
            // m, l, P̃ = e^(x − m); acc += P̃·V
            state.update::<S>(&job, s);
            let p = MatRef::new(s, rows, cols, tk_pad);
            let acc = MatMut::new(&mut *state.acc, rows, d_pad, d_pad);
            gemm_add::<S>(acc, p, v, exact.then_some(|r, c| job.visible(r, c)));
        }
    }
}
