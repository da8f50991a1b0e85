//! `C (+)= A·B` on bf16 pairs through AMX tiles, written once over [`TileUnit`].
//!
//! The operands are `gemm::bf16`'s [`Pairs`], and their layouts are the tiles' as they are:
//! an A row of `kp` pairs is a tile row of `4·kp` bytes, and B's pair-interleaved rows
//! (entry `(p, c)` = `B[2p][c], B[2p+1][c]`) are the VNNI layout `tdpbf16ps` reads. So the
//! tiles load straight from the operands with their row strides, and only the edges go
//! through a zero-padded copy: a block of fewer than 16 rows of A or C, or the last step of
//! fewer than 16 pairs. So one configuration serves every call: all eight tiles 16 rows ×
//! 64 bytes.
//!
//! Tile plan (2 × 2 blocking, each loaded tile feeds two products):
//! ```text
//!            B: tmm6  tmm7        (16 pairs × 16 columns each)
//! A: tmm4    C: tmm0  tmm1        (16 rows × 16 pairs; C 16 × 16 f32)
//!    tmm5       tmm2  tmm3
//! ```
//! C blocks of 32 × 32 walk over C; for each, `kp` runs in steps of 16 pairs. Sums: each
//! entry starts from C (`Add`, full rows) or zero, and adds the pairs in ascending order as
//! `tdpbf16ps` does; blocks of fewer rows are summed from zero and added to C after. Where
//! the pairs past the operands' end are padded, they are zero on both sides: `0·0` adds
//! nothing (a −0 sum may turn +0). Padded rows of A are zero and their results dropped, so
//! the `0·NaN` they make with a NaN in B never reaches C: C gets exactly the sums of the
//! operands' own pairs, and the 0·NaN guard of the callers (`softmax::Unseen`) holds as on the
//! AVX512-BF16 path.

use super::super::bf16::Pairs;
use super::super::{check_sizes, MatMut, Update};
use super::tile::{TileConfig, TileUnit, COLSB, ROWS};

/// Pairs (or f32) per tile row.
const TW: usize = COLSB / 4;
const CONFIG: TileConfig = TileConfig::uniform(ROWS as u8, COLSB as u16);
/// The tiles of the plan above: C block `(rb, cb)`, A rows `rb`, B columns `cb`.
const fn c_tile(rb: usize, cb: usize) -> usize {
    2 * rb + cb
}
const fn a_tile(rb: usize) -> usize {
    4 + rb
}
const fn b_tile(cb: usize) -> usize {
    6 + cb
}

/// A zero-padded 16 × 16 tile of `u32` in memory, for the edges.
#[repr(C, align(64))]
struct Staged([[u32; TW]; ROWS]);

/// `C = A·B` or `C += A·B`, reducing over A's pairs (= B's rows), as `gemm::bf16::gemm`:
/// one product with its own `ldtilecfg` and `tilerelease` (a [`Configured`] of one).
///
/// # Safety
/// `unit` can run (for [`Hardware`](super::hardware::Hardware): `hardware::available()`).
/// The operands' bounds were checked when they were made.
#[inline(always)]
pub(crate) unsafe fn gemm<U: TileUnit>(
    unit: &mut U,
    c: MatMut,
    a: Pairs,
    b: Pairs,
    update: Update,
) {
    // SAFETY: the contract.
    unsafe { Configured::new(unit).gemm(c, a, b, update) }
}

/// The tiles configured for the kernel (`ldtilecfg`, the one configuration of the module
/// comment) for as long as this lives, and released (`tilerelease`) when it is dropped —
/// also when a panic unwinds through it. Products inside it configure nothing: a forward
/// task holds one across all its products instead of paying both instructions per product.
pub(crate) struct Configured<U: TileUnit> {
    unit: U,
}

impl<U: TileUnit> Configured<U> {
    /// # Safety
    /// `unit` can run (for [`Hardware`](super::hardware::Hardware): `hardware::available()`),
    /// and nothing else uses the tiles of this thread until this is dropped.
    #[inline(always)]
    pub unsafe fn new(mut unit: U) -> Self {
        // SAFETY: the contract; `CONFIG` is valid (the model asserts it on every configure).
        unsafe { unit.configure(&CONFIG) };
        Configured { unit }
    }

    /// [`gemm`] on the configured tiles.
    ///
    /// # Safety
    /// The operands' bounds were checked when they were made.
    #[inline(always)]
    pub unsafe fn gemm(&mut self, c: MatMut, a: Pairs, b: Pairs, update: Update) {
        check_sizes((c.rows, c.cols), (a.rows, a.pairs), (b.rows, b.pairs, b.cs));
        assert!(a.cs == 1, "AMX tiles load rows of pairs");
        assert!(
            b.pairs.is_multiple_of(TW),
            "product columns not in whole tiles"
        );
        let (m, n) = (a.rows, b.pairs);
        if m == 0 || n == 0 {
            return;
        }
        let mut p = Product {
            a,
            b,
            c: c.data.as_mut_ptr(),
            ldc: c.rs,
            m,
            update,
            stage: [
                Staged([[0; TW]; ROWS]),
                Staged([[0; TW]; ROWS]),
                Staged([[0; TW]; ROWS]),
                Staged([[0; TW]; ROWS]),
                Staged([[0; TW]; ROWS]),
            ],
        };
        let unit = &mut self.unit;
        // SAFETY: the blocks handed out are inside C (`i0 < m`, `j0 + 16·nb ≤ n`); `unit`
        // runs and is configured with `CONFIG` (`new`).
        unsafe {
            for j0 in (0..n).step_by(2 * TW) {
                let nb = ((n - j0) / TW).min(2);
                for i0 in (0..m).step_by(2 * ROWS) {
                    // Block sizes as constants, so that the tile numbers are constants too.
                    match ((m - i0).div_ceil(ROWS).min(2), nb) {
                        (2, 2) => p.block::<U, 2, 2>(unit, i0, j0),
                        (2, _) => p.block::<U, 2, 1>(unit, i0, j0),
                        (_, 2) => p.block::<U, 1, 2>(unit, i0, j0),
                        _ => p.block::<U, 1, 1>(unit, i0, j0),
                    }
                }
            }
        }
    }
}

