//! The manifest (the JSON inside a sealed manifest object) and the bucket layout.
//!
//! Every volume is one byte stream: the data extents of its regular files,
//! concatenated in entry order, cut into content-defined chunks. A file therefore
//! owns the next `sum(extent lengths)` bytes of the stream, and restore writes files
//! front to back while chunks arrive. A stream piece is a whole chunk or, from
//! version 5, a slice of one (an incremental backup keeps the unchanged files of a
//! small-file group as slices of the group's old chunk and uploads only the changed
//! files). See docs/snapshot-format.md.

use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// JSON version written now. 2 adds `skipped` entries; the object around it also
/// changed (see crypto: the signature binds host and prefix). 3 keeps the JSON of 2
/// but its chunks live in packs (see `pack`), which older readers cannot find: they
/// refuse the version instead of reporting missing chunks. 4 moves each volume's
/// entry list out of the manifest into chunks of its own (see `entries`), so the
/// manifest stays small whatever the file count. 5 lets a chunk list name a slice of a
/// chunk (`[id, length, offset]`), which older readers would take for a whole chunk
/// of the wrong length. 1 to 4 still restore.
pub const MANIFEST_VERSION: u32 = 5;

/// Largest sealed manifest any reader accepts. A manifest entry compresses to well
/// under 100 bytes, so this holds tens of millions of files; it exists so a planted
/// object cannot make first boot allocate without limit.
pub const MANIFEST_OBJECT_MAX: u64 = 256 * 1024 * 1024;

/// Object keys inside the per-host prefix.
pub fn snapshots_dir(prefix: &str) -> String {
    join(prefix, "snapshots/")
}
pub fn snapshot_key(prefix: &str, id: &str) -> String {
    join(prefix, &format!("snapshots/{id}"))
}
pub fn chunks_dir(prefix: &str) -> String {
    join(prefix, "chunks/")
}
pub fn chunk_key(prefix: &str, id_hex: &str) -> String {
    // Two-hex-digit fan-out keeps listings and some servers' directory-backed stores
    // (Garage, MinIO on a filesystem) from holding millions of keys in one folder.
    join(
        prefix,
        &format!("chunks/{}/{}", &id_hex[..2.min(id_hex.len())], id_hex),
    )
}
pub fn packs_dir(prefix: &str) -> String {
    join(prefix, "packs/")
}
pub fn pack_key(prefix: &str, id_hex: &str) -> String {
    join(
        prefix,
        &format!("packs/{}/{}", &id_hex[..2.min(id_hex.len())], id_hex),
    )
}
pub fn index_dir(prefix: &str) -> String {
    join(prefix, "index/")
}
pub fn index_key(prefix: &str, id: &str) -> String {
    join(prefix, &format!("index/{id}"))
}
/// Shipped WAL files of one volume (`wal::ship`).
pub fn wal_dir(prefix: &str, volume: &str) -> String {
    join(prefix, &format!("wal/{volume}/"))
}
pub fn wal_root(prefix: &str) -> String {
    join(prefix, "wal/")
}
pub fn locks_dir(prefix: &str) -> String {
    join(prefix, "locks/")
}
pub fn lock_key(prefix: &str, id: &str) -> String {
    join(prefix, &format!("locks/{id}"))
}

fn join(prefix: &str, rest: &str) -> String {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        rest.to_string()
    } else {
        format!("{p}/{rest}")
    }
}

/// A file name that is UTF-8 in the common case (readable in the JSON) and base64
/// of the raw bytes otherwise: Linux names are bytes, JSON strings are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Name {
    Utf8(String),
    Bytes { b64: String },
}

