//! Listing, loading and restoring snapshots.
//!
//! Every chunk is located (index, pack listing, format-1 objects) before anything is
//! written. Chunks that lie next to each other in one pack are fetched with one ranged
//! GET of at most [`RANGE_MAX`] bytes (ranges of several packs may be fetched together,
//! at most that much in all). Consecutive GETs of one pack then meet on a multiple of
//! [`GET_ALIGN`] ([`link_aligned`]), which moves up to a block from one to the next.
//! Up to 16 such fetches are in flight, holding at most
//! [`FETCH_MEMORY`] together; each is decrypted and verified in its own buffer and
//! handed on, in stream order, as views of it to the writer (`fsio::write_volume`),
//! whose threads hold at most 16 MiB more (files over 1 MiB are copied into aligned
//! buffers there and written with `O_DIRECT`, see `fsio::direct`). A view keeps its
//! whole range alive, and a range is handed on as views only when they are at least
//! half of it (see [`fetch`]),
//! so a range whose views are all still queued pins at most twice them. The writer
//! queues them in stream order; only ranges some of whose views are already written
//! (at the queue's oldest end, and those of jobs a slow thread still holds) pin more
//! than that, each at most [`RANGE_MAX`]. So the data in flight stays near 130 MiB,
//! whatever the snapshot size.

use super::crypto::{Keys, Opened};
use super::error::{Result, SnapshotError};
use super::format::{self, ChunkRef, Manifest, Volume};
use super::fsio::{self, WriteOptions};
use super::pack::{Blob, Index, Location};
use super::store::Store;
use crate::progress::Progress;
use bytes::Bytes;
use futures_util::StreamExt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

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
    let (z, signed_host) = keys.open_manifest_zstd(id, &store.prefix, &bytes)?;
    drop(bytes);
    // Parsed as it decompresses: the JSON is never held whole beside what it parses to.
    let bad = |reason: String| SnapshotError::BadManifest {
        id: id.to_string(),
        reason,
    };
    let json = zstd::stream::read::Decoder::new(&z[..]).map_err(|e| bad(format!("zstd: {e}")))?;
    let m: Manifest = serde_json::from_reader(std::io::BufReader::new(json)).map_err(|e| {
        bad(match e.io_error_kind() {
            Some(_) => format!("zstd: {e}"),
            None => e.to_string(),
        })
    })?;
    drop(z);
    // Signed by this host's key, so written by a newer imgbuild, not damaged: it must
    // stop a restore rather than let it pass to an older snapshot (see is_integrity).
    if m.version > format::MANIFEST_VERSION {
        return Err(SnapshotError::NewerManifest {
            id: id.to_string(),
            version: m.version,
            supported: format::MANIFEST_VERSION,
        });
    }
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
    /// S3 requests the restore made, by kind, and bytes each way.
    pub requests: super::store::Requests,
}

/// Largest ranged GET: adjacent chunks of one pack are merged up to this size (an
/// eighth of a default pack). Also the most one gathered fetch holds: the plan keeps
/// ranges full even where an incremental snapshot interleaves old and new packs, so
/// this, not the chunk layout, sets the data in flight, and the memory left for the
/// manifest and index of a volume of millions of small-file groups.
pub const RANGE_MAX: u64 = 4 * 1024 * 1024;
/// Fetches in flight at most, whatever `parallel` asks. On Garage on 127.0.0.1 a
/// restore took 2.5 s with 2, 2.2 s with 4, 2.0 s with 8 and 1.8-1.9 s with 16: a
/// GET's latency, not the link, bounds each one.
const RANGES_IN_FLIGHT: usize = 16;
/// Memory the fetches in flight may hold together ([`Fetch::memory`]): compressed
/// chunks open to many times their size, so the count alone bounds nothing.
pub const FETCH_MEMORY: u64 = 64 << 20;
/// Most plaintext one data fetch opens to. Without it a range of well-compressed
/// files (logs) opened to 60 MiB: one task decompressed it alone, it took the whole
/// [`FETCH_MEMORY`], and so no other GET could start until the writer had taken all of
/// it; on the benchmark's logs that serialized the last 0.4 s of the restore.
pub const DATA_PLAIN_MAX: u64 = 8 << 20;
/// Chunks this close in one pack are merged, the bytes between them read and dropped:
/// a GET costs more than that much transfer.
const RANGE_GAP: u64 = 128 * 1024;

