//! The crate's modules form a tree (a DAG), not a cycle: wire, secret and
//! identity at the bottom, listeners and commands on top. Read from the
//! source: every `crate::<module>` path outside comments is an edge from the
//! file's top-level module to that module (`crate::<item>` of the crate root
//! is an edge to `lib`). Test modules are left out: they may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to: `src/listen/http.rs` → `listen`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without comments and without its `#[cfg(test)]` module
/// (by convention the last item of a file here).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(&src, f);
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let deps = edges.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let to = if modules.contains(&name) {
                name
            } else {
                "lib".to_string()
            };
            if to != from {
                deps.insert(to);
            }
        }
    }
    edges
}

/// A cycle through `start`, if there is one (depth-first search).
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_modules_import_each_other_as_a_tree_without_cycles() {
    let edges = graph();
    for (m, deps) in &edges {
        eprintln!(
            "{m} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert_eq!(cycle(&edges), None, "modules import each other in a loop");
}

#[test]
fn identity_and_wire_types_sit_at_the_bottom() {
    let edges = graph();
    let leaves = |m: &str, allowed: &[&str]| {
        let deps = &edges[m];
        let extra: Vec<&String> = deps
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "{m} depends on {extra:?}");
    };
    leaves("wire", &["secret", "deadline"]);
    leaves("deadline", &[]);
    leaves("secret", &[]);
    leaves("identity", &["kerberos", "secret"]);
    // TLS certificates and verifiers: above the byte streams, below config
    leaves("tls", &["wire"]);
    leaves("config", &["secret", "kerberos", "cloud", "tls"]);
    leaves("mapping", &["config", "identity", "kerberos", "secret"]);
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let mut edges = graph();
    edges.get_mut("wire").unwrap().insert("session".into());
    assert!(cycle(&edges).is_some(), "wire -> session must close a loop");
}
