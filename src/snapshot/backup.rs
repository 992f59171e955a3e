//! Making a snapshot: scan each volume, chunk its stream, upload the chunks the bucket
//! lacks (in parallel), then the signed manifest — last, and only if everything before
//! it succeeded, so a listed snapshot is always complete.

use super::crypto::Keys;
use super::entries::{self, EntryReader, MetaChunker};
use super::error::{Result, SnapshotError};
use super::format::{self, ChunkRef, Manifest, Stats, Volume, MANIFEST_VERSION};
use super::fsio;
use super::pack::{self, Index, Packer};
use super::store::{PutOutcome, Requests, Store};
use crate::progress::Progress;
use fastcdc::v2020::{Normalization, StreamCDC};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Chunk sizes. Packs made the object count independent of the chunk size, so the
/// average is a quarter of restic's: an edit inside a large file (a database page, a
/// rewritten block) costs the chunks around it. Over 4,000 simulated chunker seeds, a
/// 4 MiB rewrite inside a 6 MiB file stored 4.53 MiB on average at 128/256 KiB,
/// 4.97 at 256/512 KiB and 5.44 with restic's chunker, and stored no more than restic
/// for 93 % of seeds (77 % at 256/512 KiB). What a smaller chunk costs is the index
/// held in memory, about 90 bytes a chunk (360 MB for 1 TB of distinct data).
pub const CHUNK_MIN: u32 = 128 * 1024;
pub const CHUNK_AVG: u32 = 256 * 1024;
pub const CHUNK_MAX: u32 = 4 * 1024 * 1024;
/// Sizes earlier releases chunked with (min, average, max). A repository whose newest
/// snapshot was chunked with one of them keeps it: with other sizes every changed file
/// would be stored again in full, once.
pub const CHUNK_SIZES_KEPT: [ChunkSizes; 2] = [
    ChunkSizes {
        min: 256 * 1024,
        avg: 512 * 1024,
        max: CHUNK_MAX,
    },
    ChunkSizes {
        min: 256 * 1024,
        avg: 1024 * 1024,
        max: CHUNK_MAX,
    },
];

/// The sizes the content-defined chunker cuts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl From<&format::Chunker> for ChunkSizes {
    fn from(c: &format::Chunker) -> ChunkSizes {
        ChunkSizes {
            min: c.min,
            avg: c.avg,
            max: c.max,
        }
    }
}

pub const CHUNK_SIZES: ChunkSizes = ChunkSizes {
    min: CHUNK_MIN,
    avg: CHUNK_AVG,
    max: CHUNK_MAX,
};

/// The chunker a backup uses: the newest snapshot's, when it is one this release
/// writes, else the current default.
pub fn chunker_for(prev: Option<&format::Manifest>) -> format::Chunker {
    let sizes = prev
        .map(|m| &m.chunker)
        .filter(|c| c.algorithm == CHUNKER_ALGORITHM)
        .map(ChunkSizes::from)
        .filter(|s| CHUNK_SIZES_KEPT.contains(s))
        .unwrap_or(CHUNK_SIZES);
    format::Chunker {
        algorithm: CHUNKER_ALGORITHM.into(),
        min: sizes.min,
        avg: sizes.avg,
        max: sizes.max,
    }
}

const CHUNKER_ALGORITHM: &str = "fastcdc-2020";
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
    /// Recorded in the manifest as the volume's `wal_start` (see `format::Volume`).
    pub wal_start: Option<String>,
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
    super::fsio::limit_malloc_arenas();
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
    let mut packers = Packers {
        data: Packer::new(store, keys, opts.pack_target, PACK_UPLOADS, now),
        // The entry list is a small fraction of the data: smaller packs, one upload.
        meta: Packer::new(store, keys, opts.pack_target / 4, 1, now),
    };
    // The newest readable snapshot lets unchanged files be skipped without reading
    // them; any problem with it just means reading everything. It also names the
    // chunk sizes: without it the defaults are used, and in a repository begun with
    // other sizes that stores the data again, so say so.
    let prev = match super::restore::latest_manifest(store, keys).await {
        Ok(m) => m,
        Err(e) => {
            warnings.push(format!(
                "warning: no earlier snapshot could be read ({e}): every file is read \
                 again and chunked at the default average of {} KiB (a repository begun \
                 with other sizes stores its data again)",
                CHUNK_AVG >> 10
            ));
            None
        }
    };
    let chunker = chunker_for(prev.as_ref());
    let mut volumes = Vec::new();
    let mut stats = Stats::default();
    let mut uploaded: HashSet<[u8; 32]> = HashSet::new();
    for src in sources {
        hooks.before(&src.name)?;
        let prev_vol = prev
            .as_ref()
            .and_then(|m| m.volumes.iter().find(|v| v.name == src.name));
        let r = backup_volume(
            store,
            keys,
            &index,
            src,
            prev_vol,
            ChunkSizes::from(&chunker),
            opts,
            &mut packers,
            &mut uploaded,
            &mut stats,
        )
        .await;
        hooks.after(&src.name);
        let (vol, w) = r?;
        warnings.extend(w.into_iter().map(|w| format!("{}: {w}", src.name)));
        volumes.push(vol);
    }
    // Past the volumes only Object Lock needs the previous snapshot: its chunk list
    // is not held beside the new one while that is written.
    let prev = prev.filter(|_| store.lock_until(now).is_some());
    let (packs, sent) = packers.finish().await?;
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
        chunker,
        locked_until,
        stats: stats.clone(),
        volumes,
    };
    let sealed = keys.seal_manifest_value(id, &opts.host, &store.prefix, &manifest)?;
    drop(manifest);
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

