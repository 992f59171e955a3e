//! The host side: everything the same binary does *inside* the image, on top of the
//! snapshot engine. `firstboot` restores volumes before any service starts,
//! `backup_job` is what imgbuild-backup.timer runs, `check_job` what
//! imgbuild-check.timer runs, `metrics` writes what the
//! monitoring host scrapes, `ready` prints the console readiness line, and
//! `drill_mode` is the protocol a drilled copy speaks with the workstation.
//!
//! Everything here reads `/etc/imgbuild/host.toml` (see `crate::hostconfig`) and logs
//! one plain line per step to the journal, never secrets. Nothing on the build side
//! imports this module; the image assembler only installs the units that call it.

pub mod backup_job;
pub mod check_job;
pub mod drill_mode;
pub mod firstboot;
pub mod metrics;
pub mod quiesce;
pub mod ready;
pub mod wal;

pub use backup_job::{backup_host, HostBackupResult};
pub use check_job::{check_host, HostCheckResult};
pub use firstboot::{firstboot, FirstbootOutcome};
pub use metrics::{ping, write_check_metrics, write_metrics};

use crate::hostconfig::{BackupConfig, HostConfig};
use crate::snapshot::{StoreConfig, Target};
use anyhow::Context;
use std::path::{Path, PathBuf};

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

impl HostPaths {
    /// The lock the backup and check jobs hold while they talk to the bucket, beside the
    /// first-boot marker (the state directory on /var).
    pub fn job_lock(&self) -> PathBuf {
        self.firstboot_done
            .parent()
            .unwrap_or(Path::new("."))
            .join("snapshot-job.lock")
    }
}

/// Held while a backup or a check runs: a check reading packs while the backup's prune
/// deletes or repacks them would report packs "vanished while checking". Released when
/// dropped (or when the process dies: an flock does not outlive its holder).
pub struct JobLock {
    _file: std::fs::File,
}

impl JobLock {
    /// Waits for the other job if it holds the lock, saying so in the journal.
    pub fn acquire(path: &Path, job: &str) -> anyhow::Result<JobLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {} for the job lock", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening the job lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                log(&format!(
                    "imgbuild {job}: waiting for the running snapshot job ({} is locked)",
                    path.display()
                ));
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        Ok(JobLock { _file: file })
    }
}

pub(crate) fn log(msg: &str) {
    // stdout goes to the journal (and the console when the unit says so).
    println!("{msg}");
}

pub fn read_host_config(path: &Path) -> anyhow::Result<HostConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The bucket and key files exactly as host.toml names them.
pub fn target(host: &str, b: &BackupConfig) -> Target {
    Target {
        host: host.to_string(),
        store: StoreConfig {
            bucket: b.bucket.clone(),
            prefix: b.prefix.clone(),
            endpoint: b.endpoint.clone(),
            region: b.region.clone(),
            path_style: b.path_style,
            credentials_file: b.credentials_file.as_ref().map(PathBuf::from),
            object_lock_days: b.object_lock_days,
            multipart_threshold: 0,
            accept_unlocked_bucket: b.accept_unlocked_bucket,
        },
        encryption_key: PathBuf::from(&b.encryption_key_file),
        signing_key: PathBuf::from(&b.signing_key_file),
        keys_in_memory: None,
    }
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
