//! `train --resume DIR` keeps the checkpoint's settings, so a settings flag given with it
//! would be silently ignored: it is refused, naming the flag, before anything is read.
//! (The flags a resumed run does take — `--steps`, `--quiet` — still pass.)

use std::process::Command;

fn train(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-checkpoint");
    let out = Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(["train", "--resume", missing.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn settings_flags_with_resume_are_refused_by_name() {
    for flag in [
        &["--lr", "0.1"][..],
        &["--seed", "3"],
        &["--batch", "4"],
        &["--objective", "mlm"],
        &["--sinks"],
        &["--out", "elsewhere"],
        &["--text", "corpus.txt"],
    ] {
        let (ok, err) = train(flag);
        assert!(!ok, "{flag:?} with --resume succeeded");
        assert!(
            err.contains(&format!("'{}", flag[0])) && err.contains("--resume"),
            "{flag:?}: the error should name the flag and --resume: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn flags_a_resumed_run_takes_are_not_refused() {
    // Past the flag check: the missing checkpoint is the error.
    let (ok, err) = train(&["--steps", "10", "--quiet"]);
    assert!(!ok);
    assert!(err.contains("is not a checkpoint"), "{err}");
}
