//! Fused element-wise ops with a backward, for the model path: GELU (exact and tanh forms)
//! and layer normalisation, each one pass over the data instead of a chain of candle ops
//! (each of which allocates a buffer and synchronises candle's threads), vectorised for the
//! CPU's widest instruction set and split over rayon's pool. Every one has a backward
//! (candle-nn's fused `layer_norm` has none), tested against the composed ops and in f64.

pub mod approx;
mod gelu;
mod layer_norm;
pub(crate) mod par;

pub use gelu::{gelu_erf, gelu_tanh};
pub use layer_norm::{layer_norm, layer_norm_ops};