/// One request of a restore plan.
#[derive(Debug, Clone)]
pub enum Fetch {
    /// A format-1 chunk object.
    Object(ChunkRef),
    /// Bytes `start..start+len` of a pack, holding these chunks in stream order.
    /// Ranges made by [`plan`] have `lead` and `pass` 0; [`link_aligned`] sets them
    /// where it moves a GET boundary into a chunk, and such ranges are fetched with
    /// [`fetch_linked`], in plan order.
    Range {
        key: String,
        start: u64,
        len: u64,
        blobs: Vec<Blob>,
        /// The first `lead` bytes come from the previous fetch's GET, which read
        /// them: this GET starts at `start + lead`.
        lead: u64,
        /// This GET reads `pass` bytes past `start + len`, for the next fetch.
        pass: u64,
    },
    /// Several ranges (each a `Range`) fetched together, their chunks given back in
    /// stream order: `order[i]` = (range, blob in it) of the i-th chunk. An incremental
    /// snapshot interleaves chunks it reuses from old packs with the few new ones it
    /// wrote; fetched range by range in stream order, that costs two GETs per change.
    Gather {
        ranges: Vec<Fetch>,
        order: Vec<(u32, u32)>,
    },
}

impl Fetch {
    /// Memory the fetch holds once its chunks are opened: the bytes read, in which
    /// stored-raw chunks are decrypted in place, and the plaintext of compressed ones.
    pub fn memory(&self) -> u64 {
        match self {
            Fetch::Object(c) => 2 * c.1,
            // `lead`: the copy of the previous GET's last bytes, held until this
            // GET has read the rest.
            Fetch::Range {
                len,
                blobs,
                pass,
                lead,
                ..
            } => {
                len + pass
                    + lead
                    + blobs
                        .iter()
                        .filter(|b| {
                            u64::from(b.sealed)
                                != u64::from(b.plain) + super::crypto::CHUNK_OVERHEAD
                        })
                        .map(|b| u64::from(b.plain))
                        .sum::<u64>()
            }
            Fetch::Gather { ranges, .. } => ranges.iter().map(Fetch::memory).sum(),
        }
    }
}

fn parse_id(c: &ChunkRef) -> Result<[u8; 32]> {
    hex::decode(&c.0)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| SnapshotError::CorruptChunk {
            id: c.0.clone(),
            reason: "bad id".into(),
        })
}

/// Ranges one gathered fetch may hold.
const GATHER_RANGES: usize = 16;

/// The fetches being gathered: ranges of packs, and which blob of which range each
/// chunk (in stream order) is.
#[derive(Default)]
struct Window {
    ranges: Vec<(usize, u64, u64, Vec<Blob>)>,
    order: Vec<(u32, u32)>,
    bytes: u64,
    /// Plaintext bytes the fetch will hold once opened, and the most it may.
    plain: u64,
    plain_max: u64,
}

impl Window {
    fn new(plain_max: u64) -> Self {
        Window {
            plain_max,
            ..Window::default()
        }
    }

    /// Adds a chunk of pack `pack` if the window can take it.
    fn add(&mut self, pack: usize, blob: Blob, range_max: u64) -> bool {
        // The same chunk twice (equal files): fetched and opened once, so it takes
        // no more of the window.
        for (r, (p, _, _, blobs)) in self.ranges.iter().enumerate() {
            if *p != pack {
                continue;
            }
            if let Some(j) = blobs.iter().position(|b| b.offset == blob.offset) {
                self.order.push((r as u32, j as u32));
                return true;
            }
        }
        let plain = u64::from(blob.plain);
        if !self.order.is_empty() && self.plain + plain > self.plain_max {
            return false;
        }
        for (r, (p, start, len, blobs)) in self.ranges.iter_mut().enumerate() {
            if *p != pack {
                continue;
            }
            let end = *start + *len;
            let off = u64::from(blob.offset);
            if off >= end
                && off - end <= RANGE_GAP
                && blob.end() - *start <= range_max
                && self.bytes + (blob.end() - end) <= range_max
            {
                self.bytes += blob.end() - end;
                self.plain += plain;
                *len = blob.end() - *start;
                self.order.push((r as u32, blobs.len() as u32));
                blobs.push(blob);
                return true;
            }
        }
        let sealed = u64::from(blob.sealed);
        if !self.ranges.is_empty()
            && (self.ranges.len() >= GATHER_RANGES || self.bytes + sealed > range_max)
        {
            return false;
        }
        self.bytes += sealed;
        self.plain += plain;
        self.order.push((self.ranges.len() as u32, 0));
        self.ranges
            .push((pack, u64::from(blob.offset), sealed, vec![blob]));
        true
    }

