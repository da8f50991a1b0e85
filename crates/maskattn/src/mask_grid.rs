//! The geometry of the image-grid masks `natten` and `swin` (docs/design.md section 2):
//! for a query patch, the grid rows and the grid columns it may attend to. Both masks are
//! a product of one set per axis — key `(y', x')` is allowed for query `(y, x)` exactly when
//! `y'` is in the query's row set and `x'` in its column set — and each set is at most two
//! arithmetic progressions. That is what lets evaluation answer in O(1) a pair and
//! classification count a query's allowed keys in a key range in O(1), exactly.
//!
//! A leaf module: the masks (`mask.rs`) and the classifier (`classify.rs`) import it.

/// `count` positions `start, start + step, …` along one axis (`step ≥ 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prog {
    pub start: usize,
    pub step: usize,
    pub count: usize,
}

impl Prog {
    const NONE: Prog = Prog {
        start: 0,
        step: 1,
        count: 0,
    };

    fn contains(&self, x: usize) -> bool {
        x >= self.start
            && (x - self.start).is_multiple_of(self.step)
            && (x - self.start) / self.step < self.count
    }

    /// How many of its positions lie in `[lo, hi)`.
    fn count_in(&self, lo: usize, hi: usize) -> usize {
        if self.count == 0 || hi <= lo {
            return 0;
        }
        // Indices t with lo ≤ start + t·step < hi, clipped to [0, count).
        let first = lo.saturating_sub(self.start).div_ceil(self.step);
        let end = if hi <= self.start {
            0
        } else {
            (hi - self.start).div_ceil(self.step).min(self.count)
        };
        end.saturating_sub(first)
    }

    fn first(&self) -> usize {
        self.start
    }

    fn last(&self) -> usize {
        self.start + (self.count - 1) * self.step
    }
}

/// The positions one query sees along one axis: one or two progressions (two where Swin's
/// window wraps around the rolled edge).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AxisSet([Prog; 2]);

impl AxisSet {
    fn one(p: Prog) -> Self {
        AxisSet([p, Prog::NONE])
    }

    fn contains(&self, x: usize) -> bool {
        self.0.iter().any(|p| p.contains(x))
    }

    fn count_in(&self, lo: usize, hi: usize) -> usize {
        self.0.iter().map(|p| p.count_in(lo, hi)).sum()
    }

    fn len(&self) -> usize {
        self.0.iter().map(|p| p.count).sum()
    }

    fn first(&self) -> usize {
        self.0
            .iter()
            .filter(|p| p.count > 0)
            .map(Prog::first)
            .min()
            .unwrap_or(0)
    }

    fn last(&self) -> usize {
        self.0
            .iter()
            .filter(|p| p.count > 0)
            .map(Prog::last)
            .max()
            .unwrap_or(0)
    }
}

/// NATTEN's window along one axis of `n` positions, kernel `k` (odd), dilation `d`, for the
/// query at `x` (natten's `get_window_start`): the positions of `x`'s dilation group
/// `g = x mod d` form a sub-axis of `⌈(n − g)/d⌉` positions; on it the window of `k` is
/// centred on `x / d` and shifted inwards at the borders (its centre clamped to
/// `[k/2, len − 1 − k/2]`); back on the axis, its positions are `d` apart. Needs
/// `k · d ≤ n` (then every group has at least `k` positions).
pub(crate) fn natten_axis(x: usize, n: usize, k: usize, d: usize) -> AxisSet {
    let g = x % d;
    let len = (n - g).div_ceil(d);
    let start = (x / d).saturating_sub(k / 2).min(len - k);
    AxisSet::one(Prog {
        start: g + start * d,
        step: d,
        count: k,
    })
}

/// Swin's shifted window along one axis of `n` positions, window `w` (dividing `n`),
/// shift `s < w`, for the query at original position `x`. Swin rolls the axis by `−s`
/// (`torch.roll(x, -s)`: original `x` lands at `r = (x − s) mod n`), cuts it into windows
/// of `w`, and its `img_mask` splits the rolled axis into the regions `[0, n − w)`,
/// `[n − w, n − s)`, `[n − s, n)`: the query sees the rolled positions in both its window
/// and its region (an interval), which are the original positions `r' + s mod n`.
pub(crate) fn swin_axis(x: usize, n: usize, w: usize, s: usize) -> AxisSet {
    let r = (x + (n - s)) % n;
    let window = (r / w * w, r / w * w + w);
    let region = if r < n - w {
        (0, n - w)
    } else if r < n - s {
        (n - w, n - s)
    } else {
        (n - s, n)
    };
    let (a, b) = (window.0.max(region.0), window.1.min(region.1));
    // Rolled [a, b) is original [a + s, b + s) mod n: one interval, or two across the edge.
    let (a, b) = (a + s, b + s);
    let interval = |start: usize, end: usize| Prog {
        start,
        step: 1,
        count: end - start,
    };
    if b <= n {
        AxisSet::one(interval(a, b))
    } else if a >= n {
        AxisSet::one(interval(a - n, b - n))
    } else {
        AxisSet([interval(a, n), interval(0, b - n)])
    }
}

