//! Every bad profile in tests/bad-profiles/ must exit 2 with `file:line:col`, the line
//! marked `# <-- here`, the expected message, no panic, and no output file.

use assert_cmd::Command;
use std::path::Path;

fn check(profile: &Path, expect: &str, extra: &[String], line: usize) {
    let dir = tempfile::tempdir().unwrap();
    for (ext, name) in [("ign", "out.ign"), ("raw", "out.raw")] {
        let out = dir.path().join(name);
        let mut cmd = Command::cargo_bin("imgbuild").unwrap();
        cmd.arg("build")
            .arg(profile)
            .arg("--out")
            .arg(&out)
            .arg("--secrets")
            .arg(dir.path().join("secrets"));
        cmd.args(extra);
        let res = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        let name = profile.display();
        assert_eq!(
            res.status.code(),
            Some(2),
            "{name} ({ext}): exit code, stderr:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: panic:\n{stderr}");
        let want = format!("{}:{line}:", profile.display());
        assert!(
            stderr.contains(&want),
            "{name}: expected `{want}` in:\n{stderr}"
        );
        assert!(
            stderr.contains(expect),
            "{name}: expected `{expect}` in:\n{stderr}"
        );
        assert!(!out.exists(), "{name}: output file left behind");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "secrets")
            .collect();
        assert!(
            leftovers.is_empty(),
            "{name}: files left behind: {leftovers:?}"
        );
    }
}

#[test]
fn corpus_of_bad_profiles_is_rejected_with_positions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-profiles");
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no # expect:", path.display()));
        let extra: Vec<String> = text
            .lines()
            .find_map(|l| l.strip_prefix("# args: "))
            .map(|a| a.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let line = text
            .lines()
            .position(|l| l.contains("# <-- here"))
            .unwrap_or_else(|| panic!("{}: no marker", path.display()))
            + 1;
        check(&path, expect, &extra, line);
        n += 1;
    }
    assert!(n >= 30, "only {n} bad profiles found");
    println!("{n} bad profiles rejected with file:line");
}

#[test]
fn non_utf8_profile_is_rejected_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("latin1.toml");
    std::fs::write(
        &p,
        b"[host]\nname = \"bad\"\n# caf\xe9 in Latin-1\ndefault_env = \"production\"\n",
    )
    .unwrap();
    check(&p, "not valid UTF-8", &[], 3);
}

#[test]
fn missing_profile_names_what_was_searched() {
    let dir = tempfile::tempdir().unwrap();
    let res = Command::cargo_bin("imgbuild")
        .unwrap()
        .current_dir(dir.path())
        .args(["nosuchhost", "--out", "x.ign"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_ne!(res.status.code(), Some(0));
    assert!(stderr.contains("profiles/nosuchhost.toml"), "{stderr}");
    assert!(!dir.path().join("x.ign").exists());
}
