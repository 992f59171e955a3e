//! The code shows its three sides (see src/lib.rs): a lower layer never reaches up.
//! Every `crate::<module>` a source file names (outside comments) must be allowed for
//! the top-level module the file belongs to. A new module must be placed here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const OPERATOR: &[&str] = &[
    "cli",
    "cmd",
    "drill",
    "gendocs",
    "qemu",
    "upload",
    "workstation",
];

/// Module → the modules it may name. Operator modules may name anything.
fn allowed() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        // shared
        ("progress", vec![]),
        // host side: the engine at the bottom, the agent above it
        ("snapshot", vec!["progress"]),
        ("agent", vec!["snapshot", "hostconfig", "progress"]),
        // build side
        ("tree", vec![]),
        // The profile checks pack sizes and read fractions with host.toml's own
        // bounds and parser, so a value the profile accepts is one the agent accepts.
        ("profile", vec!["hostconfig"]),
        ("secrets", vec![]),
        // host.toml is the contract between render and agent; it reuses the engine's
        // retention type.
        ("hostconfig", vec!["snapshot"]),
        ("render", vec!["profile", "tree", "hostconfig", "secrets"]),
        ("emit", vec!["tree"]),
        ("image", vec!["tree", "progress"]),
    ])
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::name` occurrences in code (comment lines and trailing comments dropped).
fn named_modules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
            rest = after;
        }
        // `use crate::{a, b}` names several at once.
        if let Some(i) = code.find("crate::{") {
            let inner = &code[i + "crate::{".len()..];
            for part in inner.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
    }
    out
}

#[test]
fn imports_go_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let allowed = allowed();
    let mut bad = Vec::new();
    let mut seen_modules = std::collections::BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        seen_modules.insert(module.clone());
        if OPERATOR.contains(&module.as_str()) {
            continue;
        }
        let Some(ok) = allowed.get(module.as_str()) else {
            bad.push(format!(
                "src/{}: module `{module}` is not placed on a side in tests/layering.rs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for name in named_modules(&text) {
            if name != module && !ok.contains(&name.as_str()) {
                bad.push(format!(
                    "src/{}: `{module}` must not use crate::{name}",
                    rel.display()
                ));
            }
        }
    }
    assert!(seen_modules.contains("agent") && seen_modules.contains("snapshot"));
    bad.sort();
    bad.dedup();
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_a_violation() {
    // The scanner must find what it is meant to refuse, or the test above proves nothing.
    let names = named_modules(
        "use crate::{drill, image::qemu};\nlet x = crate::agent::log(\"a\"); // crate::cmd",
    );
    assert!(names.contains(&"drill".to_string()));
    assert!(names.contains(&"image".to_string()));
    assert!(names.contains(&"agent".to_string()));
    assert!(!names.contains(&"cmd".to_string()));
}
