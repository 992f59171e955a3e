//! `imgbuild firstboot` (imgbuild-firstboot.service, ordered before every container):
//! restore the volumes from the newest snapshot, or fail closed so services stay down.

use super::drill_mode;
use super::{human_age, log, HostPaths};
use crate::hostconfig::{BackupConfig, HostConfig, RestorePolicy};
use crate::progress::Progress;
use crate::snapshot::backup;
use crate::snapshot::error::SnapshotError;
use crate::snapshot::fsio::WriteOptions;
use crate::snapshot::marker;
use crate::snapshot::restore::{self, RestoreOptions};
use crate::snapshot::Target;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum FirstbootOutcome {
    AlreadyDone,
    Skipped,
    EmptyBucket,
    /// No snapshot, but the prefix holds the signed empty-start marker `imgbuild init`
    /// wrote: the host's first deployment.
    EmptyStart {
        created: i64,
    },
    Restored {
        id: String,
        /// Backup start of the snapshot (seconds since the epoch).
        time: i64,
        bytes: u64,
        files: u64,
        volumes: u64,
        seconds: f64,
        /// Newer snapshots passed over because they failed an integrity check.
        skipped: Vec<String>,
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
    use super::drill_mode as guest;
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
        drill_mode::enter(d, paths);
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
    let mut target = super::target(&hc.host, b);
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
    let rt = crate::snapshot::runtime()?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut delay = Duration::from_secs(2);
    let mut attempt = 1;
    let mut next_status = Instant::now();
    let place = format!("s3://{}/{}", target.store.bucket, target.store.prefix);
    loop {
        match rt.block_on(firstboot_once(&target, b, paths, pinned.as_deref())) {
            Ok(o) => {
                let done = match &o {
                    FirstbootOutcome::Restored {
                        id,
                        bytes,
                        seconds,
                        skipped,
                        ..
                    } => {
                        serde_json::json!({"restored": id, "bytes": bytes, "seconds": seconds, "skipped": skipped})
                    }
                    FirstbootOutcome::EmptyStart { created } => {
                        serde_json::json!({"restored": null, "empty_start": created})
                    }
                    _ => serde_json::json!({"restored": null}),
                };
                mark_done(paths, &done)?;
                if let FirstbootOutcome::Restored { skipped, time, .. } = &o {
                    if let Err(e) = super::metrics::write_restore_metrics(
                        std::path::Path::new(&hc.metrics_dir),
                        &hc.host,
                        *time,
                        skipped.len(),
                    ) {
                        log(&format!("imgbuild firstboot: cannot write metrics: {e}"));
                    }
                }
                if drill.is_some() {
                    match &o {
                        FirstbootOutcome::Restored {
                            id,
                            time,
                            bytes,
                            files,
                            volumes,
                            seconds,
                            ..
                        } => log(&guest::RestoreLine {
                            id: id.clone(),
                            time: *time,
                            bytes: *bytes,
                            files: *files,
                            volumes: *volumes,
                            seconds: *seconds,
                        }
                        .render()),
                        FirstbootOutcome::EmptyStart { .. } => log(&guest::restore_failed_line(
                            "the bucket holds no snapshot yet, only the empty-start marker of `imgbuild init` (a first deployment): nothing to drill until the first backup",
                        )),
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
                let cause = one_line_cause(&e, b, &hc.host);
                // The whole error (SDK chains included) goes to the journal only; the
                // console gets one line per ~10 s that a person can act on.
                detail(&format!(
                    "imgbuild firstboot: attempt {attempt} failed: {e:#}"
                ));
                if left.is_zero() || fatal {
                    let msg = format!(
                        "imgbuild firstboot: FAILED: {cause}{}; services stay down \
                         (fix it, then `systemctl start multi-user.target`; details: journalctl -u imgbuild-firstboot)",
                        if fatal { "" } else { " (gave up after the restore timeout)" }
                    );
                    log(&msg);
                    if drill.is_some() {
                        log(&guest::restore_failed_line(&cause));
                    }
                    return Err(anyhow::anyhow!(msg));
                }
                let wait = delay.min(left);
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if Instant::now() >= next_status {
                        let left = deadline.saturating_duration_since(Instant::now());
                        log(&format!(
                            "imgbuild firstboot: waiting for {place}: {cause} (attempt {attempt}, giving up in {})",
                            human_age(left.as_secs() as i64)
                        ));
                        next_status = Instant::now() + STATUS_EVERY;
                    }
                    std::thread::sleep(
                        until
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_secs(1)),
                    );
                }
                delay = (delay * 2).min(Duration::from_secs(30));
                attempt += 1;
            }
        }
    }
}

/// How often the console hears that first boot is still waiting.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// To the journal only (the unit sends stderr there, stdout to the console too).
fn detail(msg: &str) {
    eprintln!("{msg}");
}

/// What a person at the console needs: the cause in one line, and where to fix it.
pub fn one_line_cause(e: &anyhow::Error, b: &BackupConfig, host: &str) -> String {
    let full = format!("{e:#}");
    for c in e.chain() {
        match c.downcast_ref::<SnapshotError>() {
            Some(SnapshotError::NoSnapshots { bucket, prefix }) => {
                return format!(
                    "s3://{bucket}/{prefix} holds no snapshot and no empty-start marker \
                     (first deployment: run `imgbuild init` for this host; otherwise check the bucket, prefix and endpoint)"
                )
            }
            Some(SnapshotError::S3 {
                op,
                bucket,
                message,
                ..
            }) => {
                let lower = message.to_ascii_lowercase();
                if lower.contains("credentials") && !lower.contains("http ") {
                    return no_credentials(b, host);
                }
                let mut lines = message.lines();
                let first = lines.next().unwrap_or_default();
                let hint = lines
                    .find_map(|l| l.trim().strip_prefix("hint: "))
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                return format!("S3 {op} on bucket {bucket}: {}{hint}", clip(first, 160));
            }
            Some(other) => return clip(&other.to_string(), 240),
            None => {}
        }
    }
    if full.to_ascii_lowercase().contains("credentials") {
        return no_credentials(b, host);
    }
    clip(full.lines().next().unwrap_or_default(), 240)
}

fn no_credentials(b: &BackupConfig, host: &str) -> String {
    match &b.credentials_file {
        None => format!(
            "no S3 credentials: the image carries none (secrets/{host}/s3.env with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY was missing when it was built)"
        ),
        Some(f) => format!(
            "no usable S3 credentials in {f} (it needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ),
    }
}

fn clip(s: &str, max: usize) -> String {
    let s = s.replace(['\r', '\n'], " ");
    if s.chars().count() <= max {
        s
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
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
                    | SnapshotError::NewerManifest { .. }
                    | SnapshotError::NoSuchSnapshot(_)
                    | SnapshotError::KeyFile { .. }
                    | SnapshotError::BadMarker { .. }
            )
        )
    })
}

