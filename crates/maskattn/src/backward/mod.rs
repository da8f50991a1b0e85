//! The backward kernel: recomputes `P` tile by tile from the forward's `LSE`.
//!
//! Work is split into tasks of (batch row, kv head, chunk of key tiles). A task owns the
//! `dK`, `dV` of its key tiles outright and accumulates `dQ` of the query heads it serves in
//! a buffer of its own; the chunks' `dQ` buffers are added in chunk order at the end. The
//! number of chunks depends on the shape only, and every sum runs in a fixed order, so the
//! gradients are bit-identical run to run and for any number of threads: the deterministic
//! mode is the only mode.

#[cfg(target_arch = "x86_64")]
mod bf16;
mod check;
mod delta;
mod grads;
mod pass;
mod reduce;
mod score_grads;
mod step;

use rayon::prelude::*;

use crate::block::BlockMask;
use crate::call::Call;
use crate::error::Result;
use crate::params::Params;
use crate::shape::AttnDims;
use crate::view::{Element, View};
pub use grads::{Grads, GradsMut, ParamGrads, ParamGradsMut, Qkv};
use pass::Pass;

/// Masked attention backward: gradients of `q`, `k`, `v` given the forward's `out` and `lse`
/// and the output gradient `dout` (shaped like q). Same inputs, block mask and [`Params`]
/// (scale, bias, dropout, score modifiers) as the forward. `Grads::params` holds the
/// gradient of every modifier of `params` that has parameters (docs/design.md section 1).
pub fn backward<T: Element>(
    qkv: &Qkv<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    block: &BlockMask,
    params: &Params,
) -> Result<Grads> {
    let dims = AttnDims::of(&qkv.q, &qkv.k, &qkv.v)?;
    params.check_mods(dims.q_heads)?;
    let h = dims.q_heads;
    let mut grads = Grads {
        dq: vec![0f32; dims.q_len()],
        dk: vec![0f32; dims.kv_len()],
        dv: vec![0f32; dims.kv_len()],
        params: ParamGrads {
            dbias: params.bias.map(|bs| vec![0f32; bs.dims().iter().product()]),
            dalibi: params.alibi.map(|_| vec![0f32; h]),
            dsinks: params.sinks.map(|_| vec![0f32; h]),
            drel: params.rel.map(|rb| vec![0f32; rb.num_buckets() * h]),
        },
    };
    let p = &mut grads.params;
    let into = GradsMut {
        dq: &mut grads.dq,
        dk: &mut grads.dk,
        dv: &mut grads.dv,
        params: ParamGradsMut {
            dbias: p.dbias.as_deref_mut(),
            dalibi: p.dalibi.as_deref_mut(),
            dsinks: p.dsinks.as_deref_mut(),
            drel: p.drel.as_deref_mut(),
        },
    };
    backward_into(qkv, out, lse, dout, block, params, into)?;
    Ok(grads)
}

/// [`backward`] into buffers the caller owns (every value overwritten): for writing straight
/// into another framework's gradient storage, or reusing buffers call after call. The
/// parameter gradients are computed for exactly the buffers given in `grads.params`
/// (checked: each belongs to a modifier of `params` and has its length).
pub fn backward_into<T: Element>(
    qkv: &Qkv<T>,
    out: &View<f32>,
    lse: &[f32],
    dout: &View<f32>,
    block: &BlockMask,
    params: &Params,
    grads: GradsMut<'_>,
) -> Result<()> {
    let GradsMut {
        dq,
        dk,
        dv,
        params: mut pg,
    } = grads;
    // Check: every shape, buffer and parameter, before any work.
    let lens = (dq.len(), dk.len(), dv.len());
    let (dims, scale) = check::call(qkv, (out, lse, dout), block, params, lens, &pg)?;
    // D: `D_i = dO_i · O_i` per query row, which query tiles are finite, and `dsinks`.
    let dsinks = pg.dsinks.take();
    let sinks = params.sinks.filter(|_| dsinks.is_some());
    let rows = delta::row_terms(&qkv.q, (out, dout, lse), block, &dims, sinks, dsinks);
    // Tasks: (b, kv head, chunk of key tiles); then, per (b, kv head), reduce their results.
    let call = Call::new((&qkv.q, &qkv.k, &qkv.v), block, params, dims, scale);
    let pass = Pass::new(call, (dout, lse), rows, params, &pg);
    let (group, lq, lk, d) = (dims.group(), dims.lq, dims.lk, dims.d);
    // Key tiles no query sees give no result (`chunk` skips them): their gradients are 0.
    dk.fill(0.0);
    dv.fill(0.0);
    let head_mods: Vec<_> = dq
        .par_chunks_mut(group * lq * d)
        .zip(dk.par_chunks_mut(lk * d))
        .zip(dv.par_chunks_mut(lk * d))
        .enumerate()
        .map(|(bhk, ((dq, dk), dv))| {
            let results = pass.tasks(bhk);
            reduce::inputs(&results, &pass.g, (scale, lk), (dq, dk, dv));
            reduce::head_mods(&pass.mods(), &pass.g, &results)
        })
        .collect();
    // Reduce: the parameter-gradient sums over (b, kv head), into the caller's buffers.
    reduce::params(
        &pass.mods(),
        head_mods,
        (dims.kv_heads, dims.q_heads),
        params,
        pg,
    );
    Ok(())
}
