//! `maskattn train --task NAME` end to end on short runs: the last line each task promises,
//! `--resume` of a stopped task run ending where the whole run ends, and the text tasks'
//! flags refused with a task.

mod common;
use common::{maskattn, ok};

const SMALL: [&str; 11] = [
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--batch",
    "4",
    "--warmup",
    "2",
    "--quiet",
];

fn run(task: &str, out: &str, extra: &[&str]) -> String {
    let mut args = vec!["train", "--task", task, "--out", out];
    args.extend(SMALL);
    args.extend(extra);
    ok(&args)
}

/// The value of the last line `held-out <metric> after N steps: <value>`.
fn last_line(out: &str, metric: &str, steps: u64) -> String {
    let last = out.lines().last().unwrap_or("");
    let head = format!("held-out {metric} after {steps} steps: ");
    assert!(last.starts_with(&head), "last line: {last}");
    last[head.len()..].to_string()
}

#[test]
fn items_ends_with_hit_at_10_beside_popularity() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        "items",
        dir.path().to_str().unwrap(),
        &["--steps", "6", "--eval-every", "3"],
    );
    let v = last_line(&out, "hit@10", 6);
    assert!(v.ends_with('%') || v.contains("% (popularity: "), "{v}");
    assert!(out.contains("NDCG@10"), "{out}");
}

#[test]
fn series_resumed_ends_as_the_whole_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let whole = run("series", a, &["--steps", "6", "--eval-every", "3"]);
    let v = last_line(&whole, "MSE", 6);
    assert!(
        v.contains(" (last value: ") && v.contains(", seasonal naive: "),
        "{v}"
    );
    run(
        "series",
        b,
        &["--steps", "6", "--eval-every", "3", "--stop-after", "2"],
    );
    let resumed = ok(&["train", "--resume", b, "--quiet"]);
    assert_eq!(last_line(&resumed, "MSE", 6), v);
}

#[test]
fn text_flags_are_refused_with_a_task() {
    for flag in [&["--sinks"][..], &["--text", "x.txt"], &["--softcap", "5"]] {
        let mut args = vec!["train", "--task", "items", "--steps", "1"];
        args.extend(flag);
        let o = maskattn(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag:?}");
        assert!(err.contains(flag[0]) && !err.contains("panicked"), "{err}");
    }
}

/// A CSV of three daily-seasonal variates (the third starts later), noise from a fixed
/// generator.
fn write_csv(path: &std::path::Path, bad_cell: bool) {
    let mut s = String::from("load,temp,price\n");
    let mut x = 1u64;
    let mut noise = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 40) as f64 / (1u64 << 24) as f64 - 0.5
    };
    for t in 0..400 {
        let w = std::f64::consts::TAU * t as f64 / 24.0;
        let (a, b) = (
            10.0 + 3.0 * w.sin() + noise(),
            20.0 + 0.01 * t as f64 + (w + 1.0).cos() + noise(),
        );
        let c = if t < 60 {
            String::new()
        } else {
            format!("{:.3}", 5.0 + 2.0 * (w + 2.0).sin() + noise())
        };
        let a = if bad_cell && t == 1 {
            "abc".to_string()
        } else {
            format!("{a:.3}")
        };
        s += &format!("{a},{b:.3},{c}\n");
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn series_trains_on_a_csv_file() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("data.csv");
    write_csv(&csv, false);
    let out_dir = dir.path().join("run");
    let out = run(
        "series",
        out_dir.to_str().unwrap(),
        &[
            "--csv",
            csv.to_str().unwrap(),
            "--period",
            "24",
            "--steps",
            "4",
            "--eval-every",
            "4",
        ],
    );
    let v = last_line(&out, "MSE", 4);
    assert!(
        v.contains(" (last value: ") && v.contains(", seasonal naive: "),
        "{v}"
    );
    // A cell that is not a number is named by row and column.
    write_csv(&csv, true);
    let o = maskattn(&[
        "train",
        "--task",
        "series",
        "--csv",
        csv.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("row 3, column `load`: `abc`"), "{err}");
    // --period is a flag of --csv.
    let o = maskattn(&["train", "--task", "items", "--period", "24"]);
    assert!(!o.status.success());
}