/// Small files are grouped: a group closes after an entry whose keyed path hash
/// selects it (one in SEGMENT_ANCHOR), once it holds SEGMENT_FILES_MIN entries.
/// Counting entries, not bytes, is what keeps an edit local: a changed file's new size
/// moves no other group's end (nor does a file that was empty and now holds data). The minimum keeps groups near the mean (a pure 1-in-N
/// anchor makes the group around a changed file twice the mean size on average).
pub const SEGMENT_FILES_MIN: usize = 8;
/// A file this large is a segment of its own. It was the chunk minimum when both were
/// 256 KiB; it stays there, since moving it would regroup (and store again) every small
/// file near it.
pub const SEGMENT_FILE_MIN: u64 = 256 * 1024;
const SEGMENT_ANCHOR: u64 = 2;
/// A group of small files is closed at the latest here (a single file may be larger).
pub const SEGMENT_MAX: u64 = 2 * 1024 * 1024;
/// A segment holds at most this many entries, so a directory of a million empty
/// files is not held in memory at once (only such runs are cut by it).
pub const SEGMENT_ENTRIES_MAX: usize = 65_536;

/// Picks one path in `one_in` by a keyed hash of it (`lane` takes other bits of the
/// hash, so the entry list's cuts do not follow the segments').
pub(crate) fn path_anchor(keys: &Keys, path: &format::Name, lane: usize, one_in: u64) -> bool {
    let h = keys.chunk_id(&path.to_bytes().unwrap_or_default());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[lane * 8..lane * 8 + 8]);
    u64::from_le_bytes(b).is_multiple_of(one_in)
}

/// Splits a volume's entries, as they stream by, into segments that are chunked
/// independently, so chunk boundaries follow file boundaries the way a per-file
/// chunker's do: a file of at least SEGMENT_FILE_MIN bytes is a segment of its own (an edit
/// in it cannot shift the chunks of its neighbours), and small files are grouped,
/// closing a group after a file whose path hash picks it as an anchor once the group
/// holds SEGMENT_FILES_MIN entries. Where groups end depends on paths only, never on
/// sizes (up to the SEGMENT_MAX cap, and but for a file growing past SEGMENT_FILE_MIN), so an edited
/// small file changes only the chunk of its own group, and an added or removed file
/// only its group and the next few. (Only backup uses this; the manifest lists chunks
/// per volume.)
pub struct Segmenter<'k> {
    keys: &'k Keys,
    cur: Vec<format::Entry>,
    bytes: u64,
    files: usize,
}

impl<'k> Segmenter<'k> {
    pub fn new(keys: &'k Keys) -> Self {
        Segmenter {
            keys,
            cur: Vec::new(),
            bytes: 0,
            files: 0,
        }
    }

    /// Adds the next entry; returns the segments it closes (at most two).
    pub fn push(&mut self, e: format::Entry) -> Vec<Vec<format::Entry>> {
        let len = e.stream_len();
        let mut out = Vec::new();
        if len >= SEGMENT_FILE_MIN {
            if !self.cur.is_empty() {
                out.push(std::mem::take(&mut self.cur));
            }
            out.push(vec![e]);
            self.bytes = 0;
            self.files = 0;
            return out;
        }
        self.bytes += len;
        // Every entry counts, empty or not: a file that was empty and now holds data
        // (or the reverse) must not move where its group ends.
        self.files += 1;
        let anchor =
            self.files >= SEGMENT_FILES_MIN && path_anchor(self.keys, &e.path, 0, SEGMENT_ANCHOR);
        self.cur.push(e);
        if (len > 0 && self.bytes >= SEGMENT_MAX) || anchor || self.cur.len() >= SEGMENT_ENTRIES_MAX
        {
            out.push(std::mem::take(&mut self.cur));
            self.bytes = 0;
            self.files = 0;
        }
        out
    }

