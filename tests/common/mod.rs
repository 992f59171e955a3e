//! Shared test helpers: the repository paths and real tools, installed when missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Makes sure a tool is there, running the project's installer once if it is not.
/// A test never skips silently: if the tool is still missing, it fails and says why.
pub fn require_tool(check: &[&str], what: &str) {
    let ok = |c: &[&str]| {
        Command::new(c[0])
            .args(&c[1..])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if ok(check) {
        return;
    }
    eprintln!("{what} is missing: running .ci/deps.sh");
    let st = Command::new("bash")
        .arg(repo().join(".ci/deps.sh"))
        .status();
    assert!(
        ok(check),
        "{what} is still missing after .ci/deps.sh ({st:?}); install it with `bash .ci/deps.sh`"
    );
}

pub fn imgbuild() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("imgbuild").unwrap()
}

/// Runs imgbuild and asserts success, returning stdout.
pub fn run_ok(args: &[&str], cwd: &Path) -> String {
    let out = imgbuild().current_dir(cwd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "imgbuild {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
