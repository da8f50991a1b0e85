//! Helpers shared by the candle crate's tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use maskattn::reference;

/// Deterministic data in [−1, 1).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (i ^ (seed << 32)).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    Tensor::from_vec(data(shape.iter().product(), seed), shape, &Device::Cpu)
}

pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

pub fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// The accuracy rule of docs/design.md section 4 on tensors: `kernel` against the f64 `golden`,
/// bounded by twice the error of the f32 `naive` plus 1e-5.
pub fn assert_close(what: &str, kernel: &Tensor, golden: &Tensor, naive: &Tensor) {
    let (k, g, n) = (
        to_f32_vec(kernel).unwrap(),
        to_f64_vec(golden).unwrap(),
        to_f32_vec(naive).unwrap(),
    );
    let a = reference::accuracy(&k, &g, &n, reference::EPS_F32);
    assert!(a.ok, "{what}: {a:?}");
}

/// max |a − b| over all elements.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