    /// The last segment, if any entries are left.
    pub fn finish(self) -> Option<Vec<format::Entry>> {
        (!self.cur.is_empty()).then_some(self.cur)
    }
}

/// A volume's entries cut into segments (all at once; for small lists and tests).
pub fn segments(entries: &[format::Entry], keys: &Keys) -> Vec<Vec<format::Entry>> {
    let mut s = Segmenter::new(keys);
    let mut out: Vec<Vec<format::Entry>> = Vec::new();
    for e in entries {
        out.extend(s.push(e.clone()));
    }
    out.extend(s.finish());
    out
}

enum Produced {
    /// A chunk of the data stream.
    Chunk { id: [u8; 32], data: Vec<u8> },
    /// A chunk of the entry stream.
    Meta { id: [u8; 32], data: Vec<u8> },
    /// A segment whose files did not change: the previous snapshot's chunks
    /// `range` (indexes into its volume's chunk list).
    Reused(std::ops::Range<usize>),
    /// Unchanged files of a segment that changed: bytes `start..start+len` of what
    /// the previous snapshot's chunks `range` hold (which may be slices themselves).
    Slice {
        range: std::ops::Range<usize>,
        start: u64,
        len: u64,
    },
}

/// Identifies one entry as it was when scanned: if a file has the same path, size,
/// extents, mtime, ctime and inode, its bytes are assumed unchanged (the rule restic
/// and most backup tools use). The path is not hashed here: fingerprints are only
/// compared position by position within segments whose [`segment_key`] (their paths,
/// in order) matched. 0 = cannot be compared (no change information, or zeros stored
/// in place of the data): such a file is always read.
fn entry_fingerprint(e: &format::Entry) -> u64 {
    if e.kind == format::Kind::File && (e.ino == 0 || e.skipped.is_some()) {
        return 0;
    }
    let mut h = blake3::Hasher::new();
    h.update(&[e.kind as u8]);
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
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or_default()).max(1)
}

/// Names a segment by its paths alone, so a segment where some files changed is
/// found again (where groups end depends on paths, not contents).
fn segment_key(entries: &[format::Entry]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    for e in entries {
        h.update(&e.path.to_bytes().unwrap_or_default());
        h.update(&[0]);
    }
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize().as_bytes()[..16]);
    k
}

/// A segment of the previous snapshot: its chunks (a range of its volume's chunk
/// list: a clone of the refs per segment would cost more memory than the list itself
/// once small files make many small segments), and each entry's fingerprint and
/// stream length, so an unchanged file is found even when its neighbours changed.
struct PrevSegment {
    range: std::ops::Range<usize>,
    fps: Box<[u64]>,
    /// Empty when the segment cannot be sliced: a stream length past u32 (a big file
    /// is a segment of its own and has nothing to keep when it changed), or a chunk
    /// that is a format-1 object.
    lens: Box<[u32]>,
}

/// A changed small-file group is rewritten whole past this many pieces of the old
/// chunks or new reads, so slices do not fragment the stream night after night: a
/// group that changed again is read and chunked afresh.
const SLICE_PIECES_MAX: usize = 5;

/// How many chunks a group's previous chunks may span and still be patched: as many
/// as chunking the group afresh can give (its bytes over the chunk minimum), plus four
/// pieces of earlier patches. Past that, slices have fragmented it and it is read
/// whole. (A fixed four, right for groups of one or two chunks, refused every group
/// several chunks long, which smaller chunks make common.)
fn slice_range_max(prev_bytes: u64, sizes: ChunkSizes) -> usize {
    4 + (prev_bytes / u64::from(sizes.min.max(1))) as usize
}

/// How a segment is stored.
enum SegmentPlan {
    /// Unchanged: the previous chunks.
    Reuse(std::ops::Range<usize>),
    /// Some files changed: unchanged runs as slices of the previous chunks, the
    /// others read.
    Patch(std::ops::Range<usize>, Vec<Piece>),
    /// Read and chunk everything.
    Read,
}

enum Piece {
    Old { start: u64, len: u64 },
    New(std::ops::Range<usize>),
}

