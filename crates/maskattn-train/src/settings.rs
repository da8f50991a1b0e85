//! The settings of a run and the rules they obey — the same rules for flags and for a
//! checkpoint's `config.json`, so that a resumed run cannot start from settings a fresh run
//! would refuse.

use std::path::PathBuf;

use anyhow::{bail, Result};
use maskattn_candle::model::LmConfig;
use serde::{Deserialize, Serialize};

use crate::batch::{Layout, Objective};
use crate::finite;

/// The settings a run was started with (a resumed run keeps them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub objective: Objective,
    pub layout: Layout,
    /// `None`: the built-in task.
    pub text: Option<PathBuf>,
    pub seed: u64,
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    #[serde(with = "finite::f64")]
    pub lr: f64,
    pub warmup: u64,
    #[serde(with = "finite::f64")]
    pub min_lr_ratio: f64,
    #[serde(with = "finite::f64")]
    pub clip: f64,
    #[serde(with = "finite::f64")]
    pub weight_decay: f64,
    pub eval_every: u64,
}

/// The defaults of `maskattn train`: next-token objective, packed rows, the built-in
/// task, 500 steps of 16 × 128 tokens, AdamW at 3e-3 (60 warm-up steps, cosine decay to a
/// tenth), clipping at 1, weight decay 0.01, an evaluation every 100 steps, seed 0.
impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            objective: Objective::Clm,
            layout: Layout::Packed,
            text: None,
            seed: 0,
            steps: 500,
            batch: 16,
            seq_len: 128,
            lr: 3e-3,
            warmup: 60,
            min_lr_ratio: 0.1,
            clip: 1.0,
            weight_decay: 0.01,
            eval_every: 100,
        }
    }
}

/// Shortest row that holds a document of the built-in task with room to pack.
pub const MIN_SEQ_LEN: usize = 8;

impl RunSettings {
    /// Checks every setting; errors name the flag that sets it.
    pub fn validate(&self) -> Result<()> {
        if self.seq_len < MIN_SEQ_LEN {
            bail!("--seq-len {}: must be at least {MIN_SEQ_LEN}", self.seq_len);
        }
        if self.batch == 0 {
            bail!("--batch 0: must be at least 1");
        }
        if self.steps == 0 {
            bail!("--steps 0: must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {}: must be a finite number above 0", self.lr);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!(
                "--min-lr-ratio {}: must be between 0 and 1",
                self.min_lr_ratio
            );
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            bail!(
                "--clip {}: must be a finite number ≥ 0 (0: no clipping)",
                self.clip
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay {}: must be a finite number ≥ 0",
                self.weight_decay
            );
        }
        Ok(())
    }
}

/// Checks a model configuration against the run that trains it.
pub fn validate_model(model: &LmConfig, run: &RunSettings) -> Result<()> {
    if !(0.0..1.0).contains(&model.dropout) {
        bail!("--dropout {}: must be in [0, 1)", model.dropout);
    }
    model.validate()?;
    if model.max_len < run.seq_len {
        bail!(
            "the model takes at most {} positions, the rows are {} tokens",
            model.max_len,
            run.seq_len
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> RunSettings {
        RunSettings {
            objective: Objective::Clm,
            layout: Layout::Packed,
            text: None,
            seed: 0,
            steps: 10,
            batch: 2,
            seq_len: 16,
            lr: 1e-3,
            warmup: 2,
            min_lr_ratio: 0.1,
            clip: 1.0,
            weight_decay: 0.01,
            eval_every: 5,
        }
    }

    #[test]
    fn every_bad_setting_is_named() {
        good().validate().unwrap();
        type Spoil = fn(&mut RunSettings);
        let cases: [(&str, Spoil); 12] = [
            ("--seq-len 1", |s| s.seq_len = 1),
            ("--batch 0", |s| s.batch = 0),
            ("--steps 0", |s| s.steps = 0),
            ("--lr NaN", |s| s.lr = f64::NAN),
            ("--lr 0", |s| s.lr = 0.0),
            ("--lr inf", |s| s.lr = f64::INFINITY),
            ("--min-lr-ratio NaN", |s| s.min_lr_ratio = f64::NAN),
            ("--min-lr-ratio -0.5", |s| s.min_lr_ratio = -0.5),
            ("--clip NaN", |s| s.clip = f64::NAN),
            ("--clip -1", |s| s.clip = -1.0),
            ("--weight-decay inf", |s| s.weight_decay = f64::INFINITY),
            ("--weight-decay NaN", |s| s.weight_decay = f64::NAN),
        ];
        for (want, spoil) in cases {
            let mut s = good();
            spoil(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{want}: must be")), "{want}: {e}");
        }
    }
}
