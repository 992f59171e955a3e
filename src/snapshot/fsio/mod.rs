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
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
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

/// What a scan found besides the entries.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub entries: Vec<Entry>,
    /// One line per file left out or noted, naming it and why.
    pub warnings: Vec<String>,
    /// Files left out: vanished between listing and stat, replaced while scanned,
    /// unreadable, or with a path too long to restore.
    pub skipped: u64,
}

/// Directory fds the walks hold open, relative to which every name is resolved: a
/// container that swaps a directory for a symlink between our steps can then only
/// make us skip that name, never follow it out of the volume.
mod at {
    use std::ffi::CStr;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    pub fn open(dir: RawFd, name: &CStr, flags: i32) -> std::io::Result<OwnedFd> {
        // SAFETY: valid C string; the returned fd is owned by us alone.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: fd was just returned by openat.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }

    /// A new regular file for writing, mode 0600 until its own is set: refused if
    /// the name exists in any form (O_EXCL), symlinks included.
    pub fn create(dir: RawFd, name: &CStr) -> std::io::Result<OwnedFd> {
        // SAFETY: valid C string; O_CREAT takes the mode as the variadic argument.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: fd was just returned by openat.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }

    /// A directory, opened with O_NOATIME where allowed for the same reason as
    /// [`open_file`]: listing it would otherwise change the atime on its entry line.
    pub fn open_dir(dir: RawFd, name: &CStr) -> std::io::Result<OwnedFd> {
        open_noatime(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// `open` with O_NOATIME, or without it where the kernel refuses it (EPERM: only
    /// the owner or root may).
    fn open_noatime(dir: RawFd, name: &CStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
        match open(dir, name, flags | libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(dir, name, flags),
            r => r,
        }
    }

    /// A regular file for reading. O_NONBLOCK: should a FIFO or device have been
    /// swapped in after the stat, the open returns at once instead of blocking the
    /// backup forever (the fstat check then rejects it). O_NOATIME: reading a file
    /// for the backup must not change its atime, or the next entry list differs for
    /// every file read and none of its chunks dedup; the kernel allows it only to the
    /// owner or root, so anyone else opens without it.
    pub fn open_file(dir: RawFd, name: &CStr) -> std::io::Result<OwnedFd> {
        open_noatime(
            dir,
            name,
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        )
    }

    pub fn stat(dir: RawFd, name: &CStr) -> std::io::Result<libc::stat> {
        // SAFETY: zeroed stat is a valid out-buffer; valid C string.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(st)
        }
    }

    pub fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
        // SAFETY: as above, on an open fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(st)
        }
    }

    pub fn readlink(dir: RawFd, name: &CStr) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: the buffer is as large as we say.
        let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Names in a directory (not "." and ".."), via a duplicate of its fd.
    pub fn list(dir: &OwnedFd) -> std::io::Result<Vec<Vec<u8>>> {
        let dup = dir.try_clone()?;
        // SAFETY: fdopendir takes over the duplicated fd (closed by closedir).
        let d = unsafe { libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(dup)) };
        if d.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: rewind in case the original fd's offset moved (shared file description).
        unsafe { libc::rewinddir(d) };
        let mut out = Vec::new();
        loop {
            // errno distinguishes the end of the stream from an error.
            // SAFETY: __errno_location is always valid for this thread.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: d is an open DIR*.
            let ent = unsafe { libc::readdir(d) };
            if ent.is_null() {
                let err = std::io::Error::last_os_error();
                // SAFETY: d is open and closed exactly once.
                unsafe { libc::closedir(d) };
                return match err.raw_os_error() {
                    Some(0) | None => Ok(out),
                    _ => Err(err),
                };
            }
            // SAFETY: d_name is a NUL-terminated array inside the entry.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                out.push(name.to_vec());
            }
        }
    }

    /// A path that names `name` inside the open directory without resolving anything
    /// again: the fd's magic link is the directory itself, and the l*xattr calls do
    /// not follow the last component.
    pub fn proc_path(dir: RawFd, name: &[u8]) -> Vec<u8> {
        let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
        p.extend_from_slice(name);
        p
    }
}

/// The volume root itself is ours (a podman volume's `_data`, our atomic snapshot, or
/// the directory a user named), so it may be reached through a symlink; nothing below
/// it is followed.
fn open_root(root: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | flags)
            .open(root)
    };
    // O_NOATIME as in `at::open_dir`.
    let f = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
        r => r?,
    };
    Ok(f.into())
}

