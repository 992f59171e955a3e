//! Locks between backups and the chunk-deleting phase of prune.
//!
//! A backup re-uses chunks already in the bucket without uploading them again, so a
//! prune that deletes unreferenced chunks while a backup runs can delete chunks the
//! backup's manifest is about to reference. Backups take shared locks, the deleting
//! phase of prune an exclusive one, with the usual protocol for a store that has no
//! compare-and-swap: write your own lock object, then list the others; whoever finds
//! a conflicting live lock withdraws. Two that start together may both withdraw, never
//! both proceed (S3 listings are read-after-write consistent on every server we
//! support). A running holder refreshes its lock, so only a crashed one goes stale.
//!
//! A lock records the holder's pid and the kernel's boot id. A lock written during
//! this very boot whose process no longer runs is dead at once (a killed prune must not
//! hold the next backups for hours); anything else waits out [`LOCK_STALE_SECS`], as
//! another machine (an old server still running beside its replacement) may hold it.

use super::error::{Result, SnapshotError};
use super::format;
use super::store::Store;
use std::time::Duration;

/// A lock not refreshed for this long belongs to a process that died.
pub const LOCK_STALE_SECS: i64 = 6 * 3600;
/// How often a holder rewrites its lock: far inside the staleness window, so even a
/// 500 GB first upload taking a day keeps its lock live.
pub const LOCK_REFRESH: Duration = Duration::from_secs(15 * 60);
/// Name prefix of prune locks inside `locks/` (backup locks are named by snapshot id,
/// which older versions' prunes already honour).
const PRUNE_PREFIX: &str = "prune-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Backup,
    Prune,
}

/// A lock we hold; [`Held::release`] deletes it (a crash leaves it to go stale).
pub struct Held {
    store: Store,
    key: String,
    refresher: tokio::task::JoinHandle<()>,
}

impl Held {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn release(self) {
        self.refresher.abort();
        let _ = self.store.delete(&self.key).await;
    }
}

/// This boot's id: the same on every process of one boot, new at every boot.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Was this lock written during this boot by a process that has exited?
async fn held_by_dead_process(store: &Store, key: &str) -> bool {
    let Some(mine) = boot_id() else { return false };
    let Ok(Some(body)) = store.get(key, 64 * 1024).await else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return false;
    };
    let (Some(boot), Some(pid)) = (v["boot_id"].as_str(), v["pid"].as_u64()) else {
        return false;
    };
    if boot != mine || pid == u64::from(std::process::id()) || pid == 0 || pid > i32::MAX as u64 {
        return false;
    }
    // kill(pid, 0) probes without signalling; ESRCH means no such process. A reused
    // pid only makes us wait for staleness, never treat a live lock as dead.
    // SAFETY: signal 0 sends nothing.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Live locks of the kind that conflicts with `kind`, other than `mine`. Locks of
/// exited processes of this boot are deleted on the way.
async fn conflicting(store: &Store, kind: LockKind, mine: &str) -> Result<Vec<String>> {
    let mut live = Vec::new();
    for key in conflicting_listed(store, kind, mine).await? {
        if held_by_dead_process(store, &key).await {
            let _ = store.delete(&key).await;
        } else {
            live.push(key);
        }
    }
    Ok(live)
}

async fn conflicting_listed(store: &Store, kind: LockKind, mine: &str) -> Result<Vec<String>> {
    let dir = format::locks_dir(&store.prefix);
    let now = super::backup::now_unix();
    Ok(store
        .list(&dir)
        .await?
        .into_iter()
        .filter(|o| o.key != mine)
        .filter(|o| o.last_modified.is_none_or(|t| now - t < LOCK_STALE_SECS))
        .filter(|o| {
            let is_prune = o
                .key
                .strip_prefix(&dir)
                .is_some_and(|n| n.starts_with(PRUNE_PREFIX));
            match kind {
                // backups only mind prunes; prunes mind everything else
                LockKind::Backup => is_prune,
                LockKind::Prune => true,
            }
        })
        .map(|o| o.key)
        .collect())
}

/// Takes a lock named after `id`. A backup waits up to `wait` for a running prune to
/// finish; a prune never waits (it leaves the chunks for its next run).
pub async fn acquire(
    store: &Store,
    kind: LockKind,
    id: &str,
    host: &str,
    wait: Duration,
) -> Result<Held> {
    let name = match kind {
        LockKind::Backup => id.to_string(),
        LockKind::Prune => format!("{PRUNE_PREFIX}{id}"),
    };
    let key = format::lock_key(&store.prefix, &name);
    let body = serde_json::json!({
        "host": host,
        "kind": format!("{kind:?}").to_lowercase(),
        "pid": std::process::id(),
        "boot_id": boot_id(),
    })
    .to_string()
    .into_bytes();
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(500);
    loop {
        store.put(&key, body.clone(), false, None).await?;
        let others = conflicting(store, kind, &key).await?;
        if others.is_empty() {
            let (s, k, b) = (store.clone(), key.clone(), body.clone());
            let refresher = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LOCK_REFRESH).await;
                    // A failed refresh is retried at the next tick; the lock only goes
                    // stale after many missed ones.
                    let _ = s.put(&k, b.clone(), false, None).await;
                }
            });
            return Ok(Held {
                store: store.clone(),
                key,
                refresher,
            });
        }
        let _ = store.delete(&key).await;
        if kind == LockKind::Prune || started.elapsed() >= wait {
            return Err(SnapshotError::Locked {
                key: others[0].clone(),
                waited_secs: started.elapsed().as_secs(),
            });
        }
        // Jitter keeps two backups that back off together from retrying in lockstep.
        let jitter = Duration::from_millis(u64::from(super::crypto::random_u16()) % 500);
        tokio::time::sleep(pause + jitter).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