fn plan_segment(seg: &[format::Entry], reuse: &Reuse, sizes: ChunkSizes) -> SegmentPlan {
    let Some(prev) = reuse.get(&segment_key(seg)) else {
        return SegmentPlan::Read;
    };
    if prev.fps.len() != seg.len() {
        return SegmentPlan::Read;
    }
    let same: Vec<bool> = seg
        .iter()
        .zip(prev.fps.iter())
        .map(|(e, &fp)| fp != 0 && entry_fingerprint(e) == fp)
        .collect();
    if same.iter().all(|&s| s) {
        return SegmentPlan::Reuse(prev.range.clone());
    }
    if prev.lens.len() != seg.len() {
        return SegmentPlan::Read;
    }
    let prev_bytes = prev.lens.iter().map(|&l| u64::from(l)).sum();
    if prev.range.len() > slice_range_max(prev_bytes, sizes) {
        return SegmentPlan::Read;
    }
    let mut pieces: Vec<Piece> = Vec::new();
    let mut old_pos = 0u64;
    let mut kept = 0u64;
    for (i, e) in seg.iter().enumerate() {
        let old_len = u64::from(prev.lens[i]);
        if same[i] && old_len != e.stream_len() {
            return SegmentPlan::Read;
        }
        match (same[i], pieces.last_mut()) {
            (_, _) if same[i] && old_len == 0 => {}
            (true, Some(Piece::Old { start, len })) if *start + *len == old_pos => *len += old_len,
            (true, _) => pieces.push(Piece::Old {
                start: old_pos,
                len: old_len,
            }),
            (false, Some(Piece::New(r))) => r.end = i + 1,
            (false, _) => pieces.push(Piece::New(i..i + 1)),
        }
        if same[i] {
            kept += old_len;
        }
        old_pos += old_len;
    }
    if pieces.len() > SLICE_PIECES_MAX || kept == 0 {
        return SegmentPlan::Read;
    }
    SegmentPlan::Patch(prev.range.clone(), pieces)
}

/// The previous snapshot's segments by [`segment_key`]. Segments are chunked
/// independently, so their chunks start and end on segment boundaries; a segment
/// where that does not hold (other chunker or grouping settings), or whose chunks
/// are no longer in the bucket (a prune ran), is left out. The previous entry list
/// is streamed, never held.
async fn reusable_segments(
    store: &Store,
    keys: &Keys,
    index: &Index,
    prev: &Volume,
) -> Result<Reuse> {
    let mut out = HashMap::new();
    let mut next = 0usize;
    let mut chunk_pos = 0u64;
    let mut stream_pos = 0u64;
    let mut segmenter = Segmenter::new(keys);
    let mut take = |slice: Vec<format::Entry>, out: &mut Reuse| -> bool {
        let len: u64 = slice.iter().map(|e| e.stream_len()).sum();
        let end = stream_pos + len;
        let first = next;
        let mut aligned = chunk_pos == stream_pos;
        let mut packed = true;
        while chunk_pos < end {
            let Some(c) = prev.chunks.get(next) else {
                return false;
            };
            next += 1;
            chunk_pos += c.1;
            let id = parse_chunk_key(&c.0);
            aligned &= id.is_some_and(|id| index.contains(&id));
            packed &= id.is_some_and(|id| index.packed(&id));
        }
        aligned &= chunk_pos == end;
        if aligned && len > 0 {
            let lens: Option<Box<[u32]>> = slice
                .iter()
                .map(|e| u32::try_from(e.stream_len()).ok())
                .collect();
            let lens = lens
                .filter(|_| packed && slice.len() > 1)
                .unwrap_or_default();
            out.insert(
                segment_key(&slice),
                PrevSegment {
                    range: first..next,
                    fps: slice.iter().map(entry_fingerprint).collect(),
                    lens,
                },
            );
        }
        stream_pos = end;
        true
    };
    let mut reader = EntryReader::new(store, keys, index, prev)?;
    while let Some(batch) = reader.next_batch().await? {
        for e in batch {
            for seg in segmenter.push(e) {
                if !take(seg, &mut out) {
                    return Ok(out);
                }
            }
        }
    }
    if let Some(seg) = segmenter.finish() {
        take(seg, &mut out);
    }
    Ok(out)
}

type Reuse = HashMap<[u8; 16], PrevSegment>;

/// What the producer thread found besides the chunks.
#[derive(Default)]
struct Walked {
    files: u64,
    stream_bytes: u64,
    skipped: u64,
    changed: u64,
    warnings: Vec<String>,
}

