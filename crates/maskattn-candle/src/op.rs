//! Masked attention as a candle op with autograd: the forward runs the maskattn forward
//! kernel, the backward runs the maskattn backward kernel with the forward's `LSE`.
//!
//! Shapes: `q [B, H_q, L_q, d]`, `k, v [B, H_kv, L_k, d]`, any strides (a `[B, L, H, d]`
//! projection viewed through `transpose(1, 2)` is read in place, not copied). f32, bf16 and
//! f16 tensors work; results are rounded back to the input type (bf16 goes to the CPU's
//! bf16 dot products where it has them, f16 is computed in f32; see the kernel crate).

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Storage, Tensor};
use maskattn::half::{bf16, f16};
use maskattn::{BlockMask, Dropout, Element, Mask, Params, View};

/// What [`attention`] takes besides tensors and mask.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnOptions {
    /// Score scale; `None` means `1/sqrt(d)`.
    pub scale: Option<f32>,
    /// Attention dropout (training); see [`maskattn::Dropout`].
    pub dropout: Option<Dropout>,
}

/// The results of [`attention`]: `out [B, H_q, L_q, d]` (tracked by autograd) and
/// `lse [B, H_q, L_q]` (f32, −∞ for rows that see nothing; not differentiable).
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
    let lse = Arc::new(OnceLock::new());
    let op = AttnOp {
        block,
        opts,
        lse: lse.clone(),
    };
    let out = q.apply_op3(k, v, op)?;
    let lse = lse
        .get()
        .ok_or_else(|| Error::Msg("maskattn: the forward did not run".into()))?
        .clone();
    let lse = Tensor::from_vec(lse, (b, hq, lq), q.device())?;
    Ok(Attention { out, lse })
}

struct AttnOp {
    block: Arc<BlockMask>,
    opts: AttnOptions,
    /// Written by the forward, read by the backward.
    lse: Arc<OnceLock<Vec<f32>>>,
}

impl AttnOp {
    fn params(&self) -> Params<'static> {
        Params {
            scale: self.opts.scale,
            bias: None,
            dropout: self.opts.dropout,
            ..Default::default()
        }
    }
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

/// The CPU buffer of a tensor as a candle storage guard.
fn cpu(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, &Layout)> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(_) => Ok((s, l)),
        _ => Err(Error::Msg(
            "maskattn: only the CPU device is supported".into(),
        )),
    }
}

fn as_cpu(s: &Storage) -> &CpuStorage {
    match s {
        Storage::Cpu(c) => c,
        _ => unreachable!("checked by `cpu`"),
    }
}

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
            let f = maskattn::forward(&qv, &kv, &vv, &self.block, &self.params())
                .map_err(Error::wrap)?;
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
        let lse = self
            .lse
            .get()
            .ok_or_else(|| Error::Msg("maskattn: backward before forward".into()))?;
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
        let grads = by_dtype!(
            as_cpu(&qs),
            as_cpu(&ks),
            as_cpu(&vs),
            |qd, kd, vd, _to, _wrap| {
                let (qv, kv, vv) = (view("q", qd, ql)?, view("k", kd, kl)?, view("v", vd, vl)?);
                maskattn::backward(
                    &maskattn::Qkv::new(&qv, &kv, &vv),
                    &ov,
                    lse,
                    &gv,
                    &self.block,
                    &self.params(),
                )
                .map_err(Error::wrap)
            }
        )?;
        let dims = {
            let shape = |t: &Tensor| -> Result<[usize; 4]> {
                let (a, b, c, d) = t.dims4()?;
                Ok([a, b, c, d])
            };
            (shape(q)?, shape(k)?)
        };
        let make = |data: Vec<f32>, shape: [usize; 4], like: &Tensor| -> Result<Tensor> {
            Tensor::from_vec(data, shape.to_vec(), like.device())?.to_dtype(like.dtype())
        };
        Ok((
            Some(make(grads.dq, dims.0, q)?),
            Some(make(grads.dk, dims.1, k)?),
            Some(make(grads.dv, dims.1, v)?),
        ))
    }
}
