//! The oracle: docs/design.md section 1 written out literally, materialising the `L_q × L_k`
//! score matrix for one (batch row, head) at a time. Generic over the float type, so the
//! same code gives the f64 golden result and the "naive, same storage type" result whose
//! rounding error sets the tolerance of every kernel test. Never used for speed.
//!
//! It evaluates the mask pair by pair with [`Mask::allowed`], not through a block mask, so it
//! also checks block classification. Hidden pairs are *selected* away (never multiplied by
//! zero), so NaN in hidden keys or values cannot reach the result. Every score modifier
//! (soft-cap, bias, ALiBi, sinks, T5 relative positions) is applied pair by pair as the
//! formulas say, and the backward returns the modifiers' gradients as well.

use num_traits::Float;

use crate::bias::Bias;
use crate::error::Result;
use crate::mask::Mask;
use crate::params::{Dropout, Params};
use crate::score_mod::RelBias;
use crate::shape::AttnDims;
use crate::view::View;

/// Reference forward results: `out [B, H_q, L_q, d]`, `lse [B, H_q, L_q]` (−∞ for empty
/// rows without sinks, `sink_h` with them).
#[derive(Clone, Debug)]
pub struct RefForward<T> {
    pub out: Vec<T>,
    pub lse: Vec<T>,
}

/// Reference gradients: `dq` like q, `dk` and `dv` like k and v, and the gradients of the
/// score modifiers the call had.
#[derive(Clone, Debug)]
pub struct RefGrads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
    pub params: RefParamGrads<T>,
    /// For each entry of `params`, the sum of the absolute values of the terms summed into
    /// it (`|P_ij| (|z_ij dP_ij| + |D_i|)`, weighted as the entry weighs `dS_ij`): the scale
    /// of its rounding in any finite precision. A parameter gradient sums over every pair of
    /// the call, and where its terms cancel (its true value near 0: one key per row under
    /// dropout, say) a correct f32 kernel can only get to about `u √d` of this.
    pub magnitudes: RefParamGrads<T>,
}

/// Reference gradients of the score modifiers, shaped as in [`crate::ParamGrads`]: `Some`
/// for exactly the modifiers of the call's [`Params`] that have parameters.
#[derive(Clone, Debug, Default)]
pub struct RefParamGrads<T> {
    /// Shaped like the bias's dims.
    pub dbias: Option<Vec<T>>,
    /// `[H_q]`
    pub dalibi: Option<Vec<T>>,
    /// `[H_q]`
    pub dsinks: Option<Vec<T>>,
    /// `[num_buckets, H_q]`
    pub drel: Option<Vec<T>>,
}

/// Everything one (b, h) needs: scores, probabilities and the row statistics.
struct HeadProbs<T> {
    /// `P [L_q, L_k]`, 0 where hidden.
    p: Vec<T>,
    /// `tanh(z / c)` of the allowed pairs under soft-capping (empty without).
    tanh: Vec<T>,
    allowed: Vec<bool>,
    lse: Vec<T>,
}

fn to<T: Float>(x: f32) -> T {
    T::from(x).expect("f32 fits every float type")
}

struct Inputs<'a, 'b> {
    q: &'a View<'b>,
    k: &'a View<'b>,
    v: &'a View<'b>,
    bias: Option<&'a Bias<'b>>,
    dropout: Option<Dropout>,
    softcap: Option<f32>,
    alibi: Option<&'b [f32]>,
    sinks: Option<&'b [f32]>,
    rel: Option<RelBias<'b>>,
    mask: &'a Mask,
    dims: AttnDims,
    scale: f32,
}

impl Inputs<'_, '_> {
    /// The dropout weight `z_ij` (1 without dropout).
    fn z<T: Float>(&self, b: usize, h: usize, i: usize, j: usize) -> T {
        match &self.dropout {
            None => T::one(),
            Some(dr) if dr.keep(b, h, i, j, self.dims.q_heads, self.dims.lq) => {
                T::one() / (T::one() - to::<T>(dr.p()))
            }
            Some(_) => T::zero(),
        }
    }

    /// `j − i'`, with `i' = i + L_k − L_q`.
    fn offset(&self, i: usize, j: usize) -> i64 {
        j as i64 - (i as i64 + self.dims.lk as i64 - self.dims.lq as i64)
    }

