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
use super::figure::{Figure, Line, Panel, Role};
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
/// Held-out variates drawn in the picture of a run.
const PANELS: usize = 6;

/// `values` continuing a line that ended at `(x0 - 1, last)`: points from there on.
pub(crate) fn continuation(x0: f64, last: f64, values: &[f64]) -> Vec<(f64, f64)> {
    std::iter::once((x0 - 1.0, last))
        .chain(values.iter().enumerate().map(|(i, &v)| (x0 + i as f64, v)))
        .collect()
}

/// A panel of `history` (at x = −len … −1) and the `after` lines from x = 0 on, each
/// joined to the history's last point.
fn forecast_panel(title: String, history: &[f32], after: Vec<(&str, Role, &[f32])>) -> Panel {
    let n = history.len() as f64;
    let last = history.last().map_or(0.0, |&v| v as f64);
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let mut lines = vec![Line {
        label: "context".into(),
        role: Role::History,
        points: wide(history)
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as f64 - n, v))
            .collect(),
    }];
    lines.extend(after.into_iter().map(|(label, role, v)| Line {
        label: label.into(),
        role,
        points: continuation(0.0, last, &wide(v)),
    }));
    Panel {
        title,
        lines,
        divider: Some(-0.5),
    }
}

/// The mean and spread (at least 1e-3) a variate's values are normalised by.
pub(crate) fn scale(context: &[f64]) -> (f64, f64) {
    let mean = context.iter().sum::<f64>() / context.len() as f64;
    let var = context.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / context.len() as f64;
    (mean, var.sqrt().max(1e-3))
}

/// Where the next sample goes in a [`Packed`] being filled.
#[derive(Default)]
struct Cursor {
    row: usize,
    col: usize,
    docs: i64,
    vars: i64,
}

impl Packed {
    fn empty(rows: usize, l: usize, p: usize) -> Packed {
        Packed {
            rows,
            values: vec![0.0; rows * l * p],
            forecast: vec![0.0; rows * l],
            time: vec![0; rows * l],
            doc: vec![-1; rows * l],
            var: vec![-1; rows * l],
            at: Vec::new(),
            targets: Vec::new(),
            naive: (Vec::new(), Vec::new()),
        }
    }

    /// Puts `sample` (one document) at the cursor, or in the next row if it does not fit;
    /// false when no row is left.
    fn place(&mut self, sample: &[Variate], l: usize, p: usize, at: &mut Cursor) -> bool {
        let need: usize = sample.iter().map(|v| v.context.len() / p + 1).sum();
        if at.col + need > l {
            at.row += 1;
            at.col = 0;
        }
        if at.row >= self.rows {
            return false;
        }
        for v in sample {
            let n = v.context.len() / p;
            for k in 0..=n {
                let pos = at.row * l + at.col;
                self.doc[pos] = at.docs;
                self.var[pos] = at.vars;
                self.time[pos] = (n - k) as u32;
                if k < n {
                    self.values[pos * p..(pos + 1) * p]
                        .copy_from_slice(&v.context[k * p..(k + 1) * p]);
                } else {
                    self.forecast[pos] = 1.0;
                    self.at.push(pos as u32);
                    self.targets.extend_from_slice(&v.target);
                    let last = *v.context.last().expect("a context");
                    self.naive.0.extend(std::iter::repeat_n(last, p));
                    let c = v.context.len();
                    // The last season repeated.
                    let season = |h: usize| v.context[c - v.period + h % v.period];
                    self.naive.1.extend((0..p).map(season));
                }
                at.col += 1;
            }
            at.vars += 1;
        }
        at.docs += 1;
        true
    }
}

impl Variate {
    /// `context` and `target` in the units of `context`'s mean and spread (RevIN-style).
    fn normalised(context: &[f64], target: &[f64], period: usize) -> Variate {
        let (mean, sd) = scale(context);
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
        let mut b = Packed::empty(rows, l, p);
        let mut at = Cursor::default();
        while limit.is_none_or(|n| (at.docs as usize) < n) {
            let sample = self.sample(rng, held_out);
            if !b.place(&sample, l, p, &mut at) {
                break;
            }
        }
        b
    }