    fn flush(&mut self, index: &Index, out: &mut Vec<Fetch>) {
        let w = std::mem::replace(self, Window::new(self.plain_max));
        let mut ranges: Vec<Fetch> = w
            .ranges
            .into_iter()
            .map(|(pack, start, len, blobs)| Fetch::Range {
                key: index.packs[pack].key.clone(),
                start,
                len,
                blobs,
                lead: 0,
                pass: 0,
            })
            .collect();
        let in_order = w
            .order
            .iter()
            .enumerate()
            .all(|(i, &(r, b))| r == 0 && b as usize == i);
        match ranges.len() {
            0 => {}
            1 if in_order => out.extend(ranges.pop()),
            _ => out.push(Fetch::Gather {
                ranges,
                order: w.order,
            }),
        }
    }
}

/// The requests that fetch `chunks` in order, at most `range_max` bytes each
/// unless one chunk is larger; fails, naming the chunk and its pack, when any chunk
/// has no place. Chunks close to each other in one pack share a ranged GET, and
/// ranges of several packs (at most `range_max` together) share one fetch.
pub fn plan(index: &Index, chunks: &[ChunkRef], range_max: u64) -> Result<Vec<Fetch>> {
    plan_bounded(index, chunks, range_max, u64::MAX)
}

/// As [`plan`], each fetch also holding at most `plain_max` bytes once its chunks are
/// opened (unless one chunk is larger): entry chunks compress tenfold and more, so a
/// range's sealed size says little about the memory its entries take.
pub fn plan_bounded(
    index: &Index,
    chunks: &[ChunkRef],
    range_max: u64,
    plain_max: u64,
) -> Result<Vec<Fetch>> {
    let mut out: Vec<Fetch> = Vec::new();
    let mut window = Window::new(plain_max);
    for c in chunks {
        let id = parse_id(c)?;
        match index.locate(&id) {
            None => {
                return Err(SnapshotError::MissingChunk {
                    id: c.0.clone(),
                    key: index.why_missing(&id),
                })
            }
            Some(Location::Object { .. }) if c.2.is_some() => {
                // Backups slice only packed chunks: a format-1 object's length is
                // known from the manifest alone, which a slice does not give.
                return Err(SnapshotError::CorruptChunk {
                    id: c.0.clone(),
                    reason: "the manifest names a slice of a format-1 chunk object".into(),
                });
            }
            Some(Location::Object { .. }) => {
                window.flush(index, &mut out);
                out.push(Fetch::Object(c.clone()));
            }
            Some(Location::Pack { pack, blob }) => {
                if let Some(off) = c.2 {
                    if off.saturating_add(c.1) > u64::from(blob.plain) {
                        return Err(SnapshotError::CorruptChunk {
                            id: c.0.clone(),
                            reason: format!(
                                "the manifest slices bytes {off}..{} of it, the index gives it {}",
                                off.saturating_add(c.1),
                                blob.plain
                            ),
                        });
                    }
                } else if u64::from(blob.plain) != c.1 {
                    return Err(SnapshotError::CorruptChunk {
                        id: c.0.clone(),
                        reason: format!(
                            "the index gives it {} bytes, the manifest {}",
                            blob.plain, c.1
                        ),
                    });
                }
                if !window.add(pack, blob, range_max) {
                    window.flush(index, &mut out);
                    window.add(pack, blob, range_max);
                }
            }
        }
    }
    window.flush(index, &mut out);
    Ok(out)
}

/// Where a restore's GETs of one pack meet: Garage, the self-hosted server this is
/// measured on, stores an object in blocks of 1 MiB (its default `block_size`),
/// compressed, and a GET that starts or ends inside a block reads and decompresses
/// the whole block, so two GETs meeting inside one both pay for it. Meeting at a
/// multiple of this costs Garage 12 % less CPU for a restore here (the raw GET of
/// benches/snapshot.sh, shifted off the blocks: 0.85 s against 0.75 s, six runs
/// each). MinIO's erasure-coded blocks are 1 MiB too, and it divides [`RANGE_MAX`].
pub const GET_ALIGN: u64 = 1 << 20;

