//! `maskattn stream`: a trained speech checkpoint run as a streaming recogniser, chunk by
//! chunk with a key/value cache, on a WAV file or a synthesised utterance; and
//! `--compare`, the accuracy of several speech runs against their chunk size (latency).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::D;
use clap::Args;
use maskattn_train::rng::Rng;
use maskattn_train::task::speech::frontend::{frames_in, FrontEnd, HOP, SAMPLE_RATE, WIN};
use maskattn_train::task::speech::stream::Stream;
use maskattn_train::task::speech::synth::{self, class_name};
use maskattn_train::task::speech::{normalise, Speech, SpeechSettings};
use maskattn_train::task::{Task, TaskTrainer};

use crate::train::plot::{accuracy_by_chunk, ChunkPoint};

#[derive(Args, Debug)]
pub struct StreamArgs {
    /// A checkpoint folder of `maskattn train --task speech`.
    #[arg(required_unless_present = "compare")]
    pub checkpoint: Option<PathBuf>,
    /// Stream this WAV file (16 kHz; a file of several channels gives its first).
    #[arg(long, conflicts_with_all = ["synth", "compare"])]
    pub wav: Option<PathBuf>,
    /// Stream an utterance synthesised from this seed (its true labels are shown too).
    #[arg(long, conflicts_with = "compare")]
    pub synth: Option<u64>,
    /// Frames (10 ms each) of the --synth utterance.
    #[arg(long, default_value_t = 300)]
    pub frames: usize,
    /// Instead of streaming: a table of these speech runs' held-out accuracy against their
    /// chunk size, and with --plot a picture of it.
    #[arg(long, num_args = 1.., value_name = "DIR")]
    pub compare: Vec<PathBuf>,
    /// With --compare: write the picture here (.png or .svg).
    #[arg(long, requires = "compare")]
    pub plot: Option<PathBuf>,
}

