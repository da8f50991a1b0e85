//! Per-tile classification of a mask: is every pair of a (query tile, key tile) rectangle
//! allowed, none, or some? Structured masks answer from a few numbers per tile (no
//! `L_q × L_k` pass); dense and function masks answer by scanning.
//!
//! The answer for structured masks is exact. For `&`, `|` and `!` it can say `Partial`
//! where the truth is `Empty` or `Full`; the block mask fixes that when it builds the tile's
//! bitmap, so the compiled classes are exact for every mask.

use crate::mask::{chunk_of, window_band, CausalAlign, Mask, MaskShape};
use crate::mask_grid::GridAttn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileClass {
    /// No pair is allowed: the kernels skip the tile (no loads, no FLOPs).
    Empty,
    /// Every pair is allowed: the kernels never test the mask.
    Full,
    /// Some pairs: the kernels test each element against the tile's bitmap.
    Partial,
}

use TileClass::*;

/// The rectangle `[i0, i1) × [j0, j1)` of one tile.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rect {
    pub i0: usize,
    pub i1: usize,
    pub j0: usize,
    pub j1: usize,
}

/// A mask prepared for classification: per-tile summaries computed once.
pub(crate) enum Classifier<'m> {
    Const(TileClass),
    /// `lo ≤ j − i ≤ hi` (causal and sliding windows).
    Band {
        lo: i64,
        hi: i64,
    },
    /// Chunks of `size` positions (`earlier`: and every earlier chunk).
    Chunks {
        size: usize,
        earlier: bool,
    },
    /// A `width`-wide grid in raster order, square neighbourhoods of `radius`.
    Neighbourhood {
        width: usize,
        radius: usize,
    },
    /// WeNet's chunks: `0 ≤ ⌊i'/size⌋ − ⌊j/size⌋ ≤ left`.
    ChunkedLeft {
        size: usize,
        left: usize,
    },
    /// `natten` and `swin`, with the first and last key any query of each query tile sees
    /// (`None`: no query of the tile is on the grid).
    Grid {
        grid: GridAttn,
        hulls: Vec<Option<(usize, usize)>>,
    },
    KeyLengths(&'m [usize]),
    QueryLengths(&'m [usize]),
    /// Allowed keys per (row, key tile).
    KeyKeep {
        counts: Vec<usize>,
        nk: usize,
    },
    /// Sorted distinct ids per (row, query tile) and per (row, key tile).
    Documents {
        q_sets: Vec<Vec<i64>>,
        k_sets: Vec<Vec<i64>>,
        rows: usize,
        nq: usize,
        nk: usize,
    },
    Prefix {
        p: &'m [usize],
        offset: i64,
    },
    /// Classes per (dense batch row, dense head, query tile, key tile), from one scan.
    Dense {
        classes: Vec<TileClass>,
        dims: [usize; 2],
    },
    Scan(&'m Mask),
    PerHead(Vec<Classifier<'m>>),
    And(Vec<Classifier<'m>>),
    Or(Vec<Classifier<'m>>),
    Not(Box<Classifier<'m>>),
}

pub(crate) struct Grid {
    pub shape: MaskShape,
    pub tile_q: usize,
    pub tile_k: usize,
    pub nq: usize,
    pub nk: usize,
}

impl Grid {
    pub fn rect(&self, qt: usize, kt: usize) -> Rect {
        let i0 = qt * self.tile_q;
        let j0 = kt * self.tile_k;
        // `i0 + tile_q` can pass usize::MAX when the tile is huge; `lq − i0` cannot.
        Rect {
            i0,
            i1: i0 + self.tile_q.min(self.shape.lq - i0),
            j0,
            j1: j0 + self.tile_k.min(self.shape.lk - j0),
        }
    }
}

fn from_bool(all: bool, none: bool) -> TileClass {
    if none {
        Empty
    } else if all {
        Full
    } else {
        Partial
    }
}

/// Exact class of `lo ≤ j − i ≤ hi` over a rectangle: `j − i` takes every value between its
/// extremes on a rectangle, so comparing the extremes with the band is enough.
fn band_class(r: Rect, lo: i64, hi: i64) -> TileClass {
    let dmin = r.j0 as i64 - (r.i1 as i64 - 1);
    let dmax = r.j1 as i64 - 1 - r.i0 as i64;
    from_bool(lo <= dmin && dmax <= hi, dmax < lo || dmin > hi)
}

/// The grid cells of positions `a..=b` (raster order, `w` wide) as at most three rectangles
/// `(first row, last row, first column, last column)`: a partial first row, whole rows, a
/// partial last row.
fn grid_rects(a: usize, b: usize, w: usize) -> Vec<[usize; 4]> {
    let (ra, rb) = (a / w, b / w);
    if ra == rb {
        return vec![[ra, ra, a % w, b % w]];
    }
    let mut v = vec![[ra, ra, a % w, w - 1]];
    if rb - ra >= 2 {
        v.push([ra + 1, rb - 1, 0, w - 1]);
    }
    v.push([rb, rb, 0, b % w]);
    v
}

/// Exact class of the 2-D neighbourhood mask over a tile. Between two grid rectangles the
/// row and column distances vary independently, so every pair is within `radius` when both
/// largest distances are, and none is when either smallest distance exceeds it.
fn neighbourhood_class(r: Rect, offset: i64, w: usize, radius: usize) -> TileClass {
    // Query positions below 0 (L_q > L_k, bottom-right aligned) see nothing.
    let qa = r.i0 as i64 + offset;
    let qb = r.i1 as i64 - 1 + offset;
    if qb < 0 {
        return Empty;
    }
    let (queries, keys) = (
        grid_rects(qa.max(0) as usize, qb as usize, w),
        grid_rects(r.j0, r.j1 - 1, w),
    );
    let span = |a0: usize, a1: usize, b0: usize, b1: usize| {
        let min = b0.saturating_sub(a1).max(a0.saturating_sub(b1));
        let max = a1.abs_diff(b0).max(b1.abs_diff(a0));
        (min, max)
    };
    let (mut all, mut none) = (qa >= 0, true);
    for q in &queries {
        for k in &keys {
            let (rmin, rmax) = span(q[0], q[1], k[0], k[1]);
            let (cmin, cmax) = span(q[2], q[3], k[2], k[3]);
            all &= rmax <= radius && cmax <= radius;
            none &= rmin > radius || cmin > radius;
        }
    }
    from_bool(all, none)
}

/// Exact class of an image-grid mask (`natten`, `swin`) over a tile: each query row counts
/// its allowed keys in the tile's key range exactly (O(1) a row, see `mask_grid.rs`).
fn grid_class(r: Rect, offset: i64, grid: &GridAttn) -> TileClass {
    let n = r.j1 - r.j0;
    let (mut all, mut none) = (true, true);
    for i in r.i0..r.i1 {
        let q = i as i64 + offset;
        let c = if q < 0 {
            0
        } else {
            grid.count_keys(q as usize, r.j0, r.j1)
        };
        all &= c == n;
        none &= c == 0;
        if !all && !none {
            return Partial;
        }
    }
    from_bool(all, none)
}

/// Class of "index < len" over the index range `[x0, x1)`.
fn prefix_class(x0: usize, x1: usize, len: usize) -> TileClass {
    from_bool(x1 <= len, x0 >= len)
}

fn pick(v: &[usize], b: usize) -> usize {
    v[if v.len() == 1 { 0 } else { b }]
}

fn sorted_ids(ids: &[i64]) -> Vec<i64> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn sorted_intersect(a: &[i64], b: &[i64]) -> bool {
    let (mut x, mut y) = (0, 0);
    while x < a.len() && y < b.len() {
        match a[x].cmp(&b[y]) {
            std::cmp::Ordering::Less => x += 1,
            std::cmp::Ordering::Greater => y += 1,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// Scans a rectangle, stopping as soon as both an allowed and a hidden pair were seen.
pub(crate) fn scan_class(r: Rect, allowed: impl Fn(usize, usize) -> bool) -> TileClass {
    let (mut any, mut all) = (false, true);
    for i in r.i0..r.i1 {
        for j in r.j0..r.j1 {
            if allowed(i, j) {
                any = true;
            } else {
                all = false;
            }
            if any && !all {
                return Partial;
            }
        }
    }
    from_bool(all, !any)
}

impl<'m> Classifier<'m> {
    pub fn build(mask: &'m Mask, g: &Grid) -> Self {
        let s = &g.shape;
        match mask {
            Mask::Full => Classifier::Const(Full),
            Mask::Causal(align) => Classifier::Band {
                lo: i64::MIN / 2,
                hi: match align {
                    CausalAlign::BottomRight => s.bottom_right_offset(),
                    CausalAlign::TopLeft => 0,
                },
            },
            Mask::Window { left, right } => {
                let (lo, hi) = window_band(s, *left, *right);
                Classifier::Band { lo, hi }
            }
            Mask::Chunks { size, earlier } => Classifier::Chunks {
                size: *size,
                earlier: *earlier,
            },
            Mask::Neighbourhood { width, radius, .. } => Classifier::Neighbourhood {
                width: *width,
                radius: *radius,
            },
            Mask::Chunked { size, left: None } => Classifier::Chunks {
                size: *size,
                earlier: true,
            },
            Mask::Chunked {
                size,
                left: Some(left),
            } => Classifier::ChunkedLeft {
                size: *size,
                left: *left,
            },
            Mask::Natten { .. } | Mask::Swin { .. } => {
                let grid = mask.grid_attn().expect("a grid mask");
                let o = s.bottom_right_offset();
                let hulls = (0..g.nq)
                    .map(|qt| {
                        let r = g.rect(qt, 0);
                        let first = (r.i0 as i64 + o).max(0);
                        let last = r.i1 as i64 - 1 + o;
                        (first..=last)
                            .map(|q| grid.key_hull(q as usize))
                            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
                    })
                    .collect();
                Classifier::Grid { grid, hulls }
            }
            Mask::KeyLengths(v) => Classifier::KeyLengths(v),
            Mask::QueryLengths(v) => Classifier::QueryLengths(v),
            Mask::KeyKeep { keep, rows } => {
                let counts = (0..*rows)
                    .flat_map(|b| {
                        (0..g.nk).map(move |kt| {
                            let r = g.rect(0, kt);
                            keep[b * s.lk + r.j0..b * s.lk + r.j1]
                                .iter()
                                .filter(|&&x| x)
                                .count()
                        })
                    })
                    .collect();
                Classifier::KeyKeep { counts, nk: g.nk }
            }
            Mask::Documents {
                query_ids,
                key_ids,
                rows,
            } => {
                let sets = |ids: &[i64], len: usize, tile: usize, n: usize| -> Vec<Vec<i64>> {
                    (0..*rows)
                        .flat_map(|b| {
                            (0..n).map(move |t| {
                                b * len + t * tile..b * len + ((t + 1) * tile).min(len)
                            })
                        })
                        .map(|range| sorted_ids(&ids[range]))
                        .collect()
                };
                Classifier::Documents {
                    q_sets: sets(query_ids, s.lq, g.tile_q, g.nq),
                    k_sets: sets(key_ids, s.lk, g.tile_k, g.nk),
                    rows: *rows,
                    nq: g.nq,
                    nk: g.nk,
                }
            }
            Mask::Prefix(p) => Classifier::Prefix {
                p,
                offset: s.bottom_right_offset(),
            },
            Mask::Dense(m) => {
                let [db, dh, _, _] = m.dims();
                let mut classes = Vec::with_capacity(db * dh * g.nq * g.nk);
                for b in 0..db {
                    for h in 0..dh {
                        for qt in 0..g.nq {
                            for kt in 0..g.nk {
                                classes.push(scan_class(g.rect(qt, kt), |i, j| m.get(b, h, i, j)));
                            }
                        }
                    }
                }
                Classifier::Dense {
                    classes,
                    dims: [db, dh],
                }
            }
            Mask::Func { .. } => Classifier::Scan(mask),
            Mask::PerHead(m) => Classifier::PerHead(m.iter().map(|x| Self::build(x, g)).collect()),
            Mask::And(t) => Classifier::And(t.iter().map(|x| Self::build(x, g)).collect()),
            Mask::Or(t) => Classifier::Or(t.iter().map(|x| Self::build(x, g)).collect()),
            Mask::Not(a) => Classifier::Not(Box::new(Self::build(a, g))),
        }
    }

    pub fn class(&self, g: &Grid, b: usize, h: usize, qt: usize, kt: usize) -> TileClass {
        let r = g.rect(qt, kt);
        match self {
            Classifier::Const(c) => *c,
            Classifier::Band { lo, hi } => band_class(r, *lo, *hi),
            Classifier::Chunks { size, earlier } => {
                // Chunk indices are monotone in the position, so a tile's query chunks are
                // the range [qa, qb] and its key chunks [ka, kb], every value in between taken.
                let (qa, ka) = chunk_of(&g.shape, *size, r.i0, r.j0);
                let (qb, kb) = chunk_of(&g.shape, *size, r.i1 - 1, r.j1 - 1);
                if *earlier {
                    from_bool(kb <= qa, ka > qb)
                } else {
                    from_bool(qa == qb && ka == kb && qa == ka, qb < ka || kb < qa)
                }
            }
            Classifier::Neighbourhood { width, radius } => {
                neighbourhood_class(r, g.shape.bottom_right_offset(), *width, *radius)
            }
            Classifier::ChunkedLeft { size, left } => {
                // As for chunks: the tile's query chunks are [qa, qb] and key chunks [ka, kb],
                // varying independently, so `qc − kc` takes every value in [qa − kb, qb − ka].
                let (qa, ka) = chunk_of(&g.shape, *size, r.i0, r.j0);
                let (qb, kb) = chunk_of(&g.shape, *size, r.i1 - 1, r.j1 - 1);
                let (dmin, dmax) = (qa as i128 - kb as i128, qb as i128 - ka as i128);
                let left = *left as i128;
                from_bool(dmin >= 0 && dmax <= left, dmax < 0 || dmin > left)
            }
            Classifier::Grid { grid, hulls } => match hulls[qt] {
                Some((lo, hi)) if r.j1 > lo && r.j0 <= hi => {
                    grid_class(r, g.shape.bottom_right_offset(), grid)
                }
                _ => Empty,
            },
            Classifier::KeyLengths(v) => prefix_class(r.j0, r.j1, pick(v, b)),
            Classifier::QueryLengths(v) => prefix_class(r.i0, r.i1, pick(v, b)),
            Classifier::KeyKeep { counts, nk } => {
                let row = if counts.len() == *nk { 0 } else { b };
                let n = counts[row * nk + kt];
                from_bool(n == r.j1 - r.j0, n == 0)
            }
            Classifier::Documents {
                q_sets,
                k_sets,
                rows,
                nq,
                nk,
            } => {
                let row = if *rows == 1 { 0 } else { b };
                let (qs, ks) = (&q_sets[row * nq + qt], &k_sets[row * nk + kt]);
                let one_doc = qs.len() == 1 && ks.len() == 1 && qs[0] == ks[0];
                from_bool(one_doc, !sorted_intersect(qs, ks))
            }
            Classifier::Prefix { p, offset } => {
                // Columns below the prefix are all allowed; the rest follow the causal band,
                // whose rightmost column is `j1 − 1` either way.
                let p = pick(p, b);
                let causal = band_class(r, i64::MIN / 2, *offset);
                from_bool(r.j1 <= p || causal == Full, r.j0 >= p && causal == Empty)
            }
            Classifier::Dense { classes, dims } => {
                let db = if dims[0] == 1 { 0 } else { b };
                let dh = if dims[1] == 1 { 0 } else { h };
                classes[((db * dims[1] + dh) * g.nq + qt) * g.nk + kt]
            }
            Classifier::Scan(m) => scan_class(r, |i, j| m.allowed(&g.shape, b, h, i, j)),
            Classifier::PerHead(c) => c[h].class(g, b, h, qt, kt),
            // One Empty term empties an `&` (one Full term fills an `|`) whatever the rest.
            Classifier::And(v) => {
                let mut all_full = true;
                for c in v {
                    match c.class(g, b, h, qt, kt) {
                        Empty => return Empty,
                        Partial => all_full = false,
                        Full => {}
                    }
                }
                if all_full {
                    Full
                } else {
                    Partial
                }
            }
            Classifier::Or(v) => {
                let mut all_empty = true;
                for c in v {
                    match c.class(g, b, h, qt, kt) {
                        Full => return Full,
                        Partial => all_empty = false,
                        Empty => {}
                    }
                }
                if all_empty {
                    Empty
                } else {
                    Partial
                }
            }
            Classifier::Not(x) => match x.class(g, b, h, qt, kt) {
                Empty => Full,
                Full => Empty,
                Partial => Partial,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The analytic classes of structured masks must be exact on their own (not only after
    /// the block mask's bitmap scan tightens them): that is what keeps compilation cheap.
    #[test]
    fn structured_masks_classify_exactly_without_scanning() {
        let ids = |n: usize, docs: usize| (0..n).map(|x| (x * docs / n) as i64).collect::<Vec<_>>();
        for &(lq, lk) in &[(50, 50), (37, 91), (91, 37), (1, 70)] {
            let s = MaskShape::new(2, 1, lq, lk);
            let masks = [
                Mask::causal(),
                Mask::causal_top_left(),
                Mask::window(9, 2),
                Mask::window(0, 0),
                Mask::key_padding(vec![lk / 3, lk]),
                Mask::query_padding(vec![0, lq / 2]),
                Mask::key_keep(
                    (0..2 * lk)
                        .map(|j| j % 5 != 0 || j > lk)
                        .collect::<Vec<_>>(),
                    2,
                ),
                Mask::documents_cross(ids(lq, 3), ids(lk, 3), 1),
                Mask::documents_cross(
                    (0..lq).map(|i| (i % 4) as i64).collect::<Vec<_>>(),
                    (0..lk).map(|j| (j / 7 % 3) as i64 * 2).collect::<Vec<_>>(),
                    1,
                ),
                Mask::prefix(lk / 4),
                Mask::prefix_per_batch(vec![0, lk]),
                Mask::chunks(1),
                Mask::chunks(6),
                Mask::chunks(lk + 5),
                Mask::block_causal(1),
                Mask::block_causal(8),
                Mask::block_causal(13),
                // Sizes at their extremes: a chunk or a window side past every position.
                Mask::chunks(usize::MAX),
                Mask::chunks(usize::MAX / 2 + 1),
                Mask::block_causal(usize::MAX),
                Mask::block_causal(i64::MAX as usize),
                Mask::window(usize::MAX, 0),
                Mask::window(0, usize::MAX),
                Mask::window(usize::MAX / 2 + 1, usize::MAX),
                Mask::prefix(lk),
            ];
            for mask in masks {
                for tiles in [(8, 8), (1, 1), (7, 13), (64, 64)] {
                    assert_exact_without_scanning(&mask, s, tiles);
                }
            }
        }
    }

    #[test]
    fn neighbourhoods_classify_exactly_without_scanning() {
        for &(h, w) in &[(7, 9), (1, 40), (40, 1), (12, 12)] {
            let lk = h * w;
            for lq in [lk, lk / 3 + 1, lk + 9] {
                for radius in [0, 1, 2, 5, usize::MAX, usize::MAX / 2 + 1] {
                    let mask = Mask::neighbourhood(h, w, radius);
                    for tiles in [(8, 8), (1, 1), (7, 13), (64, 64), (5, 17)] {
                        assert_exact_without_scanning(&mask, MaskShape::new(1, 1, lq, lk), tiles);
                    }
                }
            }
        }
    }

    #[test]
    fn domain_masks_classify_exactly_without_scanning() {
        let grids = [
            (
                7,
                9,
                vec![
                    Mask::natten(7, 9, 3),
                    Mask::natten(7, 9, 7),
                    Mask::natten_dilated(7, 9, 3, 2),
                ],
            ),
            (
                8,
                12,
                vec![
                    Mask::swin(8, 12, 4, 0),
                    Mask::swin(8, 12, 4, 2),
                    Mask::swin(8, 12, 4, 3),
                ],
            ),
            (1, 40, vec![Mask::natten(1, 40, 1), Mask::swin(1, 40, 1, 0)]),
        ];
        for (h, w, masks) in grids {
            let lk = h * w;
            for lq in [lk, lk / 3 + 1, lk + 9] {
                for mask in &masks {
                    for tiles in [(8, 8), (1, 1), (7, 13), (64, 64), (5, 17)] {
                        assert_exact_without_scanning(mask, MaskShape::new(1, 1, lq, lk), tiles);
                    }
                }
            }
        }
        for &(lq, lk) in &[(50, 50), (37, 91), (91, 37)] {
            for mask in [
                Mask::chunked(4, None),
                Mask::chunked(4, Some(0)),
                Mask::chunked(3, Some(2)),
                Mask::chunked(1, Some(5)),
                Mask::chunked(8, Some(usize::MAX)),
            ] {
                for tiles in [(8, 8), (1, 1), (7, 13), (64, 64)] {
                    assert_exact_without_scanning(&mask, MaskShape::new(1, 1, lq, lk), tiles);
                }
            }
        }
    }

    /// Classifies every tile of `s` analytically and compares with a scan of its pairs.
    fn assert_exact_without_scanning(mask: &Mask, s: MaskShape, (tq, tk): (usize, usize)) {
        let g = Grid {
            shape: s,
            tile_q: tq,
            tile_k: tk,
            nq: s.lq.div_ceil(tq),
            nk: s.lk.div_ceil(tk),
        };
        let c = Classifier::build(mask, &g);
        assert!(!matches!(c, Classifier::Scan(_)));
        for b in 0..s.batch {
            for qt in 0..g.nq {
                for kt in 0..g.nk {
                    let want = scan_class(g.rect(qt, kt), |i, j| mask.allowed(&s, b, 0, i, j));
                    assert_eq!(
                        c.class(&g, b, 0, qt, kt),
                        want,
                        "{mask:?} {s:?} {tq}x{tk} b{b} ({qt},{kt})"
                    );
                }
            }
        }
    }
}
