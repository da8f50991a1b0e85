//! `maskattn attention-map` writes its picture as every program output is written: whole or
//! not at all, through a symlink to its target, never over a directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;
use common::maskattn;

/// A one-step checkpoint of a tiny model, trained once for all the tests here.
fn checkpoint() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let o = maskattn(&[
            "train",
            "--out",
            ckpt.to_str().unwrap(),
            "--d-model",
            "16",
            "--layers",
            "1",
            "--heads",
            "2",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--eval-every",
            "1",
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (dir, ckpt)
    })
    .1
}

fn map_to(out: &Path) -> Output {
    maskattn(&[
        "attention-map",
        "--checkpoint",
        checkpoint().to_str().unwrap(),
        "--text",
        "abcd|a",
        "--out",
        out.to_str().unwrap(),
    ])
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn the_picture_replaces_a_symlinks_target_and_refuses_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let pics = dir.path().join("pics");
    std::fs::create_dir(&pics).unwrap();
    std::fs::write(pics.join("real.svg"), b"old").unwrap();
    let link = dir.path().join("map.svg");
    std::os::unix::fs::symlink("pics/real.svg", &link).unwrap();
    let o = map_to(&link);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let svg = std::fs::read_to_string(pics.join("real.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg:.80}"
    );
    assert_eq!(names_in(&pics), vec!["real.svg"]);

    let sub = dir.path().join("sub.png");
    std::fs::create_dir(&sub).unwrap();
    let o = map_to(&sub);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: ") && err.contains("is a directory"),
        "{err}"
    );
    assert!(names_in(&sub).is_empty());
    assert_eq!(names_in(dir.path()), vec!["map.svg", "pics", "sub.png"]);
}

/// A full disk (a 16 KiB tmpfs in a private mount namespace, as root; skipped where
/// `unshare --mount` is not permitted): the old picture stays, no temporary is left.
#[test]
fn a_picture_that_does_not_fit_leaves_the_old_one_and_no_temporary() {
    let probe = Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("unshare --mount not permitted here: the full-disk test was skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    for pic in ["map.png", "map.svg"] {
        let script = r#"mount -t tmpfs -o size=16k tmpfs "$1" || exit 99
printf old > "$1/$4"
"$2" attention-map --checkpoint "$3" --text abcd --text dcba --out "$1/$4"
echo "rc=$?"
ls -A "$1"
echo "content=$(head -c 3 "$1/$4")""#;
        let run = Command::new("unshare")
            .args(["--mount", "sh", "-c", script, "sh"])
            .arg(&disk)
            .arg(env!("CARGO_BIN_EXE_maskattn"))
            .arg(checkpoint())
            .arg(pic)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&run.stdout);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "mount failed: {out}{err}");
        assert!(err.contains("No space left on device"), "{pic}: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, vec!["rc=1", pic, "content=old"], "{pic}: {err}");
    }
}
