//! `speech`: framewise phoneme classification by a streaming encoder. Utterances are
//! synthesised ([`synth`]), turned into log-mel frames by a real front end ([`frontend`]:
//! STFT, mel filterbank, log), embedded by a linear layer plus sinusoidal positions, and
//! encoded under WeNet's chunk mask (`chunked(C, left)`: a frame sees its own chunk of `C`
//! frames and `left` chunks before it, every earlier chunk with `left = None`); a linear
//! head classifies every frame. [`stream`] runs the same encoder chunk by chunk with a
//! key/value cache and gives the same outputs.
//!
//! The latency a chunk size buys: a frame's label is known once its chunk's last frame has
//! arrived, so at most `C` frames (`C × 10 ms`) plus the front end's 15 ms look-ahead.
//!
//! Positions are absolute (sinusoidal, of the frame's index since the stream began) so that
//! the cache needs only its offset; a training row starts at a random offset below
//! [`MAX_OFFSET`] so the model has seen the positions of streams of up to a few tens of
//! seconds. Held out: utterances never trained on; framewise accuracy.

pub mod frontend;
pub mod stream;
pub mod synth;

use anyhow::{bail, Result};
use candle_core::{Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use maskattn::Mask;
use serde::{Deserialize, Serialize};

use super::api::{Input, Task, TaskEval};
use super::encoder::Trunk;
use crate::rng::Rng;
use frontend::{FrontEnd, N_MELS};
use synth::N_CLASSES;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeechSettings {
    /// Frames per utterance (one utterance per row; 10 ms each).
    pub row_len: usize,
    /// Frames per chunk of the mask (`C`).
    pub chunk: usize,
    /// Chunks of history each chunk sees; `None`: all of them.
    pub left: Option<usize>,
    /// Held-out utterances.
    pub held_out: usize,
}

impl Default for SpeechSettings {
    fn default() -> Self {
        SpeechSettings {
            row_len: 128,
            chunk: 8,
            left: Some(2),
            held_out: 64,
        }
    }
}

impl SpeechSettings {
    /// The mask of a row.
    pub fn mask(&self) -> Mask {
        Mask::chunked(self.chunk, self.left)
    }
}

/// Positions drawn for a training row's first frame are below this (frames).
pub const MAX_OFFSET: usize = 4096;

/// The log-mel features are shifted and scaled by these fixed amounts (not by statistics of
/// the utterance, which a stream does not have yet): about zero mean, unit spread.
const FEAT_MEAN: f32 = -6.0;
const FEAT_SCALE: f32 = 4.0;

/// Rows of utterances as the model takes them.
pub struct Frames {
    pub rows: usize,
    /// `[rows, L, N_MELS]`: the normalised log-mel features.
    pub feats: Vec<f32>,
    /// `[rows, L]`: the class of each frame.
    pub labels: Vec<u32>,
    /// The position of each row's first frame.
    pub start: Vec<u32>,
}

pub struct SpeechLayers {
    frame_in: Linear,
    head: Linear,
}

pub struct Speech {
    settings: SpeechSettings,
    front: FrontEnd,
    held_out: Vec<Frames>,
    /// The share of held-out frames of the commonest class.
    majority: f64,
}

const TRAIN: u64 = 301;
const HELD_OUT: u64 = 302;

/// The model's input for raw log-mel frames (`[n, N_MELS]` flat), in place.
pub fn normalise(feats: &mut [f32]) {
    for x in feats {
        *x = (*x - FEAT_MEAN) / FEAT_SCALE;
    }
}

/// Sinusoidal positions (Vaswani et al. 2017) of `n` frames from `start`: `[n, d]` flat.
pub fn positions(start: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * d);
    for p in start..start + n {
        for i in 0..d {
            let freq = 10000f64.powf(-((i / 2 * 2) as f64) / d as f64);
            let a = p as f64 * freq;
            out.push(if i % 2 == 0 { a.sin() } else { a.cos() } as f32);
        }
    }
    out
}

impl Speech {
    /// `rows` utterances from `rng`, each at a position drawn when `offsets`.
    fn rows(&self, rows: usize, rng: &mut Rng, offsets: bool) -> Frames {
        let l = self.settings.row_len;
        let mut b = Frames {
            rows,
            feats: Vec::with_capacity(rows * l * N_MELS),
            labels: Vec::with_capacity(rows * l),
            start: Vec::with_capacity(rows),
        };
        for _ in 0..rows {
            let u = synth::utterance(rng, l);
            let mut f = self.front.log_mel(&u.samples);
            normalise(&mut f);
            b.feats.extend_from_slice(&f);
            b.labels.extend_from_slice(&u.labels);
            b.start.push(if offsets {
                rng.below(MAX_OFFSET) as u32
            } else {
                0
            });
        }
        b
    }

    /// `feats [B, n, N_MELS]` embedded, with positions from each row's `start`.
    pub fn embed(&self, layers: &SpeechLayers, feats: &Tensor, start: &[u32]) -> Result<Tensor> {
        let (b, n, _) = feats.dims3()?;
        let d = layers.frame_in.weight().dim(0)?;
        let pos: Vec<f32> = start
            .iter()
            .flat_map(|&s| positions(s as usize, n, d))
            .collect();
        let pos = Tensor::from_vec(pos, (b, n, d), &Device::Cpu)?;
        Ok(layers.frame_in.forward(feats)?.add(&pos)?)
    }

