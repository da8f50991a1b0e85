//! Forecasting a user's series with a trained [`series`](super::series) model (`maskattn
//! forecast`). Each variate is forecast from its most recent context — its last whole
//! patches, at most the longest context the model trained on — normalised as in training
//! (by that context's own mean and spread); the next patch is read off its forecast token
//! and turned back into the series' units. A longer horizon feeds the forecasts back as if
//! they had happened, a patch at a time.
//!
//! The model was trained on samples of 1 to `max_variates` variates, and nothing in it
//! tells variates apart but the same/different-variate bias: so it takes any number of
//! columns, forecast in groups of at most `max_variates` consecutive columns, each group
//! one sample (a document of the packed batch, as in training).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::api::Task;
use super::encoder::{Encoder, Trunk};
use super::figure::{Figure, Line, Panel, Role};
use super::series::{continuation, scale, Series, SeriesLayers, SeriesSettings};
use super::series_csv::Table;
use crate::checkpoint;

/// The most patches `forecast` feeds back: a horizon far past what the contexts say is a
/// guess of a guess, and an unbounded one a long wait.
pub const MAX_HORIZON_PATCHES: usize = 64;

/// A trained `series` model, read from its checkpoint.
pub struct Forecaster {
    series: Series,
    layers: SeriesLayers,
    encoder: Encoder,
    trunk: Trunk,
    step: u64,
}

impl Forecaster {
    /// The model of the `series` checkpoint in `dir` (the data it was trained on is not
    /// needed). Any other checkpoint is refused naming `--checkpoint`.
    pub fn open(dir: &Path) -> Result<Forecaster> {
        let what = || format!("--checkpoint {}", dir.display());
        let loaded = checkpoint::load(dir).with_context(what)?;
        let Some(spec) = loaded.state.task.clone() else {
            bail!(
                "{}: a language-model checkpoint, not one of the `series` task (`maskattn train --task series` makes one)",
                what()
            );
        };
        if spec.name != Series::NAME {
            bail!(
                "{}: a checkpoint of the `{}` task, not of `series`",
                what(),
                spec.name
            );
        }
        let settings: SeriesSettings = serde_json::from_value(spec.settings)
            .with_context(|| format!("{}: the task's settings", what()))?;
        let series = Series::for_forecasting(settings).with_context(what)?;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let encoder = Encoder::new(spec.trunk, vb.pp("encoder"))?;
        let layers = series.layers(vb.pp("task"), &spec.trunk)?;
        checkpoint::restore(&vars, &loaded.model).with_context(what)?;
        Ok(Forecaster {
            series,
            layers,
            encoder,
            trunk: spec.trunk,
            step: loaded.state.step,
        })
    }

    pub fn settings(&self) -> &SeriesSettings {
        self.series.settings()
    }

    /// The training step the checkpoint was saved at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The values a variate needs at least: the shortest context the model trained on.
    pub fn shortest(&self) -> usize {
        let s = self.settings();
        s.min_patches * s.patch
    }

    /// How many of a variate's last `available` values it is forecast from: whole patches,
    /// at most the longest context the model trained on.
    pub fn context_len(&self, available: usize) -> usize {
        let s = self.settings();
        available.min(s.max_patches * s.patch) / s.patch * s.patch
    }

