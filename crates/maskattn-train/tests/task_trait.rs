//! A task written outside the crate, through the `Task` trait alone: continuous inputs
//! (vectors, entering through the task's own embedding), bidirectional attention, a
//! classifier on the mean of the encoder's outputs. The label is the coordinate with the
//! largest sum over the sequence: it needs every position, which attention gives.

use anyhow::Result;
use candle_core::{Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use maskattn::Mask;
use maskattn_train::rng::Rng;
use maskattn_train::task::{Input, Task, TaskEval, TaskTrainer, Trunk};
use maskattn_train::RunSettings;

const DIM: usize = 4;
const LEN: usize = 12;

struct Largest {
    settings: usize,
    held_out: Vec<f32>,
}

struct Layers {
    embed: Linear,
    head: Linear,
}

/// Vectors `[rows, LEN, DIM]` and their labels.
struct Batch {
    rows: usize,
    x: Vec<f32>,
}

fn draw(rows: usize, rng: &mut Rng) -> Vec<f32> {
    (0..rows * LEN * DIM).map(|_| rng.normal() as f32).collect()
}

fn labels(x: &[f32]) -> Vec<u32> {
    x.chunks(LEN * DIM)
        .map(|row| {
            let sums: Vec<f32> = (0..DIM)
                .map(|c| (0..LEN).map(|t| row[t * DIM + c]).sum())
                .collect();
            (0..DIM)
                .max_by(|&a, &b| sums[a].total_cmp(&sums[b]))
                .unwrap() as u32
        })
        .collect()
}

impl Largest {
    fn logits(&self, l: &Layers, hidden: &Tensor) -> Result<Tensor> {
        Ok(l.head.forward(&hidden.mean(1)?)?)
    }
}

impl Task for Largest {
    const NAME: &'static str = "largest";
    type Settings = usize;
    type Layers = Layers;
    type Batch = Batch;

    fn new(held_out: usize, seed: u64) -> Result<Self> {
        Ok(Largest {
            settings: held_out,
            held_out: draw(held_out, &mut Rng::at(seed, 1, 0)),
        })
    }
    fn settings(&self) -> &usize {
        &self.settings
    }
    fn row_len(&self) -> usize {
        LEN
    }
    fn layers(&self, vb: VarBuilder, trunk: &Trunk) -> candle_core::Result<Layers> {
        Ok(Layers {
            embed: candle_nn::linear(DIM, trunk.d_model, vb.pp("embed"))?,
            head: candle_nn::linear(trunk.d_model, DIM, vb.pp("head"))?,
        })
    }
    fn train_batch(&self, seed: u64, step: u64, rows: usize) -> Result<Batch> {
        Ok(Batch {
            rows,
            x: draw(rows, &mut Rng::at(seed, 2, step)),
        })
    }
    fn input(&self, l: &Layers, b: &Batch, _trunk: &Trunk) -> Result<Input> {
        let x = Tensor::from_slice(&b.x, (b.rows, LEN, DIM), &Device::Cpu)?;
        Ok(Input {
            x: l.embed.forward(&x)?,
            mask: Mask::full(),
            layer_masks: None,
            bias: None,
        })
    }
    fn loss(&self, l: &Layers, hidden: &Tensor, b: &Batch) -> Result<Tensor> {
        let y = Tensor::new(labels(&b.x), &Device::Cpu)?;
        Ok(candle_nn::loss::cross_entropy(
            &self.logits(l, hidden)?,
            &y,
        )?)
    }
    fn evaluate(
        &self,
        l: &Layers,
        forward: &mut dyn FnMut(&Batch) -> Result<Tensor>,
    ) -> Result<TaskEval> {
        let b = Batch {
            rows: self.settings,
            x: self.held_out.clone(),
        };
        let logits = self.logits(l, &forward(&b)?)?;
        let y = labels(&b.x);
        let loss =
            candle_nn::loss::cross_entropy(&logits, &Tensor::new(y.as_slice(), &Device::Cpu)?)?;
        let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let right = pred.iter().zip(&y).filter(|(a, b)| a == b).count();
        Ok(TaskEval {
            loss: loss.to_scalar::<f32>()? as f64,
            metric: right as f64 / y.len() as f64,
            metric_name: "accuracy".into(),
            details: String::new(),
        })
    }
}

#[test]
fn a_task_of_ones_own_trains_and_resumes() {
    let trunk = Trunk {
        d_model: 32,
        layers: 1,
        heads: 2,
        d_ff: 64,
    };
    let run = RunSettings {
        steps: 120,
        batch: 32,
        warmup: 10,
        eval_every: 60,
        ..RunSettings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut t = TaskTrainer::new(Largest::new(256, 0).unwrap(), trunk, run, dir.path()).unwrap();
    t.run(&mut ()).unwrap();
    let e = t.state().evals.last().unwrap();
    // Chance is 25%.
    assert!(e.metric > 0.6, "accuracy {}", e.metric);
    // The checkpoint names the task and continues it.
    let mut more = TaskTrainer::<Largest>::resume(dir.path(), Some(130)).unwrap();
    more.run(&mut ()).unwrap();
    assert_eq!(more.state().step, 130);
    assert_eq!(more.state().task.as_ref().unwrap().name, "largest");
}