    fn head_probs<T: Float>(&self, b: usize, h: usize) -> HeadProbs<T> {
        let AttnDims { lq, lk, d, .. } = self.dims;
        let hk = h / self.dims.group();
        let shape = self.dims.mask_shape();
        let mut x = vec![T::neg_infinity(); lq * lk];
        let mut tanh = vec![T::zero(); if self.softcap.is_some() { lq * lk } else { 0 }];
        let mut allowed = vec![false; lq * lk];
        for i in 0..lq {
            for j in 0..lk {
                if !self.mask.allowed(&shape, b, h, i, j) {
                    continue;
                }
                allowed[i * lk + j] = true;
                let mut dot = T::zero();
                for c in 0..d {
                    dot = dot + to::<T>(self.q.get(b, h, i, c)) * to::<T>(self.k.get(b, hk, j, c));
                }
                // z = s·(q·k); x = cap(z) + β − slope·|i' − j| + rel[bucket(j − i')]
                let mut xv = to::<T>(self.scale) * dot;
                if let Some(c) = self.softcap {
                    let t = (xv / to::<T>(c)).tanh();
                    tanh[i * lk + j] = t;
                    xv = to::<T>(c) * t;
                }
                if let Some(bs) = self.bias {
                    xv = xv + to(bs.get(b, h, i, j));
                }
                let rel = self.offset(i, j);
                if let Some(sl) = self.alibi {
                    xv = xv - to::<T>(sl[h]) * T::from(rel.unsigned_abs()).unwrap();
                }
                if let Some(rb) = &self.rel {
                    xv = xv + to(rb.get(rb.bucket(rel), h));
                }
                x[i * lk + j] = xv;
            }
        }
        let sink = self.sinks.map(|sk| to::<T>(sk[h]));
        let mut p = vec![T::zero(); lq * lk];
        let mut lse = vec![sink.unwrap_or(T::neg_infinity()); lq];
        for i in 0..lq {
            let row = &x[i * lk..(i + 1) * lk];
            // IEEE arithmetic on the allowed pairs: a NaN score makes the row's sum, and so
            // its LSE, NaN (`Float::max` alone would skip it, and a row of NaN scores would
            // pass for one that sees nothing).
            let m = row.iter().fold(T::neg_infinity(), |a, &b| {
                if a.is_nan() || b.is_nan() {
                    T::nan()
                } else {
                    a.max(b)
                }
            });
            if m == T::neg_infinity() {
                continue; // nothing visible: P = 0, LSE = −∞ (or the sink)
            }
            // The sink is one more term of the sum, with no value.
            let m = sink.map_or(m, |sk| if m.is_nan() { m } else { m.max(sk) });
            let sum = row.iter().fold(T::zero(), |a, &xv| a + (xv - m).exp());
            let sum = sink.map_or(sum, |sk| sum + (sk - m).exp());
            lse[i] = m + sum.ln();
            for j in 0..lk {
                if allowed[i * lk + j] {
                    p[i * lk + j] = (row[j] - lse[i]).exp();
                }
            }
        }
        HeadProbs {
            p,
            tanh,
            allowed,
            lse,
        }
    }

    fn forward<T: Float>(&self) -> RefForward<T> {
        let AttnDims {
            batch,
            q_heads,
            lq,
            lk,
            d,
            ..
        } = self.dims;
        let mut out = vec![T::zero(); batch * q_heads * lq * d];
        let mut lse = vec![T::zero(); batch * q_heads * lq];
        for b in 0..batch {
            for h in 0..q_heads {
                let hk = h / self.dims.group();
                let hp = self.head_probs::<T>(b, h);
                let bh = b * q_heads + h;
                lse[bh * lq..(bh + 1) * lq].copy_from_slice(&hp.lse);
                for i in 0..lq {
                    for j in (0..lk).filter(|&j| hp.allowed[i * lk + j]) {
                        let w = hp.p[i * lk + j] * self.z::<T>(b, h, i, j);
                        for c in 0..d {
                            let o = &mut out[(bh * lq + i) * d + c];
                            *o = *o + w * to::<T>(self.v.get(b, hk, j, c));
                        }
                    }
                }
            }
        }
        RefForward { out, lse }
    }