/// The prefix holds no snapshot: the empty-start marker of `imgbuild init`, or
/// `restore = "allow-empty"`, lets the host start empty; anything else fails closed.
async fn no_snapshot(
    store: &crate::snapshot::Store,
    keys: &crate::snapshot::Keys,
    b: &BackupConfig,
    host: &str,
) -> anyhow::Result<FirstbootOutcome> {
    if let Some(m) = marker::read(store, keys, host).await? {
        log(&format!(
            "imgbuild firstboot: s3://{}/{} holds no snapshot but the empty-start marker `imgbuild init` wrote {}: first deployment, starting with empty volumes",
            store.bucket,
            store.prefix,
            crate::snapshot::format::rfc3339(m.created)
        ));
        return Ok(FirstbootOutcome::EmptyStart { created: m.created });
    }
    if b.restore == RestorePolicy::AllowEmpty {
        log(&format!(
            "imgbuild firstboot: s3://{}/{} holds no snapshot; restore = allow-empty: starting with empty volumes",
            store.bucket, store.prefix
        ));
        return Ok(FirstbootOutcome::EmptyBucket);
    }
    Err(SnapshotError::NoSnapshots {
        bucket: store.bucket.clone(),
        prefix: store.prefix.clone(),
    }
    .into())
}

async fn firstboot_once(
    target: &Target,
    b: &BackupConfig,
    paths: &HostPaths,
    pinned: Option<&str>,
) -> anyhow::Result<FirstbootOutcome> {
    let (outcome, have) = restore_own(target, b, paths, pinned).await?;
    if pinned.is_some() {
        // A drill pins this host's snapshot and reaches only its gateway.
        for v in b
            .volumes
            .iter()
            .filter(|v| v.from.is_some() && !have.contains(&v.name))
        {
            log(&format!(
                "imgbuild firstboot: volume {} would come from another host (`from`): not drilled",
                v.name
            ));
        }
    } else {
        import_moved(b, paths, &have).await?;
    }
    Ok(outcome)
}