fn cname(n: &[u8]) -> std::io::Result<CString> {
    CString::new(n).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

fn entry_from_stat(rel: &[u8], st: &libc::stat) -> Entry {
    Entry {
        path: Name::from_bytes(rel),
        kind: Kind::File,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        mtime_ns: st.st_mtime_nsec as u32,
        atime: st.st_atime,
        atime_ns: st.st_atime_nsec as u32,
        size: 0,
        extents: None,
        target: None,
        rdev: 0,
        xattrs: BTreeMap::new(),
        ctime: st.st_ctime,
        ctime_ns: st.st_ctime_nsec as u32,
        ino: st.st_ino,
        skipped: None,
        linked: false,
        dev: st.st_dev,
    }
}

fn same_inode(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_dev == b.st_dev
        && a.st_ino == b.st_ino
        && (a.st_mode & libc::S_IFMT) == (b.st_mode & libc::S_IFMT)
}

/// Walks `root` (never following symlinks, children sorted by name bytes) and returns
/// the entries in stream order: [`Walker`] collected. For tests and small trees;
/// backup walks lazily.
pub fn scan(root: &Path) -> Result<ScanReport> {
    let mut w = Walker::new(root)?;
    let entries: Vec<Entry> = w.by_ref().collect();
    Ok(ScanReport {
        entries,
        warnings: std::mem::take(&mut w.warnings),
        skipped: w.skipped,
    })
}

/// One directory being walked: its fd, path and sorted names.
struct Frame {
    fd: std::os::fd::OwnedFd,
    rel: Vec<u8>,
    names: std::vec::IntoIter<Vec<u8>>,
}

/// The entries of `root` in stream order (depth first, children sorted by name
/// bytes), produced one at a time so a tree of millions of files is never held
/// whole: memory is the open directories' name lists. Every name is resolved
/// relative to its parent's open fd, so the walk stays inside `root` whatever a
/// container renames meanwhile. Names that vanish or change type between listing and
/// opening, unreadable directories and paths too long to restore are skipped and
/// counted; sockets are skipped (they are recreated by whoever listens on them).
pub struct Walker {
    root: PathBuf,
    budget: usize,
    /// First name of each multiply-linked inode seen.
    inodes: HashMap<(u64, u64), Vec<u8>>,
    stack: Vec<Frame>,
    first: Option<Entry>,
    /// One line per file left out or noted, naming it and why.
    pub warnings: Vec<String>,
    /// Files left out (see [`ScanReport::skipped`]).
    pub skipped: u64,
}

impl Walker {
    pub fn new(root: &Path) -> Result<Walker> {
        let rootfd = open_root(root).map_err(|e| SnapshotError::io(root, e))?;
        let st = at::fstat(&rootfd).map_err(|e| SnapshotError::io(root, e))?;
        let mut e = entry_from_stat(b"", &st);
        e.kind = Kind::Dir;
        e.xattrs = read_xattrs(root)?;
        let mut w = Walker {
            root: root.to_path_buf(),
            // Restore recreates the tree under a path of about the same length.
            budget: (libc::PATH_MAX as usize).saturating_sub(root.as_os_str().len() + 2),
            inodes: HashMap::new(),
            stack: Vec::new(),
            first: Some(e),
            warnings: Vec::new(),
            skipped: 0,
        };
        w.enter(rootfd, Vec::new());
        Ok(w)
    }

    fn skip(&mut self, rel: &[u8], why: impl std::fmt::Display) {
        self.skipped += 1;
        self.warnings.push(format!(
            "{}: {why}; skipped",
            join_rel(&self.root, rel).display()
        ));
    }

    /// Lists a directory whose entry was just produced; its children come next.
    fn enter(&mut self, fd: std::os::fd::OwnedFd, rel: Vec<u8>) {
        match at::list(&fd) {
            Ok(mut names) => {
                names.sort();
                self.stack.push(Frame {
                    fd,
                    rel,
                    names: names.into_iter(),
                });
            }
            Err(e) => self.skip(&rel, format!("cannot list: {e}")),
        }
    }

    /// The entry for the next name of the innermost open directory, if it is kept;
    /// `Err(())` when the stack is empty.
    fn step(&mut self) -> std::result::Result<Option<Entry>, ()> {
        use std::os::fd::AsRawFd;
        let Some(top) = self.stack.last_mut() else {
            return Err(());
        };
        let Some(n) = top.names.next() else {
            self.stack.pop();
            return Ok(None);
        };
        let mut child = top.rel.clone();
        let dirfd = top.fd.as_raw_fd();
        if !child.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(&n);
        if child.len() >= self.budget {
            let shown = String::from_utf8_lossy(&child[..80.min(child.len())]).into_owned();
            self.skipped += 1;
            self.warnings.push(format!(
                "{}/{shown}…: path of {} bytes is too long to restore (PATH_MAX); skipped",
                self.root.display(),
                child.len()
            ));
            return Ok(None);
        }
        let Ok(c) = cname(&n) else { return Ok(None) };
        let st = match at::stat(dirfd, &c) {
            Ok(st) => st,
            Err(e) if is_gone(&e) => {
                self.skip(&child, "vanished during the scan");
                return Ok(None);
            }
            Err(e) => {
                self.skip(&child, e);
                return Ok(None);
            }
        };
        let mut e = entry_from_stat(&child, &st);
        let proc = at::proc_path(dirfd, &n);
        e.xattrs = read_xattrs(Path::new(OsStr::from_bytes(&proc))).unwrap_or_default();
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let sub = match at::open_dir(dirfd, &c) {
                    Ok(fd) => fd,
                    Err(err) if is_gone(&err) => {
                        self.skip(&child, "vanished or replaced during the scan");
                        return Ok(None);
                    }
                    Err(err) => {
                        self.skip(&child, err);
                        return Ok(None);
                    }
                };
                match at::fstat(&sub) {
                    Ok(now) if same_inode(&now, &st) => {}
                    _ => {
                        self.skip(&child, "replaced during the scan");
                        return Ok(None);
                    }
                }
                e.kind = Kind::Dir;
                self.enter(sub, child);
            }
            libc::S_IFLNK => match at::readlink(dirfd, &c) {
                Ok(t) => {
                    e.kind = Kind::Symlink;
                    e.target = Some(Name::from_bytes(&t));
                }
                Err(err) => {
                    self.skip(&child, format!("readlink: {err}"));
                    return Ok(None);
                }
            },
            libc::S_IFREG => {
                if st.st_nlink > 1 {
                    if let Some(first) = self.inodes.get(&(st.st_dev, st.st_ino)) {
                        e.kind = Kind::Hardlink;
                        e.target = Some(Name::from_bytes(first));
                        e.xattrs.clear();
                        return Ok(Some(e));
                    }
                    self.inodes.insert((st.st_dev, st.st_ino), child.clone());
                    e.linked = true;
                }
                e.size = st.st_size as u64;
                // Only files with fewer allocated blocks than their size can have
                // holes; asking every file would cost an open and two seeks each.
                if (st.st_blocks as u64) * 512 < e.size {
                    match at::open_file(dirfd, &c) {
                        Ok(fd) if at::fstat(&fd).is_ok_and(|now| same_inode(&now, &st)) => {
                            e.extents = data_extents(&File::from(fd), e.size);
                        }
                        Ok(_) => {
                            self.skip(&child, "replaced during the scan");
                            return Ok(None);
                        }
                        Err(err) if is_gone(&err) => {
                            self.skip(&child, "vanished during the scan");
                            return Ok(None);
                        }
                        Err(err) => {
                            self.skip(&child, err);
                            return Ok(None);
                        }
                    }
                }
            }
            libc::S_IFIFO => e.kind = Kind::Fifo,
            libc::S_IFCHR | libc::S_IFBLK => {
                e.kind = if st.st_mode & libc::S_IFMT == libc::S_IFCHR {
                    Kind::Char
                } else {
                    Kind::Block
                };
                e.rdev = st.st_rdev;
            }
            _ => {
                self.warnings.push(format!(
                    "{}: socket skipped",
                    join_rel(&self.root, &child).display()
                ));
                return Ok(None);
            }
        }
        Ok(Some(e))
    }
}

