//! What a run shows and leaves beside its checkpoint: the progress bar, the lines printed
//! at each evaluation, the loss pictures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use maskattn_train::checkpoint::Eval;
use maskattn_train::durable;
use maskattn_train::trainer::{Hooks, StepReport};
use maskattn_train::State;

use super::args::TrainArgs;
use super::plot;

/// The progress bar and the lines printed at each evaluation.
pub(super) struct Progress {
    pub(super) bar: ProgressBar,
    /// From the first step on (not the evaluation of the untrained model).
    started: Option<Instant>,
    tokens: usize,
    eval_secs: f64,
    last_loss: f32,
    stop_after: Option<u64>,
    done: u64,
}

impl Progress {
    pub(super) fn new(bar: ProgressBar, stop_after: Option<u64>) -> Self {
        Progress {
            bar,
            started: None,
            tokens: 0,
            eval_secs: 0.0,
            last_loss: f32::NAN,
            stop_after,
            done: 0,
        }
    }
}

/// The progress bar of a run of `steps` steps now at `at` (hidden with --quiet or when
/// stderr is not a terminal).
pub(super) fn new_bar(a: &TrainArgs, steps: u64, at: u64) -> ProgressBar {
    let bar = if a.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(at);
    bar
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

/// The loss pictures, `loss.png` and `loss.svg` in the checkpoint folder; returns the SVG's
/// path. They are a convenience: a missing font must not fail a finished run. Each is drawn
/// under a temporary name and renamed, so a failure leaves the previous picture.
pub(super) fn write_pictures(state: &State, out: &Path) -> PathBuf {
    let curve = out.join("loss.svg");
    for p in [out.join("loss.png"), curve.clone()] {
        if let Err(e) = durable::replace_with(&p, |tmp| plot::loss_curve(state, tmp)) {
            eprintln!("warning: no {}: {e:#}", p.display());
        }
    }
    curve
}
