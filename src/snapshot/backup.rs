//! Making a snapshot: scan each volume, chunk its stream, upload the chunks the bucket
//! lacks (in parallel), then the signed manifest — last, and only if everything before
//! it succeeded, so a listed snapshot is always complete.

use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format::{self, ChunkRef, Chunker, Manifest, Stats, Volume, MANIFEST_VERSION};
use super::fsio;
use super::pack::{self, Index, Packer};
use super::store::{PutOutcome, Requests, Store};
use crate::progress::Progress;
use fastcdc::v2020::{Normalization, StreamCDC};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Chunk sizes: restic's average (1 MiB) keeps the object count, and so per-request
/// overhead, low; the 256 KiB minimum bounds the cost of small edits.
pub const CHUNK_MIN: u32 = 256 * 1024;
pub const CHUNK_AVG: u32 = 1024 * 1024;
pub const CHUNK_MAX: u32 = 4 * 1024 * 1024;
use super::lock::LockKind;
/// Locks older than this belong to a backup that died; prune ignores them.
pub use super::lock::LOCK_STALE_SECS;
/// How long a backup waits for a running prune to finish deleting chunks.
const PRUNE_WAIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// A volume to snapshot: its name and the directory holding its contents
/// (podman's `<volume>/_data`).
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub root: PathBuf,
}

/// Called around each volume (stop units / run a hook, then start them again).
pub trait VolumeHooks: Send {
    fn before(&mut self, volume: &str) -> Result<()>;
    fn after(&mut self, volume: &str);
}

pub struct NoHooks;
impl VolumeHooks for NoHooks {
    fn before(&mut self, _: &str) -> Result<()> {
        Ok(())
    }
    fn after(&mut self, _: &str) {}
}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub host: String,
    /// Chunks compressed and sealed at once.
    pub parallel: usize,
    pub progress: Progress,
    /// Pack size to aim for ([`pack::PACK_TARGET`] unless the profile says otherwise).
    pub pack_target: usize,
}

impl BackupOptions {
    pub fn new(host: &str) -> BackupOptions {
        BackupOptions {
            host: host.to_string(),
            parallel: 4,
            progress: Progress::quiet(),
            pack_target: pack::PACK_TARGET,
        }
    }
}

/// Packs uploaded at once: each is tens of MiB, two keep a link busy.
const PACK_UPLOADS: usize = 2;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub id: String,
    pub time: i64,
    pub stats: Stats,
    pub warnings: Vec<String>,
    pub locked_until: Option<i64>,
    /// With Object Lock configured: whether the bucket was seen to enforce it (its
    /// configuration, and the retention read back from the manifest just written).
    pub object_lock_enforced: Option<bool>,
    /// S3 requests this backup made, by kind, and bytes each way.
    pub requests: Requests,
}

