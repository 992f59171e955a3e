//! Packs: many sealed chunks in one object, and the index that says where each is.
//!
//! A pack is `PACK_MAGIC | blob… | sealed header | header length (u32 LE)`. Each blob
//! is a chunk sealed exactly as a format-1 chunk object (AEAD with the chunk id as
//! associated data), so one chunk is read and verified with a ranged GET of its own
//! bytes. The sealed header repeats the pack's table (chunk id, offset, lengths): the
//! index can be rebuilt from the packs alone. A pack is named by the keyed BLAKE3 of
//! all its bytes.
//!
//! Index objects (`index/<id>`) are signed and encrypted tables mapping every chunk of
//! the packs they list to its place. A backup writes its packs, then one index object
//! for them, then the manifest; prune writes one consolidated index before deleting
//! anything it replaces. Readers merge all index objects (newest first) and keep only
//! packs the listing shows; a chunk found nowhere else is looked for in the headers of
//! packs that no index lists. Format-1 chunk objects (`chunks/`) are still found.

use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format;
use super::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub const PACK_MAGIC: &[u8; 8] = b"IMGPACK1";
/// Default pack size. 32 MiB cuts the object count about 32-fold against one object
/// per 1 MiB chunk (restic packs 16 MiB, Kopia about 20, rustic starts at 32), keeps a
/// full backup of 100 GB near 3,200 PUTs, and two uploads in flight plus the pack
/// being filled stay under 100 MiB of memory on a 2 GB VPS.
pub const PACK_TARGET: usize = 32 * 1024 * 1024;
/// Accepted pack targets (the profile's `pack_size_mib`).
pub const PACK_TARGET_MIN: usize = 4 * 1024 * 1024;
pub const PACK_TARGET_MAX: usize = 128 * 1024 * 1024;
/// Largest pack any reader fetches whole (check --read-data): the largest target plus
/// one maximal chunk and its header.
pub const PACK_OBJECT_MAX: u64 = (PACK_TARGET_MAX as u64) + 8 * 1024 * 1024;
/// Largest index object accepted (tens of millions of chunks).
pub const INDEX_OBJECT_MAX: u64 = 512 * 1024 * 1024;
/// Bytes of one table row: chunk id, offset, sealed length, plain length.
const ROW: usize = 32 + 4 + 4 + 4;
const INDEX_TABLE_MAGIC: &[u8; 4] = b"IDX3";
const HEADER_TABLE_MAGIC: &[u8; 4] = b"PHD3";

/// One sealed chunk inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    pub id: [u8; 32],
    /// Byte offset of the sealed chunk in the pack.
    pub offset: u32,
    pub sealed: u32,
    pub plain: u32,
}

impl Blob {
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.sealed)
    }
}

/// A pack and its blobs, as an index (or the pack's own header) lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackRec {
    pub id: [u8; 32],
    pub blobs: Vec<Blob>,
}

