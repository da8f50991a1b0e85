//! The backward's tasks: (batch row, kv head, chunk of key tiles), each owning the `dK`,
//! `dV` of its key tiles and a `dQ` buffer of its own; within a task, every (query tile,
//! key tile) pair the mask lets through runs one step (`step.rs`, or `bf16.rs` where the
//! bf16 dot products are taken).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::bf16;
use super::delta::RowTerms;
use super::grads::ParamGradsMut;
use super::score_grads::{ModGrads, ModSpec};
use super::step::Step;
use crate::block::Tile;
use crate::call::Call;
use crate::gemm::{MatMut, MatRef};
use crate::pack::{self, Span};
use crate::params::Params;
use crate::simd;
use crate::softmax::{Geom, TileJob, Unseen};
use crate::view::{Element, View};

/// Chunks of key tiles per (b, kv head) aim for this many tasks in all, so that a call with
/// few heads still spreads over the cores...
const TARGET_TASKS: usize = 16;
/// ...but their private `dQ` buffers stay under this many bytes per (b, kv head).
const CHUNK_DQ_BYTES: usize = 32 << 20;

/// Everything the tasks share: the call, and what the backward adds to it.
pub(super) struct Pass<'a, 'b, T> {
    call: Call<'a, 'b, T>,
    dout: &'a View<'b, f32>,
    lse: &'a [f32],
    /// `D_i = dO_i · O_i`, one per query row.
    delta: Vec<f32>,
    /// Per (b, query head, query tile): every Q and dO value of the tile is finite.
    rows_finite: Vec<bool>,
    pub g: Geom,
    /// Chunks of key tiles per (b, kv head): tasks of their own.
    chunks: usize,
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

/// What one task hands back: its `dQ` buffer (`group · L_q × d_pad`) and its sums for the
/// parameter gradients (its key tiles' `dK`, `dV` it writes straight into the caller's
/// buffers, which it owns outright).
pub(super) struct ChunkResult<'a> {
    pub dq: Vec<f32>,
    pub mods: Option<ModGrads<'a>>,
}

/// The caller's `dK` and `dV` rows of one key tile (`cols × d` each).
type TileOut<'o> = (&'o mut [f32], &'o mut [f32]);

impl<'a, 'b, T: Element> Pass<'a, 'b, T> {
    /// The tasks of a checked call, given its row terms and the parameter gradients the
    /// caller wants (`pg`).
    pub fn new(
        call: Call<'a, 'b, T>,
        (dout, lse): (&'a View<'b, f32>, &'a [f32]),
        rows: RowTerms,
        params: &Params,
        pg: &ParamGradsMut,
    ) -> Self {
        let (dims, g) = (call.dims, call.geom());
        let mods = ModSpec {
            bias: params.bias.filter(|_| pg.dbias.is_some()).map(|b| b.dims()),
            alibi: params.alibi.is_some() && pg.dalibi.is_some(),
            // Filled from the call's table by `Pass::mods`.
            buckets: None,
            num_buckets: params.rel.map_or(0, |r| r.num_buckets()),
            group: dims.group(),
            lq: dims.lq,
            lk: dims.lk,
            shift: call.block.position_shift(),
        };
        let want_rel = params.rel.is_some() && pg.drel.is_some();
        let dq_bytes = dims.group() * dims.lq * g.d_pad * 4;
        let chunks = TARGET_TASKS
            .div_ceil(dims.batch * dims.kv_heads)
            .min(CHUNK_DQ_BYTES / dq_bytes.max(1))
            .clamp(1, call.block.grid().1);
        #[cfg(target_arch = "x86_64")]
        let qs = (T::IS_BF16 && bf16::exactly_bf16(dout))
            .then(crate::gemm::amx::DotPath::now)
            .flatten()
            .map(|path| bf16::query_side(call.q, dout, call.block, &g, path));
        Pass {
            call,
            dout,
            lse,
            delta: rows.delta,
            rows_finite: rows.rows_finite,
            g,
            chunks,
            mods,
            want_rel,
            #[cfg(target_arch = "x86_64")]
            qs,
        }
    }
}

impl<T: Element> Pass<'_, '_, T> {
    /// The tasks of kv head `bhk = b · H_kv + hk`, one per chunk of its key tiles, run in
    /// parallel and returned in chunk order; each writes its key tiles' rows of the head's
    /// `dk` and `dv` (`L_k × d` each, every value overwritten unless the call is cancelled).
    pub fn tasks(&self, bhk: usize, (dk, dv): (&mut [f32], &mut [f32])) -> Vec<ChunkResult<'_>> {
        let kv_heads = self.call.dims.kv_heads;
        let (b, hk) = (bhk / kv_heads, bhk % kv_heads);
        // Key tile `kt` belongs to chunk `kt % chunks` (see `chunk`).
        let rows = self.g.tk * self.call.dims.d;
        let mut outs: Vec<Vec<TileOut>> = (0..self.chunks).map(|_| Vec::new()).collect();
        for (kt, tile) in dk.chunks_mut(rows).zip(dv.chunks_mut(rows)).enumerate() {
            outs[kt % self.chunks].push(tile);
        }
        outs.into_par_iter()
            .enumerate()
            .map(|(c, tiles)| self.chunk((b, hk), c, self.chunks, tiles))
            .collect()
    }

