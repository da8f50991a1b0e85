//! The matrix-product micro-kernel every tile product goes through (two in the forward,
//! five in the backward): `C[m × n] (+)= A[m × k] · B[k × n]`.
//!
//! Register tiling: an `MR × NV` block of C (MR rows, NV vectors of W lanes) stays in
//! registers while `k` runs; each step loads NV vectors of one B row and broadcasts MR
//! elements of A. A is read through strides, so `Pᵀ` and `dSᵀ` need no transposed copy.
//! `n` must be a multiple of 16: callers pad their buffers (zeros) to make it so.

use crate::simd::Simd;

const MR: usize = 4;

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
    let nvec = n / S::W;
    let mut j = 0;
    while j < nvec {
        let nv = S::NV_MAX.min(nvec - j);
        let mut i = 0;
        while i < m {
            let mr = MR.min(m - i);
            let a_blk = Strided {
                ptr: unsafe { a.ptr.add(i * a.rs) },
                ..a
            };
            let b_blk = unsafe { b.add(j * S::W) };
            let c_blk = unsafe { c.add(i * ldc + j * S::W) };
            macro_rules! go {
                ($mr:literal, $nv:literal) => {
                    unsafe { micro::<S, $mr, $nv>(k, a_blk, b_blk, ldb, c_blk, ldc, accumulate) }
                };
            }
            match (mr, nv) {
                (4, 4) => go!(4, 4),
                (4, 3) => go!(4, 3),
                (4, 2) => go!(4, 2),
                (4, 1) => go!(4, 1),
                (3, 4) => go!(3, 4),
                (3, 3) => go!(3, 3),
                (3, 2) => go!(3, 2),
                (3, 1) => go!(3, 1),
                (2, 4) => go!(2, 4),
                (2, 3) => go!(2, 3),
                (2, 2) => go!(2, 2),
                (2, 1) => go!(2, 1),
                (1, 4) => go!(1, 4),
                (1, 3) => go!(1, 3),
                (1, 2) => go!(1, 2),
                _ => go!(1, 1),
            }
            i += mr;
        }
        j += nv;
    }
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
