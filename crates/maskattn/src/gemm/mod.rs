//! The matrix products of the kernels (two in the forward, five in the backward):
//! `C[m × n] (+)= A[m × k] · B[k × n]`, on f32 here (any [`Simd`] set) and on bf16 pairs in
//! [`bf16`] (AVX512-BF16).
//!
//! Operands are [`MatRef`] / [`MatMut`] views, checked against their buffers when made, so
//! a product reads as its formula: `gemm::<S>(dv, p.t(), dout, Update::Add)` is `dV += Pᵀ·dO`.
//!
//! Register tiling: an `MR × NV` block of C (`Simd::MR` rows, NV vectors of W lanes) stays in
//! registers while `k` runs; each step loads NV vectors of one B row and broadcasts MR
//! elements of A. A is read through strides, so `Pᵀ` and `dSᵀ` need no transposed copy.
//! B and C rows are contiguous and `n` is a multiple of 16: callers pad their buffers
//! (zeros) to make it so.

pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16;
#[cfg(target_arch = "x86_64")]
pub(crate) mod pair_layouts;

use crate::simd::Simd;

/// A read-only matrix: element `(i, p)` at `data[i·rs + p·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// `rows × cols`, rows `rs` apart, contiguous within a row. Panics if `data` is too short.
    #[inline(always)]
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        let m = MatRef {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        };
        assert!(
            m.needed() <= data.len(),
            "matrix operand outside its buffer"
        );
        m
    }

    /// The transpose, in place (no copy): `Pᵀ`, `dSᵀ`.
    #[inline(always)]
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// The first `n` columns (the real features of a padded row).
    #[inline(always)]
    pub fn first_cols(self, n: usize) -> Self {
        assert!(n <= self.cols);
        MatRef { cols: n, ..self }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn row_stride(&self) -> usize {
        self.rs
    }

    pub fn as_ptr(&self) -> *const f32 {
        self.data.as_ptr()
    }

    #[inline(always)]
    fn needed(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// A matrix that a product writes: `rows × cols`, rows `rs` apart, contiguous within a row.
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// Panics if `data` is too short.
    #[inline(always)]
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        let needed = if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + cols
        };
        assert!(needed <= data.len(), "matrix result outside its buffer");
        MatMut {
            data,
            rows,
            cols,
            rs,
        }
    }
}

/// Whether a product overwrites its result or adds to it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Update {
    Set,
    Add,
}

/// Rows of C per register tile of the bf16 products (`gemm::bf16`); the f32 products take
/// their instruction set's [`Simd::MR`].
pub(crate) const MR: usize = 4;
/// The register-tile walk both micro-kernel families share: C in blocks of up to `mr_max`
/// rows by up to `nv_max` vectors, each handed to the caller's macro `$go!(R, NV)` with the
/// block's size as literals (so that a micro-kernel is compiled per size and its loops
/// unroll), and the block's first row and first vector as `$go!(R, NV, i, j)`. Blocks of 5
/// and 6 rows exist for AVX2's 6 × 2 tile only (see `simd/avx2.rs`): `mr_max ≤ 4` or
/// `nv_max ≤ 2`, so every block has an arm (and with a constant `mr_max ≤ 4` the compiler
/// drops the 5- and 6-row arms).
macro_rules! register_tiles {
    ($m:expr, $nvec:expr, $mr_max:expr, $nv_max:expr, |$i:ident, $j:ident| $go:ident) => {{
        let (m, nvec, mr_max, nv_max): (usize, usize, usize, usize) = ($m, $nvec, $mr_max, $nv_max);
        debug_assert!(mr_max <= 4 && nv_max <= 4 || mr_max <= 6 && nv_max <= 2);
        let mut $j = 0;
        while $j < nvec {
            let nv = nv_max.min(nvec - $j);
            let mut $i = 0;
            while $i < m {
                let mr = mr_max.min(m - $i);
                match (mr, nv) {
                    (6, 2) => $go!(6, 2, $i, $j),
                    (6, 1) => $go!(6, 1, $i, $j),
                    (5, 2) => $go!(5, 2, $i, $j),
                    (5, 1) => $go!(5, 1, $i, $j),
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
                    (1, 1) => $go!(1, 1, $i, $j),
                    _ => unreachable!("register tile {mr} × {nv} vectors"),
                }
                $i += mr;
            }
            $j += nv;
        }
    }};
}
#[cfg(target_arch = "x86_64")] // for the bf16 products
pub(crate) use register_tiles;