fn put_row(out: &mut Vec<u8>, b: &Blob) {
    out.extend_from_slice(&b.id);
    out.extend_from_slice(&b.offset.to_le_bytes());
    out.extend_from_slice(&b.sealed.to_le_bytes());
    out.extend_from_slice(&b.plain.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn get_row(b: &[u8], at: usize) -> Option<Blob> {
    let r = b.get(at..at + ROW)?;
    Some(Blob {
        id: r[..32].try_into().ok()?,
        offset: u32_at(r, 32)?,
        sealed: u32_at(r, 36)?,
        plain: u32_at(r, 40)?,
    })
}

/// `IDX3 | pack count | (pack id | blob count | rows)…`
pub fn encode_index(packs: &[PackRec]) -> Vec<u8> {
    let rows: usize = packs.iter().map(|p| p.blobs.len()).sum();
    let mut out = Vec::with_capacity(8 + packs.len() * 36 + rows * ROW);
    out.extend_from_slice(INDEX_TABLE_MAGIC);
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        out.extend_from_slice(&p.id);
        out.extend_from_slice(&(p.blobs.len() as u32).to_le_bytes());
        for b in &p.blobs {
            put_row(&mut out, b);
        }
    }
    out
}

pub fn decode_index(t: &[u8]) -> std::result::Result<Vec<PackRec>, String> {
    let bad = || "malformed index table".to_string();
    if t.get(..4) != Some(INDEX_TABLE_MAGIC) {
        return Err("not an index table (bad magic)".into());
    }
    let n = u32_at(t, 4).ok_or_else(bad)? as usize;
    let mut at = 8;
    let mut packs = Vec::with_capacity(n.min(t.len() / 36));
    for _ in 0..n {
        let id: [u8; 32] = t
            .get(at..at + 32)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let m = u32_at(t, at + 32).ok_or_else(bad)? as usize;
        at += 36;
        if t.len() < at + m.checked_mul(ROW).ok_or_else(bad)? {
            return Err(bad());
        }
        let blobs = (0..m)
            .map(|i| get_row(t, at + i * ROW).ok_or_else(bad))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        at += m * ROW;
        packs.push(PackRec { id, blobs });
    }
    if at != t.len() {
        return Err("index table has trailing bytes".into());
    }
    Ok(packs)
}

/// Blobs must lie inside the pack's data area, after the magic, without overlapping.
fn check_layout(blobs: &[Blob], data_end: u64) -> std::result::Result<(), String> {
    let mut sorted: Vec<&Blob> = blobs.iter().collect();
    sorted.sort_by_key(|b| b.offset);
    let mut pos = PACK_MAGIC.len() as u64;
    for b in sorted {
        if u64::from(b.offset) < pos || b.end() > data_end {
            return Err(format!(
                "chunk {} at {}..{} overlaps another or lies outside the pack's data (0..{data_end})",
                hex::encode(b.id),
                b.offset,
                b.end()
            ));
        }
        if u64::from(b.sealed) > u64::from(b.plain) + super::crypto::CHUNK_OVERHEAD {
            return Err(format!(
                "chunk {}: sealed length exceeds its bound",
                hex::encode(b.id)
            ));
        }
        pos = b.end();
    }
    Ok(())
}

/// A pack being filled by a backup or a repack.
struct Building {
    bytes: Vec<u8>,
    blobs: Vec<Blob>,
}

impl Building {
    fn new(target: usize) -> Building {
        let mut bytes = Vec::with_capacity(target + 1024 * 1024);
        bytes.extend_from_slice(PACK_MAGIC);
        Building {
            bytes,
            blobs: Vec::new(),
        }
    }
}

/// Appends header and length; returns the pack's bytes, id and blobs.
pub fn finish_pack(keys: &Keys, mut bytes: Vec<u8>, blobs: Vec<Blob>) -> (Vec<u8>, PackRec) {
    let mut table = Vec::with_capacity(8 + blobs.len() * ROW);
    table.extend_from_slice(HEADER_TABLE_MAGIC);
    table.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    for b in &blobs {
        put_row(&mut table, b);
    }
    let header = keys.seal_pack_header(table);
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    let id = keys.pack_id(&bytes);
    (bytes, PackRec { id, blobs })
}

/// Reads a pack's table from its sealed header; `tail` is the end of the pack (at
/// least the header and its length), `size` the pack's full size.
pub fn parse_header(keys: &Keys, tail: &[u8], size: u64) -> std::result::Result<Vec<Blob>, String> {
    let n = tail.len();
    if n < 4 {
        return Err("shorter than a pack header".into());
    }
    let hlen = u32_at(tail, n - 4).unwrap_or(0) as usize;
    if hlen + 4 > n || (hlen as u64 + 4 + PACK_MAGIC.len() as u64) > size {
        return Err(format!(
            "header length {hlen} does not fit the pack ({size} bytes)"
        ));
    }
    let table = keys
        .open_pack_header(&tail[n - 4 - hlen..n - 4])
        .map_err(|e| format!("header: {e}"))?;
    if table.get(..4) != Some(HEADER_TABLE_MAGIC) {
        return Err("header table has a bad magic".into());
    }
    let m = u32_at(&table, 4).unwrap_or(0) as usize;
    if table.len() != 8 + m.saturating_mul(ROW) {
        return Err("header table has the wrong length".into());
    }
    let blobs: Vec<Blob> = (0..m)
        .filter_map(|i| get_row(&table, 8 + i * ROW))
        .collect();
    check_layout(&blobs, size - 4 - hlen as u64)?;
    Ok(blobs)
}

/// How many bytes of a pack's end hold its header and length.
pub fn header_span(tail: &[u8]) -> Option<u64> {
    let n = tail.len();
    (n >= 4).then(|| u64::from(u32_at(tail, n - 4).unwrap_or(0)) + 4)
}

/// Fetches and parses the header of a pack of `size` bytes: one ranged GET of the last
/// 64 KiB, a second one when the header is longer.
pub async fn read_header(store: &Store, keys: &Keys, key: &str, size: u64) -> Result<Vec<Blob>> {
    let bad = |why: String| SnapshotError::Other(format!("pack {key}: {why}"));
    let take = size.min(64 * 1024);
    let tail = store
        .get_range(key, size - take, take)
        .await?
        .ok_or_else(|| bad("vanished while being read".into()))?;
    let span = header_span(&tail).ok_or_else(|| bad("too short".into()))?;
    let tail = if span > take && span <= size && span <= 64 * 1024 * 1024 {
        store
            .get_range(key, size - span, span)
            .await?
            .ok_or_else(|| bad("vanished while being read".into()))?
    } else {
        tail
    };
    parse_header(keys, &tail, size).map_err(bad)
}

/// Collects sealed chunks into packs and uploads each pack when it reaches the target,
/// a bounded number at a time.
pub struct Packer {
    store: Store,
    keys: Keys,
    target: usize,
    retain_from: i64,
    cur: Option<Building>,
    uploads: JoinSet<Result<(PackRec, u64)>>,
    permits: Arc<Semaphore>,
    done: Vec<PackRec>,
    bytes_uploaded: u64,
}

impl Packer {
    /// `retain_from`: the time Object Lock retention is counted from.
    pub fn new(
        store: &Store,
        keys: &Keys,
        target: usize,
        uploads: usize,
        retain_from: i64,
    ) -> Packer {
        Packer {
            store: store.clone(),
            keys: keys.clone(),
            target: target.clamp(PACK_TARGET_MIN, PACK_TARGET_MAX),
            retain_from,
            cur: None,
            uploads: JoinSet::new(),
            permits: Arc::new(Semaphore::new(uploads.max(1))),
            done: Vec::new(),
            bytes_uploaded: 0,
        }
    }

    /// Adds one sealed chunk; uploads the pack when it is full.
    pub async fn add(&mut self, id: [u8; 32], plain: usize, sealed: &[u8]) -> Result<()> {
        let target = self.target;
        let b = self.cur.get_or_insert_with(|| Building::new(target));
        b.blobs.push(Blob {
            id,
            offset: b.bytes.len() as u32,
            sealed: sealed.len() as u32,
            plain: plain as u32,
        });
        b.bytes.extend_from_slice(sealed);
        if b.bytes.len() >= self.target {
            self.flush().await?;
        }
        self.reap()
    }

    fn reap(&mut self) -> Result<()> {
        while let Some(r) = self.uploads.try_join_next() {
            self.collect(r)?;
        }
        Ok(())
    }

    fn collect(
        &mut self,
        r: std::result::Result<Result<(PackRec, u64)>, tokio::task::JoinError>,
    ) -> Result<()> {
        let (rec, n) = r.map_err(|e| SnapshotError::Other(format!("pack upload task: {e}")))??;
        self.bytes_uploaded += n;
        self.done.push(rec);
        Ok(())
    }

    /// Closes the current pack (if it holds anything) and starts its upload.
    pub async fn flush(&mut self) -> Result<()> {
        let Some(b) = self.cur.take() else {
            return Ok(());
        };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| SnapshotError::Other(e.to_string()))?;
        let (store, keys, from) = (self.store.clone(), self.keys.clone(), self.retain_from);
        self.uploads.spawn(async move {
            let _permit = permit;
            let (bytes, rec) =
                tokio::task::spawn_blocking(move || finish_pack(&keys, b.bytes, b.blobs))
                    .await
                    .map_err(|e| SnapshotError::Other(format!("pack task: {e}")))?;
            let n = bytes.len() as u64;
            let key = format::pack_key(&store.prefix, &hex::encode(rec.id));
            store.put(&key, bytes, false, Some(from)).await?;
            Ok((rec, n))
        });
        Ok(())
    }

    /// Uploads what is left and waits for every upload; returns the packs written and
    /// the bytes sent.
    pub async fn finish(mut self) -> Result<(Vec<PackRec>, u64)> {
        let flushed = self.flush().await;
        let mut first_err = flushed.err();
        while let Some(r) = self.uploads.join_next().await {
            if let Err(e) = self.collect(r) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((self.done, self.bytes_uploaded)),
        }
    }

    /// Bytes held in memory by the pack being filled.
    pub fn pending(&self) -> usize {
        self.cur.as_ref().map_or(0, |b| b.bytes.len())
    }
}

