//! `maskattn._maskattn`: the native half of the Python package. A thin layer over the
//! `maskattn` crate's public API — masks, block masks, `forward_into`, `backward_into` —
//! reading torch tensors in place (see `raw.rs` for what the callers guarantee).

mod kernels;
mod masks;
mod mods;
mod path;
mod raw;
mod threads;

use pyo3::prelude::*;

#[pymodule]
fn _maskattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<masks::NativeMask>()?;
    m.add_class::<masks::NativeBlockMask>()?;
    m.add_function(wrap_pyfunction!(masks::terms, m)?)?;
    m.add_function(wrap_pyfunction!(masks::make, m)?)?;
    m.add_function(wrap_pyfunction!(masks::parse, m)?)?;
    m.add_function(wrap_pyfunction!(masks::build, m)?)?;
    m.add_function(wrap_pyfunction!(masks::key_padding, m)?)?;
    m.add_function(wrap_pyfunction!(masks::key_keep, m)?)?;
    m.add_function(wrap_pyfunction!(masks::documents, m)?)?;
    m.add_function(wrap_pyfunction!(masks::dense, m)?)?;
    m.add_function(wrap_pyfunction!(masks::tile_sizes, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::forward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::allowed, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::merge_partials, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::dropout_keep, m)?)?;
    m.add_function(wrap_pyfunction!(threads::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(path::isa, m)?)?;
    m.add_function(wrap_pyfunction!(path::kernel_path, m)?)?;
    Ok(())
}