/// Moves the boundary between two consecutive ranges of one pack that meet (the
/// second starts where the first ends) down to a multiple of `block`, so that the
/// two GETs do not both read the block around it. The chunks that end past the new
/// boundary move to the second range; the part of the first of them that lies below
/// the boundary is read by the first GET and handed on (`pass`, `lead`). Ranges of
/// gathered fetches, ranges that would be left without a chunk, and moves that would
/// take the second range's plaintext past `plain_max` ([`DATA_PLAIN_MAX`]: one fetch
/// opening far more than the others stalls the writer behind it) stay as they are.
pub fn link_aligned(plan: &mut [Fetch], block: u64, plain_max: u64) {
    for k in 1..plan.len() {
        let (head, tail) = plan.split_at_mut(k);
        let (
            Fetch::Range {
                key,
                start,
                len,
                blobs,
                lead,
                pass,
            },
            Fetch::Range {
                key: next_key,
                start: next_start,
                len: next_len,
                blobs: next_blobs,
                lead: next_lead,
                ..
            },
        ) = (&mut head[k - 1], &mut tail[0])
        else {
            continue;
        };
        let end = *start + *len;
        let cut = end / block * block;
        if key != next_key || *next_start != end || *next_lead != 0 || cut <= *start + *lead {
            continue;
        }
        // Blobs are in ascending offsets within a range.
        let Some(keep) = blobs.iter().position(|b| b.end() > cut).filter(|&k| k > 0) else {
            continue;
        };
        let plain = |bs: &[Blob]| bs.iter().map(|b| u64::from(b.plain)).sum::<u64>();
        if plain(&blobs[keep..]) + plain(next_blobs) > plain_max.max(plain(next_blobs)) {
            continue;
        }
        let moved: Vec<Blob> = blobs.split_off(keep);
        let x0 = u64::from(moved[0].offset);
        let next_end = *next_start + *next_len;
        if x0 < cut {
            *len = x0 - *start;
            *pass = cut - x0;
            *next_lead = cut - x0;
        } else {
            *len = blobs.last().map_or(0, |b| b.end()) - *start;
        }
        *next_start = x0;
        *next_len = next_end - x0;
        let mut merged = moved;
        merged.append(next_blobs);
        *next_blobs = merged;
    }
}

/// Loads the index and plans every selected volume; reads the headers of unindexed
/// packs when something is not found otherwise.
pub async fn plan_all(
    store: &Store,
    keys: &Keys,
    volumes: &[&Volume],
) -> Result<(Index, Vec<Vec<Fetch>>)> {
    let mut index = Index::load(store, keys).await?;
    let attempt = |index: &Index| -> Result<Vec<Vec<Fetch>>> {
        volumes
            .iter()
            .map(|v| {
                // The entry chunks must be found too; they are read separately.
                plan(index, &v.meta, RANGE_MAX)?;
                plan_bounded(index, &v.chunks, RANGE_MAX, DATA_PLAIN_MAX)
            })
            .collect()
    };
    match attempt(&index) {
        Ok(p) => Ok((index, p)),
        Err(SnapshotError::MissingChunk { .. }) if index.read_unindexed(store, keys).await? > 0 => {
            let p = attempt(&index)?;
            Ok((index, p))
        }
        Err(e) => Err(e),
    }
}

/// Fetches one planned request and verifies every chunk in it (AEAD tag, length,
/// keyed hash) before anything is written.
pub async fn fetch(store: &Store, keys: &Keys, f: &Fetch) -> Result<Vec<Bytes>> {
    fetch_linked(store, keys, f, None, None).await
}

/// The ends of the channels that carry a cut chunk's first bytes from one GET of a
/// [`link_aligned`] plan to the next, handed to each fetch in plan order.
#[derive(Default)]
pub struct Links {
    carry: Option<oneshot::Receiver<Vec<u8>>>,
}

type Ends = (
    Option<oneshot::Receiver<Vec<u8>>>,
    Option<oneshot::Sender<Vec<u8>>>,
);

impl Links {
    pub fn next(&mut self, f: &Fetch) -> Ends {
        let (lead, pass) = match f {
            Fetch::Range { lead, pass, .. } => (*lead, *pass),
            _ => (0, 0),
        };
        let from = if lead > 0 { self.carry.take() } else { None };
        let to = (pass > 0).then(|| {
            let (tx, rx) = oneshot::channel();
            self.carry = Some(rx);
            tx
        });
        (from, to)
    }
}