/// Warnings kept per volume; the rest are counted (a million vanished temp files
/// must not fill the memory or the report).
const WARNINGS_MAX: usize = 1000;

impl Walked {
    fn warn(&mut self, w: String) {
        if self.warnings.len() < WARNINGS_MAX {
            self.warnings.push(w);
        } else if self.warnings.len() == WARNINGS_MAX {
            self.warnings
                .push("further warnings left out (see the counts in the stats)".into());
        }
    }
}

/// Reads `entries[range]` and sends its chunks; false when the receiver is gone or
/// the read failed (the error was sent).
fn read_chunks(
    root: &std::path::Path,
    keys: &Keys,
    sizes: ChunkSizes,
    entries: &Arc<Vec<format::Entry>>,
    range: std::ops::Range<usize>,
    report: &Arc<std::sync::Mutex<fsio::ReadReport>>,
    send: &dyn Fn(std::io::Result<Produced>) -> bool,
) -> bool {
    let len: u64 = entries[range.clone()].iter().map(|e| e.stream_len()).sum();
    let mut reader = fsio::StreamReader::new(root, entries.clone(), range, report.clone());
    if len <= u64::from(sizes.min) {
        // FastCDC gives a stream this short back as one chunk; its streaming
        // chunker would first allocate and zero a max-size buffer, for each
        // of hundreds of thousands of small-file groups.
        use std::io::Read;
        let mut data = Vec::with_capacity(len as usize);
        let msg = reader.read_to_end(&mut data).map(|_| Produced::Chunk {
            id: keys.chunk_id(&data),
            data,
        });
        let failed = msg.is_err();
        let empty = matches!(&msg, Ok(Produced::Chunk { data, .. }) if data.is_empty());
        return empty || (send(msg) && !failed);
    }
    let cdc = StreamCDC::with_level_and_seed(
        reader,
        sizes.min,
        sizes.avg,
        sizes.max,
        Normalization::Level1,
        keys.chunker_seed(),
    );
    for c in cdc {
        let msg = c
            .map(|c| Produced::Chunk {
                id: keys.chunk_id(&c.data),
                data: c.data,
            })
            .map_err(std::io::Error::from);
        let failed = msg.is_err();
        if !send(msg) || failed {
            return false;
        }
    }
    true
}

/// Planned segments waiting to be read, their files already hinted to the kernel
/// ([`fsio::ReadAhead`]), so a cold page cache is read many files at a time rather
/// than one. Bounded by files and bytes hinted and by entries held, so a long run of
/// unchanged segments (which hint nothing) does not pile up either.
struct Lookahead {
    queue: std::collections::VecDeque<(Vec<format::Entry>, SegmentPlan, Held)>,
    held: Held,
    ahead: fsio::ReadAhead,
}

/// What queued segments hold: files and bytes hinted, entries.
#[derive(Default, Clone, Copy)]
struct Held {
    files: usize,
    bytes: u64,
    entries: usize,
}

/// Entries the lookahead holds at most.
const AHEAD_ENTRIES: usize = 4096;

impl Lookahead {
    fn new(root: &std::path::Path) -> Self {
        Lookahead {
            queue: Default::default(),
            held: Held::default(),
            ahead: fsio::ReadAhead::new(root),
        }
    }

    fn push(&mut self, seg: Vec<format::Entry>, plan: SegmentPlan) {
        // The files this segment will read: all of them, those that changed, or none.
        let read: Vec<std::ops::Range<usize>> = match &plan {
            SegmentPlan::Reuse(_) => Vec::new(),
            SegmentPlan::Read => std::iter::once(0..seg.len()).collect(),
            SegmentPlan::Patch(_, pieces) => pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::New(r) => Some(r.clone()),
                    Piece::Old { .. } => None,
                })
                .collect(),
        };
        let mut h = Held {
            entries: seg.len(),
            ..Held::default()
        };
        let mut hint = |e: &format::Entry| {
            let len = e.stream_len();
            if len > 0 {
                if let Some(rel) = e.path.to_bytes() {
                    self.ahead.hint(rel, len);
                    h.files += 1;
                    h.bytes += len.min(fsio::readahead::FILE_HINT_MAX);
                }
            }
        };
        for r in read {
            seg[r].iter().for_each(&mut hint);
        }
        self.held.files += h.files;
        self.held.bytes += h.bytes;
        self.held.entries += h.entries;
        self.queue.push_back((seg, plan, h));
    }

    /// The next segment to read: once the lookahead is full, or any while `all`.
    fn pop(&mut self, all: bool) -> Option<(Vec<format::Entry>, SegmentPlan)> {
        let full = self.held.files > fsio::readahead::AHEAD_FILES
            || self.held.bytes > fsio::readahead::AHEAD_BYTES
            || self.held.entries > AHEAD_ENTRIES;
        if !(all || full) {
            return None;
        }
        let (seg, plan, h) = self.queue.pop_front()?;
        self.held.files -= h.files;
        self.held.bytes -= h.bytes;
        self.held.entries -= h.entries;
        Some((seg, plan))
    }
}

