//! `bench` and `demo` on shapes whose sizes overflow, and long or bad `--mask` expressions:
//! one line of error, never a panic, an abort or a wrong success.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean_error(args: &[&str], want: &str) {
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: expected `{want}` in {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn shapes_whose_sizes_overflow_are_refused() {
    for shape in ["4294967296,4294967296,1,1", "3,6148914691236517206,1,1"] {
        assert_clean_error(
            &["bench", "--shape", shape, "--reps", "1"],
            "too many elements",
        );
    }
    assert_clean_error(
        &[
            "bench",
            "--shape",
            "1,1,4,4",
            "--lk",
            "18446744073709551615",
            "--kv-heads",
            "2",
        ],
        "too many elements",
    );
    assert_clean_error(
        &["demo", "--shape", "3,3074457345618258603,2,1,1"],
        "too many elements",
    );
    assert_clean_error(&["demo", "--shape", "1,0,1,4,4"], "at least 1");
}

#[test]
fn long_and_bad_mask_expressions() {
    // 14,000 terms: parsed, compiled and run without a stack overflow.
    let long = vec!["causal"; 14_000].join(" & ");
    let (ok, out, err) = run(&["demo", "--shape", "1,2,1,16,8", "--mask", &long]);
    assert!(ok, "{out}\n{err}");
    assert!(out.lines().any(|l| l.ends_with("yes")), "{out}");
    let deep = format!("{}causal{}", "(".repeat(14_000), ")".repeat(14_000));
    assert_clean_error(&["demo", "--mask", &deep], "nested more than");
    assert_clean_error(
        &["bench", "--mask", "causal & sideways"],
        "unknown mask term `sideways`",
    );
    assert_clean_error(
        &["bench", "--mask", "causal | (window(3,3)"],
        "never closed",
    );
}

#[test]
fn the_grammar_runs_in_demo_with_every_operator() {
    let (ok, out, err) = run(&[
        "demo",
        "--shape",
        "2,2,1,48,16",
        "--mask",
        "causal & !(window(3,3) | prefix(8))",
        "--mask",
        "key-padding | documents & !dense",
    ]);
    assert!(ok, "{out}\n{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.ends_with("yes")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("causal & !(window(3,3) | prefix(8))"),
        "{out}"
    );
}
