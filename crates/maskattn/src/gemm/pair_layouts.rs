//! The bf16 rounding that makes the pair products' operands out of f32 tiles (`P̃`, `P`,
//! `dS`): [`round_rows`](bf16::round_rows), [`interleave_rows`](bf16::interleave_rows) and
//! [`transpose_rows`](bf16::transpose_rows), on AVX512-BF16 where the kernels run on AVX-512
//! and the CPU has it, and the same bits in scalar code everywhere else.
//!
//! The scalar side is what lets the AMX kernel run through its plain-Rust model on every
//! x86-64 CPU (`MASKATTN_AMX=model`): the model needs operands, not instructions. A CPU
//! with AVX512-BF16 takes the scalar side too when a narrower set is forced
//! (`MASKATTN_ISA=avx2` or `set_isa`), which is how a test sees it run there.
//!
//! Scalar rounding follows `vcvtneps2bf16` exactly (Intel SDM, `convert_fp32_to_bfloat16`):
//! zeros and denormals become a zero of their sign (the instruction ignores MXCSR and treats
//! denormal inputs as zero), NaN keeps its sign and top payload bits with the quiet bit set,
//! everything else rounds to nearest, ties to even (∞ stays ∞; above the largest bf16 rounds
//! to ∞). So the model's results do not depend on which side packed its operands.

use std::sync::atomic::{AtomicU64, Ordering};

use super::bf16;
use crate::simd::{self, Bf16Path};

/// Which code rounds the operands: picked per call by [`Packing::of`] (from the call's
/// [`Bf16Path`]) or [`Packing::now`], the only ways to make one, so that the vector side
/// exists only where its instructions do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Packing {
    vector: bool,
}

/// Tiles rounded in scalar code in this process (for the tests: which side ran).
static SCALAR_TILES: AtomicU64 = AtomicU64::new(0);

/// Tiles the scalar side has rounded in this process: lets a test see that the bf16 path
/// really packed its operands without AVX512-BF16.
#[doc(hidden)]
pub fn bf16_scalar_packings() -> u64 {
    SCALAR_TILES.load(Ordering::Relaxed)
}

/// Which side a bf16 call starting now packs its operands on: "AVX512-BF16" or "scalar"
/// (for the tests' lines; see [`Packing::now`]).
#[doc(hidden)]
pub fn bf16_packing() -> &'static str {
    Packing::now().name()
}

impl Packing {
    /// AVX512-BF16 where the kernels may use the bf16 instructions now
    /// ([`simd::bf16_instructions`]: the CPU has them, the kernels run on AVX-512,
    /// `MASKATTN_BF16_DOT` is not `0`), else scalar.
    pub fn now() -> Packing {
        Packing {
            vector: simd::bf16_instructions(),
        }
    }

    /// The packing of a call whose path `simd::bf16_path` decided (the same read of the
    /// instruction set as its engine's).
    pub fn of(path: Bf16Path) -> Packing {
        Packing {
            vector: path.vector,
        }
    }

    /// The scalar side, whatever the CPU (tests).
    #[cfg(test)]
    fn scalar() -> Packing {
        Packing { vector: false }
    }

