//! No import cycle between files, in every crate of the repository (the project's rule:
//! a file can be read knowing only the files it imports, so the imports form no loop).
//!
//! A small reader of Rust source, no dependencies: it follows `mod` declarations from each
//! crate root (library, program, integration test, example, fuzz target) to the files they
//! name, then collects which file each `use` and each `crate::…`, `super::…`, `self::…` (or
//! child-module) path takes a name from. Re-exports are followed to the file that defines
//! the name, so `use crate::Mask` counts as an import from mask.rs, not from lib.rs. A
//! file's `mod child;` is a declaration, not an import. Inline `mod x { … }` blocks belong
//! to their file. Macros that reach a name without a path (`#[macro_use]`) are not seen.
//!
//! Run: `cargo test --release -p maskattn --test no_import_cycles`; a failure lists each
//! cycle's files and, per import, the names taken.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Tokens: identifiers, `::`, string literals (for `#[path = "…"]`) and single punctuation.
// Comments, char literals and lifetimes are dropped.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    PathSep,
    Punct(char),
}

fn lex(src: &str) -> Vec<Tok> {
    let s: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let n = s.len();
    while i < n {
        let c = s[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && i + 1 < n && s[i + 1] == '/' {
            while i < n && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && i + 1 < n && s[i + 1] == '*' {
            let mut depth = 0;
            while i < n {
                if s[i] == '/' && i + 1 < n && s[i + 1] == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && i + 1 < n && s[i + 1] == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            let (text, next) = quoted(&s, i + 1);
            out.push(Tok::Str(text));
            i = next;
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{..}') or a lifetime ('a): only the first is skipped.
            if i + 1 < n && s[i + 1] == '\\' {
                i += 2;
                while i < n && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if i + 2 < n && s[i + 2] == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < n && (s[i].is_alphanumeric() || s[i] == '_') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if raw_prefix && i < n && (s[i] == '"' || s[i] == '#') {
                let mut hashes = 0;
                let mut j = i;
                while j < n && s[j] == '#' {
                    hashes += 1;
                    j += 1;
                }
                if j < n && s[j] == '"' {
                    // A raw string: up to `"` followed by as many `#`.
                    let body = j + 1;
                    let mut k = body;
                    loop {
                        if k >= n {
                            break;
                        }
                        if s[k] == '"' && (0..hashes).all(|h| k + 1 + h < n && s[k + 1 + h] == '#')
                        {
                            break;
                        }
                        k += 1;
                    }
                    out.push(Tok::Str(s[body..k.min(n)].iter().collect()));
                    i = (k + 1 + hashes).min(n);
                    continue;
                }
                if word == "r" && hashes == 1 {
                    // A raw identifier, r#name.
                    let start = j;
                    let mut k = j;
                    while k < n && (s[k].is_alphanumeric() || s[k] == '_') {
                        k += 1;
                    }
                    out.push(Tok::Ident(s[start..k].iter().collect()));
                    i = k;
                    continue;
                }
            }
            if matches!(word.as_str(), "b" | "c") && i < n && (s[i] == '"' || s[i] == '\'') {
                if s[i] == '"' {
                    let (text, next) = quoted(&s, i + 1);
                    out.push(Tok::Str(text));
                    i = next;
                } else {
                    i += 1;
                    while i < n && s[i] != '\'' {
                        if s[i] == '\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                    i += 1;
                }
                continue;
            }
            out.push(Tok::Ident(word));
        } else if c.is_ascii_digit() {
            while i < n && (s[i].is_alphanumeric() || s[i] == '_') {
                i += 1;
            }
        } else if c == ':' && i + 1 < n && s[i + 1] == ':' {
            out.push(Tok::PathSep);
            i += 2;
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// The text of a string literal whose body starts at `i`, and the index after its quote.
fn quoted(s: &[char], mut i: usize) -> (String, usize) {
    let mut text = String::new();
    while i < s.len() && s[i] != '"' {
        if s[i] == '\\' {
            i += 1;
        }
        if i < s.len() {
            text.push(s[i]);
        }
        i += 1;
    }
    (text, i + 1)
}

// ---------------------------------------------------------------------------------------
// Modules: the tree each crate root declares, with each module's imports and paths.

/// One name bound by a `use` (or a glob, which binds none).
#[derive(Clone, Debug)]
struct UseItem {
    path: Vec<String>,
    /// The name it binds in its module; `None` for a glob or `as _`.
    binds: Option<String>,
    glob: bool,
}

#[derive(Debug, Default)]
struct Module {
    file: PathBuf,
    children: BTreeSet<String>,
    uses: Vec<UseItem>,
    /// Paths met in code (`crate::a::b`, `super::x`, `child::y`, `Imported::z`).
    paths: Vec<Vec<String>>,
}

type ModPath = Vec<String>;

struct Crate {
    modules: BTreeMap<ModPath, Module>,
}

/// Reads the module tree of the crate rooted at `root`; `files` holds every source file.
fn load_crate(files: &BTreeMap<PathBuf, String>, root: &Path) -> Crate {
    let mut krate = Crate {
        modules: BTreeMap::new(),
    };
    let dir = root.parent().unwrap_or(Path::new("")).to_path_buf();
    read_file(files, root, Vec::new(), dir, &mut krate);
    krate
}

/// Reads one file as module `path`, whose `mod x;` children lie in `dir`.
fn read_file(
    files: &BTreeMap<PathBuf, String>,
    file: &Path,
    path: ModPath,
    dir: PathBuf,
    krate: &mut Crate,
) {
    let Some(src) = files.get(file) else {
        return;
    };
    let toks = lex(src);
    // Open inline modules: (module path, its children's directory, brace depth inside it).
    let mut stack: Vec<(ModPath, PathBuf, usize)> = vec![(path.clone(), dir, 0)];
    krate.modules.entry(path).or_default().file = file.to_path_buf();
    let mut depth = 0usize;
    let mut path_attr: Option<String> = None;
    let mut i = 0;
    while i < toks.len() {
        let (cur, cur_dir, _) = stack.last().cloned().expect("the file's module");
        match &toks[i] {
            Tok::Punct('#') if toks.get(i + 1) == Some(&Tok::Punct('[')) => {
                if let (Some(Tok::Ident(a)), Some(Tok::Punct('=')), Some(Tok::Str(p))) =
                    (toks.get(i + 2), toks.get(i + 3), toks.get(i + 4))
                {
                    if a == "path" {
                        path_attr = Some(p.clone());
                    }
                }
                i += 1;
            }
            Tok::Punct('{') => {
                depth += 1;
                path_attr = None;
                i += 1;
            }
            Tok::Punct('}') => {
                if stack.len() > 1 && stack.last().map(|s| s.2) == Some(depth) {
                    stack.pop();
                }
                depth = depth.saturating_sub(1);
                path_attr = None;
                i += 1;
            }
            Tok::Punct(';') => {
                path_attr = None;
                i += 1;
            }
            Tok::Ident(w) if w == "mod" => {
                let (Some(Tok::Ident(name)), Some(next)) = (toks.get(i + 1), toks.get(i + 2))
                else {
                    i += 1;
                    continue;
                };
                let mut child = cur.clone();
                child.push(name.clone());
                krate
                    .modules
                    .get_mut(&cur)
                    .expect("open module")
                    .children
                    .insert(name.clone());
                if *next == Tok::Punct(';') {
                    let here = file.parent().unwrap_or(Path::new(""));
                    let (child_file, child_dir) = match path_attr.take() {
                        Some(p) => {
                            let f = normalize(&here.join(p));
                            let d = f.parent().unwrap_or(Path::new("")).to_path_buf();
                            (f, d)
                        }
                        None => {
                            let flat = cur_dir.join(format!("{name}.rs"));
                            if files.contains_key(&flat) {
                                (flat, cur_dir.join(name))
                            } else {
                                (cur_dir.join(name).join("mod.rs"), cur_dir.join(name))
                            }
                        }
                    };
                    read_file(files, &child_file, child, child_dir, krate);
                    i += 3;
                } else if *next == Tok::Punct('{') {
                    depth += 1;
                    krate.modules.entry(child.clone()).or_default().file = file.to_path_buf();
                    stack.push((child, cur_dir.join(name), depth));
                    path_attr = None;
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Tok::Ident(w) if w == "use" && toks.get(i + 1) != Some(&Tok::Punct('<')) => {
                let mut j = i + 1;
                if toks.get(j) == Some(&Tok::PathSep) {
                    j += 1;
                }
                let mut items = Vec::new();
                j = use_tree(&toks, j, Vec::new(), &mut items);
                let module = krate.modules.get_mut(&cur).expect("open module");
                module.uses.extend(items);
                while j < toks.len() && toks[j] != Tok::Punct(';') {
                    j += 1;
                }
                i = j;
            }
            Tok::Ident(first) if toks.get(i + 1) == Some(&Tok::PathSep) => {
                // A path in code, from its first segment (the token before it is not `::`).
                let starts = i == 0 || toks[i - 1] != Tok::PathSep;
                let mut segs = vec![first.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::PathSep) {
                    match toks.get(j + 1) {
                        Some(Tok::Ident(s)) => {
                            segs.push(s.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                if starts {
                    let module = krate.modules.get_mut(&cur).expect("open module");
                    module.paths.push(segs);
                }
                i = j;
            }
            _ => i += 1,
        }
    }
}

/// Parses a use tree at `j` under `prefix`; returns the index after it.
fn use_tree(toks: &[Tok], mut j: usize, prefix: Vec<String>, items: &mut Vec<UseItem>) -> usize {
    match toks.get(j) {
        Some(Tok::Punct('{')) => {
            j += 1;
            loop {
                match toks.get(j) {
                    Some(Tok::Punct('}')) => return j + 1,
                    Some(Tok::Punct(',')) => j += 1,
                    None => return j,
                    _ => j = use_tree(toks, j, prefix.clone(), items),
                }
            }
        }
        Some(Tok::Punct('*')) => {
            items.push(UseItem {
                path: prefix,
                binds: None,
                glob: true,
            });
            j + 1
        }
        Some(Tok::Ident(first)) => {
            let mut segs = prefix;
            segs.push(first.clone());
            j += 1;
            while toks.get(j) == Some(&Tok::PathSep) {
                match toks.get(j + 1) {
                    Some(Tok::Ident(s)) => {
                        segs.push(s.clone());
                        j += 2;
                    }
                    Some(_) => return use_tree(toks, j + 1, segs, items),
                    None => return j + 1,
                }
            }
            // `a::{self}` names the module `a` itself.
            if segs.last().map(String::as_str) == Some("self") && segs.len() > 1 {
                segs.pop();
            }
            let mut binds = segs.last().cloned();
            if let (Some(Tok::Ident(a)), Some(Tok::Ident(alias))) = (toks.get(j), toks.get(j + 1)) {
                if a == "as" {
                    binds = (alias != "_").then(|| alias.clone());
                    j += 2;
                }
            }
            items.push(UseItem {
                path: segs,
                binds,
                glob: false,
            });
            j
        }
        _ => j + 1,
    }
}

/// `a/b/../c` as `a/c`, so a `#[path]` file is found under its plain name.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Resolution: which file a path takes its name from.

impl Crate {
    /// The file that defines what `segs`, written in module `at`, names, and the name it
    /// takes there (the item, or the module when the path ends at one); `None` when it is
    /// outside the crate (std, a dependency) or a local name.
    fn resolve(&self, at: &ModPath, segs: &[String], hops: usize) -> Option<(PathBuf, String)> {
        if hops > 16 || segs.is_empty() {
            return None;
        }
        let (mut m, rest): (ModPath, &[String]) = match segs[0].as_str() {
            "crate" => (Vec::new(), &segs[1..]),
            "self" => (at.clone(), &segs[1..]),
            "super" => {
                let mut m = at.clone();
                let mut k = 0;
                while segs.get(k).map(String::as_str) == Some("super") {
                    m.pop();
                    k += 1;
                }
                (m, &segs[k..])
            }
            first => {
                // Relative: a child module, or a name this module imports.
                if self.modules.get(at)?.children.contains(first) {
                    (at.clone(), segs)
                } else {
                    let via = self.binding(at, first)?;
                    let mut full = via.path.clone();
                    full.extend_from_slice(&segs[1..]);
                    return self.resolve(at, &full, hops + 1);
                }
            }
        };
        for (k, seg) in rest.iter().enumerate() {
            let module = self.modules.get(&m)?;
            if module.children.contains(seg) {
                m.push(seg.clone());
                continue;
            }
            // An item of `m`: defined in its file, or imported there (a re-export).
            if let Some(via) = self.binding(&m, seg) {
                let mut full = via.path.clone();
                full.extend_from_slice(&rest[k + 1..]);
                if let Some(found) = self.resolve(&m, &full, hops + 1) {
                    return Some(found);
                }
            }
            return Some((module.file.clone(), seg.clone()));
        }
        let name = m.last().cloned().unwrap_or_else(|| "crate".into());
        Some((self.modules.get(&m)?.file.clone(), name))
    }

    /// The `use` in module `m` that binds `name`.
    fn binding(&self, m: &ModPath, name: &str) -> Option<&UseItem> {
        self.modules
            .get(m)?
            .uses
            .iter()
            .find(|u| u.binds.as_deref() == Some(name))
    }

    /// Every import between two files: (from, to) → the names taken.
    fn edges(&self, into: &mut BTreeMap<(PathBuf, PathBuf), BTreeSet<String>>) {
        for (at, module) in &self.modules {
            let mut add = |segs: &[String], glob: bool| {
                if let Some((to, name)) = self.resolve(at, segs, 0) {
                    if to != module.file {
                        let name = if glob { format!("{name}::*") } else { name };
                        into.entry((module.file.clone(), to))
                            .or_default()
                            .insert(name);
                    }
                }
            };
            for u in &module.uses {
                add(&u.path, u.glob);
            }
            for p in &module.paths {
                // `Type::item` paths resolve only through a module or an import.
                let first = p[0].as_str();
                if matches!(first, "crate" | "self" | "super")
                    || module.children.contains(first)
                    || self.binding(at, first).is_some()
                {
                    add(p, false);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cycles: the strongly connected components of the file graph with more than one file.

fn cycles(edges: &BTreeMap<(PathBuf, PathBuf), BTreeSet<String>>) -> Vec<Vec<PathBuf>> {
    let mut nodes: BTreeSet<&PathBuf> = BTreeSet::new();
    let mut next: HashMap<&PathBuf, Vec<&PathBuf>> = HashMap::new();
    for (a, b) in edges.keys() {
        nodes.insert(a);
        nodes.insert(b);
        next.entry(a).or_default().push(b);
    }
    // Tarjan's algorithm, iterative.
    let mut index: HashMap<&PathBuf, usize> = HashMap::new();
    let mut low: HashMap<&PathBuf, usize> = HashMap::new();
    let mut on_stack: BTreeSet<&PathBuf> = BTreeSet::new();
    let mut stack: Vec<&PathBuf> = Vec::new();
    let mut out = Vec::new();
    let mut counter = 0;
    for &start in &nodes {
        if index.contains_key(start) {
            continue;
        }
        let mut work: Vec<(&PathBuf, usize)> = vec![(start, 0)];
        while let Some(&mut (v, ref mut k)) = work.last_mut() {
            if *k == 0 && !index.contains_key(v) {
                index.insert(v, counter);
                low.insert(v, counter);
                counter += 1;
                stack.push(v);
                on_stack.insert(v);
            }
            let succ = next.get(v).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(&w) = succ.get(*k) {
                *k += 1;
                if !index.contains_key(w) {
                    work.push((w, 0));
                } else if on_stack.contains(w) {
                    let lw = index[w].min(low[v]);
                    low.insert(v, lw);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                let lp = low[parent].min(low[v]);
                low.insert(parent, lp);
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack.remove(w);
                    comp.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    out.push(comp);
                }
            }
        }
    }
    out.sort();
    out
}

/// Every import between files of the crates rooted in `files` (paths under `crates/`).
fn all_edges(files: &BTreeMap<PathBuf, String>) -> BTreeMap<(PathBuf, PathBuf), BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for root in roots(files) {
        load_crate(files, &root).edges(&mut edges);
    }
    edges
}

/// The crate roots: each crate's library and program, and each integration test, example
/// and fuzz target (each its own crate).
fn roots(files: &BTreeMap<PathBuf, String>) -> Vec<PathBuf> {
    files
        .keys()
        .filter(|p| {
            let parts: Vec<&str> = p.iter().filter_map(|c| c.to_str()).collect();
            matches!(
                parts.as_slice(),
                [.., "src", "lib.rs" | "main.rs"]
                    | [.., "src", "bin", _]
                    | [.., "tests" | "examples" | "benches" | "fuzz_targets", _]
            )
        })
        .cloned()
        .collect()
}

/// A readable account of the cycles, or `None` when there are none.
fn report(files: &BTreeMap<PathBuf, String>) -> Option<String> {
    report_except(files, &[])
}

/// [`report`], letting through the cycles whose files all lie in `pending`.
fn report_except(files: &BTreeMap<PathBuf, String>, pending: &[&str]) -> Option<String> {
    let edges = all_edges(files);
    let found: Vec<Vec<PathBuf>> = cycles(&edges)
        .into_iter()
        .filter(|comp| {
            !comp
                .iter()
                .all(|f| pending.iter().any(|p| f == Path::new(p)))
        })
        .collect();
    if found.is_empty() {
        return None;
    }
    let mut text = format!("{} import cycle(s) between files:\n", found.len());
    for comp in &found {
        let names: Vec<String> = comp.iter().map(|p| p.display().to_string()).collect();
        text += &format!("\ncycle: {}\n", names.join(" <-> "));
        for a in comp {
            for b in comp {
                if let Some(taken) = edges.get(&(a.clone(), b.clone())) {
                    let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
                    text += &format!(
                        "  {} -> {}: {}\n",
                        a.display(),
                        b.display(),
                        taken.join(", ")
                    );
                }
            }
        }
    }
    Some(text)
}

/// Every `.rs` file under `dir` (build output skipped), keyed by its path under `base`.
fn collect(base: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if p.file_name()
                .is_some_and(|n| n == "target" || n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            collect(base, &p, files);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&p).expect("a readable source file");
            let rel = p.strip_prefix(base).expect("under the base").to_path_buf();
            files.insert(rel, text);
        }
    }
}

#[test]
fn no_import_cycle_between_files_in_any_crate() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let crates = repo.join("crates");
    let mut files = BTreeMap::new();
    collect(&repo, &crates, &mut files);
    // The five crates, each found with its root and a dozen files at least (a check on the
    // reader: a crate it cannot see would pass for free).
    for name in [
        "maskattn",
        "maskattn-candle",
        "maskattn-train",
        "maskattn-cli",
        "maskattn-py",
    ] {
        let src = Path::new("crates").join(name).join("src");
        let seen = files.keys().filter(|p| p.starts_with(&src)).count();
        assert!(
            seen >= 4,
            "crate {name}: only {seen} files found under {}",
            src.display()
        );
        let root = roots(&files).into_iter().find(|r| r.starts_with(&src));
        let root = root.unwrap_or_else(|| panic!("crate {name}: no lib.rs or main.rs"));
        let krate = load_crate(&files, &root);
        let reached = krate
            .modules
            .values()
            .map(|m| &m.file)
            .collect::<BTreeSet<_>>()
            .len();
        assert_eq!(
            reached, seen,
            "crate {name}: the module tree reaches {reached} of its {seen} files"
        );
    }
    if let Some(text) = report(&files) {
        panic!("{text}");
    }
}

// ---------------------------------------------------------------------------------------
// The reader itself, on small made-up crates.

fn made_up(sources: &[(&str, &str)]) -> BTreeMap<PathBuf, String> {
    sources
        .iter()
        .map(|(p, s)| (PathBuf::from(p), s.to_string()))
        .collect()
}

#[test]
fn a_two_file_cycle_through_use_is_reported_with_its_names() {
    let files = made_up(&[
        ("k/src/lib.rs", "mod a;\nmod b;\npub use a::A;\n"),
        (
            "k/src/a.rs",
            "use crate::b::{B, helper as h};\npub struct A;",
        ),
        (
            "k/src/b.rs",
            "pub struct B;\npub fn helper() { let _ = crate::A; }",
        ),
    ]);
    let text = report(&files).expect("a cycle");
    assert!(text.contains("cycle: k/src/a.rs <-> k/src/b.rs"), "{text}");
    assert!(
        text.contains("k/src/a.rs -> k/src/b.rs: B, helper"),
        "{text}"
    );
    // `crate::A` is the re-export in lib.rs, followed to a.rs where A is defined.
    assert!(text.contains("k/src/b.rs -> k/src/a.rs: A"), "{text}");
}

#[test]
fn declarations_inline_tests_and_one_way_imports_are_no_cycle() {
    let files = made_up(&[
        (
            "k/src/lib.rs",
            "mod a;\nmod b;\npub use a::A;\npub use b::B;\n\
             #[cfg(test)]\nmod tests { use super::*; fn t() { let _ = crate::a::A; } }\n",
        ),
        (
            "k/src/a.rs",
            "use crate::B;\npub struct A(B);\n// use crate::a; in a comment\n",
        ),
        (
            "k/src/b.rs",
            "pub struct B;\nconst S: &str = \"use crate::a::A;\";\nmod inner { use super::B; }\n",
        ),
    ]);
    assert_eq!(report(&files), None);
}

#[test]
fn a_cycle_through_super_a_path_attribute_and_a_path_in_code_is_reported() {
    let files = made_up(&[
        ("k/src/main.rs", "mod m;\nfn main() { m::run(); }\n"),
        (
            "k/src/m/mod.rs",
            "#[path = \"other.rs\"]\nmod x;\npub fn f() {}\npub fn run() { x::g(); }\n",
        ),
        ("k/src/m/other.rs", "pub fn g() { super::f() }\n"),
        // Not a module of the crate: the path attribute sends `mod x` to other.rs.
        ("k/src/m/x.rs", "use super::f;\n"),
    ]);
    let text = report(&files).expect("a cycle");
    assert!(
        text.contains("cycle: k/src/m/mod.rs <-> k/src/m/other.rs"),
        "{text}"
    );
    assert!(
        text.contains("k/src/m/mod.rs -> k/src/m/other.rs: g"),
        "{text}"
    );
    assert!(
        text.contains("k/src/m/other.rs -> k/src/m/mod.rs: f"),
        "{text}"
    );
    assert!(!text.contains("x.rs"), "{text}");
}
