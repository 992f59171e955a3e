//! Listing, loading and restoring snapshots.
//!
//! Chunks are fetched in parallel but consumed in stream order by one writer thread;
//! at most `parallel` fetched chunks plus a small queue are in memory at once, so the
//! peak stays near `parallel × 2 × CHUNK_MAX` whatever the snapshot size.

use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format::{self, ChunkRef, Manifest, Volume};
use super::fsio::{self, WriteOptions};
use super::store::Store;
use crate::progress::Progress;
use futures_util::StreamExt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::sync::mpsc;

/// Snapshot ids in the bucket, oldest first (ids sort by time).
pub async fn list_ids(store: &Store) -> Result<Vec<String>> {
    let dir = format::snapshots_dir(&store.prefix);
    let mut ids: Vec<String> = store
        .list(&dir)
        .await?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(&dir).map(str::to_string))
        .filter(|id| format::is_snapshot_id(id))
        .collect();
    ids.sort();
    Ok(ids)
}

/// A snapshot whose manifest a delete marker hides while its Object Lock still
/// holds. Our prune never forgets a locked manifest, so this is someone else's doing:
/// tampering (or a mistake) that restore, check and the drill name loudly.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HiddenSnapshot {
    pub id: String,
    pub version_id: String,
    pub locked_until: i64,
}

/// Locked manifests hidden by a delete marker (empty on servers without versions).
pub async fn hidden_snapshots(store: &Store) -> Result<Vec<HiddenSnapshot>> {
    let dir = format::snapshots_dir(&store.prefix);
    let now = super::backup::now_unix();
    Ok(store
        .hidden_versions(&dir)
        .await?
        .into_iter()
        .filter_map(|h| {
            let id = h.key.strip_prefix(&dir)?.to_string();
            let until = h.retain_until.filter(|t| *t > now)?;
            format::is_snapshot_id(&id).then_some(HiddenSnapshot {
                id,
                version_id: h.version_id,
                locked_until: until,
            })
        })
        .collect())
}

/// Fetches, verifies (signature, then decryption) and parses one manifest. A
/// manifest hidden by a delete marker (see [`hidden_snapshots`]) is still found by
/// its id, so `--snapshot ID` restores it.
pub async fn load_manifest(store: &Store, keys: &Keys, id: &str) -> Result<Manifest> {
    let key = format::snapshot_key(&store.prefix, id);
    let bytes = match store.get(&key, format::MANIFEST_OBJECT_MAX).await? {
        Some(b) => b,
        None => {
            let hidden = store
                .hidden_versions(&key)
                .await?
                .into_iter()
                .find(|h| h.key == key)
                .ok_or_else(|| SnapshotError::NoSuchSnapshot(id.to_string()))?;
            store
                .get_version(&key, &hidden.version_id, format::MANIFEST_OBJECT_MAX)
                .await?
        }
    };
    let (json, signed_host) = keys.open_manifest(id, &store.prefix, &bytes)?;
    let m: Manifest = serde_json::from_slice(&json).map_err(|e| SnapshotError::BadManifest {
        id: id.to_string(),
        reason: e.to_string(),
    })?;
    if let Some(h) = signed_host.filter(|h| *h != m.host) {
        return Err(SnapshotError::BadManifest {
            id: id.to_string(),
            reason: format!("signed for host {h} but names host {}", m.host),
        });
    }
    // v1 manifests sign only their id; the host check still stops one host (or
    // environment) sharing keys with another from restoring the other's data.
    if let Some(expected) = keys.host().filter(|h| *h != m.host) {
        return Err(SnapshotError::BadManifest {
            id: id.to_string(),
            reason: format!(
                "written by host {}, not {expected} (copied from another host or environment?)",
                m.host
            ),
        });
    }
    if m.id != id {
        return Err(SnapshotError::BadManifest {
            id: id.to_string(),
            reason: format!("names itself {}", m.id),
        });
    }
    m.validate().map_err(|reason| SnapshotError::BadManifest {
        id: id.to_string(),
        reason,
    })?;
    Ok(m)
}

/// A newer snapshot that was passed over, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

/// Failures of a manifest itself: what the bucket holds is wrong, retrying cannot help,
/// and an older snapshot may be the right answer. Anything else (a connection reset, a
/// 5xx, a timeout) says nothing about the snapshot and must never make us restore
/// older data.
fn is_integrity(e: &SnapshotError) -> bool {
    matches!(
        e,
        SnapshotError::BadSignature { .. }
            | SnapshotError::WrongKey { .. }
            | SnapshotError::BadManifest { .. }
    )
}

