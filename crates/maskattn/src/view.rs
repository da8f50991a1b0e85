//! Strided read-only views of 4-d tensors, so that `[B, H, L, d]` and `[B, L, H, d]` buffers
//! (and any other layout a framework hands us) reach the kernels without a copy.

use crate::error::{AttnError, Result};

/// A storage type the kernels can read. Values are widened to `f32` when a tile is loaded,
/// so the kernels compute in `f32` whatever the storage — except bf16 on a CPU with
/// AVX512-BF16, whose products take bf16 pairs as they are (accumulating in `f32`).
///
/// The trait is sealed: the kernels trust [`Element::as_f32`] to return a slice exactly as
/// long as its input (they index it with raw pointers), so only the three storage types
/// implemented here can be used. An implementation outside the crate does not compile:
///
/// ```compile_fail,E0277
/// #[derive(Clone, Copy)]
/// struct Mine(f32);
/// impl maskattn::Element for Mine {
///     fn to_f32(self) -> f32 {
///         self.0
///     }
/// }
/// ```
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The same memory as `f32`, when the storage type is `f32` (lets memory-bound paths
    /// read a view in place instead of copying it).
    fn as_f32(data: &[Self]) -> Option<&[f32]> {
        let _ = data;
        None
    }
    /// The storage is bf16, so its bits can go to bf16 dot products unchanged.
    const IS_BF16: bool = false;
    /// The value as bf16 bits (exact only when [`Element::IS_BF16`]; the kernels ask only then).
    fn bf16_bits(self) -> u16 {
        half::bf16::from_f32(self.to_f32()).to_bits()
    }
}

/// The private supertrait that seals [`Element`]: nothing outside this crate can name it,
/// so nothing outside can implement `Element`.
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(data: &[f32]) -> Option<&[f32]> {
        Some(data)
    }
}

/// bf16 storage: widened exactly (a bf16 is the top half of an f32).
impl Element for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    const IS_BF16: bool = true;
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
}

/// f16 storage: widened exactly.
impl Element for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// The product of `factors` (elements of a contiguous tensor, or one of its strides),
/// or a typed error when it does not fit in `usize`.
fn product(name: &'static str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |n, &x| n.checked_mul(x))
        .ok_or_else(|| AttnError::SizeOverflow {
            name,
            what: "elements",
            factors: factors.to_vec(),
        })
}

/// A view of a 4-d tensor indexed logically as `[batch, head, position, feature]`.
///
/// `strides` are in elements. The view is checked once at construction: every index inside
/// `shape` lands inside `data`, so kernels index without further checks.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T = f32> {
    data: &'a [T],
    shape: [usize; 4],
    strides: [usize; 4],
}

impl<'a, T: Element> View<'a, T> {
    /// A view with explicit strides (in elements), named for error messages.
    pub fn strided(
        name: &'static str,
        data: &'a [T],
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        // The last element's offset, `Σ (n − 1) · stride`, checked: a wrapped sum would let
        // a view reach past its buffer.
        let needed = if shape.contains(&0) {
            Some(0)
        } else {
            shape
                .iter()
                .zip(strides.iter())
                .try_fold(1usize, |acc, (&n, &s)| {
                    acc.checked_add((n - 1).checked_mul(s)?)
                })
        };
        let needed = needed.ok_or_else(|| AttnError::SizeOverflow {
            name,
            what: "the last element's offset, from shape and strides",
            factors: shape.iter().chain(&strides).copied().collect(),
        })?;
        if needed > data.len() {
            return Err(AttnError::ViewOutOfBounds {
                name,
                shape,
                strides,
                needed,
                len: data.len(),
            });
        }
        Ok(View {
            data,
            shape,
            strides,
        })
    }

    /// A contiguous `[B, H, L, d]` tensor.
    pub fn bhld(name: &'static str, data: &'a [T], shape: [usize; 4]) -> Result<Self> {
        let [_, h, l, d] = shape;
        let [hld, ld] = [product(name, &[h, l, d])?, product(name, &[l, d])?];
        Self::checked_exact(name, data, shape, product(name, &shape)?)?;
        Self::strided(name, data, shape, [hld, ld, d, 1])
    }

    /// A contiguous `[B, L, H, d]` tensor (the layout after a projection and a reshape),
    /// viewed as `[B, H, L, d]`. `shape` is given in the logical order `[B, H, L, d]`.
    pub fn blhd(name: &'static str, data: &'a [T], shape: [usize; 4]) -> Result<Self> {
        let [_, h, l, d] = shape;
        let [lhd, hd] = [product(name, &[l, h, d])?, product(name, &[h, d])?];
        Self::checked_exact(name, data, shape, product(name, &shape)?)?;
        Self::strided(name, data, shape, [lhd, d, hd, 1])
    }

    fn checked_exact(name: &'static str, data: &[T], shape: [usize; 4], n: usize) -> Result<()> {
        if data.len() != n {
            return Err(AttnError::ShapeMismatch {
                what: format!(
                    "{name}: buffer holds {} elements, shape {shape:?} needs {n}",
                    data.len()
                ),
            });
        }
        Ok(())
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }

    #[inline(always)]
    pub fn get(&self, b: usize, h: usize, l: usize, x: usize) -> T {
        self.data[self.offset(b, h, l) + x * self.strides[3]]
    }

    #[inline(always)]
    fn offset(&self, b: usize, h: usize, l: usize) -> usize {
        b * self.strides[0] + h * self.strides[1] + l * self.strides[2]
    }

    /// Rows from `start` of `(b, h)` in place, with their row stride, when the storage is
    /// `f32` and features are contiguous.
    pub(crate) fn f32_rows(&self, b: usize, h: usize, start: usize) -> Option<(&'a [f32], usize)> {
        let data = T::as_f32(self.data)?;
        (self.strides[3] == 1).then(|| (&data[self.offset(b, h, start)..], self.strides[2]))
    }

    /// Row `l` of `(b, h)` in place (its `d` features), when features are contiguous.
    #[inline]
    pub(crate) fn row(&self, b: usize, h: usize, l: usize) -> Option<&'a [T]> {
        let base = self.offset(b, h, l);
        (self.strides[3] == 1).then(|| &self.data[base..base + self.shape[3]])
    }

    /// Features `x0 .. x0 + out.len()` of row `l` of `(b, h)` into `out` as `f32`.
    #[inline]
    pub(crate) fn load_features(&self, b: usize, h: usize, l: usize, x0: usize, out: &mut [f32]) {
        let base = self.offset(b, h, l) + x0 * self.strides[3];
        if self.strides[3] == 1 {
            let n = out.len();
            for (o, s) in out.iter_mut().zip(&self.data[base..base + n]) {
                *o = s.to_f32();
            }
        } else {
            for (x, o) in out.iter_mut().enumerate() {
                *o = self.data[base + x * self.strides[3]].to_f32();
            }
        }
    }

    /// Copies rows `start..start + out.len() / d` of `(b, h)` into `out` as contiguous `f32`.
    /// Rows are contiguous in the common layouts, so this is a plain copy per row.
    #[inline]
    pub(crate) fn load_rows(&self, b: usize, h: usize, start: usize, out: &mut [f32]) {
        let d = self.shape[3];
        for (r, dst) in out.chunks_exact_mut(d).enumerate() {
            self.load_features(b, h, start + r, 0, dst);
        }
    }
}