    /// The parameter gradients wanted, with the call's buckets where `drel` is one of them.
    pub fn mods(&self) -> ModSpec<'_> {
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
    /// mask's work is shared evenly), whose `dK`, `dV` rows are `outs`, in that order.
    fn chunk(
        &self,
        (b, hk): (usize, usize),
        c: usize,
        chunks: usize,
        outs: Vec<TileOut>,
    ) -> ChunkResult<'_> {
        let (g, call) = (self.g, &self.call);
        let (tq, lq, lk) = (call.block.tile_q(), call.dims.lq, call.dims.lk);
        let group = call.dims.group();
        let (nq, nk) = call.block.grid();
        // A call of fewer query rows than a tile (a decode step's one) needs no more.
        let mut sc = Scratch::new(
            &g,
            tq.min(lq),
            call.bias.is_some(),
            call.dropout.is_some(),
            call.softcap.is_some(),
        );
        let spec = self.mods();
        let mut mods = spec.any().then(|| ModGrads::new(spec, tq, g.tk, g.tk_pad));
        let mut dq = vec![0f32; group * lq * g.d_pad];
        #[cfg(target_arch = "x86_64")]
        let mut bf = self
            .qs
            .as_ref()
            .map(|qs| (bf16::KeySide::new(&g), bf16::Work16::new(&g, qs.tq_pad)));
        // Every (query head of the group, query tile) that sees the current key tile.
        let mut pairs: Vec<(usize, usize, Option<&[u64]>)> = Vec::with_capacity(group * nq);
        for (kt, (dk_out, dv_out)) in (c..nk).step_by(chunks).zip(outs) {
            if call.cancelled() {
                break; // the call ends in `AttnError::Cancelled`: the partial sums are dropped
            }
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
                // No query sees these keys: their gradients are 0.
                dk_out.fill(0.0);
                dv_out.fill(0.0);
                continue;
            }
            let keys = Span {
                b,
                h: hk,
                start: j0,
                len: cols,
            };
            let kv_tile = (g.tk_pad, g.d_pad);
            // Where one (query head, query tile) pair of this key tile sits.
            let at = |hi, qt, bits| PairAt {
                b,
                h: hk * group + hi,
                qt,
                kt,
                bits,
            };
            if let Some(m) = &mut mods {
                m.start_tile();
            }
            #[cfg(target_arch = "x86_64")]
            if let (Some(qs), Some((ks, w))) = (&self.qs, &mut bf) {
                pack::pairs_over_features(call.k, keys, kv_tile, &mut ks.kt);
                pack::pairs_over_features(call.v, keys, kv_tile, &mut ks.vt);
                ks.k_finite = pack::pairs_over_rows(call.k, keys, kv_tile, &mut ks.k);
                ks.dkt.fill(0.0);
                ks.dvt.fill(0.0);
                for &(hi, qt, bits) in &pairs {
                    let dq = &mut dq[(hi * lq + qt * tq) * g.d_pad..];
                    self.pair16(qs, (ks, w), &mut sc, dq, at(hi, qt, bits), mods.as_mut());
                }
                ks.transpose_into(&g, call.scale, &mut sc.dk, &mut sc.dv);
                unpad(&sc.dk, (g.d, g.d_pad), dk_out);
                unpad(&sc.dv, (g.d, g.d_pad), dv_out);
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
                self.pair(&mut sc, dq, at(hi, qt, bits), k_finite, mods.as_mut());
            }
            // dK = s · dSᵀ·Q
            sc.dk.iter_mut().for_each(|x| *x *= call.scale);
            unpad(&sc.dk, (g.d, g.d_pad), dk_out);
            unpad(&sc.dv, (g.d, g.d_pad), dv_out);
            if let Some(m) = &mut mods {
                m.end_tile(kt);
            }
        }
        ChunkResult { dq, mods }
    }

    /// The job of one (query tile, key tile) pair, with its bias tile and dropout keys
    /// written into the scratch, and the first row's index among all query rows.
    fn job<'s>(
        &'s self,
        bias: &'s mut [f32],
        drop_keys: &'s mut [u32],
        at: PairAt<'s>,
    ) -> (TileJob<'s>, usize) {
        let PairAt { b, h, qt, kt, bits } = at;
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
        let PairAt { b, h, qt, kt, .. } = at;
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
        let PairAt {
            b,
            h,
            qt,
            kt: kt_at,
            ..
        } = at;
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

/// Where one (query tile, key tile) pair is.
#[derive(Clone, Copy)]
struct PairAt<'a> {
    b: usize,
    /// The query head.
    h: usize,
    /// The query tile and the key tile.
    qt: usize,
    kt: usize,
    /// The pair's block-mask bitmap; `None` for a full tile.
    bits: Option<&'a [u64]>,
}

/// The key tile's gradient rows of `d_pad` values in `src` into `dst`'s rows of `d` (as
/// many as `dst` holds: the tile's keys).
fn unpad(src: &[f32], (d, d_pad): (usize, usize), dst: &mut [f32]) {
    for (o, s) in dst.chunks_exact_mut(d).zip(src.chunks(d_pad)) {
        o.copy_from_slice(&s[..d]);
    }
}

/// Rows read in place when they hold exactly the padded number of features.
fn in_place<'a>(rows: Option<(&'a [f32], usize)>, g: &Geom) -> Option<(&'a [f32], usize)> {
    rows.filter(|_| g.d == g.d_pad)
}
