//! The typed profile: what a host is, after parsing and environment merge.
//! Every struct rejects unknown keys so a typo never silently changes a host.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub host: HostSection,
    pub admin: Admin,
    #[serde(default)]
    pub ssh: Ssh,
    #[serde(default)]
    pub firewall: Firewall,
    pub wireguard: Option<WireGuard>,
    pub backup: Option<Backup>,
    pub proxy: Option<Proxy>,
    pub monitoring: Option<Monitoring>,
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    #[serde(default)]
    pub volumes: BTreeMap<String, Volume>,
    #[serde(default)]
    pub containers: BTreeMap<String, Container>,
    /// Extra files for the host, by absolute path (configs an app needs, static
    /// network settings...).
    #[serde(default)]
    pub files: BTreeMap<String, ExtraFile>,
    /// Partial profiles merged over the base by `--env NAME`; checked when selected.
    #[serde(default)]
    pub environments: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// Hostname; also the secrets subdirectory and the default bucket prefix.
    pub name: String,
    /// Environment used when `--env` is not given.
    pub default_env: String,
    #[serde(default = "default_base")]
    pub base: String,
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// Console readiness wait, seconds.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: u64,
}

fn default_base() -> String {
    "debian-trixie".into()
}
fn default_tz() -> String {
    "UTC".into()
}
fn default_ready_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub user: String,
    pub ssh_keys: Vec<String>,
    #[serde(default = "default_true")]
    pub sudo: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SshAccess {
    /// Reachable from anywhere.
    #[default]
    Public,
    /// Only over the WireGuard interface.
    Wireguard,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    #[serde(default)]
    pub access: SshAccess,
}

impl Default for Ssh {
    fn default() -> Self {
        Ssh {
            port: 22,
            access: SshAccess::Public,
        }
    }
}