/// An image-grid mask on a `height × width` grid in raster order: which rows and which
/// columns each query patch sees.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GridAttn {
    Natten {
        height: usize,
        width: usize,
        kernel: usize,
        dilation: usize,
    },
    Swin {
        height: usize,
        width: usize,
        window: usize,
        shift: usize,
    },
}

impl GridAttn {
    fn width(&self) -> usize {
        match *self {
            GridAttn::Natten { width, .. } | GridAttn::Swin { width, .. } => width,
        }
    }

    /// The rows and columns query patch `q` (raster position, `q < height · width`) sees.
    fn sets(&self, q: usize) -> (AxisSet, AxisSet) {
        let w = self.width();
        let (y, x) = (q / w, q % w);
        match *self {
            GridAttn::Natten {
                height,
                width,
                kernel,
                dilation,
            } => (
                natten_axis(y, height, kernel, dilation),
                natten_axis(x, width, kernel, dilation),
            ),
            GridAttn::Swin {
                height,
                width,
                window,
                shift,
            } => (
                swin_axis(y, height, window, shift),
                swin_axis(x, width, window, shift),
            ),
        }
    }

    /// Whether query patch `q` may attend to key patch `j`.
    pub fn allowed(&self, q: usize, j: usize) -> bool {
        let w = self.width();
        let (rows, cols) = self.sets(q);
        rows.contains(j / w) && cols.contains(j % w)
    }

    /// How many keys in `[j0, j1)` query patch `q` may attend to, exactly, in O(1): the
    /// range is a partial first grid row, whole rows, and a partial last row.
    pub fn count_keys(&self, q: usize, j0: usize, j1: usize) -> usize {
        if j1 <= j0 {
            return 0;
        }
        let w = self.width();
        let (rows, cols) = self.sets(q);
        let (r0, r1) = (j0 / w, (j1 - 1) / w);
        let (c0, c1) = (j0 % w, (j1 - 1) % w + 1);
        if r0 == r1 {
            return rows.count_in(r0, r0 + 1) * cols.count_in(c0, c1);
        }
        rows.count_in(r0, r0 + 1) * cols.count_in(c0, w)
            + rows.count_in(r0 + 1, r1) * cols.len()
            + rows.count_in(r1, r1 + 1) * cols.count_in(0, c1)
    }

    /// The first and the last key query patch `q` may attend to (it always sees one).
    pub fn key_hull(&self, q: usize) -> (usize, usize) {
        let w = self.width();
        let (rows, cols) = self.sets(q);
        (
            rows.first() * w + cols.first(),
            rows.last() * w + cols.last(),
        )
    }
}

/// Why `natten(height, width, kernel, dilation)` does not fit its grid, naming the number.
pub(crate) fn natten_check(
    height: usize,
    width: usize,
    kernel: usize,
    dilation: usize,
) -> Result<(), String> {
    if dilation == 0 {
        return Err("DILATION must be at least 1".into());
    }
    if kernel.is_multiple_of(2) {
        return Err(format!("KERNEL must be odd, not {kernel}"));
    }
    for (n, name) in [(height, "HEIGHT"), (width, "WIDTH")] {
        if kernel.checked_mul(dilation).is_none_or(|kd| kd > n) {
            return Err(if dilation == 1 {
                format!("KERNEL {kernel} exceeds {name} {n}")
            } else {
                format!("KERNEL × DILATION = {kernel} × {dilation} exceeds {name} {n}")
            });
        }
    }
    Ok(())
}

/// Why `swin(height, width, window, shift)` does not fit its grid, naming the number.
pub(crate) fn swin_check(
    height: usize,
    width: usize,
    window: usize,
    shift: usize,
) -> Result<(), String> {
    if window == 0 {
        return Err("WINDOW must be at least 1".into());
    }
    for (n, name) in [(height, "HEIGHT"), (width, "WIDTH")] {
        if n == 0 || !n.is_multiple_of(window) {
            return Err(format!("WINDOW {window} must divide {name} {n}"));
        }
    }
    if shift >= window {
        return Err(format!("SHIFT {shift} must be less than WINDOW {window}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progressions_count_what_they_hold() {
        let p = Prog {
            start: 3,
            step: 4,
            count: 5,
        }; // 3 7 11 15 19
        for lo in 0..25 {
            for hi in 0..25 {
                let want = (lo..hi).filter(|&x| p.contains(x)).count();
                assert_eq!(p.count_in(lo, hi), want, "[{lo},{hi})");
            }
        }
        assert_eq!((p.first(), p.last()), (3, 19));
    }
}
