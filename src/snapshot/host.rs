//! The in-image side: `imgbuild firstboot` (restore before any service starts) and
//! `imgbuild backup` (run by imgbuild-backup.timer). Both read host.toml; both log one
//! plain line per step (the journal), never secrets.

use super::backup::{self, BackupOptions, BackupReport, Source, VolumeHooks};
use super::error::{Result, SnapshotError};
use super::fsio::WriteOptions;
use super::prune::{self, CHUNK_GRACE_SECS};
use super::restore::{self, RestoreOptions};
use super::Target;
use crate::hostconfig::{BackupConfig, HostConfig, RestorePolicy, Strategy, VolumeBackup};
use crate::progress::Progress;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Paths the in-image verbs use; tests point them into a temp dir.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub volumes: PathBuf,
    pub firstboot_done: PathBuf,
    /// `systemctl` (tests use a stub).
    pub systemctl: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            volumes: PathBuf::from(crate::hostconfig::PODMAN_VOLUMES),
            firstboot_done: PathBuf::from(crate::hostconfig::FIRSTBOOT_DONE),
            systemctl: PathBuf::from("systemctl"),
        }
    }
}

fn log(msg: &str) {
    // stdout goes to the journal (and the console when the unit says so).
    println!("{msg}");
}

// ---------------------------------------------------------------- firstboot

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum FirstbootOutcome {
    AlreadyDone,
    Skipped,
    EmptyBucket,
    Restored {
        id: String,
        /// Backup start of the snapshot (seconds since the epoch).
        time: i64,
        bytes: u64,
        files: u64,
        volumes: u64,
        seconds: f64,
    },
}

