//! The tree of a composite [`Mask`]: `&` and `|` over many terms, `!`, per-head masks.
//!
//! A mask expression can be as long as its user likes (a 100,000-term `&` chain built in a
//! loop, an expression read from a command line), so nothing here recurses through it:
//! chains of one operator are kept flat (`a & b & c` is one `And` of three terms), parts are
//! shared (`Clone` copies a pointer), and dropping, comparing and measuring the depth walk
//! the tree with a stack of their own. What must recurse (evaluation, classification) runs
//! only on masks that [`Mask::validate`] found at most [`Mask::MAX_DEPTH`] deep.

use std::collections::VecDeque;
use std::ops::{BitAnd, BitOr, Not};
use std::sync::Arc;

use crate::mask::{Mask, Terms};

impl Terms {
    /// Moves the terms out of `t`, leaving an empty list in a mask about to be dropped.
    fn take(t: &mut Terms) -> Terms {
        std::mem::replace(t, Terms(Arc::new(VecDeque::new())))
    }

    /// `a ∘ b` with the terms of either side that is already a `∘` spliced in, so that a
    /// chain stays one level deep however it associates. `of` picks the terms of a `∘`.
    fn join(mut a: Mask, mut b: Mask, of: fn(&mut Mask) -> Option<&mut Terms>) -> Terms {
        // Growing a chain the caller no longer shares is amortised O(1) at either end.
        match (of(&mut a).map(Terms::take), of(&mut b).map(Terms::take)) {
            (Some(mut t), None) => {
                Arc::make_mut(&mut t.0).push_back(b);
                t
            }
            (None, Some(mut t)) => {
                Arc::make_mut(&mut t.0).push_front(a);
                t
            }
            (Some(mut t), Some(u)) => {
                let v = Arc::make_mut(&mut t.0);
                match Arc::try_unwrap(u.0) {
                    Ok(us) => v.extend(us),
                    Err(shared) => v.extend(shared.iter().cloned()),
                }
                t
            }
            (None, None) => Terms(Arc::new(VecDeque::from([a, b]))),
        }
    }
}

impl Mask {
    /// The deepest nesting of `&`, `|`, `!` and per-head masks that evaluation accepts (a
    /// flat chain of one operator counts once). Deeper masks are a typed error.
    pub const MAX_DEPTH: usize = 200;

    /// Nesting depth: 1 for a single term, one more for each `&`, `|`, `!` or per-head
    /// level around it.
    pub fn depth(&self) -> usize {
        let mut deepest = 0;
        let mut stack = vec![(self, 1)];
        while let Some((m, d)) = stack.pop() {
            deepest = deepest.max(d);
            let (x, y) = m.children();
            stack.extend(x.iter().chain(y).map(|c| (c, d + 1)));
        }
        deepest
    }

    /// Every node of the tree, parents before children.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &Mask> {
        let mut stack = vec![self];
        std::iter::from_fn(move || {
            let m = stack.pop()?;
            let (x, y) = m.children();
            stack.extend(x.iter().chain(y));
            Some(m)
        })
    }

    /// The masks directly inside this one, in order, as two slices (a deque's halves).
    pub(crate) fn children(&self) -> (&[Mask], &[Mask]) {
        match self {
            Mask::And(t) | Mask::Or(t) => t.0.as_slices(),
            Mask::Not(m) => (std::slice::from_ref(&**m), &[]),
            Mask::PerHead(m) => (m, &[]),
            _ => (&[], &[]),
        }
    }

    /// Moves the children this mask owns alone onto `stack`, leaving cheap leaves behind.
    fn take_children(&mut self, stack: &mut Vec<Mask>) {
        match self {
            Mask::And(t) | Mask::Or(t) => {
                if let Some(v) = Arc::get_mut(&mut t.0) {
                    stack.extend(v.drain(..));
                }
            }
            Mask::Not(m) => {
                if let Some(m) = Arc::get_mut(m) {
                    stack.push(std::mem::replace(m, Mask::Full));
                }
            }
            Mask::PerHead(ms) => {
                if let Some(ms) = Arc::get_mut(ms) {
                    stack.extend(ms.iter_mut().map(|m| std::mem::replace(m, Mask::Full)));
                }
            }
            _ => {}
        }
    }
}

impl Drop for Mask {
    /// Dropping a deep tree node by node would recurse once per level: take the children
    /// out first and drop them from a stack.
    fn drop(&mut self) {
        let mut stack = Vec::new();
        self.take_children(&mut stack);
        while let Some(mut m) = stack.pop() {
            m.take_children(&mut stack);
        }
    }
}

