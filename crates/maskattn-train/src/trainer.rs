//! The training loop: a [`Trainer`] holds the model, its optimizer, the data and the run's
//! state; [`Trainer::run`] trains to the end (evaluating and saving checkpoints on the way)
//! and reports through [`Hooks`]; [`Trainer::step`], [`Trainer::evaluate`] and
//! [`Trainer::save`] are the pieces, for a loop of your own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use maskattn_candle::model::{LmConfig, TinyLm};
use maskattn_candle::Mode;

use crate::batch::{self, Batch};
use crate::checkpoint::{self, Eval, RunSettings, State};
use crate::corpus::{self, Corpus};
use crate::durable;
use crate::eval;
use crate::loss::loss;
use crate::optim::{self, AdamW};
use crate::rng::Rng;
use crate::settings;
use crate::vocab::{Vocab, VocabSpec};

/// Documents of the built-in task: to train on, and held out.
const TRAIN_DOCS: usize = 20_000;
const HELD_OUT_DOCS: usize = 512;

/// What one optimisation step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Updates done, this one included.
    pub step: u64,
    /// Training loss of the batch (before the update).
    pub loss: f32,
    /// Learning rate of the update.
    pub lr: f64,
    /// Real tokens in the batch.
    pub tokens: usize,
}

/// Why [`Trainer::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All `steps` done.
    Finished,
    /// The stop flag ([`Trainer::stop_flag`]) was raised.
    Interrupted,
    /// [`Hooks::stop`] asked to stop.
    Stopped,
}

/// What [`Trainer::run`] did: why it returned, and where the time went.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub outcome: Outcome,
    /// Steps done by this call.
    pub steps: u64,
    /// Real tokens trained on by this call.
    pub tokens: usize,
    /// Seconds from the first step to the end (evaluations included).
    pub secs: f64,
    /// Seconds spent evaluating.
    pub eval_secs: f64,
}

/// Callbacks of [`Trainer::run`]; every method has a default that does nothing.
pub trait Hooks {
    /// After every step.
    fn on_step(&mut self, _report: &StepReport) {}
    /// After every evaluation (its checkpoint is saved next), with the seconds it took.
    fn on_eval(&mut self, _eval: &Eval, _secs: f64) {}
    /// Asked before every step: `true` saves a checkpoint and returns
    /// [`Outcome::Stopped`].
    fn stop(&mut self, _state: &State) -> bool {
        false
    }
}

/// Hooks that do nothing.
impl Hooks for () {}

/// A run that diverged: a NaN or an infinity in the loss or the weights. Nothing was saved
/// after it: the checkpoint on disk (if any) is the last good one.
#[derive(Debug)]
pub struct Diverged {
    /// The update that went wrong (1 is the first).
    pub step: u64,
    /// What became non-finite.
    pub what: String,
    /// The checkpoint folder, and the step of the checkpoint of this run it holds.
    pub out: PathBuf,
    pub saved: Option<u64>,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let kept = match self.saved {
            Some(s) => format!("{} keeps the checkpoint of step {s}", self.out.display()),
            None => format!(
                "no checkpoint of this run was written to {}",
                self.out.display()
            ),
        };
        write!(
            f,
            "training diverged at step {}: {}; nothing saved ({kept}); try a smaller --lr",
            self.step, self.what
        )
    }
}

impl std::error::Error for Diverged {}

/// A model in training, with its optimizer, data and history.
pub struct Trainer {
    state: State,
    vocab: Vocab,
    /// The `tokenizer.json` bytes (Hugging Face vocabulary), saved with every checkpoint.
    tokenizer: Option<Vec<u8>>,
    corpus: Corpus,
    vars: VarMap,
    model: TinyLm,
    opt: AdamW,
    /// The folder checkpoints go to, and the step of the last one saved there.
    out: PathBuf,
    saved: Option<u64>,
    stop: Arc<AtomicBool>,
}

