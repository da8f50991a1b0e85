//! The mask vocabulary (docs/design.md section 2). Polarity everywhere: `true` = may attend.
//!
//! A [`Mask`] is a small description, not a matrix: structured masks are a few numbers,
//! and [`Mask::allowed`] answers for one `(b, h, i, j)`. Masks compose with `&`, `|`, `!`.
//! Before a kernel runs, a mask is compiled for one shape into a [`crate::BlockMask`].

use std::collections::VecDeque;
use std::sync::Arc;

use crate::error::{AttnError, Result};
use crate::mask_grid::{natten_check, swin_check, GridAttn};
pub use crate::mask_shape::MaskShape;

/// Where the diagonal of a causal mask sits when `L_q ≠ L_k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CausalAlign {
    /// Query `i` sees keys `j ≤ i + (L_k − L_q)`: the last query sees every key. What decoding
    /// with a KV cache needs; the default.
    BottomRight,
    /// Query `i` sees keys `j ≤ i`: PyTorch's `is_causal` when `L_q ≠ L_k`.
    TopLeft,
}

/// A user-supplied mask function `allowed(b, h, i, j)`.
pub type MaskFn = dyn Fn(usize, usize, usize, usize) -> bool + Send + Sync;

/// A boolean mask stored densely, broadcast over any dimension of size 1.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseMask {
    allowed: Arc<[bool]>,
    dims: [usize; 4],
}

impl DenseMask {
    /// `allowed` in row-major order over `dims = [B or 1, H or 1, L_q or 1, L_k or 1]`.
    pub fn new(allowed: impl Into<Arc<[bool]>>, dims: [usize; 4]) -> Result<Self> {
        let allowed = allowed.into();
        let n = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| AttnError::SizeOverflow {
                name: "dense mask",
                what: "values",
                factors: dims.to_vec(),
            })?;
        if allowed.len() != n {
            return Err(AttnError::Mask(format!(
                "dense mask holds {} values but its dims {dims:?} need {n}",
                allowed.len()
            )));
        }
        Ok(DenseMask { allowed, dims })
    }

    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    #[inline]
    pub fn get(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let [db, dh, dq, dk] = self.dims;
        let pick = |x: usize, n: usize| if n == 1 { 0 } else { x };
        self.allowed[((pick(b, db) * dh + pick(h, dh)) * dq + pick(i, dq)) * dk + pick(j, dk)]
    }
}

/// The terms of an `&` or `|`: at least two, none of them the same operator again. A
/// deque, so that chains grow in O(1) at either end (`a & chain` as well as `chain & a`).
/// Built only by `&` and `|` (no public constructor, no `Default`), so the invariant holds;
/// how chains grow is in `mask_tree.rs`, with the other walks of the tree.
#[derive(Clone)]
pub struct Terms(pub(crate) Arc<VecDeque<Mask>>);

