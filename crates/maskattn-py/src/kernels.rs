//! The forward and backward kernels over tensors read in place, with the GIL released.

use maskattn::half::{bf16, f16};
use maskattn::{BlockMask, Element, GradsMut, Params, Tile};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::masks::NativeBlockMask;
use crate::raw::{check_disjoint, RawOut, RawTensor, BF16, F16, F32};
use crate::threads;

/// `q`, `k`, `v` of one call, as Python passes them: a tuple of three raw tensors.
#[derive(FromPyObject, Clone, Copy)]
pub struct Qkv(RawTensor, RawTensor, RawTensor);

/// The forward's output buffers: `(out, lse)`.
#[derive(FromPyObject, Clone, Copy)]
pub struct ForwardOuts(RawOut, RawOut);

/// What the backward reads besides q, k, v: `(out, lse, dout)`.
#[derive(FromPyObject, Clone, Copy)]
pub struct BackwardIns(RawTensor, RawOut, RawTensor);

/// The backward's output buffers: `(dq, dk, dv)`.
#[derive(FromPyObject, Clone, Copy)]
pub struct GradOuts(RawOut, RawOut, RawOut);

/// `out [B, H_q, L_q, d]` and `lse [B, H_q, L_q]` (contiguous f32) from `q`, `k`, `v`
/// (f32, bf16 or f16, one dtype, any non-negative strides).
#[pyfunction]
pub fn forward(
    py: Python<'_>,
    qkv: Qkv,
    block: &NativeBlockMask,
    scale: Option<f32>,
    outs: ForwardOuts,
) -> PyResult<()> {
    let block = block.inner.clone();
    let Qkv(q, k, v) = qkv;
    check_disjoint(&[q, k, v], &[outs.0, outs.1]).map_err(PyValueError::new_err)?;
    let call = Call { q, k, v, scale };
    // The kernels touch no Python object: other Python threads run meanwhile.
    py.detach(move || threads::run(|| call.dispatch(|c, t| c.forward(t, &block, outs))))
        .and_then(|r| r)
        .map_err(PyValueError::new_err)
}

/// `dq` like q, `dk`, `dv` like k and v (contiguous f32) from the forward's `out` (f32, any
/// strides), `lse` (contiguous f32) and `dout` (f32, any strides).
#[pyfunction]
pub fn backward(
    py: Python<'_>,
    qkv: Qkv,
    ins: BackwardIns,
    block: &NativeBlockMask,
    scale: Option<f32>,
    grads: GradOuts,
) -> PyResult<()> {
    let block = block.inner.clone();
    let Qkv(q, k, v) = qkv;
    let BackwardIns(out, lse, dout) = ins;
    if out.dtype() != F32 || dout.dtype() != F32 {
        return Err(PyValueError::new_err("out and dout must be float32"));
    }
    let GradOuts(dq, dk, dv) = grads;
    check_disjoint(&[q, k, v, out, dout], &[dq, dk, dv, lse]).map_err(PyValueError::new_err)?;
    let call = Call { q, k, v, scale };
    py.detach(move || threads::run(|| call.dispatch(|c, t| c.backward(t, &block, ins, grads))))
        .and_then(|r| r)
        .map_err(PyValueError::new_err)
}

/// The compiled mask as a dense bool buffer `[B, H_q, L_q, L_k]` (contiguous, written in
/// place): what the differentiable torch formulation (second-order and forward-mode
/// autograd, `ops.py`) needs. O(L²) memory, by design of its callers.
#[pyfunction]
pub fn allowed(block: &NativeBlockMask, out: (usize, usize)) -> PyResult<()> {
    let b = &block.inner;
    let s = b.shape();
    let (ptr, len) = out;
    if len != s.batch * s.heads * s.lq * s.lk {
        return Err(PyValueError::new_err(
            "allowed: the buffer does not match the mask's shape",
        ));
    }
    if len == 0 {
        return Ok(());
    }
    if ptr == 0 {
        return Err(PyValueError::new_err("allowed: null data pointer"));
    }
    // SAFETY: the Python caller passes a fresh contiguous bool tensor of `len` elements,
    // which it holds until this call returns; `bool` has size and alignment 1.
    let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut bool, len) };
    let (tq, tk) = (b.tile_q(), b.tile_k());
    let words = b.words();
    for bi in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.lq {
                let row = &mut dst[((bi * s.heads + h) * s.lq + i) * s.lk..][..s.lk];
                for (j, cell) in row.iter_mut().enumerate() {
                    *cell = match b.tile(bi, h, i / tq, j / tk) {
                        Tile::Empty => false,
                        Tile::Full => true,
                        Tile::Partial(bits) => {
                            let (r, c) = (i % tq, j % tk);
                            bits[r * words + c / 64] >> (c % 64) & 1 == 1
                        }
                    };
                }
            }
        }
    }
    Ok(())
}

