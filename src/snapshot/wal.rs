//! PostgreSQL WAL files shipped between snapshots. Each file the archiver completes is
//! sealed with the host's keys and stored as `<prefix>/wal/<volume>/<file name>`,
//! written once (never replaced) and Object-Locked like a pack. A replay needs the
//! files from the snapshot's `wal_start` onwards; retention drops the ones before the
//! oldest kept snapshot's `wal_start`. The engine only moves bytes: which data
//! directory and spool they come from is the agent's business (`crate::agent::wal`).
//! Object layout: docs/snapshot-format.md, "WAL files".

use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::format;
use super::store::{DeleteOutcome, PutOutcome, Store};

/// The largest segment PostgreSQL allows (`--wal-segsize` 1024 MiB), plus the header.
pub const WAL_OBJECT_MAX: u64 = (1 << 30) + 4096;
const MAGIC: &[u8; 8] = b"IMGWAL01";
const HEADER: usize = MAGIC.len() + 8;

/// What a file name in a WAL archive is. Only these are shipped or fetched: a name is
/// also an object key, so anything else (a slash, a dot file) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalName {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the position (`XXXXXXXX` counts
    /// 4 GiB of WAL, `YYYYYYYY` segments inside it), which sorts like the LSN.
    Segment { tli: u32, pos: u64 },
    /// `TTTTTTTT.history`: where a timeline branched off (written at a promotion).
    History { tli: u32 },
    /// `<segment>.partial`: the last segment of a timeline a promotion left behind.
    Partial,
    /// `<segment>.XXXXXXXX.backup`: a base backup's label.
    Backup,
}

