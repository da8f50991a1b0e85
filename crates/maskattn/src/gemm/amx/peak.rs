//! A register-only `tdpbf16ps` loop: the AMX limit `bench` holds bf16 rows on AMX to, as
//! the `vdpbf16ps` and FMA loops are the limits of the other paths.

use super::tile::{TileConfig, TileUnit, COLSB, ROWS};

/// `rounds` rounds (65536 FLOPs each: 4 products of `16 × 32` by `32 × 16` bf16, each
/// `16 · 16 · 32` multiplies and as many adds) of the four independent products `tmm0..3 += tmm4..5 · tmm6..7` (the
/// kernel's tile plan), operands loaded once, every bf16 `2^-10` so that each product adds
/// `32 · 2^-20` to each entry: far from overflow and far above the denormals it flushes.
/// Returns the sum of the four C tiles, `rounds · 4 · 256 · 32 · 2^-20` exactly.
///
/// # Safety
/// `unit` can run (for the hardware: `hardware::available()`).
pub(crate) unsafe fn tdpbf16ps_loop<U: TileUnit>(unit: &mut U, rounds: u64) -> f32 {
    let x = half::bf16::from_f32(1.0 / 1024.0).to_bits() as u32;
    let ops = [x | (x << 16); ROWS * COLSB / 4];
    let mut out = [0f32; ROWS * COLSB / 4];
    let mut sum = 0.0;
    // SAFETY: `ops` and `out` are 16 rows of 64 bytes; `unit` runs (the contract).
    unsafe {
        unit.configure(&TileConfig::uniform(ROWS as u8, COLSB as u16));
        for t in 0..4 {
            unit.zero(t);
        }
        for t in 4..8 {
            unit.load(t, ops.as_ptr().cast(), COLSB);
        }
        for _ in 0..rounds {
            unit.dpbf16ps(0, 4, 6);
            unit.dpbf16ps(1, 4, 7);
            unit.dpbf16ps(2, 5, 6);
            unit.dpbf16ps(3, 5, 7);
        }
        for t in 0..4 {
            unit.store(t, out.as_mut_ptr().cast(), COLSB);
            sum += out.iter().sum::<f32>();
        }
        unit.release();
    }
    sum
}