pub fn run(a: &StreamArgs) -> Result<()> {
    if !a.compare.is_empty() {
        return compare(a);
    }
    let dir = a.checkpoint.as_ref().expect("clap requires it");
    let (samples, truth) = match (&a.wav, a.synth) {
        (Some(p), None) => (read_wav(p)?, None),
        (None, Some(seed)) => {
            if a.frames == 0 {
                bail!("--frames 0: an utterance has at least one frame");
            }
            let u = synth::utterance(&mut Rng::at(seed, 303, 0), a.frames);
            (u.samples, Some(u.labels))
        }
        _ => bail!("give --wav FILE or --synth SEED"),
    };
    let t = TaskTrainer::<Speech>::resume(dir, None)?;
    let s = t.task().settings().clone();
    let front = FrontEnd::new();
    let frames = frames_in(samples.len());
    eprintln!(
        "{}: step {}, mask {}; {} frames ({:.2} s); latency: chunks of {} frames = {} ms, plus the front end's {} ms look-ahead",
        dir.display(),
        t.state().step,
        s.mask(),
        frames,
        samples.len() as f64 / SAMPLE_RATE as f64,
        s.chunk,
        s.chunk * 10,
        (WIN - HOP) * 1000 / SAMPLE_RATE as usize
    );
    let mut stream = Stream::new(t.task(), t.layers(), t.encoder(), 0);
    let (mut right, mut busy) = (0usize, 0f64);
    let mut from = 0;
    while from < frames {
        let to = (from + s.chunk).min(frames);
        // The chunk's frames, computed from their samples as they would arrive.
        let mut f = front.frames(&samples, from, to);
        normalise(&mut f);
        let started = Instant::now();
        let logits = stream.push(&f)?;
        busy += started.elapsed().as_secs_f64();
        let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let names = |v: &[u32]| {
            v.iter()
                .map(|&c| class_name(c as usize))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut line = format!(
            "{:>7.2} s  frames {from:>5}–{:<5} {}",
            to as f64 * HOP as f64 / SAMPLE_RATE as f64,
            to - 1,
            names(&pred)
        );
        if let Some(truth) = &truth {
            let want = &truth[from..to];
            right += pred.iter().zip(want).filter(|(p, w)| p == w).count();
            line.push_str(&format!("   (true: {})", names(want)));
        }
        println!("{line}");
        from = to;
    }
    let secs = frames as f64 * HOP as f64 / SAMPLE_RATE as f64;
    eprintln!(
        "{} chunks; the encoder took {:.1} ms per chunk ({:.3}× real time)",
        frames.div_ceil(s.chunk),
        1e3 * busy / frames.div_ceil(s.chunk).max(1) as f64,
        busy / secs.max(1e-9)
    );
    if truth.is_some() {
        println!(
            "streamed framewise accuracy: {:.1}% of {frames} frames",
            100.0 * right as f64 / frames.max(1) as f64
        );
    }
    Ok(())
}

/// The first channel of a WAV file at the front end's rate, as samples in [−1, 1].
fn read_wav(path: &Path) -> Result<Vec<f32>> {
    let mut r = hound::WavReader::open(path)
        .with_context(|| format!("--wav {}: not a readable WAV file", path.display()))?;
    let spec = r.spec();
    if spec.sample_rate != SAMPLE_RATE {
        bail!(
            "--wav {}: sampled at {} Hz; the model takes {SAMPLE_RATE} Hz (resample it first, e.g. `sox IN -r {SAMPLE_RATE} OUT.wav`)",
            path.display(),
            spec.sample_rate
        );
    }
    let ch = spec.channels.max(1) as usize;
    let bad = |e: hound::Error| anyhow::anyhow!("--wav {}: {e}", path.display());
    let all: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r.samples::<f32>().collect::<Result<_, _>>().map_err(bad)?,
        hound::SampleFormat::Int => {
            let full = (1u64 << (spec.bits_per_sample - 1)) as f32;
            r.samples::<i32>()
                .map(|x| x.map(|x| x as f32 / full))
                .collect::<Result<_, _>>()
                .map_err(bad)?
        }
    };
    let first: Vec<f32> = all.into_iter().step_by(ch).collect();
    if first.len() < WIN {
        bail!(
            "--wav {}: {} samples, fewer than one frame ({WIN} samples, 25 ms)",
            path.display(),
            first.len()
        );
    }
    Ok(first)
}

/// The held-out accuracy of each run against its chunk size.
fn compare(a: &StreamArgs) -> Result<()> {
    let mut points = Vec::new();
    println!("| chunk (frames) | latency | left chunks | steps | held-out accuracy |");
    println!("|---:|---:|---:|---:|---:|");
    for dir in &a.compare {
        let state = maskattn_train::checkpoint::load(dir)?.state;
        let spec = match &state.task {
            Some(t) if t.name == Speech::NAME => t,
            _ => bail!(
                "--compare {}: not a checkpoint of the speech task",
                dir.display()
            ),
        };
        let s: SpeechSettings = serde_json::from_value(spec.settings.clone())
            .with_context(|| format!("--compare {}: the task's settings", dir.display()))?;
        let Some(e) = state.evals.last() else {
            bail!("--compare {}: no evaluation yet", dir.display());
        };
        let full = s.chunk >= s.row_len && s.left.is_none();
        let chunk = s.chunk.min(s.row_len);
        let left = s.left.map_or("all".to_string(), |k| k.to_string());
        println!(
            "| {} | {} ms | {} | {} | {:.1}% |",
            if full {
                format!("full ({chunk})")
            } else {
                chunk.to_string()
            },
            chunk * 10,
            if full { "–".into() } else { left.clone() },
            e.step,
            100.0 * e.metric
        );
        points.push(ChunkPoint {
            chunk,
            label: if full {
                "full".into()
            } else {
                format!("C={chunk}")
            },
            accuracy: e.metric,
        });
    }
    points.sort_by_key(|p| p.chunk);
    if let Some(p) = &a.plot {
        accuracy_by_chunk(
            &points,
            "speech: held-out framewise accuracy against chunk size",
            p,
        )?;
        eprintln!("picture {}", p.display());
    }
    Ok(())
}
