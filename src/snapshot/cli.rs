//! clap arguments and command functions for the snapshot verbs. The lead's CLI
//! flattens these into its subcommands and passes a resolver that turns a profile
//! argument into the host config and the host's secrets dir (keeping profile parsing
//! out of this module).

use super::backup::{self, BackupOptions, NoHooks, Source};
use super::check;
use super::format::rfc3339;
use super::fsio::WriteOptions;
use super::host::{self, HostPaths};
use super::prune;
use super::restore::{self, RestoreOptions};
use super::{Overrides, Target};
use crate::hostconfig::{HostConfig, HOST_CONFIG_PATH};
use crate::progress::Progress;
use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};

/// Resolves a profile argument (name or path) to the host config and the secrets root
/// (opened: a locked root is decrypted in memory).
pub type ResolveHost<'a> =
    &'a dyn Fn(&str) -> anyhow::Result<(HostConfig, crate::secrets::SecretsRoot)>;

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
    /// Host profile.
    pub profile: String,
    /// Also download and verify every chunk.
    #[arg(long)]
    pub read_data: bool,
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

fn workstation(
    profile: &str,
    b: &BucketArgs,
    resolve: ResolveHost,
) -> anyhow::Result<(HostConfig, Target)> {
    let (hc, root) = resolve(profile)?;
    let Some(bc) = &hc.backup else {
        bail!("profile {profile} has no backup section: it has no snapshots");
    };
    let mut t = Target::workstation(&hc.host, bc, &root.host_dir(&hc.host), &b.overrides());
    t.use_secrets(&root)?;
    Ok((hc, t))
}

pub fn read_host_config(path: &Path) -> anyhow::Result<HostConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Picks `<dir>/<volume>/_data` when it exists (a copy of podman's volumes dir),
/// else `<dir>/<volume>`.
fn volume_source(dir: &Path, name: &str) -> anyhow::Result<Source> {
    let podman = dir.join(name).join("_data");
    let plain = dir.join(name);
    let root = if podman.is_dir() {
        podman
    } else if plain.is_dir() {
        plain
    } else {
        bail!(
            "volume {name}: neither {} nor {} is a directory",
            podman.display(),
            plain.display()
        );
    };
    Ok(Source {
        name: name.to_string(),
        root,
    })
}

pub fn cmd_backup(args: &BackupArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let progress = Progress::detect(args.quiet || args.json);
    let Some(profile) = &args.profile else {
        // In the image.
        let hc = read_host_config(&args.config)?;
        let r = host::backup_host(&hc, &HostPaths::default(), &progress)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        return Ok(if r.error.is_none() { 0 } else { 1 });
    };
    let Some(from) = &args.from else {
        bail!("backup {profile} needs --from DIR (a directory with one sub-directory per volume)");
    };
    let (hc, t) = workstation(profile, &args.bucket, resolve)?;
    let bc = hc.backup.as_ref().context("no backup section")?;
    let sources = bc
        .volumes
        .iter()
        .map(|v| volume_source(from, &v.name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = super::runtime()?;
    let (report, pr) = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        let opts = BackupOptions {
            host: hc.host.clone(),
            parallel: 16,
            progress: progress.clone(),
        };
        let report = backup::backup(&store, &keys, &sources, &mut NoHooks, &opts).await?;
        let pr = if args.prune {
            Some(prune::prune(&store, &keys, &bc.keep, prune::CHUNK_GRACE_SECS).await?)
        } else {
            None
        };
        anyhow::Ok((report, pr))
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"snapshot": report, "prune": pr}))?
        );
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        println!(
            "snapshot {}: {} files, {} bytes, {} new, {} uploaded in {:.1}s",
            report.id,
            report.stats.files,
            report.stats.bytes_total,
            report.stats.bytes_new,
            report.stats.bytes_uploaded,
            report.stats.duration_ms as f64 / 1000.0
        );
        if let Some(p) = pr {
            println!(
                "prune: kept {}, forgot {}, deleted {} chunks ({} bytes)",
                p.kept.len(),
                p.forgotten.len(),
                p.chunks_deleted,
                p.bytes_deleted
            );
        }
    }
    Ok(0)
}

#[derive(Debug, serde::Serialize)]
struct SnapshotLine {
    id: String,
    time: Option<String>,
    bytes: Option<u64>,
    bytes_new: Option<u64>,
    files: Option<u64>,
    volumes: Vec<String>,
    error: Option<String>,
}

