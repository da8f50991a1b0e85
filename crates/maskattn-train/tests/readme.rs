//! README's example of training from Rust is the crate documentation's example (which
//! `cargo test` compiles and runs), line for line: the two cannot drift apart.

#[test]
fn readme_shows_the_tested_example() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let lib = include_str!("../src/lib.rs");
    let lines: Vec<&str> = lib.lines().collect();
    let start = lines.iter().position(|l| *l == "//! ```").unwrap();
    let end = start
        + 1
        + lines[start + 1..]
            .iter()
            .position(|l| *l == "//! ```")
            .unwrap();
    // Lines the documentation hides (`# …`) are not shown in README either.
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
        readme.contains(&block),
        "README.md does not show the example of crates/maskattn-train/src/lib.rs:\n{block}"
    );
}
