//! Masks and block masks as Python objects. The structured terms come from the kernel
//! crate's one list ([`maskattn::MASK_TERMS`]) through [`terms`] and [`make`], so a new
//! structured kind needs nothing here; the data terms read tensors and are spelled out
//! below (same names, same polarity: `true` = may attend).

use std::sync::Arc;

use maskattn::{
    BlockMask, DenseMask, Mask, MaskExpr, MaskShape, MaskTerm, TileClass, DEFAULT_TILE_K,
    DEFAULT_TILE_Q, MASK_TERMS,
};
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

    /// The grammar: `causal & !window(3,0)` (Rust's `Display`).
    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    /// The grammar with each data term's data summarised (Rust's `Debug`).
    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

fn value_error(e: maskattn::AttnError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// One term: `(name, params, repeats, is_data, doc, optional)`.
type TermRow = (
    &'static str,
    Vec<&'static str>,
    bool,
    bool,
    &'static str,
    usize,
);

/// The kernel crate's terms: `(name, params, repeats, is_data, doc, optional)` for each,
/// `optional` being how many of the last params may be left out.
#[pyfunction]
pub fn terms() -> Vec<TermRow> {
    MASK_TERMS
        .iter()
        .map(|t: &MaskTerm| {
            let params = t.params.to_vec();
            (t.name, params, t.repeats, t.is_data(), t.doc, t.optional)
        })
        .collect()
}

/// The structured term `name` with its numbers (`make("window", [3, 0])`).
#[pyfunction]
pub fn make(name: &str, args: Vec<usize>) -> PyResult<NativeMask> {
    Mask::term(name, &args).map(wrap).map_err(value_error)
}

/// The data terms of a mask expression, in the order binding asks for them, each with its
/// byte position; a syntax error is a `ValueError`.
#[pyfunction]
pub fn parse(expr: &str) -> PyResult<Vec<(String, usize)>> {
    let parsed = MaskExpr::parse(expr).map_err(value_error)?;
    Ok(parsed
        .data_terms()
        .into_iter()
        .map(|(name, at)| (name.to_string(), at))
        .collect())
}

/// Builds a mask from a postfix program, so that however long the Python side's chain,
/// Rust's `&` and `|` grow one flat list in place (amortised O(1) a term).
///
/// Each step is `(op, text, numbers)`: `("term", name, numbers)` a structured term,
/// `("data", "", [])` the next of `data`, `("expr", text, [])` a parsed expression whose
/// data terms take the next of `data` in order, `("and" | "or", "", [])` the last two
/// masks, `("not", "", [])` the last one.
#[pyfunction]
pub fn build(
    program: Vec<(String, String, Vec<usize>)>,
    data: Vec<NativeMask>,
) -> PyResult<NativeMask> {
    let mut data = data.into_iter().map(|d| d.inner);
    let mut stack: Vec<Mask> = Vec::new();
    let bad = |what: &str| PyValueError::new_err(format!("mask program: {what}"));
    for (op, text, args) in program {
        let m = match op.as_str() {
            "term" => Mask::term(&text, &args).map_err(value_error)?,
            "data" => data.next().ok_or_else(|| bad("too few data masks"))?,
            "expr" => MaskExpr::parse(&text)
                .map_err(value_error)?
                .bind(|_| data.next().ok_or_else(|| bad("too few data masks")))?,
            "and" | "or" => {
                let (Some(b), Some(a)) = (stack.pop(), stack.pop()) else {
                    return Err(bad("an operator without two operands"));
                };
                if op == "and" {
                    a & b
                } else {
                    a | b
                }
            }
            "not" => !stack.pop().ok_or_else(|| bad("`not` without an operand"))?,
            _ => return Err(bad(&format!("unknown step `{op}`"))),
        };
        stack.push(m);
    }
    if data.next().is_some() {
        return Err(bad("more data masks than data terms"));
    }
    match (stack.pop(), stack.is_empty()) {
        (Some(m), true) => Ok(wrap(m)),
        _ => Err(bad("not exactly one mask at the end")),
    }
}

fn wrap(inner: Mask) -> NativeMask {
    NativeMask { inner }
}

/// Key padding by valid lengths, one per batch row.
#[pyfunction]
pub fn key_padding(lengths: Vec<usize>) -> NativeMask {
    wrap(Mask::key_padding(lengths))
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

/// The tile sizes a block mask of `L_q × L_k` has: the defaults, clamped to the sequence
/// as [`BlockMask::new`] clamps them.
#[pyfunction]
pub fn tile_sizes(lq: usize, lk: usize) -> (usize, usize) {
    (DEFAULT_TILE_Q.min(lq.max(1)), DEFAULT_TILE_K.min(lk.max(1)))
}

/// `len` bytes at `ptr`, borrowed.
///
/// # Safety
/// `ptr` must point at `len` live bytes that outlive the borrow.
unsafe fn bytes<'a>(ptr: usize, len: usize) -> PyResult<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr == 0 {
        return Err(PyValueError::new_err("mask data: null pointer"));
    }
    Ok(std::slice::from_raw_parts(ptr as *const u8, len))
}

