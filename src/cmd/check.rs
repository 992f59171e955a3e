//! `imgbuild check PROFILE [--read-data | --read-data-subset F]`: are the host's
//! snapshots whole? Without a profile, in the image: the check timer's job
//! (`crate::agent::check_job`).

use crate::agent::{self, check_job, HostPaths};
use crate::cli::snapshot::CheckArgs;
use crate::progress::Progress;
use crate::snapshot::check::{self, ReadData};
use crate::workstation::{snapshot_target, ResolveHost};
use anyhow::bail;

pub fn run(args: &CheckArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let progress = Progress::detect(args.quiet || args.json);
    let Some(profile) = &args.profile else {
        // In the image: the bucket is host.toml's, never another one.
        let b = &args.bucket;
        if b.bucket.is_some() || b.prefix.is_some() || b.endpoint.is_some() {
            bail!("--bucket, --prefix and --endpoint need a profile: in the image the check reads the bucket host.toml names");
        }
        let hc = agent::read_host_config(&args.config)?;
        let r = agent::check_host(&hc, &HostPaths::default(), args.read(), &progress)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        return Ok(if r.ok() { 0 } else { 1 });
    };
    let (_, t) = snapshot_target(profile, &args.bucket, resolve)?;
    let read = args.read().unwrap_or(ReadData::None);
    let rt = crate::snapshot::runtime()?;
    let r = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        anyhow::Ok(check::check(&store, &keys, read, 16, &progress).await?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", check_job::summary(&r, read));
        for p in &r.problems {
            println!("problem: {p}");
        }
        println!("{}", r.requests);
        println!("{}", if r.ok() { "ok" } else { "FAILED" });
    }
    Ok(if r.ok() { 0 } else { 1 })
}
