//! `imgbuild backup` in the image (imgbuild-backup.timer): snapshot every configured
//! volume, prune, write metrics, ping.

use super::metrics::{ping, write_metrics};
use super::{log, HostPaths};
use crate::hostconfig::{HostConfig, Strategy, VolumeBackup};
use crate::progress::Progress;
use crate::snapshot::backup::{self, BackupOptions, BackupReport, Source, VolumeHooks};
use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::prune::{self, CHUNK_GRACE_SECS};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Per-volume strategy: stop units / run a hook before, start units after.
struct StrategyHooks<'a> {
    volumes: &'a [VolumeBackup],
    systemctl: PathBuf,
    stopped_at: Option<(Instant, Vec<String>)>,
}

impl VolumeHooks for StrategyHooks<'_> {
    fn before(&mut self, volume: &str) -> Result<()> {
        let Some(v) = self.volumes.iter().find(|v| v.name == volume) else {
            return Ok(());
        };
        match v.strategy {
            Strategy::Live => {}
            Strategy::Hook => {
                if let Some(cmd) = &v.hook {
                    log(&format!("imgbuild backup: {volume}: running hook"));
                    let st = Command::new("sh")
                        .arg("-c")
                        .arg(cmd)
                        .status()
                        .map_err(|e| SnapshotError::Other(format!("{volume}: hook: {e}")))?;
                    if !st.success() {
                        return Err(SnapshotError::Other(format!(
                            "{volume}: hook exited with {st}; no snapshot taken"
                        )));
                    }
                }
            }
            Strategy::Stop => {
                if !v.units.is_empty() {
                    log(&format!(
                        "imgbuild backup: {volume}: stopping {}",
                        v.units.join(" ")
                    ));
                    let st = Command::new(&self.systemctl)
                        .arg("stop")
                        .args(&v.units)
                        .status()
                        .map_err(|e| SnapshotError::Other(format!("systemctl stop: {e}")))?;
                    self.stopped_at = Some((Instant::now(), v.units.clone()));
                    if !st.success() {
                        return Err(SnapshotError::Other(format!(
                            "{volume}: systemctl stop {} exited with {st}",
                            v.units.join(" ")
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn after(&mut self, volume: &str) {
        if let Some((t, units)) = self.stopped_at.take() {
            let st = Command::new(&self.systemctl)
                .arg("start")
                .args(&units)
                .status();
            let ok = st.as_ref().is_ok_and(|s| s.success());
            log(&format!(
                "imgbuild backup: {volume}: started {} again ({}), downtime {:.1}s",
                units.join(" "),
                if ok { "ok" } else { "FAILED" },
                t.elapsed().as_secs_f64()
            ));
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HostBackupResult {
    pub report: Option<BackupReport>,
    pub prune: Option<prune::PruneReport>,
    pub error: Option<String>,
    pub seconds: f64,
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
    let sources: Vec<Source> = b
        .volumes
        .iter()
        .map(|v| Source {
            name: v.name.clone(),
            root: paths.volumes.join(&v.name).join("_data"),
        })
        .collect();
    let mut hooks = StrategyHooks {
        volumes: &b.volumes,
        systemctl: paths.systemctl.clone(),
        stopped_at: None,
    };
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
        crate::snapshot::runtime()
    })()
    .and_then(|rt| {
        rt.block_on(async {
            for s in &sources {
                if !s.root.is_dir() {
                    return Err(SnapshotError::Other(format!(
                        "volume {}: {} does not exist",
                        s.name,
                        s.root.display()
                    )));
                }
            }
            let keys = target.keys()?;
            let store = target.connect().await?;
            let opts = BackupOptions {
                host: hc.host.clone(),
                parallel: 16,
                progress: progress.clone(),
            };
            let report = backup::backup(&store, &keys, &sources, &mut hooks, &opts).await?;
            // A snapshot exists now: "start empty" must never again be a valid answer.
            match crate::snapshot::marker::remove(&store).await {
                Ok(Some(crate::snapshot::store::DeleteOutcome::Deleted)) => {
                    log("imgbuild backup: first snapshot: removed the empty-start marker")
                }
                Ok(Some(crate::snapshot::store::DeleteOutcome::Refused)) => log(
                    "imgbuild backup: warning: the bucket refused to delete the empty-start marker (Object Lock or a policy); first boot still prefers the snapshot",
                ),
                Ok(None) => {}
                Err(e) => log(&format!(
                    "imgbuild backup: warning: cannot remove the empty-start marker: {e}"
                )),
            }
            let pr = prune::prune(&store, &keys, &b.keep, CHUNK_GRACE_SECS).await;
            Ok((report, pr))
        })
    });
    let mut result = HostBackupResult {
        report: None,
        prune: None,
        error: None,
        seconds: 0.0,
    };
    match run {
        Ok((report, pr)) => {
            for w in &report.warnings {
                log(&format!("imgbuild backup: warning: {w}"));
            }
            log(&format!(
                "imgbuild backup: snapshot {}: {} bytes, {} new ({} uploaded), {} files",
                report.id,
                report.stats.bytes_total,
                report.stats.bytes_new,
                report.stats.bytes_uploaded,
                report.stats.files
            ));
            match pr {
                Ok(p) => {
                    log(&format!(
                        "imgbuild backup: prune: kept {}, forgot {}, deleted {} chunks ({} bytes){}",
                        p.kept.len(),
                        p.forgotten.len(),
                        p.chunks_deleted,
                        p.bytes_deleted,
                        p.chunks_skipped.as_deref().map(|s| format!("; {s}")).unwrap_or_default()
                    ));
                    result.prune = Some(p);
                }
                // The snapshot is safe; a failed prune only delays cleanup.
                Err(e) => log(&format!("imgbuild backup: prune failed: {e}")),
            }
            result.report = Some(report);
        }
        Err(e) => {
            log(&format!("imgbuild backup: FAILED: {e}"));
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