impl Name {
    pub fn from_bytes(b: &[u8]) -> Name {
        match std::str::from_utf8(b) {
            Ok(s) => Name::Utf8(s.to_string()),
            Err(_) => Name::Bytes {
                b64: base64::engine::general_purpose::STANDARD.encode(b),
            },
        }
    }
    pub fn from_os(s: &OsStr) -> Name {
        Name::from_bytes(s.as_bytes())
    }
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        match self {
            Name::Utf8(s) => Some(s.as_bytes().to_vec()),
            Name::Bytes { b64 } => base64::engine::general_purpose::STANDARD.decode(b64).ok(),
        }
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Utf8(s) => f.write_str(s),
            Name::Bytes { b64 } => write!(f, "<base64:{b64}>"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A further name of a regular file already listed (`target` = its path).
    Hardlink,
    Fifo,
    Char,
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the volume root, '/'-separated; "" is the root itself.
    pub path: Name,
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (st_mode & 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_ns: u32,
    pub atime: i64,
    pub atime_ns: u32,
    /// Regular files: logical size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Regular files with holes: the data extents `[offset, length]` in the stream's
    /// order; absent means the whole file `[0, size]` is data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<[u64; 2]>>,
    /// Symlink target, or the path of the first name of a hard-linked file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Name>,
    /// Device number for char/block devices.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Extended attributes (name → base64 value), e.g. security.capability, user.*,
    /// system.posix_acl_access.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Change detection only (restore ignores them): ctime and inode at backup time,
    /// so the next backup can skip reading files that did not change.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub ctime: i64,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub ctime_ns: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ino: u64,
    /// Set when the file's bytes could not be read as scanned (it vanished, or
    /// something else now sits at its path): its stream bytes are zeros that restore
    /// reads past without creating the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// A regular file with further names (st_nlink > 1 when scanned): the only files a
    /// hard-link entry may name, so a streamed check remembers only these paths.
    #[serde(default, skip_serializing_if = "is_false")]
    pub linked: bool,
    /// Device of the scanned inode: the read compares it (with `ino`) to what it
    /// opened. Only meaningful within one backup, so never stored.
    #[serde(skip)]
    pub dev: u64,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Entry {
    /// The data extents this entry owns in the volume stream.
    pub fn data_extents(&self) -> Vec<[u64; 2]> {
        match (&self.kind, &self.extents) {
            (Kind::File, Some(e)) => e.clone(),
            (Kind::File, None) if self.size > 0 => vec![[0, self.size]],
            _ => Vec::new(),
        }
    }
    /// The symlink target or hard-link source as bytes (empty when absent).
    pub fn target_bytes(&self) -> Vec<u8> {
        self.target
            .as_ref()
            .and_then(|t| t.to_bytes())
            .unwrap_or_default()
    }
    pub fn stream_len(&self) -> u64 {
        self.data_extents().iter().map(|e| e[1]).sum()
    }
}

/// One piece of a volume stream: chunk id (hex of the keyed BLAKE3) and plaintext
/// length, and for a slice (version 5) the offset of the piece in the chunk's
/// plaintext. JSON: `[id, length]` for a whole chunk, `[id, length, offset]` for a
/// slice, whose length is then the slice's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef(pub String, pub u64, pub Option<u64>);

impl ChunkRef {
    /// A whole chunk.
    pub fn whole(id: String, len: u64) -> Self {
        ChunkRef(id, len, None)
    }
}

impl Serialize for ChunkRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(if self.2.is_some() { 3 } else { 2 })?;
        t.serialize_element(&self.0)?;
        t.serialize_element(&self.1)?;
        if let Some(off) = self.2 {
            t.serialize_element(&off)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ChunkRef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("[chunk id, length] or [chunk id, length, offset]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<ChunkRef, A::Error> {
                use serde::de::Error;
                let id: String = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let len: u64 = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                let off: Option<u64> = a.next_element()?;
                if a.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(4, &self));
                }
                Ok(ChunkRef(id, len, off))
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// Sum of the chunk lengths = sum of the entries' stream lengths.
    pub stream_bytes: u64,
    /// Versions 1–3: the entry list itself. Version 4: empty, see `meta`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    pub chunks: Vec<ChunkRef>,
    /// Version 4: the chunks of the entry stream (one JSON entry per line).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meta: Vec<ChunkRef>,
    /// A PostgreSQL data directory's first WAL segment a replay from this snapshot
    /// needs (the segment of its last checkpoint's redo point), when the volume ships
    /// WAL; older segments of the volume can go once no kept snapshot needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_start: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Logical bytes of file data in the snapshot.
    pub bytes_total: u64,
    /// Plaintext bytes of chunks this snapshot uploaded (not found in the bucket).
    pub bytes_new: u64,
    /// Bytes sent to S3 for those chunks (compressed + encrypted).
    pub bytes_uploaded: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Plaintext bytes of the volumes' entry lists (version 4), and of the entry
    /// chunks this snapshot uploaded; not part of the byte and chunk counts above.
    #[serde(default)]
    pub entry_bytes: u64,
    #[serde(default)]
    pub entry_bytes_new: u64,
    /// Pack objects this snapshot uploaded.
    #[serde(default)]
    pub packs_new: u64,
    /// Bytes of unchanged files kept as slices of older chunks (version 5): files
    /// whose small-file group changed elsewhere.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_sliced: u64,
    pub files: u64,
    pub duration_ms: u64,
    /// Files left out: vanished or replaced between scan and read, unreadable, or
    /// with a path too long to restore (each named in the backup's warnings).
    #[serde(default)]
    pub files_skipped: u64,
    /// Files whose size or mtime changed while they were read (only possible without
    /// an atomic snapshot).
    #[serde(default)]
    pub files_changed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    pub host: String,
    /// Seconds since the epoch (UTC) when the backup started.
    pub time: i64,
    pub tool: String,
    pub chunker: Chunker,
    /// Every object of this snapshot is under Object Lock until at least this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<i64>,
    pub stats: Stats,
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunker {
    pub algorithm: String,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Manifest {
    /// Every distinct chunk id the snapshot needs.
    pub fn chunk_ids(&self) -> std::collections::BTreeSet<&str> {
        self.volumes
            .iter()
            .flat_map(|v| v.chunks.iter().chain(&v.meta).map(|c| c.0.as_str()))
            .collect()
    }

    /// Internal consistency a restore relies on; a signed manifest from a buggy writer
    /// must still not make restore write out of bounds.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MANIFEST_VERSION).contains(&self.version) {
            return Err(format!("unsupported manifest version {}", self.version));
        }
        for v in &self.volumes {
            if v.name.is_empty() || v.name.contains('/') || v.name.starts_with('.') {
                return Err(format!("bad volume name {:?}", v.name));
            }
            let chunk_sum: u64 = v.chunks.iter().map(|c| c.1).sum();
            if chunk_sum != v.stream_bytes {
                return Err(format!(
                    "volume {}: chunks hold {chunk_sum} bytes, header {}",
                    v.name, v.stream_bytes
                ));
            }
            for c in v.chunks.iter().chain(&v.meta) {
                if c.0.len() != 64 || hex::decode(&c.0).is_err() {
                    return Err(format!("volume {}: bad chunk id {:?}", v.name, c.0));
                }
            }
            // Slices exist from version 5, in the data stream only; a slice's end is
            // checked against the chunk's real length when the chunk is located.
            for c in v.chunks.iter().filter(|c| c.2.is_some()) {
                if self.version < 5 {
                    return Err(format!(
                        "volume {}: version {} has no chunk slices",
                        v.name, self.version
                    ));
                }
                if c.1 == 0 || c.2.unwrap_or(0).checked_add(c.1).is_none() {
                    return Err(format!("volume {}: bad slice of chunk {}", v.name, c.0));
                }
            }
            if v.meta.iter().any(|c| c.2.is_some()) {
                return Err(format!("volume {}: entry chunks are never sliced", v.name));
            }
            // Version 4 lists entries only in `meta` (checked as they stream, before
            // restore writes anything); older versions hold them here.
            match (self.version >= 4, v.entries.is_empty(), v.meta.is_empty()) {
                (true, true, false) => {}
                (false, false, true) => {
                    let mut check = super::entries::EntryCheck::new(v);
                    for e in &v.entries {
                        check.push(e)?;
                    }
                    check.finish(v.stream_bytes)?;
                }
                _ => {
                    return Err(format!(
                        "volume {}: version {} keeps its entries {}",
                        v.name,
                        self.version,
                        if self.version >= 4 {
                            "in entry chunks"
                        } else {
                            "inline"
                        }
                    ))
                }
            }
        }
        Ok(())
    }
}

/// No absolute paths, no "..", no empty components: restore must never write
/// outside the volume directory whatever the manifest says.
pub fn safe_relative(p: &[u8]) -> bool {
    if p.is_empty() {
        return true;
    }
    if p[0] == b'/' || p.contains(&0) {
        return false;
    }
    p.split(|b| *b == b'/')
        .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// Snapshot ids sort by time: `YYYYMMDDTHHMMSS.mmmZ-<8 hex>` (milliseconds, so
/// snapshots taken within one second still list in order).
pub fn new_snapshot_id(unix_ms: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_ms.div_euclid(1000));
    format!(
        "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{:03}Z-{}",
        unix_ms.rem_euclid(1000),
        super::crypto::random_hex(4)
    )
}

/// Is `s` shaped like a snapshot id (so stray objects under snapshots/ are ignored)?
pub fn is_snapshot_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 29
        && b[8] == b'T'
        && b[15] == b'.'
        && b[19] == b'Z'
        && b[20] == b'-'
        && b[..8]
            .iter()
            .chain(&b[9..15])
            .chain(&b[16..19])
            .all(u8::is_ascii_digit)
        && b[21..].iter().all(|c| c.is_ascii_hexdigit())
}

/// (year, month, day, hour, minute, second) in UTC, proleptic Gregorian.
pub fn civil(unix: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        m,
        d,
        (secs / 3600) as u32,
        ((secs % 3600) / 60) as u32,
        (secs % 60) as u32,
    )
}

pub fn rfc3339(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn ids_and_paths() {
        let id = new_snapshot_id(1_700_000_000_042);
        assert!(is_snapshot_id(&id), "{id}");
        assert!(id.starts_with("20231114T221320.042Z-"), "{id}");
        assert!(!is_snapshot_id("20231114T221320.042Z-xyz"));
        assert!(safe_relative(b"a/b c/\xff"));
        for bad in [&b"/etc"[..], b"a/../b", b"..", b"a//b", b"./a"] {
            assert!(!safe_relative(bad));
        }
        assert_eq!(chunk_key("h/p", "abcd"), "h/p/chunks/ab/abcd");
        assert_eq!(Name::from_bytes(b"\xff").to_bytes().unwrap(), b"\xff");
    }
}
