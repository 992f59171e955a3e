//! External tools the image pipeline runs, with the install hint a user needs when one
//! is missing (one clear message rather than a "No such file" from deep inside a step).

use super::ImageError;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub(crate) struct Tool {
    pub name: &'static str,
    pub package: &'static str,
    /// Debian 12 ships versions too old or conflicting: install from bookworm-backports.
    pub backports: bool,
}

pub(crate) const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
    backports: true,
};
/// Needs e2fsprogs >= 1.47.1 (populating from a tarball); Debian 12 has that only in
/// bookworm-backports.
pub(crate) const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs libarchive13",
    backports: true,
};
pub(crate) const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    package: "qemu-utils",
    backports: true,
};
pub(crate) const QEMU_SYSTEM: Tool = Tool {
    name: "qemu-system-x86_64",
    package: "qemu-system-x86",
    backports: true,
};

impl Tool {
    pub fn hint(&self) -> String {
        let bp = if self.backports {
            " (on Debian 12 add -t bookworm-backports; .ci/deps.sh sets that up)"
        } else {
            ""
        };
        format!("sudo apt-get install {}{bp}", self.package)
    }

    pub fn missing(&self) -> ImageError {
        ImageError::ToolMissing {
            tool: self.name.to_string(),
            hint: self.hint(),
        }
    }

    /// Full path of the tool, or the "install it with" error.
    pub fn find(&self) -> Result<PathBuf, ImageError> {
        find_in_path(self.name).ok_or_else(|| self.missing())
    }
}

/// mkfs.ext4 new enough to read a tarball with `-d` (1.47.1 added it; older ones fail
/// with a puzzling "Not a directory").
pub(crate) fn mkfs_ext4() -> Result<PathBuf, ImageError> {
    let p = MKFS_EXT4.find()?;
    let out = Command::new(&p)
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .map_err(super::io_err("cannot run mkfs.ext4 -V"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // "mke2fs 1.47.2 (1-Jan-2025)"
    let ver: Vec<u32> = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .split('.')
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    if ver < vec![1, 47, 1] {
        return Err(ImageError::ToolMissing {
            tool: format!(
                "mkfs.ext4 >= 1.47.1 (found {})",
                text.lines().next().unwrap_or("?").trim()
            ),
            hint: MKFS_EXT4.hint(),
        });
    }
    Ok(p)
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // sbin is often missing from a non-root user's PATH although mkfs lives there.
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a command to completion, capturing output; a non-zero exit becomes an error
/// carrying the tail of stderr (and stdout), which is what a user needs to see.
pub(crate) fn run_captured(cmd: &mut Command, what: &str) -> Result<Output, ImageError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(super::io_err(format!("cannot start {what}")))?;
    if !out.status.success() {
        let mut log = String::from_utf8_lossy(&out.stderr).into_owned();
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        return Err(ImageError::Command {
            cmd: what.to_string(),
            status: out.status.to_string(),
            log_tail: tail(&log, 25),
        });
    }
    Ok(out)
}

pub(crate) fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
