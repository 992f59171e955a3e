//! `imgbuild backup` in the image (imgbuild-backup.timer): quiesce what the profile
//! asks for, take one atomic snapshot of all volumes (`quiesce`), bring the services
//! back, upload from the snapshot, prune, write metrics, ping.

use super::metrics::{ping, write_metrics};
use super::quiesce;
use super::{log, HostPaths};
use crate::hostconfig::HostConfig;
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

/// The timer's job: snapshot every configured volume, prune, write metrics, ping.
/// Returns the result whether it failed or not (metrics and ping happen either way).
pub fn backup_host(
    hc: &HostConfig,
    paths: &HostPaths,
    progress: &Progress,
) -> anyhow::Result<HostBackupResult> {
    let b = hc
        .backup
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("host.toml has no [backup] section: nothing to back up"))?;
    if super::drill_mode::active().is_some() {
        // A drilled copy holds restored data, not the host's live data: a snapshot of
        // it must never become the newest one (and its ping must not report success).
        log("imgbuild backup: refused: this is a drill boot (imgbuild drill), not the host");
        anyhow::bail!("drill boot: backups are off");
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
                "imgbuild backup: warning: {} is not a btrfs subvolume: no atomic snapshot, \
                 volumes are read live file by file (not crash-consistent for databases)",
                paths.volumes.display()
            ));
        }
        let stopped =
            quiesce::quiesce(&b.volumes, &paths.systemctl).map_err(SnapshotError::Other)?;
        let (snap, stopped) = if can_snapshot {
            let snap = quiesce::AtomicSnapshot::take(&paths.volumes);
            // The instant is taken (or failed): the services come back before the upload.
            downtime = quiesce::resume(&paths.systemctl, stopped);
            let snap = snap.map_err(SnapshotError::Other)?;
            log(&format!(
                "imgbuild backup: atomic snapshot of all volumes taken ({})",
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
            .map(|v| Source {
                name: v.name.clone(),
                root: read_root.join(&v.name).join("_data"),
            })
            .collect();
        let out = rt.block_on(async {
            let keys = target.keys()?;
            let store = target.connect().await?;
            let opts = BackupOptions {
                host: hc.host.clone(),
                parallel: 16,
                progress: progress.clone(),
                pack_target: b.packs.target_bytes(),
            };
            let report = backup::backup(&store, &keys, &sources, &mut NoHooks, &opts).await;
            Ok::<_, SnapshotError>((store, keys, report))
        });
        // Without a snapshot the units stay down for the whole read.
        if let Some(stopped) = stopped {
            downtime = quiesce::resume(&paths.systemctl, stopped);
        }
        drop(snap);
        let (store, keys, report) = out?;
        let report = report?;
        rt.block_on(async {
            // A snapshot exists now: "start empty" must never again be a valid answer.
            match crate::snapshot::marker::remove(&store).await {
                Ok(Some(DeleteOutcome::Deleted)) => {
                    log("imgbuild backup: first snapshot: removed the empty-start marker")
                }
                Ok(Some(DeleteOutcome::Refused)) => log(
                    "imgbuild backup: warning: the bucket refused to delete the empty-start marker (Object Lock or a policy); first boot still prefers the snapshot",
                ),
                Ok(None) => {}
                Err(e) => log(&format!(
                    "imgbuild backup: warning: cannot remove the empty-start marker: {e}"
                )),
            }
            let pr = prune::prune(&store, &keys, &b.keep, &b.packs.prune_options()).await;
            Ok((report, pr))
        })
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
                log(&format!("imgbuild backup: warning: {w}"));
            }
            log(&format!(
                "imgbuild backup: snapshot {}: {} bytes, {} new ({} uploaded in {} packs), {} files",
                report.id,
                report.stats.bytes_total,
                report.stats.bytes_new,
                report.stats.bytes_uploaded,
                report.stats.packs_new,
                report.stats.files
            ));
            log(&format!("imgbuild backup: {}", report.requests));
            match pr {
                Ok(p) => {
                    log(&format!("imgbuild backup: prune: {}", prune_summary(&p)));
                    for problem in &p.problems {
                        log(&format!("imgbuild backup: prune: problem: {problem}"));
                    }
                    log(&format!("imgbuild backup: prune: {}", p.requests));
                    result.prune = Some(p);
                }
                // The snapshot is safe; a failed prune only delays cleanup.
                Err(e) => log(&format!("imgbuild backup: prune failed: {e}")),
            }
            result.object_lock_enforced = report.object_lock_enforced;
            result.report = Some(report);
        }
        Err(e) => {
            log(&format!("imgbuild backup: FAILED: {e}"));
            if matches!(e, SnapshotError::ObjectLockNotEnforced { .. }) {
                result.object_lock_enforced = Some(false);
            }
            result.error = Some(e.to_string());
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    if let Err(e) = write_metrics(Path::new(&hc.metrics_dir), &hc.host, &result) {
        log(&format!("imgbuild backup: cannot write metrics: {e}"));
    }
    if let Some(url) = &b.ping_url {
        ping(url, result.error.is_none());
    }
    Ok(result)
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