pub fn now_unix() -> i64 {
    now_unix_ms().div_euclid(1000)
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn parse_chunk_key(key: &str) -> Option<[u8; 32]> {
    let id = key.rsplit('/').next()?;
    hex::decode(id).ok()?.try_into().ok()
}

/// Every chunk id present under `chunks/`.
pub async fn list_chunks(store: &Store) -> Result<Vec<([u8; 32], u64, Option<i64>)>> {
    Ok(store
        .list(&format::chunks_dir(&store.prefix))
        .await?
        .into_iter()
        .filter_map(|o| parse_chunk_key(&o.key).map(|id| (id, o.size, o.last_modified)))
        .collect())
}

pub async fn backup(
    store: &Store,
    keys: &Keys,
    sources: &[Source],
    hooks: &mut dyn VolumeHooks,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    if !keys.can_sign() {
        return Err(SnapshotError::Other(
            "the snapshot signing key is missing: cannot write snapshots".into(),
        ));
    }
    let started = Instant::now();
    let requests_before = store.requests();
    let now_ms = now_unix_ms();
    let now = now_ms.div_euclid(1000);
    let id = format::new_snapshot_id(now_ms);
    let lock = super::lock::acquire(store, LockKind::Backup, &id, &opts.host, PRUNE_WAIT).await?;
    let result = backup_locked(store, keys, sources, hooks, opts, &id, now, started).await;
    // A lock left by a crash only delays chunk garbage collection until it is stale.
    lock.release().await;
    result.map(|mut r| {
        r.requests = store.requests().since(&requests_before);
        r
    })
}

#[allow(clippy::too_many_arguments)]
async fn backup_locked(
    store: &Store,
    keys: &Keys,
    sources: &[Source],
    hooks: &mut dyn VolumeHooks,
    opts: &BackupOptions,
    id: &str,
    now: i64,
    started: Instant,
) -> Result<BackupReport> {
    let mut warnings = Vec::new();
    // Verified, not assumed: some servers accept the lock headers and ignore them.
    let mut lock_enforced = None;
    let unlocked;
    let mut store = store;
    if let Some(days) = store.object_lock_days {
        let r = store.object_lock_enabled().await?;
        lock_enforced = Some(r.is_ok());
        if let Err(why) = r {
            let e = SnapshotError::ObjectLockNotEnforced {
                bucket: store.bucket.clone(),
                days,
                why,
            };
            if !store.accept_unlocked_bucket {
                return Err(e);
            }
            warnings.push(format!("warning: {e}"));
            // Without a lock configuration, AWS-like servers refuse retention headers.
            let mut s = store.clone();
            s.object_lock_days = None;
            unlocked = s;
            store = &unlocked;
        }
    }
    // Every chunk the bucket holds (packs through the index, format-1 objects): only
    // the others are uploaded. An unreadable index only costs dedup.
    let index = Index::load(store, keys).await?;
    warnings.extend(index.problems.iter().map(|p| format!("warning: {p}")));
    let known = Arc::new(std::sync::Mutex::new(index.known()));
    let mut packer = Packer::new(store, keys, opts.pack_target, PACK_UPLOADS, now);
    // The newest readable snapshot lets unchanged files be skipped without reading
    // them; any problem with it just means reading everything.
    let prev = super::restore::latest_manifest(store, keys)
        .await
        .ok()
        .flatten();
    let mut volumes = Vec::new();
    let mut stats = Stats::default();
    let mut uploaded: HashSet<[u8; 32]> = HashSet::new();
    for src in sources {
        hooks.before(&src.name)?;
        let prev_vol = prev
            .as_ref()
            .and_then(|m| m.volumes.iter().find(|v| v.name == src.name));
        let r = backup_volume(
            keys,
            src,
            prev_vol,
            opts,
            &known,
            &mut packer,
            &mut uploaded,
            &mut stats,
        )
        .await;
        hooks.after(&src.name);
        let (vol, w) = r?;
        warnings.extend(w.into_iter().map(|w| format!("{}: {w}", src.name)));
        volumes.push(vol);
    }
    let (packs, sent) = packer.finish().await?;
    stats.bytes_uploaded += sent;
    stats.packs_new = packs.len() as u64;
    // The index goes before the manifest: a listed snapshot's chunks are always found.
    if !packs.is_empty() {
        pack::write_index(store, keys, &opts.host, id, &packs, now).await?;
    }
    let locked_until = match store.lock_until(now) {
        Some(until) => Some(
            extend_reused(
                store,
                &index,
                prev.as_ref(),
                &volumes,
                &uploaded,
                now,
                until,
            )
            .await?,
        ),
        None => None,
    };
    stats.duration_ms = started.elapsed().as_millis() as u64;
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        id: id.to_string(),
        host: opts.host.clone(),
        time: now,
        tool: format!("imgbuild {}", env!("CARGO_PKG_VERSION")),
        chunker: Chunker {
            algorithm: "fastcdc-2020".into(),
            min: CHUNK_MIN,
            avg: CHUNK_AVG,
            max: CHUNK_MAX,
        },
        locked_until,
        stats: stats.clone(),
        volumes,
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| SnapshotError::Other(e.to_string()))?;
    let sealed = keys.seal_manifest(id, &opts.host, &store.prefix, &json)?;
    let key = format::snapshot_key(&store.prefix, id);
    match store.put(&key, sealed, true, Some(now)).await? {
        PutOutcome::Created => {}
        PutOutcome::Exists => {
            return Err(SnapshotError::Other(format!(
                "snapshot {id} already exists in the bucket (id collision); nothing overwritten"
            )))
        }
    }
    if let (Some(days), Some(until), Some(true)) =
        (store.object_lock_days, locked_until, lock_enforced)
    {
        // The configuration says Enabled; the object we just wrote must say so too.
        let got = store.retention(&key).await?;
        if got.is_none_or(|g| g + 1 < until.min(now + i64::from(days) * 86_400)) {
            lock_enforced = Some(false);
            let e = SnapshotError::ObjectLockNotEnforced {
                bucket: store.bucket.clone(),
                days,
                why: format!(
                    "manifest {id} was written with retention but reads back {}",
                    got.map_or("none".to_string(), format::rfc3339)
                ),
            };
            if !store.accept_unlocked_bucket {
                return Err(e);
            }
            warnings.push(format!("warning: {e}"));
        }
    }
    Ok(BackupReport {
        id: id.to_string(),
        time: now,
        stats,
        warnings,
        locked_until,
        object_lock_enforced: lock_enforced,
        requests: Requests::default(),
    })
}

