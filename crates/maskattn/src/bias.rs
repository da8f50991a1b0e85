//! An optional additive bias on the scores (ALiBi, relative positions, a soft mask),
//! broadcast like a dense mask over `[B or 1, H or 1, L_q or 1, L_k or 1]`.

use crate::error::{AttnError, Result};

#[derive(Clone, Copy, Debug)]
pub struct Bias<'a> {
    data: &'a [f32],
    dims: [usize; 4],
}

impl<'a> Bias<'a> {
    pub fn new(data: &'a [f32], dims: [usize; 4]) -> Result<Self> {
        // Checked: a wrapped product could match a short buffer.
        let n = dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        let Some(n) = n.filter(|&n| n == data.len()) else {
            let n = n.map_or("more than usize::MAX".to_string(), |n| n.to_string());
            return Err(AttnError::ShapeMismatch {
                what: format!(
                    "bias holds {} values, its dims {dims:?} need {n}",
                    data.len()
                ),
            });
        };
        debug_assert_eq!(n, data.len());
        Ok(Bias { data, dims })
    }

    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// Checks that the bias broadcasts to `[batch, heads, lq, lk]`.
    pub(crate) fn check(&self, want: [usize; 4]) -> Result<()> {
        for (&got, &n) in self.dims.iter().zip(want.iter()) {
            if got != 1 && got != n {
                return Err(AttnError::ShapeMismatch {
                    what: format!("bias dims {:?} do not broadcast to {want:?}", self.dims),
                });
            }
        }
        Ok(())
    }

    /// The bias row of `(b, h, i)`: `L_k` values, or one value when broadcast over keys.
    #[inline]
    pub(crate) fn row(&self, b: usize, h: usize, i: usize) -> &'a [f32] {
        let [db, dh, dq, dk] = self.dims;
        let pick = |x: usize, n: usize| if n == 1 { 0 } else { x };
        let start = ((pick(b, db) * dh + pick(h, dh)) * dq + pick(i, dq)) * dk;
        &self.data[start..start + dk]
    }

    /// The bias of tile rows `i0..i0 + rows` and columns `j0..j0 + cols` of head `(b, h)`
    /// into `out` (`rows × ld`, padding columns 0).
    pub(crate) fn tile(
        &self,
        (b, h): (usize, usize),
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
        (ld, out): (usize, &mut [f32]),
    ) {
        for (r, dst) in out[..rows * ld].chunks_exact_mut(ld).enumerate() {
            let row = self.row(b, h, i0 + r);
            if row.len() == 1 {
                dst[..cols].fill(row[0]);
            } else {
                dst[..cols].copy_from_slice(&row[j0..j0 + cols]);
            }
            dst[cols..].fill(0.0);
        }
    }

    /// The index into the bias's data that pair `(b, h, i, j)` reads.
    #[inline]
    pub(crate) fn index(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        let [db, dh, dq, dk] = self.dims;
        let pick = |x: usize, n: usize| if n == 1 { 0 } else { x };
        ((pick(b, db) * dh + pick(h, dh)) * dq + pick(i, dq)) * dk + pick(j, dk)
    }

    #[inline]
    pub(crate) fn get(&self, b: usize, h: usize, i: usize, j: usize) -> f32 {
        let row = self.row(b, h, i);
        row[if row.len() == 1 { 0 } else { j }]
    }
}
