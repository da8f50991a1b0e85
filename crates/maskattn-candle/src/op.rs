//! Masked attention as a candle op with autograd: the forward runs the maskattn forward
//! kernel, the backward runs the maskattn backward kernel with the forward's `LSE`.
//!
//! Shapes: `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]`, any strides (a `[B, L, H, d]`
//! projection viewed through `transpose(1, 2)` is read in place, not copied). f32, bf16 and
//! f16 tensors work; results are rounded back to the input type (bf16 goes to the CPU's
//! bf16 dot products where it has them, f16 is computed in f32; see the kernel crate).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use maskattn::half::{bf16, f16};
use maskattn::{BlockMask, Dropout, Element, GradsMut, Mask, ParamGradsMut, Params, View};

use crate::mods::Mods;
use crate::options::AttnOptions;
use crate::storage::{as_cpu, cpu};

/// Runs `$body` with q, k, v as slices of their common storage type, `$to` converting an
/// f32 to it and `$wrap` making a candle storage of it.
macro_rules! by_dtype {
    ($s1:expr, $s2:expr, $s3:expr, |$q:ident, $k:ident, $v:ident, $to:ident, $wrap:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32($q), CpuStorage::F32($k), CpuStorage::F32($v)) => {
                let $to = |x: f32| x;
                let $wrap = CpuStorage::F32;
                $body
            }
            (CpuStorage::BF16($q), CpuStorage::BF16($k), CpuStorage::BF16($v)) => {
                let $to = bf16::from_f32;
                let $wrap = CpuStorage::BF16;
                $body
            }
            (CpuStorage::F16($q), CpuStorage::F16($k), CpuStorage::F16($v)) => {
                let $to = f16::from_f32;
                let $wrap = CpuStorage::F16;
                $body
            }
            (a, b, c) => Err(Error::Msg(format!(
                "maskattn: q, k, v must share one of f32, bf16, f16; got {:?}, {:?}, {:?}",
                a.dtype(),
                b.dtype(),
                c.dtype()
            ))),
        }
    };
}

/// The results of [`attention`]: `out [B, H_q, L_q, d]` (tracked by autograd) and
/// `lse [B, H_q, L_q]` (f32, −∞ for rows that see nothing, the sink's term included;
/// not differentiable).
#[derive(Clone, Debug)]
pub struct Attention {
    pub out: Tensor,
    pub lse: Tensor,
}

/// Masked attention with autograd; compiles `mask` for the call's shape.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    opts: AttnOptions,
) -> Result<Attention> {
    let (b, hq, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let block =
        BlockMask::new(mask, maskattn::MaskShape::new(b, hq, lq, lk)).map_err(Error::wrap)?;
    attention_with_block(q, k, v, Arc::new(block), opts)
}

/// Masked attention with autograd and a block mask compiled beforehand (reuse one across
/// calls and layers of the same shape).
pub fn attention_with_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    block: Arc<BlockMask>,
    opts: AttnOptions,
) -> Result<Attention> {
    let (b, hq, lq, _) = q.dims4()?;
    if !q.device().is_cpu() {
        return Err(Error::Msg(
            "maskattn: only the CPU device is supported".into(),
        ));
    }
    let mods = Mods::new(&opts, hq)?;
    // The tap only where a parameter wants a gradient; otherwise one op, as without modifiers.
    let tap = mods.trainable() && mods.pack().is_some();
    let stash: Option<Stash> = tap.then(Default::default);
    let lse = Arc::new(OnceLock::new());
    let core = Arc::new(AttnCore {
        block,
        scale: opts.scale,
        dropout: opts.dropout,
        mods,
    });
    let op = AttnOp {
        core: core.clone(),
        lse: lse.clone(),
        stash: stash.clone(),
    };
    let mut out = q.apply_op3(k, v, op)?;
    if let Some(stash) = stash {
        let pack = core.mods.pack().expect("checked above").clone();
        let tap = Tap {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            attn: core,
            lse: lse.clone(),
            stash,
        };
        out = out.apply_op2(&pack, tap)?;
    }
    let lse = lse
        .get()
        .ok_or_else(|| Error::Msg("maskattn: the forward did not run".into()))?
        .clone();
    let lse = Tensor::from_vec(lse, (b, hq, lq), q.device())?;
    Ok(Attention { out, lse })
}