fn default_ssh_port() -> u16 {
    22
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Firewall {
    /// Extra public ports beyond what containers publish.
    #[serde(default)]
    pub allow_tcp: Vec<u16>,
    #[serde(default)]
    pub allow_udp: Vec<u16>,
    /// Ports opened only on the WireGuard interface.
    #[serde(default)]
    pub wireguard_tcp: Vec<u16>,
    #[serde(default)]
    pub wireguard_udp: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WireGuard {
    #[serde(default = "default_wg_if")]
    pub interface: String,
    /// This host's tunnel address with prefix, e.g. `10.8.0.1/24`.
    pub address: String,
    #[serde(default = "default_wg_port")]
    pub listen_port: u16,
    /// How peers reach this host (`host:port`); omit for a host that only dials out.
    pub endpoint: Option<String>,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

fn default_wg_if() -> String {
    "wg0".into()
}
fn default_wg_port() -> u16 {
    51820
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Name of another profile in the same directory: its public key, tunnel address
    /// and endpoint come from there, never pasted by hand.
    pub host: String,
    /// Extra networks routed to this peer beyond its tunnel address.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    pub keepalive: Option<u16>,
}

/// When the host takes a last snapshot on its way down (imgbuild-final-snapshot.service).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FinalSnapshot {
    /// On power-off and halt, not on reboot (the disk stays).
    #[default]
    Poweroff,
    /// Also on every reboot.
    Always,
    Off,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    Require,
    AllowEmpty,
    Skip,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    pub bucket: String,
    /// Defaults to the host name.
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
    /// Empty: the standard AWS order decides (AWS_REGION in s3.env or the environment,
    /// the AWS config file), then us-east-1.
    #[serde(default)]
    pub region: String,
    /// Path-style addressing; defaults to true when `endpoint` is set.
    pub path_style: Option<bool>,
    /// systemd OnCalendar expression.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    #[serde(default)]
    pub keep: Keep,
    pub object_lock_days: Option<u32>,
    /// Back up even when the bucket does not enforce Object Lock (the backup fails
    /// otherwise: a lock that is silently ignored protects nothing).
    #[serde(default)]
    pub accept_unlocked_bucket: bool,
    pub ping_url: Option<String>,
    /// `require`: a snapshot must restore before services start; `allow-empty`: the
    /// first deployment onto an empty bucket; `skip`: never restore.
    pub restore: RestoreMode,
    #[serde(default = "default_restore_timeout")]
    pub restore_timeout: u64,
    /// Random delay added to each scheduled run, seconds, so that hosts sharing a
    /// bucket do not all upload at the same second.
    #[serde(default = "default_jitter")]
    pub jitter: u32,
    /// Recovery point objective, hours: the oldest a snapshot may be before a drill
    /// (and the operator) treats it as a failure.
    #[serde(default = "default_rpo_hours")]
    pub rpo_hours: u32,
    /// Size of the packs chunks are uploaded in, MiB. Signed so that a negative value
    /// gets the range message rather than a type error.
    #[serde(default = "default_pack_size_mib")]
    pub pack_size_mib: i64,
    /// Prune rewrites a pack once more than this share of it is garbage.
    #[serde(default = "default_repack_garbage_percent")]
    pub repack_garbage_percent: i64,
    /// systemd OnCalendar expression of the bucket check timer.
    #[serde(default = "default_check_schedule")]
    pub check_schedule: String,
    /// Share of the packs each check downloads: "10%", "0.1", "1/10"; "0"/"off" reads
    /// metadata only.
    #[serde(default = "default_check_read_data")]
    pub check_read_data: String,
    /// A last snapshot after the containers stopped, before the network goes down.
    #[serde(default)]
    pub final_snapshot: FinalSnapshot,
    /// Seconds the final snapshot may take before the shutdown goes on without it.
    /// Signed so that a negative value gets the range message.
    #[serde(default = "default_final_snapshot_timeout")]
    pub final_snapshot_timeout: i64,
    /// Seconds after which PostgreSQL switches to a new WAL file when there were
    /// writes (volumes with `postgres`): what an unplanned crash loses at most, plus
    /// the time to ship. Signed so that a negative value gets the range message.
    #[serde(default = "default_archive_timeout")]
    pub archive_timeout: i64,
    /// The monitoring host alerts when a finished WAL file has waited this long to
    /// reach the bucket.
    #[serde(default = "default_wal_rpo_seconds")]
    pub wal_rpo_seconds: i64,
}

fn default_archive_timeout() -> i64 {
    crate::hostconfig::DEFAULT_ARCHIVE_TIMEOUT.into()
}
fn default_wal_rpo_seconds() -> i64 {
    crate::hostconfig::DEFAULT_WAL_RPO_SECONDS.into()
}

fn default_final_snapshot_timeout() -> i64 {
    crate::hostconfig::DEFAULT_FINAL_SNAPSHOT_TIMEOUT.into()
}

fn default_pack_size_mib() -> i64 {
    crate::hostconfig::DEFAULT_PACK_SIZE_MIB.into()
}
fn default_repack_garbage_percent() -> i64 {
    crate::hostconfig::DEFAULT_REPACK_GARBAGE_PERCENT.into()
}
fn default_check_schedule() -> String {
    crate::hostconfig::DEFAULT_CHECK_SCHEDULE.into()
}
fn default_check_read_data() -> String {
    crate::hostconfig::DEFAULT_CHECK_READ_DATA.into()
}

fn default_jitter() -> u32 {
    600
}
fn default_rpo_hours() -> u32 {
    30
}

fn default_schedule() -> String {
    "*-*-* 03:00:00".into()
}
fn default_restore_timeout() -> u64 {
    900
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Keep {
    #[serde(default)]
    pub last: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
}

impl Default for Keep {
    fn default() -> Self {
        Keep {
            last: 3,
            daily: 7,
            weekly: 4,
            monthly: 6,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    Caddy,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub kind: ProxyKind,
    /// The container that runs the proxy; it gets the rendered Caddyfile.
    pub container: String,
    /// ACME account e-mail.
    pub email: String,
    /// Use Let's Encrypt's staging CA (staging environments).
    #[serde(default)]
    pub acme_staging: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Monitoring {
    /// Profiles whose hosts this host scrapes over WireGuard.
    #[serde(default)]
    pub scrape: Vec<String>,
    pub alerts: Option<Alerts>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiverKind {
    Webhook,
    Ntfy,
    Email,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    pub receiver: ReceiverKind,
    /// Webhook or ntfy topic URL.
    pub url: Option<String>,
    /// For `email`.
    pub to: Option<String>,
    pub smtp: Option<String>,
    pub from: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// No route to the outside (databases).
    #[serde(default)]
    pub internal: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackupStrategy {
    /// Stop the containers using the volume, snapshot, start them.
    Stop,
    /// Run `hook` first (e.g. pg_dump into the volume), then snapshot live.
    Hook,
    #[default]
    Live,
    /// Not backed up (caches).
    None,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    #[serde(default)]
    pub backup: BackupStrategy,
    /// Command for `backup = "hook"`, run with `sh -c` on the host.
    pub hook: Option<String>,
    /// `"HOST:VOLUME"`: until this host has a snapshot of its own holding the volume,
    /// first boot restores it from HOST's newest snapshot of VOLUME (moving a service
    /// between hosts), read with a read-only key.
    pub from: Option<String>,
    /// A PostgreSQL data directory: its WAL is shipped to the bucket as the archiver
    /// completes each file, and first boot replays it after the snapshot.
    pub postgres: Option<PostgresVolume>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresVolume {
    /// The container that runs PostgreSQL on this volume.
    pub container: String,
    /// The data directory (PGDATA) relative to the volume's root; default ".".
    #[serde(default = "default_pg_data")]
    pub data: String,
}

fn default_pg_data() -> String {
    ".".into()
}

impl Volume {
    /// `from` split into (host, volume), when it has that shape.
    pub fn from_parts(&self) -> Option<(&str, &str)> {
        let (h, v) = self.from.as_deref()?.split_once(':')?;
        Some((h, v))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub cmd: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_start_period")]
    pub start_period: String,
}

fn default_interval() -> String {
    "30s".into()
}
fn default_retries() -> u32 {
    3
}
fn default_start_period() -> String {
    "60s".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Fully qualified image pinned by tag or digest, never `latest`.
    pub image: String,
    /// OCI archive (path relative to the profile) baked into the disk image so the host
    /// boots without a registry; `image` must then be its full reference.
    pub bake: Option<String>,
    /// `[IP:]HOST:CONTAINER[/tcp|udp]`. A host IP equal to this host's WireGuard
    /// address makes the port reachable only over the tunnel.
    #[serde(default)]
    pub publish: Vec<String>,
    /// `VOLUME:/path[:ro]` with a volume from `[volumes]`, or
    /// `/etc/imgbuild/config/...:/path:ro` for rendered configuration.
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values are secrets from the secrets dir
    /// (`app/<name>`, generated on first build when missing).
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// Other containers this one needs started first (app after its database).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub command: Vec<String>,
    pub health: Option<Health>,
    #[serde(default)]
    pub auto_update: bool,
    /// Public domain the proxy routes to this container.
    pub domain: Option<String>,
    /// Container port the proxy forwards to.
    pub port: Option<u16>,
    /// Use the host's network namespace (node-exporter).
    #[serde(default)]
    pub host_network: bool,
    pub user: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Expose `/metrics` of this container to the monitoring host: `"PORT"`.
    pub metrics_port: Option<u16>,
    /// HTTP path `imgbuild drill` GETs through the container's public TCP port; it must
    /// answer 2xx or 3xx. Without it a public TCP port only has to accept a connection.
    pub check: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtraFile {
    pub content: String,
    /// Octal mode as a string, e.g. "0644".
    #[serde(default = "default_file_mode")]
    pub mode: String,
    /// Holds a secret: never printed, output written 0600.
    #[serde(default)]
    pub secret: bool,
}

fn default_file_mode() -> String {
    "0644".into()
}
