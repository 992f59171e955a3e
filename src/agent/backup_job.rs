//! `imgbuild backup` in the image (imgbuild-backup.timer): quiesce what the profile
//! asks for, take one atomic snapshot of all volumes (`quiesce`), bring the services
//! back, upload from the snapshot, prune, write metrics, ping.

use super::metrics::{ping, write_metrics};
use super::quiesce;
use super::{log, HostPaths};
use crate::hostconfig::{FinalSnapshotWhen, HostConfig};
use crate::progress::Progress;
use crate::snapshot::backup::{self, BackupOptions, BackupReport, NoHooks, Source};
use crate::snapshot::error::SnapshotError;
use crate::snapshot::prune;
use crate::snapshot::store::DeleteOutcome;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct HostBackupResult {
    pub report: Option<BackupReport>,
    pub prune: Option<prune::PruneReport>,
    pub error: Option<String>,
    pub seconds: f64,
    /// Read from one read-only snapshot of all volumes (crash-consistent across them).
    pub atomic: bool,
    /// How long `stop` units were down (0 when every volume is `live`).
    pub downtime_seconds: f64,
    /// With `object_lock_days`: whether the bucket was seen to enforce it (also when
    /// the backup failed because it does not).
    pub object_lock_enforced: Option<bool>,
}

/// Which backup runs: the timer's, or the last one on the way down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// imgbuild-backup.timer: quiesce per the profile, snapshot, upload, prune.
    Scheduled,
    /// imgbuild-final-snapshot.service at shutdown: the containers have already
    /// stopped, so nothing is quiesced or started again; no prune (the next host's
    /// timer does it); everything, connecting included, within `timeout`.
    Final { timeout: Duration },
}

/// The timer's job: snapshot every configured volume, prune, write metrics, ping.
/// Returns the result whether it failed or not (metrics and ping happen either way).
pub fn backup_host(
    hc: &HostConfig,
    paths: &HostPaths,
    progress: &Progress,
) -> anyhow::Result<HostBackupResult> {
    backup_host_mode(hc, paths, progress, Mode::Scheduled)
}

/// Why a final snapshot is not wanted on this shutdown, if it is not.
pub fn final_snapshot_skip(hc: &HostConfig, paths: &HostPaths) -> Option<String> {
    let b = hc.backup.as_ref()?;
    if super::drill_mode::staging_copy() {
        return Some("this is a staging copy (imgbuild run): it never writes snapshots".into());
    }
    match b.final_snapshot.when {
        FinalSnapshotWhen::Off => Some("final_snapshot = \"off\" in the profile".into()),
        FinalSnapshotWhen::Always => None,
        FinalSnapshotWhen::Poweroff => rebooting(&paths.systemctl).then(|| {
            "the host is rebooting and keeps its disk (final_snapshot = \"always\" takes one \
             on reboots too)"
                .into()
        }),
    }
}

/// Whether the shutdown in progress is a reboot: its job is queued in systemd.
fn rebooting(systemctl: &Path) -> bool {
    std::process::Command::new(systemctl)
        .args(["list-jobs", "--no-legend", "--no-pager"])
        .output()
        .map(|o| {
            let jobs = String::from_utf8_lossy(&o.stdout);
            ["reboot.target", "kexec.target", "soft-reboot.target"]
                .iter()
                .any(|t| jobs.contains(t))
        })
        .unwrap_or(false)
}

/// `imgbuild backup --final`: the snapshot of a planned shutdown, or a console line
/// saying why there is none.
pub fn final_snapshot(
    hc: &HostConfig,
    paths: &HostPaths,
    progress: &Progress,
    timeout: Duration,
) -> anyhow::Result<Option<HostBackupResult>> {
    if let Some(why) = final_snapshot_skip(hc, paths) {
        log(&format!("{FINAL}: skipped: {why}"));
        return Ok(None);
    }
    log(&format!(
        "{FINAL}: the containers have stopped; taking the last snapshot (at most {} s)",
        timeout.as_secs()
    ));
    backup_host_mode(hc, paths, progress, Mode::Final { timeout }).map(Some)
}

const FINAL: &str = "imgbuild final snapshot";

