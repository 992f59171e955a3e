//! `imgbuild restore PROFILE --to DIR`: a snapshot into a local directory.

use super::snapshots::human_bytes;
use crate::cli::snapshot::RestoreArgs;
use crate::progress::Progress;
use crate::snapshot::format::rfc3339;
use crate::snapshot::fsio::WriteOptions;
use crate::snapshot::restore::{self, RestoreOptions};
use crate::workstation::{snapshot_target, ResolveHost};
use anyhow::bail;

pub fn run(args: &RestoreArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let (_, t) = snapshot_target(&args.profile, &args.bucket, resolve)?;
    let progress = Progress::detect(args.quiet || args.json);
    let rt = crate::snapshot::runtime()?;
    let report = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        let m = match &args.snapshot {
            Some(id) => restore::load_manifest(&store, &keys, id).await?,
            None => restore::latest_manifest(&store, &keys)
                .await?
                .ok_or_else(|| crate::snapshot::SnapshotError::NoSnapshots {
                    bucket: store.bucket.clone(),
                    prefix: store.prefix.clone(),
                })?,
        };
        if args.snapshot.is_none() {
            for h in restore::hidden_snapshots(&store).await? {
                if h.id > m.id {
                    eprintln!(
                        "WARNING: snapshot {} is newer but hidden by a delete marker (locked until {}): \
                         someone deleted it; restoring {} (use --snapshot {} to restore it)",
                        h.id,
                        rfc3339(h.locked_until),
                        m.id,
                        h.id
                    );
                }
            }
        }
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
        println!("{}", report.requests);
    }
    Ok(0)
}
