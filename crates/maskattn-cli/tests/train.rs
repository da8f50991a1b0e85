//! `maskattn train` and the commands that use its checkpoints, end to end on tiny models:
//! both objectives, both layouts, text and tokenizer input, resume equal to an uninterrupted
//! run, and damaged checkpoints rejected with a clear message.

use std::path::Path;
use std::process::{Command, Output};

fn maskattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = maskattn(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "maskattn {args:?} failed:\n{err}");
    String::from_utf8_lossy(&o.stdout).into_owned() + &err
}

fn fails(args: &[&str], want: &str) {
    let o = maskattn(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "maskattn {args:?} should fail");
    assert!(
        err.contains(want),
        "maskattn {args:?}: expected `{want}` in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

const TINY: [&str; 14] = [
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
    "--lr",
];

fn train(out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.push("3e-3");
    args.extend(extra);
    ok(&args)
}

#[test]
fn both_objectives_train_and_their_checkpoints_serve() {
    let dir = tempfile::tempdir().unwrap();
    let clm = dir.path().join("clm");
    let log = train(
        &clm,
        &["--objective", "clm", "--steps", "6", "--eval-every", "3"],
    );
    assert!(log.contains("answer accuracy"), "{log}");
    assert!(log.contains("packed  rows"), "{log}");
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "loss.svg",
    ] {
        assert!(clm.join(f).exists(), "{f}");
    }
    let gen = ok(&[
        "generate",
        "--checkpoint",
        clm.to_str().unwrap(),
        "--prompt",
        "a3 b4|",
        "--max-tokens",
        "5",
    ]);
    assert!(gen.starts_with("a3 b4|"), "{gen}");
    assert!(gen.contains("tokens/s"), "{gen}");
    for pic in ["map.png", "map.svg"] {
        let out = dir.path().join(pic);
        ok(&[
            "attention-map",
            "--checkpoint",
            clm.to_str().unwrap(),
            "--text",
            "a3 b4|b4",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::metadata(&out).unwrap().len() > 1000,
            "{pic} is written"
        );
    }
    fails(
        &[
            "fill-mask",
            "--checkpoint",
            clm.to_str().unwrap(),
            "a[MASK]",
        ],
        "needs an mlm checkpoint",
    );

    let mlm = dir.path().join("mlm");
    train(
        &mlm,
        &[
            "--objective",
            "mlm",
            "--layout",
            "padded",
            "--steps",
            "4",
            "--eval-every",
            "4",
        ],
    );
    let fill = ok(&[
        "fill-mask",
        "--checkpoint",
        mlm.to_str().unwrap(),
        "a3 b[MASK]|b4",
        "--top-k",
        "3",
    ]);
    assert_eq!(fill.matches('%').count(), 3, "{fill}");
    fails(
        &[
            "fill-mask",
            "--checkpoint",
            mlm.to_str().unwrap(),
            "no mask here",
        ],
        "no [MASK]",
    );
    fails(
        &[
            "generate",
            "--checkpoint",
            mlm.to_str().unwrap(),
            "--prompt",
            "a",
        ],
        "needs a clm checkpoint",
    );
}

#[test]
fn learned_positions_and_grouped_query_heads_train_too() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("learned");
    let log = train(
        &run,
        &[
            "--positions",
            "learned",
            "--kv-heads",
            "1",
            "--steps",
            "3",
            "--eval-every",
            "3",
        ],
    );
    assert!(log.contains("Learned positions"), "{log}");
    assert!(log.contains("2 heads / 1 kv heads"), "{log}");
    let gen = ok(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "abba|",
        "--max-tokens",
        "100",
    ]);
    // 5 prompt tokens + 100 asked for > 48 learned positions: the run says so, and stops there.
    assert!(gen.contains("learned positions stop at 48 tokens"), "{gen}");
    assert!(gen.starts_with("abba|"), "{gen}");
}

#[test]
fn resume_continues_exactly_where_the_run_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    let common = [
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--dropout",
        "0.1",
        "--seed",
        "5",
    ];
    train(&straight, &common);
    let mut first: Vec<&str> = common.to_vec();
    first.extend(["--stop-after", "2"]);
    train(&split, &first);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["step"], 2);
    ok(&["train", "--resume", split.to_str().unwrap(), "--quiet"]);
    let a = std::fs::read(straight.join("model.safetensors")).unwrap();
    let b = std::fs::read(split.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    let ca: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("config.json")).unwrap())
            .unwrap();
    let cb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("config.json")).unwrap()).unwrap();
    assert_eq!(ca["losses"], cb["losses"]);
    assert_eq!(ca["evals"], cb["evals"]);
}

