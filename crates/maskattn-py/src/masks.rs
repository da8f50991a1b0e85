//! Masks and block masks as Python objects. Every constructor maps one to one onto
//! `maskattn::Mask` (same names, same polarity: `true` = may attend).

use std::sync::Arc;

use maskattn::{BlockMask, DenseMask, Mask, MaskShape};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[pyclass(name = "NativeMask", module = "maskattn._maskattn", frozen)]
#[derive(Clone)]
pub struct NativeMask {
    pub inner: Mask,
}

#[pymethods]
impl NativeMask {
    fn and_(&self, other: &NativeMask) -> NativeMask {
        wrap(self.inner.clone() & other.inner.clone())
    }

    fn or_(&self, other: &NativeMask) -> NativeMask {
        wrap(self.inner.clone() | other.inner.clone())
    }

    fn not_(&self) -> NativeMask {
        wrap(!self.inner.clone())
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

fn wrap(inner: Mask) -> NativeMask {
    NativeMask { inner }
}

#[pyfunction]
pub fn full() -> NativeMask {
    wrap(Mask::full())
}

#[pyfunction]
pub fn causal() -> NativeMask {
    wrap(Mask::causal())
}

#[pyfunction]
pub fn causal_top_left() -> NativeMask {
    wrap(Mask::causal_top_left())
}

#[pyfunction]
pub fn window(left: usize, right: usize) -> NativeMask {
    wrap(Mask::window(left, right))
}

#[pyfunction]
pub fn chunks(size: usize) -> PyResult<NativeMask> {
    positive("chunks", size)?;
    Ok(wrap(Mask::chunks(size)))
}

#[pyfunction]
pub fn block_causal(size: usize) -> PyResult<NativeMask> {
    positive("block_causal", size)?;
    Ok(wrap(Mask::block_causal(size)))
}

#[pyfunction]
pub fn neighbourhood(height: usize, width: usize, radius: usize) -> PyResult<NativeMask> {
    positive("neighbourhood height", height)?;
    positive("neighbourhood width", width)?;
    Ok(wrap(Mask::neighbourhood(height, width, radius)))
}

#[pyfunction]
pub fn key_lengths(lengths: Vec<usize>) -> NativeMask {
    wrap(Mask::key_lengths(lengths))
}

#[pyfunction]
pub fn prefix(p: usize) -> NativeMask {
    wrap(Mask::prefix(p))
}

/// Key padding from a contiguous bool tensor `[rows, L_k]` (`true` = a real key), copied.
#[pyfunction]
pub fn key_keep(ptr: usize, len: usize, rows: usize) -> PyResult<NativeMask> {
    // SAFETY: the Python side passes a live, contiguous bool tensor of `len` bytes.
    let keep = unsafe { bools(ptr, len) }?;
    Ok(wrap(Mask::key_keep(keep, rows)))
}

/// Document ids from a contiguous int64 tensor `[rows, L]`, copied.
#[pyfunction]
pub fn documents(ptr: usize, len: usize, rows: usize) -> PyResult<NativeMask> {
    let ids: Vec<i64> = if len == 0 {
        Vec::new()
    } else {
        if ptr == 0 || !ptr.is_multiple_of(std::mem::align_of::<i64>()) {
            return Err(PyValueError::new_err("documents: bad data pointer"));
        }
        // SAFETY: the Python side passes a live, contiguous int64 tensor of `len` values.
        unsafe { std::slice::from_raw_parts(ptr as *const i64, len) }.to_vec()
    };
    Ok(wrap(Mask::documents(ids, rows)))
}

/// A dense mask from a contiguous bool tensor of `dims` (each 1 or the full size), copied.
#[pyfunction]
pub fn dense(ptr: usize, dims: [usize; 4]) -> PyResult<NativeMask> {
    let n = dims.iter().product();
    // SAFETY: the Python side passes a live, contiguous bool tensor shaped `dims`.
    let allowed = unsafe { bools(ptr, n) }?;
    let m = DenseMask::new(allowed, dims).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(wrap(Mask::dense(m)))
}

/// Reads bytes as booleans (`!= 0`): a byte other than 0 or 1 read as a Rust `bool` would
/// be undefined behaviour, so the bytes are never reinterpreted.
///
/// # Safety
/// `ptr` must point at `len` live bytes.
unsafe fn bools(ptr: usize, len: usize) -> PyResult<Vec<bool>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptr == 0 {
        return Err(PyValueError::new_err("mask data: null pointer"));
    }
    let bytes = std::slice::from_raw_parts(ptr as *const u8, len);
    Ok(bytes.iter().map(|&x| x != 0).collect())
}

fn positive(what: &str, n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(format!("{what} must be at least 1")));
    }
    Ok(())
}

/// A mask compiled for one shape `(B, H_q, L_q, L_k)`.
#[pyclass(name = "NativeBlockMask", module = "maskattn._maskattn", frozen)]
pub struct NativeBlockMask {
    pub inner: Arc<BlockMask>,
}

#[pymethods]
impl NativeBlockMask {
    #[new]
    fn new(mask: &NativeMask, batch: usize, heads: usize, lq: usize, lk: usize) -> PyResult<Self> {
        let shape = MaskShape::new(batch, heads, lq, lk);
        // On the package's own pool: rayon's global one hangs in a forked child (threads.rs).
        let block = crate::threads::run(|| BlockMask::new(&mask.inner, shape))
            .map_err(PyValueError::new_err)?
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(NativeBlockMask {
            inner: Arc::new(block),
        })
    }

    /// `(B, H_q, L_q, L_k)`.
    #[getter]
    fn shape(&self) -> (usize, usize, usize, usize) {
        let s = self.inner.shape();
        (s.batch, s.heads, s.lq, s.lk)
    }

    #[getter]
    fn skipped_tile_fraction(&self) -> f64 {
        self.inner.stats().skipped_tile_fraction()
    }

    #[getter]
    fn hidden_pair_fraction(&self) -> f64 {
        self.inner.stats().hidden_pair_fraction()
    }
}
