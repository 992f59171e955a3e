//! Reading a volume directory into entries + one data stream, and writing it back.
//!
//! Low-level calls (xattrs, lchown, mknod, utimensat, SEEK_DATA) go through libc
//! because std has no portable form for them and these are Linux-only hosts.

use super::error::{Result, SnapshotError};
use super::format::{Entry, Kind, Name};
use base64::Engine;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SnapshotError::Other(format!("{}: NUL byte in path", p.display())))
}

fn last_os_error(p: &Path) -> SnapshotError {
    SnapshotError::io(p, std::io::Error::last_os_error())
}

fn join_rel(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// All extended attributes of `p` (not following symlinks).
pub fn read_xattrs(p: &Path) -> Result<BTreeMap<String, String>> {
    let c = cpath(p)?;
    let mut out = BTreeMap::new();
    // SAFETY: c is a valid NUL-terminated path; a null buffer asks for the size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if n <= 0 {
        // ENOTSUP (filesystem without xattrs) is the same as "none".
        return Ok(out);
    }
    let mut names = vec![0u8; n as usize];
    // SAFETY: the buffer is as large as we tell the kernel.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Ok(out);
    }
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: valid C strings; null buffer asks for the size.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            continue;
        }
        let mut val = vec![0u8; len as usize];
        // SAFETY: buffer sized to the reported length.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if len < 0 {
            continue;
        }
        val.truncate(len as usize);
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            base64::engine::general_purpose::STANDARD.encode(&val),
        );
    }
    Ok(out)
}

/// Data extents of a sparse file via SEEK_DATA/SEEK_HOLE; None when it has no holes.
fn data_extents(f: &File, size: u64) -> Option<Vec<[u64; 2]>> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size = size as i64;
    while pos < size {
        // SAFETY: fd is an open file; lseek has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole up to the end
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        if end > data {
            out.push([data as u64, (end - data) as u64]);
        }
        pos = end;
    }
    if out.len() == 1 && out[0] == [0, size as u64] {
        None
    } else {
        Some(out)
    }
}

/// Walks `root` (not following symlinks, children sorted by name bytes) and returns
/// the entries in stream order. Sockets are skipped: they are recreated by whoever
/// listens on them.
pub fn scan(root: &Path) -> Result<(Vec<Entry>, Vec<String>)> {
    let mut entries = Vec::new();
    let mut warnings = Vec::new();
    let mut inodes: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    scan_into(root, Vec::new(), &mut entries, &mut inodes, &mut warnings)?;
    Ok((entries, warnings))
}

fn scan_into(
    root: &Path,
    rel: Vec<u8>,
    out: &mut Vec<Entry>,
    inodes: &mut HashMap<(u64, u64), Vec<u8>>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let path = join_rel(root, &rel);
    let md = std::fs::symlink_metadata(&path).map_err(|e| SnapshotError::io(&path, e))?;
    let ft = md.file_type();
    let mut e = Entry {
        path: Name::from_bytes(&rel),
        kind: Kind::File,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_ns: md.mtime_nsec() as u32,
        atime: md.atime(),
        atime_ns: md.atime_nsec() as u32,
        size: 0,
        extents: None,
        target: None,
        rdev: 0,
        xattrs: read_xattrs(&path)?,
        ctime: md.ctime(),
        ctime_ns: md.ctime_nsec() as u32,
        ino: md.ino(),
    };
    if ft.is_dir() {
        e.kind = Kind::Dir;
        out.push(e);
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(&path)
            .map_err(|e| SnapshotError::io(&path, e))?
            .map(|d| d.map(|d| d.file_name().as_bytes().to_vec()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| SnapshotError::io(&path, e))?;
        names.sort();
        for n in names {
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&n);
            scan_into(root, child, out, inodes, warnings)?;
        }
        return Ok(());
    }
    if ft.is_symlink() {
        e.kind = Kind::Symlink;
        let t = std::fs::read_link(&path).map_err(|e| SnapshotError::io(&path, e))?;
        e.target = Some(Name::from_os(t.as_os_str()));
    } else if ft.is_file() {
        if md.nlink() > 1 {
            if let Some(first) = inodes.get(&(md.dev(), md.ino())) {
                e.kind = Kind::Hardlink;
                e.target = Some(Name::from_bytes(first));
                e.xattrs.clear();
                out.push(e);
                return Ok(());
            }
            inodes.insert((md.dev(), md.ino()), rel.clone());
        }
        e.size = md.len();
        // Only files with fewer allocated blocks than their size can have holes;
        // asking every file would cost two syscalls each for nothing.
        if md.blocks() * 512 < md.len() {
            match File::open(&path) {
                Ok(f) => e.extents = data_extents(&f, md.len()),
                Err(err) => warnings.push(format!("{}: {err}", path.display())),
            }
        }
    } else if ft.is_fifo() {
        e.kind = Kind::Fifo;
    } else if ft.is_char_device() || ft.is_block_device() {
        e.kind = if ft.is_char_device() {
            Kind::Char
        } else {
            Kind::Block
        };
        e.rdev = md.rdev();
    } else {
        warnings.push(format!("{}: socket skipped", path.display()));
        return Ok(());
    }
    out.push(e);
    Ok(())
}

