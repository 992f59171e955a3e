//! Retention: which snapshots to keep, then deleting the others and the chunks no
//! kept snapshot needs.
//!
//! Order makes it safe to interrupt at any point: manifests go first (a snapshot
//! disappears whole from listings), chunks after, and a chunk is deleted only when
//! every remaining manifest could be read and none references it. A kill between the
//! two steps leaves only unreferenced chunks, which the next prune removes.

use super::backup::now_unix;
use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format::{self, civil};
use super::lock::{acquire, LockKind};
use super::pack::{read_header, write_index, Blob, Index, Location, PackRec, Packer};
use super::restore::{list_ids, load_manifest};
use super::store::{DeleteOutcome, Store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};

/// Chunks younger than this are never deleted: a backup that lost its lock (or a
/// clock that is off) must not lose chunks it just uploaded.
pub const CHUNK_GRACE_SECS: i64 = 3600;

/// How many snapshots to keep: the newest `last`, plus the newest of each of the last
/// `daily` days, `weekly` ISO weeks and `monthly` months.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default)]
    pub last: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
}

/// Ids (with their times) to keep under `keep`; `snaps` in any order. Like restic's
/// policy: the newest `last`, then the newest snapshot of each of the newest `daily`
/// days, `weekly` ISO weeks and `monthly` months that have one. An all-zero policy
/// keeps everything, and the newest snapshot is always kept.
pub fn select_kept(snaps: &[(String, i64)], keep: &Retention) -> BTreeSet<String> {
    let mut sorted: Vec<&(String, i64)> = snaps.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    if keep.last == 0 && keep.daily == 0 && keep.weekly == 0 && keep.monthly == 0 {
        return sorted.iter().map(|s| s.0.clone()).collect();
    }
    let mut kept = BTreeSet::new();
    if let Some(newest) = sorted.first() {
        kept.insert(newest.0.clone());
    }
    for s in sorted.iter().take(keep.last as usize) {
        kept.insert(s.0.clone());
    }
    type Bucket = fn(i64) -> (i64, u32);
    let buckets: [(u32, Bucket); 3] = [
        (keep.daily, |t| (t.div_euclid(86_400), 0)),
        (keep.weekly, iso_week),
        (keep.monthly, |t| {
            let (y, m, ..) = civil(t);
            (y, m)
        }),
    ];
    for (n, key) in buckets {
        let mut seen = HashSet::new();
        for s in &sorted {
            if seen.len() >= n as usize {
                break;
            }
            if seen.insert(key(s.1)) {
                kept.insert(s.0.clone());
            }
        }
    }
    kept
}

/// (ISO year, ISO week) of a time.
pub fn iso_week(t: i64) -> (i64, u32) {
    let days = t.div_euclid(86_400);
    // 1970-01-01 was a Thursday; ISO weekday Monday=1..Sunday=7.
    let weekday = (days + 3).rem_euclid(7) + 1;
    // The Thursday of this week decides the ISO year.
    let thursday = days - weekday + 4;
    let (y, ..) = civil(thursday * 86_400);
    let jan1 = days_from_civil(y, 1, 1);
    (y, ((thursday - jan1) / 7 + 1) as u32)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub forgotten: Vec<String>,
    /// Deletes refused by the server (Object Lock).
    pub refused: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    /// Why chunk deletion was skipped, if it was.
    pub chunks_skipped: Option<String>,
    pub snapshots_left: u64,
    /// Snapshots the policy would forget but whose Object Lock still holds: kept
    /// until it ends (deleting would only hide them).
    pub locked_kept: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    /// New packs holding the chunks copied out of repacked ones.
    pub packs_written: u64,
    pub bytes_repacked: u64,
    /// Packs that would be deleted or repacked but are still under Object Lock.
    pub packs_locked_kept: u64,
    /// Of the packs repacked, those merged because they were small.
    pub packs_small: u64,
    /// Packs no index listed whose own header was read (and kept when needed).
    pub packs_adopted: u64,
    /// Garbage left inside kept packs (below the repack threshold, or locked).
    pub bytes_unused: u64,
    /// The consolidated index object written, and how many old ones it replaced.
    pub index_written: Option<String>,
    pub index_deleted: u64,
    /// Packs that could not be read or repacked; left alone.
    pub problems: Vec<String>,
    /// S3 requests the prune made, by kind, and bytes each way.
    pub requests: super::store::Requests,
}