/// Reads bytes as booleans (`!= 0`): a byte other than 0 or 1 read as a Rust `bool` would
/// be undefined behaviour, so the bytes are never reinterpreted.
///
/// # Safety
/// `ptr` must point at `len` live bytes.
unsafe fn bools(ptr: usize, len: usize) -> PyResult<Vec<bool>> {
    Ok(bytes(ptr, len)?.iter().map(|&x| x != 0).collect())
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

    /// `mask` compiled for the block `[q0, q1) × [k0, k1)` of the whole problem
    /// `(B, H_q, L_q, L_k)`: evaluated at the global positions, seen by the kernels as a
    /// `(q1 − q0) × (k1 − k0)` problem (positional score modifiers follow the global
    /// positions). Context parallelism compiles one per pair of sequence shards.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn block(
        mask: &NativeMask,
        batch: usize,
        heads: usize,
        lq: usize,
        lk: usize,
        q_range: (usize, usize),
        k_range: (usize, usize),
    ) -> PyResult<Self> {
        let global = MaskShape::new(batch, heads, lq, lk);
        let block = crate::threads::run(|| {
            BlockMask::new_block(
                &mask.inner,
                global,
                q_range.0..q_range.1,
                k_range.0..k_range.1,
            )
        })
        .map_err(PyValueError::new_err)?
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(NativeBlockMask {
            inner: Arc::new(block),
        })
    }

    /// A block mask from tile classes decided in Python (`from_mask_mod`): `classes` a
    /// contiguous uint8 tensor `[rows_b, rows_h, nq, nk]` (0 empty, 1 full, 2 partial),
    /// `partial` a contiguous bool tensor of `tile_q × tile_k` values per partial tile, in
    /// order (both copied). The tiles are [`tile_sizes`]'s for the shape.
    #[staticmethod]
    #[pyo3(signature = (shape, rows, classes, partial))]
    fn from_tiles(
        shape: (usize, usize, usize, usize),
        rows: (usize, usize),
        classes: (usize, usize),
        partial: (usize, usize),
    ) -> PyResult<Self> {
        let (batch, heads, lq, lk) = shape;
        let shape = MaskShape::new(batch, heads, lq, lk);
        // SAFETY: the Python side passes live, contiguous uint8 / bool tensors of these lengths.
        let classes = unsafe { bytes(classes.0, classes.1) }?
            .iter()
            .map(|&c| match c {
                0 => Ok(TileClass::Empty),
                1 => Ok(TileClass::Full),
                2 => Ok(TileClass::Partial),
                _ => Err(PyValueError::new_err(format!(
                    "tile class {c}: expected 0, 1 or 2"
                ))),
            })
            .collect::<PyResult<Vec<_>>>()?;
        let partial = unsafe { bools(partial.0, partial.1) }?;
        let block = BlockMask::from_tiles(shape, tile_sizes(lq, lk), rows, &classes, &partial)
            .map_err(value_error)?;
        Ok(NativeBlockMask {
            inner: Arc::new(block),
        })
    }

    /// Whether the mask hides every pair of this (block) mask: no kernel call needed.
    #[getter]
    fn all_empty(&self) -> bool {
        self.inner.all_empty()
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
