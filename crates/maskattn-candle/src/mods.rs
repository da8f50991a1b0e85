//! The score modifiers of the attention op (docs/design.md section 1, "Score modifiers"):
//! their tensors packed into one f32 vector for the kernels, and the "tap" op through which
//! their gradients reach candle's autograd.
//!
//! candle's `CustomOp3` takes three tensors, all of them q, k, v. The parameters (ALiBi
//! slopes `[H_q]`, sinks `[H_q]`, the T5 table `[N, H_q]`, a dense bias
//! `[B|1, H_q|1, L_q|1, L_k|1]`) are concatenated, flattened, into one tensor `pack`, and a
//! second op, the tap, takes `(out, pack)` and returns `out` unchanged. The tap is the only
//! consumer of the attention op's output, so its backward runs first: it calls the kernel
//! backward once, returns `d pack` and passes `d out` through, and leaves `dq, dk, dv` in a
//! stash that the attention op's backward takes instead of running the kernel again.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use maskattn::{Bias, ParamGradsMut, Params, RelBias};

/// T5 relative position biases: `table [num_buckets, H_q]` (trainable when a `Var`), the
/// bucket of key `j` for aligned query position `i'` being Hugging Face T5's
/// `_relative_position_bucket(j − i', bidirectional, num_buckets, max_distance)`.
#[derive(Clone, Debug)]
pub struct RelPos {
    pub table: Tensor,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub bidirectional: bool,
}

impl RelPos {
    pub fn new(table: Tensor, max_distance: usize, bidirectional: bool) -> Result<Self> {
        let (num_buckets, _) = table.dims2()?;
        Ok(RelPos {
            table,
            num_buckets,
            max_distance,
            bidirectional,
        })
    }
}

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
    pub fn new(opts: &crate::AttnOptions, heads: usize) -> Result<Self> {
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
        let (s, l) = crate::op::cpu(pack)?;
        let CpuStorage::F32(all) = crate::op::as_cpu(&s) else {
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
    fn grad_buffer(&self) -> Vec<f32> {
        vec![0f32; self.slots.len]
    }

    /// The parameter-gradient buffers the kernel writes: the wanted ones, within `buf`.
    fn grads_in<'a>(&self, buf: &'a mut [f32]) -> ParamGradsMut<'a> {
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

/// `dq, dk, dv` as the tap computed them, for the attention op's backward.
pub(crate) type Stash = Arc<Mutex<Option<(Tensor, Tensor, Tensor)>>>;

/// `(out, pack) → out`; its backward is the kernel backward (see the module comment).
pub(crate) struct Tap {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub attn: Arc<crate::op::AttnCore>,
    pub lse: Arc<OnceLock<Vec<f32>>>,
    pub stash: Stash,
}

impl CustomOp2 for Tap {
    fn name(&self) -> &'static str {
        "maskattn-modifier-tap"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The attention op's fresh output: contiguous from its start.
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| Error::Msg("maskattn: the tap needs a contiguous output".into()))?;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(x[a..b].to_vec()),
            CpuStorage::BF16(x) => CpuStorage::BF16(x[a..b].to_vec()),
            CpuStorage::F16(x) => CpuStorage::F16(x[a..b].to_vec()),
            other => {
                return Err(Error::Msg(format!(
                    "maskattn: unexpected output dtype {:?}",
                    other.dtype()
                )))
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        out: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .get()
            .ok_or_else(|| Error::Msg("maskattn: backward before forward".into()))?;
        let mods = &self.attn.mods;
        let mut dpack = mods.grad_buffer();
        let (dq, dk, dv) = self.attn.backward(
            (&self.q, &self.k, &self.v),
            out,
            lse,
            grad,
            mods.grads_in(&mut dpack),
        )?;
        *self.stash.lock().expect("the stash is never poisoned") = Some((dq, dk, dv));
        let dpack = Tensor::from_vec(dpack, pack.shape(), pack.device())?;
        Ok((
            out.track_op().then(|| grad.clone()),
            pack.track_op().then_some(dpack),
        ))
    }
}
