//! `series`: multivariate forecasting on patches. Each variate's recent past is cut into
//! patches of `patch` values (PatchTST, Nie et al. 2023), each patch one token, normalised
//! by its variate's own context (RevIN-style); after a variate's patches comes a forecast
//! token whose output is the next `patch` values. One *sample* — several variates of
//! different context lengths that end at the same time — is a document; several samples
//! are packed into one row, kept apart by the documents mask. Inside a sample every token
//! sees every other; which of them share its variate it learns only through a learnable
//! same/different-variate score bias, one scalar per head for each (Moirai's binary
//! attention bias, Woo et al. 2024), trained through the attention op's bias gradient.
//!
//! The series are generated (no download): two seasonal harmonics of a period of 12, 16
//! or 24 steps, a trend, AR(1) noise, a regime change (level and amplitude) at a random
//! time, and a common AR factor that the first variate shows `patch` steps before the
//! others — so the others' next values can be read off the first variate's last patch.
//!
//! Held out: fixed samples never trained on; the MSE of the forecasts (in the normalised
//! units) beside the last-value and seasonal-naive forecasts' MSE on the same values.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use maskattn::Mask;
use serde::{Deserialize, Serialize};

use super::api::{Input, Task, TaskEval};
use super::encoder::Trunk;
use super::series_csv::{self, Table};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesSettings {
    /// Positions per row (samples are packed into it).
    pub row_len: usize,
    /// Values per patch, and the forecast horizon.
    pub patch: usize,
    /// Context patches per variate: between these.
    pub min_patches: usize,
    pub max_patches: usize,
    /// Variates per sample: 2 up to this.
    pub max_variates: usize,
    /// Held-out samples.
    pub held_out: usize,
    /// Train on this CSV file's series instead of generated ones ([`series_csv`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<PathBuf>,
    /// The season length of the CSV's series, for the seasonal-naive forecast (the
    /// generated series know their own).
    #[serde(default = "default_period")]
    pub period: usize,
}

fn default_period() -> usize {
    24
}

impl Default for SeriesSettings {
    fn default() -> Self {
        SeriesSettings {
            row_len: 128,
            patch: 8,
            min_patches: 4,
            max_patches: 12,
            max_variates: 4,
            held_out: 256,
            csv: None,
            period: default_period(),
        }
    }
}

/// One variate of a sample, normalised by its context's mean and spread.
struct Variate {
    /// `n · patch` context values.
    context: Vec<f32>,
    /// The next `patch` values.
    target: Vec<f32>,
    /// The season length (for the seasonal-naive forecast).
    period: usize,
}

/// Rows of packed samples.
pub struct Packed {
    pub rows: usize,
    /// `[rows, L, patch]`: the patch values (0 for forecast and padding tokens).
    values: Vec<f32>,
    /// `[rows, L]`: 1 on forecast tokens.
    forecast: Vec<f32>,
    /// `[rows, L]`: patches from the end (0 for a forecast token, 1 the last patch).
    time: Vec<u32>,
    /// `[rows, L]`: sample id (−1 padding) and variate id (unique in the batch, −1 padding).
    doc: Vec<i64>,
    var: Vec<i64>,
    /// Flat positions of the forecast tokens, and their targets `[n, patch]`.
    at: Vec<u32>,
    targets: Vec<f32>,
    /// Last-value and seasonal-naive forecasts of the same targets.
    naive: (Vec<f32>, Vec<f32>),
}

pub struct SeriesLayers {
    patch_in: Linear,
    forecast: Tensor,
    time: Embedding,
    /// `[2, heads]`: the score bias between tokens of the same variate (row 0) and of
    /// different variates of the same sample (row 1).
    pub variate_bias: Tensor,
    head: Linear,
}

pub struct Series {
    settings: SeriesSettings,
    /// The user's series (`--csv`), or `None`: generated ones.
    table: Option<Table>,
    held_out: Vec<Packed>,
    /// MSE of the last-value and seasonal-naive forecasts on the held-out samples.
    baseline: (f64, f64),
}

const TRAIN: u64 = 201;
const HELD_OUT: u64 = 202;
const PERIODS: [usize; 3] = [12, 16, 24];

impl Variate {
    /// `context` and `target` in the units of `context`'s mean and spread (RevIN-style).
    fn normalised(context: &[f64], target: &[f64], period: usize) -> Variate {
        let mean = context.iter().sum::<f64>() / context.len() as f64;
        let var = context.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / context.len() as f64;
        let sd = var.sqrt().max(1e-3);
        let norm = |x: &f64| ((x - mean) / sd) as f32;
        Variate {
            context: context.iter().map(norm).collect(),
            target: target.iter().map(norm).collect(),
            period,
        }
    }
}

