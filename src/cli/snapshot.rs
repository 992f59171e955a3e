//! clap arguments of the snapshot verbs (backup, snapshots, restore, check, firstboot).

use crate::hostconfig::HOST_CONFIG_PATH;
use crate::snapshot::check::ReadData;
use crate::workstation::Overrides;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct BucketArgs {
    /// Use this bucket instead of the profile's.
    #[arg(long)]
    pub bucket: Option<String>,
    /// Use this key prefix instead of the profile's per-host prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// S3 endpoint URL (default: the profile's, or AWS_ENDPOINT_URL_S3); implies path-style.
    #[arg(long)]
    pub endpoint: Option<String>,
}

impl BucketArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            endpoint: self.endpoint.clone(),
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct BackupArgs {
    /// Host profile (on a workstation). Without it: back up this host's volumes as
    /// configured in /etc/imgbuild/host.toml (what imgbuild-backup.timer runs).
    pub profile: Option<String>,
    /// Directory holding one sub-directory per volume (`<volume>/_data` or `<volume>`).
    #[arg(long, requires = "profile")]
    pub from: Option<PathBuf>,
    /// Apply the profile's retention after the snapshot (always done in the image).
    #[arg(long)]
    pub prune: bool,
    /// Host config to read in the image.
    #[arg(long, default_value = HOST_CONFIG_PATH, hide = true)]
    pub config: PathBuf,
    /// In the image, at shutdown (imgbuild-final-snapshot.service): the containers have
    /// stopped; snapshot without quiescing or pruning, within --timeout seconds.
    #[arg(long, conflicts_with = "profile")]
    pub r#final: bool,
    /// Seconds the final snapshot may take (the profile's final_snapshot_timeout).
    #[arg(long, requires = "final", default_value_t = crate::hostconfig::DEFAULT_FINAL_SNAPSHOT_TIMEOUT)]
    pub timeout: u32,
    #[command(flatten)]
    pub bucket: BucketArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct SnapshotsArgs {
    /// Host profile.
    pub profile: String,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct RestoreArgs {
    /// Host profile.
    pub profile: String,
    /// Snapshot id (default: the newest that verifies).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Directory to restore into, as `<DIR>/<volume>/_data` (podman's layout).
    #[arg(long)]
    pub to: PathBuf,
    /// Only this volume (repeatable).
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
    /// Do not chown to the stored owners (default when not root).
    #[arg(long)]
    pub no_owners: bool,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[arg(long)]
    pub json: bool,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct CheckArgs {
    /// Host profile (on a workstation). Without it: check this host's bucket as
    /// configured in /etc/imgbuild/host.toml, reading its `check_read_data` share of the
    /// packs, and write metrics (what imgbuild-check.timer runs).
    pub profile: Option<String>,
    /// Also download and verify every pack and chunk.
    #[arg(long)]
    pub read_data: bool,
    /// Download and verify a random share of the packs: 10%, 0.1 or 1/10 (run weekly,
    /// 10% reads each pack once every ten weeks on average).
    #[arg(long, value_name = "FRACTION", conflicts_with = "read_data", value_parser = parse_fraction)]
    pub read_data_subset: Option<ReadData>,
    /// Host config to read in the image.
    #[arg(long, default_value = HOST_CONFIG_PATH, hide = true)]
    pub config: PathBuf,
    #[command(flatten)]
    pub bucket: BucketArgs,
    #[arg(long)]
    pub json: bool,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct FirstbootArgs {
    /// Host config to read.
    #[arg(long, default_value = HOST_CONFIG_PATH, hide = true)]
    pub config: PathBuf,
}

fn parse_fraction(s: &str) -> Result<ReadData, String> {
    ReadData::parse_fraction(s)
}

impl CheckArgs {
    /// What the flags ask to read; None when neither is given.
    pub fn read(&self) -> Option<ReadData> {
        if self.read_data {
            Some(ReadData::All)
        } else {
            self.read_data_subset
        }
    }
}