fn load_corpus(run: &RunSettings, vocab: &Vocab) -> Result<Corpus> {
    match &run.text {
        None => Ok(corpus::majority(run.seed, TRAIN_DOCS, HELD_OUT_DOCS)),
        Some(p) => corpus::text(p, vocab, run.seq_len - 1),
    }
}

/// Seeded initialisation (candle's CPU generator cannot be seeded): weights uniform in
/// ±1/√fan_in, embeddings N(0, 0.02), norm gains 1, biases 0.
pub fn init(vars: &VarMap, seed: u64) -> Result<()> {
    let data = vars.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let mut rng = Rng::at(seed, 7, i as u64);
        let n = var.elem_count();
        let vals: Vec<f32> = if name.contains(".ln") || name.starts_with("ln_f") {
            vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
        } else if name.ends_with("_emb.weight") {
            (0..n).map(|_| (0.02 * rng.normal()) as f32).collect()
        } else {
            let fan_in = *var.dims().last().unwrap_or(&1) as f64;
            let fan_in = if var.rank() == 1 {
                (n as f64).max(1.0)
            } else {
                fan_in
            };
            let bound = 1.0 / fan_in.sqrt();
            (0..n)
                .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(vals, var.dims(), &Device::Cpu)?)?;
    }
    Ok(())
}

/// The model of `cfg`, its variables not yet initialised.
pub fn build_model(cfg: &LmConfig) -> Result<(VarMap, TinyLm)> {
    let vars = VarMap::new();
    let model = TinyLm::new(
        cfg.clone(),
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )?;
    Ok((vars, model))
}

