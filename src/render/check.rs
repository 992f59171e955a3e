//! Build-time checks of rendered third-party configs with their own tools
//! (promtool, amtool), where the build machine has them.

use crate::tree::{EntryKind, HostTree};
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{tool} rejects the rendered {path}:\n{output}")]
    Rejected {
        tool: String,
        path: String,
        output: String,
    },
    #[error("cannot run the check: {0}")]
    Io(#[from] std::io::Error),
}

/// Which tool checks which rendered file.
const CHECKS: &[(&str, &[&str], &str)] = &[
    (
        "promtool",
        &["check", "config", "--syntax-only"],
        "/etc/imgbuild/config/prometheus/prometheus.yml",
    ),
    (
        "promtool",
        &["check", "rules"],
        "/etc/imgbuild/config/prometheus/rules/imgbuild.yml",
    ),
    (
        "amtool",
        &["check-config"],
        "/etc/imgbuild/config/alertmanager/alertmanager.yml",
    ),
];

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs every check whose file is in the tree. Returns notes for checks that could not
/// run (tool missing), so the build can say so instead of passing silently.
pub fn check_tree(tree: &HostTree) -> Result<Vec<String>, CheckError> {
    let mut notes = vec![];
    let dir = tempfile::tempdir()?;
    for (tool, args, path) in CHECKS {
        let Some(EntryKind::File { content }) = tree.entries.get(*path).map(|e| &e.kind) else {
            continue;
        };
        if !have(tool) {
            notes.push(format!("{tool} not found: {path} was not checked (Debian: prometheus / prometheus-alertmanager; `bash .ci/deps.sh` unpacks both)"));
            continue;
        }
        let file = dir
            .path()
            .join(Path::new(path).file_name().unwrap_or_default());
        std::fs::write(&file, content)?;
        let out = Command::new(tool).args(*args).arg(&file).output()?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            return Err(CheckError::Rejected {
                tool: tool.to_string(),
                path: path.to_string(),
                output: output.trim().to_string(),
            });
        }
    }
    Ok(notes)
}
