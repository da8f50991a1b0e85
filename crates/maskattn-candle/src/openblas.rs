//! The model path's f32 products on OpenBLAS's AVX2 kernels, where the system has the
//! library: loaded at run time (`libopenblas.so.0`, Debian's `libopenblas0-pthread`), so
//! that the project builds and runs without it and takes gemm's kernels instead.
//!
//! Why: at the model's shapes (`k` of 128–512), 2 threads, run alternately with gemm 0.19's
//! AVX2 kernels, OpenBLAS's Haswell kernels had medians 1.0–1.7× gemm's (Intel Xeon family
//! 6 model 106 forced to AVX2, 2026-12-07; docs/performance.md, "The model path's products
//! on OpenBLAS"). On AVX-512 gemm's kernels beat OpenBLAS's SkylakeX ones at the same shapes,
//! so OpenBLAS is taken only where the products run on AVX2 *and* the core OpenBLAS chose
//! is an AVX2 one (`Haswell`, `Zen`): on a CPU with AVX-512, `MASKATTN_ISA=avx2` gets
//! OpenBLAS only with `OPENBLAS_CORETYPE=Haswell` beside it (OpenBLAS picks its core once,
//! when it loads), else gemm's AVX2 kernels.
//!
//! `MASKATTN_BLAS=off` keeps OpenBLAS out (gemm's kernels everywhere). OpenBLAS runs on
//! one thread per call here: the products' threads are rayon's (`products.rs` splits a
//! product into one band per thread), and OpenBLAS's own would contend with them.

use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

use maskattn::Isa;

/// `cblas_sgemm`, LP64 (32-bit integers: Debian's `libopenblas0`).
type Sgemm = unsafe extern "C" fn(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// The loaded library: its `cblas_sgemm` and the core it chose.
pub(crate) struct OpenBlas {
    sgemm: Sgemm,
    core: String,
    /// Keeps the library mapped while `sgemm` may be called (for the process's life).
    _lib: libloading::Library,
}

static LOADED: OnceLock<Option<OpenBlas>> = OnceLock::new();

/// The library names tried, in order.
const NAMES: [&str; 2] = ["libopenblas.so.0", "libopenblas.so"];

fn load() -> Option<OpenBlas> {
    if std::env::var("MASKATTN_BLAS").is_ok_and(|v| v.eq_ignore_ascii_case("off")) {
        return None;
    }
    NAMES.iter().find_map(|name| {
        // SAFETY: loading OpenBLAS runs its initialisers (it reads the environment and
        // starts its thread pool), nothing else; the symbols are declared as OpenBLAS's
        // `cblas.h` declares them (LP64).
        unsafe {
            let lib = libloading::Library::new(name).ok()?;
            let sgemm = *lib.get::<Sgemm>(b"cblas_sgemm\0").ok()?;
            let set_threads = *lib
                .get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
                .ok()?;
            let corename = *lib
                .get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_corename\0")
                .ok()?;
            set_threads(1);
            let core = CStr::from_ptr(corename()).to_string_lossy().into_owned();
            Some(OpenBlas {
                sgemm,
                core,
                _lib: lib,
            })
        }
    })
}

/// OpenBLAS where it loaded (once per process; `None` where it is absent or turned off).
pub(crate) fn loaded() -> Option<&'static OpenBlas> {
    LOADED.get_or_init(load).as_ref()
}

/// The instruction set of an OpenBLAS core name: the AVX2 cores whose f32 kernels this
/// module takes, the AVX-512 ones (whose kernels it leaves to gemm), else `None`.
fn core_isa(core: &str) -> Option<Isa> {
    match core.to_ascii_lowercase().as_str() {
        "haswell" | "zen" => Some(Isa::Avx2),
        "skylakex" | "cooperlake" | "sapphirerapids" => Some(Isa::Avx512),
        _ => None,
    }
}

/// OpenBLAS, if it runs the products of `isa`: `isa` is AVX2 and the library chose an
/// AVX2 core.
pub(crate) fn for_isa(isa: Isa) -> Option<&'static OpenBlas> {
    if isa != Isa::Avx2 {
        return None; // not even loaded for the other sets
    }
    loaded().filter(|b| core_isa(&b.core) == Some(Isa::Avx2))
}

