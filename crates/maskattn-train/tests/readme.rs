//! The documentation's example of training from Rust (docs/training.md) is the crate
//! documentation's example (which `cargo test` compiles and runs), line for line: the two
//! cannot drift apart. And every relative link of the user documentation names a file that
//! exists (and, with `#anchor`, a heading of it), so moving a file cannot leave a dead link.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn training_doc_shows_the_tested_example() {
    let doc = std::fs::read_to_string(root().join("docs/training.md")).unwrap();
    let lib = include_str!("../src/lib.rs");
    let lines: Vec<&str> = lib.lines().collect();
    let start = lines.iter().position(|l| *l == "//! ```").unwrap();
    let end = start
        + 1
        + lines[start + 1..]
            .iter()
            .position(|l| *l == "//! ```")
            .unwrap();
    // Lines the documentation hides (`# …`) are not shown in docs/training.md either.
    let shown: Vec<&str> = lines[start + 1..end]
        .iter()
        .filter(|l| !l.starts_with("//! #"))
        .map(|l| {
            l.strip_prefix("//! ")
                .unwrap_or(l.strip_prefix("//!").unwrap_or(l))
        })
        .collect();
    assert!(shown.len() > 20, "the example was found");
    let block = format!("```rust\n{}\n```", shown.join("\n"));
    assert!(
        doc.contains(&block),
        "docs/training.md does not show the example of crates/maskattn-train/src/lib.rs:\n{block}"
    );
}

/// The user documentation: README, CHANGELOG, docs/ and the two package READMEs.
fn doc_files() -> Vec<PathBuf> {
    let root = root();
    let mut files: Vec<PathBuf> = [
        "README.md",
        "CHANGELOG.md",
        "crates/maskattn-candle/README.md",
        "python/README.md",
    ]
    .iter()
    .map(|f| root.join(f))
    .collect();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
}

/// The targets of the Markdown links `[text](target)` and images `![alt](target)` in `text`,
/// outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(close) = after.find(')') else { break };
            out.push(after[..close].to_string());
            rest = &after[close..];
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation other than `-` and
/// `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.push(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let root = root();
    let mut checked = 0;
    let mut dead = Vec::new();
    for file in doc_files() {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, frag) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            checked += 1;
            if !linked.exists() {
                dead.push(format!("{name}: {target} (no such file)"));
                continue;
            }
            if let Some(frag) = frag {
                let heads = anchors(&std::fs::read_to_string(&linked).unwrap_or_default());
                if !heads.iter().any(|h| h == frag) {
                    dead.push(format!("{name}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(checked > 20, "links were found ({checked})");
    assert!(dead.is_empty(), "dead links:\n{}", dead.join("\n"));
}