    /// The class logits `[.., N_CLASSES]` of the encoder's output.
    pub fn logits(&self, layers: &SpeechLayers, hidden: &Tensor) -> Result<Tensor> {
        Ok(layers.head.forward(hidden)?)
    }

    /// The share of held-out frames of the commonest class (always guessing it).
    pub fn majority(&self) -> f64 {
        self.majority
    }
}

impl Task for Speech {
    const NAME: &'static str = "speech";
    type Settings = SpeechSettings;
    type Layers = SpeechLayers;
    type Batch = Frames;

    fn new(settings: SpeechSettings, seed: u64) -> Result<Self> {
        let s = &settings;
        if s.chunk == 0 {
            bail!("--chunk 0: a chunk must hold at least one frame");
        }
        if s.row_len < 8 {
            bail!("speech: an utterance must have at least 8 frames");
        }
        if s.held_out == 0 {
            bail!("speech: some utterances must be held out");
        }
        let mut me = Speech {
            settings,
            front: FrontEnd::new(),
            held_out: Vec::new(),
            majority: 0.0,
        };
        let mut rng = Rng::at(seed, HELD_OUT, 0);
        let mut left = me.settings.held_out;
        while left > 0 {
            let n = left.min(16);
            let b = me.rows(n, &mut rng, false);
            me.held_out.push(b);
            left -= n;
        }
        let mut counts = [0usize; N_CLASSES];
        for b in &me.held_out {
            for &c in &b.labels {
                counts[c as usize] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        me.majority = *counts.iter().max().expect("classes") as f64 / total as f64;
        Ok(me)
    }

    fn settings(&self) -> &SpeechSettings {
        &self.settings
    }

    fn row_len(&self) -> usize {
        self.settings.row_len
    }

    fn layers(&self, vb: VarBuilder, trunk: &Trunk) -> candle_core::Result<SpeechLayers> {
        Ok(SpeechLayers {
            frame_in: candle_nn::linear(N_MELS, trunk.d_model, vb.pp("frame_in"))?,
            head: candle_nn::linear(trunk.d_model, N_CLASSES, vb.pp("head"))?,
        })
    }

    fn train_batch(&self, seed: u64, step: u64, rows: usize) -> Result<Frames> {
        Ok(self.rows(rows, &mut Rng::at(seed, TRAIN, step), true))
    }

    fn input(&self, layers: &SpeechLayers, b: &Frames, _trunk: &Trunk) -> Result<Input> {
        let l = self.settings.row_len;
        let feats = Tensor::from_slice(&b.feats, (b.rows, l, N_MELS), &Device::Cpu)?;
        Ok(Input {
            x: self.embed(layers, &feats, &b.start)?,
            mask: self.settings.mask(),
            layer_masks: None,
            bias: None,
        })
    }

    fn loss(&self, layers: &SpeechLayers, hidden: &Tensor, b: &Frames) -> Result<Tensor> {
        let logits = self.logits(layers, hidden)?.flatten_to(1)?;
        let target = Tensor::from_slice(&b.labels, b.labels.len(), &Device::Cpu)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &target)?)
    }

    fn evaluate(
        &self,
        layers: &SpeechLayers,
        forward: &mut dyn FnMut(&Frames) -> Result<Tensor>,
    ) -> Result<TaskEval> {
        let (mut loss, mut right, mut n) = (0f64, 0usize, 0usize);
        let mut per_class = [(0usize, 0usize); N_CLASSES];
        for b in &self.held_out {
            let hidden = forward(b)?;
            let logits = self.logits(layers, &hidden)?.flatten_to(1)?;
            let target = Tensor::from_slice(&b.labels, b.labels.len(), &Device::Cpu)?;
            let l = candle_nn::loss::cross_entropy(&logits, &target)?.to_scalar::<f32>()?;
            loss += l as f64 * b.labels.len() as f64;
            let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            for (p, &t) in pred.iter().zip(&b.labels) {
                per_class[t as usize].1 += 1;
                if *p == t {
                    right += 1;
                    per_class[t as usize].0 += 1;
                }
            }
            n += b.labels.len();
        }
        let classes = per_class
            .iter()
            .enumerate()
            .map(|(c, (r, t))| {
                format!(
                    "{} {:.0}%",
                    synth::class_name(c),
                    100.0 * *r as f64 / (*t).max(1) as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(TaskEval {
            loss: loss / n.max(1) as f64,
            metric: right as f64 / n.max(1) as f64,
            metric_name: "accuracy".into(),
            details: format!("framewise accuracy per class: {classes}"),
        })
    }

    fn summary(&self, metric: f64) -> String {
        format!(
            "{:.1}% (chunk {} frames, {}; majority class: {:.1}%)",
            100.0 * metric,
            self.settings.chunk,
            match self.settings.left {
                Some(k) => format!("{k} left chunks"),
                None => "all left chunks".into(),
            },
            100.0 * self.majority
        )
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "synthesised utterances of {} frames (10 ms, {} log-mel bands), {} phoneme classes, mask {}; {} held-out utterances",
            s.row_len, N_MELS, N_CLASSES, s.mask(), s.held_out
        )
    }
}
