//! The host config file (`/etc/imgbuild/host.toml`): what the in-image helper
//! (`imgbuild firstboot`, `imgbuild backup`, `imgbuild ready`) reads at run time.
//!
//! Written by the renderer from the profile; it holds no secrets itself, only the
//! paths of the secret files next to it.

use serde::{Deserialize, Serialize};

/// Retention is the snapshot engine's notion; host.toml carries it as is.
pub use crate::snapshot::prune::Retention;

pub const HOST_CONFIG_PATH: &str = "/etc/imgbuild/host.toml";
pub const SECRETS_DIR: &str = "/etc/imgbuild/secrets";
/// Where state lives (on the /var partition).
pub const STATE_DIR: &str = "/var/lib/imgbuild";
/// Marker written once the first-boot restore has finished.
pub const FIRSTBOOT_DONE: &str = "/var/lib/imgbuild/firstboot.done";
/// Podman's (rootful) volume directory.
pub const PODMAN_VOLUMES: &str = "/var/lib/containers/storage/volumes";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub host: String,
    pub env: String,
    /// systemd unit names (e.g. `caddy.service`) whose start makes the host "ready".
    pub units: Vec<String>,
    pub backup: Option<BackupConfig>,
    /// Node-exporter textfile collector directory for backup metrics.
    pub metrics_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    pub bucket: String,
    /// Per-host prefix inside the bucket, without leading or trailing '/'.
    pub prefix: String,
    /// Custom S3 endpoint (Scaleway, Hetzner, Garage...); None means AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    /// systemd OnCalendar expression.
    pub schedule: String,
    pub keep: Retention,
    pub object_lock_days: Option<u32>,
    /// Run backups even where the bucket does not enforce `object_lock_days`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_unlocked_bucket: bool,
    pub ping_url: Option<String>,
    /// What first boot does when the bucket holds no snapshot.
    pub restore: RestorePolicy,
    /// How long first boot keeps retrying an unreachable bucket before failing.
    pub restore_timeout_secs: u64,
    pub volumes: Vec<VolumeBackup>,
    /// Environment file with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, if the secrets
    /// dir had one.
    pub credentials_file: Option<String>,
    pub encryption_key_file: String,
    pub signing_key_file: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestorePolicy {
    /// A snapshot must exist and restore; otherwise services stay down.
    Require,
    /// An empty bucket is the expected first deployment: start with empty volumes.
    /// A bucket that holds snapshots that cannot be read is still a failure.
    AllowEmpty,
    /// Never restore (staging copies, tests without S3).
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeBackup {
    /// Podman volume name (as `podman volume ls` shows it).
    pub name: String,
    pub strategy: Strategy,
    /// For `hook`: the command run first (through `sh -c`).
    pub hook: Option<String>,
    /// For `stop`: systemd units stopped during the snapshot.
    pub units: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Stop,
    Hook,
    Live,
}
