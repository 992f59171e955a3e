//! A volume's entry list as a stream (manifest version 4).
//!
//! A volume of millions of files has an entry list of hundreds of MB: held in memory
//! (as versions 1–3 did, inline in the manifest) it alone breaks a 2 GB VPS. From
//! version 4 the list is a second byte stream per volume, one JSON object per line in
//! stream order, cut by the content-defined chunker into chunks that are sealed and
//! packed like file data (dedup included: an unchanged part of the tree costs nothing
//! the next night). The manifest lists those chunks; readers parse the list chunk by
//! chunk, so neither backup, restore nor check ever holds more than a few chunks of it.
//!
//! Validation without the whole list: the scan emits a depth-first walk with each
//! directory's children sorted by name bytes, so every rule restore relies on (the
//! parent is an earlier directory, no path twice, nothing below a symlink) is a check
//! against the stack of open directories. Hard links are the one back-reference;
//! version 4 marks files that have further names (`linked`), so only those paths are
//! remembered.

use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format::{safe_relative, ChunkRef, Entry, Kind, Volume};
use super::pack::Index;
use super::restore::{self, Fetch};
use super::store::Store;
use std::collections::{HashSet, VecDeque};

/// Where entry-list chunks end: after a line whose keyed path hash picks it (one in
/// META_ANCHOR) once the chunk holds META_LINES_MIN lines, or at META_MAX bytes.
/// A byte-content-defined cut (as for file data) puts each changed line in a chunk of
/// hundreds of lines, and a change spread over the tree then touches every chunk;
/// cutting on paths keeps every chunk without a changed line byte-identical, however
/// the changed lines' lengths moved. Only the writer cares: readers take any cuts.
pub const META_LINES_MIN: usize = 64;
const META_ANCHOR: u64 = 32;
pub const META_MAX: u32 = 1024 * 1024;

/// Largest ranged GET for entry chunks, and the most plaintext one may hold: they
/// compress tenfold and more (twentyfold for a directory of similar names), and every
/// fetched range is held decompressed until its entries are consumed. Bounded by
/// sealed bytes alone, one fetch held 20 MiB of entries.
const META_RANGE_MAX: u64 = 1024 * 1024;
const META_PLAIN_MAX: u64 = 4 * 1024 * 1024;
/// Entry fetches in flight ahead of the reader.
const META_PREFETCH: usize = 2;

/// Cuts the entry stream into chunks as lines are pushed, holding at most one chunk.
pub struct MetaChunker {
    buf: Vec<u8>,
    lines: usize,
    keys: Keys,
}

impl MetaChunker {
    pub fn new(keys: &Keys) -> MetaChunker {
        MetaChunker {
            buf: Vec::new(),
            lines: 0,
            keys: keys.clone(),
        }
    }

    /// Appends one entry; returns the chunk it closes, if any.
    pub fn push(&mut self, e: &Entry) -> Option<Vec<u8>> {
        encode(e, &mut self.buf);
        self.lines += 1;
        let cut = self.buf.len() >= META_MAX as usize
            || (self.lines >= META_LINES_MIN
                && super::backup::path_anchor(&self.keys, &e.path, 1, META_ANCHOR));
        if !cut {
            return None;
        }
        self.lines = 0;
        Some(std::mem::take(&mut self.buf))
    }

    /// The last chunk.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then_some(self.buf)
    }
}

/// One entry as a line of the stream.
pub fn encode(e: &Entry, out: &mut Vec<u8>) {
    // Serializing plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, e);
    out.push(b'\n');
}

/// Turns stream bytes, arriving in pieces, back into entries.
#[derive(Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        out: &mut Vec<Entry>,
    ) -> std::result::Result<(), String> {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            let line = if self.partial.is_empty() {
                &bytes[..nl]
            } else {
                self.partial.extend_from_slice(&bytes[..nl]);
                &self.partial[..]
            };
            let e: Entry =
                serde_json::from_slice(line).map_err(|e| format!("bad entry line: {e}"))?;
            out.push(e);
            self.partial.clear();
            bytes = &bytes[nl + 1..];
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() > META_MAX as usize * 4 {
            return Err("an entry line longer than 4 MiB".into());
        }
        Ok(())
    }

    pub fn finish(&self) -> std::result::Result<(), String> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err("the entry stream ends inside a line".into())
        }
    }
}

