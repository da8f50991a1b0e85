//! Element-wise loops over f32 slices: vectorised for the instruction set the kernels use
//! (the same body compiled three times, chosen at run time through the kernel crate's
//! [`maskattn::Isa`], so one vocabulary and one switch for both) and split over rayon's pool —
//! the pool the matrix products and the attention kernels already run on, so no second set
//! of spinning threads competes with them for the cores.

use std::sync::atomic::{AtomicU64, Ordering};

use maskattn::Isa;
use rayon::prelude::*;

/// Below this many elements a loop runs on the calling thread.
pub(crate) const PAR_MIN: usize = 32 * 1024;
/// Elements per parallel piece (a multiple of every vector width).
const PIECE: usize = 8 * 1024;

/// Calls of a multiversioned loop body per instruction set, indexed by [`slot`]: how a
/// test sees which compiled copy ran (one relaxed add per call of a whole piece or block
/// of rows, not per element).
static CALLS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn slot(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 0,
        Isa::Avx2 => 1,
        Isa::Neon => 2,
        Isa::Portable => 3,
    }
}

/// Counts one call of a loop body compiled for `isa` (called by [`multiversion`]).
pub(crate) fn count(isa: Isa) {
    CALLS[slot(isa)].fetch_add(1, Ordering::Relaxed);
}

/// How many times the fused ops' loop bodies have run on `isa` in this process: the
/// fused ops follow the kernel crate's choice ([`maskattn::current_isa`], so
/// `MASKATTN_ISA` and [`maskattn::set_isa`] reach them too), and this says which copy ran.
/// On NEON the loops run the portable copy, which the compiler vectorises for aarch64.
pub fn calls_on(isa: Isa) -> u64 {
    CALLS[slot(isa)].load(Ordering::Relaxed)
}

/// `fn name(args)` that runs the `#[inline(always)]` function `body(args)` compiled for the
/// instruction set the kernels use now ([`maskattn::current_isa`]): `body` is inlined into
/// a copy built with AVX-512, one with AVX2 + FMA, and a portable one (which the compiler
/// vectorises for the baseline).
macro_rules! multiversion {
    ($vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $ret:ty)? => $body:path) => {
        $vis fn $name($($a: $t),*) $(-> $ret)? {
            let isa = maskattn::current_isa();
            $crate::fused::par::count(isa);
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($a: $t),*) $(-> $ret)? { $body($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($a: $t),*) $(-> $ret)? { $body($($a),*) }
                match isa {
                    // SAFETY: `current_isa` returns only a set this CPU has (detected, or
                    // forced through `set_isa`, which refuses a set the CPU lacks).
                    maskattn::Isa::Avx512 => unsafe { v4($($a),*) },
                    // SAFETY: as for AVX-512.
                    maskattn::Isa::Avx2 => unsafe { v3($($a),*) },
                    _ => $body($($a),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            $body($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// `out[i] = f(x[i])` in pieces, in parallel when large.
pub(crate) fn map1(x: &[f32], f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if x.len() < PAR_MIN {
        f(x, &mut out);
    } else {
        out.par_chunks_mut(PIECE)
            .zip(x.par_chunks(PIECE))
            .for_each(|(o, x)| f(x, o));
    }
    out
}

/// `out[i] = f(x[i], y[i])` in pieces, in parallel when large.
pub(crate) fn map2(
    x: &[f32],
    y: &[f32],
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), y.len());
    let mut out = vec![0f32; x.len()];
    if x.len() < PAR_MIN {
        f(x, y, &mut out);
    } else {
        out.par_chunks_mut(PIECE)
            .zip(x.par_chunks(PIECE).zip(y.par_chunks(PIECE)))
            .for_each(|(o, (x, y))| f(x, y, o));
    }
    out
}

/// Accumulators of [`lane_sum`]: one vector register of f32 under AVX-512.
const LANES: usize = 16;

/// `Σ f(i)` for `i < n`, in `LANES` interleaved partial sums added at the end: the sums are
/// independent, so the loop vectorises (one long chain of f32 adds, which the compiler may
/// not reorder, costs the latency of an add per element). Fixed lane count, so the same
/// bits on every machine and instruction set.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let whole = n - n % LANES;
    for base in (0..whole).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(base + l);
        }
    }
    for (l, i) in (whole..n).enumerate() {
        acc[l] += f(i);
    }
    acc.iter().sum()
}

/// `max f(i)` for `i < n` (−∞ for none), in `LANES` interleaved running maxima, as
/// [`lane_sum`]: `f32::max`'s NaN handling in one chain does not vectorise. A NaN is
/// skipped here; callers that go on to `exp(x − max)` still end with NaN.
#[inline(always)]
pub(crate) fn lane_max(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let whole = n - n % LANES;
    for base in (0..whole).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            let v = f(base + l);
            *a = if v > *a { v } else { *a };
        }
    }
    for (l, i) in (whole..n).enumerate() {
        let v = f(i);
        acc[l] = if v > acc[l] { v } else { acc[l] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}
