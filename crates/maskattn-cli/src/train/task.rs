//! `maskattn train --task NAME`: the library's [`Task`]s (items, series, speech, vision) with the
//! text run's flags for the encoder and the optimiser, its progress bar, Ctrl-C and loss
//! pictures (and a task's own pictures: [`Pictures`]).

use std::path::Path;

use anyhow::{bail, Result};
use maskattn_candle::model::TinyLm;
use maskattn_train::checkpoint::RunSettings;
use maskattn_train::task::items::Items;
use maskattn_train::task::series::{Series, SeriesSettings};
use maskattn_train::task::speech::{Speech, SpeechSettings};
use maskattn_train::task::vision::{Vision, VisionMask, VisionSettings};
use maskattn_train::task::{Task, TaskTrainer, Trunk};
use maskattn_train::trainer::Outcome;

use super::args::{MaskArg, TaskArg, TrainArgs};
use super::image_plot;
use super::progress::{new_bar, write_pictures, Progress};

/// Which task the checkpoint in `dir` holds, if any.
pub fn of_checkpoint(dir: &Path) -> Result<Option<String>> {
    Ok(maskattn_train::checkpoint::load(dir)?
        .state
        .task
        .map(|t| t.name))
}

/// Runs the task named by `--task`, or by the checkpoint of `--resume`.
pub fn run(a: &TrainArgs, name: &str) -> Result<()> {
    match name {
        Items::NAME => go::<Items>(a, |a| Items::new(Default::default(), a.seed)),
        Series::NAME => go::<Series>(a, |a| {
            let mut s = SeriesSettings {
                csv: a.csv.clone(),
                ..SeriesSettings::default()
            };
            if let Some(p) = a.period {
                s.period = p;
            }
            Series::new(s, a.seed)
        }),
        Speech::NAME => go::<Speech>(a, |a| Speech::new(speech_settings(a)?, a.seed)),
        Vision::NAME => go::<Vision>(a, |a| Vision::new(vision_settings(a)?, a.seed)),
        other => bail!("unknown task `{other}` (this program knows items, series, speech, vision)"),
    }
}

/// The vision task's settings from --mask, --window, --dilation.
fn vision_settings(a: &TrainArgs) -> Result<VisionSettings> {
    let mask = match a.mask.unwrap_or(MaskArg::Natten) {
        MaskArg::Full => {
            if a.window.is_some() || a.dilation.is_some() {
                bail!("--window, --dilation: full attention has no window");
            }
            VisionMask::Full
        }
        MaskArg::Natten => VisionMask::Natten {
            kernel: a.window.unwrap_or(5),
            dilation: a.dilation.unwrap_or(1),
        },
        MaskArg::Swin => {
            if a.dilation.is_some() {
                bail!("--dilation: a flag of --mask natten");
            }
            VisionMask::Swin {
                window: a.window.unwrap_or(6),
            }
        }
    };
    Ok(VisionSettings {
        mask,
        ..VisionSettings::default()
    })
}

/// Refuses --mask, --window, --dilation where they would be ignored (`what`: the run).
pub fn refuse_vision_flags(a: &TrainArgs, what: &str) -> Result<()> {
    let given: Vec<&str> = [
        (a.mask.is_some(), "--mask"),
        (a.window.is_some(), "--window"),
        (a.dilation.is_some(), "--dilation"),
    ]
    .into_iter()
    .filter_map(|(g, flag)| g.then_some(flag))
    .collect();
    if !given.is_empty() {
        bail!(
            "{}: flags of --task vision, not of {what}",
            given.join(", ")
        );
    }
    Ok(())
}

