//! The model path's f32 matrix products (the fused linear layer's, `bench`'s practical
//! peak) on the `gemm` crate, at the instruction set the attention kernels use: with
//! `MASKATTN_ISA=avx2` (or `maskattn::set_isa`) they take gemm's AVX2+FMA kernels on a CPU
//! with AVX-512 as well, so that one switch runs the whole model path as an AVX2 server
//! runs it; `portable` takes gemm's scalar kernels.
//!
//! `gemm` 0.19 picks its kernels itself, once per process, from
//! `is_x86_feature_detected!("avx512f")` (with the `x86-v4` feature this workspace enables),
//! and has no setting or environment variable to cap that. Its per-level pieces are public
//! one crate down, though: `gemm_common::gemm::gemm_basic_generic` over a SIMD level
//! (`gemm_common::simd::V3` = AVX2+FMA, `Scalar`) with the kernel tables of
//! `gemm_f32::microkernel::{fma, scalar}::f32` — the very call `gemm::gemm` makes after its
//! own choice (`gemm_common::gemm_def!` / `__inject_mod!`), made here at our level. These
//! are gemm's internals, pinned by Cargo.lock (0.19.0); `tests/products_isa.rs` checks every
//! level against an f64 product.
//!
//! On AVX2, where the system has OpenBLAS with an AVX2 core, the products take its kernels
//! instead (`openblas.rs` says why and how to tell).
//!
//! candle's own matmuls (`Tensor::matmul`: `reference.rs`, `candle_nn::Linear` for dtypes
//! other than f32) still call `gemm::gemm` and so keep its choice.
//!
//! With several threads a product is split into one band of `dst`'s rows (or columns) per
//! thread, each band a single-threaded product ([`gemm_f32`] says why and when), for the
//! same bits as the whole product on one thread (`tests/products_isa.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use maskattn::Isa;

/// Products run per level in this process, indexed by [`slot`]: lets a test (and a
/// benchmark) see which kernels ran.
static RUN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn slot(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 0,
        Isa::Avx2 => 1,
        Isa::Portable => 2,
        Isa::Neon => 3,
    }
}

/// The instruction set the f32 products take now: the kernels' ([`maskattn::current_isa`]),
/// which is the widest the CPU has unless `MASKATTN_ISA` or `set_isa` forced a narrower one.
pub fn products_isa() -> Isa {
    maskattn::current_isa()
}

/// Products of this process that ran on OpenBLAS (`openblas.rs`).
static BLAS_RUN: AtomicU64 = AtomicU64::new(0);

/// Products this process ran on OpenBLAS's kernels.
#[doc(hidden)]
pub fn products_run_blas() -> u64 {
    BLAS_RUN.load(Ordering::Relaxed)
}

/// What runs the f32 products now: `"OpenBLAS <core>"` where OpenBLAS takes them (the
/// products on AVX2, the library present with an AVX2 core), else `"gemm"`; and, where
/// OpenBLAS loaded but does not take them, why not, for a benchmark's header.
pub fn products_backend() -> String {
    let isa = products_isa();
    match (crate::openblas::for_isa(isa), crate::openblas::core()) {
        (Some(_), Some(core)) => format!("OpenBLAS {core}"),
        (None, Some(core)) if isa == Isa::Avx2 => format!(
            "gemm (OpenBLAS chose its {core} kernels, not AVX2 ones: OPENBLAS_CORETYPE=Haswell)"
        ),
        _ => "gemm".into(),
    }
}

/// The core OpenBLAS chose where it loaded (`openblas.rs`), whether or not it takes the
/// products now.
pub fn openblas_core() -> Option<&'static str> {
    crate::openblas::core()
}

/// Products of this process that [`gemm_f32`] split into bands, one per thread: lets a test
/// see that the split ran.
static SPLIT: AtomicU64 = AtomicU64::new(0);

#[doc(hidden)]
pub fn products_split() -> u64 {
    SPLIT.load(Ordering::Relaxed)
}

/// Products this process ran on `isa`'s gemm kernels.
#[doc(hidden)]
pub fn products_run(isa: Isa) -> u64 {
    RUN[slot(isa)].load(Ordering::Relaxed)
}