/// As [`fetch`], for a fetch of a [`link_aligned`] plan: `from` brings the `lead`
/// bytes the previous GET read, `to` takes the `pass` bytes this one reads for the
/// next. The chunk they belong to is verified whole, here, like any other.
pub async fn fetch_linked(
    store: &Store,
    keys: &Keys,
    f: &Fetch,
    from: Option<oneshot::Receiver<Vec<u8>>>,
    to: Option<oneshot::Sender<Vec<u8>>>,
) -> Result<Vec<Bytes>> {
    let (key, start, len, blobs, lead, pass) = match f {
        Fetch::Object(c) => return Ok(vec![fetch_chunk(store, keys, c).await?.into()]),
        Fetch::Range {
            key,
            start,
            len,
            blobs,
            lead,
            pass,
        } => (key, *start, *len, blobs, *lead, *pass),
        Fetch::Gather { ranges, order } => return gather(store, keys, ranges, order).await,
    };
    let unlinked = |what: &str| {
        SnapshotError::Other(format!(
            "restore plan: {what} at byte {start} of pack {key}"
        ))
    };
    if (lead > 0 && from.is_none()) || (pass > 0 && to.is_none()) || lead > len {
        return Err(unlinked("a range linked to its neighbours fetched alone"));
    }
    let mut attempt = 0;
    let mut bytes = loop {
        match store
            .get_range_after(key, start + lead, len - lead + pass, lead as usize)
            .await
        {
            Ok(Some(b)) => break b,
            Ok(None) => {
                return Err(SnapshotError::MissingChunk {
                    id: hex::encode(blobs[0].id),
                    key: format!("pack {key} not found"),
                })
            }
            // A short answer is a truncated pack: retrying cannot help.
            Err(e) if attempt < 3 && !e.to_string().contains("truncated") => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500 << attempt)).await;
            }
            // Named by the chunk the GET begins with, and by the bytes it asked for:
            // a pack cut short may end inside a later chunk of the range.
            Err(e) => {
                return Err(SnapshotError::CorruptChunk {
                    id: hex::encode(blobs[0].id),
                    reason: format!(
                        "{e} (reading bytes {}..{} of pack {key})",
                        start + lead,
                        start + len + pass
                    ),
                })
            }
        }
    };
    // The next GET waits for these: hand them on before this range is opened.
    if let Some(to) = to {
        let _ = to.send(bytes[bytes.len() - pass as usize..].to_vec());
        bytes.truncate(bytes.len() - pass as usize);
    }
    if let Some(from) = from {
        // The previous fetch failed when nothing comes; its own error is the one
        // reported, as it comes first in plan order.
        let head = from
            .await
            .map_err(|_| unlinked("the range before this one failed"))?;
        if head.len() as u64 != lead {
            return Err(unlinked(
                "the range before this one read a different length",
            ));
        }
        bytes[..lead as usize].copy_from_slice(&head);
    }
    let keys = keys.clone();
    let (key, blobs) = (key.clone(), blobs.clone());
    tokio::task::spawn_blocking(move || {
        // Each chunk is decrypted where it lies in the range; a stored-raw chunk's
        // plaintext stays there and is handed on as a view of the one buffer.
        let mut bytes = bytes;
        let mut opened = Vec::with_capacity(blobs.len());
        for b in &blobs {
            let at = (u64::from(b.offset) - start) as usize;
            let r = keys
                .open_chunk_in_place(
                    &b.id,
                    &mut bytes[at..at + b.sealed as usize],
                    b.plain as usize,
                )
                .map_err(|e| match e {
                    SnapshotError::CorruptChunk { id, reason } => SnapshotError::CorruptChunk {
                        id,
                        reason: format!("{reason} (in pack {key} at byte {})", b.offset),
                    },
                    e => e,
                })?;
            opened.push((at, r));
        }
        let whole = Bytes::from(bytes);
        // A view keeps the whole range alive. The chunks stored raw are handed on as
        // views when together they are at least half the range, so views pin at most
        // twice their size; in a range that is mostly compressed chunks (whose
        // plaintext lives in buffers of its own) they are copied out instead.
        let raw: usize = opened
            .iter()
            .map(|(_, r)| match r {
                Opened::Within(r) => r.len(),
                Opened::Owned(_) => 0,
            })
            .sum();
        let views = raw * 2 >= whole.len();
        Ok(opened
            .into_iter()
            .map(|(at, r)| match r {
                Opened::Within(r) if views => whole.slice(at + r.start..at + r.end),
                Opened::Within(r) => Bytes::copy_from_slice(&whole[at + r.start..at + r.end]),
                Opened::Owned(v) => Bytes::from(v),
            })
            .collect())
    })
    .await
    .map_err(|e| SnapshotError::Other(format!("verify task: {e}")))?
}

