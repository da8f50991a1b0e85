//! `maskattn bench-layer`: the candle layer and the bare attention op against the same
//! computed with candle's own ops (matmul, mask, softmax), side by side in one run.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use maskattn_candle::{
    attention, reference, AttnOptions, MaskedMultiHeadAttention, MhaConfig, MhaOptions,
};

use crate::mask_expr;
use crate::measure::{elements, median_ms, try_data};

#[derive(Args, Debug)]
pub struct BenchLayerArgs {
    /// Shapes B,H,L,d to run (repeat the flag for several).
    #[arg(long, value_parser = crate::measure::parse_dims::<4>, default_values = ["4,8,512,64", "4,8,2048,64"])]
    pub shape: Vec<[usize; 4]>,
    /// Mask expression (structured terms only: no data terms).
    #[arg(long, default_value = "causal", long_help = crate::mask_expr::syntax())]
    pub mask: String,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        try_data(elements("shape", shape)?, seed)?,
        shape,
        &Device::Cpu,
    )?)
}

struct NoData;
impl mask_expr::MaskData for NoData {
    fn key_padding(&self) -> Result<maskattn::Mask> {
        anyhow::bail!("bench-layer takes structured masks only (no key-padding)")
    }
    fn documents(&self) -> Result<maskattn::Mask> {
        anyhow::bail!("bench-layer takes structured masks only (no documents)")
    }
    fn dense(&self) -> Result<maskattn::Mask> {
        anyhow::bail!("bench-layer takes structured masks only (no dense)")
    }
}

pub fn run(args: &BenchLayerArgs) -> Result<()> {
    let mask = mask_expr::build(&mask_expr::parse(&args.mask)?, &NoData)?;
    println!(
        "{} threads; mask {}; median of {} runs; candle = the same with candle ops (matmul, mask, softmax)",
        rayon::current_num_threads(),
        args.mask,
        args.reps
    );
    println!(
        "{:<14} {:<10} {:<8} {:>10} {:>10} {:>7}",
        "B,H,L,d", "what", "pass", "maskattn", "candle", "ratio"
    );
    for &[b, h, l, d] in &args.shape {
        // The bare attention: q, k, v [B, H, L, d].
        let (q, k, v) = (
            tensor(&[b, h, l, d], 1)?,
            tensor(&[b, h, l, d], 2)?,
            tensor(&[b, h, l, d], 3)?,
        );
        let dout = tensor(&[b, h, l, d], 4)?;
        let (qv, kv, vv) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let ours = |bwd: bool| -> Result<()> {
            let out = attention(
                qv.as_tensor(),
                kv.as_tensor(),
                vv.as_tensor(),
                &mask,
                AttnOptions::default(),
            )?
            .out;
            if bwd {
                (out * &dout)?.sum_all()?.backward()?;
            }
            Ok(())
        };
        // The candle side gets its mask as a ready tensor, built outside the timing.
        let keep = reference::dense_mask(
            &mask,
            maskattn::MaskShape::new(b, h, l, l),
            DType::F32,
            &Device::Cpu,
        )?;
        let theirs = |bwd: bool| -> Result<()> {
            let out = reference::attention_with_keep(
                qv.as_tensor(),
                kv.as_tensor(),
                vv.as_tensor(),
                &keep,
                None,
            )?;
            if bwd {
                (out * &dout)?.sum_all()?.backward()?;
            }
            Ok(())
        };
        // The layer: x [B, L, H·d].
        let vm = VarMap::new();
        let layer = MaskedMultiHeadAttention::new(
            MhaConfig::new(h * d, h),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )?;
        let x = Var::from_tensor(&tensor(&[b, l, h * d], 5)?)?;
        let ldout = tensor(&[b, l, h * d], 6)?;
        let layer_run = |plain_attn: bool, bwd: bool| -> Result<()> {
            let xt = x.as_tensor();
            let out = if plain_attn {
                reference::mha_forward_with_keep(&layer, xt, xt, &keep)?
            } else {
                layer.forward(xt, &MhaOptions::new(&mask))?
            };
            if bwd {
                (out * &ldout)?.sum_all()?.backward()?;
            }
            Ok(())
        };
        for (what, pass, bwd) in [
            ("attention", "fwd", false),
            ("attention", "fwd+bwd", true),
            ("layer", "fwd", false),
            ("layer", "fwd+bwd", true),
        ] {
            let (a, c) = if what == "attention" {
                (
                    median_ms(args.reps, || ours(bwd))?,
                    median_ms(args.reps, || theirs(bwd))?,
                )
            } else {
                (
                    median_ms(args.reps, || layer_run(false, bwd))?,
                    median_ms(args.reps, || layer_run(true, bwd))?,
                )
            };
            println!(
                "{:<14} {:<10} {:<8} {:>8.2}ms {:>8.2}ms {:>6.1}x",
                format!("{b},{h},{l},{d}"),
                what,
                pass,
                a,
                c,
                c / a
            );
        }
    }
    Ok(())
}
