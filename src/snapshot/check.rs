//! `check`: are all snapshots restorable? Manifests and index objects are verified,
//! every referenced chunk must have a place (a listed pack that is long enough, or a
//! format-1 object), and reading data downloads packs whole and verifies every byte:
//! the pack's name (keyed hash), its header against the index, every chunk in it.

use super::crypto::Keys;
use super::error::Result;
use super::format::ChunkRef;
use super::pack::{parse_header, Index, Location, PACK_OBJECT_MAX};
use super::restore::{fetch_chunk, list_ids, load_manifest};
use super::store::Store;
use crate::progress::Progress;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashSet};

/// How much data a check downloads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// Metadata only: manifests, index, listings.
    None,
    /// Every pack and chunk object.
    All,
    /// A random fraction (0 < f ≤ 1) of the packs and chunk objects: cheap periodic
    /// checks that, run weekly, cover the whole bucket in expectation in 1/f weeks.
    Subset(f64),
}

impl From<bool> for ReadData {
    fn from(all: bool) -> Self {
        if all {
            ReadData::All
        } else {
            ReadData::None
        }
    }
}

impl ReadData {
    /// "10%", "0.1" or "1/10".
    pub fn parse_fraction(s: &str) -> std::result::Result<ReadData, String> {
        let s = s.trim();
        let f = if let Some(p) = s.strip_suffix('%') {
            p.trim().parse::<f64>().map(|v| v / 100.0)
        } else if let Some((a, b)) = s.split_once('/') {
            match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
                (Ok(a), Ok(b)) if b != 0.0 => Ok(a / b),
                _ => "x".parse::<f64>(),
            }
        } else {
            s.parse::<f64>()
        }
        .map_err(|_| format!("{s:?} is not a fraction (use e.g. 10%, 0.1 or 1/10)"))?;
        if !(f > 0.0 && f <= 1.0) {
            return Err(format!("{s:?} must be more than 0 and at most 100%"));
        }
        Ok(if f >= 1.0 {
            ReadData::All
        } else {
            ReadData::Subset(f)
        })
    }

    fn picks(&self) -> bool {
        match self {
            ReadData::None => false,
            ReadData::All => true,
            ReadData::Subset(f) => {
                f64::from(super::crypto::random_u16()) < f * f64::from(u16::MAX) + 0.5
            }
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: u64,
    pub chunks_referenced: u64,
    /// Distinct chunks the bucket holds (packs through the index, format-1 objects).
    pub chunks_in_bucket: u64,
    /// Chunks no snapshot needs (left by interrupted backups; prune removes them).
    pub chunks_unreferenced: u64,
    pub packs: u64,
    /// Packs no index lists (an interrupted backup or prune; prune adopts or deletes).
    pub packs_unindexed: u64,
    pub index_objects: u64,
    /// Format-1 chunk objects (one object per chunk).
    pub chunk_objects: u64,
    pub packs_read: u64,
    /// Volume entry lists (version 4) read and checked, with read-data.
    pub entry_lists_checked: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// One line per problem, naming the snapshot, pack or chunk and the cause.
    pub problems: Vec<String>,
    pub requests: super::store::Requests,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub async fn check(
    store: &Store,
    keys: &Keys,
    read: impl Into<ReadData>,
    parallel: usize,
    progress: &Progress,
) -> Result<CheckReport> {
    super::fsio::limit_malloc_arenas();
    let read = read.into();
    let before = store.requests();
    let mut report = check_inner(store, keys, read, parallel, progress).await?;
    report.requests = store.requests().since(&before);
    Ok(report)
}

async fn check_inner(
    store: &Store,
    keys: &Keys,
    read: ReadData,
    parallel: usize,
    progress: &Progress,
) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    // chunk id → (length, first snapshot needing it: an index into `names`); a
    // volume of small files has hundreds of thousands of chunks, so no string each.
    let mut needed: BTreeMap<[u8; 32], (u64, u32)> = BTreeMap::new();
    // Sliced chunks (few: only changed small-file groups): the furthest end any
    // slice needs, checked against the chunk's length once the index is loaded.
    let mut slice_ends: BTreeMap<[u8; 32], (u64, u32)> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    let mut add = |m: &mut super::Manifest, id: &str, report: &mut CheckReport| {
        let n = names.len() as u32;
        names.push(id.to_string());
        for v in &mut m.volumes {
            for c in v.chunks.iter().chain(&v.meta) {
                match hex::decode(&c.0)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                {
                    Some(cid) => match c.2 {
                        None => {
                            let e = needed.entry(cid).or_insert((c.1, n));
                            e.0 = c.1;
                        }
                        Some(off) => {
                            needed.entry(cid).or_insert((0, n));
                            let end = off.saturating_add(c.1);
                            let e = slice_ends.entry(cid).or_insert((end, n));
                            if end > e.0 {
                                *e = (end, n);
                            }
                        }
                    },
                    None => report
                        .problems
                        .push(format!("snapshot {id}: bad chunk id {}", c.0)),
                }
            }
            // Only the entry lists are read again below.
            v.chunks = Vec::new();
        }
    };
    // Manifests are small (entry lists live in chunks since version 4).
    let mut manifests = Vec::new();
    for id in list_ids(store).await? {
        report.snapshots += 1;
        match load_manifest(store, keys, &id).await {
            Ok(mut m) => {
                add(&mut m, &id, &mut report);
                manifests.push(m);
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
        if let Ok(mut m) = load_manifest(store, keys, &h.id).await {
            report.snapshots += 1;
            add(&mut m, &h.id, &mut report);
            manifests.push(m);
        }
    }
    report.chunks_referenced = needed.len() as u64;

    let mut index = Index::load(store, keys).await?;
    report.problems.append(&mut index.problems);
    report.packs = index.packs.len() as u64;
    report.packs_unindexed = index.packs.iter().filter(|p| p.blobs.is_none()).count() as u64;
    report.index_objects = index.objects.len() as u64;
    report.chunk_objects = index.legacy.len() as u64;
    if needed.keys().any(|id| !index.contains(id)) && report.packs_unindexed > 0 {
        index.read_unindexed(store, keys).await?;
        report.problems.append(&mut index.problems);
    }
    let (in_bucket, unreferenced) = index.count_ids(|c| needed.contains_key(c));
    report.chunks_in_bucket = in_bucket;
    report.chunks_unreferenced = unreferenced;
    let names = &names;
    for (c, (_, snap)) in &needed {
        let snap = &names[*snap as usize];
        if !index.contains(c) {
            report.problems.push(format!(
                "snapshot {snap}: chunk {} is missing: {}",
                hex::encode(c),
                index.why_missing(c)
            ));
        }
    }
    for (c, (end, snap)) in &slice_ends {
        let snap = &names[*snap as usize];
        match index.locate(c) {
            Some(Location::Pack { blob, .. }) if u64::from(blob.plain) < *end => {
                report.problems.push(format!(
                    "snapshot {snap}: chunk {} holds {} bytes, a slice needs {end}",
                    hex::encode(c),
                    blob.plain
                ))
            }
            Some(Location::Object { .. }) => report.problems.push(format!(
                "snapshot {snap}: chunk {} is a format-1 object, which is never sliced",
                hex::encode(c)
            )),
            _ => {}
        }
    }
    if read == ReadData::None {
        return Ok(report);
    }
    // Every streamed entry list is read and checked the way restore checks it first.
    for m in &manifests {
        for v in m.volumes.iter().filter(|v| !v.meta.is_empty()) {
            let found = v
                .meta
                .iter()
                .filter_map(|c| hex::decode(&c.0).ok()?.try_into().ok())
                .all(|id: [u8; 32]| index.contains(&id));
            if !found {
                continue; // already named as missing above
            }
            match super::entries::check_volume(store, keys, &index, v).await {
                Ok(_) => report.entry_lists_checked += 1,
                Err(e) => report.problems.push(format!("snapshot {}: {e}", m.id)),
            }
        }
    }

    // Whole packs (every byte is checked, garbage included), then format-1 objects.
    let packs: Vec<usize> = (0..index.packs.len())
        .filter(|&i| index.packs[i].blobs.is_some() && read.picks())
        .collect();
    let legacy: Vec<([u8; 32], u64, String)> = needed
        .iter()
        .filter(|(c, _)| matches!(index.locate(c), Some(Location::Object { .. })))
        .filter(|_| read.picks())
        .map(|(c, (len, snap))| (*c, *len, names[*snap as usize].clone()))
        .collect();
    let total: u64 = packs.iter().map(|&i| index.packs[i].size).sum::<u64>()
        + legacy.iter().map(|l| l.1).sum::<u64>();
    let step = progress.step("check data", Some(total));
    // Whole packs are held while verified: as many at once as fit in 96 MiB (three
    // default packs, or one of the largest a profile allows), leaving room for the
    // chunk lists of a volume of millions of small files.
    let largest = packs
        .iter()
        .map(|&i| index.packs[i].size)
        .max()
        .unwrap_or(1);
    let at_once = ((96u64 << 20) / largest.max(1)).clamp(1, parallel.clamp(1, 3) as u64) as usize;
    let index = &index;
    let results: Vec<(u64, u64, Vec<String>)> = futures_util::stream::iter(packs)
        .map(|i| async move {
            let p = &index.packs[i];
            let mut problems = Vec::new();
            let mut chunks = 0;
            match store.get(&p.key, PACK_OBJECT_MAX).await {
                Ok(Some(bytes)) => {
                    let keys = keys.clone();
                    let expect = p.blobs.clone().unwrap_or_default();
                    let (key, id) = (p.key.clone(), p.id);
                    let r = tokio::task::spawn_blocking(move || {
                        verify_pack(&keys, &key, id, &bytes, &expect)
                    })
                    .await;
                    match r {
                        Ok((n, mut pr)) => {
                            chunks = n;
                            problems.append(&mut pr);
                        }
                        Err(e) => problems.push(format!("pack {}: verify task: {e}", p.key)),
                    }
                }
                Ok(None) => problems.push(format!("pack {} vanished while checking", p.key)),
                Err(e) => problems.push(format!("pack {}: {e}", p.key)),
            }
            (p.size, chunks, problems)
        })
        .buffer_unordered(at_once)
        .inspect(|(n, _, _)| step.inc(*n))
        .collect()
        .await;
    for (size, chunks, problems) in results {
        report.packs_read += 1;
        report.bytes_read += size;
        report.chunks_read += chunks;
        report.problems.extend(problems);
    }
    let results: Vec<(String, u64, Result<Vec<u8>>)> = futures_util::stream::iter(legacy)
        .map(|(c, len, snap)| async move {
            let r = fetch_chunk(store, keys, &ChunkRef::whole(hex::encode(c), len)).await;
            (snap, len, r.map(|_| Vec::new()))
        })
        .buffer_unordered(parallel.max(1))
        .inspect(|(_, len, _)| step.inc(*len))
        .collect()
        .await;
    step.finish();
    for (snap, len, r) in results {
        report.chunks_read += 1;
        report.bytes_read += len;
        if let Err(e) = r {
            report.problems.push(format!("snapshot {snap}: {e}"));
        }
    }
    Ok(report)
}

/// Verifies one whole pack; returns the chunks opened and the problems found.
fn verify_pack(
    keys: &Keys,
    key: &str,
    id: [u8; 32],
    bytes: &[u8],
    expect: &[super::pack::Blob],
) -> (u64, Vec<String>) {
    let mut problems = Vec::new();
    if keys.pack_id(bytes) != id {
        problems.push(format!(
            "pack {key}: its content does not match its name (corrupted or truncated)"
        ));
    }
    match parse_header(keys, bytes, bytes.len() as u64) {
        Ok(header) => {
            let a: HashSet<_> = header.iter().map(|b| (b.id, b.offset, b.sealed)).collect();
            let b: HashSet<_> = expect.iter().map(|b| (b.id, b.offset, b.sealed)).collect();
            if a != b {
                problems.push(format!("pack {key}: its header and the index disagree"));
            }
        }
        Err(e) => problems.push(format!("pack {key}: {e}")),
    }
    let mut opened = 0;
    for b in expect {
        let (at, end) = (b.offset as usize, b.end() as usize);
        let Some(sealed) = bytes.get(at..end) else {
            problems.push(format!(
                "pack {key}: chunk {} lies past its end (truncated)",
                hex::encode(b.id)
            ));
            continue;
        };
        match keys.open_chunk(&b.id, sealed, b.plain as usize) {
            Ok(_) => opened += 1,
            Err(e) => problems.push(format!("pack {key}: {e}")),
        }
    }
    (opened, problems)
}
