//! The instant a backup reads: every volume captured at once.
//!
//! The volumes directory is its own btrfs filesystem (the image's `volumes` partition,
//! created by systemd-repart at first boot). A backup takes ONE read-only snapshot of
//! it and reads every volume from that snapshot, so what it stores is what a power cut
//! at that instant would have left: an app's files and its database at the same
//! moment, which databases recover from by design. Containers keep running (`live`);
//! `stop` and `hook` volumes are only quiesced around the snapshot instant.
//!
//! Where the directory is not a btrfs subvolume (an Ignition host's root filesystem),
//! there is no atomic instant: the backup says so, reads the live files, and keeps
//! `stop` units down for the whole read.

use super::log;
use crate::hostconfig::{Strategy, VolumeBackup};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Name of the read-only snapshot inside the volumes filesystem. A snapshot does not
/// contain nested subvolumes, so an old one never ends up inside a new one.
pub const SNAPSHOT_NAME: &str = ".imgbuild-snapshot";
/// A hook that has not returned by then has hung: the backup fails rather than wait.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(600);

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// Inode number of every btrfs subvolume's root directory.
const BTRFS_SUBVOL_ROOT_INO: u64 = 256;

/// Whether `dir` is the root of a btrfs subvolume (so it can be snapshotted).
pub fn is_btrfs_subvolume(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BTRFS_SUPER_MAGIC && meta.ino() == BTRFS_SUBVOL_ROOT_INO
}