    /// The next patch after each variate of each sample, in the series' units. A sample's
    /// variates end at the same time; each context is whole patches, 1 to `max_patches`.
    pub fn next_patch(&self, samples: &[Vec<Vec<f64>>]) -> Result<Vec<Vec<Vec<f64>>>> {
        let scales: Vec<Vec<(f64, f64)>> = samples
            .iter()
            .map(|s| s.iter().map(|c| scale(c)).collect())
            .collect();
        let normed: Vec<Vec<Vec<f32>>> = samples
            .iter()
            .zip(&scales)
            .map(|(s, sc)| {
                s.iter()
                    .zip(sc)
                    .map(|(c, &(m, sd))| c.iter().map(|x| ((x - m) / sd) as f32).collect())
                    .collect()
            })
            .collect();
        let b = self.series.batch_of(&normed)?;
        let input = self.series.input(&self.layers, &b, &self.trunk)?;
        let hidden = self
            .encoder
            .forward(&input.x, &input.mask, input.bias.as_ref())?;
        let pred: Vec<f32> = self
            .series
            .forecasts(&self.layers, &hidden, &b)?
            .flatten_all()?
            .to_vec1()?;
        // The forecast tokens come in packing order: sample by sample, variate by variate.
        let p = self.settings().patch;
        let mut k = 0;
        Ok(scales
            .iter()
            .map(|sc| {
                sc.iter()
                    .map(|&(m, sd)| {
                        let f = pred[k * p..(k + 1) * p].iter();
                        k += 1;
                        f.map(|&y| y as f64 * sd + m).collect()
                    })
                    .collect()
            })
            .collect())
    }

    /// The `horizon` values (a multiple of the patch) after the last row of every column
    /// of `table`, one vector per column.
    pub fn forecast(&self, table: &Table, horizon: usize) -> Result<Vec<Vec<f64>>> {
        let p = self.settings().patch;
        if horizon == 0 || !horizon.is_multiple_of(p) || horizon / p > MAX_HORIZON_PATCHES {
            bail!(
                "--horizon {horizon}: must be a multiple of the model's patch, {p}, up to {}",
                MAX_HORIZON_PATCHES * p
            );
        }
        for (name, v) in table.names.iter().zip(&table.values) {
            if v.len() < self.shortest() {
                bail!(
                    "--csv: column `{name}` has {} values; the model forecasts from at least {} (its shortest training context)",
                    v.len(),
                    self.shortest()
                );
            }
        }
        let mut series = table.values.clone();
        let cols: Vec<usize> = (0..series.len()).collect();
        let groups: Vec<&[usize]> = cols.chunks(self.settings().max_variates).collect();
        for _ in 0..horizon / p {
            let samples: Vec<Vec<Vec<f64>>> = groups
                .iter()
                .map(|g| {
                    g.iter()
                        .map(|&c| {
                            let s = &series[c];
                            s[s.len() - self.context_len(s.len())..].to_vec()
                        })
                        .collect()
                })
                .collect();
            let next = self.next_patch(&samples)?;
            for (g, f) in groups.iter().zip(next) {
                for (&c, f) in g.iter().zip(f) {
                    series[c].extend(f);
                }
            }
        }
        Ok(series
            .into_iter()
            .zip(&table.values)
            .map(|(s, v)| s[v.len()..].to_vec())
            .collect())
    }

    /// A panel per column: its recent values (by the file's row, 0 the first data row) and
    /// `forecast` after them.
    pub fn figure(&self, table: &Table, forecast: &[Vec<f64>]) -> Figure {
        let s = self.settings();
        let shown = 2 * s.max_patches * s.patch;
        let rows = table.rows as f64;
        let panels = table
            .names
            .iter()
            .zip(&table.values)
            .zip(forecast)
            .map(|((name, v), f)| {
                let recent = &v[v.len().saturating_sub(shown)..];
                let x0 = rows - recent.len() as f64;
                let last = *v.last().expect("a column has values");
                Panel {
                    title: name.clone(),
                    lines: vec![
                        Line {
                            label: "recent values".into(),
                            role: Role::History,
                            points: recent
                                .iter()
                                .enumerate()
                                .map(|(i, &y)| (x0 + i as f64, y))
                                .collect(),
                        },
                        Line {
                            label: "forecast".into(),
                            role: Role::Model,
                            points: continuation(rows, last, f),
                        },
                    ],
                    divider: Some(rows - 0.5),
                }
            })
            .collect();
        Figure {
            name: "forecast".into(),
            title: format!(
                "forecast of the next {} values (model at step {})",
                forecast.first().map_or(0, Vec::len),
                self.step
            ),
            x_label: "row".into(),
            y_label: "value".into(),
            panels,
        }
    }
}
