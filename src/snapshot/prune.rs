//! Retention: which snapshots to keep, then deleting the others and the chunks no
//! kept snapshot needs.
//!
//! Order makes it safe to interrupt at any point: manifests go first (a snapshot
//! disappears whole from listings), chunks after, and a chunk is deleted only when
//! every remaining manifest could be read and none references it. A kill between the
//! two steps leaves only unreferenced chunks, which the next prune removes.

use super::backup::{list_chunks, now_unix};
use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format::{self, civil};
use super::lock::{acquire, LockKind};
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
}

/// `grace_secs`: chunks uploaded less than this long ago (server time) are kept
/// ([`CHUNK_GRACE_SECS`] in production; tests pass 0).
///
/// Chunks are deleted only under the exclusive prune lock (see [`super::lock`]), so no
/// backup is re-using them meanwhile; the set of needed chunks is built after the lock
/// is held, from every manifest then listed, one manifest at a time, and the manifest
/// list is read once more after the chunk listing so that nothing published in
/// between can lose a chunk.
pub async fn prune(
    store: &Store,
    keys: &Keys,
    keep: &Retention,
    grace_secs: i64,
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
        "prune",
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
    let r = delete_orphans(store, keys, now, grace_secs, &mut report).await;
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
    report: &mut PruneReport,
) -> Result<bool> {
    for id in list_ids(store).await? {
        if !seen.insert(id.clone()) {
            continue;
        }
        match load_manifest(store, keys, &id).await {
            Ok(m) => needed.extend(m.chunk_ids().into_iter().filter_map(|c| {
                hex::decode(c)
                    .ok()
                    .and_then(|v| <[u8; 32]>::try_from(v).ok())
            })),
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

async fn delete_orphans(
    store: &Store,
    keys: &Keys,
    now: i64,
    grace_secs: i64,
    report: &mut PruneReport,
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut needed: HashSet<[u8; 32]> = HashSet::new();
    if !add_needed(store, keys, &mut seen, &mut needed, report).await? {
        return Ok(());
    }
    let listed = list_chunks(store).await?;
    if !add_needed(store, keys, &mut seen, &mut needed, report).await? {
        return Ok(());
    }
    let orphans: Vec<(String, u64)> = listed
        .into_iter()
        .filter(|(_, _, t)| t.is_none_or(|t| now - t >= grace_secs))
        .filter(|(id, _, _)| !needed.contains(id))
        .map(|(id, size, _)| (hex::encode(id), size))
        .collect();
    let results: Vec<(u64, Result<DeleteOutcome>)> = futures_util::stream::iter(orphans)
        .map(|(id, size)| async move {
            (
                size,
                store.delete(&format::chunk_key(&store.prefix, &id)).await,
            )
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (size, r) in results {
        match r? {
            DeleteOutcome::Deleted => {
                report.chunks_deleted += 1;
                report.bytes_deleted += size;
            }
            DeleteOutcome::Refused => report.refused += 1,
        }
    }
    Ok(())
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