/// `C = A·B` or `C += A·B`.
///
/// # Safety
/// The CPU has `S`'s features. (The operands' bounds were checked when they were made.)
#[inline(always)]
pub(crate) unsafe fn gemm<S: Simd>(c: MatMut, a: MatRef, b: MatRef, update: Update) {
    let (m, n, k) = check::<S>(&c, &a, &b);
    let accumulate = update == Update::Add;
    let (ap, bp, cp) = (a.data.as_ptr(), b.data.as_ptr(), c.data.as_mut_ptr());
    let (ldb, ldc) = (b.rs, c.rs);
    // AVX2's tile (`Simd::MR` > `MR`, see `simd/avx2.rs`) reads B's block column through a
    // contiguous copy. The kernels' tiles have rows a power of two apart (64 or 128 f32:
    // 256 or 512 bytes), so a k walk down B and down a strided A lands in 16 (or 8) of the
    // 64 sets of a 32 KiB 8-way L1: at d = 128 the two walks need 16 lines a set and evict
    // each other for every block of rows. Copied once per block column (its `k × 16` f32,
    // read by the `m / 6` blocks of rows that follow), B walks consecutive lines instead.
    // Only the read order of B's values changes, not the sums: each entry is still summed
    // from zero, `p` ascending, so the result is the same to the bit.
    let panel_b = S::MR > MR && m > S::MR && k <= PANEL_K && S::NV_MAX * S::W <= PANEL_W;
    let mut panel = std::mem::MaybeUninit::<[f32; PANEL_K * PANEL_W]>::uninit();
    let pp = panel.as_mut_ptr() as *mut f32;
    macro_rules! go {
        ($mr:literal, $nv:literal, $i:ident, $j:ident) => {{
            // SAFETY: `register_tiles!` hands out blocks with `i < m`, `j·W < n`, inside the
            // operands `check` matched against their buffers; the panel holds `k ≤ PANEL_K`
            // rows of `NV·W ≤ PANEL_W` values, written (at the first block of rows of each
            // block column, `i == 0`) before they are read.
            let a_blk = Strided {
                ptr: unsafe { ap.add($i * a.rs) },
                rs: a.rs,
                cs: a.cs,
            };
            let c_blk = unsafe { cp.add($i * ldc + $j * S::W) };
            let (b_blk, ldb) = if panel_b {
                if $i == 0 {
                    for p in 0..k {
                        for v in 0..$nv {
                            let x = unsafe { S::load(bp.add(p * ldb + ($j + v) * S::W)) };
                            unsafe { S::store(pp.add(p * PANEL_W + v * S::W), x) };
                        }
                    }
                }
                (pp as *const f32, PANEL_W)
            } else {
                (unsafe { bp.add($j * S::W) }, ldb)
            };
            // A read along its rows (`Q·Kᵀ`, `dO·Vᵀ`, `dS·K`) at the kernels' common row
            // strides gets the stride as a constant (see `micro`) in the full tile, which
            // does nearly all the work; the edge tiles keep the general kernel, so that the
            // code (inlined at every product) does not triple.
            let full = $mr == S::MR && $nv == S::NV_MAX;
            match (full, a.cs, a.rs) {
                (true, 1, 64) => unsafe {
                    micro::<S, $mr, $nv, 64>(k, a_blk, b_blk, ldb, c_blk, ldc, accumulate)
                },
                (true, 1, 128) => unsafe {
                    micro::<S, $mr, $nv, 128>(k, a_blk, b_blk, ldb, c_blk, ldc, accumulate)
                },
                _ => unsafe {
                    micro::<S, $mr, $nv, 0>(k, a_blk, b_blk, ldb, c_blk, ldc, accumulate)
                },
            }
        }};
    }
    register_tiles!(m, n / S::W, S::MR, S::NV_MAX, |i, j| go);
}

