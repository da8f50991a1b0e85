//! The tile operations the AMX kernel needs, as a trait with one implementation per way of
//! running them: [`Model`](super::model::Model) (plain Rust) and
//! [`Hardware`](super::hardware::Hardware) (the instructions).
//!
//! Palette 1: 8 tiles `tmm0..tmm7`, each up to 16 rows of up to 64 bytes; a tile's shape is
//! set by [`TileConfig`] (`ldtilecfg`). `tdpbf16ps c, a, b` multiplies `A [M × K/2 pairs]`
//! (bf16 pairs, `a.colsb = 2K` bytes) by `B [K/2 × N pairs]` (VNNI layout: B row `r`
//! holds, for each column `n`, the bf16 pair `(k = 2r, k = 2r + 1)`) into
//! `C [M × N f32]`; the shapes must agree (`a.rows = c.rows`, `a.colsb = 4·b.rows`,
//! `b.colsb = c.colsb`) and the three tiles differ, or the CPU raises #UD.

/// Rows of a tile at most.
pub(crate) const ROWS: usize = 16;
/// Bytes of a tile row at most.
pub(crate) const COLSB: usize = 64;
/// Tiles of palette 1.
pub(crate) const TILES: usize = 8;

/// The 64-byte operand of `ldtilecfg` (Intel SDM vol. 2, "LDTILECFG"): palette, start row,
/// then bytes per row of each of 16 tile slots (little-endian `u16`), then rows of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    pub palette: u8,
    pub start_row: u8,
    pub reserved: [u8; 14],
    pub colsb: [u16; 16],
    pub rows: [u8; 16],
}

impl TileConfig {
    /// Palette 1 with every one of the 8 tiles `rows × colsb` bytes.
    pub const fn uniform(rows: u8, colsb: u16) -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        let mut t = 0;
        while t < TILES {
            c.colsb[t] = colsb;
            c.rows[t] = rows;
            t += 1;
        }
        c
    }

    /// Shapes within palette 1's limits (what `ldtilecfg` would otherwise fault on).
    pub fn valid(&self) -> bool {
        self.palette == 1
            && self.reserved == [0; 14]
            && (0..16).all(|t| {
                let (r, cb) = (self.rows[t] as usize, self.colsb[t] as usize);
                if t >= TILES {
                    r == 0 && cb == 0
                } else {
                    r <= ROWS && cb <= COLSB && (r == 0) == (cb == 0)
                }
            })
    }
}

/// The AMX operations, tiles named by number (`0..8`).
///
/// # Safety
/// Implementations touch memory only as the instructions do: `load` reads `rows` rows of
/// `colsb` bytes, `stride` bytes apart, from `ptr`; `store` writes the same; the caller
/// guarantees those bytes are valid. `configure` comes before every other operation and
/// `release` after the last.
pub(crate) unsafe trait TileUnit {
    /// `ldtilecfg`. `cfg` must be [`TileConfig::valid`].
    unsafe fn configure(&mut self, cfg: &TileConfig);
    /// `tileloadd tile, [ptr + stride]`: rows past the tile's rows and bytes past its
    /// `colsb` are zero.
    unsafe fn load(&mut self, tile: usize, ptr: *const u8, stride: usize);
    /// `tilezero tile`.
    unsafe fn zero(&mut self, tile: usize);
    /// `tdpbf16ps c, a, b`: `C += A·B` on bf16 pairs (module comment).
    unsafe fn dpbf16ps(&mut self, c: usize, a: usize, b: usize);
    /// `tilestored [ptr + stride], tile`.
    unsafe fn store(&mut self, tile: usize, ptr: *mut u8, stride: usize);
    /// `tilerelease`: the tiles go back to their initial (unconfigured) state.
    unsafe fn release(&mut self);
}

// SAFETY: each operation is `U`'s own, on the same unit.
unsafe impl<U: TileUnit> TileUnit for &mut U {
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        // SAFETY: forwarded under the same contract.
        unsafe { (**self).configure(cfg) }
    }
    unsafe fn load(&mut self, tile: usize, ptr: *const u8, stride: usize) {
        // SAFETY: forwarded under the same contract.
        unsafe { (**self).load(tile, ptr, stride) }
    }
    unsafe fn zero(&mut self, tile: usize) {
        // SAFETY: forwarded under the same contract.
        unsafe { (**self).zero(tile) }
    }
    unsafe fn dpbf16ps(&mut self, c: usize, a: usize, b: usize) {
        // SAFETY: forwarded under the same contract.
        unsafe { (**self).dpbf16ps(c, a, b) }
    }
    unsafe fn store(&mut self, tile: usize, ptr: *mut u8, stride: usize) {
        // SAFETY: forwarded under the same contract.
        unsafe { (**self).store(tile, ptr, stride) }
    }
    unsafe fn release(&mut self) {
        // SAFETY: forwarded under the same contract.
        unsafe { (**self).release() }
    }
}
