//! `maskattn train`: the command line of the `maskattn-train` library — flags, progress
//! bar, printing, Ctrl-C and the loss pictures. The training itself (batches, objectives,
//! AdamW, checkpoints, the loop) is the library's.

pub mod plot;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use maskattn_candle::model::{LmConfig, Positions, TinyLm};
use maskattn_train::checkpoint::Eval;
use maskattn_train::durable;
use maskattn_train::trainer::{Hooks, Outcome, StepReport, Trainer};
use maskattn_train::{Layout, Objective, RunSettings, State, Vocab};

// What the other commands use of training, under the names they have always had.
pub use maskattn_train::{batch, open, rng};

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// mlm: predict masked tokens (bidirectional attention); clm: predict the next token (causal).
    #[arg(long, value_enum, default_value = "clm", conflicts_with = "resume")]
    pub objective: ObjectiveArg,
    /// packed: several documents per row with a documents mask; padded: one per row with key padding.
    #[arg(long, value_enum, default_value = "packed", conflicts_with = "resume")]
    pub layout: LayoutArg,
    /// Train on this UTF-8 text (paragraphs are documents) instead of the built-in task.
    #[arg(long, conflicts_with = "resume")]
    pub text: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (needs --text); default: bytes.
    #[arg(long, conflicts_with = "resume")]
    pub tokenizer: Option<PathBuf>,
    /// Checkpoint folder (written at every evaluation, at the end and on Ctrl-C).
    #[arg(long, default_value = "runs/default", conflicts_with = "resume")]
    pub out: PathBuf,
    /// Continue the run saved in this checkpoint folder (its settings are kept; --steps may
    /// extend it). The run's settings cannot be given with it: a flag that would be ignored
    /// is refused, naming it.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimisation steps in all [default: 500; on --resume: the checkpoint's, or more to extend it].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows per batch.
    #[arg(long, default_value_t = 16, conflicts_with = "resume")]
    pub batch: usize,
    #[arg(long, default_value_t = 128, conflicts_with = "resume")]
    pub seq_len: usize,
    #[arg(long, default_value_t = 128, conflicts_with = "resume")]
    pub d_model: usize,
    #[arg(long, default_value_t = 3, conflicts_with = "resume")]
    pub layers: usize,
    #[arg(long, default_value_t = 4, conflicts_with = "resume")]
    pub heads: usize,
    /// Key/value heads (grouped-query attention; default: --heads).
    #[arg(long, conflicts_with = "resume")]
    pub kv_heads: Option<usize>,
    /// How the model knows positions: rotary, learned embeddings, ALiBi (fixed standard
    /// slopes) or T5 relative biases (a trainable table per layer, 32 buckets up to 128).
    #[arg(long, value_enum, default_value = "rotary", conflicts_with = "resume")]
    pub positions: PositionsArg,
    #[arg(long, default_value_t = 0.0, conflicts_with = "resume")]
    pub dropout: f32,
    /// Soft-cap the attention scores at C: `C · tanh(score / C)`.
    #[arg(long, value_name = "C", conflicts_with = "resume")]
    pub softcap: Option<f32>,
    /// An attention sink (a trainable logit in every softmax's sum) per head and layer.
    #[arg(long, conflicts_with = "resume")]
    pub sinks: bool,
    #[arg(long, default_value_t = 3e-3, conflicts_with = "resume")]
    pub lr: f64,
    #[arg(long, default_value_t = 60, conflicts_with = "resume")]
    pub warmup: u64,
    /// Final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.1, conflicts_with = "resume")]
    pub min_lr_ratio: f64,
    /// Largest global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0, conflicts_with = "resume")]
    pub clip: f64,
    #[arg(long, default_value_t = 0.01, conflicts_with = "resume")]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 100, conflicts_with = "resume")]
    pub eval_every: u64,
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    pub seed: u64,
    /// Stop after this many steps of this invocation (the schedule still spans --steps);
    /// for testing resume.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// No progress bar (also when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Attention in candle ops with the scores materialised (the reference path, as
    /// `maskattn_candle::reference`) instead of the maskattn kernels, to compare step times.
    #[arg(long, alias = "plain-attention")]
    pub reference_attention: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectiveArg {
    /// BERT-style: predict masked tokens, attention both ways.
    Mlm,
    /// GPT-style: predict the next token, causal attention.
    Clm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutArg {
    /// Several documents per row with a documents mask.
    Packed,
    /// One document per row, padded, with a key padding mask.
    Padded,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionsArg {
    Rotary,
    Learned,
    Alibi,
    T5,
}

const DEFAULT_STEPS: u64 = 500;

/// A fresh run from the flags.
fn fresh(a: &TrainArgs) -> Result<Trainer> {
    let run = RunSettings {
        objective: match a.objective {
            ObjectiveArg::Mlm => Objective::Mlm,
            ObjectiveArg::Clm => Objective::Clm,
        },
        layout: match a.layout {
            LayoutArg::Packed => Layout::Packed,
            LayoutArg::Padded => Layout::Padded,
        },
        text: a.text.clone(),
        seed: a.seed,
        steps: a.steps.unwrap_or(DEFAULT_STEPS),
        batch: a.batch,
        seq_len: a.seq_len,
        lr: a.lr,
        warmup: a.warmup,
        min_lr_ratio: a.min_lr_ratio,
        clip: a.clip,
        weight_decay: a.weight_decay,
        eval_every: a.eval_every,
    };
    // The tokenizer is read once more by the library; its size is all that is needed here.
    let vocab = match &a.tokenizer {
        Some(p) if a.text.is_some() => Vocab::load_hf(p)?.size(),
        _ => Vocab::Bytes.size(),
    };
    let model = LmConfig {
        vocab,
        d_model: a.d_model,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        d_ff: 4 * a.d_model,
        max_len: a.seq_len,
        positions: match a.positions {
            PositionsArg::Rotary => Positions::Rotary,
            PositionsArg::Learned => Positions::Learned,
            PositionsArg::Alibi => Positions::Alibi,
            PositionsArg::T5 => Positions::T5,
        },
        dropout: a.dropout,
        softcap: a.softcap,
        sinks: a.sinks,
    };
    Trainer::new(model, run, a.tokenizer.as_deref(), &a.out)
}

/// The progress bar and the lines printed at each evaluation.
struct Progress {
    bar: ProgressBar,
    /// From the first step on (not the evaluation of the untrained model).
    started: Option<Instant>,
    tokens: usize,
    eval_secs: f64,
    last_loss: f32,
    stop_after: Option<u64>,
    done: u64,
}

impl Hooks for Progress {
    fn on_step(&mut self, r: &StepReport) {
        let started = *self.started.get_or_insert_with(Instant::now);
        self.done += 1;
        self.tokens += r.tokens;
        self.last_loss = r.loss;
        let tps = self.tokens as f64 / (started.elapsed().as_secs_f64() - self.eval_secs).max(1e-9);
        self.bar.set_position(r.step);
        self.bar.set_message(format!(
            "loss {:.3} | lr {:.1e} | {tps:.0} tok/s",
            r.loss, r.lr
        ));
    }

    fn on_eval(&mut self, e: &Eval, secs: f64) {
        self.eval_secs += secs;
        let line = format!(
            "step {:>5}: train loss {:.3}, held-out loss {:.3}, {} {}",
            e.step,
            self.last_loss,
            e.loss,
            e.metric_name,
            maskattn_train::eval::format_metric(e)
        );
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn stop(&mut self, _state: &State) -> bool {
        self.started.get_or_insert_with(Instant::now);
        self.done > 0 && self.stop_after == Some(self.done)
    }
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let mut t = match &a.resume {
        Some(dir) => Trainer::resume(dir, a.steps)?,
        None => fresh(a)?,
    };
    let out = t.out().to_path_buf();
    t.set_reference_attention(a.reference_attention);
    let s = t.state().run.clone();
    let cfg = t.state().model.clone();
    eprintln!(
        "model: {} parameters ({} layers, d_model {}, {} heads / {} kv heads, {:?} positions{}{}); data: {} ({} train / {} held-out documents); {} × {} tokens per step; {:?}, {:?}",
        TinyLm::parameters(t.vars()),
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.kv_heads,
        cfg.positions,
        cfg.softcap.map_or(String::new(), |c| format!(", softcap {c}")),
        if cfg.sinks { ", sinks" } else { "" },
        s.text.as_ref().map_or("built-in majority task".to_string(), |p| p.display().to_string()),
        t.corpus().train.len(),
        t.corpus().held_out.len(),
        s.batch,
        s.seq_len,
        s.objective,
        s.layout
    );
    report_savings(&t)?;

    {
        let stop = t.stop_flag();
        // A second Ctrl-C while saving is ignored; the save is quick.
        let _ = ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst));
    }
    let todo = s.steps.saturating_sub(t.state().step);
    let bar = if a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(s.steps)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(t.state().step);
    let mut progress = Progress {
        bar,
        started: None,
        tokens: 0,
        eval_secs: 0.0,
        last_loss: f32::NAN,
        stop_after: a.stop_after,
        done: 0,
    };
    let report = t.run(&mut progress);
    let bar = progress.bar;
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    };
    match report.outcome {
        Outcome::Interrupted => {
            bar.abandon_with_message("interrupted");
            eprintln!(
                "interrupted at step {}: checkpoint saved to {} (continue with --resume {})",
                t.state().step,
                out.display(),
                out.display()
            );
            std::process::exit(130);
        }
        Outcome::Stopped => {
            bar.abandon();
            eprintln!(
                "stopped after {} steps at step {}: checkpoint in {}",
                report.steps,
                t.state().step,
                out.display()
            );
            return Ok(());
        }
        Outcome::Finished => {}
    }
    bar.finish_and_clear();
    if todo > 0 {
        let (secs, eval_secs) = (report.secs, report.eval_secs);
        let train_secs = secs - eval_secs;
        eprintln!(
            "{todo} steps in {secs:.1} s: {:.0} ms/step training ({:.0} tokens/s), {eval_secs:.1} s evaluating",
            1e3 * train_secs / todo as f64,
            report.tokens as f64 / train_secs
        );
    }
    let curve = write_pictures(t.state(), &out);
    if let Some(e) = t.state().evals.last() {
        println!(
            "held-out {} after {} steps: {} (loss {:.3}); checkpoint {}; loss curve {}",
            e.metric_name,
            e.step,
            maskattn_train::eval::format_metric(e),
            e.loss,
            out.display(),
            curve.display()
        );
    }
    Ok(())
}

/// The loss pictures, `loss.png` and `loss.svg` in the checkpoint folder; returns the SVG's
/// path. They are a convenience: a missing font must not fail a finished run. Each is drawn
/// under a temporary name and renamed, so a failure leaves the previous picture.
fn write_pictures(state: &State, out: &Path) -> PathBuf {
    let curve = out.join("loss.svg");
    for p in [out.join("loss.png"), curve.clone()] {
        if let Err(e) = durable::replace_with(&p, |tmp| plot::loss_curve(state, tmp)) {
            eprintln!("warning: no {}: {e:#}", p.display());
        }
    }
    curve
}

/// Prints what each layout saves on a batch of this run's data.
fn report_savings(t: &Trainer) -> Result<()> {
    let s = &t.state().run;
    for layout in [Layout::Packed, Layout::Padded] {
        let b = t.batch(layout)?;
        let (real, hidden, skipped) = b.savings(s.objective, t.state().model.heads)?;
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
