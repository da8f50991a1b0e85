//! `maskattn train` with the score modifiers: `--positions alibi|t5`, `--softcap`, `--sinks`
//! train with a finite loss, show in the run header, are saved in the checkpoint's config,
//! resume exactly, and the checkpoints generate.

use std::path::Path;

mod common;
use common::{maskattn, ok_all as ok};

fn train(out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend([
        "--d-model",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--seq-len",
        "48",
        "--batch",
        "4",
        "--warmup",
        "2",
        "--quiet",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--seed",
        "3",
    ]);
    args.extend(extra);
    ok(&args)
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// The weights file of a checkpoint folder (format 2 keeps them in a sub-folder).
fn weights(dir: &Path) -> Vec<u8> {
    let c = config(dir);
    let sub = c["files"]
        .as_str()
        .map_or(dir.to_path_buf(), |s| dir.join(s));
    std::fs::read(sub.join("model.safetensors")).unwrap()
}

#[test]
fn every_modifier_trains_resumes_exactly_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    for (n, (flags, header, positions)) in [
        (&["--positions", "alibi"][..], "Alibi positions", "alibi"),
        (
            &["--positions", "t5", "--softcap", "5", "--sinks"][..],
            "T5 positions, softcap 5, sinks",
            "t5",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let straight = dir.path().join(format!("straight{n}"));
        let log = train(&straight, flags);
        assert!(log.contains(header), "header without `{header}`:\n{log}");
        let c = config(&straight);
        assert_eq!(c["model"]["positions"], positions);
        let losses: Vec<f64> = c["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().expect("a finite loss"))
            .collect();
        assert_eq!(losses.len(), 4);
        assert!(losses.iter().all(|x| x.is_finite()), "{losses:?}");
        // The trainable modifiers are weights of the checkpoint (names in its header).
        let w = String::from_utf8_lossy(&weights(&straight)).into_owned();
        for name in ["blocks.0.attn.rel_bias", "blocks.1.attn.sinks"] {
            assert_eq!(w.contains(name), n == 1, "{flags:?}: {name}");
        }
        if n == 1 {
            assert_eq!(c["model"]["softcap"], 5.0);
            assert_eq!(c["model"]["sinks"], true);
        } else {
            // Absent, as in configs written before the modifiers existed.
            assert!(c["model"].get("softcap").is_none() && c["model"].get("sinks").is_none());
        }

        // Two steps, then resume (without repeating the flags: they are in the config).
        let split = dir.path().join(format!("split{n}"));
        let mut first = flags.to_vec();
        first.extend(["--stop-after", "2"]);
        train(&split, &first);
        ok(&["train", "--resume", split.to_str().unwrap(), "--quiet"]);
        assert!(
            weights(&straight) == weights(&split),
            "{flags:?}: resumed weights differ"
        );
        assert_eq!(config(&straight)["losses"], config(&split)["losses"]);

        let gen = ok(&[
            "generate",
            "--checkpoint",
            straight.to_str().unwrap(),
            "--prompt",
            "abba|",
            "--max-tokens",
            "8",
        ]);
        assert!(gen.starts_with("abba|"), "{gen}");
        eprintln!("{flags:?}: trained, resumed exactly, generated");
    }
}

#[test]
fn a_bad_softcap_fails_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let o = maskattn(&[
        "train",
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--softcap=-2",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("softcap"), "{err}");
}