/// The volume's data stream: each regular file's data extents in entry order. A file
/// that shrank or vanished since the scan (live backups) is padded with zeros and one
/// that grew is cut, so the stream always matches the manifest; both are reported.
pub struct StreamReader {
    root: PathBuf,
    entries: Arc<Vec<Entry>>,
    idx: usize,
    end: usize,
    extents: Vec<[u64; 2]>,
    ext_idx: usize,
    left: u64,
    file: Option<File>,
    current_short: bool,
    warnings: Arc<Mutex<Vec<String>>>,
}

impl StreamReader {
    /// The stream of `entries[range]` (one segment; see backup::segments).
    pub fn new(
        root: &Path,
        entries: Arc<Vec<Entry>>,
        range: std::ops::Range<usize>,
        warnings: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        StreamReader {
            root: root.to_path_buf(),
            entries,
            idx: range.start,
            end: range.end,
            extents: Vec::new(),
            ext_idx: 0,
            left: 0,
            file: None,
            current_short: false,
            warnings,
        }
    }

    fn warn(&self, msg: String) {
        if let Ok(mut w) = self.warnings.lock() {
            w.push(msg);
        }
    }

    /// Moves to the next extent with bytes left; false at the end of the stream.
    fn advance(&mut self) -> bool {
        loop {
            if self.left > 0 {
                return true;
            }
            if self.ext_idx < self.extents.len() {
                let [off, len] = self.extents[self.ext_idx];
                self.ext_idx += 1;
                self.left = len;
                if let Some(f) = &mut self.file {
                    if f.seek(SeekFrom::Start(off)).is_err() {
                        self.file = None;
                    }
                }
                continue;
            }
            // next file entry
            if self.idx >= self.end {
                return false;
            }
            let Some(e) = self.entries.get(self.idx) else {
                return false;
            };
            self.idx += 1;
            self.extents = e.data_extents();
            self.ext_idx = 0;
            self.current_short = false;
            if self.extents.is_empty() {
                continue;
            }
            let rel = e.path.to_bytes().unwrap_or_default();
            let p = join_rel(&self.root, &rel);
            self.file = match File::open(&p) {
                Ok(f) => Some(f),
                Err(err) => {
                    self.warn(format!("{}: {err}; stored as zeros", p.display()));
                    None
                }
            };
        }
    }
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() || !self.advance() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = match &mut self.file {
            Some(f) => match f.read(&mut buf[..want]) {
                Ok(0) => 0,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(0),
                Err(e) => {
                    let name = self.entries[self.idx - 1].path.to_string();
                    self.warn(format!("{name}: read error {e}; rest stored as zeros"));
                    self.file = None;
                    0
                }
            },
            None => 0,
        };
        let n = if n == 0 {
            if self.file.is_some() && !self.current_short {
                self.current_short = true;
                let name = self.entries[self.idx - 1].path.to_string();
                self.warn(format!("{name}: shrank during backup; padded with zeros"));
            }
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Options for writing a volume back.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// chown to the stored uid/gid (needs root; off for unprivileged restores).
    pub owners: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions.
        WriteOptions {
            owners: unsafe { libc::geteuid() } == 0,
        }
    }
}

