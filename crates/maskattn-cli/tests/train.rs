//! `maskattn train` and the commands that use its checkpoints, end to end on tiny models:
//! both objectives, both layouts, text and tokenizer input, resume equal to an uninterrupted
//! run, and damaged checkpoints rejected with a clear message.

use std::path::Path;

mod common;
use common::{maskattn, ok_all as ok};

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
    for f in ["config.json", "loss.svg"] {
        assert!(clm.join(f).exists(), "{f}");
    }
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(checkpoint_file(&clm, f).exists(), "{f}");
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
    // At most 48 − 5 tokens were generated (each at most one character).
    let generated = gen.lines().next().unwrap().chars().count() - "abba|".len();
    assert!(
        generated <= 43,
        "{generated} tokens after the prompt: {gen}"
    );
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
    let a = std::fs::read(checkpoint_file(&straight, "model.safetensors")).unwrap();
    let b = std::fs::read(checkpoint_file(&split, "model.safetensors")).unwrap();
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
        copy_tree(&run, &d);
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
    let weights = checkpoint_file(&flipped, "model.safetensors");
    let mut w = std::fs::read(&weights).unwrap();
    let n = w.len();
    w[n - 3] ^= 0x40;
    std::fs::write(&weights, w).unwrap();
    run_args(&flipped, "model.safetensors is corrupt");
    // A truncated config.
    let truncated = copy("truncated");
    let c = std::fs::read_to_string(truncated.join("config.json")).unwrap();
    std::fs::write(truncated.join("config.json"), &c[..c.len() / 2]).unwrap();
    run_args(&truncated, "config.json is corrupt");
    // A config that does not match the weights (written by another tool, with its own
    // hash recomputed: an edit by hand is refused before the weights are looked at).
    let mismatched = copy("mismatched");
    let edited = c.replace("\"d_model\": 32", "\"d_model\": 64");
    assert_ne!(edited, c);
    std::fs::write(mismatched.join("config.json"), with_own_hash(&edited)).unwrap();
    run_args(&mismatched, "shape");
    std::fs::write(mismatched.join("config.json"), &edited).unwrap();
    run_args(&mismatched, "config.json does not match its hash");
    // No checkpoint at all; a missing weights file.
    run_args(&dir.path().join("nothing"), "is not a checkpoint");
    let missing = copy("missing");
    std::fs::remove_file(checkpoint_file(&missing, "optimizer.safetensors")).unwrap();
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
        checkpoint_file(&run, "tokenizer.json").exists(),
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

/// The file of a checkpoint that plays `name` (`model.safetensors`, `optimizer.safetensors`):
/// checkpoints keep their files in the sub-folder `config.json` names (`"files"`); older ones
/// kept them beside it.
fn checkpoint_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    match c["files"].as_str() {
        Some(sub) => dir.join(sub).join(name),
        None => dir.join(name),
    }
}

/// `config.json` text with its `config_hash` recomputed: FNV-1a 64 of the text with the
/// hash's 16 digits all zeros.
fn with_own_hash(text: &str) -> String {
    let key = "\"config_hash\": \"";
    let at = text.find(key).unwrap() + key.len();
    let mut t = text.to_string();
    t.replace_range(at..at + 16, "0000000000000000");
    let h = t.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    t.replace_range(at..at + 16, &format!("{h:016x}"));
    t
}

/// Copies a folder and everything in it.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_dir() {
            copy_tree(&f.path(), &to.join(f.file_name()));
        } else {
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
}

