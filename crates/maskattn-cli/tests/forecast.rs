//! `maskattn forecast` after a short `train --task series --csv` run on pure seasonal
//! series: the forecast file's shape and header, the same numbers as the library's model
//! computed here step by step, a longer horizon that is the forecasts fed back, a better
//! forecast than the last value where the truth is known, the errors naming their
//! argument, and the pictures of the train runs and of the command.

use std::f64::consts::TAU;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use maskattn_train::checkpoint;
use maskattn_train::task::series::{Series, SeriesSettings};
use maskattn_train::task::{Encoder, Task};

mod common;
use common::ok;

/// The error line of a command that must fail.
fn fails(args: &[&str]) -> String {
    let err = common::fails(args);
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

const PERIOD: f64 = 24.0;

/// The three columns at row `t` (`c` starts at row 40).
fn truth(t: usize) -> [Option<f64>; 3] {
    let w = TAU * t as f64 / PERIOD;
    [
        Some(10.0 + 3.0 * w.sin()),
        Some(-2.0 + 1.5 * (w + 1.0).sin() + 0.5 * (2.0 * w).sin()),
        (t >= 40).then(|| 5.0 * (w + 2.0).cos()),
    ]
}

const NAMES: [&str; 3] = ["load", "temp, °C", "c"];

fn write_csv(path: &Path, rows: usize) {
    let mut s = String::from("load,\"temp, °C\",c\n");
    for t in 0..rows {
        let cells: Vec<String> = truth(t)
            .iter()
            .map(|v| v.map_or(String::new(), |v| v.to_string()))
            .collect();
        s += &cells.join(",");
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// The forecast file: header and columns.
fn read_forecast(path: &Path) -> (Vec<String>, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut r = csv_rows(&text);
    let header = r.remove(0);
    let cols = (0..header.len())
        .map(|c| r.iter().map(|row| row[c].parse().unwrap()).collect())
        .collect();
    (header, cols)
}

/// A small CSV reader for what `to_csv` writes (quoted fields without inner quotes).
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|line| {
            let mut out = Vec::new();
            let mut cur = String::new();
            let mut quoted = false;
            for ch in line.chars() {
                match ch {
                    '"' => quoted = !quoted,
                    ',' if !quoted => out.push(std::mem::take(&mut cur)),
                    _ => cur.push(ch),
                }
            }
            out.push(cur);
            out
        })
        .collect()
}

/// The forecast of the library's model, done here: the last whole patches of each column
/// (at most the longest training context), normalised by their mean and spread, one sample
/// of all three columns through the task's input, the encoder and the forecast head.
fn library_forecast(dir: &Path, columns: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let loaded = checkpoint::load(dir).unwrap();
    let spec = loaded.state.task.unwrap();
    let settings: SeriesSettings = serde_json::from_value(spec.settings).unwrap();
    assert!(settings.max_variates >= 3, "one sample holds all columns");
    let series = Series::for_forecasting(settings.clone()).unwrap();
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let encoder = Encoder::new(spec.trunk, vb.pp("encoder")).unwrap();
    let layers = series.layers(vb.pp("task"), &spec.trunk).unwrap();
    checkpoint::restore(&vars, &loaded.model).unwrap();
    let p = settings.patch;
    let most = settings.max_patches * p;
    let mut scales = Vec::new();
    let mut sample = Vec::new();
    for c in columns {
        let n = c.len().min(most) / p * p;
        let ctx = &c[c.len() - n..];
        let mean = ctx.iter().sum::<f64>() / n as f64;
        let sd = (ctx.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64)
            .sqrt()
            .max(1e-3);
        scales.push((mean, sd));
        sample.push(ctx.iter().map(|x| ((x - mean) / sd) as f32).collect());
    }
    let b = series.batch_of(&[sample]).unwrap();
    let input = series.input(&layers, &b, &spec.trunk).unwrap();
    let hidden = encoder
        .forward(&input.x, &input.mask, input.bias.as_ref())
        .unwrap();
    let pred: Vec<Vec<f32>> = series
        .forecasts(&layers, &hidden, &b)
        .unwrap()
        .to_vec2()
        .unwrap();
    pred.iter()
        .zip(&scales)
        .map(|(f, (m, sd))| f.iter().map(|&y| y as f64 * sd + m).collect())
        .collect()
}

fn is_png(path: &Path) -> bool {
    let b = std::fs::read(path).unwrap();
    b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n")
}

fn is_svg(path: &Path) -> bool {
    let s = std::fs::read_to_string(path).unwrap();
    s.len() > 1000 && s.trim_start().starts_with("<svg") && s.trim_end().ends_with("</svg>")
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
            "{what}: {a:?} against {b:?}"
        );
    }
}

const ROWS: usize = 600;

