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

/// Live locks of the kind that conflicts with `kind`, other than `mine`.
async fn conflicting(store: &Store, kind: LockKind, mine: &str) -> Result<Vec<String>> {
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