pub fn cmd_snapshots(args: &SnapshotsArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let (_, t) = workstation(&args.profile, &args.bucket, resolve)?;
    let rt = super::runtime()?;
    let lines = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        let mut out = Vec::new();
        for id in restore::list_ids(&store).await? {
            out.push(match restore::load_manifest(&store, &keys, &id).await {
                Ok(m) => SnapshotLine {
                    id,
                    time: Some(rfc3339(m.time)),
                    bytes: Some(m.stats.bytes_total),
                    bytes_new: Some(m.stats.bytes_new),
                    files: Some(m.stats.files),
                    volumes: m.volumes.iter().map(|v| v.name.clone()).collect(),
                    error: None,
                },
                Err(e) => SnapshotLine {
                    id,
                    time: None,
                    bytes: None,
                    bytes_new: None,
                    files: None,
                    volumes: Vec::new(),
                    error: Some(e.to_string()),
                },
            });
        }
        anyhow::Ok(out)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&lines)?);
    } else {
        println!(
            "{:<30} {:<21} {:>12} {:>12} {:>8}",
            "ID", "TIME", "SIZE", "NEW", "FILES"
        );
        for l in &lines {
            match &l.error {
                None => println!(
                    "{:<30} {:<21} {:>12} {:>12} {:>8}",
                    l.id,
                    l.time.as_deref().unwrap_or(""),
                    human_bytes(l.bytes.unwrap_or(0)),
                    human_bytes(l.bytes_new.unwrap_or(0)),
                    l.files.unwrap_or(0)
                ),
                Some(e) => println!("{:<30} UNREADABLE: {e}", l.id),
            }
        }
    }
    Ok(if lines.iter().any(|l| l.error.is_some()) {
        1
    } else {
        0
    })
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn cmd_restore(args: &RestoreArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let (_, t) = workstation(&args.profile, &args.bucket, resolve)?;
    let progress = Progress::detect(args.quiet || args.json);
    let rt = super::runtime()?;
    let report = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        let m = match &args.snapshot {
            Some(id) => restore::load_manifest(&store, &keys, id).await?,
            None => restore::latest_manifest(&store, &keys)
                .await?
                .ok_or_else(|| super::SnapshotError::NoSnapshots {
                    bucket: store.bucket.clone(),
                    prefix: store.prefix.clone(),
                })?,
        };
        for v in &args.volumes {
            if !m.volumes.iter().any(|mv| &mv.name == v) {
                bail!("snapshot {} has no volume {v}", m.id);
            }
        }
        let mut write = WriteOptions::default();
        if args.no_owners {
            write.owners = false;
        }
        let opts = RestoreOptions {
            parallel: 16,
            progress,
            write,
            volumes: args.volumes.clone(),
        };
        anyhow::Ok(restore::restore(&store, &keys, &m, &args.to, &opts).await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        println!(
            "restored snapshot {} ({}) into {}: {} files, {} in {:.1}s",
            report.id,
            rfc3339(report.time),
            args.to.display(),
            report.files,
            human_bytes(report.bytes),
            report.seconds
        );
    }
    Ok(0)
}

pub fn cmd_check(args: &CheckArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let (_, t) = workstation(&args.profile, &args.bucket, resolve)?;
    let progress = Progress::detect(args.quiet || args.json);
    let rt = super::runtime()?;
    let r = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        anyhow::Ok(check::check(&store, &keys, args.read_data, 16, &progress).await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} snapshot(s), {} chunks referenced, {} in the bucket ({} unreferenced){}",
            r.snapshots,
            r.chunks_referenced,
            r.chunks_in_bucket,
            r.chunks_unreferenced,
            if args.read_data {
                format!(", {} read and verified", r.chunks_read)
            } else {
                String::new()
            }
        );
        for p in &r.problems {
            println!("problem: {p}");
        }
        println!("{}", if r.ok() { "ok" } else { "FAILED" });
    }
    Ok(if r.ok() { 0 } else { 1 })
}

/// `imgbuild firstboot`: exit 0 when services may start, 1 when they must not.
pub fn cmd_firstboot(args: &FirstbootArgs) -> anyhow::Result<i32> {
    let hc = read_host_config(&args.config)?;
    match host::firstboot(&hc, &HostPaths::default()) {
        Ok(_) => Ok(0),
        Err(e) => {
            eprintln!("imgbuild firstboot: {e:#}");
            Ok(1)
        }
    }
}