/// Small files are grouped into segments of at least this many bytes.
pub const SEGMENT_MIN: u64 = 64 * 1024;
/// A group of small files is closed at the latest here (a single file may be larger).
pub const SEGMENT_MAX: u64 = 2 * 1024 * 1024;
/// One small file in this many (by keyed hash of its path) may close a segment.
const SEGMENT_ANCHOR: u64 = 4;

/// Splits a volume's entries into segments that are chunked independently, so chunk
/// boundaries follow file boundaries the way a per-file chunker's do: a file of at
/// least CHUNK_MIN bytes is a segment of its own (an edit in it cannot shift the
/// chunks of its neighbours), and small files are grouped, closing a group after a
/// file whose path hash picks it as an anchor once the group holds SEGMENT_MIN bytes.
/// Anchors depend on paths, not offsets, so an edited small file only changes the
/// chunk of its own group, and groups stay large enough to keep the object count low.
/// (Only backup uses this; the manifest lists chunks per volume as before.)
pub fn segments(entries: &[format::Entry], keys: &Keys) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, e) in entries.iter().enumerate() {
        let len = e.stream_len();
        if len == 0 {
            continue;
        }
        if len >= u64::from(CHUNK_MIN) {
            if i > start {
                out.push(start..i);
            }
            out.push(i..i + 1);
            start = i + 1;
            bytes = 0;
            continue;
        }
        bytes += len;
        let anchor = || {
            let p = e.path.to_bytes().unwrap_or_default();
            let h = keys.chunk_id(&p);
            u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
                .is_multiple_of(SEGMENT_ANCHOR)
        };
        if bytes >= SEGMENT_MAX || (bytes >= SEGMENT_MIN && anchor()) {
            out.push(start..i + 1);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < entries.len() {
        out.push(start..entries.len());
    }
    out
}

struct Produced2 {
    id: [u8; 32],
    data: Vec<u8>,
}

enum Produced {
    Chunk {
        id: [u8; 32],
        data: Vec<u8>,
    },
    /// A segment whose files did not change: the previous snapshot's chunks.
    Reused(Vec<ChunkRef>),
}

/// Identifies a segment's files as they were when scanned: if every file has the same
/// path, size, extents, mtime, ctime and inode, its bytes are assumed unchanged (the
/// rule restic and most backup tools use).
fn segment_fingerprint(entries: &[format::Entry]) -> Option<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    for e in entries {
        if e.kind == format::Kind::File && (e.ino == 0 || e.skipped.is_some()) {
            // no change information, or zeros in place of the data: always read
            return None;
        }
        h.update(&e.path.to_bytes().unwrap_or_default());
        h.update(&[0]);
        if e.kind == format::Kind::File {
            for v in [
                e.size,
                e.mtime as u64,
                e.mtime_ns.into(),
                e.ctime as u64,
                e.ctime_ns.into(),
                e.ino,
            ] {
                h.update(&v.to_le_bytes());
            }
            for x in e.data_extents() {
                h.update(&x[0].to_le_bytes());
                h.update(&x[1].to_le_bytes());
            }
        }
    }
    Some(*h.finalize().as_bytes())
}

