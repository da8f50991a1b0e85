//! The backward's checks, all before any work: a bad argument is a typed error naming it.

use super::grads::{ParamGradsMut, Qkv};
use crate::block::BlockMask;
use crate::error::{AttnError, Result};
use crate::params::Params;
use crate::shape::AttnDims;
use crate::view::{Element, View};

/// Checks a call of [`backward_into`](super::backward_into) (`grads`: the lengths of the
/// `dq`, `dk`, `dv` buffers); returns its dimensions and score scale.
pub(super) fn call<T: Element>(
    qkv: &Qkv<T>,
    (out, lse, dout): (&View<f32>, &[f32], &View<f32>),
    block: &BlockMask,
    params: &Params,
    (dq, dk, dv): (usize, usize, usize),
    pg: &ParamGradsMut,
) -> Result<(AttnDims, f32)> {
    let Qkv { q, k, v } = qkv;
    let dims = AttnDims::of(q, k, v)?;
    AttnDims::check_buffer("dq", dq, dims.q_len(), "B * H_q * L_q * d")?;
    AttnDims::check_buffer("dk", dk, dims.kv_len(), "B * H_kv * L_k * d")?;
    AttnDims::check_buffer("dv", dv, dims.kv_len(), "B * H_kv * L_k * d")?;
    let bias = params.bias.as_ref();
    dims.check_bias(bias)?;
    params.check_mods(dims.q_heads)?;
    param_grads(pg, params, dims.q_heads)?;
    dims.check_like_q("out", out)?;
    dims.check_like_q("dout", dout)?;
    block.check_shape(dims.mask_shape())?;
    let expected = dims.batch * dims.q_heads * dims.lq;
    if lse.len() != expected {
        return Err(AttnError::LseLength {
            got: lse.len(),
            expected,
        });
    }
    let scale = dims.scale(params.scale)?;
    Ok((dims, scale))
}

/// Each parameter-gradient buffer belongs to a modifier of the call and has its length.
fn param_grads(pg: &ParamGradsMut, params: &Params, heads: usize) -> Result<()> {
    let want = [
        (
            "dbias",
            pg.dbias.as_deref(),
            params.bias.map(|b| b.dims().iter().product::<usize>()),
        ),
        ("dalibi", pg.dalibi.as_deref(), params.alibi.map(|_| heads)),
        ("dsinks", pg.dsinks.as_deref(), params.sinks.map(|_| heads)),
        (
            "drel",
            pg.drel.as_deref(),
            params.rel.map(|r| r.num_buckets() * heads),
        ),
    ];
    for (name, buf, n) in want {
        match (buf, n) {
            (Some(_), None) => {
                return Err(AttnError::ParamGrad {
                    name,
                    what: "a buffer was given, but the call has no such modifier".into(),
                })
            }
            (Some(b), Some(n)) if b.len() != n => {
                return Err(AttnError::ParamGrad {
                    name,
                    what: format!("the buffer holds {} values, the call needs {n}", b.len()),
                })
            }
            _ => {}
        }
    }
    Ok(())
}