/// The longest reduction (`k`) whose B block column `gemm` copies, and the copy's row length
/// in f32 (AVX2: 2 × 8 lanes): 16 KiB on the stack.
const PANEL_K: usize = 256;
const PANEL_W: usize = 16;

/// The sizes of `C = A·B`, checked: `A` is `m × k`, `B` `k × n`, `C` `m × n`, `n` whole
/// vectors, B and C rows contiguous.
#[inline(always)]
fn check<S: Simd>(c: &MatMut, a: &MatRef, b: &MatRef) -> (usize, usize, usize) {
    check_sizes((c.rows, c.cols), (a.rows, a.cols), (b.rows, b.cols, b.cs));
    debug_assert!(b.cols.is_multiple_of(S::W));
    (a.rows, b.cols, a.cols)
}

/// `C (rows, cols)`, `A (rows, cols)`, `B (rows, cols, column stride)`.
#[inline(always)]
fn check_sizes(c: (usize, usize), a: (usize, usize), b: (usize, usize, usize)) {
    assert!(
        a.1 == b.0 && c.0 == a.0 && c.1 == b.1 && b.2 == 1,
        "product sizes do not match"
    );
}

/// An A operand as the micro-kernel reads it.
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// One `R × NV·W` block of C. `RS > 0`: A's rows are `RS` apart and contiguous (`a.rs ==
/// RS`, `a.cs == 1`), so that its `R` elements of one `p` sit at constant offsets from one
/// pointer. Why: with a run-time row stride LLVM keeps one address per row and adds to each
/// at every `p` (an `add`/`lea` chain beside the `R · NV` FMAs, on Intel sharing their
/// ports); hoisting row pointers by hand is undone by its loop strength reduction. `RS =
/// 0`: any strides, read at run time.
#[inline(always)]
unsafe fn micro<S: Simd, const R: usize, const NV: usize, const RS: usize>(
    k: usize,
    a: Strided,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(RS == 0 || (a.rs == RS && a.cs == 1));
    let (rs, cs) = if RS == 0 { (a.rs, a.cs) } else { (RS, 1) };
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
            let ap = a.ptr.add(p * cs);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = S::splat(*ap.add(r * rs));
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
/// As for [`gemm`].
#[inline(always)]
pub(crate) unsafe fn gemm_visible<S: Simd>(
    c: MatMut,
    a: MatRef,
    b: MatRef,
    vis: impl Fn(usize, usize) -> bool,
) {
    let (m, n, k) = check::<S>(&c, &a, &b);
    let (ap, bp, cp) = (a.data.as_ptr(), b.data.as_ptr(), c.data.as_mut_ptr());
    // SAFETY: `i < m`, `j + W ≤ n`, `p < k`: inside the operands `check` matched.
    unsafe {
        for i in 0..m {
            for j in (0..n).step_by(S::W) {
                let mut acc = S::splat(0.0);
                for p in (0..k).filter(|&p| vis(i, p)) {
                    let av = S::splat(*ap.add(i * a.rs + p * a.cs));
                    acc = S::fma(av, S::load(bp.add(p * b.rs + j)), acc);
                }
                let cq = cp.add(i * c.rs + j);
                S::store(cq, S::add(S::load(cq), acc));
            }
        }
    }
}

/// `C += A·B`; with `Some(vis)`, over the pairs `vis` allows only ([`gemm_visible`]): what
/// a product over a partial tile takes where the `0 · NaN` guard (`softmax::Unseen`) says a
/// non-finite value some rows must not see remains.
///
/// # Safety
/// As for [`gemm`].
#[inline(always)]
pub(crate) unsafe fn gemm_add<S: Simd>(
    c: MatMut,
    a: MatRef,
    b: MatRef,
    only: Option<impl Fn(usize, usize) -> bool>,
) {
    // SAFETY: the contract.
    unsafe {
        match only {
            Some(vis) => gemm_visible::<S>(c, a, b, vis),
            None => gemm::<S>(c, a, b, Update::Add),
        }
    }
}
