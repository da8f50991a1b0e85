//! The forward and backward kernels over tensors read in place, with the GIL released.

use std::sync::Arc;

use maskattn::half::{bf16, f16};
use maskattn::{BlockMask, Cancel, Dropout, Element, GradsMut, Params, Tile};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::masks::NativeBlockMask;
use crate::mods::{ModGrads, Mods};
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
    mods: Mods,
    outs: ForwardOuts,
) -> PyResult<()> {
    let block = block.inner.clone();
    let Qkv(q, k, v) = qkv;
    let mut ins = vec![q, k, v];
    ins.extend(mods.inputs());
    check_disjoint(&ins, &[outs.0, outs.1]).map_err(PyValueError::new_err)?;
    let call = Call::new(qkv, scale, mods);
    let work = call.work();
    call.run(py, work, |c, t| c.forward(t, &block, outs))
}

/// `dq` like q, `dk`, `dv` like k and v (contiguous f32) from the forward's `out` (f32, any
/// strides), `lse` (contiguous f32) and `dout` (f32, any strides); with `dlse` (contiguous
/// f32, like lse) the LSE's gradient enters too; `mod_grads` are the wanted parameter
/// gradients of `mods`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn backward(
    py: Python<'_>,
    qkv: Qkv,
    ins: BackwardIns,
    block: &NativeBlockMask,
    scale: Option<f32>,
    mods: Mods,
    grads: GradOuts,
    mod_grads: ModGrads,
    dlse: Option<RawOut>,
) -> PyResult<()> {
    let block = block.inner.clone();
    let Qkv(q, k, v) = qkv;
    let BackwardIns(out, lse, dout) = ins;
    if out.dtype() != F32 || dout.dtype() != F32 {
        return Err(PyValueError::new_err("out and dout must be float32"));
    }
    let GradOuts(dq, dk, dv) = grads;
    let mut reads = vec![q, k, v, out, dout];
    reads.extend(mods.inputs());
    // dlse is only read: it may share storage with the other inputs (autograd can hand
    // out dout and dlse as slices of one buffer), never with a gradient buffer.
    reads.extend(dlse.map(RawOut::as_tensor));
    let mut writes = vec![dq, dk, dv, lse];
    writes.extend(mod_grads.outputs());
    check_disjoint(&reads, &writes).map_err(PyValueError::new_err)?;
    let call = Call::new(qkv, scale, mods);
    let back = BackwardCall {
        ins,
        grads,
        mod_grads,
        dlse,
    };
    let work = 2 * call.work();
    call.run(py, work, |c, t| c.backward(t, &block, back))
}

/// `(out, lse) ← (out, lse) ⊕ (part_out, part_lse)` in place (the kernel crate's
/// `merge_partials`): the attention over the union of two disjoint key sets. Each buffer
/// `(data_ptr, numel)` is contiguous f32, `out`/`part_out` rows of `d` values and
/// `lse`/`part_lse` one value per row.
#[pyfunction]
pub fn merge_partials(
    py: Python<'_>,
    out: RawOut,
    lse: RawOut,
    part_out: RawOut,
    part_lse: RawOut,
    d: usize,
) -> PyResult<()> {
    check_disjoint(&[part_out.as_tensor(), part_lse.as_tensor()], &[out, lse])
        .map_err(PyValueError::new_err)?;
    // SAFETY: the Python caller passes live, contiguous f32 tensors of the given sizes,
    // held until this call returns; the written ones are disjoint from the read ones.
    let run = move || unsafe {
        let (o, l) = (out.slice_mut("out")?, lse.slice_mut("lse")?);
        let (po, pl) = (part_out.slice("part_out")?, part_lse.slice("part_lse")?);
        maskattn::merge_partials(o, l, po, pl, d).map_err(|e| e.to_string())
    };
    py.detach(move || threads::run(run))
        .and_then(|r| r)
        .map_err(PyValueError::new_err)
}