pub fn backup_host_mode(
    hc: &HostConfig,
    paths: &HostPaths,
    progress: &Progress,
    mode: Mode,
) -> anyhow::Result<HostBackupResult> {
    let who = match mode {
        Mode::Scheduled => "imgbuild backup",
        Mode::Final { .. } => FINAL,
    };
    let deadline = match mode {
        Mode::Final { timeout } => Some(Instant::now() + timeout),
        Mode::Scheduled => None,
    };
    let b = hc
        .backup
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("host.toml has no [backup] section: nothing to back up"))?;
    if super::drill_mode::active().is_some() {
        // A drilled copy holds restored data, not the host's live data: a snapshot of
        // it must never become the newest one (and its ping must not report success).
        log(&format!(
            "{who}: refused: this is a drill boot (imgbuild drill), not the host"
        ));
        anyhow::bail!("drill boot: backups are off");
    }
    if super::drill_mode::staging_copy() {
        log(&format!(
            "{who}: refused: this is a staging copy (imgbuild run): its snapshots must never \
             become the host's newest"
        ));
        anyhow::bail!("staging copy: backups are off");
    }
    let start = Instant::now();
    let target = super::target(&hc.host, b);
    let mut atomic = false;
    let mut downtime = Duration::ZERO;
    let run = (|| {
        // Until first boot has restored (or explicitly started empty), the volumes do
        // not hold the host's data: a snapshot now would become the newest one and the
        // next reprovisioning would restore it, losing the real data.
        if !paths.firstboot_done.exists() {
            return Err(SnapshotError::Other(format!(
                "first boot has not finished restoring ({} is missing): refusing to snapshot \
                 volumes that may be empty",
                paths.firstboot_done.display()
            )));
        }
        for v in &b.volumes {
            let d = paths.volumes.join(&v.name).join("_data");
            if !d.is_dir() {
                return Err(SnapshotError::Other(format!(
                    "volume {}: {} does not exist",
                    v.name,
                    d.display()
                )));
            }
        }
        // Taken before anything is stopped: waiting for a check must not be downtime.
        let _lock = super::JobLock::acquire(&paths.job_lock(), "backup")
            .map_err(|e| SnapshotError::Other(format!("{e:#}")))?;
        let rt = crate::snapshot::runtime()?;
        let can_snapshot = quiesce::is_btrfs_subvolume(&paths.volumes);
        if can_snapshot {
            quiesce::remove_stale(&paths.volumes).map_err(SnapshotError::Other)?;
        } else {
            log(&format!(
                "{who}: warning: {} is not a btrfs subvolume: no atomic snapshot, \
                 volumes are read live file by file (not crash-consistent for databases)",
                paths.volumes.display()
            ));
        }
        let stopped = match mode {
            Mode::Scheduled => {
                quiesce::quiesce(&b.volumes, &paths.systemctl).map_err(SnapshotError::Other)?
            }
            Mode::Final { .. } => {
                still_running(b, &paths.systemctl, who);
                quiesce::Stopped::default()
            }
        };
        let (snap, stopped) = if can_snapshot {
            let snap = quiesce::AtomicSnapshot::take(&paths.volumes);
            // The instant is taken (or failed): the services come back before the upload.
            downtime = quiesce::resume(&paths.systemctl, stopped);
            let snap = snap.map_err(SnapshotError::Other)?;
            log(&format!(
                "{who}: atomic snapshot of all volumes taken ({})",
                snap.root.display()
            ));
            (Some(snap), None)
        } else {
            (None, Some(stopped))
        };
        atomic = snap.is_some();
        let read_root = snap
            .as_ref()
            .map(|s| s.root.clone())
            .unwrap_or_else(|| paths.volumes.clone());
        let sources: Vec<Source> = b
            .volumes
            .iter()
            .map(|v| {
                let root = read_root.join(&v.name).join("_data");
                // Read from the same instant as the data: the redo point of the last
                // checkpoint this copy holds is where its WAL replay starts.
                let wal_start = v.postgres.as_ref().and_then(|pg| {
                    let data = if pg.data == "." { root.clone() } else { root.join(&pg.data) };
                    if !data.join("PG_VERSION").is_file() {
                        return None;
                    }
                    super::wal::wal_start(&data)
                        .map_err(|e| {
                            log(&format!(
                                "{who}: warning: volume {}: no WAL position recorded ({e}); a replay from this snapshot cannot use the shipped WAL",
                                v.name
                            ))
                        })
                        .ok()
                });
                Source {
                    name: v.name.clone(),
                    root,
                    wal_start,
                }
            })
            .collect();
        let upload = async {
            let keys = target.keys()?;
            let store = target.connect().await?;
            if let Mode::Final { .. } = mode {
                check_lineage(&store, paths).await?;
            }
            let opts = BackupOptions {
                host: hc.host.clone(),
                parallel: 16,
                progress: progress.clone(),
                pack_target: b.packs.target_bytes(),
            };
            let report = backup::backup(&store, &keys, &sources, &mut NoHooks, &opts).await;
            Ok::<_, SnapshotError>((store, keys, report))
        };
        let out = rt.block_on(within(deadline, upload));
        // Without a snapshot the units stay down for the whole read.
        if let Some(stopped) = stopped {
            downtime = quiesce::resume(&paths.systemctl, stopped);
        }
        drop(snap);
        let (store, keys, report) = out?;
        let report = report?;
        if let Err(e) = remember_snapshot(paths, &report.id) {
            log(&format!(
                "{who}: warning: cannot record the snapshot id: {e}"
            ));
        }
        let after = async {
            // A snapshot exists now: "start empty" must never again be a valid answer.
            match crate::snapshot::marker::remove(&store).await {
                Ok(Some(DeleteOutcome::Deleted)) => {
                    log(&format!("{who}: first snapshot: removed the empty-start marker"))
                }
                Ok(Some(DeleteOutcome::Refused)) => log(&format!(
                    "{who}: warning: the bucket refused to delete the empty-start marker (Object Lock or a policy); first boot still prefers the snapshot",
                )),
                Ok(None) => {}
                Err(e) => log(&format!(
                    "{who}: warning: cannot remove the empty-start marker: {e}"
                )),
            }
            let pr = match mode {
                Mode::Scheduled => {
                    Some(prune::prune(&store, &keys, &b.keep, &b.packs.prune_options()).await)
                }
                Mode::Final { .. } => None,
            };
            if matches!(mode, Mode::Scheduled) && super::wal::volumes(b).next().is_some() {
                match super::wal::retain(&store, &keys, b).await {
                    Ok(r) => {
                        for (v, r) in r {
                            log(&format!(
                                "{who}: WAL of {v}: {} file(s) no kept snapshot needs deleted, {} still locked, {} kept",
                                r.deleted, r.refused, r.kept
                            ));
                        }
                    }
                    Err(e) => log(&format!("{who}: warning: WAL retention: {e:#}")),
                }
            }
            Ok(pr)
        };
        let pr = match rt.block_on(within(deadline, after)) {
            Ok(pr) => pr,
            // The snapshot is complete whatever happens to the marker: report it.
            Err(e) => {
                log(&format!("{who}: warning: {e} (after the snapshot)"));
                None
            }
        };
        Ok((report, pr))
    })();
    let mut result = HostBackupResult {
        report: None,
        prune: None,
        error: None,
        seconds: 0.0,
        atomic,
        downtime_seconds: downtime.as_secs_f64(),
        object_lock_enforced: None,
    };
    match run {
        Ok((report, pr)) => {
            for w in &report.warnings {
                log(&format!("{who}: warning: {w}"));
            }
            log(&format!(
                "{who}: snapshot {}: {} bytes, {} new ({} uploaded in {} packs), {} files",
                report.id,
                report.stats.bytes_total,
                report.stats.bytes_new,
                report.stats.bytes_uploaded,
                report.stats.packs_new,
                report.stats.files
            ));
            log(&format!("{who}: {}", report.requests));
            if let Mode::Final { .. } = mode {
                log(&format!(
                    "{who}: taken: {} in {:.0} s; a copy of this image booted anywhere restores it",
                    report.id,
                    start.elapsed().as_secs_f64()
                ));
            }
            match pr {
                None => {}
                Some(Ok(p)) => {
                    log(&format!("{who}: prune: {}", prune_summary(&p)));
                    for problem in &p.problems {
                        log(&format!("{who}: prune: problem: {problem}"));
                    }
                    log(&format!("{who}: prune: {}", p.requests));
                    result.prune = Some(p);
                }
                // The snapshot is safe; a failed prune only delays cleanup.
                Some(Err(e)) => log(&format!("{who}: prune failed: {e}")),
            }
            result.object_lock_enforced = report.object_lock_enforced;
            result.report = Some(report);
        }
        Err(e) => {
            match mode {
                Mode::Scheduled => log(&format!("{who}: FAILED: {e}")),
                Mode::Final { .. } => log(&format!(
                    "{who}: NOT taken: {e}; a replacement would restore the previous snapshot"
                )),
            }
            if matches!(e, SnapshotError::ObjectLockNotEnforced { .. }) {
                result.object_lock_enforced = Some(false);
            }
            result.error = Some(e.to_string());
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    if let Err(e) = write_metrics(Path::new(&hc.metrics_dir), &hc.host, &result) {
        log(&format!("{who}: cannot write metrics: {e}"));
    }
    if let Some(url) = &b.ping_url {
        ping(url, result.error.is_none());
    }
    Ok(result)
}

/// The newest snapshot this machine restored or wrote, beside the first-boot marker.
fn lineage_file(paths: &HostPaths) -> std::path::PathBuf {
    paths
        .firstboot_done
        .parent()
        .unwrap_or(Path::new("."))
        .join("last-snapshot")
}

fn remember_snapshot(paths: &HostPaths, id: &str) -> std::io::Result<()> {
    let f = lineage_file(paths);
    let tmp = f.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &f)
}

