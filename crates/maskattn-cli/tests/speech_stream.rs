//! `maskattn train --task speech` and `maskattn stream` end to end: a short run, its resume,
//! streaming a WAV file written here with hound (16-bit mono and float stereo), a bad file
//! and a wrong rate refused naming the file, bad flags refused naming the flag, and
//! `--compare` with its picture.

use std::path::Path;

mod common;
use common::{fails, ok};

fn train(out: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "train",
        "--task",
        "speech",
        "--out",
        out,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch",
        "2",
        "--warmup",
        "2",
        "--quiet",
    ];
    args.extend(extra);
    ok(&args)
}

/// A 16 kHz tone sweep with pauses, as 16-bit mono (or 32-bit float stereo).
fn write_wav(path: &Path, rate: u32, float_stereo: bool) {
    let spec = hound::WavSpec {
        channels: if float_stereo { 2 } else { 1 },
        sample_rate: rate,
        bits_per_sample: if float_stereo { 32 } else { 16 },
        sample_format: if float_stereo {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let n = rate as usize * 3 / 4;
    for i in 0..n {
        let t = i as f64 / rate as f64;
        let on = ((t * 4.0) as usize).is_multiple_of(2);
        let x = if on {
            0.2 * (std::f64::consts::TAU * (200.0 + 400.0 * t) * t).sin()
        } else {
            0.0
        };
        let q = (x * 32767.0) as i16;
        if float_stereo {
            // The 16-bit file's value exactly, so both files stream the same samples.
            w.write_sample(q as f32 / 32768.0).unwrap();
            w.write_sample(0.5f32).unwrap();
        } else {
            w.write_sample(q).unwrap();
        }
    }
    w.finalize().unwrap();
}

#[test]
fn speech_trains_resumes_and_streams() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let whole = train(
        a,
        &[
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--chunk",
            "4",
            "--left",
            "1",
        ],
    );
    let last = whole.lines().last().unwrap();
    assert!(
        last.starts_with("held-out accuracy after 6 steps: ")
            && last.contains("(chunk 4 frames, 1 left chunks; majority class: "),
        "{last}"
    );
    train(
        b,
        &[
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--chunk",
            "4",
            "--left",
            "1",
            "--stop-after",
            "2",
        ],
    );
    let resumed = ok(&["train", "--resume", b, "--quiet"]);
    assert_eq!(resumed.lines().last().unwrap(), last);

    // A WAV file: 0.75 s is 73 frames, so 18 chunks of 4 and a last one of 1.
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("sweep.wav");
    write_wav(&wav, 16_000, false);
    let out = ok(&["stream", a, "--wav", wav.to_str().unwrap()]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 19, "{out}");
    assert!(lines[0].contains("frames     0–3 "), "{}", lines[0]);
    assert!(lines[18].contains("frames    72–72 "), "{}", lines[18]);
    // Four labels a chunk, one in the last.
    let labels = |l: &str| l.split("–").nth(1).unwrap().split_whitespace().count() - 1;
    assert_eq!(labels(lines[0]), 4);
    assert_eq!(labels(lines[18]), 1);
    // The same signal as float stereo (first channel) streams to the same labels.
    let wav2 = dir.path().join("stereo.wav");
    write_wav(&wav2, 16_000, true);
    assert_eq!(ok(&["stream", a, "--wav", wav2.to_str().unwrap()]), out);

    // A synthesised utterance, with its truth and the streamed accuracy.
    let out = ok(&["stream", a, "--synth", "4", "--frames", "50"]);
    assert!(out.contains("(true: "), "{out}");
    assert!(out
        .lines()
        .last()
        .unwrap()
        .starts_with("streamed framewise accuracy: "));

    // --compare: the table and the picture.
    let png = dir.path().join("chunks.png");
    let out = ok(&["stream", "--compare", a, b, "--plot", png.to_str().unwrap()]);
    assert!(out.contains("| 4 | 40 ms | 1 | 6 |"), "{out}");
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

#[test]
fn bad_input_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e = fails(&["train", "--task", "speech", "--out", d, "--chunk", "0"]);
    assert!(e.contains("--chunk 0"), "{e}");
    let e = fails(&["train", "--task", "speech", "--out", d, "--left", "-2"]);
    assert!(e.contains("--left -2"), "{e}");
    let e = fails(&["train", "--task", "items", "--out", d, "--chunk", "4"]);
    assert!(e.contains("--chunk"), "{e}");

    let ckpt = dir.path().join("run");
    let c = ckpt.to_str().unwrap();
    train(c, &["--steps", "1"]);
    let wav = dir.path().join("at8k.wav");
    write_wav(&wav, 8_000, false);
    let e = fails(&["stream", c, "--wav", wav.to_str().unwrap()]);
    assert!(e.contains("at8k.wav") && e.contains("8000 Hz"), "{e}");
    let junk = dir.path().join("junk.wav");
    std::fs::write(&junk, b"not a wav file at all").unwrap();
    let e = fails(&["stream", c, "--wav", junk.to_str().unwrap()]);
    assert!(e.contains("junk.wav"), "{e}");
    let e = fails(&["stream", c]);
    assert!(e.contains("--wav") && e.contains("--synth"), "{e}");
}