impl Iterator for Walker {
    type Item = Entry;
    fn next(&mut self) -> Option<Entry> {
        if let Some(e) = self.first.take() {
            return Some(e);
        }
        loop {
            match self.step() {
                Ok(Some(e)) => return Some(e),
                Ok(None) => continue,
                Err(()) => return None,
            }
        }
    }
}

/// What the read of a file found against its scan.
#[derive(Debug, Default)]
pub struct ReadReport {
    /// Entry indexes whose bytes could not be read as scanned, with the reason; the
    /// stream holds zeros for them and the manifest marks them skipped.
    pub skipped: Vec<(usize, String)>,
    /// Files whose size or mtime changed while they were read (stored as read: cut
    /// or zero-padded to the scanned size).
    pub changed: Vec<String>,
    pub warnings: Vec<String>,
}

/// The volume's data stream: each regular file's data extents in entry order. Files
/// are opened relative to their parent directory's fd without following any symlink,
/// and must still be the inode the scan saw; one that vanished or was replaced since
/// is streamed as zeros and reported skipped, so the stream always matches the
/// manifest and never holds a byte from outside the volume.
pub struct StreamReader {
    entries: Arc<Vec<Entry>>,
    idx: usize,
    end: usize,
    extents: Vec<[u64; 2]>,
    ext_idx: usize,
    left: u64,
    file: Option<File>,
    current_short: bool,
    dirs: ParentDir,
    report: Arc<Mutex<ReadReport>>,
}

/// The parent directory of the last file opened under a root (consecutive entries
/// share it), opened component by component from the root with O_NOFOLLOW.
struct ParentDir {
    root: PathBuf,
    cur: Option<(Vec<u8>, std::os::fd::OwnedFd)>,
}