/// What this machine last saw of its prefix: the snapshot it wrote last, else the one
/// first boot restored (None: it started empty and has written nothing).
fn last_seen(paths: &HostPaths) -> Option<String> {
    if let Ok(id) = std::fs::read_to_string(lineage_file(paths)) {
        return Some(id.trim().to_string());
    }
    let done: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&paths.firstboot_done).ok()?).ok()?;
    done.get("restored")?.as_str().map(str::to_string)
}

/// A final snapshot must not shadow a newer one another copy of this host wrote (a
/// replacement already running, a staging copy of the image): it would become the
/// snapshot the next first boot restores. Refused unless the prefix's newest snapshot
/// is the one this machine last restored or wrote.
async fn check_lineage(
    store: &crate::snapshot::Store,
    paths: &HostPaths,
) -> Result<(), SnapshotError> {
    let newest = crate::snapshot::restore::list_ids(store).await?.pop();
    let mine = last_seen(paths);
    match newest {
        Some(n) if Some(&n) != mine.as_ref() => Err(SnapshotError::Other(format!(
            "the prefix's newest snapshot {n} is not the one this machine restored or wrote \
             last ({}): another copy of this host wrote it; a snapshot now would shadow it",
            mine.as_deref().unwrap_or("none")
        ))),
        _ => Ok(()),
    }
}

