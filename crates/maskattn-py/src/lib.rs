//! `maskattn._maskattn`: the native half of the Python package. A thin layer over the
//! `maskattn` crate's public API — masks, block masks, `forward_into`, `backward_into` —
//! reading torch tensors in place (see `raw.rs` for what the callers guarantee).

mod kernels;
mod masks;
mod path;
mod raw;
mod threads;

use pyo3::prelude::*;

#[pymodule]
fn _maskattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<masks::NativeMask>()?;
    m.add_class::<masks::NativeBlockMask>()?;
    m.add_function(wrap_pyfunction!(masks::full, m)?)?;
    m.add_function(wrap_pyfunction!(masks::causal, m)?)?;
    m.add_function(wrap_pyfunction!(masks::causal_top_left, m)?)?;
    m.add_function(wrap_pyfunction!(masks::window, m)?)?;
    m.add_function(wrap_pyfunction!(masks::chunks, m)?)?;
    m.add_function(wrap_pyfunction!(masks::block_causal, m)?)?;
    m.add_function(wrap_pyfunction!(masks::neighbourhood, m)?)?;
    m.add_function(wrap_pyfunction!(masks::key_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(masks::key_keep, m)?)?;
    m.add_function(wrap_pyfunction!(masks::documents, m)?)?;
    m.add_function(wrap_pyfunction!(masks::prefix, m)?)?;
    m.add_function(wrap_pyfunction!(masks::dense, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::backward, m)?)?;
    m.add_function(wrap_pyfunction!(threads::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(path::isa, m)?)?;
    m.add_function(wrap_pyfunction!(path::kernel_path, m)?)?;
    Ok(())
}