fn btrfs(args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let o = Command::new("btrfs")
        .args(args)
        .output()
        .map_err(|e| format!("btrfs: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "btrfs {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// A read-only snapshot of the volumes filesystem; deleted when dropped.
pub struct AtomicSnapshot {
    pub root: PathBuf,
    /// When it was taken.
    pub at: Instant,
}

impl AtomicSnapshot {
    /// Removes a snapshot a crashed run left, then takes a new one.
    pub fn take(volumes: &Path) -> Result<AtomicSnapshot, String> {
        let root = volumes.join(SNAPSHOT_NAME);
        remove_stale(volumes)?;
        btrfs(&[
            "subvolume".as_ref(),
            "snapshot".as_ref(),
            "-r".as_ref(),
            volumes.as_os_str(),
            root.as_os_str(),
        ])?;
        Ok(AtomicSnapshot {
            root,
            at: Instant::now(),
        })
    }
}

impl Drop for AtomicSnapshot {
    fn drop(&mut self) {
        if let Err(e) = btrfs(&[
            "subvolume".as_ref(),
            "delete".as_ref(),
            self.root.as_os_str(),
        ]) {
            log(&format!(
                "imgbuild backup: warning: cannot delete the snapshot {}: {e} (the next backup retries)",
                self.root.display()
            ));
        }
    }
}

/// A snapshot left by a run that died (power cut, OOM kill) holds blocks the live
/// volumes no longer use: delete it before anything else.
pub fn remove_stale(volumes: &Path) -> Result<(), String> {
    let stale = volumes.join(SNAPSHOT_NAME);
    if stale.symlink_metadata().is_ok() {
        log(&format!(
            "imgbuild backup: removing the snapshot a previous run left ({})",
            stale.display()
        ));
        btrfs(&["subvolume".as_ref(), "delete".as_ref(), stale.as_os_str()])?;
    }
    Ok(())
}

/// Units stopped for the snapshot, to be started again exactly as they were.
#[derive(Debug, Default)]
pub struct Stopped {
    pub units: Vec<String>,
    pub since: Option<Instant>,
}

/// Runs the volumes' hooks (in profile order; a failure or a timeout fails the backup
/// before anything is stopped) and stops the `stop` volumes' units together with every
/// active unit that depends on them (an app `Requires=` its database: stopping the
/// database stops the app, so the app must be started again too).
pub fn quiesce(volumes: &[VolumeBackup], systemctl: &Path) -> Result<Stopped, String> {
    for v in volumes.iter().filter(|v| v.strategy == Strategy::Hook) {
        if let Some(cmd) = &v.hook {
            run_hook(&v.name, cmd)?;
        }
    }
    let direct: Vec<String> = volumes
        .iter()
        .filter(|v| v.strategy == Strategy::Stop)
        .flat_map(|v| v.units.iter().cloned())
        .collect();
    if direct.is_empty() {
        return Ok(Stopped::default());
    }
    let mut set: BTreeSet<String> = direct.iter().cloned().collect();
    for u in &direct {
        set.extend(dependents(systemctl, u));
    }
    let all: Vec<String> = set.into_iter().collect();
    let units = active(systemctl, &all);
    if units.is_empty() {
        log("imgbuild backup: nothing to stop (the units are not running)");
        return Ok(Stopped::default());
    }
    log(&format!("imgbuild backup: stopping {}", units.join(" ")));
    let since = Instant::now();
    let st = Command::new(systemctl)
        .arg("stop")
        .args(&units)
        .status()
        .map_err(|e| format!("systemctl stop: {e}"))?;
    let stopped = Stopped {
        units,
        since: Some(since),
    };
    if !st.success() {
        // Whatever did stop comes back before the error is reported.
        let why = format!(
            "systemctl stop {} exited with {st}",
            stopped.units.join(" ")
        );
        resume(systemctl, stopped);
        return Err(why);
    }
    Ok(stopped)
}

/// Starts what `quiesce` stopped (systemd orders them by their After=); returns the
/// downtime.
pub fn resume(systemctl: &Path, stopped: Stopped) -> Duration {
    let Some(since) = stopped.since else {
        return Duration::ZERO;
    };
    let st = Command::new(systemctl)
        .arg("start")
        .args(&stopped.units)
        .status();
    let down = since.elapsed();
    let ok = st.as_ref().is_ok_and(|s| s.success());
    log(&format!(
        "imgbuild backup: started {} again ({}), downtime {:.1}s",
        stopped.units.join(" "),
        if ok { "ok" } else { "FAILED" },
        down.as_secs_f64()
    ));
    down
}

/// Services that (transitively) need `unit`: what stopping it takes down with it.
fn dependents(systemctl: &Path, unit: &str) -> Vec<String> {
    let o = Command::new(systemctl)
        .args([
            "list-dependencies",
            "--reverse",
            "--all",
            "--plain",
            "--no-legend",
            "--no-pager",
            unit,
        ])
        .output();
    let Ok(o) = o else { return Vec::new() };
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim_start_matches(|c: char| c.is_whitespace() || "●○└├│─".contains(c)))
        .map(str::trim)
        .filter(|u| u.ends_with(".service") && *u != unit)
        .map(str::to_string)
        .collect()
}

/// The units of `units` that are running now (only those are stopped and started
/// again: a unit that was down stays down). Without an answer per unit, all of them.
pub(crate) fn active(systemctl: &Path, units: &[String]) -> Vec<String> {
    let o = Command::new(systemctl)
        .arg("is-active")
        .args(units)
        .output();
    let Ok(o) = o else {
        return units.to_vec();
    };
    let states: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    if states.len() != units.len() {
        // Not an answer per unit: stop them all rather than skip one that runs.
        return units.to_vec();
    }
    units
        .iter()
        .zip(states)
        .filter(|(_, s)| matches!(s.as_str(), "active" | "reloading" | "activating"))
        .map(|(u, _)| u.clone())
        .collect()
}

fn run_hook(volume: &str, cmd: &str) -> Result<(), String> {
    log(&format!("imgbuild backup: {volume}: running hook"));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .spawn()
        .map_err(|e| format!("{volume}: hook: {e}"))?;
    let deadline = Instant::now() + HOOK_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                return Err(format!(
                    "{volume}: hook exited with {st}; no snapshot taken"
                ))
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{volume}: hook did not finish within {}s; killed, no snapshot taken",
                    HOOK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("{volume}: hook: {e}")),
        }
    }
}