impl Series {
    /// One sample: 2 to `max_variates` variates (from the CSV: 1 to `max_variates`, a
    /// held-out one forecasting after the training rows).
    fn sample(&self, rng: &mut Rng, held_out: bool) -> Vec<Variate> {
        let s = &self.settings;
        if let Some(t) = &self.table {
            let p = s.patch;
            return t
                .window(
                    rng,
                    held_out,
                    s.max_variates,
                    s.min_patches * p,
                    s.max_patches * p,
                    p,
                    p,
                )
                .into_iter()
                .map(|(ctx, target)| Variate::normalised(&ctx, &target, s.period))
                .collect();
        }
        let p = s.patch;
        let nv = 2 + rng.below(s.max_variates - 1);
        let period = PERIODS[rng.below(PERIODS.len())];
        let total = s.max_patches * p + p;
        // The common factor, shown by variate 0 `p` steps before the others.
        let mut common = vec![0f64; total + p];
        let mut c = rng.normal();
        for x in common.iter_mut() {
            c = 0.9 * c + 0.45 * rng.normal();
            *x = c;
        }
        let phase = rng.unit() * std::f64::consts::TAU;
        let shared_change = s.max_patches * p / 3 + rng.below(s.max_patches * p / 2);
        (0..nv)
            .map(|v| {
                let amp = 0.5 + 1.5 * rng.unit();
                let second = 0.6 * rng.unit();
                let ph = phase + 0.5 * rng.normal();
                let trend = 0.02 * rng.normal();
                let mut level = 2.0 * rng.normal();
                let change = if rng.unit() < 0.5 {
                    shared_change
                } else {
                    s.max_patches * p / 4 + rng.below(s.max_patches * p * 3 / 4)
                };
                let (jump, stretch) = (1.5 * rng.normal(), 0.5 + rng.unit());
                let mut e = 0.0;
                let mut y = Vec::with_capacity(total);
                let mut a = amp;
                for t in 0..total {
                    if t == change {
                        level += jump;
                        a *= stretch;
                    }
                    e = 0.7 * e + 0.3 * rng.normal();
                    let w = std::f64::consts::TAU * t as f64 / period as f64;
                    let lead = if v == 0 { common[t + p] } else { common[t] };
                    y.push(
                        level
                            + a * ((w + ph).sin() + second * (2.0 * w + ph).sin())
                            + trend * t as f64
                            + e
                            + 0.8 * lead,
                    );
                }
                let n = s.min_patches + rng.below(s.max_patches - s.min_patches + 1);
                Variate::normalised(&y[total - p - n * p..total - p], &y[total - p..], period)
            })
            .collect()
    }

    /// `rows` rows filled with samples from `rng` (a sample that does not fit in the last
    /// row is left out).
    fn pack(&self, rows: usize, rng: &mut Rng, limit: Option<usize>, held_out: bool) -> Packed {
        let (l, p) = (self.settings.row_len, self.settings.patch);
        let mut b = Packed {
            rows,
            values: vec![0.0; rows * l * p],
            forecast: vec![0.0; rows * l],
            time: vec![0; rows * l],
            doc: vec![-1; rows * l],
            var: vec![-1; rows * l],
            at: Vec::new(),
            targets: Vec::new(),
            naive: (Vec::new(), Vec::new()),
        };
        let (mut row, mut col, mut docs, mut vars) = (0, 0, 0i64, 0i64);
        while limit.is_none_or(|n| (docs as usize) < n) {
            let sample = self.sample(rng, held_out);
            let need: usize = sample.iter().map(|v| v.context.len() / p + 1).sum();
            if col + need > l {
                row += 1;
                col = 0;
            }
            if row >= rows {
                break;
            }
            for v in &sample {
                let n = v.context.len() / p;
                for k in 0..=n {
                    let pos = row * l + col;
                    b.doc[pos] = docs;
                    b.var[pos] = vars;
                    b.time[pos] = (n - k) as u32;
                    if k < n {
                        b.values[pos * p..(pos + 1) * p]
                            .copy_from_slice(&v.context[k * p..(k + 1) * p]);
                    } else {
                        b.forecast[pos] = 1.0;
                        b.at.push(pos as u32);
                        b.targets.extend_from_slice(&v.target);
                        let last = *v.context.last().expect("a context");
                        b.naive.0.extend(std::iter::repeat_n(last, p));
                        let c = v.context.len();
                        // The last season repeated.
                        let season = |h: usize| v.context[c - v.period + h % v.period];
                        b.naive.1.extend((0..p).map(season));
                    }
                    col += 1;
                }
                vars += 1;
            }
            docs += 1;
        }
        b
    }