/// `dst := alpha·dst + beta·lhs·rhs` (`dst` read only with `read_dst`), `dst [m × n]`,
/// `lhs [m × k]`, `rhs [k × n]`, element `(i, j)` of each at `i·rs + j·cs`: `gemm::gemm`
/// for f32, on the kernels of [`products_isa`].
///
/// # Safety
/// As for `gemm::gemm`: every element of the three matrices lies in memory valid for the
/// access (`dst` written, the others read), and `dst` overlaps neither operand.
pub unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs, dst_rs, read_dst): (*mut f32, isize, isize, bool),
    (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    par: gemm::Parallelism,
) {
    let isa = products_isa();
    RUN[slot(isa)].fetch_add(1, Ordering::Relaxed);
    let product = Product {
        dims: (m, n, k),
        dst: (dst, dst_cs, dst_rs, read_dst),
        lhs: (lhs, lhs_cs, lhs_rs),
        rhs: (rhs, rhs_cs, rhs_rs),
        alpha,
        beta,
    };
    let threads = match par {
        gemm::Parallelism::Rayon(t) => t,
        _ => 1,
    };
    // gemm's own threads helped little at the model's shapes (k of 128–512; on an Ice Lake
    // Xeon's AVX2 path, 2 threads: 28–45 GFLOP/s against 34–42 on one): split `dst` into
    // one band of rows (or columns) per thread, each band one single-threaded product.
    // Training steps' medians were 5–10% faster so, within the runs' noise
    // (docs/performance.md, "The model path's products").
    let blas_rows = crate::openblas::for_isa(isa).and_then(|_| {
        crate::openblas::result_rows(
            (m, n, k),
            (dst_rs, dst_cs),
            (lhs_rs, lhs_cs),
            (rhs_rs, rhs_cs),
        )
    });
    let blas = blas_rows.is_some();
    let (along_m, len, other, unit) = if let Some(rows) = blas_rows {
        // OpenBLAS sums an element over `k` in blocks that depend on `k` alone, but the
        // edges of its register tiles sum in another order: the bits of the whole come
        // only from bands of the rows of the row-major result it computes, starting at
        // multiples of `OPENBLAS_BAND`.
        let (len, other) = if rows { (m, n) } else { (n, m) };
        (rows, len, other, crate::openblas::OPENBLAS_BAND)
    } else if m >= n {
        (true, m, n, 16)
    } else {
        (false, n, m, 16)
    };
    let band = len.div_ceil(threads.max(1)).next_multiple_of(unit);
    let alike = blas || splits_alike(band, other, k);
    if threads > 1 && band < len && alike && m * n * k >= SPLIT_WORK {
        SPLIT.fetch_add(1, Ordering::Relaxed);
        let on_blas = (0..len.div_ceil(band))
            .into_par_iter()
            .map(|i| {
                let (start, size) = (i * band, band.min(len - i * band));
                // SAFETY: band `i` is the rows (columns) `start..start + size` of `dst` and
                // of `lhs` (columns of `rhs`): inside the caller's matrices, and the bands
                // of `dst` are disjoint.
                unsafe {
                    product
                        .band(along_m, start, size)
                        .run(isa, gemm::Parallelism::None)
                }
            })
            .reduce(|| true, |a, b| a && b);
        BLAS_RUN.fetch_add(on_blas as u64, Ordering::Relaxed);
        return;
    }
    // SAFETY: the caller's contract.
    let on_blas = unsafe { product.run(isa, par) };
    BLAS_RUN.fetch_add(on_blas as u64, Ordering::Relaxed);
}

/// One call of [`gemm_f32`], its arguments as it takes them.
#[derive(Clone, Copy)]
struct Product {
    dims: (usize, usize, usize),
    dst: (*mut f32, isize, isize, bool),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
}

// SAFETY: a `Product` only carries the caller's pointers to the bands of rayon's tasks;
// `gemm_f32`'s contract makes them valid for the call, and each task writes its own
// band of `dst` (`Product::band`) and only reads `lhs` and `rhs`.
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

