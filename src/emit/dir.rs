//! `imgbuild render`: the host tree written out as a directory, for reading, diffing
//! and for the checks that run real tools on it (nft -c, systemd-analyze verify).

use crate::tree::{EntryKind, HostTree};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Writes the tree under `out` (which must not exist or be empty). Owners are not
/// applied: this is for inspection, not for booting.
pub fn write(tree: &HostTree, out: &Path) -> std::io::Result<()> {
    if out.exists() && fs::read_dir(out)?.next().is_some() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not empty", out.display()),
        ));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".imgbuild-render-")
        .tempdir_in(parent)?;
    for d in tree.implied_dirs() {
        fs::create_dir_all(tmp.path().join(&d[1..]))?;
    }
    for e in tree.entries.values() {
        let p = tmp.path().join(&e.path[1..]);
        match &e.kind {
            EntryKind::Dir => {
                fs::create_dir_all(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(e.mode))?;
            }
            EntryKind::File { content } => {
                fs::write(&p, content)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(e.mode))?;
            }
            EntryKind::Symlink { target } => std::os::unix::fs::symlink(target, &p)?,
        }
    }
    for en in &tree.enable {
        let wants = tmp
            .path()
            .join("etc/systemd/system")
            .join(format!("{}.wants", en.wanted_by));
        fs::create_dir_all(&wants)?;
        let in_tree = tree
            .entries
            .contains_key(&format!("/etc/systemd/system/{}", en.unit));
        let target = if in_tree {
            format!("/etc/systemd/system/{}", en.unit)
        } else {
            format!("/usr/lib/systemd/system/{}", en.unit)
        };
        std::os::unix::fs::symlink(target, wants.join(&en.unit))?;
    }
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700))?;
    let tmp = tmp.keep();
    if out.exists() {
        fs::remove_dir(out)?;
    }
    fs::rename(&tmp, out)
}