impl ParentDir {
    fn new(root: &Path) -> Self {
        ParentDir {
            root: root.to_path_buf(),
            cur: None,
        }
    }

    fn get(&mut self, parent: &[u8]) -> std::io::Result<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        if let Some((p, fd)) = &self.cur {
            if p == parent {
                return Ok(fd.as_raw_fd());
            }
        }
        self.cur = None;
        let mut fd = open_root(&self.root)?;
        for comp in parent.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            fd = at::open_dir(fd.as_raw_fd(), &cname(comp)?)?;
        }
        let raw = fd.as_raw_fd();
        self.cur = Some((parent.to_vec(), fd));
        Ok(raw)
    }
}

/// `rel` split at its last `/` into parent and name.
fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(k) => (&rel[..k], &rel[k + 1..]),
        None => (&rel[..0], rel),
    }
}

impl StreamReader {
    /// The stream of `entries[range]` (one segment; see backup::segments).
    pub fn new(
        root: &Path,
        entries: Arc<Vec<Entry>>,
        range: std::ops::Range<usize>,
        report: Arc<Mutex<ReadReport>>,
    ) -> Self {
        StreamReader {
            entries,
            idx: range.start,
            end: range.end,
            extents: Vec::new(),
            ext_idx: 0,
            left: 0,
            file: None,
            current_short: false,
            dirs: ParentDir::new(root),
            report,
        }
    }

    fn note(&self, f: impl FnOnce(&mut ReadReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// Opens entry `i` and checks it is still the regular file the scan saw.
    fn open_entry(&mut self, i: usize) -> std::result::Result<File, String> {
        let e = &self.entries[i];
        let (dev, ino) = (e.dev, e.ino);
        let rel = e.path.to_bytes().unwrap_or_default();
        let (parent, name) = split_parent(&rel);
        let dir = self.dirs.get(parent).map_err(|e| match is_gone(&e) {
            true => "its directory vanished or was replaced".to_string(),
            false => format!("opening its directory: {e}"),
        })?;
        let fd =
            at::open_file(dir, &cname(name).map_err(|e| e.to_string())?).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::ENOENT) => "vanished before it was read".to_string(),
                    Some(libc::ELOOP) => "replaced by a symlink before it was read".to_string(),
                    _ => format!("open: {e}"),
                }
            })?;
        let st = at::fstat(&fd).map_err(|e| format!("fstat: {e}"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err("replaced by something that is not a regular file".into());
        }
        if dev != 0 && (st.st_dev != dev || st.st_ino != ino) {
            return Err("replaced by another file before it was read".into());
        }
        Ok(File::from(fd))
    }

    /// At the end of a file's bytes: did it change while we read it?
    fn finish_file(&mut self) {
        let Some(f) = self.file.take() else { return };
        let e = &self.entries[self.idx - 1];
        if let Ok(md) = f.metadata() {
            let moved =
                md.len() != e.size || md.mtime() != e.mtime || md.mtime_nsec() as u32 != e.mtime_ns;
            if moved && !self.current_short {
                let name = e.path.to_string();
                self.note(|r| r.changed.push(name));
            }
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
            self.finish_file();
            // next file entry
            if self.idx >= self.end {
                return false;
            }
            let i = self.idx;
            let Some(e) = self.entries.get(i) else {
                return false;
            };
            self.idx += 1;
            self.extents = e.data_extents();
            self.ext_idx = 0;
            self.current_short = false;
            if self.extents.is_empty() {
                continue;
            }
            self.file = match self.open_entry(i) {
                Ok(f) => Some(f),
                Err(why) => {
                    self.note(|r| r.skipped.push((i, why)));
                    None
                }
            };
        }
    }
}

fn read_retrying(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
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
            Some(f) => match read_retrying(f, &mut buf[..want]) {
                Ok(n) => n,
                Err(e) => {
                    let name = self.entries[self.idx - 1].path.to_string();
                    self.note(|r| {
                        r.warnings
                            .push(format!("{name}: read error {e}; rest stored as zeros"))
                    });
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
                self.note(|r| {
                    r.changed
                        .push(format!("{name} (shrank while read; padded with zeros)"))
                });
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

mod direct;
pub mod readahead;
mod write;
pub use readahead::ReadAhead;
pub use write::{write_volume, DataSource, WriteOptions};

/// Caps glibc's malloc arenas at two. Backup, restore and check move hundreds of
/// thousands of small chunk buffers between the async workers and the blocking pool,
/// whose threads come and go; glibc gives threads arenas of their own (up to eight per
/// core), each keeping the pages of its own high-water mark, so freed buffers stayed
/// resident many times over. Only new arenas are affected, so it is called first.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets an allocator parameter.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        });
    }
}