/// Reads a volume's entries in order, a chunk at a time: inline (versions 1–3) or
/// fetched from the bucket (version 4), every chunk verified as file data is.
pub struct EntryReader {
    inline: std::vec::IntoIter<Entry>,
    plan: VecDeque<Fetch>,
    inflight: VecDeque<tokio::task::JoinHandle<Result<Vec<bytes::Bytes>>>>,
    ready: VecDeque<bytes::Bytes>,
    lines: LineSplitter,
    store: Store,
    keys: Keys,
    volume: String,
    done: bool,
}

impl EntryReader {
    /// Fails, naming the chunk, when an entry chunk has no place in the bucket.
    pub fn new(store: &Store, keys: &Keys, index: &Index, v: &Volume) -> Result<EntryReader> {
        let plan = if v.meta.is_empty() {
            Vec::new()
        } else {
            restore::plan_bounded(index, &v.meta, META_RANGE_MAX, META_PLAIN_MAX)?
        };
        Ok(EntryReader {
            inline: v.entries.clone().into_iter(),
            plan: plan.into(),
            inflight: VecDeque::new(),
            ready: VecDeque::new(),
            lines: LineSplitter::default(),
            store: store.clone(),
            keys: keys.clone(),
            volume: v.name.clone(),
            done: false,
        })
    }

    fn bad(&self, reason: String) -> SnapshotError {
        SnapshotError::Other(format!("volume {}: entry list: {reason}", self.volume))
    }

    /// The next entries in stream order (one chunk's worth); `None` at the end.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Entry>>> {
        if self.inline.len() > 0 {
            return Ok(Some(self.inline.by_ref().take(4096).collect()));
        }
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(chunk) = self.ready.pop_front() {
                let mut out = Vec::new();
                self.lines.feed(&chunk, &mut out).map_err(|r| self.bad(r))?;
                if out.is_empty() {
                    continue;
                }
                return Ok(Some(out));
            }
            while self.inflight.len() < META_PREFETCH {
                let Some(f) = self.plan.pop_front() else {
                    break;
                };
                let (store, keys) = (self.store.clone(), self.keys.clone());
                self.inflight.push_back(tokio::spawn(async move {
                    restore::fetch(&store, &keys, &f).await
                }));
            }
            match self.inflight.pop_front() {
                Some(h) => {
                    let chunks = h
                        .await
                        .map_err(|e| SnapshotError::Other(format!("entry fetch task: {e}")))??;
                    self.ready.extend(chunks);
                }
                None => {
                    self.lines.finish().map_err(|r| self.bad(r))?;
                    self.done = true;
                }
            }
        }
    }
}

impl Drop for EntryReader {
    fn drop(&mut self) {
        for h in &self.inflight {
            h.abort();
        }
    }
}

/// Checks a volume's entries as they stream by: everything restore relies on to
/// write only inside the volume directory, in memory proportional to the tree's
/// depth (plus the paths of hard-linked files).
pub struct EntryCheck {
    volume: String,
    /// Open directories from the root down, each with its last child's name.
    stack: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The previous entry (path, kind): names the culprit when a path lies below a
    /// non-directory.
    last: Option<(Vec<u8>, Kind)>,
    /// Files a hard link may name.
    link_targets: HashSet<Vec<u8>>,
    /// Versions 1–3 do not mark linked files: every file is remembered (their lists
    /// are in memory anyway).
    remember_all_files: bool,
    pub entries: u64,
    pub files: u64,
    pub stream_bytes: u64,
}

impl EntryCheck {
    pub fn new(v: &Volume) -> EntryCheck {
        EntryCheck {
            volume: v.name.clone(),
            stack: Vec::new(),
            last: None,
            link_targets: HashSet::new(),
            remember_all_files: v.meta.is_empty(),
            entries: 0,
            files: 0,
            stream_bytes: 0,
        }
    }