impl Product {
    /// Rows (`along_m`) or columns `start .. start + size` of `dst`, with the rows of `lhs`
    /// (or the columns of `rhs`) they read.
    fn band(self, along_m: bool, start: usize, size: usize) -> Self {
        let (m, n, k) = self.dims;
        let (dst, dst_cs, dst_rs, read_dst) = self.dst;
        let (lhs, lhs_cs, lhs_rs) = self.lhs;
        let (rhs, rhs_cs, rhs_rs) = self.rhs;
        let skip = start as isize;
        if along_m {
            Product {
                dims: (size, n, k),
                dst: (dst.wrapping_offset(skip * dst_rs), dst_cs, dst_rs, read_dst),
                lhs: (lhs.wrapping_offset(skip * lhs_rs), lhs_cs, lhs_rs),
                ..self
            }
        } else {
            Product {
                dims: (m, size, k),
                dst: (dst.wrapping_offset(skip * dst_cs), dst_cs, dst_rs, read_dst),
                rhs: (rhs.wrapping_offset(skip * rhs_cs), rhs_cs, rhs_rs),
                ..self
            }
        }
    }

    /// The product as one call of OpenBLAS (where it takes `isa`'s products: then `true`)
    /// or of gemm's kernels on `isa`.
    ///
    /// # Safety
    /// [`gemm_f32`]'s contract.
    unsafe fn run(self, isa: Isa, par: gemm::Parallelism) -> bool {
        let Product {
            dims: (m, n, k),
            dst: (dst, dst_cs, dst_rs, read_dst),
            lhs: (lhs, lhs_cs, lhs_rs),
            rhs: (rhs, rhs_cs, rhs_rs),
            alpha,
            beta,
        } = self;
        if let Some(blas) = crate::openblas::for_isa(isa) {
            // SAFETY: the caller's contract.
            let done = unsafe {
                blas.sgemm(
                    (m, n, k),
                    (dst, dst_cs, dst_rs, read_dst),
                    (lhs, lhs_cs, lhs_rs),
                    (rhs, rhs_cs, rhs_rs),
                    alpha,
                    beta,
                )
            };
            if done {
                return true;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx2 | Isa::Portable) {
            let call = Normalized::new(
                (m, n, k),
                (dst, dst_cs, dst_rs),
                (lhs, lhs_cs, lhs_rs),
                (rhs, rhs_cs, rhs_rs),
            );
            // SAFETY: the caller's contract; `Normalized` only reorders the same elements.
            let done = unsafe {
                if isa == Isa::Avx2 {
                    call.fma(read_dst, alpha, beta, par)
                } else {
                    call.scalar(read_dst, alpha, beta, par)
                }
            };
            if done {
                return false;
            }
        }
        // SAFETY: the caller's contract.
        unsafe {
            gemm::gemm(
                m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
                alpha, beta, false, false, false, par,
            )
        }
        false
    }
}

/// Multiply-adds of a product at least, for [`gemm_f32`] to split it.
const SPLIT_WORK: usize = 1 << 20;

/// Whether bands of `band` rows (or columns) by `other` of a product over `k` run the same
/// arithmetic as the whole product, element for element: the same bits. gemm 0.19
/// (`gemm_common::gemm::gemm_basic_generic`) sums every element over `k` in blocks whose
/// size depends on `k` alone (`gemm_common::cache::kernel_params`), except in its special
/// cases, which depend on the shape: `k ≤ 2` (gevv), a side of 1 (gemv), `m·n ≤ 256`
/// (the horizontal kernels) and both sides ≤ 64 (blocks of `min(k, 512)`). A band over 64
/// with the other side at least 4 and `k > 2` stays out of all of them, as does the whole.
fn splits_alike(band: usize, other: usize, k: usize) -> bool {
    band > 64 && other >= 4 && k > 2
}

/// A product as `gemm::gemm` hands it to its kernels: `dst` column-oriented (else the
/// transposed product), every stride of `dst` and the reduction non-negative (gemm 0.19's
/// `gemm()`, line for line).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Normalized {
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
}