thread_local! {
    /// Kernel backward calls made on this thread (candle runs a backward pass on the thread
    /// that calls it).
    static BACKWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has run the kernel backward through the op: one per
/// `backward()` of a loss over one attention call, with or without modifiers (for tests).
#[doc(hidden)]
pub fn kernel_backward_calls() -> usize {
    BACKWARDS.with(|c| c.get())
}

/// What the attention op and the tap share: the block mask and the kernel parameters.
pub(crate) struct AttnCore {
    block: Arc<BlockMask>,
    scale: Option<f32>,
    dropout: Option<Dropout>,
    pub(crate) mods: Mods,
}

impl AttnCore {
    fn base(&self) -> Params<'static> {
        Params {
            scale: self.scale,
            dropout: self.dropout,
            ..Default::default()
        }
    }

    /// The kernel backward: `dq, dk, dv` as tensors of q's, k's and v's dtypes, and the
    /// parameter gradients asked for in `params` written there.
    pub(crate) fn backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        res: &Tensor,
        lse: &[f32],
        grad_res: &Tensor,
        params: ParamGradsMut<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        BACKWARDS.with(|c| c.set(c.get() + 1));
        // The kernel reads the output and its gradient as f32.
        let (out, dout) = (res.to_dtype(DType::F32)?, grad_res.to_dtype(DType::F32)?);
        let (os, ol) = cpu(&out)?;
        let (gs, gl) = cpu(&dout)?;
        let (CpuStorage::F32(o), CpuStorage::F32(g)) = (as_cpu(&os), as_cpu(&gs)) else {
            unreachable!("converted to f32 above")
        };
        let (ov, gv) = (view("out", o, ol)?, view("dout", g, gl)?);
        let (qs, ql) = cpu(q)?;
        let (ks, kl) = cpu(k)?;
        let (vs, vl) = cpu(v)?;
        let shape = |t: &Tensor| -> Result<[usize; 4]> {
            let (a, b, c, d) = t.dims4()?;
            Ok([a, b, c, d])
        };
        let (qd, kd) = (shape(q)?, shape(k)?);
        let n = |s: [usize; 4]| s.iter().product::<usize>();
        let (mut dq, mut dk, mut dv) = (vec![0f32; n(qd)], vec![0f32; n(kd)], vec![0f32; n(kd)]);
        let grads = GradsMut {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            params,
        };
        self.mods.with_params(self.base(), |p| {
            by_dtype!(
                as_cpu(&qs),
                as_cpu(&ks),
                as_cpu(&vs),
                |qb, kb, vb, _to, _wrap| {
                    let (qv, kv, vv) = (view("q", qb, ql)?, view("k", kb, kl)?, view("v", vb, vl)?);
                    maskattn::backward_into(
                        &maskattn::Qkv::new(&qv, &kv, &vv),
                        &ov,
                        lse,
                        &gv,
                        &self.block,
                        p,
                        grads,
                    )
                    .map_err(Error::wrap)
                }
            )
        })?;
        let make = |data: Vec<f32>, shape: [usize; 4], like: &Tensor| -> Result<Tensor> {
            Tensor::from_vec(data, shape.to_vec(), like.device())?.to_dtype(like.dtype())
        };
        Ok((make(dq, qd, q)?, make(dk, kd, k)?, make(dv, kd, v)?))
    }
}

struct AttnOp {
    core: Arc<AttnCore>,
    /// Written by the forward, read by the backward.
    lse: Arc<OnceLock<Vec<f32>>>,
    /// With trainable modifiers: where the tap's backward leaves `dq, dk, dv`.
    stash: Option<Stash>,
}

/// A strided maskattn view of a candle CPU buffer.
fn view<'a, T: Element>(name: &'static str, data: &'a [T], l: &Layout) -> Result<View<'a, T>> {
    let shape: [usize; 4] = l.dims().try_into().map_err(|_| {
        Error::Msg(format!(
            "maskattn: {name} must be 4-d [B, H, L, d], got {:?}",
            l.dims()
        ))
    })?;
    let strides: [usize; 4] = l.stride().try_into().expect("4-d layout has 4 strides");
    View::strided(name, &data[l.start_offset()..], shape, strides).map_err(Error::wrap)
}

impl CustomOp3 for AttnOp {
    fn name(&self) -> &'static str {
        "maskattn-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, s2, s3, |q, k, v, to, wrap| {
            let (qv, kv, vv) = (view("q", q, l1)?, view("k", k, l2)?, view("v", v, l3)?);
            let f = self.core.mods.with_params(self.core.base(), |p| {
                maskattn::forward(&qv, &kv, &vv, &self.core.block, p).map_err(Error::wrap)
            })?;
            // `into_iter().map().collect()` reuses the buffer: no copy of an f32 output.
            let out: Vec<_> = f.out.into_iter().map(to).collect();
            let _ = self.lse.set(f.lse);
            Ok((wrap(out), Shape::from(qv.shape().to_vec())))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The tap, the only consumer of this op's output, ran its backward first.
        if let Some(stash) = &self.stash {
            if let Some((dq, dk, dv)) = stash.lock().expect("never poisoned").take() {
                return Ok((Some(dq), Some(dk), Some(dv)));
            }
        }
        let lse = self
            .lse
            .get()
            .ok_or_else(|| Error::Msg("maskattn: backward before forward".into()))?;
        let (dq, dk, dv) =
            self.core
                .backward((q, k, v), res, lse, grad_res, ParamGradsMut::default())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `dq, dk, dv` as the tap computed them, for the attention op's backward.
pub(crate) type Stash = Arc<Mutex<Option<(Tensor, Tensor, Tensor)>>>;

/// `(out, pack) → out`, the op's autograd half where a score modifier is trainable: its
/// backward is the kernel backward.
///
/// candle's `CustomOp3` takes three tensors, all of them q, k, v; the modifiers' tensors
/// travel packed in one (`mods.rs`). The tap takes `(out, pack)` and returns `out`
/// unchanged. It is the only consumer of the attention op's output, so its backward runs
/// first: it calls the kernel backward once, returns `d pack` and passes `d out` through,
/// and leaves `dq, dk, dv` in a stash that [`AttnOp`]'s backward takes instead of running
/// the kernel again.
pub(crate) struct Tap {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub attn: Arc<AttnCore>,
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