#[test]
fn forecast_after_a_csv_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let (csv, run) = (d("series.csv"), d("run"));
    write_csv(Path::new(&csv), ROWS);
    ok(&[
        "train",
        "--task",
        "series",
        "--csv",
        &csv,
        "--period",
        "24",
        "--out",
        &run,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch",
        "8",
        "--steps",
        "300",
        "--warmup",
        "20",
        "--eval-every",
        "300",
        "--quiet",
    ]);
    // The run's pictures: loss, and held-out forecasts against the truth.
    for name in ["loss.png", "forecast.png"] {
        assert!(is_png(&Path::new(&run).join(name)), "{name}");
    }
    for name in ["loss.svg", "forecast.svg"] {
        assert!(is_svg(&Path::new(&run).join(name)), "{name}");
    }

    let (out, pic) = (d("next.csv"), d("next.png"));
    let printed = ok(&[
        "forecast",
        "--checkpoint",
        &run,
        "--csv",
        &csv,
        "--out",
        &out,
        "--picture",
        &pic,
    ]);
    let (header, got) = read_forecast(Path::new(&out));
    assert_eq!(header, NAMES);
    assert!(got.iter().all(|c| c.len() == 8), "{got:?}");
    assert!(is_png(Path::new(&pic)));
    // Printed: a header line and the 8 rows, numbered from the row after the file's last.
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 9, "{printed}");
    assert!(
        lines[1].trim_start().starts_with(&ROWS.to_string()),
        "{printed}"
    );

    // The same numbers as the model computed here.
    let columns: Vec<Vec<f64>> = (0..3)
        .map(|c| (0..ROWS).filter_map(|t| truth(t)[c]).collect())
        .collect();
    let mine = library_forecast(Path::new(&run), &columns);
    for c in 0..3 {
        assert_close(&got[c], &mine[c], NAMES[c]);
    }

    // Pure seasons: the model must beat the last value by far.
    let (mut model, mut last) = (0.0, 0.0);
    for c in 0..3 {
        let end = *columns[c].last().unwrap();
        for (h, f) in got[c].iter().enumerate() {
            let y = truth(ROWS + h)[c].unwrap();
            model += (f - y).powi(2);
            last += (end - y).powi(2);
        }
    }
    assert!(
        model < 0.25 * last,
        "MSE·24 {model} against last value {last}"
    );

    // Two patches ahead: the first is the one-patch forecast, the second the one-patch
    // forecast of the file with the first appended.
    let out16 = d("next16.csv");
    ok(&[
        "forecast",
        "--checkpoint",
        &run,
        "--csv",
        &csv,
        "--horizon",
        "16",
        "--out",
        &out16,
    ]);
    let (_, got16) = read_forecast(Path::new(&out16));
    let longer = d("longer.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    for h in 0..8 {
        let row: Vec<String> = got16.iter().map(|c| c[h].to_string()).collect();
        text += &(row.join(",") + "\n");
    }
    std::fs::write(&longer, text).unwrap();
    let out8 = d("next8.csv");
    ok(&[
        "forecast",
        "--checkpoint",
        &run,
        "--csv",
        &longer,
        "--out",
        &out8,
        "--picture",
        &d("next.svg"),
    ]);
    assert!(is_svg(&tmp.path().join("next.svg")));
    let (_, then) = read_forecast(Path::new(&out8));
    for c in 0..3 {
        assert_eq!(got16[c][..8], got[c][..], "{}", NAMES[c]);
        assert_close(&got16[c][8..], &then[c], NAMES[c]);
    }

    // Errors name the argument.
    let short = d("short.csv");
    std::fs::write(&short, "a,b\n1,2\n2,3\n3,4\n").unwrap();
    let e = fails(&["forecast", "--checkpoint", &run, "--csv", &short]);
    assert!(
        e.contains("--csv") && e.contains("`a`") && e.contains("32"),
        "{e}"
    );
    let nan = d("nan.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text += "1,NaN,2\n";
    std::fs::write(&nan, text).unwrap();
    let e = fails(&["forecast", "--checkpoint", &run, "--csv", &nan]);
    assert!(
        e.contains("--csv") && e.contains(&format!("row {}", ROWS + 2)),
        "{e}"
    );
    assert!(e.contains("not a finite number"), "{e}");
    let empty = d("empty.csv");
    std::fs::write(&empty, "\n").unwrap();
    let e = fails(&["forecast", "--checkpoint", &run, "--csv", &empty]);
    assert!(e.contains("--csv"), "{e}");
    for h in ["0", "12", "100000"] {
        let e = fails(&[
            "forecast",
            "--checkpoint",
            &run,
            "--csv",
            &csv,
            "--horizon",
            h,
        ]);
        assert!(e.contains(&format!("--horizon {h}")), "{e}");
    }
    let e = fails(&[
        "forecast",
        "--checkpoint",
        &run,
        "--csv",
        &csv,
        "--picture",
        &d("p.gif"),
    ]);
    assert!(e.contains("p.gif"), "{e}");
    let e = fails(&["forecast", "--checkpoint", &d("nothing"), "--csv", &csv]);
    assert!(e.contains("--checkpoint"), "{e}");
}

#[test]
fn other_checkpoints_are_refused_and_items_draws_its_hits() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let csv = d("s.csv");
    write_csv(Path::new(&csv), 100);
    let items = d("items");
    let small = [
        "--d-model",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
        "--batch",
        "2",
        "--steps",
        "2",
        "--quiet",
    ];
    let mut args = vec!["train", "--task", "items", "--out", &items];
    args.extend(small);
    ok(&args);
    for name in ["hits.png", "loss.png"] {
        assert!(is_png(&Path::new(&items).join(name)), "{name}");
    }
    assert!(is_svg(&Path::new(&items).join("hits.svg")));
    let e = fails(&["forecast", "--checkpoint", &items, "--csv", &csv]);
    assert!(
        e.contains("--checkpoint") && e.contains("`items` task"),
        "{e}"
    );
    let lm = d("lm");
    let mut args = vec!["train", "--out", &lm, "--seq-len", "32"];
    args.extend(small);
    ok(&args);
    let e = fails(&["forecast", "--checkpoint", &lm, "--csv", &csv]);
    assert!(
        e.contains("--checkpoint") && e.contains("language-model"),
        "{e}"
    );
}