    pub fn push(&mut self, e: &Entry) -> std::result::Result<(), String> {
        let v = &self.volume;
        let p = e.path.to_bytes().ok_or("bad base64 path")?;
        if !safe_relative(&p) {
            return Err(format!("volume {v}: unsafe path {}", e.path));
        }
        let first = self.entries == 0;
        if p.is_empty() != first || (first && e.kind != Kind::Dir) {
            return Err(format!(
                "volume {v}: the first entry, and only it, must be the root directory"
            ));
        }
        self.entries += 1;
        if !first {
            let k = p.iter().rposition(|b| *b == b'/');
            let (parent, name) = match k {
                Some(k) => (&p[..k], &p[k + 1..]),
                None => (&p[..0], &p[..]),
            };
            let Some(level) = self.stack.iter().rposition(|(d, _)| d == parent) else {
                return Err(match &self.last {
                    Some((lp, k)) if lp == parent && *k != Kind::Dir => format!(
                        "volume {v}: {} lies below a {k:?} entry (only directories hold entries)",
                        e.path
                    ),
                    _ => format!(
                        "volume {v}: {} comes before its parent directory, or after its \
                         parent's listing ended",
                        e.path
                    ),
                });
            };
            self.stack.truncate(level + 1);
            let prev = &mut self.stack[level].1;
            match prev.as_deref() {
                Some(n) if n == name => {
                    return Err(format!("volume {v}: {} is listed twice", e.path))
                }
                Some(n) if n > name => {
                    return Err(format!(
                        "volume {v}: {} is out of order (names sort by bytes)",
                        e.path
                    ))
                }
                _ => *prev = Some(name.to_vec()),
            }
        }
        match e.kind {
            Kind::Hardlink => {
                let t = e.target_bytes();
                if t.is_empty() || !safe_relative(&t) {
                    return Err(format!("volume {v}: bad hard link {}", e.path));
                }
                if !self.link_targets.contains(&t) {
                    return Err(format!(
                        "volume {v}: hard link {} does not name an earlier regular file",
                        e.path
                    ));
                }
            }
            Kind::File => {
                self.files += 1;
                if self.remember_all_files || e.linked {
                    self.link_targets.insert(p.clone());
                }
            }
            _ => {}
        }
        for x in e.data_extents() {
            if x[0].checked_add(x[1]).is_none_or(|end| end > e.size) {
                return Err(format!("volume {v}: extent past end of {}", e.path));
            }
            self.stream_bytes = self
                .stream_bytes
                .checked_add(x[1])
                .ok_or_else(|| format!("volume {v}: stream length overflows"))?;
        }
        if e.kind == Kind::Dir {
            self.stack.push((p.clone(), None));
        }
        self.last = Some((p, e.kind));
        Ok(())
    }

    /// After the last entry: the files' bytes must be exactly the data stream.
    pub fn finish(&self, stream_bytes: u64) -> std::result::Result<(), String> {
        if self.entries == 0 {
            return Err(format!("volume {}: no entries", self.volume));
        }
        if self.stream_bytes != stream_bytes {
            return Err(format!(
                "volume {}: files hold {} bytes, the chunks {stream_bytes}",
                self.volume, self.stream_bytes
            ));
        }
        Ok(())
    }
}

/// Streams a volume's entries through [`EntryCheck`]; the counts on success.
pub async fn check_volume(
    store: &Store,
    keys: &Keys,
    index: &Index,
    v: &Volume,
) -> Result<EntryCheck> {
    let mut check = EntryCheck::new(v);
    let mut r = EntryReader::new(store, keys, index, v)?;
    while let Some(batch) = r.next_batch().await? {
        for e in &batch {
            check.push(e).map_err(SnapshotError::Other)?;
        }
    }
    check.finish(v.stream_bytes).map_err(SnapshotError::Other)?;
    Ok(check)
}

/// The chunks of an entry stream, for the manifest (ids and lengths).
pub fn chunk_ref(id: &[u8; 32], len: usize) -> ChunkRef {
    ChunkRef::whole(hex::encode(id), len as u64)
}
