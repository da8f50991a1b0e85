//! Held-out evaluation. Documents are evaluated one per row (padded), in a fixed order with
//! fixed masking choices, so two evaluations of the same weights give the same figures.
//!
//! Metrics: on the built-in task, the fraction of answers (the majority letter, one of
//! a–d) predicted exactly (chance is 1 in 4); on text, masked-token accuracy (MLM) or
//! perplexity (CLM).

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use maskattn_candle::model::TinyLm;
use maskattn_candle::Mode;

use crate::batch::{self, Layout, MlmChoice, Objective};
use crate::checkpoint::{Eval, RunSettings};
use crate::corpus::Corpus;
use crate::loss::loss;
use crate::rng::Rng;
use crate::vocab::Vocab;

/// Held-out documents used per evaluation.
const EVAL_DOCS: usize = 256;

pub fn evaluate(
    model: &TinyLm,
    corpus: &Corpus,
    vocab: &Vocab,
    s: &RunSettings,
    step: u64,
) -> Result<Eval> {
    let docs: Vec<_> = corpus.held_out.iter().take(EVAL_DOCS).collect();
    let choice = if corpus.has_answers {
        MlmChoice::Answers
    } else {
        MlmChoice::Random
    };
    let mut rng = Rng::new(0x5EED);
    let (mut loss_sum, mut weight_sum) = (0f64, 0f64);
    let (mut hits, mut total) = (0usize, 0usize);
    for chunk in docs.chunks(s.batch) {
        let b = batch::make(
            chunk,
            chunk.len(),
            s.seq_len,
            Layout::Padded,
            s.objective,
            choice,
            vocab,
            &mut rng,
        )?;
        let tokens = Tensor::from_slice(&b.inputs, (b.rows, b.len), &Device::Cpu)?;
        let logits = model.forward(&tokens, &b.mask(s.objective), Mode::Eval)?;
        let w: f32 = b.weights.iter().sum();
        loss_sum += loss(&logits, &b)?.to_scalar::<f32>()? as f64 * w as f64;
        weight_sum += w as f64;
        let flat = logits.reshape(((), logits.dim(D::Minus1)?))?;
        // The positions whose predictions are scored, with the right answer.
        let scored: Vec<(usize, u32)> = if corpus.has_answers {
            b.answers.clone()
        } else {
            (0..b.weights.len())
                .filter(|&p| b.weights[p] > 0.0)
                .map(|p| (p, b.targets[p]))
                .collect()
        };
        if scored.is_empty() {
            continue;
        }
        let idx: Vec<u32> = scored.iter().map(|&(p, _)| p as u32).collect();
        let picked = flat.index_select(&Tensor::from_slice(&idx, idx.len(), &Device::Cpu)?, 0)?;
        let pred: Vec<u32> = picked.argmax(D::Minus1)?.to_vec1()?;
        hits += pred
            .iter()
            .zip(&scored)
            .filter(|(p, (_, t))| *p == t)
            .count();
        total += scored.len();
    }
    let loss = loss_sum / weight_sum.max(1.0);
    let (metric, metric_name) = if corpus.has_answers {
        (hits as f64 / total.max(1) as f64, "answer accuracy")
    } else if s.objective == Objective::Mlm {
        (hits as f64 / total.max(1) as f64, "masked-token accuracy")
    } else {
        (loss.exp(), "perplexity")
    };
    Ok(Eval {
        step,
        loss,
        metric,
        metric_name: metric_name.into(),
    })
}

pub fn format_metric(e: &Eval) -> String {
    if e.metric_name == "perplexity" {
        format!("{:.2}", e.metric)
    } else if e.metric_name == "MSE" {
        format!("{:.4}", e.metric)
    } else {
        format!("{:.1}%", 100.0 * e.metric)
    }
}