/// The core OpenBLAS chose (`"Haswell"`, `"SkylakeX"`, …), `None` where it did not load.
pub(crate) fn core() -> Option<&'static str> {
    loaded().map(|b| b.core.as_str())
}

/// How one operand of `rows × cols` (element `(i, j)` at `i·rs + j·cs`) reads in a
/// row-major call: `(transposed, leading dimension)`, `None` where neither way fits (a
/// stride that is not 1 both ways, negative, or past `c_int`). A side of 1 leaves its
/// stride unread, so any value is fine there.
fn operand(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(bool, c_int)> {
    let (rows1, cols1) = (rows.max(1), cols.max(1));
    let fits = |ld: isize, least: usize| {
        if ld >= least as isize {
            c_int::try_from(ld).ok()
        } else {
            None
        }
    };
    if cols <= 1 || cs == 1 {
        let ld = if rows <= 1 { cols1 as isize } else { rs };
        if let Some(ld) = fits(ld, cols1) {
            return Some((false, ld));
        }
    }
    if rows <= 1 || rs == 1 {
        let ld = if cols <= 1 { rows1 as isize } else { cs };
        if let Some(ld) = fits(ld, rows1) {
            return Some((true, ld));
        }
    }
    None
}

/// Band length (a multiple of it) for a product split over threads to give the bits of the
/// whole: OpenBLAS's AVX2 `sgemm` tiles the rows of a row-major result by 12 and sums the
/// leftover rows in another order. Measured on OpenBLAS 0.3.21's Haswell kernels, bands of
/// 12, 24, 48, 72, 96, 120, 144, 384 or 768 rows gave the whole product's bits; bands of 8,
/// 16, 32, 40, 56, 64 or 128 did not, nor did bands of columns of any width
/// (`tests/products_isa.rs` checks the split in a child process on those kernels).
pub(crate) const OPENBLAS_BAND: usize = 12;

/// A product as one `cblas_sgemm` call computes it: the row-major result `C [m × n]` is
/// `dst` itself, or `dstᵀ = rhsᵀ · lhsᵀ` where `dst` is column-major (`swapped`).
struct Plan {
    swapped: bool,
    dims: (c_int, c_int, c_int),
    a: (bool, c_int),
    b: (bool, c_int),
    ldc: c_int,
}

/// The [`Plan`] of `dst [m × n] := … lhs [m × k] · rhs [k × n]` (each `(rs, cs)`), `None`
/// where a size is 0 or past `c_int`, or a layout does not fit `cblas_sgemm`.
fn plan(
    (m, n, k): (usize, usize, usize),
    dst: (isize, isize),
    lhs: (isize, isize),
    rhs: (isize, isize),
) -> Option<Plan> {
    if m == 0 || n == 0 || k == 0 {
        return None;
    }
    let t = |(rs, cs): (isize, isize)| (cs, rs);
    let (swapped, (m, n), lhs, rhs, ldc) = match operand(m, n, dst.0, dst.1) {
        Some((false, ldc)) => (false, (m, n), lhs, rhs, ldc),
        _ => match operand(n, m, dst.1, dst.0) {
            Some((false, ldc)) => (true, (n, m), t(rhs), t(lhs), ldc),
            _ => return None,
        },
    };
    Some(Plan {
        swapped,
        dims: (
            c_int::try_from(m).ok()?,
            c_int::try_from(n).ok()?,
            c_int::try_from(k).ok()?,
        ),
        a: operand(m, k, lhs.0, lhs.1)?,
        b: operand(k, n, rhs.0, rhs.1)?,
        ldc,
    })
}

/// Where [`OpenBlas::sgemm`] runs the product: `Some(true)` when the rows of its row-major
/// result are `dst`'s rows, `Some(false)` when they are `dst`'s columns (`dst` is
/// column-major), `None` when it leaves the product to gemm.
pub(crate) fn result_rows(
    dims: (usize, usize, usize),
    dst: (isize, isize),
    lhs: (isize, isize),
    rhs: (isize, isize),
) -> Option<bool> {
    plan(dims, dst, lhs, rhs).map(|p| !p.swapped)
}

impl OpenBlas {
    /// `dst := alpha·dst + beta·lhs·rhs` (`dst` read only with `read_dst`), as
    /// `products::gemm_f32` takes it; `false` (nothing written) where [`result_rows`] is
    /// `None`: the caller then runs gemm's kernels.
    ///
    /// # Safety
    /// `products::gemm_f32`'s contract.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn sgemm(
        &self,
        dims: (usize, usize, usize),
        (dst, dst_cs, dst_rs, read_dst): (*mut f32, isize, isize, bool),
        (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
        (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
        alpha: f32,
        beta: f32,
    ) -> bool {
        let Some(p) = plan(dims, (dst_rs, dst_cs), (lhs_rs, lhs_cs), (rhs_rs, rhs_cs)) else {
            return false;
        };
        // A column-major `dst` is the row-major `dstᵀ = rhsᵀ · lhsᵀ`.
        let (a, b) = if p.swapped { (rhs, lhs) } else { (lhs, rhs) };
        let ((ta, lda), (tb, ldb), (mi, ni, ki), ldc) = (p.a, p.b, p.dims, p.ldc);
        let t = |transposed: bool| if transposed { TRANS } else { NO_TRANS };
        // cblas: `C := α·A·B + β·C`, with C not read where β = 0.
        let c_beta = if read_dst { alpha } else { 0.0 };
        // SAFETY: the caller's contract puts every element the strides reach inside valid
        // memory; `operand` only renamed those strides as cblas's transposes and leading
        // dimensions, each at least the row length cblas requires.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                t(ta),
                t(tb),
                mi,
                ni,
                ki,
                beta,
                a,
                lda,
                b,
                ldb,
                c_beta,
                dst,
                ldc,
            )
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_map_to_cblas_layouts() {
        // Row-major 3 × 5 (rs 5, cs 1), column-major (rs 1, cs 3), padded rows (rs 8).
        assert_eq!(operand(3, 5, 5, 1), Some((false, 5)));
        assert_eq!(operand(3, 5, 1, 3), Some((true, 3)));
        assert_eq!(operand(3, 5, 8, 1), Some((false, 8)));
        // Rows too close together, strides neither way 1, negative: not expressible.
        assert_eq!(operand(3, 5, 4, 1), None);
        assert_eq!(operand(3, 5, 10, 2), None);
        assert_eq!(operand(3, 5, -5, 1), None);
        // A single row or column: its unread stride may be anything.
        assert_eq!(operand(1, 5, 1, 1), Some((false, 5)));
        assert_eq!(operand(5, 1, 1, 1), Some((false, 1)));
        assert_eq!(operand(1, 5, 0, 7), Some((true, 7)));
    }

    #[test]
    fn column_major_results_are_computed_transposed() {
        // `dst [3 × 5]` row-major, then column-major; `lhs [3 × 4]`, `rhs [4 × 5]` row-major.
        assert_eq!(result_rows((3, 5, 4), (5, 1), (4, 1), (5, 1)), Some(true));
        assert_eq!(result_rows((3, 5, 4), (1, 3), (4, 1), (5, 1)), Some(false));
        // An operand with no unit stride, or an empty product: left to gemm.
        assert_eq!(result_rows((3, 5, 4), (5, 1), (8, 2), (5, 1)), None);
        assert_eq!(result_rows((0, 5, 4), (5, 1), (4, 1), (5, 1)), None);
    }

    #[test]
    fn core_names_map_to_instruction_sets() {
        assert_eq!(core_isa("Haswell"), Some(Isa::Avx2));
        assert_eq!(core_isa("Zen"), Some(Isa::Avx2));
        assert_eq!(core_isa("SkylakeX"), Some(Isa::Avx512));
        assert_eq!(core_isa("Sandybridge"), None);
    }
}