struct Call {
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    scale: Option<f32>,
}

impl Call {
    /// Runs `f` with the storage type the tensors hold.
    fn dispatch<F>(&self, f: F) -> Result<(), String>
    where
        F: FnOnce(&Call, Dtype) -> Result<(), String>,
    {
        let t = self.q.dtype();
        if self.k.dtype() != t || self.v.dtype() != t {
            return Err("q, k and v must have one dtype".into());
        }
        let dtype = match t {
            F32 => Dtype::F32,
            BF16 => Dtype::Bf16,
            F16 => Dtype::F16,
            _ => return Err(format!("unknown dtype code {t}")),
        };
        f(self, dtype)
    }

    fn params(&self) -> Params<'static> {
        Params {
            scale: self.scale,
            ..Default::default()
        }
    }

    fn forward(&self, t: Dtype, block: &BlockMask, outs: ForwardOuts) -> Result<(), String> {
        match t {
            Dtype::F32 => self.forward_t::<f32>(block, outs),
            Dtype::Bf16 => self.forward_t::<bf16>(block, outs),
            Dtype::F16 => self.forward_t::<f16>(block, outs),
        }
    }

    fn forward_t<T: Element>(&self, block: &BlockMask, outs: ForwardOuts) -> Result<(), String> {
        // SAFETY: the Python caller passes live tensors of the dtype it names and fresh,
        // disjoint (checked above) output buffers, all held until this call returns.
        unsafe {
            let (q, k, v) = (
                self.q.view::<T>("q")?,
                self.k.view::<T>("k")?,
                self.v.view::<T>("v")?,
            );
            let (out, lse) = (outs.0.slice_mut("out")?, outs.1.slice_mut("lse")?);
            maskattn::forward_into(&q, &k, &v, block, &self.params(), out, lse)
                .map_err(|e| e.to_string())
        }
    }

    fn backward(
        &self,
        t: Dtype,
        block: &BlockMask,
        ins: BackwardIns,
        g: GradOuts,
    ) -> Result<(), String> {
        match t {
            Dtype::F32 => self.backward_t::<f32>(block, ins, g),
            Dtype::Bf16 => self.backward_t::<bf16>(block, ins, g),
            Dtype::F16 => self.backward_t::<f16>(block, ins, g),
        }
    }

    fn backward_t<T: Element>(
        &self,
        block: &BlockMask,
        ins: BackwardIns,
        g: GradOuts,
    ) -> Result<(), String> {
        // SAFETY: as in `forward_t`; `out`, `lse` and `dout` are only read.
        unsafe {
            let (q, k, v) = (
                self.q.view::<T>("q")?,
                self.k.view::<T>("k")?,
                self.v.view::<T>("v")?,
            );
            let BackwardIns(out, lse, dout) = ins;
            let out = out.view::<f32>("out")?;
            let dout = dout.view::<f32>("dout")?;
            let lse = lse.slice("lse")?;
            let grads = GradsMut::new(
                g.0.slice_mut("dq")?,
                g.1.slice_mut("dk")?,
                g.2.slice_mut("dv")?,
            );
            maskattn::backward_into(
                &maskattn::Qkv::new(&q, &k, &v),
                &out,
                lse,
                &dout,
                block,
                &self.params(),
                grads,
            )
            .map_err(|e| e.to_string())
        }
    }
}

#[derive(Clone, Copy)]
enum Dtype {
    F32,
    Bf16,
    F16,
}