impl Terms {
    pub fn iter(&self) -> std::collections::vec_deque::Iter<'_, Mask> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Which pairs `(query i, key j)` of batch row `b` and query head `h` may attend.
///
/// `Display` writes a mask in the grammar of [`crate::MaskExpr`] and `FromStr` reads it
/// back; masks that carry data print as their data term (`key-padding`, `documents`, ...).
/// Composites share their parts (`Clone` is cheap), and cloning, comparing, printing and
/// dropping never recurse, however deep the mask.
#[derive(Clone)]
pub enum Mask {
    /// Every pair.
    Full,
    /// Causal, with an explicit alignment when `L_q ≠ L_k`.
    Causal(CausalAlign),
    /// `i' − left ≤ j ≤ i' + right` with `i' = i + (L_k − L_q)` (bottom-right aligned).
    /// `usize::MAX` on a side means unbounded.
    Window { left: usize, right: usize },
    /// Fixed-size chunks of positions: `⌊j / size⌋ == ⌊i' / size⌋`, or with `earlier`
    /// `⌊j / size⌋ ≤ ⌊i' / size⌋`, where `i' = i + (L_k − L_q)` (bottom-right aligned).
    Chunks { size: usize, earlier: bool },
    /// Positions are the cells of a `height × width` grid in raster order (`L_k` of them);
    /// query `i'` and key `j` attend when both their rows and their columns are at most
    /// `radius` apart (`i' = i + (L_k − L_q)`).
    Neighbourhood {
        height: usize,
        width: usize,
        radius: usize,
    },
    /// NATTEN's neighbourhood attention (Hassani et al., 2023; dilation: DiNAT, 2022) on a
    /// `height × width` grid in raster order (`L_k` positions): query `i'` (bottom-right
    /// aligned) sees a `kernel × kernel` window of keys `dilation` apart, centred on it and
    /// shifted inwards at the borders so that it stays whole (see [`Mask::natten`]).
    Natten {
        height: usize,
        width: usize,
        kernel: usize,
        dilation: usize,
    },
    /// Swin Transformer's (shifted) windows on a `height × width` grid in raster order
    /// (`L_k` positions): after rolling the grid by `−shift`, query `i'` and key `j` are in
    /// the same `window × window` window and the same region of Swin's attention mask (see
    /// [`Mask::swin`]).
    Swin {
        height: usize,
        width: usize,
        window: usize,
        shift: usize,
    },
    /// WeNet's `subsequent_chunk_mask`: `⌊i'/size⌋ − left ≤ ⌊j/size⌋ ≤ ⌊i'/size⌋` with
    /// `i' = i + (L_k − L_q)`; `left = None`: every earlier chunk (see [`Mask::chunked`]).
    Chunked { size: usize, left: Option<usize> },
    /// Key padding by valid length: `j < lengths[b]` (one length, or one per batch row).
    KeyLengths(Arc<[usize]>),
    /// Key padding by a keep vector `[1 or B, L_k]`: `keep[b][j]`.
    KeyKeep { keep: Arc<[bool]>, rows: usize },
    /// Query padding by valid length: `i < lengths[b]`.
    QueryLengths(Arc<[usize]>),
    /// Packed documents: `query_ids[b][i] == key_ids[b][j]`, ids `[1 or B, L]`.
    Documents {
        query_ids: Arc<[i64]>,
        key_ids: Arc<[i64]>,
        rows: usize,
    },
    /// Prefix-LM: `j < prefix[b]` or causal (bottom-right aligned).
    Prefix(Arc<[usize]>),
    /// A dense boolean array broadcast over batch and heads.
    Dense(DenseMask),
    /// Any function. `per_batch_head == false` promises it ignores `b` and `h`, which lets
    /// the block mask be classified once for all of them.
    Func {
        f: Arc<MaskFn>,
        per_batch_head: bool,
    },
    /// A different mask for each query head.
    PerHead(Arc<[Mask]>),
    /// Every one of at least two masks (built by `&`, which keeps chains flat).
    And(Terms),
    /// Any one of at least two masks (built by `|`).
    Or(Terms),
    /// The pairs the inner mask hides (built by `!`; `!!m` is `m`).
    Not(Arc<Mask>),
}

impl Mask {
    pub fn full() -> Self {
        Mask::Full
    }

    /// Causal, bottom-right aligned (the default; see [`CausalAlign`]).
    pub fn causal() -> Self {
        Mask::Causal(CausalAlign::BottomRight)
    }

    /// Causal, top-left aligned (PyTorch's `is_causal`).
    pub fn causal_top_left() -> Self {
        Mask::Causal(CausalAlign::TopLeft)
    }

    /// Sliding window: `left` keys before the (aligned) diagonal and `right` after it.
    /// `window(w, 0)` is a causal local window of `w + 1` keys.
    pub fn window(left: usize, right: usize) -> Self {
        Mask::Window { left, right }
    }

    /// Local attention in fixed chunks of `size` positions: a query sees the keys of its own
    /// chunk only. `causal() & chunks(c)` is chunked attention as in Llama 4.
    pub fn chunks(size: usize) -> Self {
        Mask::Chunks {
            size,
            earlier: false,
        }
    }

    /// Block-causal: a query sees its whole chunk of `size` positions and every earlier
    /// chunk — streaming encoders (chunk-wise speech recognition), frame-causal video. Add
    /// `& window(left, usize::MAX)` to bound the left context.
    pub fn block_causal(size: usize) -> Self {
        Mask::Chunks {
            size,
            earlier: true,
        }
    }

    /// 2-D neighbourhood attention for images: the `L_k = height · width` positions are the
    /// patches of a grid in raster order, and a patch sees the `(2·radius + 1)²` square of
    /// patches around it (fewer at the borders). For video frames or spectrograms too.
    pub fn neighbourhood(height: usize, width: usize, radius: usize) -> Self {
        Mask::Neighbourhood {
            height,
            width,
            radius,
        }
    }

