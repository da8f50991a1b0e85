//! Fused ops with a backward, for the model path: GELU (exact and tanh forms), layer
//! normalisation, the linear layer, the head split (with rotary positions) and merge, and
//! the cross-entropy of logits, each one pass over the data instead of a chain of candle ops
//! (each of which allocates a buffer and synchronises candle's threads), vectorised for the
//! instruction set the kernels use ([`maskattn::current_isa`]: `MASKATTN_ISA` and
//! [`maskattn::set_isa`] choose it for both; [`calls_on`] says which ran) and split over
//! rayon's pool. Every one has a backward (candle-nn's fused `layer_norm` has none), tested
//! against the composed ops and in f64.

pub mod approx;
mod cross_entropy;
mod gelu;
mod heads;
mod layer_norm;
mod linear;
mod linear_gelu;
pub(crate) mod par;

pub use cross_entropy::{weighted_nll, weighted_nll_ops};
pub use gelu::{gelu_erf, gelu_tanh};
pub use heads::{merge_heads, split_heads, RotaryTables};
pub use layer_norm::{layer_norm, layer_norm_ops};
pub use linear::{linear, linear_ops};
pub use linear_gelu::{linear_gelu_erf, linear_gelu_tanh};
pub use par::calls_on;
