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
pub use grads::{Grads, GradsMut, ParamGrads, ParamGradsMut, Qkv, Upstream};
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
    backward_upstream(qkv, out, lse, Upstream::new(dout), block, params)
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
    backward_upstream_into(qkv, out, lse, Upstream::new(dout), block, params, grads)
}

/// [`backward`] with the gradients arriving from above as an [`Upstream`]: `dO` and, where
/// the loss uses the LSE too, `dLSE` (docs/design.md section 1, "Blocks of a larger
/// problem"). `out` and `lse` need not be this call's forward: a block of a larger problem
/// ([`BlockMask::new_block`]) takes the *merged* output and LSE of its query rows
/// ([`merge_partials`](crate::merge_partials) over all key blocks) and returns its share of
/// the gradients — summed over key blocks for `dq`, over query blocks for `dk` and `dv`.
pub fn backward_upstream<T: Element>(
    qkv: &Qkv<T>,
    out: &View<f32>,
    lse: &[f32],
    up: Upstream,
    block: &BlockMask,
    params: &Params,
) -> Result<Grads> {
    let dims = AttnDims::of(&qkv.q, &qkv.k, &qkv.v)?;
    params.check_mods(dims.q_heads)?;
    let mut grads = Grads::zeros(&dims, params);
    backward_upstream_into(qkv, out, lse, up, block, params, grads.as_mut())?;
    Ok(grads)
}

/// [`backward_upstream`] into buffers the caller owns, as [`backward_into`].
pub fn backward_upstream_into<T: Element>(
    qkv: &Qkv<T>,
    out: &View<f32>,
    lse: &[f32],
    up: Upstream,
    block: &BlockMask,
    params: &Params,
    grads: GradsMut<'_>,
) -> Result<()> {
    let dout = &up.dout;
    let GradsMut {
        dq,
        dk,
        dv,
        params: mut pg,
    } = grads;
    // Check: every shape, buffer and parameter, before any work.
    let lens = (dq.len(), dk.len(), dv.len());
    let (dims, scale) = check::call(qkv, (out, lse, dout), block, params, lens, &pg)?;
    if let Some(dl) = up.dlse {
        AttnDims::check_buffer("dlse", dl.len(), lse.len(), "B * H_q * L_q")?;
    }
    // D: `D_i = dO_i · O_i` per query row, which query tiles are finite, and `dsinks`.
    let dsinks = pg.dsinks.take();
    let sinks = params.sinks.filter(|_| dsinks.is_some());
    let rows = delta::row_terms(&qkv.q, (out, lse), &up, block, &dims, sinks, dsinks);
    // Tasks: (b, kv head, chunk of key tiles); then, per (b, kv head), reduce their results.
    let call = Call::new((&qkv.q, &qkv.k, &qkv.v), block, params, dims, scale);
    let pass = Pass::new(call, (dout, lse), rows, params, &pg);
    let (group, lq, lk, d) = (dims.group(), dims.lq, dims.lk, dims.d);
    let head_mods: Vec<_> = dq
        .par_chunks_mut(group * lq * d)
        .zip(dk.par_chunks_mut(lk * d))
        .zip(dv.par_chunks_mut(lk * d))
        .enumerate()
        .map(|(bhk, ((dq, dk), dv))| {
            // The tasks write `dk`, `dv` (zeros for key tiles no query sees).
            let results = pass.tasks(bhk, (dk, dv));
            reduce::dq(&results, &pass.g, scale, dq);
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
    params.check_cancel()
}
