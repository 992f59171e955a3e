//! `imgbuild snapshots PROFILE`: the host's snapshots in its bucket.

use crate::cli::snapshot::SnapshotsArgs;
use crate::snapshot::format::rfc3339;
use crate::snapshot::restore;
use crate::workstation::{snapshot_target, ResolveHost};

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

pub fn run(args: &SnapshotsArgs, resolve: ResolveHost) -> anyhow::Result<i32> {
    let (_, t) = snapshot_target(&args.profile, &args.bucket, resolve)?;
    let rt = crate::snapshot::runtime()?;
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
