//! `imgbuild check PROFILE [--read-data]`: are the host's snapshots whole?

use crate::cli::snapshot::CheckArgs;
use crate::progress::Progress;
use crate::snapshot::check;
use crate::workstation::{snapshot_target, ResolveHost};

pub fn run(args: &CheckArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let (_, t) = snapshot_target(&args.profile, &args.bucket, resolve)?;
    let progress = Progress::detect(args.quiet || args.json);
    let rt = crate::snapshot::runtime()?;
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