    /// MSE of `pred` against `target`.
    fn mse(pred: &[f32], target: &[f32]) -> f64 {
        let s: f64 = pred
            .iter()
            .zip(target)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        s / target.len().max(1) as f64
    }

    /// MSE of the last-value and the seasonal-naive forecasts on the held-out samples.
    pub fn naive_mse(&self) -> (f64, f64) {
        self.baseline
    }

    /// The forecasts `[n, patch]` of the forecast tokens of `b`.
    fn forecasts(&self, layers: &SeriesLayers, hidden: &Tensor, b: &Packed) -> Result<Tensor> {
        let d = hidden.dim(2)?;
        let flat = hidden.reshape((b.rows * self.settings.row_len, d))?;
        let idx = Tensor::from_slice(&b.at, b.at.len(), &Device::Cpu)?;
        Ok(layers.head.forward(&flat.index_select(&idx, 0)?)?)
    }

    /// Same-variate indicator `[B, 1, L, L]` (1 where both tokens are of one variate).
    fn same_variate(&self, b: &Packed) -> Result<Tensor> {
        let l = self.settings.row_len;
        let mut same = vec![0f32; b.rows * l * l];
        for r in 0..b.rows {
            for i in 0..l {
                let vi = b.var[r * l + i];
                if vi < 0 {
                    continue;
                }
                for j in 0..l {
                    if b.var[r * l + j] == vi {
                        same[(r * l + i) * l + j] = 1.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(same, (b.rows, 1, l, l), &Device::Cpu)?)
    }
}

impl Task for Series {
    const NAME: &'static str = "series";
    type Settings = SeriesSettings;
    type Layers = SeriesLayers;
    type Batch = Packed;

    fn new(settings: SeriesSettings, seed: u64) -> Result<Self> {
        let s = &settings;
        if s.patch < 2 || s.patch > *PERIODS.iter().min().expect("periods") {
            bail!("series: the patch must be 2 to {} values", PERIODS[0]);
        }
        if s.min_patches * s.patch < *PERIODS.iter().max().expect("periods")
            || s.max_patches < s.min_patches
        {
            bail!("series: the shortest context must hold a season (24 values)");
        }
        if s.max_variates < 2 || s.max_variates * (s.max_patches + 1) > s.row_len {
            bail!(
                "series: a row of {} positions must hold a sample of up to {} variates",
                s.row_len,
                s.max_variates
            );
        }
        if s.held_out == 0 {
            bail!("series: some samples must be held out");
        }
        if s.period == 0 || s.period > s.min_patches * s.patch {
            bail!(
                "--period {}: must be 1 to the shortest context, {} values",
                s.period,
                s.min_patches * s.patch
            );
        }
        let table = match &s.csv {
            Some(path) => Some(series_csv::Table::read(
                path,
                s.min_patches * s.patch,
                s.patch,
            )?),
            None => None,
        };
        let mut me = Series {
            table,
            settings,
            held_out: Vec::new(),
            baseline: (0.0, 0.0),
        };
        let mut rng = Rng::at(seed, HELD_OUT, 0);
        let mut left = me.settings.held_out;
        let (mut targets, mut last, mut seasonal) = (Vec::new(), Vec::new(), Vec::new());
        while left > 0 {
            let b = me.pack(16, &mut rng, Some(left), true);
            let docs = b.doc.iter().max().map_or(0, |&d| d + 1) as usize;
            left -= docs.min(left);
            targets.extend_from_slice(&b.targets);
            last.extend_from_slice(&b.naive.0);
            seasonal.extend_from_slice(&b.naive.1);
            me.held_out.push(b);
        }
        me.baseline = (
            Series::mse(&last, &targets),
            Series::mse(&seasonal, &targets),
        );
        Ok(me)
    }

    fn settings(&self) -> &SeriesSettings {
        &self.settings
    }

    fn row_len(&self) -> usize {
        self.settings.row_len
    }

    fn layers(&self, vb: VarBuilder, trunk: &Trunk) -> candle_core::Result<SeriesLayers> {
        let (d, p) = (trunk.d_model, self.settings.patch);
        Ok(SeriesLayers {
            patch_in: candle_nn::linear(p, d, vb.pp("patch_in"))?,
            forecast: vb.get_with_hints(d, "forecast_emb.weight", candle_nn::Init::Const(0.0))?,
            time: candle_nn::embedding(self.settings.max_patches + 1, d, vb.pp("time_emb"))?,
            variate_bias: vb.get_with_hints(
                (2, trunk.heads),
                "variate_bias",
                candle_nn::Init::Const(0.0),
            )?,
            head: candle_nn::linear(d, p, vb.pp("head"))?,
        })
    }

    fn train_batch(&self, seed: u64, step: u64, rows: usize) -> Result<Packed> {
        Ok(self.pack(rows, &mut Rng::at(seed, TRAIN, step), None, false))
    }

    fn input(&self, layers: &SeriesLayers, b: &Packed, trunk: &Trunk) -> Result<Input> {
        let (l, p, h) = (self.settings.row_len, self.settings.patch, trunk.heads);
        let dev = &Device::Cpu;
        let values = Tensor::from_slice(&b.values, (b.rows, l, p), dev)?;
        let flag = Tensor::from_slice(&b.forecast, (b.rows, l, 1), dev)?;
        let time = Tensor::from_slice(&b.time, (b.rows, l), dev)?;
        let x = layers
            .patch_in
            .forward(&values)?
            .broadcast_add(&flag.broadcast_mul(&layers.forecast)?)?
            .broadcast_add(&layers.time.forward(&time)?)?;
        // bias = different + same_variate · (same − different), per head.
        let same_b = layers.variate_bias.get(0)?.reshape((1, h, 1, 1))?;
        let diff_b = layers.variate_bias.get(1)?.reshape((1, h, 1, 1))?;
        let bias = self
            .same_variate(b)?
            .broadcast_mul(&(same_b - &diff_b)?)?
            .broadcast_add(&diff_b)?;
        Ok(Input {
            x,
            mask: Mask::documents(b.doc.clone(), b.rows),
            layer_masks: None,
            bias: Some(bias),
        })
    }

    fn loss(&self, layers: &SeriesLayers, hidden: &Tensor, b: &Packed) -> Result<Tensor> {
        let pred = self.forecasts(layers, hidden, b)?;
        let target = Tensor::from_slice(&b.targets, pred.shape(), &Device::Cpu)?;
        Ok((pred - target)?.sqr()?.mean_all()?)
    }

    fn evaluate(
        &self,
        layers: &SeriesLayers,
        forward: &mut dyn FnMut(&Packed) -> Result<Tensor>,
    ) -> Result<TaskEval> {
        let (mut sum, mut n) = (0f64, 0usize);
        for b in &self.held_out {
            let hidden = forward(b)?;
            let pred: Vec<f32> = self
                .forecasts(layers, &hidden, b)?
                .flatten_all()?
                .to_vec1()?;
            sum += Series::mse(&pred, &b.targets) * b.targets.len() as f64;
            n += b.targets.len();
        }
        let mse = sum / n.max(1) as f64;
        let vb: Vec<Vec<f32>> = layers.variate_bias.to_vec2()?;
        let fmt = |v: &[f32]| {
            v.iter()
                .map(|x| format!("{x:+.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Ok(TaskEval {
            loss: mse,
            metric: mse,
            metric_name: "MSE".into(),
            details: format!(
                "variate bias per head: same variate {}, different variate {}",
                fmt(&vb[0]),
                fmt(&vb[1])
            ),
        })
    }

    fn summary(&self, metric: f64) -> String {
        format!(
            "{metric:.4} (last value: {:.4}, seasonal naive: {:.4})",
            self.baseline.0, self.baseline.1
        )
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        if let (Some(t), Some(p)) = (&self.table, &s.csv) {
            return format!(
                "{}: {} variates, {} rows ({} train), {} held-out forecasts of {} values, season {}; patches of {} values packed into rows of {}",
                p.display(), t.names.len(), t.rows, t.split, s.held_out, s.patch, s.period, s.patch, s.row_len
            );
        }
        format!(
            "generated series: samples of 2–{} variates, {}–{} patches of {} values each, packed into rows of {} with a documents mask; {} held-out samples",
            s.max_variates, s.min_patches, s.max_patches, s.patch, s.row_len, s.held_out
        )
    }
}