/// The producer: walks the volume, reads each segment that changed and chunks it,
/// then appends the segment's entries (now marked where a file could not be read) to
/// the entry stream. Runs on a blocking thread; stops when the receiver is gone.
fn produce(
    root: &std::path::Path,
    keys: &Keys,
    reuse: &Reuse,
    sizes: ChunkSizes,
    tx: &mpsc::Sender<std::io::Result<Produced>>,
) -> Result<Walked> {
    let mut out = Walked::default();
    let mut walker = fsio::Walker::new(root)?;
    let mut segmenter = Segmenter::new(keys);
    let mut meta = MetaChunker::new(keys);
    let send = |p: std::io::Result<Produced>| tx.blocking_send(p).is_ok();
    let mut emit = |mut seg: Vec<format::Entry>, plan: SegmentPlan, out: &mut Walked| -> bool {
        if let SegmentPlan::Reuse(range) = plan {
            if !send(Ok(Produced::Reused(range))) {
                return false;
            }
        } else {
            let report = Arc::new(std::sync::Mutex::new(fsio::ReadReport::default()));
            let shared = Arc::new(seg);
            let n = shared.len();
            let ok = match plan {
                SegmentPlan::Patch(range, pieces) => pieces.into_iter().all(|p| match p {
                    Piece::Old { start, len } => send(Ok(Produced::Slice {
                        range: range.clone(),
                        start,
                        len,
                    })),
                    Piece::New(r) => read_chunks(root, keys, sizes, &shared, r, &report, &send),
                }),
                _ => read_chunks(root, keys, sizes, &shared, 0..n, &report, &send),
            };
            if !ok {
                return false;
            }
            seg = Arc::try_unwrap(shared).unwrap_or_else(|a| (*a).clone());
            let read = std::mem::take(&mut *report.lock().unwrap_or_else(|p| p.into_inner()));
            for w in read.warnings {
                out.warn(w);
            }
            out.skipped += read.skipped.len() as u64;
            for (i, why) in read.skipped {
                if let Some(e) = seg.get_mut(i) {
                    out.warn(format!("{}: {why}; skipped", e.path));
                    e.skipped = Some(why);
                }
            }
            out.changed += read.changed.len() as u64;
            for n in read.changed {
                out.warn(format!("{n}: changed while it was read"));
            }
        }
        for e in &seg {
            out.stream_bytes += e.stream_len();
            out.files += u64::from(e.kind == format::Kind::File);
            if let Some(data) = meta.push(e) {
                let id = keys.chunk_id(&data);
                if !send(Ok(Produced::Meta { id, data })) {
                    return false;
                }
            }
        }
        true
    };
    let mut look = Lookahead::new(root);
    let mut go = true;
    'walk: for e in walker.by_ref() {
        for seg in segmenter.push(e) {
            let plan = plan_segment(&seg, reuse, sizes);
            look.push(seg, plan);
            while let Some((seg, plan)) = look.pop(false) {
                if !emit(seg, plan, &mut out) {
                    go = false;
                    break 'walk;
                }
            }
        }
    }
    if go {
        if let Some(seg) = segmenter.finish() {
            let plan = plan_segment(&seg, reuse, sizes);
            look.push(seg, plan);
        }
        while let Some((seg, plan)) = look.pop(true) {
            if !emit(seg, plan, &mut out) {
                go = false;
                break;
            }
        }
    }
    if go {
        if let Some(data) = meta.finish() {
            let id = keys.chunk_id(&data);
            send(Ok(Produced::Meta { id, data }));
        }
    }
    out.skipped += walker.skipped;
    let mut scan_warnings = std::mem::take(&mut walker.warnings);
    scan_warnings.truncate(WARNINGS_MAX);
    scan_warnings.append(&mut out.warnings);
    out.warnings = scan_warnings;
    Ok(out)
}

