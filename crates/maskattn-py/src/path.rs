//! Which kernel code runs: for scripts that must say what they measured
//! (`bench/compare_python.py --isa avx2` prints it beside PyTorch's capability).

use pyo3::prelude::*;

/// The instruction set the kernels use now ("Avx512", "Avx2", "Portable", "Neon"): the
/// widest the CPU has unless `MASKATTN_ISA` forced a narrower one.
#[pyfunction]
pub fn isa() -> String {
    format!("{:?}", maskattn::current_isa())
}

/// The whole kernel path in words: the instruction set of the f32 products and where bf16
/// storage goes (e.g. "f32 on Avx2; bf16 widened to f32").
#[pyfunction]
pub fn kernel_path() -> String {
    maskattn::kernel_path().to_string()
}
