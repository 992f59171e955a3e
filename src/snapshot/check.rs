//! `check`: are all snapshots restorable? Manifests are verified, every referenced
//! chunk must exist, and with `read_data` every chunk is downloaded and verified.

use super::backup::list_chunks;
use super::crypto::Keys;
use super::error::Result;
use super::format::ChunkRef;
use super::restore::{fetch_chunk, list_ids, load_manifest};
use super::store::Store;
use crate::progress::Progress;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: u64,
    pub chunks_referenced: u64,
    pub chunks_in_bucket: u64,
    /// Chunks no snapshot needs (left by interrupted backups; prune removes them).
    pub chunks_unreferenced: u64,
    pub chunks_read: u64,
    /// One line per problem, naming the snapshot or chunk and the cause.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub async fn check(
    store: &Store,
    keys: &Keys,
    read_data: bool,
    parallel: usize,
    progress: &Progress,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    // chunk id → (length, first snapshot needing it)
    let mut needed: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for id in list_ids(store).await? {
        report.snapshots += 1;
        match load_manifest(store, keys, &id).await {
            Ok(m) => {
                for v in &m.volumes {
                    for c in &v.chunks {
                        needed.entry(c.0.clone()).or_insert((c.1, id.clone()));
                    }
                }
            }
            Err(e) => report.problems.push(format!("snapshot {id}: {e}")),
        }
    }
    for h in super::restore::hidden_snapshots(store).await? {
        report.problems.push(format!(
            "snapshot {} is hidden by a delete marker although it is locked until {}: \
             someone deleted it (tampering?); it can still be restored with --snapshot {}",
            h.id,
            super::format::rfc3339(h.locked_until),
            h.id
        ));
        if let Ok(m) = load_manifest(store, keys, &h.id).await {
            report.snapshots += 1;
            for v in &m.volumes {
                for c in &v.chunks {
                    needed.entry(c.0.clone()).or_insert((c.1, h.id.clone()));
                }
            }
        }
    }
    report.chunks_referenced = needed.len() as u64;
    let present: HashSet<String> = list_chunks(store)
        .await?
        .into_iter()
        .map(|c| hex::encode(c.0))
        .collect();
    report.chunks_in_bucket = present.len() as u64;
    report.chunks_unreferenced = present.iter().filter(|c| !needed.contains_key(*c)).count() as u64;
    for (c, (_, snap)) in &needed {
        if !present.contains(c) {
            report
                .problems
                .push(format!("snapshot {snap}: chunk {c} is missing"));
        }
    }
    if read_data {
        let total: u64 = needed.values().map(|v| v.0).sum();
        let step = progress.step("check data", Some(total));
        let results: Vec<(String, u64, Result<Vec<u8>>)> =
            futures_util::stream::iter(needed.iter().filter(|(c, _)| present.contains(*c)))
                .map(|(c, (len, snap))| async move {
                    let r = fetch_chunk(store, keys, &ChunkRef(c.clone(), *len)).await;
                    (snap.clone(), *len, r.map(|_| Vec::new()))
                })
                .buffer_unordered(parallel.max(1))
                .inspect(|(_, len, _)| step.inc(*len))
                .collect()
                .await;
        step.finish();
        for (snap, _, r) in results {
            report.chunks_read += 1;
            if let Err(e) = r {
                report.problems.push(format!("snapshot {snap}: {e}"));
            }
        }
    }
    Ok(report)
}