    /// "AVX512-BF16" or "scalar", for the tests' lines.
    pub fn name(self) -> &'static str {
        if self.vector {
            "AVX512-BF16"
        } else {
            "scalar"
        }
    }

    fn count(self) {
        if !self.vector {
            SCALAR_TILES.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`bf16::round_rows`]: `dst[r·n + c] = bf16(src[r·ld + c])`, `n % 16 == 0`.
    pub fn round_rows(self, src: &[f32], rows: usize, ld: usize, n: usize, dst: &mut [u16]) {
        assert!(n.is_multiple_of(16) && dst.len() >= rows * n);
        assert!(rows == 0 || src.len() >= (rows - 1) * ld + n);
        self.count();
        if self.vector {
            // SAFETY: `vector` is only set where `simd::bf16_instructions()`; sizes
            // asserted above.
            return unsafe { bf16::round_rows(src, rows, ld, n, dst) };
        }
        for r in 0..rows {
            for (d, &s) in dst[r * n..(r + 1) * n].iter_mut().zip(&src[r * ld..]) {
                *d = round(s);
            }
        }
    }

    /// [`bf16::interleave_rows`]: `dst[p·n + c]` = rows `2p` (low half) and `2p + 1` (high
    /// half, zero past `rows`) of column `c`, `n % 16 == 0`.
    pub fn interleave_rows(self, src: &[f32], rows: usize, ld: usize, n: usize, dst: &mut [u32]) {
        let pairs = rows.div_ceil(2);
        assert!(n.is_multiple_of(16) && dst.len() >= pairs * n);
        assert!(rows == 0 || src.len() >= (rows - 1) * ld + n);
        self.count();
        if self.vector {
            // SAFETY: `vector` is only set where `simd::bf16_instructions()`; sizes
            // asserted above.
            return unsafe { bf16::interleave_rows(src, rows, ld, n, dst) };
        }
        for p in 0..pairs {
            let (r0, r1) = (2 * p, 2 * p + 1);
            for c in 0..n {
                let lo = round(src[r0 * ld + c]) as u32;
                let hi = if r1 < rows {
                    round(src[r1 * ld + c]) as u32
                } else {
                    0
                };
                dst[p * n + c] = lo | hi << 16;
            }
        }
    }

    /// [`bf16::transpose_rows`]: `dst[r·n + c] = bf16(src[c·ld + r])` for `c < cols`, 0 for
    /// `cols ≤ c < n`; rows `rows..` of `dst` untouched.
    pub fn transpose_rows(
        self,
        src: &[f32],
        (cols, ld): (usize, usize),
        (rows, n): (usize, usize),
        dst: &mut [u16],
    ) {
        self.count();
        if self.vector {
            // SAFETY: `vector` is only set where `simd::bf16_instructions()` (the function
            // asserts its sizes itself).
            return unsafe { bf16::transpose_rows(src, (cols, ld), (rows, n), dst) };
        }
        // The vector side's preconditions, so that both refuse the same calls.
        assert!(ld.is_multiple_of(16) && ld >= rows && src.len() >= cols * ld);
        assert!(n.is_multiple_of(16) && n >= cols && dst.len() >= rows * n);
        for r in 0..rows {
            let row = &mut dst[r * n..(r + 1) * n];
            for (c, d) in row[..cols].iter_mut().enumerate() {
                *d = round(src[c * ld + r]);
            }
            row[cols..].fill(0);
        }
    }
}