    fn backward<T: Float>(&self, dout: &View) -> RefGrads<T> {
        let AttnDims {
            batch,
            q_heads,
            kv_heads,
            lq,
            lk,
            d,
        } = self.dims;
        let s = to::<T>(self.scale);
        let fwd = self.forward::<T>();
        let mut dq = vec![T::zero(); batch * q_heads * lq * d];
        let mut dk = vec![T::zero(); batch * kv_heads * lk * d];
        let mut dv = vec![T::zero(); batch * kv_heads * lk * d];
        let zeros = |n: usize| vec![T::zero(); n];
        let mut pg = RefParamGrads {
            dbias: self.bias.map(|bs| zeros(bs.dims().iter().product())),
            dalibi: self.alibi.map(|_| zeros(q_heads)),
            dsinks: self.sinks.map(|_| zeros(q_heads)),
            drel: self.rel.map(|rb| zeros(rb.num_buckets() * q_heads)),
        };
        let mut mg = pg.clone();
        for b in 0..batch {
            for h in 0..q_heads {
                let hk = h / self.dims.group();
                let hp = self.head_probs::<T>(b, h);
                let (bh, bhk) = (b * q_heads + h, b * kv_heads + hk);
                let d_o = |i: usize, c: usize| to::<T>(dout.get(b, h, i, c));
                for i in 0..lq {
                    // D_i = dO_i · O_i
                    let mut di = T::zero();
                    for c in 0..d {
                        di = di + d_o(i, c) * fwd.out[(bh * lq + i) * d + c];
                    }
                    let row_allows = (0..lk).any(|j| hp.allowed[i * lk + j]);
                    // dsink_h −= e^{sink − LSE_i} D_i, over the rows that allow something
                    // (a row that allows nothing has LSE = sink whatever the sink: no gradient).
                    if let (Some(ds), Some(sk), true) = (&mut pg.dsinks, self.sinks, row_allows) {
                        let t = (to::<T>(sk[h]) - hp.lse[i]).exp() * di;
                        ds[h] = ds[h] - t;
                        let m = mg.dsinks.as_mut().unwrap();
                        m[h] = m[h] + t.abs();
                    }
                    for j in (0..lk).filter(|&j| hp.allowed[i * lk + j]) {
                        let pij = hp.p[i * lk + j];
                        let z = self.z::<T>(b, h, i, j);
                        // dV_j += P_ij z_ij dO_i ; dP_ij = z_ij (dO_i · v_j)
                        let mut dp = T::zero();
                        for c in 0..d {
                            let g = &mut dv[(bhk * lk + j) * d + c];
                            *g = *g + pij * z * d_o(i, c);
                            dp = dp + d_o(i, c) * to::<T>(self.v.get(b, hk, j, c));
                        }
                        // dS_ij = P_ij (dP_ij − D_i): the gradient of x_ij, and so of every
                        // additive term.
                        let ds = pij * (z * dp - di);
                        let ds_mag = pij.abs() * ((z * dp).abs() + di.abs());
                        let rel = self.offset(i, j);
                        let dist = T::from(rel.unsigned_abs()).unwrap();
                        if let (Some(g), Some(bs)) = (&mut pg.dbias, self.bias) {
                            let at = bs.index(b, h, i, j);
                            g[at] = g[at] + ds;
                            let m = mg.dbias.as_mut().unwrap();
                            m[at] = m[at] + ds_mag;
                        }
                        if let Some(g) = &mut pg.dalibi {
                            g[h] = g[h] - ds * dist;
                            let m = mg.dalibi.as_mut().unwrap();
                            m[h] = m[h] + ds_mag * dist;
                        }
                        if let (Some(g), Some(rb)) = (&mut pg.drel, &self.rel) {
                            let at = rb.bucket(rel) * q_heads + h;
                            g[at] = g[at] + ds;
                            let m = mg.drel.as_mut().unwrap();
                            m[at] = m[at] + ds_mag;
                        }
                        // Through the cap: dz = dS · (1 − tanh²(z / c)).
                        let dz = if self.softcap.is_some() {
                            let t = hp.tanh[i * lk + j];
                            ds * (T::one() - t * t)
                        } else {
                            ds
                        };
                        // dQ_i += s dz k_j; dK_j += s dz q_i
                        for c in 0..d {
                            let g = &mut dq[(bh * lq + i) * d + c];
                            *g = *g + s * dz * to::<T>(self.k.get(b, hk, j, c));
                            let g = &mut dk[(bhk * lk + j) * d + c];
                            *g = *g + s * dz * to::<T>(self.q.get(b, h, i, c));
                        }
                    }
                }
            }
        }
        RefGrads {
            dq,
            dk,
            dv,
            params: pg,
            magnitudes: mg,
        }
    }
}

