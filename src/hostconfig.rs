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
    /// Pack size and repack threshold (defaults when host.toml predates them).
    #[serde(default)]
    pub packs: PackSettings,
    /// The periodic `imgbuild check` of the bucket (imgbuild-check.timer).
    #[serde(default)]
    pub check: CheckSettings,
    /// The snapshot taken on the way down (imgbuild-final-snapshot.service).
    #[serde(default)]
    pub final_snapshot: FinalSnapshotSettings,
}

/// Ten minutes: a few GB of changes on a small VPS's uplink, and within the ACPI grace
/// most providers give a guest before they cut the power.
pub const DEFAULT_FINAL_SNAPSHOT_TIMEOUT: u32 = 600;
pub const FINAL_SNAPSHOT_TIMEOUT_MAX: u32 = 3600;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FinalSnapshotWhen {
    /// Power-off and halt; a reboot keeps the disk, so it skips the snapshot.
    #[default]
    Poweroff,
    Always,
    Off,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FinalSnapshotSettings {
    pub when: FinalSnapshotWhen,
    pub timeout_secs: u32,
}

impl Default for FinalSnapshotSettings {
    fn default() -> Self {
        FinalSnapshotSettings {
            when: FinalSnapshotWhen::Poweroff,
            timeout_secs: DEFAULT_FINAL_SNAPSHOT_TIMEOUT,
        }
    }
}

/// Profile defaults of the pack settings: the engine's own.
pub const DEFAULT_PACK_SIZE_MIB: u32 = (crate::snapshot::pack::PACK_TARGET / MIB) as u32;
pub const PACK_SIZE_MIB_MIN: u32 = (crate::snapshot::pack::PACK_TARGET_MIN / MIB) as u32;
pub const PACK_SIZE_MIB_MAX: u32 = (crate::snapshot::pack::PACK_TARGET_MAX / MIB) as u32;
pub const DEFAULT_REPACK_GARBAGE_PERCENT: u8 = crate::snapshot::prune::REPACK_GARBAGE_PERCENT;
/// Weekly, at an hour the daily backups of the example profiles do not use.
pub const DEFAULT_CHECK_SCHEDULE: &str = "Sun *-*-* 04:30:00";
/// A tenth of the packs a week: each pack is read once every ten weeks on average, for
/// a tenth of a full read's egress each time.
pub const DEFAULT_CHECK_READ_DATA: &str = "10%";
const MIB: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PackSettings {
    /// Pack size backups and repacks aim for, MiB.
    pub size_mib: u32,
    /// A pack with more garbage than this share is rewritten by prune.
    pub repack_garbage_percent: u8,
}

impl Default for PackSettings {
    fn default() -> Self {
        PackSettings {
            size_mib: DEFAULT_PACK_SIZE_MIB,
            repack_garbage_percent: DEFAULT_REPACK_GARBAGE_PERCENT,
        }
    }
}

impl PackSettings {
    /// Bytes; out-of-range values (a hand-edited host.toml) are clamped by the engine.
    pub fn target_bytes(&self) -> usize {
        (self.size_mib as usize).saturating_mul(MIB)
    }

    pub fn prune_options(&self) -> crate::snapshot::prune::PruneOptions {
        crate::snapshot::prune::PruneOptions {
            repack_garbage_percent: self.repack_garbage_percent,
            pack_target: self.target_bytes(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CheckSettings {
    /// systemd OnCalendar expression of imgbuild-check.timer.
    pub schedule: String,
    /// Share of the packs each check downloads and verifies (see [`parse_read_data`]).
    pub read_data: String,
}

impl Default for CheckSettings {
    fn default() -> Self {
        CheckSettings {
            schedule: DEFAULT_CHECK_SCHEDULE.into(),
            read_data: DEFAULT_CHECK_READ_DATA.into(),
        }
    }
}

/// A check's data fraction as the profile writes it: what
/// [`ReadData::parse_fraction`](crate::snapshot::check::ReadData::parse_fraction) reads
/// ("10%", "0.1", "1/10", up to "100%"), plus "0" / "off" for a metadata-only check.
pub fn parse_read_data(s: &str) -> Result<crate::snapshot::check::ReadData, String> {
    use crate::snapshot::check::ReadData;
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || t.trim_end_matches('%').trim().parse::<f64>() == Ok(0.0) {
        return Ok(ReadData::None);
    }
    ReadData::parse_fraction(t)
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
    /// Another host's volume this one starts from, until a snapshot of this host's
    /// own holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<MoveSource>,
    /// The volume is a PostgreSQL data directory whose WAL is shipped continuously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresWal>,
}

/// Where the spool volume is mounted in the database's container.
pub const WAL_SPOOL_MOUNT: &str = "/imgbuild-wal";
/// Default `[backup] archive_timeout`: PostgreSQL switches to a new WAL file at least
/// this often while there are writes, which bounds what a crash loses.
pub const DEFAULT_ARCHIVE_TIMEOUT: u32 = 60;
/// Default `[backup] wal_rpo_seconds`: the monitoring host alerts when a WAL file waits
/// longer than this to reach the bucket.
pub const DEFAULT_WAL_RPO_SECONDS: u32 = 300;

/// The podman volume a PostgreSQL volume's archiver copies finished WAL files into.
pub fn wal_spool_volume(volume: &str) -> String {
    format!("{volume}-wal-spool")
}

/// Continuous WAL shipping of one PostgreSQL volume (see `crate::agent::wal`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PostgresWal {
    /// The container running PostgreSQL on this volume (its unit is `<name>.service`).
    pub container: String,
    /// The data directory, relative to the volume's root ("." for the root itself).
    pub data: String,
    /// The podman volume the archiver copies finished WAL files into.
    pub spool_volume: String,
    pub archive_timeout_secs: u32,
    pub rpo_secs: u32,
}

/// Where a moved volume comes from: the other host's bucket and prefix, read with a
/// read-only key, its manifests verified with its public key and decrypted with its
/// encryption key (its signing key never leaves its own image).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MoveSource {
    /// The other host's name: its manifests must say they are its.
    pub host: String,
    pub volume: String,
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub credentials_file: Option<String>,
    pub encryption_key_file: String,
    /// Absent on purpose; the public key is read from the `.pub` beside it.
    pub signing_key_file: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Stop,
    Hook,
    Live,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::check::ReadData;

    #[test]
    fn check_read_data_accepts_fractions_and_off() {
        for off in ["0", "0%", "off", "OFF", " 0.0 "] {
            assert_eq!(parse_read_data(off), Ok(ReadData::None), "{off}");
        }
        assert_eq!(parse_read_data("10%"), Ok(ReadData::Subset(0.1)));
        assert_eq!(parse_read_data("1/4"), Ok(ReadData::Subset(0.25)));
        assert_eq!(parse_read_data("100%"), Ok(ReadData::All));
        for bad in ["", "150%", "-5%", "weekly", "1/0", "NaN", "0/10"] {
            assert!(parse_read_data(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn pack_settings_defaults_are_the_engines() {
        let p = PackSettings::default();
        assert_eq!(p.target_bytes(), crate::snapshot::pack::PACK_TARGET);
        let o = p.prune_options();
        let d = crate::snapshot::prune::PruneOptions::default();
        assert_eq!(
            (o.grace_secs, o.repack_garbage_percent, o.pack_target),
            (d.grace_secs, d.repack_garbage_percent, d.pack_target)
        );
        // A host.toml written before these settings existed still parses, with defaults.
        let old = r#"
            bucket = "b"
            prefix = "p"
            region = ""
            path_style = true
            schedule = "daily"
            keep = { last = 3, daily = 7, weekly = 4, monthly = 6 }
            restore = "require"
            restore_timeout_secs = 900
            volumes = []
            encryption_key_file = "/e"
            signing_key_file = "/s"
        "#;
        let b: BackupConfig = toml::from_str(old).unwrap();
        assert_eq!(b.packs, PackSettings::default());
        assert_eq!(b.check, CheckSettings::default());
    }
}