/// Segment fingerprint → the previous snapshot's chunks for exactly that segment.
/// Segments are chunked independently, so their chunks start and end on segment
/// boundaries; a segment where that does not hold (other chunker settings) is left out.
fn reusable_segments(
    prev: &Volume,
    keys: &Keys,
) -> std::collections::HashMap<[u8; 32], Vec<ChunkRef>> {
    let mut out = std::collections::HashMap::new();
    let mut chunk_iter = prev.chunks.iter();
    let mut chunk_pos = 0u64;
    let mut stream_pos = 0u64;
    for seg in segments(&prev.entries, keys) {
        let slice = &prev.entries[seg];
        let len: u64 = slice.iter().map(|e| e.stream_len()).sum();
        let end = stream_pos + len;
        let mut refs = Vec::new();
        let mut aligned = chunk_pos == stream_pos;
        while chunk_pos < end {
            let Some(c) = chunk_iter.next() else {
                return out;
            };
            chunk_pos += c.1;
            refs.push(c.clone());
        }
        aligned &= chunk_pos == end;
        if aligned && len > 0 {
            if let Some(fp) = segment_fingerprint(slice) {
                out.insert(fp, refs);
            }
        }
        stream_pos = end;
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn backup_volume(
    keys: &Keys,
    src: &Source,
    prev: Option<&Volume>,
    opts: &BackupOptions,
    known: &Arc<std::sync::Mutex<HashSet<[u8; 32]>>>,
    packer: &mut Packer,
    uploaded: &mut HashSet<[u8; 32]>,
    stats: &mut Stats,
) -> Result<(Volume, Vec<String>)> {
    let root = src.root.clone();
    let scanned = tokio::task::spawn_blocking(move || fsio::scan(&root))
        .await
        .map_err(|e| SnapshotError::Other(format!("scan task: {e}")))??;
    let (entries, mut warnings) = (scanned.entries, scanned.warnings);
    stats.files_skipped += scanned.skipped;
    let entries = Arc::new(entries);
    let total: u64 = entries.iter().map(|e| e.stream_len()).sum();
    stats.bytes_total += total;
    stats.files += entries
        .iter()
        .filter(|e| e.kind == format::Kind::File)
        .count() as u64;
    let step = opts
        .progress
        .step(&format!("backup {}", src.name), Some(total));

    let (tx, mut rx) = mpsc::channel::<std::io::Result<Produced>>(4);
    let reader_warnings = Arc::new(std::sync::Mutex::new(fsio::ReadReport::default()));
    let k2 = keys.clone();
    let root = src.root.clone();
    let (entries2, warnings2) = (entries.clone(), reader_warnings.clone());
    let reuse = prev.map(|p| reusable_segments(p, keys)).unwrap_or_default();
    let known2 = known.clone();
    let producer = tokio::task::spawn_blocking(move || {
        for seg in segments(&entries2, &k2) {
            if let Some(refs) =
                segment_fingerprint(&entries2[seg.clone()]).and_then(|fp| reuse.get(&fp))
            {
                // Reuse only what is still in the bucket (a prune may have run).
                let present = known2.lock().is_ok_and(|k| {
                    refs.iter().all(|r| {
                        hex::decode(&r.0)
                            .ok()
                            .and_then(|v| <[u8; 32]>::try_from(v).ok())
                            .is_some_and(|id| k.contains(&id))
                    })
                });
                if present {
                    if tx
                        .blocking_send(Ok(Produced::Reused(refs.clone())))
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            }
            let reader = fsio::StreamReader::new(&root, entries2.clone(), seg, warnings2.clone());
            let cdc = StreamCDC::with_level_and_seed(
                reader,
                CHUNK_MIN,
                CHUNK_AVG,
                CHUNK_MAX,
                Normalization::Level1,
                k2.chunker_seed(),
            );
            for c in cdc {
                let msg = c
                    .map(|c| Produced::Chunk {
                        id: k2.chunk_id(&c.data),
                        data: c.data,
                    })
                    .map_err(std::io::Error::from);
                let failed = msg.is_err();
                if tx.blocking_send(msg).is_err() || failed {
                    return;
                }
            }
        }
    });

    // Sealing (zstd + AEAD) runs on the blocking pool, `parallel` chunks at once.
    // Sealed chunks go into the pack in stream order (oldest task first), so a restore
    // finds the chunks of a file next to each other and reads them in one request.
    type Sealing = tokio::task::JoinHandle<([u8; 32], usize, Vec<u8>)>;
    let mut tasks: std::collections::VecDeque<Sealing> = std::collections::VecDeque::new();
    // More sealers than cores only holds more chunks in memory.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let parallel = opts.parallel.clamp(1, cores + 1);
    let mut chunks = Vec::new();
    let mut stream_bytes = 0u64;
    let mut failure: Option<SnapshotError> = None;
    while let Some(msg) = rx.recv().await {
        let p = match msg {
            Ok(Produced::Chunk { id, data }) => Produced2 { id, data },
            Ok(Produced::Reused(refs)) => {
                for r in refs {
                    stream_bytes += r.1;
                    step.inc(r.1);
                    stats.chunks_total += 1;
                    chunks.push(r);
                }
                continue;
            }
            Err(e) => {
                failure = Some(SnapshotError::io(&src.root, e));
                break;
            }
        };
        let len = p.data.len() as u64;
        stream_bytes += len;
        step.inc(len);
        chunks.push(ChunkRef(hex::encode(p.id), len));
        stats.chunks_total += 1;
        let is_new = known.lock().map(|mut k| k.insert(p.id)).unwrap_or(true);
        if !is_new {
            continue;
        }
        uploaded.insert(p.id);
        stats.chunks_new += 1;
        stats.bytes_new += len;
        while tasks.len() >= parallel {
            let Some(oldest) = tasks.pop_front() else {
                break;
            };
            if let Err(e) = pack_sealed(packer, oldest.await).await {
                failure = failure.or(Some(e));
            }
        }
        if failure.is_some() {
            break;
        }
        let keys = keys.clone();
        tasks.push_back(tokio::task::spawn_blocking(move || {
            let sealed = keys.seal_chunk(&p.id, &p.data);
            (p.id, p.data.len(), sealed)
        }));
    }
    drop(rx);
    let _ = producer.await;
    while let Some(oldest) = tasks.pop_front() {
        if let Err(e) = pack_sealed(packer, oldest.await).await {
            failure = failure.or(Some(e));
        }
    }
    step.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    if stream_bytes != total {
        return Err(SnapshotError::Other(format!(
            "volume {}: chunked {stream_bytes} bytes, expected {total}",
            src.name
        )));
    }
    let read = std::mem::take(
        &mut *reader_warnings
            .lock()
            .map_err(|_| SnapshotError::Other("reader report lock poisoned".into()))?,
    );
    let mut entries = Arc::try_unwrap(entries).unwrap_or_else(|a| (*a).clone());
    warnings.extend(read.warnings);
    stats.files_skipped += read.skipped.len() as u64;
    for (i, why) in read.skipped {
        if let Some(e) = entries.get_mut(i) {
            warnings.push(format!("{}: {why}; skipped", e.path));
            e.skipped = Some(why);
        }
    }
    stats.files_changed += read.changed.len() as u64;
    warnings.extend(
        read.changed
            .into_iter()
            .map(|n| format!("{n}: changed while it was read")),
    );
    Ok((
        Volume {
            name: src.name.clone(),
            stream_bytes,
            entries,
            chunks,
        },
        warnings,
    ))
}

async fn pack_sealed(
    packer: &mut Packer,
    done: std::result::Result<([u8; 32], usize, Vec<u8>), tokio::task::JoinError>,
) -> Result<()> {
    let (id, plain, sealed) = done.map_err(|e| SnapshotError::Other(format!("seal task: {e}")))?;
    packer.add(id, plain, &sealed).await
}

/// With Object Lock, chunks this snapshot reuses must stay locked as long as the
/// snapshot's own objects. The previous snapshot records how long its chunks are
/// guaranteed; when that guarantee runs below half the lock period, every reused chunk
/// is extended (a few calls per chunk every `days/2`, not every backup).
/// Returns the date until which every object of the new snapshot is locked.
async fn extend_reused(
    store: &Store,
    index: &Index,
    prev: Option<&Manifest>,
    volumes: &[Volume],
    uploaded: &HashSet<[u8; 32]>,
    now: i64,
    until: i64,
) -> Result<i64> {
    use futures_util::StreamExt;
    let days = until - now;
    // Retention is per object: the packs (or format-1 chunk objects) holding the
    // chunks, found through the index the backup started from.
    let object_of = |c: &str| parse_chunk_key(c).and_then(|id| index.object_key(&id));
    let (prev_objects, prev_until): (HashSet<String>, i64) = match prev {
        Some(m) => (
            m.chunk_ids().into_iter().filter_map(object_of).collect(),
            m.locked_until.unwrap_or(0),
        ),
        None => (HashSet::new(), 0),
    };
    let renew_all = prev_until < now + days / 2;
    let reused: HashSet<String> = volumes
        .iter()
        .flat_map(|v| v.chunks.iter())
        .filter(|c| parse_chunk_key(&c.0).is_some_and(|id| !uploaded.contains(&id)))
        .filter_map(|c| object_of(&c.0))
        .collect();
    let to_extend: Vec<String> = reused
        .iter()
        .filter(|k| renew_all || !prev_objects.contains(*k))
        .cloned()
        .collect();
    let results: Vec<Result<()>> = futures_util::stream::iter(to_extend)
        .map(|key| async move { store.extend_retention(&key, until).await })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(if renew_all || reused.is_empty() {
        until
    } else {
        prev_until.min(until)
    })
}