    /// NATTEN's neighbourhood attention on a `height × width` patch grid in raster order
    /// (`L_k = height · width`): patch `(y, x)` sees the patches `(y', x')` with
    /// `|clamp(y, k/2, height − 1 − k/2) − y'| ≤ k/2` and the same for `x` (`k = kernel`,
    /// odd, at most `height` and `width`): a whole `k × k` window everywhere, its centre
    /// moved inwards at the borders. [`Mask::natten_dilated`] spreads it out.
    pub fn natten(height: usize, width: usize, kernel: usize) -> Self {
        Mask::natten_dilated(height, width, kernel, 1)
    }

    /// Dilated neighbourhood attention (DiNAT): each dilation group — the rows (columns)
    /// with the same index mod `dilation` — is a sub-grid of its own, and a patch sees the
    /// clamped `kernel × kernel` window of its sub-grid, which on the grid is `dilation`
    /// apart. `kernel · dilation` must be at most `height` and `width`, as NATTEN requires.
    pub fn natten_dilated(height: usize, width: usize, kernel: usize, dilation: usize) -> Self {
        Mask::Natten {
            height,
            width,
            kernel,
            dilation,
        }
    }

    /// Swin Transformer's window attention on a `height × width` patch grid in raster order
    /// (`L_k = height · width`): the grid rolled by `(−shift, −shift)` is cut into
    /// `window × window` windows, and two patches attend when their rolled positions share
    /// a window and a region of Swin's shifted-window mask (the slices `[0, n − window)`,
    /// `[n − window, n − shift)`, `[n − shift, n)` of each axis), which keeps patches that
    /// the roll wrapped around apart. `shift = 0`: plain windows. Tokens stay in the
    /// un-rolled order: query and key are original positions.
    pub fn swin(height: usize, width: usize, window: usize, shift: usize) -> Self {
        Mask::Swin {
            height,
            width,
            window,
            shift,
        }
    }

    /// WeNet's chunk mask for streaming encoders (`subsequent_chunk_mask`): query `i` sees
    /// the keys `[max((c − left)·size, 0), min((c + 1)·size, L_k))` where `c = ⌊i'/size⌋`,
    /// its own chunk and `left` chunks before it; `left = None` (WeNet's `−1`) every earlier
    /// chunk, which is [`Mask::block_causal`]. Bottom-right aligned, `i' = i + (L_k − L_q)`,
    /// so the last queries of a KV-cached stream see what they would in the whole utterance.
    pub fn chunked(size: usize, left: Option<usize>) -> Self {
        Mask::Chunked { size, left }
    }

    /// The image-grid geometry of a `natten` or `swin` mask.
    pub(crate) fn grid_attn(&self) -> Option<GridAttn> {
        match *self {
            Mask::Natten {
                height,
                width,
                kernel,
                dilation,
            } => Some(GridAttn::Natten {
                height,
                width,
                kernel,
                dilation,
            }),
            Mask::Swin {
                height,
                width,
                window,
                shift,
            } => Some(GridAttn::Swin {
                height,
                width,
                window,
                shift,
            }),
            _ => None,
        }
    }

    /// Key padding: batch row `b` has `lengths[b]` valid keys (or one length for all rows).
    /// The grammar's `key-padding` (also the keep-vector form, [`Mask::key_keep`]).
    pub fn key_padding(lengths: impl Into<Arc<[usize]>>) -> Self {
        Mask::KeyLengths(lengths.into())
    }

    /// Key padding from a `[1 or B, L_k]` keep vector, `true` = a real key.
    pub fn key_keep(keep: impl Into<Arc<[bool]>>, rows: usize) -> Self {
        Mask::KeyKeep {
            keep: keep.into(),
            rows,
        }
    }

    /// PyTorch's `key_padding_mask` (`true` = *ignore* this key), converted explicitly.
    pub fn from_torch_key_padding(ignore: &[bool], rows: usize) -> Self {
        Mask::key_keep(ignore.iter().map(|&x| !x).collect::<Vec<_>>(), rows)
    }

    /// Query padding: batch row `b` has `lengths[b]` valid queries (the grammar's
    /// `query-padding`).
    pub fn query_padding(lengths: impl Into<Arc<[usize]>>) -> Self {
        Mask::QueryLengths(lengths.into())
    }