/// Restores the newest verifiable snapshot into `paths.volumes`, through a staging
/// directory on the same filesystem so a crash leaves either nothing or whole volumes.
/// Errors mean services must stay down. Transport errors are retried for
/// `restore_timeout_secs`; integrity failures (a corrupted or missing chunk, a manifest
/// that does not verify, a wrong key) are final at once: waiting does not repair them.
///
/// With the `imgbuild.drill` credential (a drill boot, see `crate::drill`) it restores
/// the pinned snapshot through the drill's read-only gateway, switches backups and
/// WireGuard off first, and prints `imgbuild drill: ...` lines the workstation parses.
pub fn firstboot(hc: &HostConfig, paths: &HostPaths) -> anyhow::Result<FirstbootOutcome> {
    use crate::drill::guest;
    if paths.firstboot_done.exists() {
        log("imgbuild firstboot: already done, nothing to restore");
        return Ok(FirstbootOutcome::AlreadyDone);
    }
    let drill = match guest::from_credentials() {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            log(&guest::restore_failed_line(&e.to_string()));
            return Err(e.into());
        }
        None => None,
    };
    if let Some(d) = &drill {
        enter_drill_mode(d, paths);
    }
    let drill_fail = |why: String| -> anyhow::Result<FirstbootOutcome> {
        log(&guest::restore_failed_line(&why));
        Err(anyhow::anyhow!(why))
    };
    let Some(b) = &hc.backup else {
        if drill.is_some() {
            return drill_fail("the image has no [backup] section: nothing to restore".into());
        }
        log("imgbuild firstboot: no backup configured, starting with empty volumes");
        mark_done(paths, &serde_json::json!({"restored": null}))?;
        return Ok(FirstbootOutcome::Skipped);
    };
    if b.restore == RestorePolicy::Skip {
        if drill.is_some() {
            return drill_fail("the image says restore = \"skip\": nothing to drill".into());
        }
        log("imgbuild firstboot: restore = skip, starting with empty volumes");
        mark_done(paths, &serde_json::json!({"restored": null}))?;
        return Ok(FirstbootOutcome::Skipped);
    }
    let mut target = Target::in_image(&hc.host, b);
    let mut timeout = b.restore_timeout_secs;
    let mut pinned = None;
    if let Some(d) = &drill {
        target.store.endpoint = Some(d.endpoint.clone());
        target.store.path_style = true;
        target.store.bucket = d.bucket.clone();
        target.store.prefix = d.prefix.clone();
        // The gateway does not check signatures, and the host's real keys must not be
        // what a drilled copy presents; fixed dummies also keep the SDK from probing
        // instance metadata it cannot reach.
        target.store.credentials_file = None;
        std::env::set_var("AWS_ACCESS_KEY_ID", "imgbuild-drill");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "imgbuild-drill");
        std::env::remove_var("AWS_PROFILE");
        timeout = d.restore_timeout_secs;
        pinned = d.snapshot.clone();
    }
    let rt = super::runtime()?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut delay = Duration::from_secs(2);
    let mut attempt = 1;
    loop {
        match rt.block_on(firstboot_once(&target, b, paths, pinned.as_deref())) {
            Ok(o) => {
                let done = match &o {
                    FirstbootOutcome::Restored {
                        id, bytes, seconds, ..
                    } => {
                        serde_json::json!({"restored": id, "bytes": bytes, "seconds": seconds})
                    }
                    _ => serde_json::json!({"restored": null}),
                };
                mark_done(paths, &done)?;
                if drill.is_some() {
                    match &o {
                        FirstbootOutcome::Restored {
                            id,
                            time,
                            bytes,
                            files,
                            volumes,
                            seconds,
                        } => log(&guest::RestoreLine {
                            id: id.clone(),
                            time: *time,
                            bytes: *bytes,
                            files: *files,
                            volumes: *volumes,
                            seconds: *seconds,
                        }
                        .render()),
                        _ => log(&guest::restore_failed_line(
                            "the bucket holds no snapshot: nothing was restored",
                        )),
                    }
                }
                return Ok(o);
            }
            Err(e) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let fatal = is_final(&e);
                if left.is_zero() || fatal {
                    let msg = format!(
                        "imgbuild firstboot: FAILED after {attempt} attempt(s){}: {e:#}; services stay down \
                         (fix the cause and `systemctl restart imgbuild-firstboot`, or set restore = \"allow-empty\" / \"skip\")",
                        if fatal { " (not retried: an integrity failure does not go away)" } else { "" }
                    );
                    log(&msg);
                    if drill.is_some() {
                        log(&guest::restore_failed_line(&format!("{e:#}")));
                    }
                    return Err(anyhow::anyhow!(msg));
                }
                log(&format!(
                    "imgbuild firstboot: attempt {attempt} failed: {e:#}; retrying in {}s ({}s left)",
                    delay.as_secs(),
                    left.as_secs()
                ));
                std::thread::sleep(delay.min(left));
                delay = (delay * 2).min(Duration::from_secs(60));
                attempt += 1;
            }
        }
    }
}

/// Failures retrying cannot fix: what the bucket holds is wrong, not how we reach it.
fn is_final(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<SnapshotError>(),
            Some(
                SnapshotError::MissingChunk { .. }
                    | SnapshotError::CorruptChunk { .. }
                    | SnapshotError::BadSignature { .. }
                    | SnapshotError::WrongKey { .. }
                    | SnapshotError::BadManifest { .. }
                    | SnapshotError::NoSuchSnapshot(_)
                    | SnapshotError::KeyFile { .. }
            )
        )
    })
}