/// What a task draws beside the loss pictures at the end of a run.
trait Pictures: Task {
    /// Writes the task's pictures into `out`, returning their paths; a failure is a warning
    /// (the pictures are a convenience).
    fn pictures(_t: &TaskTrainer<Self>, _out: &Path) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

impl Pictures for Items {}
impl Pictures for Series {}
impl Pictures for Speech {}

impl Pictures for Vision {
    /// `attention.png`: the first held-out image, and the last layer's attention (mean over
    /// the heads) of the patch at its object's centre, hidden patches hatched.
    fn pictures(t: &TaskTrainer<Self>, out: &Path) -> Vec<std::path::PathBuf> {
        let path = out.join("attention.png");
        let res = image_plot::PatchAttention::of(t, 0)
            .and_then(|p| maskattn_train::durable::replace_with(&path, |tmp| p.write(tmp)));
        match res {
            Ok(()) => vec![path],
            Err(e) => {
                eprintln!("warning: no {}: {e:#}", path.display());
                Vec::new()
            }
        }
    }
}

/// `--chunk`, `--left` (−1: every earlier chunk) as the speech task takes them.
fn speech_settings(a: &TrainArgs) -> Result<SpeechSettings> {
    let d = SpeechSettings::default();
    let chunk = a.chunk.unwrap_or(d.chunk);
    if chunk == 0 {
        bail!("--chunk 0: a chunk must hold at least one frame");
    }
    let left = match a.left {
        None => d.left,
        Some(-1) => None,
        Some(k) if k >= 0 => Some(k as usize),
        Some(k) => bail!("--left {k}: must be -1 (every earlier chunk) or 0 or more"),
    };
    Ok(SpeechSettings { chunk, left, ..d })
}

/// The default rows per step of each task: vision's rows are 576 patches long (the
/// others' 32–128), and its 300 steps learn from 8 images each.
fn default_batch(task: TaskArg) -> usize {
    match task {
        TaskArg::Vision => 8,
        _ => 16,
    }
}

/// The default steps of each task (its default run: under a minute on 2 cores).
fn default_steps(task: TaskArg) -> u64 {
    match task {
        TaskArg::Items => 400,
        TaskArg::Series => 400,
        TaskArg::Speech => 300,
        TaskArg::Vision => 300,
    }
}

fn refuse_text_flags(a: &TrainArgs) -> Result<()> {
    for (given, flag) in [
        (a.text.is_some(), "--text"),
        (a.tokenizer.is_some(), "--tokenizer"),
        (a.kv_heads.is_some(), "--kv-heads"),
        (a.softcap.is_some(), "--softcap"),
        (a.sinks, "--sinks"),
        (a.reference_attention, "--reference-attention"),
    ] {
        if given {
            bail!("{flag}: a flag of the text tasks; --task trains its own model");
        }
    }
    Ok(())
}

fn go<T: Pictures>(a: &TrainArgs, make: impl FnOnce(&TrainArgs) -> Result<T>) -> Result<()> {
    refuse_text_flags(a)?;
    if T::NAME != Vision::NAME {
        refuse_vision_flags(a, &format!("--task {}", T::NAME))?;
    }
    if T::NAME != Series::NAME && (a.csv.is_some() || a.period.is_some()) {
        bail!("--csv, --period: flags of --task series");
    }
    if T::NAME != Speech::NAME && (a.chunk.is_some() || a.left.is_some()) {
        bail!("--chunk, --left: flags of --task speech");
    }
    if a.period.is_some() && a.csv.is_none() {
        bail!("--period: needs --csv (the generated series know their seasons)");
    }
    let mut t = match &a.resume {
        Some(dir) => TaskTrainer::<T>::resume(dir, a.steps)?,
        None => {
            let task = make(a)?;
            let kind = a.task.expect("a fresh task run names its task");
            let run = RunSettings {
                seed: a.seed,
                steps: a.steps.unwrap_or(default_steps(kind)),
                batch: a.batch.unwrap_or(default_batch(kind)),
                lr: a.lr,
                warmup: a.warmup,
                min_lr_ratio: a.min_lr_ratio,
                clip: a.clip,
                weight_decay: a.weight_decay,
                eval_every: a.eval_every,
                ..RunSettings::default()
            };
            let d_model = a.d_model.unwrap_or(64);
            let trunk = Trunk {
                d_model,
                layers: a.layers.unwrap_or(2),
                heads: a.heads.unwrap_or(4),
                d_ff: 4 * d_model,
            };
            TaskTrainer::new(task, trunk, run, &a.out)?
        }
    };
    let out = t.out().to_path_buf();
    let s = t.state().run.clone();
    let trunk = t.state().task.as_ref().expect("a task run").trunk;
    eprintln!(
        "model: {} parameters ({} layers, d_model {}, {} heads); data: {}; {} rows × {} positions per step",
        TinyLm::parameters(t.vars()),
        trunk.layers,
        trunk.d_model,
        trunk.heads,
        t.task().describe(),
        s.batch,
        s.seq_len,
    );
    {
        let stop = t.stop_flag();
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
        eprintln!(
            "{todo} steps in {secs:.1} s: {:.0} ms/step training, {eval_secs:.1} s evaluating",
            1e3 * (secs - eval_secs) / todo as f64,
        );
    }
    let curve = write_pictures(t.state(), &out);
    let mut pictures = match t.figures() {
        Ok(figs) => super::figure::write_figures(&figs, &out),
        Err(e) => {
            eprintln!("warning: no pictures of the task: {e:#}");
            Vec::new()
        }
    };
    pictures.extend(T::pictures(&t, &out));
    if !t.details().is_empty() {
        println!("{}", t.details());
    }
    eprintln!(
        "checkpoint {}; loss curve {}{}",
        out.display(),
        curve.display(),
        pictures
            .iter()
            .map(|p| format!("; {}", p.display()))
            .collect::<String>()
    );
    if let Some(e) = t.state().evals.last() {
        println!(
            "held-out {} after {} steps: {}",
            e.metric_name,
            e.step,
            t.task().summary(e.metric)
        );
    }
    Ok(())
}