    /// Packed sequences for self-attention: `ids` is `[1 or B, L]`, a document id per position;
    /// a query sees only keys of its own document.
    pub fn documents(ids: impl Into<Arc<[i64]>>, rows: usize) -> Self {
        let ids = ids.into();
        Mask::Documents {
            query_ids: ids.clone(),
            key_ids: ids,
            rows,
        }
    }

    /// Documents for cross attention: separate ids for queries `[rows, L_q]` and keys `[rows, L_k]`.
    pub fn documents_cross(
        query_ids: impl Into<Arc<[i64]>>,
        key_ids: impl Into<Arc<[i64]>>,
        rows: usize,
    ) -> Self {
        Mask::Documents {
            query_ids: query_ids.into(),
            key_ids: key_ids.into(),
            rows,
        }
    }

    /// Prefix-LM: the first `p` keys are visible to every query, causal after them.
    pub fn prefix(p: usize) -> Self {
        Mask::Prefix(Arc::from([p]))
    }

    /// Prefix-LM with one prefix length per batch row.
    pub fn prefix_per_batch(p: impl Into<Arc<[usize]>>) -> Self {
        Mask::Prefix(p.into())
    }

    pub fn dense(mask: DenseMask) -> Self {
        Mask::Dense(mask)
    }

    /// Any function of `(b, h, i, j)`.
    pub fn from_fn(f: impl Fn(usize, usize, usize, usize) -> bool + Send + Sync + 'static) -> Self {
        Mask::Func {
            f: Arc::new(f),
            per_batch_head: true,
        }
    }

    /// A function of `(i, j)` alone, the same for every batch row and head.
    pub fn from_fn_ij(f: impl Fn(usize, usize) -> bool + Send + Sync + 'static) -> Self {
        Mask::Func {
            f: Arc::new(move |_, _, i, j| f(i, j)),
            per_batch_head: false,
        }
    }

    pub fn per_head(masks: impl Into<Arc<[Mask]>>) -> Self {
        Mask::PerHead(masks.into())
    }

    /// Whether query `i` of batch row `b`, head `h` may attend to key `j`.
    /// Assumes the mask was [validated](Mask::validate) for `shape`.
    pub fn allowed(&self, s: &MaskShape, b: usize, h: usize, i: usize, j: usize) -> bool {
        let row = |rows: usize| if rows == 1 { 0 } else { b };
        let per_b = |v: &[usize]| v[if v.len() == 1 { 0 } else { b }];
        match self {
            Mask::Full => true,
            Mask::Causal(align) => {
                let o = match align {
                    CausalAlign::BottomRight => s.bottom_right_offset(),
                    CausalAlign::TopLeft => 0,
                };
                j as i64 <= i as i64 + o
            }
            Mask::Window { left, right } => {
                let (lo, hi) = window_band(s, *left, *right);
                let d = j as i64 - i as i64;
                lo <= d && d <= hi
            }
            Mask::Chunks { size, earlier } => {
                let (qc, kc) = chunk_of(s, *size, i, j);
                if *earlier {
                    kc <= qc
                } else {
                    kc == qc
                }
            }
            Mask::Neighbourhood { width, radius, .. } => {
                let qi = i as i64 + s.bottom_right_offset();
                qi >= 0 && {
                    let (qi, w) = (qi as usize, *width);
                    (qi / w).abs_diff(j / w) <= *radius && (qi % w).abs_diff(j % w) <= *radius
                }
            }
            Mask::Natten { .. } | Mask::Swin { .. } => {
                let qi = i as i64 + s.bottom_right_offset();
                qi >= 0 && self.grid_attn().is_some_and(|g| g.allowed(qi as usize, j))
            }
            Mask::Chunked { size, left } => {
                let (qc, kc) = chunk_of(s, *size, i, j);
                // `qc − kc` is in [0, i64::MAX) once `kc ≤ qc` (keys' chunks are ≥ 0).
                kc <= qc && left.is_none_or(|l| (qc - kc) as u64 <= l as u64)
            }
            Mask::KeyLengths(len) => j < per_b(len),
            Mask::KeyKeep { keep, rows } => keep[row(*rows) * s.lk + j],
            Mask::QueryLengths(len) => i < per_b(len),
            Mask::Documents {
                query_ids,
                key_ids,
                rows,
            } => query_ids[row(*rows) * s.lq + i] == key_ids[row(*rows) * s.lk + j],
            Mask::Prefix(p) => j < per_b(p) || j as i64 <= i as i64 + s.bottom_right_offset(),
            Mask::Dense(m) => m.get(b, h, i, j),
            Mask::Func { f, .. } => f(b, h, i, j),
            Mask::PerHead(m) => m[h].allowed(s, b, h, i, j),
            Mask::And(t) => t.iter().all(|m| m.allowed(s, b, h, i, j)),
            Mask::Or(t) => t.iter().any(|m| m.allowed(s, b, h, i, j)),
            Mask::Not(a) => !a.allowed(s, b, h, i, j),
        }
    }