fn stdout_of(args: &[&str]) -> String {
    let o = maskattn(args);
    assert!(
        o.status.success(),
        "maskattn {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn tiny_temperatures_are_greedy_and_bad_sampling_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("clm");
    train(&run, &["--steps", "4", "--eval-every", "4"]);
    let run = run.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--checkpoint",
            run,
            "--prompt",
            "abca|",
            "--max-tokens",
            "8",
        ];
        a.extend(extra);
        stdout_of(&a)
    };
    let greedy = gen(&[]);
    // 1/T overflows to infinity for all of these: the most likely token must still win.
    for t in ["1e-40", "1e-300", "5e-324"] {
        assert_eq!(gen(&["--temperature", t]), greedy, "--temperature {t}");
        assert_eq!(
            gen(&["--temperature", t, "--top-k", "3"]),
            greedy,
            "--temperature {t} --top-k 3"
        );
        assert_eq!(
            gen(&["--temperature", t, "--top-p", "0.5"]),
            greedy,
            "--temperature {t} --top-p 0.5"
        );
    }
    // More candidates than tokens means all of them.
    assert_eq!(
        gen(&["--temperature", "1e-40", "--top-k", "100000"]),
        greedy
    );
    // A nucleus that holds only the top token is greedy at any temperature.
    assert_eq!(gen(&["--temperature", "5", "--top-p", "1e-9"]), greedy);
    for (flag, value) in [
        ("--temperature", "NaN"),
        ("--temperature", "-1"),
        ("--temperature", "inf"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-p", "NaN"),
    ] {
        fails(
            &[
                "generate",
                "--checkpoint",
                run,
                "--prompt",
                "a",
                &format!("{flag}={value}"),
            ],
            &format!("{flag} {value}: must be"),
        );
    }
}

#[test]
fn a_save_that_fails_half_way_leaves_a_resumable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train(
        &run,
        &["--steps", "4", "--eval-every", "2", "--stop-after", "2"],
    );
    // Files used to be written to NAME.tmp and renamed one by one: a folder in the way of
    // the optimizer's temporary file fails the next save after the weights were replaced.
    std::fs::create_dir(run.join("optimizer.tmp")).unwrap();
    let r = run.to_str().unwrap();
    let _ = maskattn(&["train", "--resume", r, "--quiet"]);
    // Whatever that run did, the folder holds a complete checkpoint (step 2 or 4) that
    // resumes and serves.
    ok(&["train", "--resume", r, "--quiet"]);
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["step"], 4);
    ok(&[
        "generate",
        "--checkpoint",
        r,
        "--prompt",
        "ab",
        "--max-tokens",
        "2",
    ]);
}

/// Counts the `null`s in a JSON value.
fn walk(v: &serde_json::Value, nulls: &mut usize) {
    match v {
        serde_json::Value::Null => *nulls += 1,
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, nulls)),
        serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, nulls)),
        _ => {}
    }
}

#[test]
fn divergence_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let mut args = vec!["train", "--out", r];
    args.extend(TINY);
    args.extend(["1e4", "--steps", "40", "--eval-every", "1"]);
    fails(&args, "diverged");
    // What is on disk is a good checkpoint: readable settings (no `null` for a NaN) and
    // finite weights, and it serves.
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let mut nulls = 0;
    walk(&c["losses"], &mut nulls);
    walk(&c["evals"], &mut nulls);
    assert_eq!(nulls, 0, "{c}");
    assert!(c["step"].as_u64().unwrap() >= 1, "{c}");
    let weights = candle_core::safetensors::load(
        checkpoint_file(&run, "model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (name, t) in weights {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    ok(&[
        "generate",
        "--checkpoint",
        r,
        "--prompt",
        "ab",
        "--max-tokens",
        "2",
    ]);
}

#[test]
fn resume_refuses_an_edited_config() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train(
        &run,
        &["--steps", "4", "--eval-every", "2", "--stop-after", "2"],
    );
    for (key, value) in [("seq_len", 1), ("batch", 0), ("lr", 1)] {
        let edited = dir.path().join(key);
        copy_tree(&run, &edited);
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(edited.join("config.json")).unwrap())
                .unwrap();
        c["run"][key] = serde_json::json!(value);
        std::fs::write(
            edited.join("config.json"),
            serde_json::to_string_pretty(&c).unwrap(),
        )
        .unwrap();
        fails(
            &["train", "--resume", edited.to_str().unwrap(), "--quiet"],
            "config.json does not match its hash",
        );
    }
}

