//! [`TaskTrainer`]: the training loop of a [`Task`] — the text trainer's optimiser,
//! schedule, clipping, checkpoints, divergence checks and [`Hooks`], around the shared
//! [`Encoder`] and the task's own layers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use maskattn_candle::model::{LmConfig, Positions};

use super::api::{Task, TaskEval};
use super::encoder::{Encoder, Trunk};
use super::figure::Figure;
use super::spec::TaskSpec;
use crate::checkpoint::{self, Eval, RunSettings, State};
use crate::optim::{self, AdamW};
use crate::trainer::{init, prepare_out, Diverged, Hooks, Outcome, RunReport, StepReport};
use crate::vocab::VocabSpec;

/// A [`Task`] in training: the task, its layers and the encoder, the optimiser and history.
pub struct TaskTrainer<T: Task> {
    task: T,
    layers: T::Layers,
    encoder: Encoder,
    vars: VarMap,
    opt: AdamW,
    state: State,
    out: PathBuf,
    saved: Option<u64>,
    stop: Arc<AtomicBool>,
    /// [`TaskEval::details`] of the last evaluation.
    details: String,
}

/// The task's model: encoder under `encoder.`, the task's layers under `task.`.
fn build<T: Task>(task: &T, trunk: &Trunk) -> Result<(VarMap, Encoder, T::Layers)> {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let encoder = Encoder::new(*trunk, vb.pp("encoder"))?;
    let layers = task.layers(vb.pp("task"), trunk)?;
    Ok((vars, encoder, layers))
}

/// The language-model fields of the checkpoint's state, describing the encoder (the
/// checkpoint's checks apply to them as to a text run's).
fn lm_config(trunk: &Trunk, len: usize) -> LmConfig {
    LmConfig {
        vocab: 1,
        d_model: trunk.d_model,
        layers: trunk.layers,
        heads: trunk.heads,
        kv_heads: trunk.heads,
        d_ff: trunk.d_ff,
        max_len: len,
        positions: Positions::Learned,
        dropout: 0.0,
        softcap: None,
        sinks: false,
    }
}

impl<T: Task> TaskTrainer<T> {
    /// A fresh run of `task` on an encoder of shape `trunk`. `run.seq_len` is set to the
    /// task's row length; `run.text` must be `None`. Checkpoints go to `out`.
    pub fn new(task: T, trunk: Trunk, mut run: RunSettings, out: &Path) -> Result<Self> {
        trunk.validate()?;
        if run.text.is_some() {
            bail!("--text: the {} task makes its own data", T::NAME);
        }
        run.seq_len = task.row_len().max(crate::settings::MIN_SEQ_LEN);
        run.validate()?;
        prepare_out(out)?;
        let (vars, encoder, layers) = build(&task, &trunk)?;
        init(&vars, run.seed)?;
        let opt = AdamW::new(&vars, run.weight_decay)?;
        let state = State {
            config_hash: String::new(),
            format: checkpoint::FORMAT,
            files: None,
            model: lm_config(&trunk, run.seq_len),
            vocab: VocabSpec::Bytes,
            run,
            step: 0,
            losses: Vec::new(),
            evals: Vec::new(),
            hashes: Default::default(),
            task: Some(TaskSpec {
                name: T::NAME.into(),
                settings: serde_json::to_value(task.settings())?,
                trunk,
            }),
        };
        Ok(TaskTrainer {
            task,
            layers,
            encoder,
            vars,
            opt,
            state,
            out: out.to_path_buf(),
            saved: None,
            stop: Arc::new(AtomicBool::new(false)),
            details: String::new(),
        })
    }

    /// Continues the run of this task saved in `dir`; `steps` extends it.
    pub fn resume(dir: &Path, steps: Option<u64>) -> Result<Self> {
        let checkpoint::Loaded {
            mut state,
            model: model_t,
            optimizer: opt_t,
            ..
        } = checkpoint::load(dir)?;
        let Some(spec) = state.task.clone() else {
            bail!(
                "{}: a language-model checkpoint, not one of the {} task",
                dir.display(),
                T::NAME
            );
        };
        if spec.name != T::NAME {
            bail!(
                "{}: a checkpoint of the `{}` task, not of `{}`",
                dir.display(),
                spec.name,
                T::NAME
            );
        }
        let settings: T::Settings = serde_json::from_value(spec.settings)
            .with_context(|| format!("{}: the task's settings", dir.display()))?;
        let task = T::new(settings, state.run.seed)?;
        let (vars, encoder, layers) = build(&task, &spec.trunk)?;
        checkpoint::restore(&vars, &model_t)?;
        let mut opt = AdamW::new(&vars, state.run.weight_decay)?;
        opt.load_state(&opt_t, state.step)?;
        match steps {
            Some(n) if n < state.step => bail!(
                "--steps {n}: the checkpoint is already at step {}",
                state.step
            ),
            Some(n) => state.run.steps = n,
            None => {}
        }
        prepare_out(dir)?;
        Ok(TaskTrainer {
            task,
            layers,
            encoder,
            vars,
            opt,
            saved: Some(state.step),
            state,
            out: dir.to_path_buf(),
            stop: Arc::new(AtomicBool::new(false)),
            details: String::new(),
        })
    }

    pub fn task(&self) -> &T {
        &self.task
    }

