//! Everything the tests, benches and CI need is in the repository: a user's clone has
//! no shared design folder (the notes beside the build machines' checkout) and no other
//! path outside the clone. This fails on any source under src/, tests/, qemu-tests/,
//! benches/ or .ci/ that names one.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            // insta's snapshots hold rendered output, not code that reads anything.
            if p.file_name().is_some_and(|n| n == "snapshots") {
                continue;
            }
            files(&p, out);
        } else if p
            .extension()
            .is_some_and(|x| ["rs", "sh", "py", "toml", "j2"].contains(&x.to_str().unwrap_or("")))
            || p.file_name().is_some_and(|n| n == "run")
        {
            out.push(p);
        }
    }
}

/// Patterns, built so this file does not match itself.
fn outside_patterns() -> Vec<String> {
    let up = "..";
    vec![
        format!("{up}/shared"),
        format!("shared/{}", "ignition-schema"),
        format!("\"{up}\").join(\"shared"),
        format!("join(\"{up}\").join(\"shared"),
        format!("/{}/", "work"),
        format!("{up}/.library"),
    ]
}

fn offenders(root: &Path) -> Vec<String> {
    let mut all = Vec::new();
    for d in ["src", "tests", "qemu-tests", "benches", ".ci"] {
        files(&root.join(d), &mut all);
    }
    let pats = outside_patterns();
    let mut bad = Vec::new();
    for f in &all {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for p in &pats {
                if line.contains(p.as_str()) {
                    bad.push(format!(
                        "{}:{}: names `{p}`",
                        f.strip_prefix(root).unwrap_or(f).display(),
                        n + 1
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn nothing_reads_outside_the_clone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bad = offenders(root);
    assert!(
        bad.is_empty(),
        "these read outside the repository (copy what they need into tests/data):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_scan_finds_a_planted_reference() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tests")).unwrap();
    std::fs::write(
        dir.path().join("tests/x.rs"),
        format!(
            "let s = repo().join(\"{}/shared/{}\");\n",
            "..", "ignition-schema"
        ),
    )
    .unwrap();
    let bad = offenders(dir.path());
    assert!(bad.iter().any(|b| b.starts_with("tests/x.rs:1")), "{bad:?}");
}
