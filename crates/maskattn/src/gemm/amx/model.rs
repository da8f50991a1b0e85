//! The tile instructions in plain Rust, on the same bytes the CPU reads and writes: what the
//! AMX kernel runs on in the tests of every machine (none of ours has AMX).
//!
//! `tdpbf16ps` follows the Intel SDM's pseudo-code: for each row `m` of C, each pair `k` of
//! A's row and each column `n`,
//! `c[m][n] += a[m].bf16[2k] · b[k].bf16[2n]; c[m][n] += a[m].bf16[2k+1] · b[k].bf16[2n+1]`,
//! `k` ascending. What is modelled of its arithmetic ("round to nearest even is used when
//! doing each accumulation of the FMA; output denormals are always flushed to zero and input
//! denormals are always treated as zero; MXCSR is not consulted"):
//! - each product in f32, unrounded: a product of two bf16 (8-bit significands) is exact in
//!   f32 unless it under- or overflows the f32 range, so `acc + a·b` rounded once (f32 add,
//!   round to nearest even) is the fused step except below 2^-126 or above 2^128;
//! - inputs (bf16 operands, and the f32 accumulator as it enters) below 2^-126 read as zero
//!   of their sign, and each accumulation below 2^-126 becomes zero of its sign.
//!
//! A test under the accuracy rule of docs/design.md section 4 does not depend on either
//! choice: both change a result only where a value is below 2^-126 (1.2e-38), and such a
//! value moves every sum by less than 1.2e-38, under the f32 tolerance (`ε = 1e-5` at the
//! data's scale) by some thirty orders of magnitude. What the model does fix exactly is the
//! summation order and the byte layouts, which are what a wrong kernel would get wrong.

use super::tile::{TileConfig, TileUnit, COLSB, ROWS, TILES};

/// Eight tiles of 16 rows × 64 bytes, and the configuration they were given.
pub(crate) struct Model {
    cfg: Option<TileConfig>,
    tiles: [[[u8; COLSB]; ROWS]; TILES],
}

impl Model {
    pub fn new() -> Self {
        Model {
            cfg: None,
            tiles: [[[0; COLSB]; ROWS]; TILES],
        }
    }

    /// `(rows, colsb)` of `tile`; panics where the CPU raises #UD (no configuration, no
    /// such tile).
    fn shape(&self, tile: usize) -> (usize, usize) {
        let cfg = self
            .cfg
            .as_ref()
            .expect("tile instruction before ldtilecfg (#UD)");
        assert!(tile < TILES, "tmm{tile} does not exist (#UD)");
        (cfg.rows[tile] as usize, cfg.colsb[tile] as usize)
    }

    /// Whether `ldtilecfg` ran and no `tilerelease` since.
    #[cfg(test)]
    pub fn configured(&self) -> bool {
        self.cfg.is_some()
    }

    /// A tile's bytes, all 16 × 64 of them (tests check what the instructions zero).
    #[cfg(test)]
    pub fn bytes(&self, tile: usize) -> &[[u8; COLSB]; ROWS] {
        &self.tiles[tile]
    }

    fn word(&self, tile: usize, row: usize, w: usize) -> u32 {
        let b = &self.tiles[tile][row][4 * w..4 * w + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Zero of `x`'s sign where `x` is below the normal range (DAZ on inputs, FTZ on outputs).
#[inline(always)]
fn flush(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0 {
        f32::from_bits(bits & 0x8000_0000)
    } else {
        x
    }
}

/// A bf16 (the high half of an f32) as the instruction reads it: denormals as zero.
#[inline(always)]
fn bf16(bits: u32) -> f32 {
    flush(f32::from_bits(bits << 16))
}

// SAFETY: `load` and `store` touch exactly `rows` rows of `colsb` bytes `stride` apart,
// as the instructions do; everything else is on the model's own arrays.
unsafe impl TileUnit for Model {
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        assert!(cfg.valid(), "ldtilecfg with an invalid configuration (#GP)");
        super::mode::MODEL_CONFIGURES.bump();
        self.cfg = Some(*cfg);
        self.tiles = [[[0; COLSB]; ROWS]; TILES];
    }

    unsafe fn load(&mut self, tile: usize, ptr: *const u8, stride: usize) {
        let (rows, colsb) = self.shape(tile);
        let t = &mut self.tiles[tile];
        *t = [[0; COLSB]; ROWS];
        for (r, row) in t.iter_mut().enumerate().take(rows) {
            // SAFETY: the trait's contract: these bytes are valid to read.
            unsafe { std::ptr::copy_nonoverlapping(ptr.add(r * stride), row.as_mut_ptr(), colsb) };
        }
    }

    unsafe fn zero(&mut self, tile: usize) {
        self.shape(tile);
        self.tiles[tile] = [[0; COLSB]; ROWS];
    }

    unsafe fn dpbf16ps(&mut self, c: usize, a: usize, b: usize) {
        let ((m, c_colsb), (a_rows, a_colsb), (b_rows, b_colsb)) =
            (self.shape(c), self.shape(a), self.shape(b));
        assert!(
            c != a && c != b && a != b,
            "tdpbf16ps on one tile twice (#UD)"
        );
        assert!(
            a_rows == m && a_colsb == 4 * b_rows && b_colsb == c_colsb && c_colsb % 4 == 0,
            "tdpbf16ps shapes do not agree (#UD)"
        );
        let (kp, n) = (a_colsb / 4, c_colsb / 4);
        let mut out = [[0u8; COLSB]; ROWS];
        for (i, out_row) in out.iter_mut().enumerate().take(m) {
            let mut acc = [0f32; COLSB / 4];
            for (j, x) in acc.iter_mut().enumerate().take(n) {
                *x = flush(f32::from_bits(self.word(c, i, j)));
            }
            for p in 0..kp {
                let aw = self.word(a, i, p);
                let (a0, a1) = (bf16(aw & 0xffff), bf16(aw >> 16));
                for (j, x) in acc.iter_mut().enumerate().take(n) {
                    let bw = self.word(b, p, j);
                    *x = flush(*x + a0 * bf16(bw & 0xffff));
                    *x = flush(*x + a1 * bf16(bw >> 16));
                }
            }
            for (j, x) in acc.iter().enumerate().take(n) {
                out_row[4 * j..4 * j + 4].copy_from_slice(&x.to_le_bytes());
            }
        }
        self.tiles[c] = out;
    }

    unsafe fn store(&mut self, tile: usize, ptr: *mut u8, stride: usize) {
        let (rows, colsb) = self.shape(tile);
        for (r, row) in self.tiles[tile].iter().enumerate().take(rows) {
            // SAFETY: the trait's contract: these bytes are valid to write.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), ptr.add(r * stride), colsb) };
        }
    }

    unsafe fn release(&mut self) {
        self.cfg = None;
        self.tiles = [[[0; COLSB]; ROWS]; TILES];
    }
}