    /// Checks that the mask's data fits `shape`: lengths per batch row, id vectors, dense
    /// dims that broadcast, one mask per head; that the mask is at most
    /// [`Mask::MAX_DEPTH`] deep; and that `L_q` and `L_k` fit in an `i64` (so that
    /// `L_k − L_q` and every aligned position are exact).
    pub fn validate(&self, s: &MaskShape) -> Result<()> {
        for (len, what) in [(s.lq, "L_q"), (s.lk, "L_k")] {
            if i64::try_from(len).is_err() {
                return Err(AttnError::SizeOverflow {
                    name: "mask shape",
                    what,
                    factors: vec![len],
                });
            }
        }
        let depth = self.depth();
        if depth > Mask::MAX_DEPTH {
            return Err(AttnError::MaskTooDeep {
                depth,
                max: Mask::MAX_DEPTH,
            });
        }
        self.validate_data(s)
    }

    /// [`Mask::validate`] below the checks of the shape and the depth (which bound this
    /// recursion).
    fn validate_data(&self, s: &MaskShape) -> Result<()> {
        let err = |m: String| Err(AttnError::Mask(m));
        let rows_ok = |what: &str, rows: usize| {
            if rows == 1 || rows == s.batch {
                Ok(())
            } else {
                err(format!(
                    "{what} has {rows} batch rows; expected 1 or {}",
                    s.batch
                ))
            }
        };
        let lengths_ok = |what: &str, v: &[usize], limit: usize, limit_name: &str| {
            rows_ok(what, v.len())?;
            match v.iter().find(|&&x| x > limit) {
                Some(x) => err(format!("{what} {x} exceeds {limit_name} = {limit}")),
                None => Ok(()),
            }
        };
        match self {
            Mask::Full | Mask::Causal(_) | Mask::Window { .. } | Mask::Func { .. } => Ok(()),
            Mask::Chunks { size: 0, .. } => err("chunk size must be at least 1".into()),
            Mask::Chunks { .. } => Ok(()),
            Mask::Chunked { size: 0, .. } => {
                err("chunked: the chunk size C must be at least 1".into())
            }
            Mask::Chunked { .. } => Ok(()),
            Mask::Neighbourhood { height, width, .. } => {
                grid_fits("neighbourhood", *height, *width, s)
            }
            Mask::Natten {
                height,
                width,
                kernel,
                dilation,
            } => {
                natten_check(*height, *width, *kernel, *dilation)
                    .or_else(|e| err(format!("{self}: {e}")))?;
                grid_fits("natten", *height, *width, s)
            }
            Mask::Swin {
                height,
                width,
                window,
                shift,
            } => {
                swin_check(*height, *width, *window, *shift)
                    .or_else(|e| err(format!("{self}: {e}")))?;
                grid_fits("swin", *height, *width, s)
            }
            Mask::KeyLengths(v) => lengths_ok("key length", v, s.lk, "L_k"),
            Mask::QueryLengths(v) => lengths_ok("query length", v, s.lq, "L_q"),
            Mask::Prefix(v) => lengths_ok("prefix length", v, s.lk, "L_k"),
            Mask::KeyKeep { keep, rows } => {
                rows_ok("key keep vector", *rows)?;
                // `rows` is 1 or B here; B · L_k may still not fit.
                if Some(keep.len()) != rows.checked_mul(s.lk) {
                    return err(format!(
                        "key keep vector has {} values; expected {rows} x L_k = {}",
                        keep.len(),
                        rows.saturating_mul(s.lk)
                    ));
                }
                Ok(())
            }
            Mask::Documents {
                query_ids,
                key_ids,
                rows,
            } => {
                rows_ok("document ids", *rows)?;
                if Some(query_ids.len()) != rows.checked_mul(s.lq)
                    || Some(key_ids.len()) != rows.checked_mul(s.lk)
                {
                    return err(format!(
                        "document ids have {} query and {} key entries; expected {rows} x L_q = {} and {rows} x L_k = {}",
                        query_ids.len(),
                        key_ids.len(),
                        rows.saturating_mul(s.lq),
                        rows.saturating_mul(s.lk)
                    ));
                }
                Ok(())
            }
            Mask::Dense(m) => {
                let want = [s.batch, s.heads, s.lq, s.lk];
                let names = ["batch", "heads", "L_q", "L_k"];
                for ((&got, &n), name) in m.dims.iter().zip(want.iter()).zip(names) {
                    if got != 1 && got != n {
                        return err(format!(
                            "dense mask dims {:?} do not broadcast to [{}, {}, {}, {}]: {name} is {got}, expected 1 or {n}",
                            m.dims, s.batch, s.heads, s.lq, s.lk
                        ));
                    }
                }
                Ok(())
            }
            Mask::PerHead(m) => {
                if m.len() != s.heads {
                    return err(format!(
                        "per-head mask lists {} masks for {} query heads",
                        m.len(),
                        s.heads
                    ));
                }
                m.iter().try_for_each(|x| x.validate_data(s))
            }
            Mask::And(t) | Mask::Or(t) => t.iter().try_for_each(|x| x.validate_data(s)),
            Mask::Not(a) => a.validate_data(s),
        }
    }

