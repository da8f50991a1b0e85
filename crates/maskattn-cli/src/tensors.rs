//! Reading and writing the safetensors files of `attend`, with errors that name the tensor.

use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A tensor read from a file: its shape and its values widened to the requested type.
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

pub fn has(st: &SafeTensors, name: &str) -> bool {
    st.names().contains(&name)
}

fn get<'a>(st: &SafeTensors<'a>, name: &str, dtype: Dtype, rank: usize) -> Result<TensorView<'a>> {
    let t = st.tensor(name).with_context(|| {
        format!(
            "tensor `{name}` is missing (the file has: {})",
            st.names().join(", ")
        )
    })?;
    if t.dtype() != dtype {
        bail!("tensor `{name}` is {:?}, expected {dtype:?}", t.dtype());
    }
    if t.shape().len() != rank {
        bail!(
            "tensor `{name}` has shape {:?}, expected {rank} dimensions",
            t.shape()
        );
    }
    Ok(t)
}

pub fn f32(st: &SafeTensors, name: &str, rank: usize) -> Result<Tensor<f32>> {
    let t = get(st, name, Dtype::F32, rank)?;
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Ok(Tensor {
        shape: t.shape().to_vec(),
        data,
    })
}

pub fn i64(st: &SafeTensors, name: &str, rank: usize) -> Result<Tensor<i64>> {
    let t = get(st, name, Dtype::I64, rank)?;
    let data = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Ok(Tensor {
        shape: t.shape().to_vec(),
        data,
    })
}

pub fn u8(st: &SafeTensors, name: &str, rank: usize) -> Result<Tensor<u8>> {
    let t = get(st, name, Dtype::U8, rank)?;
    Ok(Tensor {
        shape: t.shape().to_vec(),
        data: t.data().to_vec(),
    })
}

/// Writes f32 tensors to `path` as every program output is written (see `output`): whole
/// or not at all for a file, through for a FIFO or device.
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((*name, TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let buf = safetensors::serialize(views, None)?;
    crate::output::write_bytes(path, &buf)
}