/// Volumes that start from another host's snapshot (`from`) and are not in this
/// host's own: each from the other host's newest snapshot, read with its keys and a
/// read-only credential, restored beside the volumes and moved into place.
async fn import_moved(b: &BackupConfig, paths: &HostPaths, have: &[String]) -> anyhow::Result<()> {
    for v in &b.volumes {
        let Some(src) = &v.from else { continue };
        let from = format!("{}:{}", src.host, src.volume);
        if have.contains(&v.name) {
            log(&format!(
                "imgbuild firstboot: volume {} restored from this host's own snapshot; `from = {from}` no longer applies",
                v.name
            ));
            continue;
        }
        let target = Target {
            host: src.host.clone(),
            store: crate::snapshot::StoreConfig {
                bucket: src.bucket.clone(),
                prefix: src.prefix.clone(),
                endpoint: src.endpoint.clone(),
                region: src.region.clone(),
                path_style: src.path_style,
                credentials_file: src.credentials_file.as_ref().map(std::path::PathBuf::from),
                object_lock_days: None,
                multipart_threshold: 0,
                accept_unlocked_bucket: false,
            },
            encryption_key: src.encryption_key_file.clone().into(),
            signing_key: src.signing_key_file.clone().into(),
            keys_in_memory: None,
        };
        let place = format!("s3://{}/{}", src.bucket, src.prefix);
        let keys = target.keys()?;
        let store = target.connect().await?;
        let Some((m, skipped)) = restore::newest_manifest(&store, &keys).await? else {
            anyhow::bail!(
                "volume {} starts from {from}, but {place} holds no snapshot of {}",
                v.name,
                src.host
            );
        };
        for s in &skipped {
            log(&format!(
                "imgbuild firstboot: WARNING: {from}: skipping snapshot {}: {}; using the older {}",
                s.id, s.reason, m.id
            ));
        }
        if !m.volumes.iter().any(|mv| mv.name == src.volume) {
            anyhow::bail!(
                "volume {} starts from {from}, but {}'s newest snapshot {} has no volume {}",
                v.name,
                src.host,
                m.id,
                src.volume
            );
        }
        let report = restore_into_place(
            &store,
            &keys,
            &m,
            paths,
            ".imgbuild-import",
            vec![src.volume.clone()],
            &[(src.volume.as_str(), v.name.as_str())],
            &format!("{from}: "),
        )
        .await?;
        log(&format!(
            "imgbuild firstboot: volume {} moved from {from}: snapshot {} (taken {}, {} old), {} bytes in {:.1}s",
            v.name,
            m.id,
            crate::snapshot::format::rfc3339(m.time),
            human_age(backup::now_unix() - m.time),
            report.bytes,
            report.seconds
        ));
    }
    Ok(())
}

/// Restores the `select`ed volumes of `m` (all when empty) into `staging` beside the
/// volumes, then moves each whole volume (snapshot name, host name) into place:
/// whatever was there (an empty volume podman or the image created) is moved aside
/// first and removed after. Restored data counts only once it is on disk: the
/// done-marker (and any service) comes after this, so a power cut now means restoring
/// again, never half a volume.
#[allow(clippy::too_many_arguments)]
async fn restore_into_place(
    store: &crate::snapshot::Store,
    keys: &crate::snapshot::Keys,
    m: &crate::snapshot::format::Manifest,
    paths: &HostPaths,
    staging: &str,
    select: Vec<String>,
    moves: &[(&str, &str)],
    warn_prefix: &str,
) -> anyhow::Result<restore::RestoreReport> {
    let staging = paths.volumes.join(staging);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| SnapshotError::io(&staging, e))?;
    }
    let opts = RestoreOptions {
        parallel: 16,
        progress: Progress::detect(false),
        write: WriteOptions::default(),
        volumes: select,
    };
    let report = restore::restore(store, keys, m, &staging, &opts).await?;
    for w in &report.warnings {
        log(&format!("imgbuild firstboot: warning: {warn_prefix}{w}"));
    }
    for (from, to) in moves {
        let dst = paths.volumes.join(to);
        if dst.exists() {
            let old = staging.join(format!(".old-{to}"));
            std::fs::rename(&dst, &old).map_err(|e| SnapshotError::io(&dst, e))?;
        }
        std::fs::rename(staging.join(from), &dst).map_err(|e| SnapshotError::io(&dst, e))?;
    }
    std::fs::remove_dir_all(&staging).map_err(|e| SnapshotError::io(&staging, e))?;
    sync_filesystem(&paths.volumes).map_err(|e| SnapshotError::io(&paths.volumes, e))?;
    Ok(report)
}