/// The pieces of `old` (a segment's chunk list, whole chunks or slices) that hold
/// bytes `start..start+len` of their concatenation: whole chunks where a chunk lies
/// entirely inside, slices of the underlying chunk otherwise (never a slice of a
/// slice).
fn slice_refs(old: &[ChunkRef], start: u64, len: u64, out: &mut Vec<ChunkRef>) {
    let end = start + len;
    let mut pos = 0u64;
    for r in old {
        let (a, b) = (pos, pos + r.1);
        pos = b;
        if b <= start || a >= end {
            continue;
        }
        let (from, to) = (start.max(a), end.min(b));
        if from == a && to == b {
            out.push(r.clone());
        } else {
            let base = r.2.unwrap_or(0);
            out.push(ChunkRef(r.0.clone(), to - from, Some(base + from - a)));
        }
    }
}

/// A sealed chunk on its way into a pack: which stream it belongs to.
struct Sealed {
    id: [u8; 32],
    plain: usize,
    bytes: Vec<u8>,
    meta: bool,
}

#[allow(clippy::too_many_arguments)]
async fn backup_volume(
    store: &Store,
    keys: &Keys,
    index: &Index,
    src: &Source,
    prev: Option<&Volume>,
    sizes: ChunkSizes,
    opts: &BackupOptions,
    packers: &mut Packers,
    uploaded: &mut HashSet<[u8; 32]>,
    stats: &mut Stats,
) -> Result<(Volume, Vec<String>)> {
    // A previous list that cannot be read only costs re-reading unchanged files.
    let mut warnings = Vec::new();
    let reuse = match prev {
        Some(p) => match reusable_segments(store, keys, index, p).await {
            Ok(r) => r,
            Err(e) => {
                warnings.push(format!(
                    "warning: the previous snapshot's entry list could not be read ({e}); \
                     every file is read again"
                ));
                HashMap::new()
            }
        },
        None => HashMap::new(),
    };
    let step = opts.progress.step(&format!("backup {}", src.name), None);

    let (tx, mut rx) = mpsc::channel::<std::io::Result<Produced>>(4);
    let k2 = keys.clone();
    let root = src.root.clone();
    let producer = tokio::task::spawn_blocking(move || produce(&root, &k2, &reuse, sizes, &tx));

    // Sealing (zstd + AEAD) runs on the blocking pool, `parallel` chunks at once.
    // Sealed chunks go into the pack in stream order (oldest task first), so a restore
    // finds the chunks of a file next to each other and reads them in one request.
    type Sealing = tokio::task::JoinHandle<Sealed>;
    let mut tasks: std::collections::VecDeque<Sealing> = std::collections::VecDeque::new();
    // More sealers than cores only holds more chunks in memory.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let parallel = opts.parallel.clamp(1, cores + 1);
    let mut chunks = Vec::new();
    let mut meta_chunks = Vec::new();
    let mut stream_bytes = 0u64;
    let mut failure: Option<SnapshotError> = None;
    while let Some(msg) = rx.recv().await {
        let (id, data, meta) = match msg {
            Ok(Produced::Chunk { id, data }) => (id, data, false),
            Ok(Produced::Meta { id, data }) => (id, data, true),
            Ok(Produced::Reused(range)) => {
                for r in prev.map_or(&[][..], |p| &p.chunks[range]) {
                    stream_bytes += r.1;
                    step.inc(r.1);
                    stats.chunks_total += 1;
                    chunks.push(r.clone());
                }
                continue;
            }
            Ok(Produced::Slice { range, start, len }) => {
                let old = prev.map_or(&[][..], |p| &p.chunks[range]);
                let before = chunks.len();
                slice_refs(old, start, len, &mut chunks);
                stream_bytes += len;
                step.inc(len);
                stats.chunks_total += (chunks.len() - before) as u64;
                stats.bytes_sliced += len;
                continue;
            }
            Err(e) => {
                failure = Some(SnapshotError::io(&src.root, e));
                break;
            }
        };
        let len = data.len() as u64;
        if meta {
            meta_chunks.push(entries::chunk_ref(&id, data.len()));
            stats.entry_bytes += len;
        } else {
            stream_bytes += len;
            step.inc(len);
            chunks.push(ChunkRef::whole(hex::encode(id), len));
            stats.chunks_total += 1;
        }
        // The index the backup started from, and what it uploaded since: no second
        // set of every chunk id in the bucket.
        if index.contains(&id) || !uploaded.insert(id) {
            continue;
        }
        if meta {
            stats.entry_bytes_new += len;
        } else {
            stats.chunks_new += 1;
            stats.bytes_new += len;
        }
        while tasks.len() >= parallel {
            let Some(oldest) = tasks.pop_front() else {
                break;
            };
            if let Err(e) = packers.add(oldest.await).await {
                failure = failure.or(Some(e));
            }
        }
        if failure.is_some() {
            break;
        }
        let keys = keys.clone();
        tasks.push_back(tokio::task::spawn_blocking(move || {
            let bytes = keys.seal_chunk(&id, &data);
            Sealed {
                id,
                plain: data.len(),
                bytes,
                meta,
            }
        }));
    }
    drop(rx);
    let walked = producer
        .await
        .map_err(|e| SnapshotError::Other(format!("scan task: {e}")));
    while let Some(oldest) = tasks.pop_front() {
        if let Err(e) = packers.add(oldest.await).await {
            failure = failure.or(Some(e));
        }
    }
    step.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    let walked = walked??;
    if stream_bytes != walked.stream_bytes {
        return Err(SnapshotError::Other(format!(
            "volume {}: chunked {stream_bytes} bytes, expected {}",
            src.name, walked.stream_bytes
        )));
    }
    stats.bytes_total += walked.stream_bytes;
    stats.files += walked.files;
    stats.files_skipped += walked.skipped;
    stats.files_changed += walked.changed;
    warnings.extend(walked.warnings);
    Ok((
        Volume {
            name: src.name.clone(),
            stream_bytes,
            entries: Vec::new(),
            chunks,
            meta: meta_chunks,
            wal_start: src.wal_start.clone(),
        },
        warnings,
    ))
}

