//! Using a trained checkpoint: `fill-mask`, `generate` (with the KV cache) and
//! `attention-map` (what every head attends to, and what the mask hides).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use maskattn::{Mask, MaskShape};

use crate::train::batch::Objective;
use crate::train::rng::Rng;
use crate::train::{self, plot};

#[derive(Args, Debug)]
pub struct FillMaskArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Text with one or more [MASK].
    pub text: String,
    /// Candidates per mask.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0: greedy; a finite number ≥ 0 (the smaller, the closer to greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens that together hold this share of the
    /// probability (nucleus sampling; in (0, 1], 1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct AttentionMapArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The text to look at; give it several times to pack several documents into one row,
    /// kept apart by the documents mask (as in training).
    #[arg(long, required = true)]
    pub text: Vec<String>,
    /// Picture to write (.png or .svg).
    #[arg(long, default_value = "attention-map.png")]
    pub out: PathBuf,
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

pub fn fill_mask(a: &FillMaskArgs) -> Result<()> {
    let (model, vocab, state) = train::open(&a.checkpoint)?;
    if state.run.objective != Objective::Mlm {
        bail!(
            "{} was trained with the clm objective; fill-mask needs an mlm checkpoint",
            a.checkpoint.display()
        );
    }
    let ids = vocab.encode(&a.text)?;
    let slots: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == vocab.mask())
        .map(|(i, _)| i)
        .collect();
    if slots.is_empty() {
        bail!("the text has no [MASK]");
    }
    if ids.len() > state.model.max_len {
        bail!(
            "the text is {} tokens; the model takes at most {}",
            ids.len(),
            state.model.max_len
        );
    }
    let tokens = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu)?;
    let logits = model
        .forward(&tokens, &Mask::full(), maskattn_candle::Mode::Eval)?
        .squeeze(0)?;
    for (n, &p) in slots.iter().enumerate() {
        let probs = softmax(&logits.get(p)?.to_vec1::<f32>()?);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&x, &y| probs[y].total_cmp(&probs[x]));
        println!("[MASK] #{} (position {p}):", n + 1);
        for &t in order.iter().take(a.top_k) {
            println!(
                "  {:<12} {:>6.2}%",
                format!("{:?}", vocab.token(t as u32)),
                100.0 * probs[t]
            );
        }
    }
    Ok(())
}