/// The pairs dropout with `(p, seed)` keeps, as a dense bool buffer `[B, H_q, L_q, L_k]`
/// (contiguous, written in place): the kernels' own pattern, for tests and for
/// attention weights returned with dropout.
#[pyfunction]
pub fn dropout_keep(p: f32, seed: u64, shape: [usize; 4], out: (usize, usize)) -> PyResult<()> {
    let d = Dropout::new(p, seed).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let [b, h, lq, lk] = shape;
    let (ptr, len) = out;
    if len != b * h * lq * lk {
        return Err(PyValueError::new_err(
            "dropout_keep: the buffer does not match the shape",
        ));
    }
    if len == 0 {
        return Ok(());
    }
    if ptr == 0 {
        return Err(PyValueError::new_err("dropout_keep: null data pointer"));
    }
    // SAFETY: the Python caller passes a fresh contiguous bool tensor of `len` elements,
    // which it holds until this call returns; `bool` has size and alignment 1.
    let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut bool, len) };
    for (row, cells) in dst.chunks_mut(lk).enumerate() {
        let (bi, h_i, i) = (row / (h * lq), row / lq % h, row % lq);
        for (j, cell) in cells.iter_mut().enumerate() {
            *cell = d.keep(bi, h_i, i, j, h, lq);
        }
    }
    Ok(())
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
    mods: Mods,
    /// Set when Python interrupts the call (Ctrl-C): the kernels stop between tiles.
    cancel: Arc<Cancel>,
}

/// What the backward adds to a [`Call`].
#[derive(Clone, Copy)]
struct BackwardCall {
    ins: BackwardIns,
    grads: GradOuts,
    mod_grads: ModGrads,
    dlse: Option<RawOut>,
}

impl Call {
    fn new(Qkv(q, k, v): Qkv, scale: Option<f32>, mods: Mods) -> Self {
        Call {
            q,
            k,
            v,
            scale,
            mods,
            cancel: Arc::new(Cancel::new()),
        }
    }

    /// Runs `kernel` (about `work` multiply-adds) with the GIL released — the kernels touch
    /// no Python object, so other Python threads run meanwhile — and interruptible: a
    /// signal handler that raises while it runs (Ctrl-C's `KeyboardInterrupt`) stops the
    /// kernels between tiles and its exception is the call's result.
    fn run<F>(self, py: Python<'_>, work: usize, kernel: F) -> PyResult<()>
    where
        F: FnOnce(&Call, Dtype) -> Result<(), String> + Send,
    {
        let cancel = self.cancel.clone();
        let done = py.detach(move || {
            threads::run_interruptible(
                work,
                &cancel,
                || self.dispatch(kernel),
                || Python::attach(|py| py.check_signals().err()),
            )
        });
        match done {
            Ok(Ok(r)) => r.map_err(PyValueError::new_err),
            Ok(Err(interrupt)) => Err(interrupt),
            Err(e) => Err(PyValueError::new_err(e)),
        }
    }

    /// Multiply-adds of the forward, `B·H_q·L_q·L_k·d` (saturating): what decides whether
    /// the call is worth the pool's hand-off.
    fn work(&self) -> usize {
        let [b, h, lq, d] = self.q.1;
        [b, h, lq, self.k.1[2], d]
            .iter()
            .fold(1usize, |a, &x| a.saturating_mul(x))
    }

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

    /// # Safety
    /// As [`Mods::params`].
    unsafe fn params(&self) -> Result<Params<'_>, String> {
        self.mods.params(Params {
            scale: self.scale,
            cancel: Some(&self.cancel),
            ..Default::default()
        })
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
            maskattn::forward_into(&q, &k, &v, block, &self.params()?, out, lse)
                .map_err(|e| e.to_string())
        }
    }

    fn backward(&self, t: Dtype, block: &BlockMask, back: BackwardCall) -> Result<(), String> {
        match t {
            Dtype::F32 => self.backward_t::<f32>(block, back),
            Dtype::Bf16 => self.backward_t::<bf16>(block, back),
            Dtype::F16 => self.backward_t::<f16>(block, back),
        }
    }

    fn backward_t<T: Element>(&self, block: &BlockMask, back: BackwardCall) -> Result<(), String> {
        let BackwardCall {
            ins,
            grads: g,
            mod_grads,
            dlse,
        } = back;
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
            let dlse = dlse.map(|d| d.slice("dlse")).transpose()?;
            let mut grads = GradsMut::new(
                g.0.slice_mut("dq")?,
                g.1.slice_mut("dk")?,
                g.2.slice_mut("dv")?,
            );
            grads.params = mod_grads.slices()?;
            let up = match dlse {
                Some(dl) => maskattn::Upstream::new(&dout).with_dlse(dl),
                None => maskattn::Upstream::new(&dout),
            };
            maskattn::backward_upstream_into(
                &maskattn::Qkv::new(&q, &k, &v),
                &out,
                lse,
                up,
                block,
                &self.params()?,
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
