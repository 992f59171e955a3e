//! `imgbuild firstboot` (imgbuild-firstboot.service, ordered before every container):
//! restore the volumes from the newest snapshot, or fail closed so services stay down.

use super::drill_mode;
use super::{human_age, log, HostPaths};
use crate::hostconfig::{BackupConfig, HostConfig, RestorePolicy};
use crate::progress::Progress;
use crate::snapshot::backup;
use crate::snapshot::error::SnapshotError;
use crate::snapshot::fsio::WriteOptions;
use crate::snapshot::restore::{self, RestoreOptions};
use crate::snapshot::Target;
use std::time::{Duration, Instant};

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
        crate::snapshot::format::rfc3339(m.time),
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