/// How prune treats packs.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Chunks and packs uploaded less than this long ago (server time) are kept
    /// ([`CHUNK_GRACE_SECS`] in production; tests pass 0).
    pub grace_secs: i64,
    /// A pack with more than this share of garbage (bytes no kept snapshot needs) is
    /// rewritten without it. 25 %: stored garbage stays below a third of the data, and a
    /// prune never rewrites a pack to win back less than a quarter of it.
    pub repack_garbage_percent: u8,
    /// Size of the packs a repack writes.
    pub pack_target: usize,
}

pub const REPACK_GARBAGE_PERCENT: u8 = 25;
/// A pack smaller than the pack size divided by this is "small" (merged with others).
pub const SMALL_PACK_DIVISOR: usize = 4;

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace_secs: CHUNK_GRACE_SECS,
            repack_garbage_percent: REPACK_GARBAGE_PERCENT,
            pack_target: super::pack::PACK_TARGET,
        }
    }
}

impl PruneOptions {
    /// No grace period (tests that prune right after a backup).
    pub fn no_grace() -> Self {
        PruneOptions {
            grace_secs: 0,
            ..Default::default()
        }
    }
}

/// Chunks are deleted only under the exclusive prune lock (see [`super::lock`]), so no
/// backup is re-using them meanwhile; the set of needed chunks is built after the lock
/// is held, from every manifest then listed, one manifest at a time, and the manifest
/// list is read once more after the index is loaded so that nothing published in
/// between can lose a chunk.
///
/// Packs are then sorted into kept, deleted (nothing in them is needed) and repacked
/// (more than `repack_garbage_percent` garbage: the needed chunks are copied, verified,
/// into new packs). Order makes every step safe to interrupt: new packs, then one
/// index object listing every surviving pack, then deleting the old index objects,
/// then the old packs. Packs no index lists are read through their own header and
/// kept when they hold anything needed.
pub async fn prune(
    store: &Store,
    keys: &Keys,
    keep: &Retention,
    opts: &PruneOptions,
) -> Result<PruneReport> {
    super::fsio::limit_malloc_arenas();
    let requests_before = store.requests();
    let mut report = prune_inner(store, keys, keep, opts).await?;
    report.requests = store.requests().since(&requests_before);
    Ok(report)
}

