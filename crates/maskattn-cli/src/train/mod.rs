//! `maskattn train`: self-supervised pre-training of a small transformer whose attention is
//! the masked layer. Masked-token (BERT-style) or next-token (GPT-style) objective, packed
//! rows with a documents mask or padded rows with a key padding mask, AdamW with warm-up and
//! cosine decay, gradient clipping, held-out evaluation, checkpoints, resume, Ctrl-C.

pub mod batch;
pub mod checkpoint;
pub mod corpus;
pub mod durable;
pub mod eval;
pub mod finite;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod settings;
pub mod vocab;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use maskattn_candle::model::{LmConfig, Positions, TinyLm};
use maskattn_candle::Mode;

use batch::{Batch, Layout, Objective};
use checkpoint::{RunSettings, State};
use corpus::Corpus;
use rng::Rng;
use vocab::{Vocab, VocabSpec};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// mlm: predict masked tokens (bidirectional attention); clm: predict the next token (causal).
    #[arg(long, value_enum, default_value = "clm")]
    pub objective: Objective,
    /// packed: several documents per row with a documents mask; padded: one per row with key padding.
    #[arg(long, value_enum, default_value = "packed")]
    pub layout: Layout,
    /// Train on this UTF-8 text (paragraphs are documents) instead of the built-in task.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (needs --text); default: bytes.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Checkpoint folder (written at every evaluation, at the end and on Ctrl-C).
    #[arg(long, default_value = "runs/default")]
    pub out: PathBuf,
    /// Continue the run saved in this checkpoint folder (its settings are kept; --steps may extend it).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimisation steps in all [default: 500; on --resume: the checkpoint's, or more to extend it].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention; default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long, value_enum, default_value = "rotary")]
    pub positions: PositionsArg,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 60)]
    pub warmup: u64,
    /// Final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Largest global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this many steps of this invocation (the schedule still spans --steps);
    /// for testing resume.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// No progress bar (also when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Attention in plain candle ops instead of the maskattn kernels (to compare step times).
    #[arg(long)]
    pub plain_attention: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionsArg {
    Rotary,
    Learned,
}

/// Everything a run needs, built from fresh arguments or from a checkpoint.
struct Run {
    state: State,
    vocab: Vocab,
    /// The `tokenizer.json` bytes (Hugging Face vocabulary), saved with every checkpoint.
    tokenizer: Option<Vec<u8>>,
    corpus: Corpus,
    vars: VarMap,
    model: TinyLm,
    opt: optim::AdamW,
}

const DEFAULT_STEPS: u64 = 500;
const TRAIN_DOCS: usize = 20_000;
const HELD_OUT_DOCS: usize = 512;

fn load_corpus(run: &RunSettings, vocab: &Vocab) -> Result<Corpus> {
    match &run.text {
        None => Ok(corpus::majority(run.seed, TRAIN_DOCS, HELD_OUT_DOCS)),
        Some(p) => corpus::text(p, vocab, run.seq_len - 1),
    }
}

