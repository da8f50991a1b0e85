//! The matrix-product micro-kernel every tile product goes through (two in the forward,
//! five in the backward): `C[m × n] (+)= A[m × k] · B[k × n]`.
//!
//! Register tiling: an `MR × NV` block of C (MR rows, NV vectors of W lanes) stays in
//! registers while `k` runs; each step loads NV vectors of one B row and broadcasts MR
//! elements of A. A is read through strides, so `Pᵀ` and `dSᵀ` need no transposed copy.
//! `n` must be a multiple of 16: callers pad their buffers (zeros) to make it so.

use crate::simd::Simd;

/// Rows of C per register tile.
pub(crate) const MR: usize = 4;
/// The register-tile walk both micro-kernel families share: C in blocks of up to `MR` rows
/// by up to `nv_max` vectors, each handed to the caller's macro `$go!(R, NV)` with the
/// block's size as literals (so that a micro-kernel is compiled per size and its loops
/// unroll), and the block's first row and first vector as `$go!(R, NV, i, j)`.
macro_rules! register_tiles {
    ($m:expr, $nvec:expr, $nv_max:expr, |$i:ident, $j:ident| $go:ident) => {{
        let (m, nvec, nv_max): (usize, usize, usize) = ($m, $nvec, $nv_max);
        let mut $j = 0;
        while $j < nvec {
            let nv = nv_max.min(nvec - $j);
            let mut $i = 0;
            while $i < m {
                let mr = $crate::gemm::MR.min(m - $i);
                match (mr, nv) {
                    (4, 4) => $go!(4, 4, $i, $j),
                    (4, 3) => $go!(4, 3, $i, $j),
                    (4, 2) => $go!(4, 2, $i, $j),
                    (4, 1) => $go!(4, 1, $i, $j),
                    (3, 4) => $go!(3, 4, $i, $j),
                    (3, 3) => $go!(3, 3, $i, $j),
                    (3, 2) => $go!(3, 2, $i, $j),
                    (3, 1) => $go!(3, 1, $i, $j),
                    (2, 4) => $go!(2, 4, $i, $j),
                    (2, 3) => $go!(2, 3, $i, $j),
                    (2, 2) => $go!(2, 2, $i, $j),
                    (2, 1) => $go!(2, 1, $i, $j),
                    (1, 4) => $go!(1, 4, $i, $j),
                    (1, 3) => $go!(1, 3, $i, $j),
                    (1, 2) => $go!(1, 2, $i, $j),
                    _ => $go!(1, 1, $i, $j),
                }
                $i += mr;
            }
            $j += nv;
        }
    }};
}
#[cfg(target_arch = "x86_64")] // for simd::bf16dot
pub(crate) use register_tiles;

/// A strided matrix operand: element (i, p) at `ptr[i·rs + p·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// `C = A·B` (`accumulate == false`) or `C += A·B`. `b` rows are `ldb` apart, `c` rows `ldc`.
///
/// # Safety
/// Every index touched must be inside the buffers: A `m × k`, B `k × n` (row stride `ldb`),
/// C `m × n` (row stride `ldc`); `n % S::W == 0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<S: Simd>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(n.is_multiple_of(S::W));
    macro_rules! go {
        ($mr:literal, $nv:literal, $i:ident, $j:ident) => {{
            // SAFETY: `register_tiles!` hands out blocks with `i < m`, `j·W < n`, so these
            // offsets stay inside A, B and C as sized in this function's contract.
            let a_blk = Strided {
                ptr: unsafe { a.ptr.add($i * a.rs) },
                ..a
            };
            let (b_blk, c_blk) = unsafe { (b.add($j * S::W), c.add($i * ldc + $j * S::W)) };
            unsafe { micro::<S, $mr, $nv>(k, a_blk, b_blk, ldb, c_blk, ldc, accumulate) }
        }};
    }
    register_tiles!(m, n / S::W, S::NV_MAX, |i, j| go);
}

#[inline(always)]
unsafe fn micro<S: Simd, const R: usize, const NV: usize>(
    k: usize,
    a: Strided,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: the block is inside the operands (`gemm` hands out only such blocks): A rows
    // `< R`, B and C vectors `< NV`, `p < k`.
    unsafe {
        let mut acc = [[S::splat(0.0); NV]; R];
        for p in 0..k {
            let bp = b.add(p * ldb);
            let mut bv = [S::splat(0.0); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = S::load(bp.add(v * S::W));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = S::splat(*a.ptr.add(r * a.rs + p * a.cs));
                for v in 0..NV {
                    row[v] = S::fma(av, bv[v], row[v]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let cp = c.add(r * ldc + v * S::W);
                S::store(
                    cp,
                    if accumulate {
                        S::add(S::load(cp), x)
                    } else {
                        x
                    },
                );
            }
        }
    }
}

/// `C += A·B` over the pairs `(i, p)` that `vis(i, p)` allows only: the product of a tile
/// where a row or key that some pairs must not see holds NaN or ±∞ (`0 · NaN` would
/// spread it). Each entry is summed as [`gemm`]'s micro-kernel sums it — from zero, `p`
/// ascending, fused, then added to `C` — so where the skipped products are finite (and so
/// `±0`), the result is [`gemm`]'s to the bit.
///
/// # Safety
/// As for [`gemm`]; `b` is `(pointer, row stride)`, `c` likewise.
#[inline(always)]
pub(crate) unsafe fn gemm_visible<S: Simd>(
    (m, n, k): (usize, usize, usize),
    a: Strided,
    (b, ldb): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
    vis: impl Fn(usize, usize) -> bool,
) {
    debug_assert!(n.is_multiple_of(S::W));
    // SAFETY: `i < m`, `j + W ≤ n`, `p < k`: inside the operands as the contract sizes them.
    unsafe {
        for i in 0..m {
            for j in (0..n).step_by(S::W) {
                let mut acc = S::splat(0.0);
                for p in (0..k).filter(|&p| vis(i, p)) {
                    let av = S::splat(*a.ptr.add(i * a.rs + p * a.cs));
                    acc = S::fma(av, S::load(b.add(p * ldb + j)), acc);
                }
                let cp = c.add(i * ldc + j);
                S::store(cp, S::add(S::load(cp), acc));
            }
        }
    }
}