impl<U: TileUnit> Drop for Configured<U> {
    fn drop(&mut self) {
        // SAFETY: `new` configured this unit, which can run (its contract).
        unsafe { self.unit.release() }
    }
}

/// One product's operands and the staged edge tiles (A rows `0, 1`, B columns `0, 1`, C).
struct Product<'a> {
    a: Pairs<'a>,
    b: Pairs<'a>,
    c: *mut f32,
    ldc: usize,
    m: usize,
    update: Update,
    stage: [Staged; 5],
}

impl Product<'_> {
    /// The C block of `MB × NB` tiles at row `i0`, column `j0`, over every pair.
    ///
    /// # Safety
    /// `i0 + 16·(MB − 1) < m`, `j0 + 16·NB ≤ n`; the unit is configured with `CONFIG`.
    #[inline(always)]
    unsafe fn block<U: TileUnit, const MB: usize, const NB: usize>(
        &mut self,
        unit: &mut U,
        i0: usize,
        j0: usize,
    ) {
        let (a, b, ldc, kp) = (self.a, self.b, self.ldc, self.a.pairs);
        let add = self.update == Update::Add;
        let rows = |rb: usize| (self.m - i0 - ROWS * rb).min(ROWS);
        let [sa0, sa1, sb0, sb1, sc] = &mut self.stage;
        let (mut sa, mut sb) = ([sa0, sa1], [sb0, sb1]);
        // SAFETY: rows `i0 + 16·rb + r < m`, pairs `p0 + q < kp`, columns
        // `j0 + 16·cb + q < n`: inside the operands as `check_sizes` matched them against
        // the buffers they were checked against; the staged tiles are this value's.
        unsafe {
            let c_at = |rb: usize, cb: usize| self.c.add((i0 + ROWS * rb) * ldc + j0 + TW * cb);
            for rb in 0..MB {
                for cb in 0..NB {
                    if add && rows(rb) == ROWS {
                        unit.load(c_tile(rb, cb), c_at(rb, cb) as *const u8, 4 * ldc);
                    } else {
                        unit.zero(c_tile(rb, cb));
                    }
                }
            }
            for p0 in (0..kp).step_by(TW) {
                let kr = (kp - p0).min(TW);
                for (rb, stage) in sa.iter_mut().enumerate().take(MB) {
                    let src = a.ptr.add((i0 + ROWS * rb) * a.rs + p0);
                    if rows(rb) == ROWS && kr == TW {
                        unit.load(a_tile(rb), src as *const u8, 4 * a.rs);
                    } else {
                        let s = &mut stage.0;
                        for (r, row) in s.iter_mut().enumerate() {
                            for (q, x) in row.iter_mut().enumerate() {
                                let inside = r < rows(rb) && q < kr;
                                *x = if inside {
                                    src.add(r * a.rs + q).read_unaligned()
                                } else {
                                    0
                                };
                            }
                        }
                        unit.load(a_tile(rb), s.as_ptr() as *const u8, COLSB);
                    }
                }
                for (cb, stage) in sb.iter_mut().enumerate().take(NB) {
                    let src = b.ptr.add(p0 * b.rs + j0 + TW * cb);
                    if kr == TW {
                        unit.load(b_tile(cb), src as *const u8, 4 * b.rs);
                    } else {
                        let s = &mut stage.0;
                        for (r, row) in s.iter_mut().enumerate() {
                            for (q, x) in row.iter_mut().enumerate() {
                                *x = if r < kr {
                                    src.add(r * b.rs + q).read_unaligned()
                                } else {
                                    0
                                };
                            }
                        }
                        unit.load(b_tile(cb), s.as_ptr() as *const u8, COLSB);
                    }
                }
                for rb in 0..MB {
                    for cb in 0..NB {
                        unit.dpbf16ps(c_tile(rb, cb), a_tile(rb), b_tile(cb));
                    }
                }
            }
            for rb in 0..MB {
                for cb in 0..NB {
                    let dst = c_at(rb, cb);
                    if rows(rb) == ROWS {
                        unit.store(c_tile(rb, cb), dst as *mut u8, 4 * ldc);
                        continue;
                    }
                    unit.store(c_tile(rb, cb), sc.0.as_mut_ptr() as *mut u8, COLSB);
                    for (r, row) in sc.0.iter().enumerate().take(rows(rb)) {
                        for (q, &x) in row.iter().enumerate() {
                            let (y, out) = (f32::from_bits(x), dst.add(r * ldc + q));
                            *out = if add { *out + y } else { y };
                        }
                    }
                }
            }
        }
    }
}