    pub fn layers(&self) -> &T::Layers {
        &self.layers
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    pub fn out(&self) -> &Path {
        &self.out
    }

    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The encoder's output `[B, L, d_model]` for `batch`.
    pub fn hidden(&self, batch: &T::Batch) -> Result<Tensor> {
        let trunk = self.encoder.trunk();
        let input = self.task.input(&self.layers, batch, trunk)?;
        let masks = input.masks(trunk.layers);
        Ok(self
            .encoder
            .forward_layers(&input.x, &masks, input.bias.as_ref())?)
    }

    /// Layer `layer`'s attention weights `[B, heads, L, L]` for `batch` (detached; for
    /// pictures).
    pub fn attention_weights(&self, batch: &T::Batch, layer: usize) -> Result<Tensor> {
        let trunk = self.encoder.trunk();
        let input = self.task.input(&self.layers, batch, trunk)?;
        let masks = input.masks(trunk.layers);
        Ok(self
            .encoder
            .attention_weights(&input.x, &masks, input.bias.as_ref(), layer)?)
    }

    fn diverged(&self, step: u64, what: String) -> anyhow::Error {
        Diverged {
            step,
            what,
            out: self.out.clone(),
            saved: self.saved,
        }
        .into()
    }

    /// One optimisation step (a non-finite loss or weight is a [`Diverged`] error).
    pub fn step(&mut self) -> Result<StepReport> {
        let s = &self.state.run;
        let step = self.state.step;
        let b = self.task.train_batch(s.seed, step, s.batch)?;
        let hidden = self.hidden(&b)?;
        let l = self.task.loss(&self.layers, &hidden, &b)?;
        let mut grads = l.backward()?;
        let vars: Vec<_> = self.opt.vars().cloned().collect();
        optim::clip(&mut grads, &vars, s.clip)?;
        let lr = optim::lr_at(step, s.warmup, s.steps, s.lr, s.min_lr_ratio);
        self.opt.step(&grads, lr)?;
        let lv = l.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(self.diverged(step + 1, format!("the training loss is {lv}")));
        }
        if let Some(name) = self.opt.non_finite()? {
            let what = format!("the weights `{name}` are no longer finite");
            return Err(self.diverged(step + 1, what));
        }
        self.state.losses.push(lv);
        self.state.step += 1;
        Ok(StepReport {
            step: self.state.step,
            loss: lv,
            lr,
            tokens: s.batch * s.seq_len,
        })
    }

    /// The held-out figures of the current weights (not recorded in the history).
    pub fn evaluate(&self) -> Result<TaskEval> {
        self.task
            .evaluate(&self.layers, &mut |b: &T::Batch| self.hidden(b))
    }

    /// The task's pictures of the current weights ([`Task::figures`]).
    pub fn figures(&self) -> Result<Vec<Figure>> {
        self.task
            .figures(&self.layers, &mut |b: &T::Batch| self.hidden(b))
    }

    /// [`evaluate`](Self::evaluate) as the history keeps it; its details kept for
    /// [`details`](Self::details).
    fn evaluate_now(&mut self) -> Result<Eval> {
        let e = self.evaluate()?;
        self.details = e.details;
        Ok(Eval {
            step: self.state.step,
            loss: e.loss,
            metric: e.metric,
            metric_name: e.metric_name,
        })
    }

    /// The details line of the last evaluation in [`run`](Self::run) (empty before one).
    pub fn details(&self) -> &str {
        &self.details
    }

    /// Saves a checkpoint (as the text trainer's: a failure leaves the previous one).
    pub fn save(&mut self) -> Result<()> {
        let model: HashMap<String, Tensor> = self
            .vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let contents = checkpoint::Contents {
            model: &model,
            optimizer: &self.opt.state(),
            tokenizer: None,
        };
        checkpoint::save(&self.out, &mut self.state, &contents)?;
        self.saved = Some(self.state.step);
        Ok(())
    }

    /// Trains to the last step as [`crate::Trainer::run`] does: evaluations and checkpoints
    /// every `eval_every` steps and at the end, the stop flag and [`Hooks::stop`] honoured.
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Result<RunReport> {
        if self.state.step == 0 && self.state.evals.is_empty() {
            let e = self.evaluate_now()?;
            self.state.evals.push(e);
        }
        let started = Instant::now();
        let mut report = RunReport {
            outcome: Outcome::Finished,
            steps: 0,
            tokens: 0,
            secs: 0.0,
            eval_secs: 0.0,
        };
        let every = self.state.run.eval_every.max(1);
        while self.state.step < self.state.run.steps {
            let stop = if self.stop.load(Ordering::SeqCst) {
                Some(Outcome::Interrupted)
            } else if hooks.stop(&self.state) {
                Some(Outcome::Stopped)
            } else {
                None
            };
            if let Some(outcome) = stop {
                self.save()?;
                report.outcome = outcome;
                break;
            }
            let r = self.step()?;
            report.steps += 1;
            report.tokens += r.tokens;
            hooks.on_step(&r);
            if r.step % every == 0 || r.step == self.state.run.steps {
                let t = Instant::now();
                let e = self.evaluate_now()?;
                let secs = t.elapsed().as_secs_f64();
                report.eval_secs += secs;
                if !e.loss.is_finite() {
                    return Err(self.diverged(e.step, format!("the held-out loss is {}", e.loss)));
                }
                hooks.on_eval(&e, secs);
                self.state.evals.push(e);
                self.save()?;
            }
        }
        report.secs = started.elapsed().as_secs_f64();
        Ok(report)
    }
}