/// Runs `f`, failing with a plain reason once `deadline` has passed.
async fn within<T>(
    deadline: Option<Instant>,
    f: impl std::future::Future<Output = Result<T, SnapshotError>>,
) -> Result<T, SnapshotError> {
    let Some(deadline) = deadline else {
        return f.await;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, f).await.unwrap_or_else(|_| {
        Err(SnapshotError::Other(
            "did not finish within final_snapshot_timeout; the shutdown goes on without it".into(),
        ))
    })
}

/// Logs the units that should have stopped before a final snapshot but run: their
/// writes after the snapshot's instant are not in it.
fn still_running(b: &crate::hostconfig::BackupConfig, systemctl: &Path, who: &str) {
    let mut units: Vec<String> = b.volumes.iter().flat_map(|v| v.units.clone()).collect();
    units.sort();
    units.dedup();
    if units.is_empty() {
        return;
    }
    let running = quiesce::active(systemctl, &units);
    if !running.is_empty() {
        log(&format!(
            "{who}: warning: still running: {} (their later writes are not in it)",
            running.join(" ")
        ));
    }
}

/// One line for a prune: snapshots, then what happened to chunks and packs. Shared by
/// the journal line of the timer and `imgbuild backup --prune` on a workstation.
pub fn prune_summary(p: &prune::PruneReport) -> String {
    let mut line = format!(
        "kept {} snapshots (and {} the policy drops but Object Lock holds), forgot {}; deleted \
         {} chunks ({} bytes); packs: {} deleted, {} repacked into {} ({} bytes copied), {} locked kept, \
         {} adopted; {} bytes unused in kept packs",
        p.kept.len(),
        p.locked_kept,
        p.forgotten.len(),
        p.chunks_deleted,
        p.bytes_deleted,
        p.packs_deleted,
        p.packs_repacked,
        p.packs_written,
        p.bytes_repacked,
        p.packs_locked_kept,
        p.packs_adopted,
        p.bytes_unused
    );
    if let Some(s) = &p.chunks_skipped {
        line.push_str(&format!("; {s}"));
    }
    line
}