async fn gather(
    store: &Store,
    keys: &Keys,
    ranges: &[Fetch],
    order: &[(u32, u32)],
) -> Result<Vec<Bytes>> {
    // One range after the other: the fetches around this one already keep `parallel`
    // GETs busy, and more at once only hold more buffers.
    let mut fetched = Vec::with_capacity(ranges.len());
    for r in ranges {
        fetched.push(Box::pin(fetch(store, keys, r)).await?);
    }
    let mut uses: Vec<Vec<u32>> = fetched.iter().map(|c| vec![0; c.len()]).collect();
    for &(r, b) in order {
        uses[r as usize][b as usize] += 1;
    }
    let mut fetched: Vec<Vec<Option<Bytes>>> = fetched
        .into_iter()
        .map(|c| c.into_iter().map(Some).collect())
        .collect();
    let mut out = Vec::with_capacity(order.len());
    for &(r, b) in order {
        let (r, b) = (r as usize, b as usize);
        uses[r][b] -= 1;
        let slot = &mut fetched[r][b];
        let data = if uses[r][b] == 0 {
            slot.take()
        } else {
            slot.clone()
        };
        out.push(data.ok_or_else(|| SnapshotError::Other("gathered chunk used twice".into()))?);
    }
    Ok(out)
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
    super::fsio::limit_malloc_arenas();
    let start = Instant::now();
    let requests_before = store.requests();
    let mut bytes = 0;
    let mut files = 0;
    let mut warnings = Vec::new();
    let selected: Vec<&Volume> = m
        .volumes
        .iter()
        .filter(|v| opts.volumes.is_empty() || opts.volumes.contains(&v.name))
        .collect();
    // Every chunk has a place, and every entry list reads and checks out, before the
    // first directory is created. The lists are streamed here and again while
    // writing: reading them twice is cheap, holding them is not.
    let (index, plans) = plan_all(store, keys, &selected).await?;
    warnings.extend(index.problems.iter().map(|p| format!("warning: {p}")));
    for v in &selected {
        let c = super::entries::check_volume(store, keys, &index, v)
            .await
            .map_err(|e| match e {
                SnapshotError::Other(reason) => SnapshotError::BadManifest {
                    id: m.id.clone(),
                    reason,
                },
                e => e,
            })?;
        files += c.files;
    }
    let mut created: Vec<PathBuf> = Vec::new();
    for (v, plan) in selected.into_iter().zip(plans) {
        let vdir = into.join(&v.name);
        std::fs::create_dir_all(into).map_err(|e| SnapshotError::io(into, e))?;
        std::fs::create_dir(&vdir).map_err(|e| SnapshotError::io(&vdir, e))?;
        created.push(vdir.clone());
        use std::os::unix::fs::PermissionsExt;
        let r = match std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => restore_volume(store, keys, &index, v, plan, &vdir.join("_data"), opts).await,
            Err(e) => Err(SnapshotError::io(&vdir, e)),
        };
        let w = match r {
            Ok(w) => w,
            Err(e) => {
                // A failed restore leaves nothing half-written behind.
                for d in &created {
                    let _ = std::fs::remove_dir_all(d);
                }
                return Err(e);
            }
        };
        warnings.extend(w.into_iter().map(|w| format!("{}: {w}", v.name)));
        bytes += v.stream_bytes;
    }
    Ok(RestoreReport {
        id: m.id.clone(),
        time: m.time,
        bytes,
        files,
        seconds: start.elapsed().as_secs_f64(),
        warnings,
        requests: store.requests().since(&requests_before),
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
                    key: format!("object {key} not found"),
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

/// A spawned fetch that is cancelled when dropped, so a failed restore does not
/// leave GETs running behind it.
struct Task(tokio::task::JoinHandle<(Result<Vec<Bytes>>, Permit)>);

type Permit = std::result::Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>;

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::future::Future for Task {
    type Output = (Result<Vec<Bytes>>, Option<Permit>);
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok((r, permit)) => (r, Some(permit)),
            Err(e) => (Err(SnapshotError::Other(format!("fetch task: {e}"))), None),
        })
    }
}