#[test]
fn threads_are_bounded() {
    for n in ["0", "100000"] {
        fails(
            &[
                "--threads",
                n,
                "generate",
                "--checkpoint",
                "/nonexistent",
                "--prompt",
                "a",
            ],
            &format!("--threads {n}: "),
        );
    }
    // Within the bound, the flag works as before.
    fails(
        &[
            "--threads",
            "2",
            "generate",
            "--checkpoint",
            "/nonexistent",
            "--prompt",
            "a",
        ],
        "is not a checkpoint",
    );
}

#[test]
fn bad_training_settings_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    for (flag, value) in [
        ("--clip", "NaN"),
        ("--min-lr-ratio", "NaN"),
        ("--min-lr-ratio", "2"),
        ("--lr", "NaN"),
        ("--lr", "0"),
        ("--weight-decay", "inf"),
        ("--dropout", "NaN"),
    ] {
        fails(
            &["train", "--out", o, "--quiet", flag, value],
            &format!("{flag} {value}: must be"),
        );
    }
    // An --out that is a file fails at once, not at the first checkpoint.
    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").unwrap();
    let mut args = vec!["train", "--out", file.to_str().unwrap()];
    args.extend(TINY);
    args.extend(["3e-3", "--steps", "30", "--eval-every", "10"]);
    let o = maskattn(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("is not a folder"), "{err}");
    assert!(!err.contains("step "), "trained before failing:\n{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[cfg(unix)]
#[test]
fn outputs_that_are_links_are_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.txt");
    std::fs::write(&target, "keep me").unwrap();
    for name in ["config.json", "loss.svg"] {
        let run = dir.path().join(format!("run-{name}"));
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::symlink(&target, run.join(name)).unwrap();
        let mut args = vec!["train", "--out", run.to_str().unwrap()];
        args.extend(TINY);
        args.extend(["3e-3", "--steps", "2", "--eval-every", "2"]);
        let o = maskattn(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not a regular file"), "{name}: {err}");
        let meta = std::fs::symlink_metadata(run.join(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name} was replaced");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        // No temporary file is left behind.
        for f in std::fs::read_dir(&run).unwrap() {
            let f = f.unwrap().file_name();
            assert!(!f.to_string_lossy().contains("tmp"), "{f:?} left behind");
        }
    }
}

/// What `generate` adds to the prompt (stdout is the prompt, then the continuation).
fn continuation(run: &Path, prompt: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        "10",
    ];
    args.extend(extra);
    let out = stdout_of(&args);
    let line = out.trim_end_matches('\n');
    assert!(line.starts_with(prompt), "{out}");
    line[prompt.len()..].to_string()
}

/// A model trained a little has learnt the shape of the built-in task's documents: after
/// `letters|` comes one answer letter, then the separator, which ends the generation. The
/// continuation is checked, not the prompt `generate` repeats.
#[test]
fn generate_continues_like_the_training_documents() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("clm");
    let mut args = vec!["train", "--out", run.to_str().unwrap()];
    args.extend([
        "--d-model",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--seq-len",
        "40",
        "--batch",
        "8",
        "--warmup",
        "10",
        "--lr",
        "1e-2",
        "--steps",
        "120",
        "--eval-every",
        "120",
        "--quiet",
    ]);
    ok(&args);
    for prompt in [
        "aaaaaaaaab|",
        "dddddcddd|",
        "abcbbbbbb|",
        "ccaccccd|",
        "cbcaacdcc|",
    ] {
        for extra in [
            &[][..],
            &["--temperature", "1e-30"],
            &["--top-k", "1", "--temperature", "2"],
        ] {
            let c = continuation(&run, prompt, extra);
            assert!(
                c.len() == 1 && "abcd".contains(&c),
                "{prompt} {extra:?}: continued with {c:?}, not one answer letter"
            );
        }
    }
    // With a prompt that is not over (no `|` yet), the model goes on writing letters.
    let c = continuation(&run, "abca", &[]);
    assert!(
        !c.is_empty() && c.chars().all(|ch| "abcd|".contains(ch)),
        "{c:?}"
    );
}
