//! A linear layer `y = x·Wᵀ + b` as one candle op with a backward that returns the
//! gradients of the input, the weight and the bias from two matrix products and one column
//! sum.
//!
//! Written with candle's ops (`candle_nn::Linear`) it is a product, two reshapes and a
//! broadcast add; their backward is four more ops, and the bias's gradient is candle's
//! reduction over the leading dimensions, which walks the `[rows, out]` gradient element
//! by element (a quarter of a training step's time). candle's backward also zero-fills and
//! adds a buffer for every op's output: fewer ops, fewer of those.
//!
//! Shapes: `x [..., in]`, `W [out, in]`, `b [out]` → `y [..., out]`. The products are
//! `gemm`'s (the same call, strides and thread count as candle's own matmul, so the forward
//! gives candle's bits), on the kernels' instruction set (`crate::products`: an AVX2 run
//! forced with `MASKATTN_ISA=avx2` takes gemm's AVX2 kernels); the bias gradient is summed
//! in fixed blocks of rows, so it does not depend on the number of threads.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Module, Result, Shape, Storage, Tensor,
    D,
};
use rayon::prelude::*;

use super::par::PAR_MIN;

use super::gelu::contiguous_f32;

/// Rows per partial sum of the bias gradient (fixed: the same bits for any thread count).
const GRAD_BLOCK_ROWS: usize = 64;
/// Rows per parallel piece of the bias add.
const BIAS_ROWS: usize = 256;

/// `x·Wᵀ + b` over the last dimension of `x`; differentiable in all three. f32 CPU tensors
/// take the fused op; others `candle_nn::Linear`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let all_f32 = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if !all_f32 || !x.device().is_cpu() {
        return linear_ops(x, weight, bias);
    }
    let (out, inp) = weight.dims2()?;
    let k = x.dim(D::Minus1)?;
    if k != inp || bias.is_some_and(|b| b.dims() != [out]) {
        return Err(Error::Msg(format!(
            "linear: x {:?}, weight {:?}, bias {:?}: want x [..., {inp}] and bias [{out}]",
            x.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        )));
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp),
        None => x.apply_op2(&w, LinearOp),
    }
}

/// The same with candle's `Linear` (any dtype; what the model used before the fused op).
pub fn linear_ops(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)
}

struct LinearOp;

/// A row-major view of a matrix inside a slice: element `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        let last = (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
        if rows > 0 && cols > 0 && last >= data.len() {
            return Err(Error::Msg(format!(
                "linear: a {rows}×{cols} matrix (strides {rs}, {cs}) does not fit {} values",
                data.len()
            )));
        }
        Ok(Mat {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// The transpose, as a view of the same data.
    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// Products of fewer multiply-adds than this run on the calling thread.
const SERIAL_PRODUCT: usize = 1 << 20;

/// `lhs [m, k] · rhs [k, n]` as a new row-major `[m, n]` buffer, on rayon's threads.
///
/// The buffer is not zero-filled first: gemm writes every element of `dst` and, with
/// `read_dst` false, never reads one (BLAS's `beta = 0`: gemm's `alpha` is zero and its
/// kernels store without loading). A zero fill would be one more pass over the widest
/// activations of the model, and for a buffer fresh from the OS the page faults with it.
fn matmul(lhs: Mat, rhs: Mat) -> Result<Vec<f32>> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        return Err(Error::Msg(format!(
            "linear: product of {m}×{k} and {}×{n}",
            rhs.rows
        )));
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0f32; m * n]);
    }
    // A small product (a decoding step's one row) costs less than waking rayon's threads:
    // the split is over blocks of `dst`, so the result is the same bits either way.
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= SERIAL_PRODUCT {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `Mat::new` checked that every element `(i, j)` of both operands, at
    // `i·rs + j·cs`, lies inside its slice; `dst` has room for exactly `m·n` values, written
    // at `i·n + j`; `read_dst` is false, so none of them is read before it is written; `dst`
    // is a fresh allocation, so it overlaps neither operand.
    unsafe {
        crate::products::gemm_f32(
            (m, n, k),
            (dst.as_mut_ptr(), 1, n as isize, false),
            (lhs.data.as_ptr(), lhs.cs as isize, lhs.rs as isize),
            (rhs.data.as_ptr(), rhs.cs as isize, rhs.rs as isize),
            0.0,
            1.0,
            par,
        );
        // SAFETY: gemm wrote all `m·n` elements (m, n, k > 0 here).
        dst.set_len(m * n);
    }
    Ok(dst)
}

