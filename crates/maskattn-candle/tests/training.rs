//! Training end to end: embedding → masked attention layer → linear head, AdamW, on a task
//! only the causal mask makes meaningful: predict the next token of sequences that repeat
//! with period K. Under a causal mask the answer for position i is token i + 1 − K, K − 1
//! positions back (rotary positions let the layer find it); without the mask the layer could
//! read token i + 1 itself.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{AdamW, Embedding, Linear, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use maskattn::{Mask, SplitMix64};
use maskattn_candle::{MaskedMultiHeadAttention, MhaConfig, MhaOptions, Mode};

const VOCAB: usize = 8;
const PERIOD: usize = 3;
const LEN: usize = 16;

/// `batch` sequences of period PERIOD from a seeded generator.
fn batch(seed: u64, batch: usize) -> Vec<Vec<u32>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % VOCAB as u64) as u32
    };
    (0..batch)
        .map(|_| {
            let head: Vec<u32> = (0..PERIOD).map(|_| next()).collect();
            (0..LEN).map(|i| head[i % PERIOD]).collect()
        })
        .collect()
}

struct Model {
    emb: Embedding,
    attn: MaskedMultiHeadAttention,
    head: Linear,
}

impl Model {
    fn logits(&self, tokens: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = self.emb.forward(tokens)?;
        let y = (self.attn.forward(
            &x,
            &MhaOptions {
                mode,
                ..MhaOptions::new(&Mask::causal())
            },
        )? + &x)?;
        self.head.forward(&y)
    }
}

/// Inputs and next-token targets for positions that can be predicted (i + 1 ≥ PERIOD).
fn tensors(seqs: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
    let inputs: Vec<u32> = seqs.iter().flat_map(|s| s[..LEN - 1].to_vec()).collect();
    let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].to_vec()).collect();
    let n = seqs.len();
    Ok((
        Tensor::from_vec(inputs, (n, LEN - 1), &Device::Cpu)?,
        Tensor::from_vec(targets, (n, LEN - 1), &Device::Cpu)?,
    ))
}

/// Overwrites every weight with values from a seeded generator (candle's CPU generator
/// cannot be seeded): the run is then the same on every machine, not a draw that fails
/// now and then. Uniform with candle's scales: the embedding with unit variance, a weight
/// or bias that reads `n` inputs within ±1/√n (`n` the last dimension of its weight).
fn seed_weights(vm: &VarMap, seed: u64) -> Result<()> {
    let mut rng = SplitMix64::new(seed);
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let var = &data[&name];
        let dims = var.dims().to_vec();
        let fan_in = if dims.len() == 2 { dims[1] } else { 32 };
        let a = if name.starts_with("emb") {
            3f64.sqrt()
        } else {
            1.0 / (fan_in as f64).sqrt()
        };
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| ((2.0 * rng.unit() - 1.0) * a) as f32)
            .collect();
        var.set(&Tensor::from_vec(vals, dims.as_slice(), var.device())?)?;
    }
    Ok(())
}

#[test]
fn adamw_learns_a_task_that_needs_the_causal_mask() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let d = 32;
    let model = Model {
        emb: candle_nn::embedding(VOCAB, d, vb.pp("emb"))?,
        attn: MaskedMultiHeadAttention::new(MhaConfig::new(d, 4).with_rope(100.0), vb.pp("attn"))?,
        head: candle_nn::linear(d, VOCAB, vb.pp("head"))?,
    };
    seed_weights(&vm, 7)?;
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    // Positions from PERIOD − 1 on have their answer in view.
    let start = PERIOD - 1;
    let scored = |logits: &Tensor, targets: &Tensor| -> Result<(Tensor, Tensor)> {
        let l = logits.narrow(1, start, LEN - 1 - start)?.contiguous()?;
        let t = targets.narrow(1, start, LEN - 1 - start)?.contiguous()?;
        Ok((l.flatten_to(1)?, t.flatten_all()?))
    };
    for step in 0..300u64 {
        let (x, y) = tensors(&batch(step, 16))?;
        let (l, t) = scored(&model.logits(&x, Mode::Train { seed: step })?, &y)?;
        let loss = candle_nn::loss::cross_entropy(&l, &t)?;
        opt.backward_step(&loss)?;
    }
    let (x, y) = tensors(&batch(1_000_000, 64))?;
    let (l, t) = scored(&model.logits(&x, Mode::Eval)?, &y)?;
    let pred = l.argmax(D::Minus1)?;
    let correct = pred
        .eq(&t)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    eprintln!("held-out next-token accuracy after 300 steps: {correct}");
    assert!(
        correct >= 0.99,
        "held-out next-token accuracy {correct} (chance is 1/{VOCAB})"
    );
    Ok(())
}
