//! The mask vocabulary (DESIGN.md section 2). Polarity everywhere: `true` = may attend.
//!
//! A [`Mask`] is a small description, not a matrix: structured masks are a few numbers,
//! and [`Mask::allowed`] answers for one `(b, h, i, j)`. Masks compose with `&`, `|`, `!`.
//! Before a kernel runs, a mask is compiled for one shape into a [`crate::BlockMask`].

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};
use std::sync::Arc;

use crate::error::{AttnError, Result};

/// The shape a mask is evaluated over: batch, query heads, query length, key length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskShape {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
}

impl MaskShape {
    pub fn new(batch: usize, heads: usize, lq: usize, lk: usize) -> Self {
        MaskShape {
            batch,
            heads,
            lq,
            lk,
        }
    }

    /// `L_k − L_q`: how far query `i` is shifted to line up with key positions when a mask
    /// is aligned bottom-right (the last query sees the last key, as in KV-cache decoding).
    pub fn bottom_right_offset(&self) -> i64 {
        self.lk as i64 - self.lq as i64
    }
}

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
#[derive(Clone, Debug)]
pub struct DenseMask {
    allowed: Arc<[bool]>,
    dims: [usize; 4],
}

impl DenseMask {
    /// `allowed` in row-major order over `dims = [B or 1, H or 1, L_q or 1, L_k or 1]`.
    pub fn new(allowed: impl Into<Arc<[bool]>>, dims: [usize; 4]) -> Result<Self> {
        let allowed = allowed.into();
        let n: usize = dims.iter().product();
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

/// Which pairs `(query i, key j)` of batch row `b` and query head `h` may attend.
#[derive(Clone)]
pub enum Mask {
    /// Every pair.
    Full,
    /// Causal, with an explicit alignment when `L_q ≠ L_k`.
    Causal(CausalAlign),
    /// `i' − left ≤ j ≤ i' + right` with `i' = i + (L_k − L_q)` (bottom-right aligned).
    /// `usize::MAX` on a side means unbounded.
    Window {
        left: usize,
        right: usize,
    },
    /// Fixed-size chunks of positions: `⌊j / size⌋ == ⌊i' / size⌋`, or with `earlier`
    /// `⌊j / size⌋ ≤ ⌊i' / size⌋`, where `i' = i + (L_k − L_q)` (bottom-right aligned).
    Chunks {
        size: usize,
        earlier: bool,
    },
    /// Positions are the cells of a `height × width` grid in raster order (`L_k` of them);
    /// query `i'` and key `j` attend when both their rows and their columns are at most
    /// `radius` apart (`i' = i + (L_k − L_q)`).
    Neighbourhood {
        height: usize,
        width: usize,
        radius: usize,
    },
    /// Key padding by valid length: `j < lengths[b]` (one length, or one per batch row).
    KeyLengths(Arc<[usize]>),
    /// Key padding by a keep vector `[1 or B, L_k]`: `keep[b][j]`.
    KeyKeep {
        keep: Arc<[bool]>,
        rows: usize,
    },
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
    And(Box<Mask>, Box<Mask>),
    Or(Box<Mask>, Box<Mask>),
    Not(Box<Mask>),
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

    /// Key padding: batch row `b` has `lengths[b]` valid keys (or one length for all rows).
    pub fn key_lengths(lengths: impl Into<Arc<[usize]>>) -> Self {
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

    /// Query padding: batch row `b` has `lengths[b]` valid queries.
    pub fn query_lengths(lengths: impl Into<Arc<[usize]>>) -> Self {
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
            Mask::And(a, c) => a.allowed(s, b, h, i, j) && c.allowed(s, b, h, i, j),
            Mask::Or(a, c) => a.allowed(s, b, h, i, j) || c.allowed(s, b, h, i, j),
            Mask::Not(a) => !a.allowed(s, b, h, i, j),
        }
    }

    /// Checks that the mask's data fits `shape`: lengths per batch row, id vectors, dense
    /// dims that broadcast, one mask per head.
    pub fn validate(&self, s: &MaskShape) -> Result<()> {
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
            Mask::Neighbourhood { height, width, .. } => {
                if height.checked_mul(*width) == Some(s.lk) {
                    Ok(())
                } else {
                    err(format!(
                        "a {height} x {width} neighbourhood grid needs L_k = {}, not {}",
                        height.saturating_mul(*width),
                        s.lk
                    ))
                }
            }
            Mask::KeyLengths(v) => lengths_ok("key length", v, s.lk, "L_k"),
            Mask::QueryLengths(v) => lengths_ok("query length", v, s.lq, "L_q"),
            Mask::Prefix(v) => lengths_ok("prefix length", v, s.lk, "L_k"),
            Mask::KeyKeep { keep, rows } => {
                rows_ok("key keep vector", *rows)?;
                if keep.len() != rows * s.lk {
                    return err(format!(
                        "key keep vector has {} values; expected {rows} x L_k = {}",
                        keep.len(),
                        rows * s.lk
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
                if query_ids.len() != rows * s.lq || key_ids.len() != rows * s.lk {
                    return err(format!(
                        "document ids have {} query and {} key entries; expected {rows} x L_q = {} and {rows} x L_k = {}",
                        query_ids.len(),
                        key_ids.len(),
                        rows * s.lq,
                        rows * s.lk
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
                m.iter().try_for_each(|x| x.validate(s))
            }
            Mask::And(a, b) | Mask::Or(a, b) => {
                a.validate(s)?;
                b.validate(s)
            }
            Mask::Not(a) => a.validate(s),
        }
    }

    /// Whether the mask can differ between batch rows (decides how much a block mask stores).
    pub fn varies_with_batch(&self) -> bool {
        match self {
            Mask::Full
            | Mask::Causal(_)
            | Mask::Window { .. }
            | Mask::Chunks { .. }
            | Mask::Neighbourhood { .. } => false,
            Mask::KeyLengths(v) | Mask::QueryLengths(v) | Mask::Prefix(v) => v.len() > 1,
            Mask::KeyKeep { rows, .. } | Mask::Documents { rows, .. } => *rows > 1,
            Mask::Dense(m) => m.dims[0] > 1,
            Mask::Func { per_batch_head, .. } => *per_batch_head,
            Mask::PerHead(m) => m.iter().any(Mask::varies_with_batch),
            Mask::And(a, b) | Mask::Or(a, b) => a.varies_with_batch() || b.varies_with_batch(),
            Mask::Not(a) => a.varies_with_batch(),
        }
    }

    /// Whether the mask can differ between query heads.
    pub fn varies_with_head(&self) -> bool {
        match self {
            Mask::Dense(m) => m.dims[1] > 1,
            Mask::Func { per_batch_head, .. } => *per_batch_head,
            Mask::PerHead(m) => m.len() > 1,
            Mask::And(a, b) | Mask::Or(a, b) => a.varies_with_head() || b.varies_with_head(),
            Mask::Not(a) => a.varies_with_head(),
            _ => false,
        }
    }
}

/// The chunks of query `i` (bottom-right aligned, so negative where `i' < 0`) and key `j`.
pub(crate) fn chunk_of(s: &MaskShape, size: usize, i: usize, j: usize) -> (i64, i64) {
    let size = size as i64;
    let qi = i as i64 + s.bottom_right_offset();
    (qi.div_euclid(size), j as i64 / size)
}

/// The band `lo ≤ j − i ≤ hi` of a bottom-right aligned sliding window.
pub(crate) fn window_band(s: &MaskShape, left: usize, right: usize) -> (i64, i64) {
    let o = s.bottom_right_offset();
    let clamp = |x: usize| x.min(i64::MAX as usize / 4) as i64;
    (o - clamp(left), o + clamp(right))
}

impl BitAnd for Mask {
    type Output = Mask;
    fn bitand(self, rhs: Mask) -> Mask {
        Mask::And(Box::new(self), Box::new(rhs))
    }
}

impl BitOr for Mask {
    type Output = Mask;
    fn bitor(self, rhs: Mask) -> Mask {
        Mask::Or(Box::new(self), Box::new(rhs))
    }
}

impl Not for Mask {
    type Output = Mask;
    fn not(self) -> Mask {
        Mask::Not(Box::new(self))
    }
}

impl fmt::Debug for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mask::Full => write!(f, "full"),
            Mask::Causal(CausalAlign::BottomRight) => write!(f, "causal"),
            Mask::Causal(CausalAlign::TopLeft) => write!(f, "causal-top-left"),
            Mask::Window { left, right } => write!(f, "window({left},{right})"),
            Mask::Chunks {
                size,
                earlier: false,
            } => write!(f, "chunks({size})"),
            Mask::Chunks {
                size,
                earlier: true,
            } => write!(f, "block-causal({size})"),
            Mask::Neighbourhood {
                height,
                width,
                radius,
            } => write!(f, "neighbourhood({height}x{width},{radius})"),
            Mask::KeyLengths(v) => write!(f, "key-lengths{v:?}"),
            Mask::KeyKeep { rows, .. } => write!(f, "key-keep[{rows} rows]"),
            Mask::QueryLengths(v) => write!(f, "query-lengths{v:?}"),
            Mask::Documents { rows, .. } => write!(f, "documents[{rows} rows]"),
            Mask::Prefix(v) => write!(f, "prefix{v:?}"),
            Mask::Dense(m) => write!(f, "dense{:?}", m.dims),
            Mask::Func { per_batch_head, .. } => {
                write!(f, "fn({})", if *per_batch_head { "b,h,i,j" } else { "i,j" })
            }
            Mask::PerHead(m) => f.debug_list().entries(m.iter()).finish(),
            Mask::And(a, b) => write!(f, "({a:?} & {b:?})"),
            Mask::Or(a, b) => write!(f, "({a:?} | {b:?})"),
            Mask::Not(a) => write!(f, "!{a:?}"),
        }
    }
}