/// A `BufRead` over verified chunks arriving in order from the fetchers.
struct ChunkStream {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
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

impl fsio::DataSource for ChunkStream {
    fn take(&mut self, max: usize) -> std::io::Result<Bytes> {
        if self.fill_buf()?.is_empty() {
            return Ok(Bytes::new());
        }
        let n = (self.cur.len() - self.pos).min(max);
        // A whole chunk goes on as it is; a part of one (a small file of a group) is
        // copied, since a view of it would keep the whole chunk alive in the queue.
        let out = if self.pos == 0 && n == self.cur.len() {
            self.cur.clone()
        } else {
            Bytes::copy_from_slice(&self.cur[self.pos..self.pos + n])
        };
        self.pos += n;
        Ok(out)
    }
}

/// Entries arriving in batches from the entry reader, for the walk.
struct EntryBatches {
    rx: mpsc::Receiver<Vec<format::Entry>>,
    cur: std::vec::IntoIter<format::Entry>,
}

impl Iterator for EntryBatches {
    type Item = format::Entry;
    fn next(&mut self) -> Option<format::Entry> {
        loop {
            if let Some(e) = self.cur.next() {
                return Some(e);
            }
            self.cur = self.rx.blocking_recv()?.into_iter();
        }
    }
}

// The stream of fetches yields spawned tasks on purpose: `buffered` awaits them in
// order while they run.
#[allow(clippy::async_yields_async)]
async fn restore_volume(
    store: &Store,
    keys: &Keys,
    index: &Index,
    v: &Volume,
    mut plan: Vec<Fetch>,
    root: &Path,
    opts: &RestoreOptions,
) -> Result<Vec<String>> {
    link_aligned(&mut plan, GET_ALIGN, DATA_PLAIN_MAX);
    let step = opts
        .progress
        .step(&format!("restore {}", v.name), Some(v.stream_bytes));
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let (etx, erx) = mpsc::channel::<Vec<format::Entry>>(2);
    let mut reader = super::entries::EntryReader::new(store, keys, index, v)?;
    let root: PathBuf = root.to_path_buf();
    let write = opts.write;
    let (ptx, mut prx) = mpsc::unbounded_channel::<u64>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut stream = ChunkStream {
            rx,
            cur: Bytes::new(),
            pos: 0,
        };
        let mut entries = EntryBatches {
            rx: erx,
            cur: Vec::new().into_iter(),
        };
        fsio::write_volume(&root, &mut entries, &mut stream, write, |n| {
            let _ = ptx.send(n);
        })
    });
    // The entry list and the data are fetched side by side; the writer takes from both.
    let feed_entries = async move {
        while let Some(batch) = reader.next_batch().await? {
            if etx.send(batch).await.is_err() {
                break; // the writer failed; its error is reported below
            }
        }
        Ok::<(), SnapshotError>(())
    };
    let feed_data = async {
        // Each fetch is a task of its own: a stream of futures is only polled while
        // this loop waits on it, so while it waits on the writer the responses of the
        // GETs in flight would stop being read and the server would stall on them.
        // Memory is taken in plan order before a fetch starts, and given back once
        // its chunks are handed to the writer: the fetch the writer waits for always
        // holds its share, so later ones can never starve it.
        let memory = Arc::new(tokio::sync::Semaphore::new(FETCH_MEMORY as usize >> 10));
        let mut links = Links::default();
        let mut fetches = Box::pin(
            futures_util::stream::iter(plan.iter())
                .then(|f| {
                    let (store, keys, f, memory) =
                        (store.clone(), keys.clone(), f.clone(), memory.clone());
                    let (from, to) = links.next(&f);
                    async move {
                        let kib = (f.memory().min(FETCH_MEMORY) >> 10).max(1) as u32;
                        let permit = memory.acquire_many_owned(kib).await;
                        Task(tokio::spawn(async move {
                            let r = fetch_linked(&store, &keys, &f, from, to).await;
                            (r, permit)
                        }))
                    }
                })
                .buffered(opts.parallel.clamp(1, RANGES_IN_FLIGHT)),
        );
        let mut failure = None;
        // The plan gives every piece's chunk in stream order; slices keep their part.
        let mut pieces = v.chunks.iter();
        'fetching: while let Some((r, _permit)) = fetches.next().await {
            while let Ok(n) = prx.try_recv() {
                step.inc(n);
            }
            match r {
                Ok(chunks) => {
                    for data in chunks {
                        let data = match pieces.next() {
                            Some(ChunkRef(id, len, Some(off))) => {
                                let (off, len) = (*off as usize, *len as usize);
                                match off.checked_add(len).filter(|end| *end <= data.len()) {
                                    // Copied: a slice is a small part of its chunk.
                                    Some(end) => Bytes::copy_from_slice(&data[off..end]),
                                    None => {
                                        failure = Some(SnapshotError::CorruptChunk {
                                            id: id.clone(),
                                            reason: format!(
                                                "{} bytes, the manifest slices past them",
                                                data.len()
                                            ),
                                        });
                                        break 'fetching;
                                    }
                                }
                            }
                            _ => data,
                        };
                        if tx.send(data).await.is_err() {
                            break 'fetching; // the writer failed; its error is reported below
                        }
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
        failure
    };
    let (entry_failure, failure) = tokio::join!(feed_entries, feed_data);
    let written = writer
        .await
        .map_err(|e| SnapshotError::Other(format!("writer task: {e}")))?;
    step.finish();
    // A fetch failure makes the writer see a short stream; the fetch error is the cause.
    if let Some(e) = failure {
        return Err(e);
    }
    entry_failure?;
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, offset: u32, sealed: u32) -> Blob {
        Blob {
            id: [n; 32],
            offset,
            sealed,
            plain: sealed - 42,
        }
    }

    fn range(key: &str, blobs: Vec<Blob>) -> Fetch {
        let start = u64::from(blobs[0].offset);
        Fetch::Range {
            key: key.into(),
            start,
            len: blobs.last().unwrap().end() - start,
            blobs,
            lead: 0,
            pass: 0,
        }
    }

    fn parts(f: &Fetch) -> (u64, u64, Vec<u8>, u64, u64) {
        match f {
            Fetch::Range {
                start,
                len,
                blobs,
                lead,
                pass,
                ..
            } => (
                *start,
                *len,
                blobs.iter().map(|b| b.id[0]).collect(),
                *lead,
                *pass,
            ),
            _ => unreachable!(),
        }
    }

    #[test]
    fn gets_are_moved_onto_block_boundaries() {
        // Pack "a": blobs 1-3 | 4-6, meeting at 1000, not a multiple of 256; blob 3
        // (700..1000) holds 768.
        let mut plan = vec![
            range(
                "a",
                vec![blob(1, 8, 300), blob(2, 308, 392), blob(3, 700, 300)],
            ),
            range(
                "a",
                vec![blob(4, 1000, 200), blob(5, 1200, 300), blob(6, 1500, 90)],
            ),
            // Another pack: never linked to pack "a".
            range("b", vec![blob(7, 8, 1000)]),
            // A range that starts after a gap: not linked.
            range("b", vec![blob(8, 1100, 500)]),
        ];
        link_aligned(&mut plan, 256, u64::MAX);
        // GET 1 reads 8..768 and hands 700..768 on to GET 2, which reads 768..1590:
        // the range after it is of another pack, so its end stays.
        assert_eq!(parts(&plan[0]), (8, 692, vec![1, 2], 0, 68));
        assert_eq!(parts(&plan[1]), (700, 890, vec![3, 4, 5, 6], 68, 0));
        assert_eq!(parts(&plan[2]), (8, 1000, vec![7], 0, 0));
        assert_eq!(parts(&plan[3]), (1100, 500, vec![8], 0, 0));

        // A chain: each GET starts where the previous one ended, on a block.
        let blobs: Vec<Blob> = (0..40u8)
            .map(|i| blob(i, 8 + u32::from(i) * 333, 333))
            .collect();
        let mut plan: Vec<Fetch> = blobs.chunks(7).map(|c| range("p", c.to_vec())).collect();
        link_aligned(&mut plan, 1024, u64::MAX);
        let mut get_end = 8;
        let mut order = Vec::new();
        for (k, f) in plan.iter().enumerate() {
            let (start, len, ids, lead, pass) = parts(f);
            assert_eq!(start + lead, get_end, "GETs meet");
            get_end = start + len + pass;
            assert!(
                get_end % 1024 == 0 || k == plan.len() - 1,
                "GET {k} ends off a block"
            );
            order.extend(ids);
        }
        assert_eq!(order, (0..40).collect::<Vec<u8>>(), "every chunk, in order");

        // A blob that ends past the boundary starting exactly on it: no lead.
        let mut plan = vec![
            range("c", vec![blob(1, 0, 512), blob(2, 512, 100)]),
            range("c", vec![blob(3, 612, 100)]),
        ];
        link_aligned(&mut plan, 512, u64::MAX);
        assert_eq!(parts(&plan[0]), (0, 512, vec![1], 0, 0));
        assert_eq!(parts(&plan[1]), (512, 200, vec![2, 3], 0, 0));

        // One chunk over the boundary and nothing below it: left as it is.
        let mut plan = vec![
            range("d", vec![blob(1, 100, 2000)]),
            range("d", vec![blob(2, 2100, 100)]),
        ];
        link_aligned(&mut plan, 1024, u64::MAX);
        assert_eq!(parts(&plan[0]), (100, 2000, vec![1], 0, 0));
        assert_eq!(parts(&plan[1]), (2100, 100, vec![2], 0, 0));

        // A move that would open the second range to more than the plaintext limit:
        // left as it is; with room for it, made.
        let two = || {
            vec![
                range("e", vec![blob(1, 0, 600), blob(2, 600, 600)]),
                range("e", vec![blob(3, 1200, 600)]),
            ]
        };
        let mut plan = two();
        link_aligned(&mut plan, 1024, 1000);
        assert_eq!(parts(&plan[0]), (0, 1200, vec![1, 2], 0, 0));
        assert_eq!(parts(&plan[1]), (1200, 600, vec![3], 0, 0));
        let mut plan = two();
        link_aligned(&mut plan, 1024, 2 * 558);
        assert_eq!(parts(&plan[0]), (0, 600, vec![1], 0, 424));
        assert_eq!(parts(&plan[1]), (600, 1200, vec![2, 3], 424, 0));
        assert_eq!(
            plan[1].memory(),
            1200 + 424,
            "the handed-on bytes count where they wait"
        );
    }
}