    /// Whether the mask can differ between batch rows (decides how much a block mask stores).
    pub fn varies_with_batch(&self) -> bool {
        self.nodes().any(|m| match m {
            Mask::KeyLengths(v) | Mask::QueryLengths(v) | Mask::Prefix(v) => v.len() > 1,
            Mask::KeyKeep { rows, .. } | Mask::Documents { rows, .. } => *rows > 1,
            Mask::Dense(m) => m.dims[0] > 1,
            Mask::Func { per_batch_head, .. } => *per_batch_head,
            _ => false,
        })
    }

    /// Whether the mask can differ between query heads.
    pub fn varies_with_head(&self) -> bool {
        self.nodes().any(|m| match m {
            Mask::Dense(m) => m.dims[1] > 1,
            Mask::Func { per_batch_head, .. } => *per_batch_head,
            Mask::PerHead(m) => m.len() > 1,
            _ => false,
        })
    }
}

/// A grid mask's positions are the keys: `height · width` must be `L_k` (the queries are
/// bottom-right aligned on them, as every mask's are).
fn grid_fits(what: &str, height: usize, width: usize, s: &MaskShape) -> Result<()> {
    if height.checked_mul(width) == Some(s.lk) {
        Ok(())
    } else {
        Err(AttnError::Mask(format!(
            "a {height} x {width} {what} grid needs L_k = {}, not {}",
            height.saturating_mul(width),
            s.lk
        )))
    }
}

/// The chunks of query `i` (bottom-right aligned, so negative where `i' < 0`) and key `j`.
///
/// Exact for every `size` on a validated shape (`L_q, L_k ≤ i64::MAX`): positions then lie
/// in `(−i64::MAX, i64::MAX)`, where a chunk of `i64::MAX` positions or more is as good as
/// an endless one, so a larger size is clamped to it instead of wrapping negative.
pub(crate) fn chunk_of(s: &MaskShape, size: usize, i: usize, j: usize) -> (i64, i64) {
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let qi = i as i64 + s.bottom_right_offset();
    (qi.div_euclid(size), j as i64 / size)
}

/// The band `lo ≤ j − i ≤ hi` of a bottom-right aligned sliding window.
///
/// Exact for every `left` and `right` on a validated shape: `j − i` lies in `i64`, so a
/// bound that saturates at `i64::MIN` or `i64::MAX` compares with it as the true one would.
pub(crate) fn window_band(s: &MaskShape, left: usize, right: usize) -> (i64, i64) {
    let o = s.bottom_right_offset();
    (
        o.saturating_sub_unsigned(left as u64),
        o.saturating_add_unsigned(right as u64),
    )
}