pub fn generate(a: &GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!(
            "--temperature {}: must be a finite number ≥ 0 (0: greedy)",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {}: must be in (0, 1] (1: all tokens)", a.top_p);
    }
    let (model, vocab, state) = train::open(&a.checkpoint)?;
    if state.run.objective != Objective::Clm {
        bail!(
            "{} was trained with the mlm objective; generate needs a clm checkpoint",
            a.checkpoint.display()
        );
    }
    let prompt = vocab.encode(&a.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut caches = model.caches();
    let mut rng = Rng::new(a.seed);
    let mut out = Vec::new();
    let start = Instant::now();
    let mut logits = model.step(
        &Tensor::from_slice(&prompt, (1, prompt.len()), &Device::Cpu)?,
        &mut caches,
    )?;
    // Learned positions end at max_len; rotary ones go on.
    let learned = state.model.positions == maskattn_candle::model::Positions::Learned;
    let room = state.model.max_len.saturating_sub(prompt.len());
    let limit = if learned {
        a.max_tokens.min(room)
    } else {
        a.max_tokens
    };
    if limit < a.max_tokens {
        eprintln!(
            "note: learned positions stop at {} tokens",
            state.model.max_len
        );
    }
    for _ in 0..limit {
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let next = pick(&last.to_vec1::<f32>()?, a, &mut rng);
        if next == vocab.sep() {
            break;
        }
        out.push(next);
        logits = model.step(
            &Tensor::from_slice(&[next], (1, 1), &Device::Cpu)?,
            &mut caches,
        )?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{}{}", a.prompt, vocab.decode(&out));
    eprintln!(
        "{} tokens in {:.2} s ({:.0} tokens/s, KV cache)",
        out.len(),
        secs,
        out.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Greedy at temperature 0; otherwise sampling at `temperature` from the top `k` (0 = all)
/// tokens, then from the fewest of those that hold `top_p` of their probability.
fn pick(logits: &[f32], a: &GenerateArgs, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
    let best = logits[order[0]] as f64;
    if a.temperature <= 0.0 || !best.is_finite() {
        return order[0] as u32;
    }
    let keep = if a.top_k == 0 {
        order.len()
    } else {
        a.top_k.min(order.len())
    };
    // Weights relative to the best token, in f64: exp((l − best) / T) is 1 for the best and
    // falls to 0 (never to NaN, as a softmax of logits / T does once 1/T overflows) for
    // the others as T → 0, so that a tiny temperature is greedy.
    let w: Vec<f64> = order[..keep]
        .iter()
        .map(|&i| ((logits[i] as f64 - best) / a.temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut nucleus = 0;
    let mut mass = 0.0;
    for &wi in &w {
        mass += wi;
        nucleus += 1;
        if mass >= a.top_p * total {
            break;
        }
    }
    let w = &w[..nucleus];
    let mut u = rng.unit() * w.iter().sum::<f64>();
    for (i, &wi) in w.iter().enumerate() {
        if u < wi {
            return order[i] as u32;
        }
        u -= wi;
    }
    // Rounding left a sliver: the last candidate that has any weight.
    let last = (0..nucleus).rev().find(|&i| w[i] > 0.0).unwrap_or(0);
    order[last] as u32
}

pub fn attention_map(a: &AttentionMapArgs) -> Result<()> {
    let (model, vocab, state) = train::open(&a.checkpoint)?;
    // One row: the documents one after the other, each closed by the separator when there
    // are several (as packed in training).
    let mut ids = Vec::new();
    let mut doc_ids = Vec::new();
    for (d, text) in a.text.iter().enumerate() {
        let mut t = vocab.encode(text)?;
        if a.text.len() > 1 {
            t.push(vocab.sep());
        }
        doc_ids.extend(std::iter::repeat_n(d as i64, t.len()));
        ids.extend(t);
    }
    if ids.is_empty() || ids.len() > state.model.max_len {
        bail!(
            "the text must have 1 to {} tokens, it has {}",
            state.model.max_len,
            ids.len()
        );
    }
    let n = ids.len();
    let docs = Mask::documents(doc_ids, 1);
    let (mask, name) = match state.run.objective {
        Objective::Clm => (Mask::causal() & docs, "causal & documents"),
        Objective::Mlm => (docs, "documents"),
    };
    let tokens = Tensor::from_slice(&ids, (1, n), &Device::Cpu)?;
    let outs = model
        .forward_with_weights(&tokens, &mask)
        .context("running the model")?;
    // [layer][head][query][key]
    let grid: Vec<Vec<Vec<Vec<f32>>>> = outs
        .weights
        .iter()
        .map(|w| -> Result<_> {
            let heads: Vec<Vec<f32>> = w.squeeze(0)?.flatten_from(1)?.to_vec2()?;
            Ok(heads
                .iter()
                .map(|flat| flat.chunks(n).map(<[f32]>::to_vec).collect())
                .collect())
        })
        .collect::<Result<_>>()?;
    let labels: Vec<String> = ids.iter().map(|&t| vocab.token(t)).collect();
    let shape = MaskShape::new(1, state.model.heads, n, n);
    let allowed = |i: usize, j: usize| mask.allowed(&shape, 0, 0, i, j);
    let objective = format!("{:?}", state.run.objective).to_uppercase();
    let maps = plot::Maps {
        tokens: &labels,
        weights: &grid,
        allowed: &allowed,
        title: format!(
            "attention weights of a {objective} model; mask: {name} (hatched pairs are hidden)"
        ),
    };
    // Whole or not at all: drawn into a temporary beside the picture, then renamed.
    crate::output::write_with(&a.out, |p| plot::attention_maps(&maps, p))?;
    println!(
        "wrote {} ({} layers × {} heads, {} tokens)",
        a.out.display(),
        grid.len(),
        state.model.heads,
        n
    );
    Ok(())
}