/// Writes `entries` under `root` (which must not exist yet), taking file data from
/// `data` in entry order. Metadata is applied afterwards, children before parents, so
/// directory times and read-only modes survive the writing of their contents.
pub fn write_volume(
    root: &Path,
    entries: &[Entry],
    data: &mut dyn BufRead,
    opts: WriteOptions,
    mut progress: impl FnMut(u64),
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for e in entries {
        let rel = e.path.to_bytes().unwrap_or_default();
        let p = join_rel(root, &rel);
        match e.kind {
            Kind::Dir => {
                if rel.is_empty() {
                    std::fs::create_dir_all(&p).map_err(|err| SnapshotError::io(&p, err))?;
                } else {
                    std::fs::create_dir(&p).map_err(|err| SnapshotError::io(&p, err))?;
                }
            }
            Kind::File => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map_err(|err| SnapshotError::io(&p, err))?;
                for [off, len] in e.data_extents() {
                    if off > 0 {
                        f.seek(SeekFrom::Start(off))
                            .map_err(|err| SnapshotError::io(&p, err))?;
                    }
                    copy_exact(data, &mut f, len, &p, &mut progress)?;
                }
                // Trailing holes (and empty extents lists) need the length set explicitly.
                f.set_len(e.size)
                    .map_err(|err| SnapshotError::io(&p, err))?;
            }
            Kind::Symlink => {
                let t = e
                    .target
                    .as_ref()
                    .and_then(|t| t.to_bytes())
                    .unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&t), &p)
                    .map_err(|err| SnapshotError::io(&p, err))?;
            }
            Kind::Hardlink => {
                let t = e
                    .target
                    .as_ref()
                    .and_then(|t| t.to_bytes())
                    .unwrap_or_default();
                std::fs::hard_link(join_rel(root, &t), &p)
                    .map_err(|err| SnapshotError::io(&p, err))?;
            }
            Kind::Fifo | Kind::Char | Kind::Block => {
                let fmt = match e.kind {
                    Kind::Fifo => libc::S_IFIFO,
                    Kind::Char => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                let c = cpath(&p)?;
                // SAFETY: valid path; mknod has no memory effects.
                if unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, e.rdev as libc::dev_t) } != 0 {
                    warnings.push(format!(
                        "{}: mknod: {}",
                        p.display(),
                        std::io::Error::last_os_error()
                    ));
                }
            }
        }
    }
    for e in entries.iter().rev() {
        if e.kind == Kind::Hardlink {
            continue;
        }
        let rel = e.path.to_bytes().unwrap_or_default();
        let p = join_rel(root, &rel);
        if std::fs::symlink_metadata(&p).is_err() {
            continue; // a device node we could not create
        }
        apply_metadata(&p, e, opts, &mut warnings)?;
    }
    Ok(warnings)
}

fn copy_exact(
    data: &mut dyn BufRead,
    out: &mut File,
    mut len: u64,
    p: &Path,
    progress: &mut impl FnMut(u64),
) -> Result<()> {
    while len > 0 {
        let buf = data.fill_buf().map_err(|e| SnapshotError::io(p, e))?;
        if buf.is_empty() {
            return Err(SnapshotError::Other(format!(
                "{}: the chunk stream ended {len} bytes early",
                p.display()
            )));
        }
        let n = (buf.len() as u64).min(len) as usize;
        out.write_all(&buf[..n])
            .map_err(|e| SnapshotError::io(p, e))?;
        data.consume(n);
        len -= n as u64;
        progress(n as u64);
    }
    Ok(())
}

fn apply_metadata(
    p: &Path,
    e: &Entry,
    opts: WriteOptions,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let c = cpath(p)?;
    if opts.owners {
        // SAFETY: valid path.
        if unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) } != 0 {
            return Err(last_os_error(p));
        }
    }
    if e.kind != Kind::Symlink {
        // chown clears setuid/setgid, so the mode comes after it.
        // SAFETY: valid path.
        if unsafe { libc::chmod(c.as_ptr(), e.mode as libc::mode_t) } != 0 {
            return Err(last_os_error(p));
        }
    }
    for (name, val) in &e.xattrs {
        let Ok(v) = base64::engine::general_purpose::STANDARD.decode(val) else {
            warnings.push(format!("{}: xattr {name}: bad base64", p.display()));
            continue;
        };
        let Ok(cn) = CString::new(name.as_bytes()) else {
            continue;
        };
        // Capabilities must come after chown (which clears them); they do.
        // SAFETY: valid C strings and buffer.
        let r = unsafe { libc::lsetxattr(c.as_ptr(), cn.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r != 0 {
            warnings.push(format!(
                "{}: xattr {name}: {}",
                p.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    let times = [
        libc::timespec {
            tv_sec: e.atime as libc::time_t,
            tv_nsec: e.atime_ns as _,
        },
        libc::timespec {
            tv_sec: e.mtime as libc::time_t,
            tv_nsec: e.mtime_ns as _,
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        warnings.push(format!(
            "{}: times: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