/// `gemm_basic_generic` on SIMD level `$simd` (`N = $n` f32 lanes) with the kernel tables
/// of `gemm_f32::microkernel::$kernels::f32`, as gemm-common's `__inject_mod!` calls it;
/// `false` where the CPU lacks the level.
#[cfg(target_arch = "x86_64")]
macro_rules! at_level {
    ($call:expr, $simd:ty, $kernels:ident, $n:literal, ($read_dst:expr, $alpha:expr, $beta:expr, $par:expr)) => {{
        use gemm_common::simd::MixedSimd;
        use gemm_f32::microkernel::$kernels::f32 as ukr;
        const N: usize = $n;
        match <$simd as MixedSimd<f32, f32, f32, f32>>::try_new() {
            None => false,
            Some(simd) => {
                let Normalized {
                    m,
                    n,
                    k,
                    dst,
                    lhs,
                    rhs,
                } = $call;
                gemm_common::gemm::gemm_basic_generic::<
                    _,
                    f32,
                    N,
                    { ukr::MR_DIV_N * N },
                    { ukr::NR },
                    { ukr::MR_DIV_N },
                    { ukr::H_M },
                    { ukr::H_N },
                >(
                    simd,
                    m,
                    n,
                    k,
                    dst.0,
                    dst.1,
                    dst.2,
                    $read_dst,
                    lhs.0,
                    lhs.1,
                    lhs.2,
                    rhs.0,
                    rhs.1,
                    rhs.2,
                    $alpha,
                    $beta,
                    false,
                    false,
                    false,
                    |a, b, c| a * b + c,
                    &ukr::UKR,
                    &ukr::H_UKR,
                    false,
                    $par,
                );
                true
            }
        }
    }};
}

#[cfg(target_arch = "x86_64")]
impl Normalized {
    fn new(
        (m, n, k): (usize, usize, usize),
        (mut dst, dst_cs, dst_rs): (*mut f32, isize, isize),
        lhs: (*const f32, isize, isize),
        rhs: (*const f32, isize, isize),
    ) -> Self {
        // The kernels prefer column-major destinations: transpose a row-major product.
        let (m, n, mut dst_cs, mut dst_rs, lhs, rhs) = if dst_cs.abs() < dst_rs.abs() {
            let t = |(p, cs, rs): (*const f32, isize, isize)| (p, rs, cs);
            (n, m, dst_rs, dst_cs, t(rhs), t(lhs))
        } else {
            (m, n, dst_cs, dst_rs, lhs, rhs)
        };
        let ((mut lhs, mut lhs_cs, mut lhs_rs), (mut rhs, mut rhs_cs, mut rhs_rs)) = (lhs, rhs);
        if dst_rs < 0 && m > 0 {
            dst = dst.wrapping_offset((m - 1) as isize * dst_rs);
            dst_rs = -dst_rs;
            lhs = lhs.wrapping_offset((m - 1) as isize * lhs_rs);
            lhs_rs = -lhs_rs;
        }
        if dst_cs < 0 && n > 0 {
            dst = dst.wrapping_offset((n - 1) as isize * dst_cs);
            dst_cs = -dst_cs;
            rhs = rhs.wrapping_offset((n - 1) as isize * rhs_cs);
            rhs_cs = -rhs_cs;
        }
        if lhs_cs < 0 && k > 0 {
            lhs = lhs.wrapping_offset((k - 1) as isize * lhs_cs);
            lhs_cs = -lhs_cs;
            rhs = rhs.wrapping_offset((k - 1) as isize * rhs_rs);
            rhs_rs = -rhs_rs;
        }
        Normalized {
            m,
            n,
            k,
            dst: (dst, dst_cs, dst_rs),
            lhs: (lhs, lhs_cs, lhs_rs),
            rhs: (rhs, rhs_cs, rhs_rs),
        }
    }

    /// On gemm's AVX2+FMA kernels (`V3`, 8 lanes); `false` where the CPU lacks what `V3`
    /// asks for (then nothing ran).
    ///
    /// # Safety
    /// [`gemm_f32`]'s contract.
    unsafe fn fma(self, read_dst: bool, alpha: f32, beta: f32, par: gemm::Parallelism) -> bool {
        // SAFETY: the caller's contract.
        unsafe {
            at_level!(
                self,
                gemm_common::simd::V3,
                fma,
                8,
                (read_dst, alpha, beta, par)
            )
        }
    }

    /// On gemm's scalar kernels (what it runs on a CPU without FMA).
    ///
    /// # Safety
    /// [`gemm_f32`]'s contract.
    unsafe fn scalar(self, read_dst: bool, alpha: f32, beta: f32, par: gemm::Parallelism) -> bool {
        // SAFETY: the caller's contract.
        unsafe {
            at_level!(
                self,
                gemm_common::simd::Scalar,
                scalar,
                1,
                (read_dst, alpha, beta, par)
            )
        }
    }
}
