//! The forward and backward kernels over tensors read in place, with the GIL released.

use maskattn::half::{bf16, f16};
use maskattn::{BlockMask, Element, GradsMut, Params};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::masks::NativeBlockMask;
use crate::raw::{check_disjoint, RawOut, RawTensor, BF16, F16, F32};
use crate::threads;

/// `out [B, H_q, L_q, d]` and `lse [B, H_q, L_q]` (contiguous f32) from `q`, `k`, `v`
/// (f32, bf16 or f16, one dtype, any non-negative strides).
#[pyfunction]
#[pyo3(signature = (q, k, v, block, scale, out, lse))]
pub fn forward(
    py: Python<'_>,
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    block: &NativeBlockMask,
    scale: Option<f32>,
    out: RawOut,
    lse: RawOut,
) -> PyResult<()> {
    let block = block.inner.clone();
    let call = Call { q, k, v, scale };
    check_disjoint(&[q, k, v], &[out, lse]).map_err(PyValueError::new_err)?;
    // The kernels touch no Python object: other Python threads run meanwhile.
    py.detach(move || threads::run(|| call.dispatch(|c, t| c.forward(t, &block, out, lse))))
        .map_err(PyValueError::new_err)
}

/// `dq` like q, `dk`, `dv` like k and v (contiguous f32) from the forward's `out` (f32, any
/// strides), `lse` (contiguous f32) and `dout` (f32, any strides).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, dout, block, scale, dq, dk, dv))]
pub fn backward(
    py: Python<'_>,
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    out: RawTensor,
    lse: RawOut,
    dout: RawTensor,
    block: &NativeBlockMask,
    scale: Option<f32>,
    dq: RawOut,
    dk: RawOut,
    dv: RawOut,
) -> PyResult<()> {
    let block = block.inner.clone();
    let call = Call { q, k, v, scale };
    let grads = GradOuts { dq, dk, dv };
    let ins = BackwardIns { out, lse, dout };
    if out.dtype() != F32 || dout.dtype() != F32 {
        return Err(PyValueError::new_err("out and dout must be float32"));
    }
    check_disjoint(&[q, k, v, out, dout], &[dq, dk, dv, lse]).map_err(PyValueError::new_err)?;
    py.detach(move || {
        threads::run(|| call.dispatch(|c, t| c.backward(t, &block, ins, grads)))
    })
    .map_err(PyValueError::new_err)
}

struct Call {
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    scale: Option<f32>,
}

#[derive(Clone, Copy)]
struct BackwardIns {
    out: RawTensor,
    lse: RawOut,
    dout: RawTensor,
}

#[derive(Clone, Copy)]
struct GradOuts {
    dq: RawOut,
    dk: RawOut,
    dv: RawOut,
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

    fn forward(&self, t: Dtype, block: &BlockMask, out: RawOut, lse: RawOut) -> Result<(), String> {
        match t {
            Dtype::F32 => self.forward_t::<f32>(block, out, lse),
            Dtype::Bf16 => self.forward_t::<bf16>(block, out, lse),
            Dtype::F16 => self.forward_t::<f16>(block, out, lse),
        }
    }

    fn forward_t<T: Element>(&self, block: &BlockMask, out: RawOut, lse: RawOut) -> Result<(), String> {
        // SAFETY: the Python caller passes live tensors of the dtype it names and fresh,
        // disjoint (checked above) output buffers, all held until this call returns.
        unsafe {
            let (q, k, v) = (
                self.q.view::<T>("q")?,
                self.k.view::<T>("k")?,
                self.v.view::<T>("v")?,
            );
            let (out, lse) = (out.slice_mut("out")?, lse.slice_mut("lse")?);
            maskattn::forward_into(&q, &k, &v, block, &self.params(), out, lse)
                .map_err(|e| e.to_string())
        }
    }

    fn backward(&self, t: Dtype, block: &BlockMask, ins: BackwardIns, g: GradOuts) -> Result<(), String> {
        match t {
            Dtype::F32 => self.backward_t::<f32>(block, ins, g),
            Dtype::Bf16 => self.backward_t::<bf16>(block, ins, g),
            Dtype::F16 => self.backward_t::<f16>(block, ins, g),
        }
    }

    fn backward_t<T: Element>(&self, block: &BlockMask, ins: BackwardIns, g: GradOuts) -> Result<(), String> {
        // SAFETY: as in `forward_t`; `out`, `lse` and `dout` are only read.
        unsafe {
            let (q, k, v) = (
                self.q.view::<T>("q")?,
                self.k.view::<T>("k")?,
                self.v.view::<T>("v")?,
            );
            let out = ins.out.view::<f32>("out")?;
            let dout = ins.dout.view::<f32>("dout")?;
            let lse = ins.lse.slice("lse")?;
            let grads = GradsMut {
                dq: g.dq.slice_mut("dq")?,
                dk: g.dk.slice_mut("dk")?,
                dv: g.dv.slice_mut("dv")?,
            };
            maskattn::backward_into(&q, &k, &v, &out, lse, &dout, block, &self.params(), grads)
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