/// One f32 to bf16 bits as `vcvtneps2bf16` rounds it (see the module comment).
#[inline(always)]
fn round(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0 {
        // Zero or denormal: a zero of its sign.
        (bits >> 16) as u16 & 0x8000
    } else if x.is_nan() {
        (bits >> 16) as u16 | 0x0040
    } else {
        // Round to nearest, ties to even; a carry into the exponent is the right result
        // (up to ∞ past the largest bf16).
        let bias = 0x7fff + ((bits >> 16) & 1);
        (bits.wrapping_add(bias) >> 16) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::{round, Packing};
    use crate::rng::SplitMix64;

    /// Random f32 bits of every kind: normal numbers of either sign near 1 and at the ends
    /// of the range, halfway cases (ties), zeros, denormals, ∞ and NaNs (quiet and
    /// signalling, either sign).
    fn value(rng: &mut SplitMix64) -> f32 {
        let r = rng.next_u64();
        let sign = (r as u32 & 1) << 31;
        let mut mant = (r >> 16) as u32 & 0x7f_ffff;
        if r % 4 == 1 {
            mant = (mant & !0xffff) | 0x8000; // exactly halfway between two bf16
        }
        let exp = match (r >> 8) % 8 {
            0 => 1,
            1 => 254,
            _ => 100 + (r >> 12) as u32 % 50,
        };
        let bits = match (r >> 40) % 16 {
            0 => sign,
            1 => sign | mant.max(1),               // denormal
            2 => sign | 0x7f80_0000,               // ∞
            3 => sign | 0x7f80_0000 | mant.max(1), // NaN
            _ => sign | exp << 23 | mant,
        };
        f32::from_bits(bits)
    }

    #[test]
    fn scalar_rounding_is_the_instructions() {
        // Against `half` (round to nearest even) where the instruction agrees with it.
        let mut rng = SplitMix64::new(3);
        for _ in 0..100_000 {
            let x = value(&mut rng);
            let got = round(x);
            let bits = x.to_bits();
            if bits & 0x7f80_0000 == 0 {
                assert_eq!(got, (bits >> 16) as u16 & 0x8000, "{bits:#x}: a zero");
            } else if x.is_nan() {
                assert_eq!(got, (bits >> 16) as u16 | 0x40, "{bits:#x}: quiet NaN");
            } else {
                let want = half::bf16::from_f32(x).to_bits();
                assert_eq!(got, want, "{bits:#x}");
            }
        }
        // The edges by hand: a tie to even down and up, the largest bf16 rounding to ∞.
        assert_eq!(round(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(round(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(round(f32::from_bits(0x7f7f_ffff)), 0x7f80);
        assert_eq!(round(f32::from_bits(0x0000_0001)), 0x0000);
        assert_eq!(round(f32::from_bits(0x807f_ffff)), 0x8000);
        assert_eq!(round(f32::from_bits(0xff80_0001)), 0xffc0);
    }

    /// Sizes `(cols, ld, rows, n)` as in `gemm::bf16`'s test of the transpose.
    const SIZES: [(usize, usize, usize, usize); 6] = [
        (1, 16, 1, 16),
        (5, 16, 3, 16),
        (17, 32, 31, 48),
        (63, 16, 1, 64),
        (1, 64, 63, 16),
        (101, 96, 77, 128),
    ];

    /// The scalar side against the layouts' definitions (every CPU), and bit for bit
    /// against the AVX512-BF16 side where that runs.
    #[test]
    fn scalar_layouts_match_their_definition_and_the_vector_side() {
        let vector = Packing::now();
        if vector == Packing::scalar() {
            eprintln!("pair_layouts: scalar side checked; SKIPPED the comparison with AVX512-BF16 (not available here)");
        } else {
            eprintln!("pair_layouts: scalar side checked, and against AVX512-BF16 bit for bit");
        }
        let mut rng = SplitMix64::new(9);
        for (cols, ld, rows, n) in SIZES {
            let src: Vec<f32> = (0..cols.max(rows) * ld).map(|_| value(&mut rng)).collect();
            let sides = [Packing::scalar(), vector];
            // round_rows over `rows` rows (at most `n` wide).
            let (rr, nr) = (rows, n.min(ld));
            let out: Vec<Vec<u16>> = sides
                .iter()
                .map(|p| {
                    let mut d = vec![0xdead; rr * nr + 1];
                    p.round_rows(&src, rr, ld, nr, &mut d);
                    d
                })
                .collect();
            for r in 0..rr {
                for c in 0..nr {
                    assert_eq!(
                        out[0][r * nr + c],
                        round(src[r * ld + c]),
                        "round ({r}, {c})"
                    );
                }
            }
            assert_eq!(out[0][rr * nr], 0xdead, "round_rows wrote past its rows");
            assert!(
                out[0] == out[1],
                "round_rows {:?}: sides differ",
                (rr, ld, nr)
            );
            // interleave_rows.
            let out: Vec<Vec<u32>> = sides
                .iter()
                .map(|p| {
                    let mut d = vec![0xdead; rr.div_ceil(2) * nr + 1];
                    p.interleave_rows(&src, rr, ld, nr, &mut d);
                    d
                })
                .collect();
            for p in 0..rr.div_ceil(2) {
                for c in 0..nr {
                    let hi = if 2 * p + 1 < rr {
                        round(src[(2 * p + 1) * ld + c]) as u32
                    } else {
                        0
                    };
                    let want = round(src[2 * p * ld + c]) as u32 | hi << 16;
                    assert_eq!(out[0][p * nr + c], want, "interleave ({p}, {c})");
                }
            }
            assert!(
                out[0] == out[1],
                "interleave_rows {:?}: sides differ",
                (rr, ld, nr)
            );
            // transpose_rows.
            let out: Vec<Vec<u16>> = sides
                .iter()
                .map(|p| {
                    let mut d = vec![0xdead; (rows + 1) * n];
                    p.transpose_rows(&src, (cols, ld), (rows, n), &mut d);
                    d
                })
                .collect();
            for r in 0..rows {
                for c in 0..n {
                    let want = if c < cols { round(src[c * ld + r]) } else { 0 };
                    assert_eq!(out[0][r * n + c], want, "transpose ({r}, {c})");
                }
            }
            assert!(out[0][rows * n..].iter().all(|&x| x == 0xdead));
            assert!(
                out[0] == out[1],
                "transpose_rows {:?}: sides differ",
                (cols, ld, rows, n)
            );
        }
    }
}