/// A drilled copy must not act as the host: no backup may run (it would write the
/// copy's state into the real bucket if it could reach it), and the WireGuard tunnel
/// to the real peers goes down. Best effort with every step logged: the drill's
/// network has no route out and its gateway refuses writes whatever happens here.
fn enter_drill_mode(d: &crate::drill::guest::DrillConfig, paths: &HostPaths) {
    use crate::drill::guest::{self, LINE};
    log(&format!(
        "{LINE}mode on: restoring {} through {} (read-only); backups and WireGuard off",
        d.snapshot.as_deref().unwrap_or("the newest snapshot"),
        d.endpoint
    ));
    if let Err(e) = guest::remember(d) {
        log(&format!(
            "{LINE}warning: cannot write {}: {e}",
            guest::RUNTIME_FILE
        ));
    }
    let run = |what: &str, cmd: &mut Command| match cmd.status() {
        Ok(st) if st.success() => log(&format!("{LINE}{what}: ok")),
        Ok(st) => log(&format!("{LINE}{what}: exited with {st}")),
        Err(e) => log(&format!("{LINE}{what}: {e}")),
    };
    run(
        "mask imgbuild-backup.timer and .service",
        Command::new(&paths.systemctl).args([
            "mask",
            "--runtime",
            "imgbuild-backup.timer",
            "imgbuild-backup.service",
        ]),
    );
    // --no-block: this unit runs inside the boot transaction; waiting on another job
    // from here could deadlock it.
    run(
        "stop imgbuild-backup.timer",
        Command::new(&paths.systemctl).args(["stop", "--no-block", "imgbuild-backup.timer"]),
    );
    for wg in &d.wireguard_interfaces {
        run(
            &format!("wireguard {wg} down"),
            Command::new("networkctl").args(["down", wg]),
        );
    }
}

async fn firstboot_once(
    target: &Target,
    b: &BackupConfig,
    paths: &HostPaths,
    pinned: Option<&str>,
) -> anyhow::Result<FirstbootOutcome> {
    let keys = target.keys()?;
    let store = target.connect().await?;
    let found = match pinned {
        Some(id) => Some(restore::load_manifest(&store, &keys, id).await?),
        None => restore::latest_manifest(&store, &keys).await?,
    };
    let m = match found {
        Some(m) => m,
        None if b.restore == RestorePolicy::AllowEmpty => {
            log(&format!(
                "imgbuild firstboot: s3://{}/{} holds no snapshot; restore = allow-empty: starting with empty volumes",
                store.bucket, store.prefix
            ));
            return Ok(FirstbootOutcome::EmptyBucket);
        }
        None => {
            return Err(SnapshotError::NoSnapshots {
                bucket: store.bucket.clone(),
                prefix: store.prefix.clone(),
            }
            .into())
        }
    };
    let staging = paths.volumes.join(".imgbuild-staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| SnapshotError::io(&staging, e))?;
    }
    let opts = RestoreOptions {
        parallel: 16,
        progress: Progress::detect(false),
        write: WriteOptions::default(),
        volumes: Vec::new(),
    };
    for v in &b.volumes {
        if !m.volumes.iter().any(|mv| mv.name == v.name) {
            log(&format!(
                "imgbuild firstboot: volume {} is not in snapshot {}: it starts empty",
                v.name, m.id
            ));
        }
    }
    let report = restore::restore(&store, &keys, &m, &staging, &opts).await?;
    for w in &report.warnings {
        log(&format!("imgbuild firstboot: warning: {w}"));
    }
    // Move whole volumes into place; whatever was there (an empty volume podman or the
    // image created) is moved aside first and removed after.
    for v in &m.volumes {
        let dst = paths.volumes.join(&v.name);
        if dst.exists() {
            let old = staging.join(format!(".old-{}", v.name));
            std::fs::rename(&dst, &old).map_err(|e| SnapshotError::io(&dst, e))?;
        }
        std::fs::rename(staging.join(&v.name), &dst).map_err(|e| SnapshotError::io(&dst, e))?;
    }
    std::fs::remove_dir_all(&staging).map_err(|e| SnapshotError::io(&staging, e))?;
    let age = backup::now_unix() - m.time;
    log(&format!(
        "imgbuild firstboot: restored snapshot {} (taken {}, {} old): {} volume(s), {} bytes in {:.1}s",
        m.id,
        super::format::rfc3339(m.time),
        human_age(age),
        m.volumes.len(),
        report.bytes,
        report.seconds
    ));
    Ok(FirstbootOutcome::Restored {
        id: m.id,
        time: m.time,
        bytes: report.bytes,
        files: report.files,
        volumes: m.volumes.len() as u64,
        seconds: report.seconds,
    })
}

