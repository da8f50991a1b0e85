//! The score modifiers of the attention op (docs/design.md section 1, "Score modifiers"),
//! packed into one f32 vector for the kernels.
//!
//! candle's `CustomOp3` takes three tensors, all of them q, k, v. The parameters (ALiBi
//! slopes `[H_q]`, sinks `[H_q]`, the T5 table `[N, H_q]`, a dense bias
//! `[B|1, H_q|1, L_q|1, L_k|1]`) are concatenated, flattened, into one tensor `pack`, which
//! the op's "tap" (in `op.rs`, beside the op whose backward it serves) takes with the
//! output, so that their gradients reach candle's autograd.

use std::ops::Range;

use candle_core::{CpuStorage, DType, Error, Result, Tensor};
use maskattn::{Bias, ParamGradsMut, Params, RelBias};

use crate::options::AttnOptions;
use crate::storage::{as_cpu, cpu};

/// Where each parameter lies in the pack, and whether autograd wants its gradient.
#[derive(Clone, Debug, Default)]
struct Slots {
    alibi: Option<Range<usize>>,
    sinks: Option<Range<usize>>,
    rel: Option<(Range<usize>, usize, usize, bool)>,
    bias: Option<(Range<usize>, [usize; 4])>,
    /// Per slot, in the order alibi, sinks, rel, bias: the tensor is tracked by autograd.
    tracked: [bool; 4],
    len: usize,
}

/// The modifiers of one call as the kernels take them.
#[derive(Clone, Debug)]
pub(crate) struct Mods {
    softcap: Option<f32>,
    /// Contiguous f32 `[len]`: alibi, sinks, rel table, bias, each flattened, those present.
    pack: Option<Tensor>,
    slots: Slots,
}

impl Mods {
    /// Packs the parameters of `opts` for a call with `heads` query heads.
    pub fn new(opts: &AttnOptions, heads: usize) -> Result<Self> {
        let mut slots = Slots::default();
        let mut parts: Vec<Tensor> = Vec::new();
        let mut add = |t: &Tensor, what: &str, slot: usize, parts: &mut Vec<Tensor>| {
            if t.dtype() != DType::F32 {
                return Err(Error::Msg(format!(
                    "maskattn: {what} must be f32, got {:?}",
                    t.dtype()
                )));
            }
            let start = slots.len;
            slots.len += t.elem_count();
            slots.tracked[slot] = t.track_op();
            parts.push(t.flatten_all()?);
            Ok(start..slots.len)
        };
        let per_head = |t: &Tensor, what: &str| -> Result<()> {
            if t.dims() != [heads] {
                return Err(Error::Msg(format!(
                    "maskattn: {what} must be [H_q] = [{heads}], got {:?}",
                    t.dims()
                )));
            }
            Ok(())
        };
        if let Some(a) = &opts.alibi {
            per_head(a, "alibi slopes")?;
            slots.alibi = Some(add(a, "alibi slopes", 0, &mut parts)?);
        }
        if let Some(s) = &opts.sinks {
            per_head(s, "sinks")?;
            slots.sinks = Some(add(s, "sinks", 1, &mut parts)?);
        }
        if let Some(r) = &opts.rel {
            if r.table.dims() != [r.num_buckets, heads] {
                return Err(Error::Msg(format!(
                    "maskattn: the relative position table must be [num_buckets, H_q] = [{}, {heads}], got {:?}",
                    r.num_buckets,
                    r.table.dims()
                )));
            }
            let range = add(&r.table, "the relative position table", 2, &mut parts)?;
            slots.rel = Some((range, r.num_buckets, r.max_distance, r.bidirectional));
        }
        if let Some(b) = &opts.bias {
            let dims: [usize; 4] = b.dims().try_into().map_err(|_| {
                Error::Msg(format!(
                    "maskattn: bias must be 4-d [B|1, H_q|1, L_q, L_k], got {:?}",
                    b.dims()
                ))
            })?;
            slots.bias = Some((add(b, "bias", 3, &mut parts)?, dims));
        }
        let pack = match parts.len() {
            0 => None,
            1 => Some(parts.pop().expect("one part").contiguous()?),
            _ => Some(Tensor::cat(&parts, 0)?),
        };
        Ok(Mods {
            softcap: opts.softcap,
            pack,
            slots,
        })
    }

    /// Whether autograd wants the gradient of any parameter (then the tap runs).
    pub fn trainable(&self) -> bool {
        self.slots.tracked.iter().any(|&t| t)
    }

    pub fn pack(&self) -> Option<&Tensor> {
        self.pack.as_ref()
    }

    /// Runs `f` with the kernel parameters of this call (its scale and dropout added).
    pub fn with_params<R>(
        &self,
        base: Params<'static>,
        f: impl FnOnce(&Params) -> Result<R>,
    ) -> Result<R> {
        let Some(pack) = &self.pack else {
            return f(&Params {
                softcap: self.softcap,
                ..base
            });
        };
        let (s, l) = cpu(pack)?;
        let CpuStorage::F32(all) = as_cpu(&s) else {
            unreachable!("packed as f32")
        };
        let all = &all[l.start_offset()..l.start_offset() + self.slots.len];
        let s = &self.slots;
        let mut p = Params {
            softcap: self.softcap,
            ..base
        };
        p.alibi = s.alibi.clone().map(|r| &all[r]);
        p.sinks = s.sinks.clone().map(|r| &all[r]);
        if let Some((r, n, m, bi)) = &s.rel {
            p.rel = Some(RelBias::new(&all[r.clone()], *n, *m, *bi).map_err(Error::wrap)?);
        }
        if let Some((r, dims)) = &s.bias {
            p.bias = Some(Bias::new(&all[r.clone()], *dims).map_err(Error::wrap)?);
        }
        f(&p)
    }

    /// A zeroed gradient buffer shaped like the pack.
    pub fn grad_buffer(&self) -> Vec<f32> {
        vec![0f32; self.slots.len]
    }

    /// The parameter-gradient buffers the kernel writes: the wanted ones, within `buf`.
    pub fn grads_in<'a>(&self, buf: &'a mut [f32]) -> ParamGradsMut<'a> {
        let s = &self.slots;
        // The slots are in pack order and disjoint: split the buffer front to back.
        let mut rest = buf;
        let mut at = 0;
        let mut take = |r: &Range<usize>, want: bool| -> Option<&'a mut [f32]> {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
            let (mine, tail) = tail.split_at_mut(r.len());
            rest = tail;
            at = r.end;
            want.then_some(mine)
        };
        let dalibi = s.alibi.as_ref().and_then(|r| take(r, s.tracked[0]));
        let dsinks = s.sinks.as_ref().and_then(|r| take(r, s.tracked[1]));
        let drel = s.rel.as_ref().and_then(|(r, ..)| take(r, s.tracked[2]));
        let dbias = s.bias.as_ref().and_then(|(r, _)| take(r, s.tracked[3]));
        ParamGradsMut {
            dbias,
            dalibi,
            dsinks,
            drel,
        }
    }
}