/// Reference forward in float type `T`.
pub fn forward<T: Float>(
    q: &View,
    k: &View,
    v: &View,
    mask: &Mask,
    params: &Params,
) -> Result<RefForward<T>> {
    Ok(inputs(q, k, v, mask, params)?.forward())
}

/// Reference gradients in float type `T`, given the output gradient `dout` (shaped like q):
/// of q, k, v and of every score modifier in `params` that has parameters.
pub fn backward<T: Float>(
    q: &View,
    k: &View,
    v: &View,
    mask: &Mask,
    params: &Params,
    dout: &View,
) -> Result<RefGrads<T>> {
    let inp = inputs(q, k, v, mask, params)?;
    inp.dims.check_like_q("dout", dout)?;
    Ok(inp.backward(dout))
}

fn inputs<'a, 'b>(
    q: &'a View<'b>,
    k: &'a View<'b>,
    v: &'a View<'b>,
    mask: &'a Mask,
    params: &'a Params<'b>,
) -> Result<Inputs<'a, 'b>> {
    let dims = AttnDims::of(q, k, v)?;
    let bias = params.bias.as_ref();
    dims.check_bias(bias)?;
    params.check_mods(dims.q_heads)?;
    mask.validate(&dims.mask_shape())?;
    let scale = dims.scale(params.scale)?;
    Ok(Inputs {
        q,
        k,
        v,
        bias,
        dropout: params.dropout,
        softcap: params.softcap,
        alibi: params.alibi,
        sinks: params.sinks,
        rel: params.rel,
        mask,
        dims,
        scale,
    })
}

/// How a kernel's result compares with the golden one under the accuracy rule of
/// docs/design.md section 4: `|kernel − golden|max ≤ 2 · |naive − golden|max + eps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    /// `|kernel − golden|max` over finite golden entries.
    pub kernel_err: f64,
    /// `|naive − golden|max`: the ordinary rounding of the storage type.
    pub naive_err: f64,
    pub bound: f64,
    /// Index of the kernel's worst entry.
    pub worst: usize,
    /// The rule holds, and every −∞ of golden (an empty row's LSE) is exactly −∞ in the
    /// kernel, and every other kernel entry is finite.
    pub ok: bool,
}

/// Applies the accuracy rule to one result.
pub fn accuracy(kernel: &[f32], golden: &[f64], naive: &[f32], eps: f64) -> Accuracy {
    assert_eq!(
        kernel.len(),
        golden.len(),
        "kernel and golden lengths differ"
    );
    assert_eq!(naive.len(), golden.len(), "naive and golden lengths differ");
    let (mut kernel_err, mut naive_err, mut worst, mut ok) = (0f64, 0f64, 0, true);
    for (idx, ((&k, &g), &n)) in kernel.iter().zip(golden).zip(naive).enumerate() {
        if g == f64::NEG_INFINITY {
            ok &= k == f32::NEG_INFINITY;
            continue;
        }
        ok &= k.is_finite();
        let e = (k as f64 - g).abs();
        if e > kernel_err || !k.is_finite() {
            kernel_err = if k.is_finite() { e } else { f64::INFINITY };
            worst = idx;
        }
        naive_err = naive_err.max((n as f64 - g).abs());
    }
    let bound = 2.0 * naive_err + eps;
    Accuracy {
        kernel_err,
        naive_err,
        bound,
        worst,
        ok: ok && kernel_err <= bound,
    }
}

/// `ε` of the accuracy rule for `f32` storage.
pub const EPS_F32: f64 = 1e-5;