fn hex_u32(s: &str) -> Option<u32> {
    (s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
    .then(|| u32::from_str_radix(s, 16).ok())
    .flatten()
}

impl WalName {
    pub fn parse(name: &str) -> Option<WalName> {
        let seg = |s: &str| -> Option<(u32, u64)> {
            if s.len() != 24 {
                return None;
            }
            let tli = hex_u32(&s[..8])?;
            let hi = hex_u32(&s[8..16])?;
            let lo = hex_u32(&s[16..])?;
            Some((tli, (u64::from(hi) << 32) | u64::from(lo)))
        };
        if let Some((tli, pos)) = seg(name) {
            return Some(WalName::Segment { tli, pos });
        }
        if let Some(t) = name.strip_suffix(".history") {
            return hex_u32(t).map(|tli| WalName::History { tli });
        }
        if let Some(s) = name.strip_suffix(".partial") {
            return seg(s).map(|_| WalName::Partial);
        }
        if let Some(s) = name.strip_suffix(".backup") {
            let (s, off) = s.split_once('.')?;
            return (seg(s).is_some() && hex_u32(off).is_some()).then_some(WalName::Backup);
        }
        None
    }

    /// A segment's position, `None` for the other kinds.
    pub fn pos(&self) -> Option<u64> {
        match self {
            WalName::Segment { pos, .. } => Some(*pos),
            _ => None,
        }
    }
}

/// The segment file holding `lsn` on timeline `tli`, for segments of `seg_size` bytes.
pub fn segment_name(tli: u32, lsn: u64, seg_size: u64) -> String {
    let per_id = 0x1_0000_0000u64 / seg_size.max(1);
    let segno = lsn / seg_size.max(1);
    format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// The position after `pos`, for segments of `seg_size` bytes.
pub fn next_pos(pos: u64, seg_size: u64) -> u64 {
    let per_id = 0x1_0000_0000u64 / seg_size.max(1);
    let (hi, lo) = (pos >> 32, pos & 0xFFFF_FFFF);
    if lo + 1 >= per_id {
        (hi + 1) << 32
    } else {
        (hi << 32) | (lo + 1)
    }
}

fn aad(host: &str, volume: &str, name: &str) -> String {
    format!("{host}\0{volume}\0{name}")
}

/// Seals one WAL file. `completed` is when the archiver handed it over (seconds since
/// the epoch): a replay through this file recovers what was committed until then.
pub fn seal(
    keys: &Keys,
    host: &str,
    volume: &str,
    name: &str,
    data: &[u8],
    completed: i64,
) -> Vec<u8> {
    let mut plain = Vec::with_capacity(HEADER + data.len());
    plain.extend_from_slice(MAGIC);
    plain.extend_from_slice(&completed.to_le_bytes());
    plain.extend_from_slice(data);
    keys.seal_wal(&aad(host, volume, name), &plain)
}

/// Opens a sealed WAL file: its bytes and completion time.
pub fn open(
    keys: &Keys,
    host: &str,
    volume: &str,
    name: &str,
    key: &str,
    sealed: &[u8],
) -> Result<(Vec<u8>, i64)> {
    let bad = |reason: String| SnapshotError::BadWal {
        key: key.to_string(),
        reason,
    };
    let mut plain = keys
        .open_wal(&aad(host, volume, name), sealed, WAL_OBJECT_MAX as usize)
        .map_err(|r| {
            bad(format!(
                "{r}; or a file sealed for another host, volume or name"
            ))
        })?;
    if plain.len() < HEADER || &plain[..MAGIC.len()] != MAGIC {
        return Err(bad("no WAL header".into()));
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&plain[MAGIC.len()..HEADER]);
    plain.drain(..HEADER);
    Ok((plain, i64::from_le_bytes(t)))
}

/// Uploads one WAL file (written once: an existing object of that name is kept, and
/// `Exists` says so), locked from now when the bucket locks.
pub async fn ship(
    store: &Store,
    keys: &Keys,
    host: &str,
    volume: &str,
    name: &str,
    data: &[u8],
    completed: i64,
) -> Result<PutOutcome> {
    if WalName::parse(name).is_none() {
        return Err(SnapshotError::Other(format!(
            "{name}: not a WAL file name; not shipped"
        )));
    }
    let key = format!("{}{name}", format::wal_dir(&store.prefix, volume));
    let body = seal(keys, host, volume, name, data, completed);
    store
        .put(&key, body, true, Some(super::backup::now_unix()))
        .await
}

/// One shipped file as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub kind: WalName,
    pub size: u64,
}

/// The shipped files of `volume`, in name order; objects whose names are not WAL file
/// names are left out (and never fetched).
pub async fn list(store: &Store, volume: &str) -> Result<Vec<Listed>> {
    let dir = format::wal_dir(&store.prefix, volume);
    let mut out: Vec<Listed> = store
        .list(&dir)
        .await?
        .into_iter()
        .filter_map(|o| {
            let name = o.key.strip_prefix(&dir)?.to_string();
            let kind = WalName::parse(&name)?;
            Some(Listed {
                name,
                kind,
                size: o.size,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The files a replay from a snapshot with `wal_start` needs: every segment at or after
/// its position (on any timeline: a promotion after the snapshot continues on a new
/// one), and every timeline history. `gap` is the first position after `wal_start`
/// that no timeline has: replay stops before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needed {
    pub files: Vec<Listed>,
    pub gap: Option<u64>,
    /// Position of the last segment before any gap.
    pub last: Option<u64>,
}

pub fn needed(listed: &[Listed], wal_start: &str, seg_size: u64) -> Needed {
    let Some(start) = WalName::parse(wal_start).and_then(|n| n.pos()) else {
        return Needed::default();
    };
    let files: Vec<Listed> = listed
        .iter()
        .filter(|l| match l.kind {
            WalName::Segment { pos, .. } => pos >= start,
            WalName::History { .. } => true,
            _ => false,
        })
        .cloned()
        .collect();
    let mut have: Vec<u64> = files.iter().filter_map(|l| l.kind.pos()).collect();
    have.sort_unstable();
    have.dedup();
    let (mut last, mut gap) = (None, None);
    let mut want = start;
    for p in have {
        if p != want {
            gap = Some(want);
            break;
        }
        last = Some(p);
        want = next_pos(p, seg_size);
    }
    Needed { files, gap, last }
}

/// Downloads and opens one shipped file.
pub async fn fetch(
    store: &Store,
    keys: &Keys,
    host: &str,
    volume: &str,
    name: &str,
) -> Result<(Vec<u8>, i64)> {
    let key = format!("{}{name}", format::wal_dir(&store.prefix, volume));
    let sealed = store
        .get(&key, WAL_OBJECT_MAX + 1024)
        .await?
        .ok_or_else(|| SnapshotError::BadWal {
            key: key.clone(),
            reason: "listed but gone".into(),
        })?;
    open(keys, host, volume, name, &key, &sealed)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetainReport {
    pub deleted: u64,
    /// Still locked (or protected by a policy): retried by the next prune.
    pub refused: u64,
    pub kept: u64,
}

/// Deletes `volume`'s segments (and `.partial`/`.backup` files) before position
/// `keep_from`: no kept snapshot's replay starts before it. Timeline histories stay:
/// they are tiny and every replay may need them.
pub async fn retain(store: &Store, volume: &str, keep_from: u64) -> Result<RetainReport> {
    let dir = format::wal_dir(&store.prefix, volume);
    let mut r = RetainReport::default();
    for l in list(store, volume).await? {
        let pos = match l.kind {
            WalName::Segment { pos, .. } => Some(pos),
            WalName::Partial | WalName::Backup => {
                WalName::parse(&l.name[..24]).and_then(|n| n.pos())
            }
            WalName::History { .. } => None,
        };
        match pos {
            Some(p) if p < keep_from => match store.delete(&format!("{dir}{}", l.name)).await? {
                DeleteOutcome::Deleted => r.deleted += 1,
                DeleteOutcome::Refused => r.refused += 1,
            },
            _ => r.kept += 1,
        }
    }
    Ok(r)
}

/// The volumes that have shipped WAL under this prefix.
pub async fn volumes(store: &Store) -> Result<Vec<String>> {
    let root = format::wal_root(&store.prefix);
    let mut out: Vec<String> = store
        .list(&root)
        .await?
        .into_iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix(&root)?;
            Some(rest.split_once('/')?.0.to_string())
        })
        .collect();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_sort_by_position() {
        let a = WalName::parse("000000010000000000000005").unwrap();
        assert_eq!(a, WalName::Segment { tli: 1, pos: 5 });
        let b = WalName::parse("0000000200000001000000FF").unwrap();
        assert_eq!(
            b,
            WalName::Segment {
                tli: 2,
                pos: (1 << 32) | 0xFF
            }
        );
        assert_eq!(
            WalName::parse("00000002.history"),
            Some(WalName::History { tli: 2 })
        );
        assert_eq!(
            WalName::parse("000000010000000000000005.partial"),
            Some(WalName::Partial)
        );
        assert_eq!(
            WalName::parse("000000010000000000000005.00000028.backup"),
            Some(WalName::Backup)
        );
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000g5",
            "../00000001.history",
            "000000010000000000000005.tmp",
            ".000000010000000000000005",
            "0000000a0000000000000005",
        ] {
            assert_eq!(WalName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_names_follow_the_lsn() {
        let mib16 = 16 << 20;
        assert_eq!(
            segment_name(1, 0x0500_0028, mib16),
            "000000010000000000000005"
        );
        assert_eq!(
            segment_name(3, (2 << 32) | 0x0100_0000, mib16),
            "000000030000000200000001"
        );
        // 1 GiB segments: four per 4 GiB
        assert_eq!(
            segment_name(1, 0x1_4000_0000, 1 << 30),
            "000000010000000100000001"
        );
        assert_eq!(next_pos(0xFF, mib16), 1 << 32);
        assert_eq!(next_pos(0xFE, mib16), 0xFF);
        assert_eq!(next_pos(3, 1 << 30), 1 << 32);
    }

    fn l(name: &str) -> Listed {
        Listed {
            name: name.into(),
            kind: WalName::parse(name).unwrap(),
            size: 1,
        }
    }

    #[test]
    fn needed_starts_at_the_snapshot_and_stops_at_a_gap() {
        let listed = [
            l("000000010000000000000003"),
            l("000000010000000000000004"),
            l("000000010000000000000005"),
            l("00000002.history"),
            l("000000020000000000000005"),
            l("000000020000000000000006"),
            l("000000020000000000000008"),
        ];
        let n = needed(&listed, "000000010000000000000004", 16 << 20);
        let names: Vec<&str> = n.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "000000010000000000000004",
                "000000010000000000000005",
                "00000002.history",
                "000000020000000000000005",
                "000000020000000000000006",
                "000000020000000000000008"
            ]
        );
        assert_eq!(n.last, Some(6));
        assert_eq!(n.gap, Some(7));
        let n = needed(&listed[..3], "000000010000000000000004", 16 << 20);
        assert_eq!((n.last, n.gap), (Some(5), None));
        // nothing shipped yet at or after the start
        let n = needed(&listed[..1], "000000010000000000000004", 16 << 20);
        assert_eq!((n.last, n.gap, n.files.len()), (None, None, 0));
    }
}