fn mark_done(paths: &HostPaths, v: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = paths.firstboot_done.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::io(dir, e))?;
    }
    std::fs::write(&paths.firstboot_done, format!("{v}\n"))
        .map_err(|e| SnapshotError::io(&paths.firstboot_done, e))?;
    Ok(())
}

pub fn human_age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

// ---------------------------------------------------------------- backup timer

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
    if crate::drill::guest::active().is_some() {
        // A drilled copy holds restored data, not the host's live data: a snapshot of
        // it must never become the newest one (and its ping must not report success).
        log("imgbuild backup: refused: this is a drill boot (imgbuild drill), not the host");
        anyhow::bail!("drill boot: backups are off");
    }
    let start = Instant::now();
    let target = Target::in_image(&hc.host, b);
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
        super::runtime()
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

const METRICS_FILE: &str = "imgbuild_backup.prom";

/// node-exporter textfile: written to a temp file and renamed, so the collector never
/// reads half a file. The last success time survives failed runs (read back from the
/// previous file).
pub fn write_metrics(dir: &Path, host: &str, r: &HostBackupResult) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(METRICS_FILE);
    let previous_success = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("imgbuild_backup_last_success_timestamp_seconds"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let now = backup::now_unix();
    let ok = r.error.is_none();
    let last_success = if ok { now as f64 } else { previous_success };
    let (total, new, uploaded) = r
        .report
        .as_ref()
        .map(|x| {
            (
                x.stats.bytes_total,
                x.stats.bytes_new,
                x.stats.bytes_uploaded,
            )
        })
        .unwrap_or((0, 0, 0));
    let host = host.replace(['\\', '"', '\n'], "_");
    let l = format!("{{host=\"{host}\"}}");
    let mut t = String::new();
    let mut metric = |name: &str, help: &str, v: String| {
        t.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{l} {v}\n"
        ));
    };
    metric(
        "imgbuild_backup_last_success_timestamp_seconds",
        "Time of the last successful snapshot.",
        format!("{last_success}"),
    );
    metric(
        "imgbuild_backup_last_run_timestamp_seconds",
        "Time the last backup run ended.",
        format!("{now}"),
    );
    metric(
        "imgbuild_backup_success",
        "1 if the last backup run succeeded.",
        format!("{}", u8::from(ok)),
    );
    metric(
        "imgbuild_backup_duration_seconds",
        "Duration of the last backup run.",
        format!("{:.3}", r.seconds),
    );
    metric(
        "imgbuild_backup_bytes_total",
        "File data bytes in the last snapshot.",
        format!("{total}"),
    );
    metric(
        "imgbuild_backup_bytes_new",
        "Bytes of new chunks in the last snapshot.",
        format!("{new}"),
    );
    metric(
        "imgbuild_backup_bytes_uploaded",
        "Bytes uploaded by the last snapshot.",
        format!("{uploaded}"),
    );
    if let Some(p) = &r.prune {
        metric(
            "imgbuild_backup_snapshots",
            "Snapshots in the bucket after pruning.",
            format!("{}", p.snapshots_left),
        );
    }
    let tmp = dir.join(format!(".{METRICS_FILE}.tmp"));
    std::fs::write(&tmp, t)?;
    std::fs::rename(&tmp, &path)
}

/// Pings `url` on success and `url/fail` on failure (the healthchecks.io convention;
/// other monitors ignore the suffix or accept it). Best effort: a monitor that is down
/// must not fail the backup.
pub fn ping(url: &str, ok: bool) {
    let u = if ok {
        url.to_string()
    } else {
        format!("{}/fail", url.trim_end_matches('/'))
    };
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    for attempt in 0..3 {
        match agent.get(&u).call() {
            Ok(_) => return,
            // The URL often embeds a secret token: log the cause, never the URL.
            Err(e) if attempt == 2 => {
                let cause = match e {
                    ureq::Error::Status(code, _) => format!("HTTP {code}"),
                    ureq::Error::Transport(t) => t.kind().to_string(),
                };
                log(&format!("imgbuild backup: ping failed: {cause}"));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}