async fn prune_inner(
    store: &Store,
    keys: &Keys,
    keep: &Retention,
    opts: &PruneOptions,
) -> Result<PruneReport> {
    let now = now_unix();
    let ids = list_ids(store).await?;
    let mut times = Vec::new();
    let mut locked = HashSet::new();
    let mut unreadable = Vec::new();
    for id in &ids {
        match load_manifest(store, keys, id).await {
            Ok(m) => {
                // A delete of a locked manifest only hides it behind a delete marker;
                // never doing that ourselves makes every hidden locked manifest a
                // sign that someone else did (see restore::hidden_snapshots).
                if m.locked_until.is_some_and(|t| t > now) {
                    locked.insert(id.clone());
                }
                times.push((id.clone(), m.time));
            }
            Err(e) => unreadable.push((id.clone(), e.to_string())),
        }
    }
    let kept = select_kept(&times, keep);
    let mut report = PruneReport {
        kept: kept.iter().cloned().collect(),
        ..Default::default()
    };
    // Unreadable manifests are never deleted: they may be someone's only copy and
    // deciding about them needs a human (wrong key? another host's prefix?).
    let forget: Vec<&String> = times
        .iter()
        .map(|r| &r.0)
        .filter(|id| !kept.contains(*id) && !locked.contains(*id))
        .collect();
    report.locked_kept = locked.iter().filter(|id| !kept.contains(*id)).count() as u64;
    let outcomes: Vec<(String, Result<DeleteOutcome>)> = futures_util::stream::iter(forget)
        .map(|id| async move {
            let key = format::snapshot_key(&store.prefix, id);
            (id.clone(), store.delete(&key).await)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut still_listed: HashSet<String> = kept.clone().into_iter().chain(locked).collect();
    for (id, r) in outcomes {
        match r? {
            DeleteOutcome::Deleted => report.forgotten.push(id),
            DeleteOutcome::Refused => {
                report.refused += 1;
                still_listed.insert(id);
            }
        }
    }
    report.forgotten.sort();
    report.snapshots_left = (still_listed.len() + unreadable.len()) as u64;

    if !unreadable.is_empty() {
        report.chunks_skipped = Some(format!(
            "{} manifest(s) cannot be read (first: {}): their chunks are unknown",
            unreadable.len(),
            unreadable[0].1
        ));
        return Ok(report);
    }
    let lock = match acquire(
        store,
        LockKind::Prune,
        &format::new_snapshot_id(super::backup::now_unix_ms()),
        keys.host().unwrap_or("prune"),
        std::time::Duration::ZERO,
    )
    .await
    {
        Ok(l) => l,
        Err(SnapshotError::Locked { key, .. }) => {
            report.chunks_skipped = Some(format!(
                "a backup is running ({key}): chunks are left for the next prune"
            ));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let r = collect_garbage(store, keys, now, opts, &mut report).await;
    lock.release().await;
    r.map(|()| report)
}

/// Adds the chunk ids of every listed manifest not in `seen` to `needed`; false when
/// one cannot be read (its chunks are then unknown and nothing may be deleted).
async fn add_needed(
    store: &Store,
    keys: &Keys,
    seen: &mut HashSet<String>,
    needed: &mut HashSet<[u8; 32]>,
    host: &mut Option<String>,
    report: &mut PruneReport,
) -> Result<bool> {
    for id in list_ids(store).await? {
        if !seen.insert(id.clone()) {
            continue;
        }
        match load_manifest(store, keys, &id).await {
            Ok(m) => {
                host.get_or_insert_with(|| m.host.clone());
                needed.extend(m.chunk_ids().into_iter().filter_map(|c| {
                    hex::decode(c)
                        .ok()
                        .and_then(|v| <[u8; 32]>::try_from(v).ok())
                }))
            }
            Err(e) => {
                report.chunks_skipped = Some(format!(
                    "manifest {id} cannot be read ({e}): its chunks are unknown"
                ));
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Delete,
    Repack,
    /// Too young, or not readable: not touched and not in the new index.
    Leave,
}

async fn collect_garbage(
    store: &Store,
    keys: &Keys,
    now: i64,
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut needed: HashSet<[u8; 32]> = HashSet::new();
    let mut host = keys.host().map(str::to_string);
    if !add_needed(store, keys, &mut seen, &mut needed, &mut host, report).await? {
        return Ok(());
    }
    let mut index = Index::load(store, keys).await?;
    if !add_needed(store, keys, &mut seen, &mut needed, &mut host, report).await? {
        return Ok(());
    }
    if let Some(p) = index.problems.first() {
        report.chunks_skipped = Some(format!(
            "{} index problem(s) (first: {p}): where chunks are is uncertain, nothing deleted",
            index.problems.len()
        ));
        return Ok(());
    }
    let young = |t: Option<i64>| t.is_some_and(|t| now - t < opts.grace_secs);

    // Format-1 chunk objects no snapshot needs.
    let orphans: Vec<(String, u64)> = index
        .legacy
        .iter()
        .filter(|(id, (_, t))| !young(*t) && !needed.contains(*id))
        .map(|(id, (size, _))| (format::chunk_key(&store.prefix, &hex::encode(id)), *size))
        .collect();
    for (size, r) in delete_all(store, orphans).await {
        match r? {
            DeleteOutcome::Deleted => {
                report.chunks_deleted += 1;
                report.bytes_deleted += size;
            }
            DeleteOutcome::Refused => report.refused += 1,
        }
    }

    // Packs no index lists: a backup or prune that died before its index, or lost
    // index objects. Their own header says what they hold.
    let mut fate = vec![Fate::Keep; index.packs.len()];
    for (i, f) in fate.iter_mut().enumerate() {
        if index.packs[i].blobs.is_some() {
            continue;
        }
        let p = &index.packs[i];
        if young(p.last_modified) {
            *f = Fate::Leave;
            continue;
        }
        let (key, size) = (p.key.clone(), p.size);
        match read_header(store, keys, &key, size).await {
            Ok(blobs) => {
                index.adopt(i, blobs);
                report.packs_adopted += 1;
            }
            Err(e) => {
                // Not ours, or damaged: a human decides, we never delete it.
                report.problems.push(e.to_string());
                *f = Fate::Leave;
            }
        }
    }

    // Which copy of each needed chunk counts (the index's choice), and so how much of
    // each pack is still needed.
    let mut used = vec![0u64; index.packs.len()];
    let mut keep_blobs: Vec<Vec<Blob>> = vec![Vec::new(); index.packs.len()];
    for id in &needed {
        if let Some(Location::Pack { pack, blob }) = index.locate(id) {
            used[pack] += u64::from(blob.sealed);
            keep_blobs[pack].push(blob);
        }
    }
    let mut garbage_of = vec![0u64; index.packs.len()];
    for (i, p) in index.packs.iter().enumerate() {
        if fate[i] == Fate::Leave {
            continue;
        }
        let total: u64 = p.blobs.iter().flatten().map(|b| u64::from(b.sealed)).sum();
        let garbage = total - used[i].min(total);
        fate[i] = if young(p.last_modified) {
            Fate::Keep
        } else if used[i] == 0 {
            Fate::Delete
        } else if garbage * 100 > total * u64::from(opts.repack_garbage_percent) {
            Fate::Repack
        } else {
            Fate::Keep
        };
        garbage_of[i] = garbage;
    }
    // Small packs (an incremental backup of a few MB makes one each) are merged once
    // there are two: the object count stays near bytes / pack size, and each merge
    // rewrites only data that is itself small.
    let small: Vec<usize> = (0..index.packs.len())
        .filter(|&i| {
            fate[i] == Fate::Keep
                && index.packs[i].blobs.is_some()
                && !young(index.packs[i].last_modified)
                && index.packs[i].size < (opts.pack_target / SMALL_PACK_DIVISOR) as u64
        })
        .collect();
    let mut is_small = vec![false; index.packs.len()];
    if small.len() >= 2 {
        for &i in &small {
            fate[i] = Fate::Repack;
            is_small[i] = true;
        }
    }
    // Object Lock: a pack still under retention can neither be deleted nor replaced
    // (a delete would only hide it); it stays until its date.
    if store.object_lock_days.is_some() {
        for (i, p) in index.packs.iter().enumerate() {
            if matches!(fate[i], Fate::Delete | Fate::Repack)
                && store.retention(&p.key).await?.is_some_and(|t| t > now)
            {
                fate[i] = Fate::Keep;
                report.packs_locked_kept += 1;
            }
        }
    }

    // Copy the needed chunks of the packs to repack, verified, into new packs.
    let mut packer = Packer::new(store, keys, opts.pack_target, 2, now);
    for i in 0..index.packs.len() {
        if fate[i] != Fate::Repack {
            continue;
        }
        match copy_blobs(
            store,
            keys,
            &index.packs[i].key,
            &mut keep_blobs[i],
            &mut packer,
        )
        .await
        {
            Ok(n) => {
                report.packs_repacked += 1;
                report.bytes_repacked += n;
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("repack of {} skipped: {e}", index.packs[i].key));
                fate[i] = Fate::Keep;
            }
        }
    }
    let (new_packs, _) = packer.finish().await?;
    report.packs_written = new_packs.len() as u64;
    for (i, f) in fate.iter().enumerate() {
        match f {
            Fate::Keep => report.bytes_unused += garbage_of[i],
            Fate::Repack if is_small[i] => report.packs_small += 1,
            _ => {}
        }
    }

    let changed = fate
        .iter()
        .any(|f| matches!(f, Fate::Delete | Fate::Repack))
        || report.packs_adopted > 0
        || index.objects.len() > 1;
    if !changed {
        return Ok(());
    }
    let Some(host) = host else {
        // No manifest at all and no host bound: nothing is needed; leave the packs to
        // a prune that knows whose they are.
        report.chunks_skipped = Some("no snapshot names the host; packs left".into());
        return Ok(());
    };
    let mut survivors: Vec<PackRec> = index
        .packs
        .iter()
        .zip(&fate)
        .filter(|(p, f)| **f == Fate::Keep && p.blobs.is_some())
        .map(|(p, _)| PackRec {
            id: p.id,
            blobs: p.blobs.clone().unwrap_or_default(),
        })
        .collect();
    survivors.extend(new_packs);
    let new_id = format::new_snapshot_id(super::backup::now_unix_ms());
    let new_key = write_index(store, keys, &host, &new_id, &survivors, now).await?;
    report.index_written = Some(new_key.clone());
    let old: Vec<(String, u64)> = index
        .objects
        .iter()
        .filter(|k| **k != new_key)
        .map(|k| (k.clone(), 0))
        .collect();
    for (_, r) in delete_all(store, old).await {
        match r? {
            DeleteOutcome::Deleted => report.index_deleted += 1,
            DeleteOutcome::Refused => report.refused += 1,
        }
    }
    let doomed: Vec<(String, u64)> = index
        .packs
        .iter()
        .zip(&fate)
        .filter(|(_, f)| matches!(f, Fate::Delete | Fate::Repack))
        .map(|(p, _)| (p.key.clone(), p.size))
        .collect();
    for (size, r) in delete_all(store, doomed).await {
        match r? {
            DeleteOutcome::Deleted => {
                report.packs_deleted += 1;
                report.bytes_deleted += size;
            }
            DeleteOutcome::Refused => report.refused += 1,
        }
    }
    Ok(())
}

async fn delete_all(store: &Store, keys: Vec<(String, u64)>) -> Vec<(u64, Result<DeleteOutcome>)> {
    futures_util::stream::iter(keys)
        .map(|(key, size)| async move { (size, store.delete(&key).await) })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Reads `blobs` of one pack (merged ranged GETs), verifies each chunk, and adds the
/// sealed bytes unchanged to `packer`. Returns the bytes copied.
async fn copy_blobs(
    store: &Store,
    keys: &Keys,
    key: &str,
    blobs: &mut [Blob],
    packer: &mut Packer,
) -> Result<u64> {
    blobs.sort_by_key(|b| b.offset);
    let mut copied = 0;
    let mut i = 0;
    while i < blobs.len() {
        let start = u64::from(blobs[i].offset);
        let mut j = i + 1;
        while j < blobs.len() && blobs[j].end() - start <= super::restore::RANGE_MAX {
            j += 1;
        }
        let end = blobs[j - 1].end();
        let bytes = store
            .get_range(key, start, end - start)
            .await?
            .ok_or_else(|| SnapshotError::Other(format!("pack {key} vanished")))?;
        for b in &blobs[i..j] {
            let at = (u64::from(b.offset) - start) as usize;
            let sealed = &bytes[at..at + b.sealed as usize];
            keys.open_chunk(&b.id, sealed, b.plain as usize)?;
            packer.add(b.id, b.plain as usize, sealed).await?;
            copied += u64::from(b.sealed);
        }
        i = j;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_weeks() {
        // 2021-01-03 (Sunday) is in 2020-W53; 2021-01-04 starts 2021-W01.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3) * 86_400), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4) * 86_400), (2021, 1));
        assert_eq!(iso_week(days_from_civil(2026, 11, 21) * 86_400), (2026, 47));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn policy() {
        // one snapshot every 6 hours for 90 days
        let snaps: Vec<(String, i64)> = (0..360)
            .map(|i| (format!("s{i:03}"), 1_700_000_000 + i * 6 * 3600))
            .collect();
        let k = select_kept(
            &snaps,
            &Retention {
                last: 2,
                daily: 7,
                weekly: 4,
                monthly: 3,
            },
        );
        assert!(k.contains("s359") && k.contains("s358"));
        assert!(k.len() <= 2 + 7 + 4 + 3);
        assert!(k.len() >= 7);
        let all = select_kept(&snaps, &Retention::default());
        assert_eq!(all.len(), 360);
        let one = select_kept(
            &snaps,
            &Retention {
                last: 0,
                daily: 1,
                weekly: 0,
                monthly: 0,
            },
        );
        assert_eq!(one.len(), 1);
    }
}