    /// A batch of `samples` to forecast, each a document of variates' contexts already
    /// normalised (whole patches, 1 to `max_patches` of them); as many rows as they take.
    /// The targets are unknown (zeros).
    pub fn batch_of(&self, samples: &[Vec<Vec<f32>>]) -> Result<Packed> {
        let s = &self.settings;
        let (l, p) = (s.row_len, s.patch);
        let mut all = Vec::new();
        for (i, sample) in samples.iter().enumerate() {
            let mut vs = Vec::new();
            for c in sample {
                let n = c.len() / p;
                if c.len() % p != 0 || n == 0 || n > s.max_patches {
                    bail!(
                        "sample {i}: a context of {} values is not 1 to {} whole patches of {p}",
                        c.len(),
                        s.max_patches
                    );
                }
                vs.push(Variate {
                    context: c.clone(),
                    target: vec![0.0; p],
                    period: p,
                });
            }
            let need: usize = vs.iter().map(|v| v.context.len() / p + 1).sum();
            if need > l {
                bail!("sample {i}: {need} tokens do not fit a row of {l}");
            }
            all.push(vs);
        }
        let mut b = Packed::empty(all.len(), l, p);
        let mut at = Cursor::default();
        for sample in &all {
            b.place(sample, l, p, &mut at);
        }
        // Only the rows used (a placed sample leaves the cursor in its row).
        b.rows = if all.is_empty() { 1 } else { at.row + 1 };
        b.values.truncate(b.rows * l * p);
        b.forecast.truncate(b.rows * l);
        b.time.truncate(b.rows * l);
        b.doc.truncate(b.rows * l);
        b.var.truncate(b.rows * l);
        Ok(b)
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

    /// The settings' own consistency (the data aside).
    fn check(s: &SeriesSettings) -> Result<()> {
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
        Ok(())
    }

    /// The task without its data, for forecasting with a trained model
    /// ([`super::series_forecast`]): the settings checked, no file read, nothing held out.
    pub fn for_forecasting(settings: SeriesSettings) -> Result<Series> {
        Series::check(&settings)?;
        Ok(Series {
            settings,
            table: None,
            held_out: Vec::new(),
            baseline: (f64::NAN, f64::NAN),
        })
    }

    /// MSE of the last-value and the seasonal-naive forecasts on the held-out samples.
    pub fn naive_mse(&self) -> (f64, f64) {
        self.baseline
    }

    /// The forecasts `[n, patch]` of the forecast tokens of `b` (in the order the samples
    /// and their variates were packed), from the encoder's output `hidden`.
    pub fn forecasts(&self, layers: &SeriesLayers, hidden: &Tensor, b: &Packed) -> Result<Tensor> {
        let d = hidden.dim(2)?;
        let flat = hidden.reshape((b.rows * self.settings.row_len, d))?;
        let idx = Tensor::from_slice(&b.at, b.at.len(), &Device::Cpu)?;
        Ok(layers.head.forward(&flat.index_select(&idx, 0)?)?)
    }

    /// Which of the two biases each pair takes, one-hot `[B, 2, L·L]`: row 0 is 1 where
    /// both tokens are of one variate, row 1 is 1 elsewhere.
    fn same_variate(&self, b: &Packed) -> Result<Tensor> {
        let l = self.settings.row_len;
        let mut onehot = vec![0f32; b.rows * 2 * l * l];
        for r in 0..b.rows {
            let (same, other) = onehot[r * 2 * l * l..(r + 1) * 2 * l * l].split_at_mut(l * l);
            for i in 0..l {
                let vi = b.var[r * l + i];
                for j in 0..l {
                    let s = vi >= 0 && b.var[r * l + j] == vi;
                    same[i * l + j] = s as u8 as f32;
                    other[i * l + j] = (!s) as u8 as f32;
                }
            }
        }
        Ok(Tensor::from_vec(onehot, (b.rows, 2, l * l), &Device::Cpu)?)
    }
}

impl Task for Series {
    const NAME: &'static str = "series";
    type Settings = SeriesSettings;
    type Layers = SeriesLayers;
    type Batch = Packed;

    fn new(settings: SeriesSettings, seed: u64) -> Result<Self> {
        Series::check(&settings)?;
        let s = &settings;
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
        // bias[b, h, ·] = table[h, ·] @ onehot[b]: [H, 2] @ [B, 2, L·L] → [B, H, L·L]. As a
        // product, the gradient's sum over the B·L·L pairs runs in the matrix product's
        // kernel; as broadcast element-wise ops it ran in candle's single-threaded
        // reductions (a fifth of a step on the AVX2 path).
        let bias = layers
            .variate_bias
            .t()?
            .broadcast_matmul(&self.same_variate(b)?)?
            .reshape((b.rows, h, l, l))?;
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

    /// The first held-out samples' variates: context, truth, the model's forecast and the
    /// seasonal-naive one.
    fn figures(
        &self,
        layers: &SeriesLayers,
        forward: &mut dyn FnMut(&Packed) -> Result<Tensor>,
    ) -> Result<Vec<Figure>> {
        let Some(b) = self.held_out.first() else {
            return Ok(Vec::new());
        };
        let pred: Vec<f32> = self
            .forecasts(layers, &forward(b)?, b)?
            .flatten_all()?
            .to_vec1()?;
        let p = self.settings.patch;
        let mut panels = Vec::new();
        let mut context: Vec<f32> = Vec::new();
        let (mut k, mut in_doc, mut doc) = (0usize, 0usize, -1i64);
        // Positions in packing order: a variate's patches, then its forecast token.
        for pos in 0..b.doc.len() {
            if b.var[pos] < 0 {
                continue;
            }
            if b.forecast[pos] == 0.0 {
                context.extend_from_slice(&b.values[pos * p..(pos + 1) * p]);
                continue;
            }
            if b.doc[pos] != doc {
                (doc, in_doc) = (b.doc[pos], 0);
            }
            let f = k * p..(k + 1) * p;
            panels.push(forecast_panel(
                format!("sample {doc}, variate {in_doc}"),
                &context,
                vec![
                    ("truth", Role::Truth, &b.targets[f.clone()]),
                    ("model", Role::Model, &pred[f.clone()]),
                    ("seasonal naive", Role::Baseline, &b.naive.1[f]),
                ],
            ));
            if panels.len() == PANELS {
                break;
            }
            (k, in_doc) = (k + 1, in_doc + 1);
            context.clear();
        }
        Ok(vec![Figure {
            name: "forecast".into(),
            title: "held-out forecasts against the truth (seasonal naive dashed)".into(),
            x_label: "steps from the forecast".into(),
            y_label: "value (normalised by the context)".into(),
            panels,
        }])
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