fn weights(vars: &VarMap) -> HashMap<String, Tensor> {
    vars.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// The vocabulary a checkpoint names (its file in `files`), which must be the model's.
fn open_vocab(state: &State, files: &Path) -> Result<Vocab> {
    let vocab = Vocab::from_spec(&state.vocab, files)?;
    if vocab.size() != state.model.vocab {
        bail!(
            "{}: the tokenizer has {} tokens, the model {}",
            files.display(),
            vocab.size(),
            state.model.vocab
        );
    }
    Ok(vocab)
}

/// An output folder: an existing folder or a new one, made now (so that a bad folder fails
/// before training, not at the first checkpoint); its `config.json`, if any, must be a
/// regular file (never a link to replace).
pub(crate) fn prepare_out(out: &Path) -> Result<()> {
    if std::fs::metadata(out).is_ok_and(|m| !m.is_dir()) {
        bail!("--out {}: is not a folder", out.display());
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    durable::refuse_special(&out.join("config.json"))
}

/// A checkpoint of a [`crate::task::Task`] holds no language model: refused by name.
fn refuse_task(dir: &Path, state: &State) -> Result<()> {
    match &state.task {
        Some(t) => bail!(
            "{}: a checkpoint of the `{}` task, not of a language model (its run resumes with `TaskTrainer::resume`, `maskattn train --resume`)",
            dir.display(),
            t.name
        ),
        None => Ok(()),
    }
}

/// Opens a checkpoint for inference: the model, its vocabulary and its state.
pub fn open(dir: &Path) -> Result<(TinyLm, Vocab, State)> {
    let checkpoint::Loaded {
        state,
        model: model_t,
        files,
        ..
    } = checkpoint::load(dir)?;
    refuse_task(dir, &state)?;
    let vocab = open_vocab(&state, &files)?;
    let (vars, model) = build_model(&state.model).context("building the checkpoint's model")?;
    checkpoint::restore(&vars, &model_t)?;
    Ok((model, vocab, state))
}

impl Trainer {
    /// A fresh run of `model` with `run`'s settings, saving checkpoints into `out`.
    /// The data: `run.text` (paragraphs are documents) or, when `None`, the built-in task.
    /// The vocabulary: the Hugging Face `tokenizer` (needs `run.text`), or bytes;
    /// `model.vocab` must be its size ([`Vocab::size`]). Every setting is checked, and `out`
    /// is created (or must be a folder) before anything else is done.
    pub fn new(
        model: LmConfig,
        run: RunSettings,
        tokenizer: Option<&Path>,
        out: &Path,
    ) -> Result<Self> {
        if tokenizer.is_some() && run.text.is_none() {
            bail!("--tokenizer needs --text (the built-in task is defined on bytes)");
        }
        run.validate()?;
        let (vocab, tok_bytes) = match tokenizer {
            Some(p) => (
                Vocab::load_hf(p)?,
                Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            ),
            None => (Vocab::Bytes, None),
        };
        if model.vocab != vocab.size() {
            bail!(
                "the model has {} tokens, the vocabulary {}",
                model.vocab,
                vocab.size()
            );
        }
        settings::validate_model(&model, &run)?;
        let corpus = load_corpus(&run, &vocab)?;
        prepare_out(out)?;
        let (vars, lm) = build_model(&model)?;
        init(&vars, run.seed)?;
        let opt = AdamW::new(&vars, run.weight_decay)?;
        let state = State {
            config_hash: String::new(),
            format: checkpoint::FORMAT,
            files: None,
            model,
            vocab: match tokenizer {
                Some(_) => VocabSpec::Hf {
                    file: "tokenizer.json".into(),
                },
                None => VocabSpec::Bytes,
            },
            run,
            step: 0,
            losses: Vec::new(),
            evals: Vec::new(),
            hashes: Default::default(),
            task: None,
        };
        Ok(Trainer {
            state,
            vocab,
            tokenizer: tok_bytes,
            corpus,
            vars,
            model: lm,
            opt,
            out: out.to_path_buf(),
            saved: None,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Continues the run saved in `dir` (checked: see [`checkpoint::load`]); its next
    /// checkpoints go to `dir` too. `steps` extends the run (it cannot shorten it).
    pub fn resume(dir: &Path, steps: Option<u64>) -> Result<Self> {
        let checkpoint::Loaded {
            mut state,
            model: model_t,
            optimizer: opt_t,
            files,
            tokenizer,
        } = checkpoint::load(dir)?;
        refuse_task(dir, &state)?;
        let vocab = open_vocab(&state, &files)?;
        let corpus = load_corpus(&state.run, &vocab)?;
        let (vars, model) = build_model(&state.model)?;
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
        Ok(Trainer {
            saved: Some(state.step),
            state,
            vocab,
            tokenizer,
            corpus,
            vars,
            model,
            opt,
            out: dir.to_path_buf(),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The run's state: settings, step, history.
    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    pub fn model(&self) -> &TinyLm {
        &self.model
    }

    /// The model's parameters.
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// The checkpoint folder.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Attention in plain candle ops instead of the maskattn kernels (to compare times).
    pub fn set_reference_attention(&mut self, plain: bool) {
        self.model.set_reference_attention(plain);
    }

    /// Raising this flag (from a Ctrl-C handler, another thread) makes [`Trainer::run`]
    /// save a checkpoint and return [`Outcome::Interrupted`] before its next step.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The training batch of the next step (drawn from the seed and the step alone).
    pub fn batch(&self, layout: batch::Layout) -> Result<Batch> {
        let s = &self.state.run;
        batch::for_step(
            &self.corpus.train,
            s.seed,
            self.state.step,
            s.batch,
            s.seq_len,
            layout,
            s.objective,
            &self.vocab,
        )
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

    /// One optimisation step. A NaN or an infinity in the loss or the weights is a
    /// [`Diverged`] error (the weights are then spoiled: do not save them).
    pub fn step(&mut self) -> Result<StepReport> {
        let s = &self.state.run;
        let step = self.state.step;
        let b = self.batch(s.layout)?;
        let tokens = Tensor::from_slice(&b.inputs, (b.rows, b.len), &Device::Cpu)?;
        let mask = b.mask(s.objective);
        let logits = self.model.forward(
            &tokens,
            &mask,
            Mode::Train {
                seed: Rng::at(s.seed, 3, step).next_u64(),
            },
        )?;
        let l = loss(&logits, &b)?;
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
            tokens: b.lengths.iter().sum(),
        })
    }

    /// Evaluates on the held-out documents (not recorded in the history).
    pub fn evaluate(&self) -> Result<Eval> {
        eval::evaluate(
            &self.model,
            &self.corpus,
            &self.vocab,
            &self.state.run,
            self.state.step,
        )
    }

    /// Saves a checkpoint into the checkpoint folder (see [`checkpoint`] for what a
    /// failure leaves there).
    pub fn save(&mut self) -> Result<()> {
        let contents = checkpoint::Contents {
            model: &weights(&self.vars),
            optimizer: &self.opt.state(),
            tokenizer: self.tokenizer.as_deref(),
        };
        checkpoint::save(&self.out, &mut self.state, &contents)?;
        self.saved = Some(self.state.step);
        Ok(())
    }

    /// Trains to the run's last step: evaluates (and saves a checkpoint) every
    /// `eval_every` steps and at the end; stops early, with a checkpoint, when the stop
    /// flag is raised or a hook asks. A run that starts at step 0 first evaluates the
    /// untrained model (the first point of the curve; no hook is called for it). A
    /// divergence returns [`Diverged`] without saving.
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Result<RunReport> {
        if self.state.step == 0 && self.state.evals.is_empty() {
            let e = self.evaluate()?;
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
                let e = self.evaluate()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Layout, MlmChoice, Objective};
    use crate::corpus::Doc;
    use maskattn_candle::model::Positions;

    /// No attention weight crosses a document boundary in a packed batch, for either
    /// objective, in any layer or head: asserted on the weights themselves.
    #[test]
    fn packed_documents_never_attend_to_each_other() {
        let vocab = Vocab::Bytes;
        let cfg = LmConfig {
            vocab: vocab.size(),
            d_model: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            d_ff: 64,
            max_len: 40,
            positions: Positions::Rotary,
            dropout: 0.0,
            softcap: None,
            sinks: false,
        };
        let (vars, model) = build_model(&cfg).unwrap();
        init(&vars, 1).unwrap();
        let docs: Vec<Doc> = [7usize, 12, 5, 9, 15]
            .iter()
            .enumerate()
            .map(|(k, &n)| Doc {
                tokens: (0..n as u32)
                    .map(|i| 97 + (i * 7 + k as u32) % 26)
                    .collect(),
                answers: Vec::new(),
            })
            .collect();
        let refs: Vec<&Doc> = docs.iter().collect();
        for objective in [Objective::Mlm, Objective::Clm] {
            let b = batch::make(
                &refs,
                2,
                40,
                Layout::Packed,
                objective,
                MlmChoice::Random,
                &vocab,
                &mut Rng::new(2),
            )
            .unwrap();
            assert!(
                b.doc_ids.iter().filter(|&&d| d >= 0).count() > 40,
                "two rows in use"
            );
            let tokens = Tensor::from_slice(&b.inputs, (2, 40), &Device::Cpu).unwrap();
            let out = model
                .forward_with_weights(&tokens, &b.mask(objective))
                .unwrap();
            assert_eq!(out.weights.len(), 2);
            for w in &out.weights {
                let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                let mut inside = 0f64;
                for row in 0..2 {
                    for h in 0..4 {
                        for i in 0..40 {
                            for j in 0..40 {
                                let p = w[((row * 4 + h) * 40 + i) * 40 + j];
                                let (di, dj) = (b.doc_ids[row * 40 + i], b.doc_ids[row * 40 + j]);
                                if di != dj {
                                    assert_eq!(p, 0.0, "{objective:?}: row {row} head {h}: {i} (doc {di}) attends to {j} (doc {dj})");
                                } else {
                                    inside += p as f64;
                                }
                            }
                        }
                    }
                }
                assert!(inside > 1.0, "weights inside documents are not all zero");
            }
        }
    }
}
