//! Exact masked multi-head attention on the CPU: masks, block masks, a fused forward
//! (online softmax) and backward, and an f64 reference. No ML framework inside.
//!
//! Score modifiers ([`Params`]): soft-capping, an additive bias, ALiBi ([`alibi_slopes`]),
//! attention sinks and T5 relative positions ([`RelBias`], [`t5_bucket`]), in any
//! combination with any mask; the backward returns their gradients in [`Grads::params`]
//! (docs/design.md section 1 has the formulas).
//!
//! ```
//! use maskattn::{alibi_slopes, BlockMask, Mask, MaskShape, Params, Qkv, View};
//!
//! let (b, h, l, d) = (1, 2, 6, 4);
//! let x: Vec<f32> = (0..b * h * l * d).map(|i| (i as f32 * 0.21).cos()).collect();
//! let v = View::bhld("x", &x, [b, h, l, d])?;
//! let block = BlockMask::new(&Mask::causal(), MaskShape::new(b, h, l, l))?;
//! let (slopes, sinks) = (alibi_slopes(h), vec![0.5f32; h]);
//! let p = Params::default().with_softcap(30.0).with_alibi(&slopes).with_sinks(&sinks);
//! let fwd = maskattn::forward(&v, &v, &v, &block, &p)?;
//! let out = View::bhld("out", &fwd.out, [b, h, l, d])?;
//! let g = maskattn::backward(&Qkv::new(&v, &v, &v), &out, &fwd.lse, &v, &block, &p)?;
//! assert_eq!(g.params.dalibi.map(|x| x.len()), Some(h));
//! assert!(g.params.drel.is_none()); // no T5 buckets in this call
//! # Ok::<(), maskattn::AttnError>(())
//! ```
//!
//! ```
//! use maskattn::{BlockMask, Mask, View};
//!
//! let (b, h, l, d) = (1, 2, 5, 4);
//! let q: Vec<f32> = (0..b * h * l * d).map(|x| (x as f32 * 0.37).sin()).collect();
//! let (k, v) = (q.clone(), q.clone());
//! let shape = [b, h, l, d];
//! let (q, k, v) = (
//!     View::bhld("q", &q, shape)?,
//!     View::bhld("k", &k, shape)?,
//!     View::bhld("v", &v, shape)?,
//! );
//! // Causal, and the last key of the sequence is padding.
//! let mask = Mask::causal() & Mask::key_padding(vec![4]);
//! let block = BlockMask::new(&mask, maskattn::MaskShape::new(b, h, l, l))?;
//! let fwd = maskattn::forward(&q, &k, &v, &block, &maskattn::Params::default())?;
//! assert_eq!(fwd.out.len(), b * h * l * d);
//! assert!(fwd.lse.iter().all(|x| x.is_finite()));
//! # Ok::<(), maskattn::AttnError>(())
//! ```

mod backward;
mod bias;
mod block;
mod call;
mod cancel;
mod classify;
mod decode;
mod error;
mod forward;
mod gemm;
mod mask;
mod mask_grid;
mod mask_shape;
mod mask_syntax;
mod mask_terms;
mod mask_tree;
mod merge;
mod pack;
mod params;
pub mod reference;
mod rng;
mod score_mod;
mod shape;
mod simd;
mod softmax;
mod view;

pub use backward::{
    backward, backward_into, backward_upstream, backward_upstream_into, Grads, GradsMut,
    ParamGrads, ParamGradsMut, Qkv, Upstream,
};
pub use bias::Bias;
pub use block::{BlockMask, BlockStats, Tile, DEFAULT_TILE_K, DEFAULT_TILE_Q};
pub use cancel::Cancel;
pub use classify::TileClass;
pub use error::{AttnError, Result};
pub use forward::{forward, forward_into, Forward};
pub use gemm::amx::{amx_mode, AmxMode};
#[doc(hidden)]
pub use gemm::amx::{
    amx_model_column_tiles, amx_model_configures, amx_model_products, amx_tdpbf16ps_loop, set_amx,
};
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub use gemm::pair_layouts::{bf16_packing, bf16_scalar_packings};
/// The `half` crate, whose `bf16` and `f16` are storage types the kernels read.
pub use half;
pub use mask::{CausalAlign, DenseMask, Mask, MaskFn, MaskShape, Terms};
pub use mask_syntax::MaskExpr;
pub use mask_terms::{data_terms, structured_terms, BuildTerm, MaskTerm, MASK_TERMS};
pub use merge::merge_partials;
pub use params::{Dropout, Params};
pub use rng::SplitMix64;
pub use score_mod::{alibi_slopes, t5_bucket, RelBias};
pub use shape::AttnDims;
pub use simd::{bf16_dot_available, current_isa, kernel_path, set_isa, Isa, KernelPath};
pub use view::{Element, View};
