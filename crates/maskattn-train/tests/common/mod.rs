//! What the task tests share: a small trunk, a short run's settings, a run's weights by
//! name, and hooks that stop a run at a step. Each test file takes what it uses.
#![allow(dead_code)]

use maskattn_train::task::{Task, TaskTrainer, Trunk};
use maskattn_train::RunSettings;

/// A small encoder: 2 layers of width 32, 2 heads.
pub const TRUNK: Trunk = Trunk {
    d_model: 32,
    layers: 2,
    heads: 2,
    d_ff: 64,
};

/// `steps` of `batch` rows, 10 of warm-up, one evaluation at the end.
pub fn run(steps: u64, batch: usize) -> RunSettings {
    RunSettings {
        steps,
        batch,
        warmup: 10,
        eval_every: steps,
        ..RunSettings::default()
    }
}

/// The variables of a run, by name, as f32 vectors.
pub fn weights<T: Task>(t: &TaskTrainer<T>) -> Vec<(String, Vec<f32>)> {
    let data = t.vars().data().lock().unwrap();
    let mut all: Vec<_> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Hooks that stop a run once it has made `.0` steps (a checkpoint is saved).
pub struct StopAt(pub u64);

impl maskattn_train::Hooks for StopAt {
    fn stop(&mut self, s: &maskattn_train::State) -> bool {
        s.step == self.0
    }
}