/// `y [rows, out] = x [rows, in] · Wᵀ (+ b)`.
pub(super) fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, out: usize) -> Result<Vec<f32>> {
    let inp = w.len() / out.max(1);
    let rows = x.len().checked_div(inp).unwrap_or(0);
    let xm = Mat::new(x, rows, inp, inp, 1)?;
    let wm = Mat::new(w, out, inp, inp, 1)?;
    let mut y = matmul(xm, wm.t())?;
    if let Some(b) = b.filter(|_| out > 0) {
        // Added after the product, as `broadcast_add` does: the same rounding.
        let add = |y: &mut [f32]| {
            for row in y.chunks_exact_mut(out) {
                for (y, &b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            }
        };
        if y.len() < PAR_MIN {
            add(&mut y);
        } else {
            y.par_chunks_mut(BIAS_ROWS * out.max(1)).for_each(add);
        }
    }
    Ok(y)
}

/// `Σ_rows dy` of `dy [rows, out]`, in fixed blocks of rows summed in order.
fn column_sums(dy: &[f32], out: usize) -> Vec<f32> {
    if out == 0 {
        return Vec::new();
    }
    let partial: Vec<Vec<f32>> = dy
        .par_chunks(GRAD_BLOCK_ROWS * out)
        .map(|block| {
            let mut s = vec![0f32; out];
            for row in block.chunks_exact(out) {
                for (s, &g) in s.iter_mut().zip(row) {
                    *s += g;
                }
            }
            s
        })
        .collect();
    let mut sum = vec![0f32; out];
    for p in &partial {
        for (s, &v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

type Grads = (Tensor, Tensor, Option<Tensor>);

/// `(dx, dW, db)` for `x`, `W` and the output's gradient.
fn backward(x: &Tensor, w: &Tensor, grad: &Tensor, bias: bool) -> Result<Grads> {
    let dy = grad.contiguous()?;
    let (gs, gl) = dy.storage_and_layout();
    let Storage::Cpu(gc) = &*gs else {
        return Err(Error::Msg("linear: CPU only".into()));
    };
    backward_from(x, w, contiguous_f32("linear", gc, gl)?, bias)
}

/// [`backward`] with the output's gradient `dy [rows, out]` as a slice.
pub(super) fn backward_from(x: &Tensor, w: &Tensor, gv: &[f32], bias: bool) -> Result<Grads> {
    let (out, inp) = w.dims2()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xc), Storage::Cpu(wc)) = (&*xs, &*ws) else {
        return Err(Error::Msg("linear: CPU only".into()));
    };
    let xv = contiguous_f32("linear", xc, xl)?;
    let wv = contiguous_f32("linear", wc, wl)?;
    let rows = xv.len().checked_div(inp).unwrap_or(0);
    let (xm, wm) = (
        Mat::new(xv, rows, inp, inp, 1)?,
        Mat::new(wv, out, inp, inp, 1)?,
    );
    let gm = Mat::new(gv, rows, out, out, 1)?;
    // dx [rows, in] = dy · W;  dW [out, in] = dyᵀ · x.
    let dx = matmul(gm, wm)?;
    let dw = matmul(gm.t(), xm)?;
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        Tensor::from_vec(dw, (out, inp), dev)?,
        if bias {
            Some(Tensor::from_vec(column_sums(gv, out), out, dev)?)
        } else {
            None
        },
    ))
}

pub(super) fn shape_out(l: &Layout, out: usize) -> Shape {
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Shape::from(dims)
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "maskattn-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("linear", s1, l1)?;
        let w = contiguous_f32("linear", s2, l2)?;
        let out = l2.dims()[0];
        Ok((
            CpuStorage::F32(forward(x, w, None, out)?),
            shape_out(l1, out),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, grad_res, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "maskattn-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32("linear", s1, l1)?;
        let w = contiguous_f32("linear", s2, l2)?;
        let b = contiguous_f32("linear", s3, l3)?;
        let out = l2.dims()[0];
        Ok((
            CpuStorage::F32(forward(x, w, Some(b), out)?),
            shape_out(l1, out),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, grad_res, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}