/// Writes one index object for `packs` under a fresh id; returns its key.
pub async fn write_index(
    store: &Store,
    keys: &Keys,
    host: &str,
    id: &str,
    packs: &[PackRec],
    retain_from: i64,
) -> Result<String> {
    let table = encode_index(packs);
    let sealed = keys.seal_index(id, host, &store.prefix, &table)?;
    let key = format::index_key(&store.prefix, id);
    match store.put(&key, sealed, true, Some(retain_from)).await? {
        super::store::PutOutcome::Created => Ok(key),
        super::store::PutOutcome::Exists => Err(SnapshotError::Other(format!(
            "index {key} already exists (id collision); nothing overwritten"
        ))),
    }
}

/// A pack the listing shows.
#[derive(Debug, Clone)]
pub struct ListedPack {
    pub id: [u8; 32],
    pub key: String,
    pub size: u64,
    pub last_modified: Option<i64>,
    /// From an index object, or read from the pack's own header; `None` when no index
    /// lists the pack and its header was not read (yet).
    pub blobs: Option<Vec<Blob>>,
    /// Listed by an index object (as opposed to read from its header).
    pub indexed: bool,
}

/// Where a chunk can be read from.
#[derive(Debug, Clone)]
pub enum Location {
    Pack {
        pack: usize,
        blob: Blob,
    },
    /// A format-1 chunk object.
    Object {
        key: String,
    },
}

