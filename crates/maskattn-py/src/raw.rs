//! Tensors handed over from Python as raw parts (data pointer, shape, strides, dtype), read
//! in place as `maskattn::View`s: no copy crosses the boundary.
//!
//! The native module is private (`maskattn._maskattn`): only the package's own Python code
//! calls it, and that code upholds the invariants below by taking every pointer from a live
//! CPU `torch.Tensor` it holds for the duration of the call.

use maskattn::{Element, View};

/// Storage types, coded as the Python side codes them (`maskattn/_native.py`).
pub const F32: u8 = 0;
pub const BF16: u8 = 1;
pub const F16: u8 = 2;

/// One 4-d input tensor: `(data_ptr, shape, strides in elements, dtype code)`, indexed
/// logically `[B, H, L, d]`.
#[derive(pyo3::FromPyObject, Clone, Copy, Debug)]
pub struct RawTensor(pub usize, pub [usize; 4], pub [usize; 4], pub u8);

/// One contiguous f32 output buffer: `(data_ptr, number of elements)`.
#[derive(pyo3::FromPyObject, Clone, Copy, Debug)]
pub struct RawOut(pub usize, pub usize);

impl RawTensor {
    pub fn dtype(&self) -> u8 {
        self.3
    }

    /// Elements the view reaches from its first one: `1 + Σ (n − 1)·stride`, 0 when empty.
    fn extent(&self) -> usize {
        let (shape, strides) = (self.1, self.2);
        if shape.contains(&0) {
            return 0;
        }
        1 + shape
            .iter()
            .zip(strides.iter())
            .map(|(&n, &s)| (n - 1) * s)
            .sum::<usize>()
    }

    /// Byte range `[start, end)` the tensor's elements occupy (for the overlap check).
    fn bytes(&self, elem: usize) -> (usize, usize) {
        (self.0, self.0 + self.extent() * elem)
    }

    /// A view of the tensor's elements in place.
    ///
    /// # Safety
    /// `self.0` must point at the first element of a live tensor of element type `T` whose
    /// storage holds every element its shape and strides reach (`extent()` elements from
    /// the pointer), and nothing may write to that storage while the view lives. A torch
    /// tensor with non-negative strides satisfies the first by construction (its
    /// `data_ptr()` already includes the storage offset); the caller holds the tensor and
    /// the kernels only read it.
    pub unsafe fn view<'a, T: Element>(&self, name: &'static str) -> Result<View<'a, T>, String> {
        let n = self.extent();
        let data: &[T] = if n == 0 {
            &[]
        } else {
            check_pointer::<T>(name, self.0)?;
            std::slice::from_raw_parts(self.0 as *const T, n)
        };
        View::strided(name, data, self.1, self.2).map_err(|e| e.to_string())
    }
}

impl RawOut {
    fn bytes(&self) -> (usize, usize) {
        (self.0, self.0 + self.1 * 4)
    }

    /// The buffer as a 1-d f32 input tensor, for the overlap check of read-only buffers.
    pub fn as_tensor(self) -> RawTensor {
        RawTensor(self.0, [1, 1, 1, self.1], [0, 0, 0, 1], F32)
    }

    /// The buffer as a read-only slice (the forward's LSE handed back to the backward).
    ///
    /// # Safety
    /// `self.0` must point at `self.1` initialised, live, contiguous f32 values that
    /// nothing writes while the slice lives.
    pub unsafe fn slice<'a>(&self, name: &'static str) -> Result<&'a [f32], String> {
        if self.1 == 0 {
            return Ok(&[]);
        }
        check_pointer::<f32>(name, self.0)?;
        Ok(std::slice::from_raw_parts(self.0 as *const f32, self.1))
    }

    /// The buffer as a mutable slice that the kernels fill.
    ///
    /// # Safety
    /// `self.0` must point at `self.1` live, contiguous f32 values (a freshly allocated
    /// torch tensor) that no other reference reads or writes while the slice lives —
    /// [`check_disjoint`] rules out overlap with the call's other tensors.
    pub unsafe fn slice_mut<'a>(&self, name: &'static str) -> Result<&'a mut [f32], String> {
        if self.1 == 0 {
            return Ok(&mut []);
        }
        check_pointer::<f32>(name, self.0)?;
        Ok(std::slice::from_raw_parts_mut(self.0 as *mut f32, self.1))
    }
}

fn check_pointer<T>(name: &str, ptr: usize) -> Result<(), String> {
    if ptr == 0 {
        return Err(format!("{name}: null data pointer"));
    }
    if !ptr.is_multiple_of(std::mem::align_of::<T>()) {
        return Err(format!(
            "{name}: data pointer {ptr:#x} is not aligned for its dtype"
        ));
    }
    Ok(())
}

/// Bytes per element of a dtype code.
pub fn elem_size(dtype: u8) -> usize {
    if dtype == F32 {
        4
    } else {
        2
    }
}

/// Every output buffer must be disjoint from every other tensor of the call: a `&mut`
/// slice that aliases an input (or another output) would be undefined behaviour.
pub fn check_disjoint(inputs: &[RawTensor], outputs: &[RawOut]) -> Result<(), String> {
    let ins = inputs.iter().map(|t| t.bytes(elem_size(t.dtype())));
    let outs: Vec<(usize, usize)> = outputs.iter().map(RawOut::bytes).collect();
    let overlaps = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
    for (i, &o) in outs.iter().enumerate() {
        if ins.clone().any(|r| overlaps(r, o)) || outs[i + 1..].iter().any(|&p| overlaps(o, p)) {
            return Err("an output buffer overlaps another tensor of the call".into());
        }
    }
    Ok(())
}