impl PartialEq for Mask {
    /// Structural equality: the same tree of the same terms with the same data. Two
    /// function masks are equal only when they are the same function object.
    fn eq(&self, other: &Mask) -> bool {
        let mut stack = vec![(self, other)];
        while let Some((a, b)) = stack.pop() {
            let same = match (a, b) {
                (Mask::Full, Mask::Full) => true,
                (Mask::Causal(x), Mask::Causal(y)) => x == y,
                (
                    Mask::Window { left, right },
                    Mask::Window {
                        left: l2,
                        right: r2,
                    },
                ) => (left, right) == (l2, r2),
                (
                    Mask::Chunks { size, earlier },
                    Mask::Chunks {
                        size: s2,
                        earlier: e2,
                    },
                ) => (size, earlier) == (s2, e2),
                (
                    Mask::Neighbourhood {
                        height,
                        width,
                        radius,
                    },
                    Mask::Neighbourhood {
                        height: h2,
                        width: w2,
                        radius: r2,
                    },
                ) => (height, width, radius) == (h2, w2, r2),
                (
                    Mask::Natten {
                        height,
                        width,
                        kernel,
                        dilation,
                    },
                    Mask::Natten {
                        height: h2,
                        width: w2,
                        kernel: k2,
                        dilation: d2,
                    },
                ) => (height, width, kernel, dilation) == (h2, w2, k2, d2),
                (
                    Mask::Swin {
                        height,
                        width,
                        window,
                        shift,
                    },
                    Mask::Swin {
                        height: h2,
                        width: w2,
                        window: win2,
                        shift: s2,
                    },
                ) => (height, width, window, shift) == (h2, w2, win2, s2),
                (Mask::Chunked { size, left }, Mask::Chunked { size: s2, left: l2 }) => {
                    (size, left) == (s2, l2)
                }
                (Mask::KeyLengths(x), Mask::KeyLengths(y))
                | (Mask::QueryLengths(x), Mask::QueryLengths(y))
                | (Mask::Prefix(x), Mask::Prefix(y)) => x == y,
                (Mask::KeyKeep { keep, rows }, Mask::KeyKeep { keep: k2, rows: r2 }) => {
                    rows == r2 && keep == k2
                }
                (
                    Mask::Documents {
                        query_ids,
                        key_ids,
                        rows,
                    },
                    Mask::Documents {
                        query_ids: q2,
                        key_ids: k2,
                        rows: r2,
                    },
                ) => rows == r2 && query_ids == q2 && key_ids == k2,
                (Mask::Dense(x), Mask::Dense(y)) => x == y,
                (
                    Mask::Func { f, per_batch_head },
                    Mask::Func {
                        f: f2,
                        per_batch_head: p2,
                    },
                ) => per_batch_head == p2 && Arc::ptr_eq(f, f2),
                (Mask::And(x), Mask::And(y)) | (Mask::Or(x), Mask::Or(y))
                    if Arc::ptr_eq(&x.0, &y.0) =>
                {
                    true
                }
                (Mask::Not(x), Mask::Not(y)) if Arc::ptr_eq(x, y) => true,
                (Mask::And(_), Mask::And(_))
                | (Mask::Or(_), Mask::Or(_))
                | (Mask::Not(_), Mask::Not(_))
                | (Mask::PerHead(_), Mask::PerHead(_)) => {
                    let ((a0, a1), (b0, b1)) = (a.children(), b.children());
                    a0.len() + a1.len() == b0.len() + b1.len() && {
                        stack.extend(a0.iter().chain(a1).zip(b0.iter().chain(b1)));
                        true
                    }
                }
                _ => false,
            };
            if !same {
                return false;
            }
        }
        true
    }
}

impl BitAnd for Mask {
    type Output = Mask;
    fn bitand(self, rhs: Mask) -> Mask {
        Mask::And(Terms::join(self, rhs, |m| match m {
            Mask::And(t) => Some(t),
            _ => None,
        }))
    }
}

impl BitOr for Mask {
    type Output = Mask;
    fn bitor(self, rhs: Mask) -> Mask {
        Mask::Or(Terms::join(self, rhs, |m| match m {
            Mask::Or(t) => Some(t),
            _ => None,
        }))
    }
}

impl Not for Mask {
    type Output = Mask;
    /// `!!m` is `m` itself, so a run of `!` never nests.
    fn not(mut self) -> Mask {
        if let Mask::Not(inner) = &mut self {
            let inner = std::mem::replace(inner, Arc::new(Mask::Full));
            return Arc::try_unwrap(inner).unwrap_or_else(|shared| (*shared).clone());
        }
        Mask::Not(Arc::new(self))
    }
}