/// Data chunks and entry chunks go to separate packs: a restore reads the whole
/// entry list before any data, and finds it in a few small packs.
struct Packers {
    data: Packer,
    meta: Packer,
}

impl Packers {
    async fn add(
        &mut self,
        done: std::result::Result<Sealed, tokio::task::JoinError>,
    ) -> Result<()> {
        let s = done.map_err(|e| SnapshotError::Other(format!("seal task: {e}")))?;
        let p = if s.meta {
            &mut self.meta
        } else {
            &mut self.data
        };
        p.add(s.id, s.plain, &s.bytes).await
    }

    async fn finish(self) -> Result<(Vec<pack::PackRec>, u64)> {
        let (mut packs, mut sent) = self.data.finish().await?;
        let (m, n) = self.meta.finish().await?;
        packs.extend(m);
        sent += n;
        Ok((packs, sent))
    }
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
        .flat_map(|v| v.chunks.iter().chain(&v.meta))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lookahead hints exactly the files a segment's plan will read (none of an
    /// unchanged segment, only the changed ones of a patched one, no empty file), and
    /// gives segments back in the order they came.
    #[test]
    fn lookahead_hints_only_what_will_be_read_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in [("a", 0), ("b", 10), ("c", 10), ("d", 10), ("e", 10)] {
            std::fs::write(dir.path().join(name), vec![7u8; len]).unwrap();
        }
        let entries = fsio::scan(dir.path()).unwrap().entries;
        let names: Vec<String> = entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(names, ["", "a", "b", "c", "d", "e"]);
        let mut look = Lookahead::new(dir.path());
        look.push(entries.clone(), SegmentPlan::Read);
        assert_eq!((look.held.files, look.held.bytes), (4, 40));
        look.push(entries.clone(), SegmentPlan::Reuse(0..1));
        assert_eq!(look.held.files, 4);
        let pieces = vec![
            Piece::Old { start: 0, len: 20 },
            Piece::New(3..4),
            Piece::Old { start: 30, len: 10 },
        ];
        look.push(entries.clone(), SegmentPlan::Patch(0..1, pieces));
        assert_eq!((look.held.files, look.held.entries), (5, 18));
        // Far from full: nothing is handed back until asked for all.
        assert!(look.pop(false).is_none());
        let order: Vec<&str> = std::iter::from_fn(|| look.pop(true))
            .map(|(_, p)| match p {
                SegmentPlan::Read => "read",
                SegmentPlan::Reuse(_) => "reuse",
                SegmentPlan::Patch(..) => "patch",
            })
            .collect();
        assert_eq!(order, ["read", "reuse", "patch"]);
        assert_eq!(
            (look.held.files, look.held.bytes, look.held.entries),
            (0, 0, 0)
        );
        // Full: the oldest segment comes back as soon as one more is queued.
        for _ in 0..=(AHEAD_ENTRIES / entries.len()) {
            look.push(entries.clone(), SegmentPlan::Reuse(0..1));
        }
        assert!(look.pop(false).is_some());
        let Lookahead { ahead, .. } = look;
        assert_eq!(ahead.finish(), 5, "the kernel got 4 + 1 hints");
    }
}