#[test]
fn damaged_checkpoints_are_rejected_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train(&run, &["--steps", "2", "--eval-every", "2"]);
    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&run).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
        }
        d
    };
    let args = |d: &Path| {
        vec![
            "generate".to_string(),
            "--checkpoint".into(),
            d.to_str().unwrap().into(),
            "--prompt".into(),
            "a".into(),
        ]
    };
    let run_args = |d: &Path, want: &str| {
        let a = args(d);
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), want);
    };
    // A flipped byte in the weights.
    let flipped = copy("flipped");
    let mut w = std::fs::read(flipped.join("model.safetensors")).unwrap();
    let n = w.len();
    w[n - 3] ^= 0x40;
    std::fs::write(flipped.join("model.safetensors"), w).unwrap();
    run_args(&flipped, "model.safetensors is corrupt");
    // A truncated config.
    let truncated = copy("truncated");
    let c = std::fs::read_to_string(truncated.join("config.json")).unwrap();
    std::fs::write(truncated.join("config.json"), &c[..c.len() / 2]).unwrap();
    run_args(&truncated, "config.json is corrupt");
    // A config that does not match the weights.
    let mismatched = copy("mismatched");
    let mut v: serde_json::Value = serde_json::from_str(&c).unwrap();
    v["model"]["d_model"] = serde_json::json!(64);
    v["model"]["d_ff"] = serde_json::json!(256);
    std::fs::write(
        mismatched.join("config.json"),
        serde_json::to_string(&v).unwrap(),
    )
    .unwrap();
    run_args(&mismatched, "shape");
    // No checkpoint at all; a missing weights file.
    run_args(&dir.path().join("nothing"), "is not a checkpoint");
    let missing = copy("missing");
    std::fs::remove_file(missing.join("optimizer.safetensors")).unwrap();
    fails(
        &["train", "--resume", missing.to_str().unwrap(), "--quiet"],
        "optimizer.safetensors is missing",
    );
}

#[test]
fn text_files_and_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    let para = "the cat sat on the mat . the dog sat on the log .";
    std::fs::write(
        &text,
        (0..30)
            .map(|i| format!("{para} {i}"))
            .collect::<Vec<_>>()
            .join("\n\n"),
    )
    .unwrap();
    let log = train(
        &dir.path().join("bytes"),
        &[
            "--text",
            text.to_str().unwrap(),
            "--steps",
            "3",
            "--eval-every",
            "3",
        ],
    );
    assert!(log.contains("perplexity"), "{log}");
    let log = train(
        &dir.path().join("bytes-mlm"),
        &[
            "--text",
            text.to_str().unwrap(),
            "--objective",
            "mlm",
            "--steps",
            "3",
            "--eval-every",
            "3",
        ],
    );
    assert!(log.contains("masked-token accuracy"), "{log}");

    // A word-level Hugging Face tokenizer.
    let words = [
        "[PAD]", "[UNK]", "[MASK]", "[SEP]", "the", "cat", "sat", "on", "mat", ".", "dog", "log",
    ];
    let mut vocab: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("\"{w}\": {i}"))
        .collect();
    vocab.extend((0..30).map(|i| format!("\"{i}\": {}", words.len() + i)));
    let tok = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"[UNK]"}}}}"#,
        vocab.join(",")
    );
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, tok).unwrap();
    let run = dir.path().join("hf");
    train(
        &run,
        &[
            "--text",
            text.to_str().unwrap(),
            "--tokenizer",
            tok_path.to_str().unwrap(),
            "--objective",
            "mlm",
            "--steps",
            "3",
            "--eval-every",
            "3",
        ],
    );
    assert!(
        run.join("tokenizer.json").exists(),
        "the tokenizer travels with the checkpoint"
    );
    let fill = ok(&[
        "fill-mask",
        "--checkpoint",
        run.to_str().unwrap(),
        "the cat [MASK] on the mat",
    ]);
    assert!(fill.contains("[MASK] #1"), "{fill}");

    fails(
        &[
            "train",
            "--tokenizer",
            tok_path.to_str().unwrap(),
            "--quiet",
        ],
        "--tokenizer needs --text",
    );
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, [0xffu8, 0xfe, 0x00]).unwrap();
    fails(
        &["train", "--text", bad.to_str().unwrap(), "--quiet"],
        "is not UTF-8",
    );
    fails(
        &["train", "--text", "/nonexistent.txt", "--quiet"],
        "reading /nonexistent.txt",
    );
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{}").unwrap();
    fails(
        &[
            "train",
            "--text",
            text.to_str().unwrap(),
            "--tokenizer",
            junk.to_str().unwrap(),
            "--quiet",
        ],
        "not a tokenizer.json",
    );
}
