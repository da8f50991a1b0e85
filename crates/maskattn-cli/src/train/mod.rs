//! `maskattn train`: the command line of the `maskattn-train` library — flags, progress
//! bar, printing, Ctrl-C and the loss pictures. The training itself (batches, objectives,
//! AdamW, checkpoints, the loop) is the library's.

mod args;
pub mod figure;
mod image_plot;
pub mod plot;
mod progress;
mod task;

use anyhow::Result;
use maskattn_candle::model::{LmConfig, Positions, TinyLm};
use maskattn_train::trainer::{Outcome, Trainer};
use maskattn_train::{Layout, Objective, RunSettings, Vocab};

pub use args::{LayoutArg, ObjectiveArg, PositionsArg, TaskArg, TrainArgs};
// What the other commands use of training, under the names they have always had.
pub use maskattn_train::{batch, open, rng};

use progress::{new_bar, write_pictures, Progress};

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
        batch: a.batch.unwrap_or(16),
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
    let (d_model, heads) = (a.d_model.unwrap_or(128), a.heads.unwrap_or(4));
    let model = LmConfig {
        vocab,
        d_model,
        layers: a.layers.unwrap_or(3),
        heads,
        kv_heads: a.kv_heads.unwrap_or(heads),
        d_ff: 4 * d_model,
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

pub fn run(a: &TrainArgs) -> Result<()> {
    let task = match (&a.resume, a.task) {
        (_, Some(t)) => Some(
            match t {
                TaskArg::Items => "items",
                TaskArg::Series => "series",
                TaskArg::Speech => "speech",
                TaskArg::Vision => "vision",
            }
            .to_string(),
        ),
        (Some(dir), None) => task::of_checkpoint(dir)?,
        (None, None) => None,
    };
    if let Some(name) = task {
        return task::run(a, &name);
    }
    if a.csv.is_some() || a.period.is_some() {
        anyhow::bail!("--csv, --period: flags of --task series");
    }
    if a.chunk.is_some() || a.left.is_some() {
        anyhow::bail!("--chunk, --left: flags of --task speech");
    }
    task::refuse_vision_flags(a, "the text tasks")?;
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
    let mut progress = Progress::new(new_bar(a, s.steps, t.state().step), a.stop_after);
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
