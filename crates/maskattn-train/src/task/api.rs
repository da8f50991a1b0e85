//! The [`Task`] trait and what its methods hand the trainer.

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use maskattn::Mask;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::encoder::Trunk;
use super::figure::Figure;

/// What enters the encoder for one batch.
pub struct Input {
    /// `[B, L, d_model]`: the task's embedding of its inputs (positions included).
    pub x: Tensor,
    /// The attention mask over `[B, heads, L, L]`, in every layer unless `layer_masks`
    /// says otherwise.
    pub mask: Mask,
    /// Masks that take turns over the layers instead (layer `i` attends under
    /// `layer_masks[i % n]`), for models whose layers differ — Swin's windows, shifted on
    /// every other layer. `None`: `mask` everywhere.
    pub layer_masks: Option<Vec<Mask>>,
    /// A dense additive bias on the scores, `[B|1, heads|1, L, L]` (f32); gradients reach
    /// whatever parameters it was computed from.
    pub bias: Option<Tensor>,
}

impl Input {
    /// The mask of each of `layers` layers.
    pub fn masks(&self, layers: usize) -> Vec<Mask> {
        match &self.layer_masks {
            Some(m) if !m.is_empty() => (0..layers).map(|i| m[i % m.len()].clone()).collect(),
            _ => vec![self.mask.clone(); layers],
        }
    }
}

/// The held-out figures of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskEval {
    /// Held-out loss (the training loss's definition).
    pub loss: f64,
    /// The task's metric, and its name (`"hit@10"`, `"MSE"`).
    pub metric: f64,
    pub metric_name: String,
    /// Further figures for people (other metrics, baselines), one line; may be empty.
    pub details: String,
}

/// A task the [`TaskTrainer`](super::TaskTrainer) can train: data, input embedding, head, loss, metric, mask.
///
/// Everything a run draws must come from the seed (and, for a training batch, the step), so
/// that a resumed run is the uninterrupted run, bit for bit.
pub trait Task: Sized {
    /// The name a checkpoint records (and `maskattn train --task` takes).
    const NAME: &'static str;
    /// What the task is built from (sizes, a data file…), saved in the checkpoint.
    type Settings: Serialize + DeserializeOwned + Clone;
    /// The task's own parameters: input embedding, head, any extra.
    type Layers;
    /// A batch of examples.
    type Batch;

    /// The task with its data, generated from `seed` (no download) or read from a file
    /// named in `settings`. A bad setting is an error naming it.
    fn new(settings: Self::Settings, seed: u64) -> Result<Self>;
    fn settings(&self) -> &Self::Settings;
    /// The length of every row (`L`); the encoder is built for it.
    fn row_len(&self) -> usize;
    /// The task's parameters, made under `vb` (named so that [`crate::init`] draws them:
    /// `…_emb.weight` N(0, 0.02), `…ln…` as norms, anything else uniform ±1/√fan_in).
    fn layers(&self, vb: VarBuilder, trunk: &Trunk) -> candle_core::Result<Self::Layers>;
    /// The training batch of step `step` of `rows` rows, drawn from `seed` and `step` only.
    fn train_batch(&self, seed: u64, step: u64, rows: usize) -> Result<Self::Batch>;
    /// The encoder's input for `batch`.
    fn input(&self, layers: &Self::Layers, batch: &Self::Batch, trunk: &Trunk) -> Result<Input>;
    /// The loss (a scalar tensor) from the encoder's output `hidden [B, L, d_model]`.
    fn loss(&self, layers: &Self::Layers, hidden: &Tensor, batch: &Self::Batch) -> Result<Tensor>;
    /// The held-out figures; `forward` runs the model on a batch and returns its `hidden`.
    /// Two evaluations of the same weights must give the same figures.
    fn evaluate(
        &self,
        layers: &Self::Layers,
        forward: &mut dyn FnMut(&Self::Batch) -> Result<Tensor>,
    ) -> Result<TaskEval>;
    /// Pictures worth looking at after a run (forecasts against the truth, a ranking's
    /// hits against a baseline's), computed on held-out data with `forward` as in
    /// [`evaluate`](Self::evaluate). None by default.
    fn figures(
        &self,
        _layers: &Self::Layers,
        _forward: &mut dyn FnMut(&Self::Batch) -> Result<Tensor>,
    ) -> Result<Vec<Figure>> {
        Ok(Vec::new())
    }
    /// The value of the last line, `held-out <metric> after N steps: <this>` — the metric
    /// and, for instance, the baselines it is to be read against.
    fn summary(&self, metric: f64) -> String {
        format!("{metric:.4}")
    }
    /// A line about the data for the run's header.
    fn describe(&self) -> String {
        Self::NAME.to_string()
    }
}
