//! The backward's reductions, in a fixed order (so the gradients are bit-identical run to
//! run): per (b, kv head), its chunks' `dQ` summed in chunk order (their key tiles' `dK`,
//! `dV` the chunks write themselves); then the parameter-gradient sums over (b, kv head).

use super::grads::ParamGradsMut;
use super::pass::ChunkResult;
use super::score_grads::ModSpec;
use crate::params::Params;
use crate::softmax::Geom;

/// `dQ = s · Σ_chunks (dS · K)`, summed in chunk order, into the (b, kv head)'s rows of
/// the caller's buffer.
pub(super) fn dq(results: &[ChunkResult], g: &Geom, scale: f32, dq: &mut [f32]) {
    let d = g.d;
    for (r, dst) in dq.chunks_exact_mut(d).enumerate() {
        let row = r * g.d_pad;
        for (x, o) in dst.iter_mut().enumerate() {
            let sum = results.iter().fold(0f32, |a, c| a + c.dq[row + x]);
            *o = scale * sum;
        }
    }
}

/// The parameter-gradient sums of one (b, kv head), in the layouts of [`ModGrads`]:
/// the bias block `[gh, nq, nk]`, `dalibi [group]`, `drel [num_buckets, group]`.
pub(super) struct HeadMods {
    bias: Vec<f32>,
    dalibi: Vec<f64>,
    drel: Vec<f64>,
}

/// The parameter-gradient sums of one (b, kv head) from its chunks, in chunk order.
pub(super) fn head_mods(spec: &ModSpec, g: &Geom, results: &[ChunkResult]) -> Option<HeadMods> {
    if !spec.any() {
        return None;
    }
    let lk = spec.lk;
    let chunks = || results.iter().filter_map(|c| c.mods.as_ref());
    let bias = match spec.bias_block() {
        None => Vec::new(),
        Some((gh, nq, 1)) => {
            let mut sum = vec![0f32; gh * nq];
            for m in chunks() {
                sum.iter_mut().zip(&m.cols).for_each(|(s, x)| *s += x);
            }
            sum
        }
        Some((gh, nq, nk)) => {
            // Every key tile belongs to one chunk: its columns are copied, not summed.
            let mut all = vec![0f32; gh * nq * nk];
            for (kt, tile) in chunks().flat_map(|m| &m.tiles) {
                let j0 = kt * g.tk;
                let cols = (lk - j0).min(g.tk);
                for (row, src) in tile.chunks_exact(g.tk).enumerate() {
                    all[row * nk + j0..row * nk + j0 + cols].copy_from_slice(&src[..cols]);
                }
            }
            all
        }
    };
    let (mut dalibi, mut drel) = (Vec::new(), Vec::new());
    for m in chunks() {
        dalibi.resize(m.dalibi.len(), 0f64);
        drel.resize(m.drel.len(), 0f64);
        dalibi.iter_mut().zip(&m.dalibi).for_each(|(a, x)| *a += x);
        drel.iter_mut().zip(&m.drel).for_each(|(a, x)| *a += x);
    }
    Some(HeadMods { bias, dalibi, drel })
}

/// Adds the (b, kv head) sums into the caller's buffers, in (b, kv head) order, over the
/// dimensions the parameters broadcast over (batch rows always; heads for a bias shared
/// by all heads).
pub(super) fn params(
    spec: &ModSpec,
    head_mods: Vec<Option<HeadMods>>,
    (kv_heads, q_heads): (usize, usize),
    params: &Params,
    pg: ParamGradsMut,
) {
    if !spec.any() {
        return;
    }
    let hm: Vec<HeadMods> = head_mods.into_iter().flatten().collect();
    let group = spec.group;
    let at = |bhk: usize| (bhk / kv_heads, bhk % kv_heads);
    if let (Some(dst), Some([db, dh, dq, dk]), Some((gh, nq, nk))) =
        (pg.dbias, spec.bias, spec.bias_block())
    {
        dst.fill(0.0);
        for (bhk, m) in hm.iter().enumerate() {
            let (b, hk) = at(bhk);
            let bb = if db == 1 { 0 } else { b };
            for ghi in 0..gh {
                let hh = if dh == 1 { 0 } else { hk * group + ghi };
                let dst = &mut dst[(bb * dh + hh) * dq * dk..][..dq * dk];
                let src = &m.bias[ghi * nq * nk..(ghi + 1) * nq * nk];
                for (x, s) in dst.iter_mut().zip(src) {
                    *x += s;
                }
            }
        }
    }
    if let (Some(dst), true) = (pg.dalibi, spec.alibi) {
        let mut sum = vec![0f64; q_heads];
        for (bhk, m) in hm.iter().enumerate() {
            let hk = at(bhk).1;
            for (hi, x) in m.dalibi.iter().enumerate() {
                sum[hk * group + hi] += x;
            }
        }
        dst.iter_mut().zip(&sum).for_each(|(d, s)| *d = *s as f32);
    }
    if let (Some(dst), Some(_)) = (pg.drel, spec.buckets) {
        let nb = params.rel.map_or(0, |r| r.num_buckets());
        let mut sum = vec![0f64; nb * q_heads];
        for (bhk, m) in hm.iter().enumerate() {
            let hk = at(bhk).1;
            for n in 0..nb {
                for hi in 0..group {
                    sum[n * q_heads + hk * group + hi] += m.drel[n * group + hi];
                }
            }
        }
        dst.iter_mut().zip(&sum).for_each(|(d, s)| *d = *s as f32);
    }
}