/// Seeded initialisation (candle's CPU generator cannot be seeded): weights uniform in
/// ±1/√fan_in, embeddings N(0, 0.02), norm gains 1, biases 0.
fn init(vars: &VarMap, seed: u64) -> Result<()> {
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

fn build_model(cfg: &LmConfig) -> Result<(VarMap, TinyLm)> {
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

impl Run {
    fn fresh(a: &TrainArgs) -> Result<Self> {
        if a.tokenizer.is_some() && a.text.is_none() {
            bail!("--tokenizer needs --text (the built-in task is defined on bytes)");
        }
        let steps = a.steps.unwrap_or(DEFAULT_STEPS);
        let run = RunSettings {
            objective: a.objective,
            layout: a.layout,
            text: a.text.clone(),
            seed: a.seed,
            steps,
            batch: a.batch,
            seq_len: a.seq_len,
            lr: a.lr,
            warmup: a.warmup,
            min_lr_ratio: a.min_lr_ratio,
            clip: a.clip,
            weight_decay: a.weight_decay,
            eval_every: a.eval_every,
        };
        run.validate()?;
        let (vocab, tokenizer) = match &a.tokenizer {
            Some(p) => (
                Vocab::load_hf(p)?,
                Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
            ),
            None => (Vocab::Bytes, None),
        };
        let cfg = LmConfig {
            vocab: vocab.size(),
            d_model: a.d_model,
            layers: a.layers,
            heads: a.heads,
            kv_heads: a.kv_heads.unwrap_or(a.heads),
            d_ff: 4 * a.d_model,
            max_len: a.seq_len,
            positions: match a.positions {
                PositionsArg::Rotary => Positions::Rotary,
                PositionsArg::Learned => Positions::Learned,
            },
            dropout: a.dropout,
        };
        settings::validate_model(&cfg, &run)?;
        let corpus = load_corpus(&run, &vocab)?;
        let (vars, model) = build_model(&cfg)?;
        init(&vars, a.seed)?;
        let opt = optim::AdamW::new(&vars, run.weight_decay)?;
        let state = State {
            config_hash: String::new(),
            format: checkpoint::FORMAT,
            files: None,
            model: cfg,
            vocab: match &a.tokenizer {
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
        };
        Ok(Run {
            state,
            vocab,
            tokenizer,
            corpus,
            vars,
            model,
            opt,
        })
    }

    fn resume(dir: &Path, a: &TrainArgs) -> Result<Self> {
        let checkpoint::Loaded {
            mut state,
            model: model_t,
            optimizer: opt_t,
            files,
            tokenizer,
        } = checkpoint::load(dir)?;
        let vocab = open_vocab(&state, &files)?;
        let corpus = load_corpus(&state.run, &vocab)?;
        let (vars, model) = build_model(&state.model)?;
        checkpoint::restore(&vars, &model_t)?;
        let mut opt = optim::AdamW::new(&vars, state.run.weight_decay)?;
        opt.load_state(&opt_t, state.step)?;
        match a.steps {
            Some(n) if n < state.step => bail!(
                "--steps {n}: the checkpoint is already at step {}",
                state.step
            ),
            Some(n) => state.run.steps = n,
            None => {}
        }
        Ok(Run {
            state,
            vocab,
            tokenizer,
            corpus,
            vars,
            model,
            opt,
        })
    }

    fn save(&mut self, dir: &Path) -> Result<()> {
        let contents = checkpoint::Contents {
            model: &weights(&self.vars),
            optimizer: &self.opt.state(),
            tokenizer: self.tokenizer.as_deref(),
        };
        checkpoint::save(dir, &mut self.state, &contents)
    }
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

/// An output folder: an existing folder or a new one, made now (so that a bad `--out`
/// fails before training, not at the first checkpoint); its `config.json`, if any, must be
/// a regular file (never a link to replace).
fn prepare_out(out: &Path) -> Result<()> {
    if std::fs::metadata(out).is_ok_and(|m| !m.is_dir()) {
        bail!("--out {}: is not a folder", out.display());
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the folder", out.display()))?;
    durable::refuse_special(&out.join("config.json"))
}

/// The error that ends a diverged run: what went wrong, and which checkpoint is on disk.
fn diverged(step: u64, what: String, out: &Path, saved: Option<u64>) -> anyhow::Error {
    let kept = match saved {
        Some(s) => format!("{} keeps the checkpoint of step {s}", out.display()),
        None => format!("no checkpoint of this run was written to {}", out.display()),
    };
    anyhow::anyhow!(
        "training diverged at step {step}: {what}; nothing saved ({kept}); try a smaller --lr"
    )
}

/// The weighted mean cross-entropy of `logits [B, L, V]` against `targets` where `weights`
/// is 1: `(loss, logits flattened to [B·L, V])`.
pub fn loss(logits: &Tensor, b: &Batch) -> Result<Tensor> {
    let dev = logits.device();
    let v = logits.dim(D::Minus1)?;
    let logp = candle_nn::ops::log_softmax(&logits.reshape(((), v))?, D::Minus1)?;
    let targets = Tensor::from_slice(&b.targets, b.targets.len(), dev)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let w = Tensor::from_slice(&b.weights, b.weights.len(), dev)?;
    let count = b.weights.iter().sum::<f32>().max(1.0) as f64;
    Ok(((picked * w)?.sum_all()? * (-1.0 / count))?)
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let mut r = match &a.resume {
        Some(dir) => Run::resume(dir, a)?,
        None => Run::fresh(a)?,
    };
    let out = a.resume.clone().unwrap_or_else(|| a.out.clone());
    prepare_out(&out)?;
    // The checkpoint on disk that belongs to this run (a divergence leaves it there).
    let mut saved = a.resume.as_ref().map(|_| r.state.step);
    r.model.set_plain_attention(a.plain_attention);
    let s = r.state.run.clone();
    let cfg = r.state.model.clone();
    eprintln!(
        "model: {} parameters ({} layers, d_model {}, {} heads / {} kv heads, {:?} positions); data: {} ({} train / {} held-out documents); {} × {} tokens per step; {:?}, {:?}",
        TinyLm::parameters(&r.vars),
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.kv_heads,
        cfg.positions,
        s.text.as_ref().map_or("built-in majority task".to_string(), |p| p.display().to_string()),
        r.corpus.train.len(),
        r.corpus.held_out.len(),
        s.batch,
        s.seq_len,
        s.objective,
        s.layout
    );
    report_savings(&r, &s)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while saving is ignored; the save is quick.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let todo = s.steps.saturating_sub(r.state.step);
    let bar = if a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(s.steps)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(r.state.step);
    if r.state.step == 0 && r.state.evals.is_empty() {
        // Where the untrained model stands (chance level), the first point of the curve.
        r.state
            .evals
            .push(eval::evaluate(&r.model, &r.corpus, &r.vocab, &s, 0)?);
    }
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let mut done_here = 0u64;
    let mut eval_secs = 0f64;
    while r.state.step < s.steps {
        if stop.load(Ordering::SeqCst) {
            bar.abandon_with_message("interrupted");
            r.save(&out)?;
            eprintln!(
                "interrupted at step {}: checkpoint saved to {} (continue with --resume {})",
                r.state.step,
                out.display(),
                out.display()
            );
            std::process::exit(130);
        }
        let step = r.state.step;
        let b = batch::for_step(
            &r.corpus.train,
            s.seed,
            step,
            s.batch,
            s.seq_len,
            s.layout,
            s.objective,
            &r.vocab,
        )?;
        let tokens = Tensor::from_slice(&b.inputs, (b.rows, b.len), &Device::Cpu)?;
        let mask = b.mask(s.objective);
        let logits = r.model.forward(
            &tokens,
            &mask,
            Mode::Train {
                seed: Rng::at(s.seed, 3, step).next_u64(),
            },
        )?;
        let l = loss(&logits, &b)?;
        let mut grads = l.backward()?;
        let vars: Vec<_> = r.opt.vars().cloned().collect();
        optim::clip(&mut grads, &vars, s.clip)?;
        let lr = optim::lr_at(step, s.warmup, s.steps, s.lr, s.min_lr_ratio);
        r.opt.step(&grads, lr)?;
        let lv = l.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(diverged(
                step + 1,
                format!("the training loss is {lv}"),
                &out,
                saved,
            ));
        }
        if let Some(name) = r.opt.non_finite()? {
            let what = format!("the weights `{name}` are no longer finite");
            return Err(diverged(step + 1, what, &out, saved));
        }
        r.state.losses.push(lv);
        r.state.step += 1;
        done_here += 1;
        tokens_seen += b.lengths.iter().sum::<usize>();
        let tps = tokens_seen as f64 / (started.elapsed().as_secs_f64() - eval_secs).max(1e-9);
        bar.set_position(r.state.step);
        bar.set_message(format!("loss {lv:.3} | lr {lr:.1e} | {tps:.0} tok/s"));
        let last = r.state.step == s.steps;
        if r.state.step % s.eval_every.max(1) == 0 || last {
            let t_eval = Instant::now();
            let e = eval::evaluate(&r.model, &r.corpus, &r.vocab, &s, r.state.step)?;
            eval_secs += t_eval.elapsed().as_secs_f64();
            if !e.loss.is_finite() {
                let what = format!("the held-out loss is {}", e.loss);
                return Err(diverged(e.step, what, &out, saved));
            }
            let line = format!(
                "step {:>5}: train loss {lv:.3}, held-out loss {:.3}, {} {}",
                e.step,
                e.loss,
                e.metric_name,
                eval::format_metric(&e)
            );
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
            r.state.evals.push(e);
            r.save(&out)?;
            saved = Some(r.state.step);
        }
        if a.stop_after == Some(done_here) && !last {
            r.save(&out)?;
            bar.abandon();
            eprintln!(
                "stopped after {done_here} steps at step {}: checkpoint in {}",
                r.state.step,
                out.display()
            );
            return Ok(());
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if todo > 0 {
        let train_secs = secs - eval_secs;
        eprintln!(
            "{todo} steps in {secs:.1} s: {:.0} ms/step training ({:.0} tokens/s), {eval_secs:.1} s evaluating",
            1e3 * train_secs / todo as f64,
            tokens_seen as f64 / train_secs
        );
    }
    // The pictures are a convenience: a missing font must not fail a finished run. Each is
    // drawn under a temporary name and renamed, so a failure leaves the previous picture.
    let curve = out.join("loss.svg");
    for p in [out.join("loss.png"), curve.clone()] {
        if let Err(e) = durable::replace_with(&p, |tmp| plot::loss_curve(&r.state, tmp)) {
            eprintln!("warning: no {}: {e:#}", p.display());
        }
    }
    if let Some(e) = r.state.evals.last() {
        println!(
            "held-out {} after {} steps: {} (loss {:.3}); checkpoint {}; loss curve {}",
            e.metric_name,
            e.step,
            eval::format_metric(e),
            e.loss,
            out.display(),
            curve.display()
        );
    }
    Ok(())
}

/// Prints what each layout saves on a batch of this run's data.
fn report_savings(r: &Run, s: &RunSettings) -> Result<()> {
    for layout in [Layout::Packed, Layout::Padded] {
        let b = batch::for_step(
            &r.corpus.train,
            s.seed,
            0,
            s.batch,
            s.seq_len,
            layout,
            s.objective,
            &r.vocab,
        )?;
        let (real, hidden, skipped) = b.savings(s.objective, r.state.model.heads)?;
        eprintln!(
            "{:<7} rows: {:>5.1}% of token slots hold tokens; the mask hides {:>5.1}% of attention pairs, the kernels skip {:>5.1}% of tiles{}",
            format!("{layout:?}").to_lowercase(),
            100.0 * real,
            100.0 * hidden,
            100.0 * skipped,
            if layout == s.layout { "  (this run)" } else { "" }
        );
    }
    Ok(())
}

/// Opens a checkpoint for inference: the model, its vocabulary and its state.
pub fn open(dir: &Path) -> Result<(TinyLm, Vocab, State)> {
    let checkpoint::Loaded {
        state,
        model: model_t,
        files,
        ..
    } = checkpoint::load(dir)?;
    let vocab = open_vocab(&state, &files)?;
    let (vars, model) = build_model(&state.model).context("building the checkpoint's model")?;
    checkpoint::restore(&vars, &model_t)?;
    Ok((model, vocab, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use batch::MlmChoice;
    use corpus::Doc;

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
