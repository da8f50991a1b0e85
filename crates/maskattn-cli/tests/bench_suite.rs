//! The speed grid of `maskattn bench --suite` (what `bench/compare_torch.py` times against
//! PyTorch): `--suite --list` prints exactly the cells of the speed issue, written out by
//! hand here, and the cells new to it (head size 128, grouped-query prefill) run through
//! `bench --json` with the flags the script passes and come back as the case they name.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

fn maskattn(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{args:?}: {stdout}\n{stderr}");
    stdout
}

/// A cell: (B, H_q, L_q, d), L_k, H_kv, mask, dtype, pass.
type Cell = ([usize; 4], usize, usize, String, String, String);

fn cell(shape: [usize; 4], lk: usize, kv: usize, mask: &str, dtype: &str, pass: &str) -> Cell {
    (shape, lk, kv, mask.into(), dtype.into(), pass.into())
}

fn listed() -> Vec<Cell> {
    maskattn(&["bench", "--suite", "--list"])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            let n = |x: &Value| x.as_u64().unwrap_or_else(|| panic!("{l}")) as usize;
            let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{k} in {l}")).into();
            let sh = v["shape"].as_array().unwrap_or_else(|| panic!("{l}"));
            assert_eq!(sh.len(), 4, "{l}");
            (
                [n(&sh[0]), n(&sh[1]), n(&sh[2]), n(&sh[3])],
                n(&v["lk"]),
                n(&v["kv_heads"]),
                s("mask"),
                s("dtype"),
                s("pass"),
            )
        })
        .collect()
}

/// The issue's grid, written out independently of bench.rs.
fn expected() -> Vec<Cell> {
    let mut want = Vec::new();
    let masks = [
        "full",
        "causal",
        "key-padding",
        "window(256,0)",
        "documents",
    ];
    let d64 = [
        ([1, 8, 1024, 64], "f32"),
        ([1, 8, 2048, 64], "f32"),
        ([1, 8, 4096, 64], "f32"),
        ([4, 8, 512, 64], "f32"),
        ([1, 8, 2048, 64], "bf16"),
    ];
    for (shape, dtype) in d64 {
        for pass in ["fwd", "fwd+bwd"] {
            for m in masks {
                want.push(cell(shape, shape[2], 8, m, dtype, pass));
            }
        }
    }
    // Head size 128, and GQA prefill: 32 query heads on 8 key/value heads, L = 2048, causal.
    for dtype in ["f32", "bf16"] {
        for pass in ["fwd", "fwd+bwd"] {
            want.push(cell([1, 8, 2048, 128], 2048, 8, "full", dtype, pass));
            want.push(cell([1, 8, 2048, 128], 2048, 8, "causal", dtype, pass));
            want.push(cell([1, 32, 2048, 128], 2048, 8, "causal", dtype, pass));
        }
    }
    for (lk, kv) in [(4096, 8), (32768, 8), (32768, 2)] {
        want.push(cell([1, 32, 1, 128], lk, kv, "full", "f32", "decode"));
    }
    want
}

#[test]
fn the_suite_lists_the_grid_of_the_speed_issue() {
    let got = listed();
    for c in &got {
        println!("listed: {c:?}");
    }
    let (got_set, want_set): (BTreeSet<_>, BTreeSet<_>) = (
        got.iter().cloned().collect(),
        expected().into_iter().collect(),
    );
    assert_eq!(got_set.len(), got.len(), "a cell is listed twice");
    let missing: Vec<_> = want_set.difference(&got_set).collect();
    let extra: Vec<_> = got_set.difference(&want_set).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing from the suite: {missing:?}\nnot in the issue's grid: {extra:?}"
    );
    // The cells of the grid's GQA and d = 128 item, named once more one by one, so that
    // removing one fails with its name.
    for dtype in ["f32", "bf16"] {
        for pass in ["fwd", "fwd+bwd"] {
            for (shape, kv, mask) in [
                ([1, 32, 2048, 128], 8, "causal"),
                ([1, 8, 2048, 128], 8, "full"),
                ([1, 8, 2048, 128], 8, "causal"),
            ] {
                let c = cell(shape, 2048, kv, mask, dtype, pass);
                assert!(got_set.contains(&c), "the suite lacks {c:?}");
            }
        }
    }
}

/// The JSON row of one `bench --json` run with the flags `compare_torch.py` builds from a
/// listed case.
fn bench_row(shape: [usize; 4], kv: usize, mask: &str, dtype: &str, pass: &str) -> Value {
    let [b, h, l, d] = shape;
    let dims = format!("{b},{h},{l},{d}");
    let (lk, kv) = (l.to_string(), kv.to_string());
    #[rustfmt::skip]
    let args = [
        "--threads", "2", "bench", "--json", "--reps", "1", "--shape", &dims, "--lk", &lk,
        "--kv-heads", &kv, "--mask", mask, "--dtype", dtype, "--pass", pass,
    ];
    let out = maskattn(&args);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one row: {out}");
    let head: Value = serde_json::from_str(lines[0]).unwrap();
    assert!(
        head["peaks"]["cpu"].is_string(),
        "the header names the CPU: {head}"
    );
    serde_json::from_str(lines[1]).unwrap()
}

#[test]
fn gqa_and_head_size_128_cells_run_as_listed() {
    // The new cells at L = 128 instead of 2048 (the grid's time is for `--suite`, not tests):
    // the row must report the heads, key/value heads, head size, mask, dtype and pass asked.
    for dtype in ["f32", "bf16"] {
        for pass in ["fwd", "fwd+bwd"] {
            for (shape, kv, mask) in [
                ([1, 32, 128, 128], 8, "causal"),
                ([1, 8, 128, 128], 8, "causal"),
            ] {
                let r = bench_row(shape, kv, mask, dtype, pass);
                println!(
                    "{dtype} {pass} {shape:?}/{kv} {mask}: isa {} row {r}",
                    r["isa"]
                );
                let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r}")) as usize;
                assert_eq!(
                    [
                        n("batch"),
                        n("heads"),
                        n("kv_heads"),
                        n("lq"),
                        n("lk"),
                        n("d")
                    ],
                    [shape[0], shape[1], kv, shape[2], shape[2], shape[3]],
                    "{r}"
                );
                assert_eq!(
                    (&r["mask"], &r["dtype"], &r["pass"]),
                    (&Value::from(mask), &Value::from(dtype), &Value::from(pass)),
                    "{r}"
                );
                let ms = r["median_ms"].as_f64().unwrap();
                assert!(ms.is_finite() && ms > 0.0, "{r}");
                // Causal at L = 128 hides 127·128/2 of 128² pairs.
                let hidden = r["pairs_hidden"].as_f64().unwrap();
                let want = (127.0 * 128.0 / 2.0) / (128.0 * 128.0);
                assert!((hidden - want).abs() < 1e-9, "{hidden} vs {want}: {r}");
            }
        }
    }
}