/// Everything the bucket says about where chunks are: the merged index objects, the
/// packs listed, and the format-1 chunk objects.
#[derive(Debug, Default)]
pub struct Index {
    prefix: String,
    pub packs: Vec<ListedPack>,
    by_id: HashMap<[u8; 32], usize>,
    chunks: HashMap<[u8; 32], (u32, u32)>,
    /// Format-1 chunk objects: id → size.
    pub legacy: HashMap<[u8; 32], (u64, Option<i64>)>,
    /// Index objects read (keys).
    pub objects: Vec<String>,
    /// Chunks whose only recorded place is a pack that is missing or too short.
    lost: HashMap<[u8; 32], String>,
    /// Index objects that could not be read or verified, and other inconsistencies.
    pub problems: Vec<String>,
}

fn parse_hex_name(key: &str) -> Option<[u8; 32]> {
    hex::decode(key.rsplit('/').next()?).ok()?.try_into().ok()
}

impl Index {
    /// Lists packs, index objects and format-1 chunks, and reads every index object.
    pub async fn load(store: &Store, keys: &Keys) -> Result<Index> {
        let mut ix = Index {
            prefix: store.prefix.clone(),
            ..Index::default()
        };
        for o in store.list(&format::packs_dir(&store.prefix)).await? {
            let Some(id) = parse_hex_name(&o.key) else {
                continue;
            };
            ix.by_id.insert(id, ix.packs.len());
            ix.packs.push(ListedPack {
                id,
                key: o.key,
                size: o.size,
                last_modified: o.last_modified,
                blobs: None,
                indexed: false,
            });
        }
        for o in store.list(&format::chunks_dir(&store.prefix)).await? {
            if let Some(id) = parse_hex_name(&o.key) {
                ix.legacy.insert(id, (o.size, o.last_modified));
            }
        }
        let dir = format::index_dir(&store.prefix);
        let mut ids: Vec<String> = store
            .list(&dir)
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&dir).map(str::to_string))
            .filter(|id| format::is_snapshot_id(id))
            .collect();
        // Newest first: after a repack the new places win over the old ones.
        ids.sort_by(|a, b| b.cmp(a));
        for id in ids {
            let key = format::index_key(&store.prefix, &id);
            let Some(bytes) = store.get(&key, INDEX_OBJECT_MAX).await? else {
                continue; // removed by a concurrent prune after the listing
            };
            let table = match keys.open_index(&id, &store.prefix, &bytes) {
                Ok((table, host)) => match keys.host().filter(|h| *h != host) {
                    Some(h) => Err(format!("written by host {host}, not {h}")),
                    None => decode_index(&table),
                },
                Err(e) => Err(e),
            };
            match table {
                Ok(packs) => {
                    ix.objects.push(key);
                    ix.merge(packs);
                }
                Err(e) => ix.problems.push(format!("index {key}: {e}")),
            }
        }
        Ok(ix)
    }

    fn merge(&mut self, packs: Vec<PackRec>) {
        for p in packs {
            let Some(&i) = self.by_id.get(&p.id) else {
                let hexid = hex::encode(p.id);
                for b in &p.blobs {
                    self.lost
                        .insert(b.id, format!("pack {hexid} is missing from the bucket"));
                }
                continue;
            };
            if self.packs[i].blobs.is_some() {
                continue; // listed by a newer index already
            }
            let size = self.packs[i].size;
            let data_end = size.saturating_sub(4);
            if let Err(e) = check_layout(&p.blobs, data_end) {
                let why = format!(
                    "pack {} ({size} bytes) does not match its index (truncated?): {e}",
                    self.packs[i].key
                );
                for b in &p.blobs {
                    self.lost.insert(b.id, why.clone());
                }
                self.problems.push(why);
                continue;
            }
            self.add_blobs(i, p.blobs, true);
        }
    }

    /// Records the blobs of pack `i` (read from its header by the caller).
    pub fn adopt(&mut self, i: usize, blobs: Vec<Blob>) {
        self.add_blobs(i, blobs, false);
    }

    fn add_blobs(&mut self, i: usize, blobs: Vec<Blob>, indexed: bool) {
        for (j, b) in blobs.iter().enumerate() {
            self.chunks.entry(b.id).or_insert((i as u32, j as u32));
        }
        self.packs[i].blobs = Some(blobs);
        self.packs[i].indexed = indexed;
    }

    /// Reads the headers of listed packs no index mentions and adds their chunks
    /// (lost index objects, an interrupted prune). Returns how many were read.
    pub async fn read_unindexed(&mut self, store: &Store, keys: &Keys) -> Result<usize> {
        let todo: Vec<usize> = (0..self.packs.len())
            .filter(|&i| self.packs[i].blobs.is_none())
            .collect();
        for &i in &todo {
            let (key, size) = (self.packs[i].key.clone(), self.packs[i].size);
            match read_header(store, keys, &key, size).await {
                Ok(blobs) => self.add_blobs(i, blobs, false),
                Err(e) => self.problems.push(e.to_string()),
            }
        }
        Ok(todo.len())
    }

    pub fn locate(&self, id: &[u8; 32]) -> Option<Location> {
        if let Some(&(p, b)) = self.chunks.get(id) {
            let blob = self.packs[p as usize].blobs.as_ref()?[b as usize];
            return Some(Location::Pack {
                pack: p as usize,
                blob,
            });
        }
        self.legacy.contains_key(id).then(|| Location::Object {
            key: format::chunk_key(&self.prefix, &hex::encode(id)),
        })
    }

    /// Why a chunk cannot be found, for the error message.
    pub fn why_missing(&self, id: &[u8; 32]) -> String {
        self.lost
            .get(id)
            .cloned()
            .unwrap_or_else(|| "no index, pack or chunk object holds it".into())
    }

    /// Whether the chunk lies in a pack (and so can be sliced by a ranged read).
    pub fn packed(&self, id: &[u8; 32]) -> bool {
        self.chunks.contains_key(id)
    }

    pub fn contains(&self, id: &[u8; 32]) -> bool {
        self.chunks.contains_key(id) || self.legacy.contains_key(id)
    }

    /// How many chunk ids have a place (in a pack or a format-1 object), and how many
    /// of those `referenced` rejects, without a second set of every id.
    pub fn count_ids(&self, referenced: impl Fn(&[u8; 32]) -> bool) -> (u64, u64) {
        let ids = self.chunks.keys().chain(
            self.legacy
                .keys()
                .filter(|id| !self.chunks.contains_key(*id)),
        );
        ids.fold((0, 0), |(n, u), id| (n + 1, u + u64::from(!referenced(id))))
    }

    /// The object holding a chunk (pack or format-1 object), with the prefix.
    pub fn object_key(&self, id: &[u8; 32]) -> Option<String> {
        match self.locate(id)? {
            Location::Pack { pack, .. } => Some(self.packs[pack].key.clone()),
            Location::Object { key } => Some(key),
        }
    }
}
