//! `imgbuild backup`: in the image, the timer's job (`crate::agent::backup_job`); on a
//! workstation, a snapshot of local directories (`--from`) into the host's bucket.

use crate::agent::{self, HostPaths};
use crate::cli::snapshot::BackupArgs;
use crate::progress::Progress;
use crate::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use crate::snapshot::prune;
use crate::workstation::{snapshot_target, ResolveHost};
use anyhow::{bail, Context};
use std::path::Path;

pub fn run(args: &BackupArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let progress = Progress::detect(args.quiet || args.json);
    let Some(profile) = &args.profile else {
        // In the image.
        let hc = agent::read_host_config(&args.config)?;
        if args.r#final {
            let timeout = std::time::Duration::from_secs(args.timeout.into());
            let r =
                agent::backup_job::final_snapshot(&hc, &HostPaths::default(), &progress, timeout)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            // Skipped is not a failure; the console line says which it was either way.
            return Ok(match r {
                Some(r) if r.error.is_some() => 1,
                _ => 0,
            });
        }
        let r = agent::backup_host(&hc, &HostPaths::default(), &progress)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        return Ok(if r.error.is_none() { 0 } else { 1 });
    };
    let Some(from) = &args.from else {
        bail!("backup {profile} needs --from DIR (a directory with one sub-directory per volume)");
    };
    let (hc, t) = snapshot_target(profile, &args.bucket, resolve)?;
    let bc = hc.backup.as_ref().context("no backup section")?;
    let sources = bc
        .volumes
        .iter()
        .map(|v| volume_source(from, &v.name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = crate::snapshot::runtime()?;
    let (report, pr) = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        let opts = BackupOptions {
            host: hc.host.clone(),
            parallel: 16,
            progress: progress.clone(),
            pack_target: bc.packs.target_bytes(),
        };
        let report = backup::backup(&store, &keys, &sources, &mut NoHooks, &opts).await?;
        // A snapshot exists now: the host's first boot must restore it, never start empty.
        crate::snapshot::marker::remove(&store).await?;
        let pr = if args.prune {
            Some(prune::prune(&store, &keys, &bc.keep, &bc.packs.prune_options()).await?)
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
            "snapshot {}: {} files, {} bytes, {} new, {} uploaded in {} packs in {:.1}s",
            report.id,
            report.stats.files,
            report.stats.bytes_total,
            report.stats.bytes_new,
            report.stats.bytes_uploaded,
            report.stats.packs_new,
            report.stats.duration_ms as f64 / 1000.0
        );
        println!("{}", report.requests);
        if let Some(p) = pr {
            println!("prune: {}", agent::backup_job::prune_summary(&p));
            for problem in &p.problems {
                println!("prune: problem: {problem}");
            }
            println!("prune: {}", p.requests);
        }
    }
    Ok(0)
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
        wal_start: None,
    })
}