/// This host's own newest snapshot (or the empty start), and the volumes it restored.
async fn restore_own(
    target: &Target,
    b: &BackupConfig,
    paths: &HostPaths,
    pinned: Option<&str>,
) -> anyhow::Result<(FirstbootOutcome, Vec<String>)> {
    let keys = target.keys()?;
    let store = target.connect().await?;
    let found = match pinned {
        Some(id) => Some((restore::load_manifest(&store, &keys, id).await?, vec![])),
        None => restore::newest_manifest(&store, &keys).await?,
    };
    // Locked manifests hidden by a delete marker: someone deleted snapshots our prune
    // would not have. Never restore "around" them quietly, never start empty past them.
    let hidden = match restore::hidden_snapshots(&store).await {
        Ok(h) => h,
        Err(e) => {
            log(&format!(
                "imgbuild firstboot: warning: cannot list object versions to look for hidden snapshots: {e}"
            ));
            Vec::new()
        }
    };
    let (m, skipped) = match found {
        Some(found) => found,
        None if pinned.is_none() && !hidden.is_empty() => anyhow::bail!(
            "no snapshot is listed, but {} locked snapshot(s) are hidden by delete markers \
             (newest {}): someone deleted them; restore one explicitly with \
             `imgbuild restore --snapshot {}` after checking the bucket",
            hidden.len(),
            hidden[hidden.len() - 1].id,
            hidden[hidden.len() - 1].id
        ),
        None => {
            return Ok((
                no_snapshot(&store, &keys, b, &target.host).await?,
                Vec::new(),
            ))
        }
    };
    for h in hidden.iter().filter(|h| h.id > m.id) {
        log(&format!(
            "imgbuild firstboot: WARNING: snapshot {} is newer but hidden by a delete marker \
             (locked until {}): someone deleted it; restoring {} (restore it with --snapshot {})",
            h.id,
            crate::snapshot::format::rfc3339(h.locked_until),
            m.id,
            h.id
        ));
    }
    // Never quiet: the host comes back older than its newest snapshot.
    for s in &skipped {
        log(&format!(
            "imgbuild firstboot: WARNING: skipping snapshot {}: {}; restoring the older {} instead",
            s.id, s.reason, m.id
        ));
    }
    for v in b.volumes.iter().filter(|v| v.from.is_none()) {
        if !m.volumes.iter().any(|mv| mv.name == v.name) {
            log(&format!(
                "imgbuild firstboot: volume {} is not in snapshot {}: it starts empty",
                v.name, m.id
            ));
        }
    }
    let all: Vec<(&str, &str)> = m
        .volumes
        .iter()
        .map(|v| (v.name.as_str(), v.name.as_str()))
        .collect();
    let report = restore_into_place(
        &store,
        &keys,
        &m,
        paths,
        ".imgbuild-staging",
        Vec::new(),
        &all,
        "",
    )
    .await?;
    let age = backup::now_unix() - m.time;
    log(&format!(
        "imgbuild firstboot: restored snapshot {} (taken {}, {} old): {} volume(s), {} bytes in {:.1}s",
        m.id,
        crate::snapshot::format::rfc3339(m.time),
        human_age(age),
        m.volumes.len(),
        report.bytes,
        report.seconds
    ));
    if pinned.is_none() {
        // A drill restores the pinned snapshot as it is; a real first boot goes on to
        // the last WAL file shipped after it.
        for (v, pg) in super::wal::volumes(b).filter(|(v, _)| v.from.is_none()) {
            if let Some(mv) = m.volumes.iter().find(|mv| mv.name == v.name) {
                super::wal::fetch_for_replay(
                    &store,
                    &keys,
                    &target.host,
                    paths,
                    v,
                    pg,
                    &m.id,
                    m.time,
                    mv.wal_start.as_deref(),
                )
                .await?;
            }
        }
    }
    let have = m.volumes.iter().map(|v| v.name.clone()).collect();
    Ok((
        FirstbootOutcome::Restored {
            id: m.id,
            time: m.time,
            bytes: report.bytes,
            files: report.files,
            volumes: m.volumes.len() as u64,
            seconds: report.seconds,
            skipped: skipped
                .into_iter()
                .map(|s| format!("{}: {}", s.id, s.reason))
                .collect(),
        },
        have,
    ))
}

/// syncfs(2) on the filesystem holding `dir`.
pub fn sync_filesystem(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: d is an open file descriptor for the duration of the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mark_done(paths: &HostPaths, v: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = paths.firstboot_done.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::io(dir, e))?;
    }
    let tmp = paths.firstboot_done.with_extension("tmp");
    std::fs::write(&tmp, format!("{v}\n")).map_err(|e| SnapshotError::io(&tmp, e))?;
    std::fs::rename(&tmp, &paths.firstboot_done)
        .map_err(|e| SnapshotError::io(&paths.firstboot_done, e))?;
    if let Some(dir) = paths.firstboot_done.parent() {
        sync_filesystem(dir).map_err(|e| SnapshotError::io(dir, e))?;
    }
    Ok(())
}
