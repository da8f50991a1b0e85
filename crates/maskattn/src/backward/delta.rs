//! The backward's terms per query row, before the tasks: `D_i = dO_i · O_i`, which query
//! tiles hold a non-finite Q or dO value, and the sinks' gradient (a sum over rows).

use rayon::prelude::*;

use crate::block::{BlockMask, Tile};
use crate::pack;
use crate::shape::AttnDims;
use crate::simd::{self, Simd, WithSimd};
use crate::view::{Element, View};

/// What the tasks read per query row and per query tile.
pub(super) struct RowTerms {
    /// `D_i = dO_i · O_i`, one per query row.
    pub delta: Vec<f32>,
    /// Per (b, query head, query tile): every Q and dO value of the tile is finite (else the
    /// products over its query rows must skip the pairs the mask hides).
    pub rows_finite: Vec<bool>,
}

/// The row terms of a checked call; with `sinks` (the call's, where `dsinks` is wanted),
/// `dsinks` receives `−Σ_{b,i} e^{sink_h − LSE_i} D_i`.
pub(super) fn row_terms<T: Element>(
    q: &View<T>,
    (out, dout, lse): (&View<f32>, &View<f32>, &[f32]),
    block: &BlockMask,
    dims: &AttnDims,
    sinks: Option<&[f32]>,
    dsinks: Option<&mut [f32]>,
) -> RowTerms {
    let AttnDims {
        batch,
        q_heads,
        lq,
        d,
        ..
    } = *dims;
    let (tq, nq) = (block.tile_q(), block.grid().0);
    let mut delta = vec![0f32; batch * q_heads * lq];
    let mut rows_finite = vec![true; batch * q_heads * nq];
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
    if let (Some(dst), Some(_)) = (dsinks, sinks) {
        // Summed over batch rows in order.
        for (h, x) in dst.iter_mut().enumerate() {
            *x = (0..batch).map(|b| dsink_rows[b * q_heads + h]).sum::<f64>() as f32;
        }
    }
    RowTerms { delta, rows_finite }
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