/// The newest snapshot whose manifest verifies, with the newer ones skipped because
/// they failed an integrity check; `Ok(None)` for an empty prefix. A transport error on
/// any manifest is returned as it is: falling back past a snapshot we merely could not
/// download would silently bring back older data. When snapshots exist but none
/// verifies, the newest one's error is returned (it is the one the user expected).
pub async fn newest_manifest(
    store: &Store,
    keys: &Keys,
) -> Result<Option<(Manifest, Vec<Skipped>)>> {
    let ids = list_ids(store).await?;
    let mut skipped = Vec::new();
    let mut first_err = None;
    for id in ids.iter().rev() {
        match load_manifest(store, keys, id).await {
            Ok(m) => return Ok(Some((m, skipped))),
            Err(e) if is_integrity(&e) => {
                skipped.push(Skipped {
                    id: id.clone(),
                    reason: e.to_string(),
                });
                first_err.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// [`newest_manifest`] without the list of skipped snapshots.
pub async fn latest_manifest(store: &Store, keys: &Keys) -> Result<Option<Manifest>> {
    Ok(newest_manifest(store, keys).await?.map(|(m, _)| m))
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub parallel: usize,
    pub progress: Progress,
    pub write: WriteOptions,
    /// Only these volumes (all when empty).
    pub volumes: Vec<String>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            parallel: 16,
            progress: Progress::quiet(),
            write: WriteOptions::default(),
            volumes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub id: String,
    pub time: i64,
    pub bytes: u64,
    pub files: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

/// Restores every volume of `m` as `<into>/<volume>/_data` (podman's layout).
/// `into/<volume>` must not exist.
pub async fn restore(
    store: &Store,
    keys: &Keys,
    m: &Manifest,
    into: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let start = Instant::now();
    let mut bytes = 0;
    let mut files = 0;
    let mut warnings = Vec::new();
    for v in &m.volumes {
        if !opts.volumes.is_empty() && !opts.volumes.contains(&v.name) {
            continue;
        }
        let vdir = into.join(&v.name);
        std::fs::create_dir_all(into).map_err(|e| SnapshotError::io(into, e))?;
        std::fs::create_dir(&vdir).map_err(|e| SnapshotError::io(&vdir, e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| SnapshotError::io(&vdir, e))?;
        let w = restore_volume(store, keys, v, &vdir.join("_data"), opts).await?;
        warnings.extend(w.into_iter().map(|w| format!("{}: {w}", v.name)));
        bytes += v.stream_bytes;
        files += v
            .entries
            .iter()
            .filter(|e| e.kind == format::Kind::File)
            .count() as u64;
    }
    Ok(RestoreReport {
        id: m.id.clone(),
        time: m.time,
        bytes,
        files,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Fetches one chunk and verifies it completely (AEAD tag, length, keyed hash) before
/// anything is written. Transient S3 errors are retried; missing and corrupt are not.
pub async fn fetch_chunk(store: &Store, keys: &Keys, c: &ChunkRef) -> Result<Vec<u8>> {
    if c.1 > u64::from(super::backup::CHUNK_MAX) {
        return Err(SnapshotError::CorruptChunk {
            id: c.0.clone(),
            reason: format!(
                "the manifest gives it {} bytes, more than any chunk holds",
                c.1
            ),
        });
    }
    let id: [u8; 32] = hex::decode(&c.0)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| SnapshotError::CorruptChunk {
            id: c.0.clone(),
            reason: "bad id".into(),
        })?;
    let key = format::chunk_key(&store.prefix, &c.0);
    let mut attempt = 0;
    let sealed = loop {
        match store.get(&key, c.1 + super::crypto::CHUNK_OVERHEAD).await {
            Ok(Some(b)) => break b,
            Ok(None) => {
                return Err(SnapshotError::MissingChunk {
                    id: c.0.clone(),
                    key,
                })
            }
            // The SDK retries requests, not a body cut mid-stream: retry those here.
            Err(e) if attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500 << attempt)).await;
                let _ = e;
            }
            Err(e) => return Err(e),
        }
    };
    let keys = keys.clone();
    let len = c.1 as usize;
    tokio::task::spawn_blocking(move || keys.open_chunk(&id, &sealed, len))
        .await
        .map_err(|e| SnapshotError::Other(format!("verify task: {e}")))?
}

/// A `BufRead` over verified chunks arriving in order from the fetchers.
struct ChunkStream {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChunkStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkStream {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos >= self.cur.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                None => return Ok(&[]),
            }
        }
        Ok(&self.cur[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

async fn restore_volume(
    store: &Store,
    keys: &Keys,
    v: &Volume,
    root: &Path,
    opts: &RestoreOptions,
) -> Result<Vec<String>> {
    let step = opts
        .progress
        .step(&format!("restore {}", v.name), Some(v.stream_bytes));
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let entries = v.entries.clone();
    let root: PathBuf = root.to_path_buf();
    let write = opts.write;
    let (ptx, mut prx) = mpsc::unbounded_channel::<u64>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut stream = ChunkStream {
            rx,
            cur: Vec::new(),
            pos: 0,
        };
        fsio::write_volume(&root, &entries, &mut stream, write, |n| {
            let _ = ptx.send(n);
        })
    });
    let mut fetches = futures_util::stream::iter(v.chunks.iter())
        .map(|c| fetch_chunk(store, keys, c))
        .buffered(opts.parallel.max(1));
    let mut failure = None;
    while let Some(r) = fetches.next().await {
        while let Ok(n) = prx.try_recv() {
            step.inc(n);
        }
        match r {
            Ok(data) => {
                if tx.send(data).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(fetches);
    drop(tx);
    let written = writer
        .await
        .map_err(|e| SnapshotError::Other(format!("writer task: {e}")))?;
    step.finish();
    // A fetch failure makes the writer see a short stream; the fetch error is the cause.
    if let Some(e) = failure {
        return Err(e);
    }
    written
}
