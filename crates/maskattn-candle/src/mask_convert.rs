//! Explicit conversions from other frameworks' mask conventions into a [`Mask`], whose
//! polarity is always `true` = may attend. Each function's name says which convention it
//! reads; none takes a "flip" flag. Polarity bugs are the most common attention bug, so
//! each of these has its own tests.

use candle_core::{DType, Error, Result, Tensor};
use maskattn::{DenseMask, Mask};

fn bad(m: String) -> Error {
    Error::Msg(format!("mask conversion: {m}"))
}

/// Values of a 0/1 (or bool) tensor as `bool`s: non-zero = `true`.
fn nonzero(t: &Tensor) -> Result<Vec<bool>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x != 0.0)
        .collect())
}

/// A tensor of rank 2 to 4 as dense dims `[B|1, H|1, L_q, L_k]`.
fn dims4(t: &Tensor) -> Result<[usize; 4]> {
    match *t.dims() {
        [lq, lk] => Ok([1, 1, lq, lk]),
        [b, lq, lk] => Ok([b, 1, lq, lk]),
        [b, h, lq, lk] => Ok([b, h, lq, lk]),
        ref d => Err(bad(format!(
            "expected a mask of rank 2 to 4, got shape {d:?}"
        ))),
    }
}

fn dense(allowed: Vec<bool>, dims: [usize; 4]) -> Result<Mask> {
    Ok(Mask::dense(
        DenseMask::new(allowed, dims).map_err(Error::wrap)?,
    ))
}

/// PyTorch `nn.MultiheadAttention`'s `key_padding_mask` `[B, L_k]`: `true` (non-zero) means
/// *ignore* this key.
pub fn from_torch_key_padding(ignore: &Tensor) -> Result<Mask> {
    let (b, _) = ignore.dims2()?;
    let keep = nonzero(ignore)?.into_iter().map(|x| !x).collect::<Vec<_>>();
    Ok(Mask::key_keep(keep, b))
}

/// Hugging Face `attention_mask` `[B, L_k]`: 1 = a real token, 0 = padding (the same
/// polarity as ours).
pub fn from_hf_attention_mask(mask: &Tensor) -> Result<Mask> {
    let (b, _) = mask.dims2()?;
    Ok(Mask::key_keep(nonzero(mask)?, b))
}

/// PyTorch `nn.MultiheadAttention`'s boolean `attn_mask` `[L_q, L_k]` (or `[B·H, L_q, L_k]`,
/// pass `heads`): `true` means *not allowed*. (Careful: `scaled_dot_product_attention`'s
/// boolean mask means the opposite; see [`from_sdpa_bool_mask`].)
pub fn from_torch_mha_attn_mask(mask: &Tensor, heads: usize) -> Result<Mask> {
    let allowed = nonzero(mask)?.into_iter().map(|x| !x).collect();
    let dims = match *mask.dims() {
        [lq, lk] => [1, 1, lq, lk],
        [bh, lq, lk] if heads > 0 && bh % heads == 0 => [bh / heads, heads, lq, lk],
        ref d => return Err(bad(format!("attn_mask of shape {d:?} with {heads} heads"))),
    };
    dense(allowed, dims)
}

/// PyTorch `scaled_dot_product_attention`'s boolean `attn_mask` (rank 2 to 4, broadcast):
/// `true` means *takes part in attention*.
pub fn from_sdpa_bool_mask(mask: &Tensor) -> Result<Mask> {
    dense(nonzero(mask)?, dims4(mask)?)
}

/// The u8 masks of candle's examples (rank 2 to 4): 1 = masked out (hidden), 0 = visible.
pub fn from_candle_u8(mask: &Tensor) -> Result<Mask> {
    let allowed = nonzero(mask)?.into_iter().map(|x| !x).collect();
    dense(allowed, dims4(mask)?)
}

/// An additive float mask (rank 2 to 4): 0 = visible; `−∞` or anything at or below
/// `f32::MIN / 2` (the `f32::MIN` / `finfo.min` of many models) = hidden. Other values are a
/// bias, not a mask: they are rejected (pass them as a bias instead).
pub fn from_additive(mask: &Tensor) -> Result<Mask> {
    let vals = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let allowed = vals
        .iter()
        .map(|&x| {
            if x == 0.0 {
                Ok(true)
            } else if x <= f32::MIN / 2.0 {
                Ok(false)
            } else {
                Err(bad(format!(
                    "additive mask holds {x}: only 0 (visible) and -inf / very negative (hidden) are a mask; other values are a bias"
                )))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    dense(allowed, dims4(mask)?)
}
