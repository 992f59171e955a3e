//! Writing a volume back: the entries in stream order, the file data from one stream.
//!
//! One thread walks the entries and creates every name; regular files are filled and
//! given their metadata by a few writer threads. A restore of many small files is
//! otherwise bound by one thread copying into the page cache and setting metadata, with
//! the fetches and decryption waiting on it. The walk waits for the writers (drains)
//! only at the end: a writer works on an open file, which needs nothing of its
//! directory (neither its permission, so a read-only mode may come first, nor its
//! times, which a write does not change), and a hard link goes to the inode the walk
//! already created.

use super::{at, cname, direct, join_rel, last_os_error, open_root};
use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::format::{Entry, Kind};
use base64::Engine;
use bytes::Bytes;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::BufRead;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// File data for the writer, in stream order.
pub trait DataSource: BufRead {
    /// The next bytes of the stream, at most `max` and at least one unless it has
    /// ended. A source that holds its data in `Bytes` may hand out views of it rather
    /// than copies.
    fn take(&mut self, max: usize) -> std::io::Result<Bytes> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(max);
        let out = Bytes::copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(out)
    }
}

impl<T: AsRef<[u8]>> DataSource for std::io::Cursor<T> {}

/// Writer threads. They fill files and set their metadata (five syscalls for a small
/// file besides the write) while the walk creates the next names; the copies into the
/// page cache overlap with the fetches' decryption.
const WRITERS: usize = 4;
/// A file with at most this much data is created, filled and finished by one job.
const SMALL_FILE: u64 = 1 << 20;
/// The most data one job of a larger file carries.
const PIECE_MAX: usize = 4 << 20;
/// Data taken from the stream but not yet written, at most (one job may exceed it
/// alone): with the fetches in flight this bounds the restore's buffers.
const BYTES_IN_FLIGHT: usize = 16 << 20;
/// Jobs queued at most. Each small-file job holds its open file, so this also bounds
/// the fds the restore holds (the default soft limit is 1024).
const JOBS_IN_FLIGHT: usize = 128;

/// Options for writing a volume back.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// chown to the stored uid/gid (needs root; off for unprivileged restores).
    pub owners: bool,
    /// Write files larger than [`SMALL_FILE`] with `O_DIRECT` where the filesystem
    /// allows it (see `direct`); off only to compare or to test the other path.
    pub direct: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions.
        WriteOptions {
            owners: unsafe { libc::geteuid() } == 0,
            direct: true,
        }
    }
}

/// Parent directories for the writer, opened from the root one component at a time
/// with O_NOFOLLOW: whatever a manifest (or a process racing the restore) puts in the
/// tree, a name is only ever created inside the directory we opened.
struct Dirs {
    root: PathBuf,
    last: Option<(Vec<u8>, OwnedFd)>,
}

impl Dirs {
    /// (parent fd, last component) for `rel`.
    fn parent<'a>(&mut self, rel: &'a [u8]) -> Result<(RawFd, &'a [u8])> {
        let (parent, name) = match rel.iter().rposition(|b| *b == b'/') {
            Some(k) => (&rel[..k], &rel[k + 1..]),
            None => (&rel[..0], rel),
        };
        if let Some((p, fd)) = &self.last {
            if p == parent {
                return Ok((fd.as_raw_fd(), name));
            }
        }
        self.last = None;
        let err = |e: std::io::Error| SnapshotError::io(join_rel(&self.root, parent), e);
        let mut fd = open_root(&self.root).map_err(err)?;
        for comp in parent.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            fd = at::open_dir(fd.as_raw_fd(), &cname(comp).map_err(err)?).map_err(err)?;
        }
        let raw = fd.as_raw_fd();
        self.last = Some((parent.to_vec(), fd));
        Ok((raw, name))
    }
}

fn check_rc(r: libc::c_int, p: &Path) -> Result<()> {
    if r != 0 {
        Err(last_os_error(p))
    } else {
        Ok(())
    }
}

/// What the writer threads share with the walk.
struct State {
    /// Jobs handed out and not yet done.
    jobs: usize,
    /// Data in those jobs.
    bytes: usize,
    /// The first failure; the walk returns it at its next hand-out or drain.
    error: Option<SnapshotError>,
    warnings: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    done: Condvar,
    /// Set with `error`: writers skip what is still queued.
    failed: AtomicBool,
    opts: WriteOptions,
    /// Aligned buffers for direct I/O, reused.
    buffers: direct::Buffers,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A writer that panicked holding the lock left counters, not broken data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, st: &mut State, e: SnapshotError) {
        if st.error.is_none() {
            st.error = Some(e);
        }
        self.failed.store(true, Ordering::Relaxed);
    }
}

enum Job {
    /// A file created, filled and finished by one writer.
    Whole {
        file: File,
        path: PathBuf,
        entry: Box<Entry>,
        pieces: Vec<(u64, Bytes)>,
    },
    /// Part of a larger file the walk created.
    Piece {
        file: Arc<Large>,
        offset: u64,
        data: Bytes,
    },
    /// Part of a larger file open for direct I/O, gathered into an aligned buffer.
    Direct {
        file: Arc<Large>,
        offset: u64,
        data: direct::Buf,
    },
}

impl Job {
    fn path(&self) -> &Path {
        match self {
            Job::Whole { path, .. } => path,
            Job::Piece { file, .. } | Job::Direct { file, .. } => &file.path,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Job::Whole { pieces, .. } => pieces.iter().map(|(_, d)| d.len()).sum(),
            Job::Piece { data, .. } => data.len(),
            Job::Direct { data, .. } => data.len(),
        }
    }

    fn run(self, opts: WriteOptions, warnings: &mut Vec<String>) -> Result<()> {
        #[cfg(test)]
        if self.path().ends_with(tests::PANICS) {
            panic!("a test's file");
        }
        match self {
            Job::Whole {
                file,
                path,
                entry,
                pieces,
            } => {
                for (off, data) in &pieces {
                    file.write_all_at(data, *off)
                        .map_err(|e| SnapshotError::io(&path, e))?;
                }
                finish_file(&file, &path, &entry, opts, warnings)
            }
            Job::Piece { file, offset, data } => file
                .file
                .write_all_at(&data, offset)
                .map_err(|e| SnapshotError::io(&file.path, e)),
            Job::Direct {
                file,
                offset,
                mut data,
            } => {
                let r = direct::write(&file.file, offset, &mut data);
                file.shared.buffers.put(data);
                r.map_err(|e| SnapshotError::io(&file.path, e))
            }
        }
    }
}

/// A file too large for one job: created by the walk, filled by pieces on any
/// writer, and finished by whoever drops the last reference, which is after every
/// piece has been written.
struct Large {
    file: File,
    path: PathBuf,
    entry: Entry,
    /// Every piece has been handed out: only then is the file finished.
    complete: AtomicBool,
    shared: Arc<Shared>,
}

impl Drop for Large {
    fn drop(&mut self) {
        // A piece that panicked drops the file while unwinding: it is not complete,
        // and a second panic in finishing it would abort the process.
        if !self.complete.load(Ordering::Relaxed)
            || self.shared.failed.load(Ordering::Relaxed)
            || std::thread::panicking()
        {
            return;
        }
        let mut warnings = Vec::new();
        let r = finish_file(
            &self.file,
            &self.path,
            &self.entry,
            self.shared.opts,
            &mut warnings,
        );
        let mut st = self.shared.lock();
        st.warnings.append(&mut warnings);
        if let Err(e) = r {
            self.shared.fail(&mut st, e);
        }
    }
}

struct Pool {
    tx: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    fn new(opts: WriteOptions) -> Result<Pool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: 0,
                bytes: 0,
                error: None,
                warnings: Vec::new(),
            }),
            done: Condvar::new(),
            failed: AtomicBool::new(false),
            opts,
            buffers: direct::Buffers::default(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = Pool {
            tx: Some(tx),
            shared: shared.clone(),
            threads: Vec::new(),
        };
        for i in 0..WRITERS {
            let (rx, shared) = (rx.clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("restore-writer-{i}"))
                .spawn(move || writer(&rx, &shared))
                .map_err(|e| SnapshotError::Other(format!("writer thread: {e}")))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Hands `job` to the writers once the data and jobs in flight leave room for it.
    fn submit(&self, job: Job) -> Result<()> {
        let n = job.bytes();
        let mut st = self.shared.lock();
        while st.error.is_none()
            && st.jobs > 0
            && (st.bytes + n > BYTES_IN_FLIGHT || st.jobs >= JOBS_IN_FLIGHT)
        {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        st.jobs += 1;
        st.bytes += n;
        drop(st);
        let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok());
        if sent != Some(true) {
            return Err(SnapshotError::Other("the writer threads are gone".into()));
        }
        Ok(())
    }

    /// Waits until every job handed out is done.
    fn drain(&self) -> Result<()> {
        let mut st = self.shared.lock();
        while st.error.is_none() && st.jobs > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.shared.lock().warnings)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A walk that finished drained the queue; one that failed may leave jobs
        // behind, which the writers skip (the restore removes the tree).
        self.shared.failed.store(true, Ordering::Relaxed);
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn writer(rx: &Mutex<mpsc::Receiver<Job>>, shared: &Shared) {
    let mut warnings = Vec::new();
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let n = job.bytes();
        let path = job.path().to_path_buf();
        // The job (and with it perhaps the last reference to a large file, which
        // finishes it) is gone before the walk can see it counted as done.
        let r = if shared.failed.load(Ordering::Relaxed) {
            Ok(())
        } else {
            // A panic must still count the job as done and fail the walk: otherwise
            // the walk waits for it forever.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                job.run(shared.opts, &mut warnings)
            }))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(SnapshotError::Other(format!(
                    "{}: the writer failed: {why}",
                    path.display()
                )))
            })
        };
        let mut st = shared.lock();
        st.jobs -= 1;
        st.bytes -= n;
        st.warnings.append(&mut warnings);
        if let Err(e) = r {
            shared.fail(&mut st, e);
        }
        drop(st);
        shared.done.notify_all();
    }
}

/// Sets a written file's length (trailing holes), owner, mode, xattrs and times,
/// through its open fd.
fn finish_file(
    f: &File,
    p: &Path,
    e: &Entry,
    opts: WriteOptions,
    warnings: &mut Vec<String>,
) -> Result<()> {
    f.set_len(e.size).map_err(|err| SnapshotError::io(p, err))?;
    let fd = f.as_raw_fd();
    if opts.owners {
        // SAFETY: an open fd.
        check_rc(unsafe { libc::fchown(fd, e.uid, e.gid) }, p)?;
    }
    // chown clears setuid/setgid, so the mode comes after it.
    // SAFETY: an open fd.
    check_rc(unsafe { libc::fchmod(fd, e.mode as libc::mode_t) }, p)?;
    set_xattrs(p, e, warnings, |name, v| {
        // SAFETY: valid C string and buffer, an open fd.
        unsafe { libc::fsetxattr(fd, name.as_ptr(), v.as_ptr().cast(), v.len(), 0) }
    });
    // SAFETY: a two-element timespec array, an open fd.
    if unsafe { libc::futimens(fd, times(e).as_ptr()) } != 0 {
        warnings.push(format!(
            "{}: times: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn times(e: &Entry) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: e.atime as libc::time_t,
            tv_nsec: e.atime_ns as _,
        },
        libc::timespec {
            tv_sec: e.mtime as libc::time_t,
            tv_nsec: e.mtime_ns as _,
        },
    ]
}

/// Applies `e`'s xattrs with `set` (which returns a libc status), warning for each
/// that is refused. Capabilities must come after chown (which clears them); they do.
fn set_xattrs(
    p: &Path,
    e: &Entry,
    warnings: &mut Vec<String>,
    set: impl Fn(&CStr, &[u8]) -> libc::c_int,
) {
    for (name, val) in &e.xattrs {
        let Ok(v) = base64::engine::general_purpose::STANDARD.decode(val) else {
            warnings.push(format!("{}: xattr {name}: bad base64", p.display()));
            continue;
        };
        let Ok(cn) = CString::new(name.as_bytes()) else {
            continue;
        };
        if set(&cn, &v) != 0 {
            warnings.push(format!(
                "{}: xattr {name}: {}",
                p.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// Takes `e`'s data from the stream, extent by extent, in buffers of at most
/// [`PIECE_MAX`], each with its offset in the file.
fn take_extents(
    data: &mut dyn DataSource,
    e: &Entry,
    p: &Path,
    progress: &mut impl FnMut(u64),
    mut each: impl FnMut(u64, Bytes) -> Result<()>,
) -> Result<()> {
    for [off, len] in e.data_extents() {
        let mut at = off;
        while at < off + len {
            let b = data
                .take((off + len - at).min(PIECE_MAX as u64) as usize)
                .map_err(|err| SnapshotError::io(p, err))?;
            if b.is_empty() {
                return Err(SnapshotError::Other(format!(
                    "{}: the chunk stream ended {} bytes early",
                    p.display(),
                    off + len - at
                )));
            }
            progress(b.len() as u64);
            let n = b.len() as u64;
            each(at, b)?;
            at += n;
        }
    }
    Ok(())
}

/// Writes `entries` (in stream order: a depth-first walk) under `root`, which must
/// not exist yet, taking file data from `data` in entry order. A directory's metadata
/// is applied once the walk has left it, so its times and a read-only mode survive
/// the creation of its contents; a file gets its metadata on the writer that
/// completes it, everything else as soon as it is made. Memory stays proportional to
/// the tree's depth and the data in flight. Every name is created relative to its
/// opened parent without following symlinks, so even a manifest that slipped past
/// validation cannot write outside `root`.
pub fn write_volume(
    root: &Path,
    entries: &mut dyn Iterator<Item = Entry>,
    data: &mut dyn DataSource,
    opts: WriteOptions,
    mut progress: impl FnMut(u64),
) -> Result<Vec<String>> {
    let pool = Pool::new(opts)?;
    let mut warnings = Vec::new();
    let mut dirs = Dirs {
        root: root.to_path_buf(),
        last: None,
    };
    let mut meta_dirs = Dirs {
        root: root.to_path_buf(),
        last: None,
    };
    let mut absent: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    // Directories being written, whose metadata waits for the walk to leave them.
    let mut open: Vec<(Vec<u8>, Entry)> = Vec::new();
    for e in entries {
        let rel = e.path.to_bytes().unwrap_or_default();
        while let Some((d, _)) = open.last() {
            if d.is_empty() || (rel.starts_with(d) && rel.get(d.len()) == Some(&b'/')) {
                break;
            }
            // Left for good: the walk creates nothing more in it, and what the
            // writers still do there goes through open files, which neither needs the
            // directory's permission nor changes its times. So no drain.
            if let Some((d, de)) = open.pop() {
                apply_metadata(&mut meta_dirs, root, &d, &de, opts, &mut warnings)?;
            }
        }
        let p = join_rel(root, &rel);
        if rel.is_empty() {
            if e.kind != Kind::Dir {
                return Err(SnapshotError::Other(format!(
                    "{}: the volume root is not a directory in the manifest",
                    root.display()
                )));
            }
            std::fs::create_dir_all(&p).map_err(|err| SnapshotError::io(&p, err))?;
            open.push((rel, e));
            continue;
        }
        if let Some(why) = &e.skipped {
            // Its bytes are zeros standing in for a file the backup could not read.
            take_extents(data, &e, &p, &mut progress, |_, _| Ok(()))?;
            warnings.push(format!("{}: not in the snapshot ({why})", p.display()));
            absent.insert(rel);
            continue;
        }
        let (dir_fd, name) = dirs.parent(&rel)?;
        let c = cname(name).map_err(|err| SnapshotError::io(&p, err))?;
        match e.kind {
            Kind::Dir => {
                // SAFETY: valid C string relative to an open directory fd.
                check_rc(unsafe { libc::mkdirat(dir_fd, c.as_ptr(), 0o700) }, &p)?;
                open.push((rel, e));
                continue;
            }
            Kind::File if e.stream_len() <= SMALL_FILE => {
                let mut pieces = Vec::new();
                take_extents(data, &e, &p, &mut progress, |at, b| {
                    pieces.push((at, b));
                    Ok(())
                })?;
                // Created here, not on a writer: creating names in one directory
                // from several threads only has them spin on its lock.
                let f = at::create(dir_fd, &c).map_err(|err| SnapshotError::io(&p, err))?;
                pool.submit(Job::Whole {
                    file: File::from(f),
                    path: p,
                    entry: Box::new(e),
                    pieces,
                })?;
                continue;
            }
            Kind::File => {
                let f =
                    File::from(at::create(dir_fd, &c).map_err(|err| SnapshotError::io(&p, err))?);
                let is_direct = opts.direct && direct::enable(&f);
                let large = Arc::new(Large {
                    file: f,
                    path: p.clone(),
                    entry: e,
                    complete: AtomicBool::new(false),
                    shared: pool.shared.clone(),
                });
                if is_direct {
                    let mut gather = direct::Aligner::new(PIECE_MAX);
                    let mut submit = |offset, data| {
                        pool.submit(Job::Direct {
                            file: large.clone(),
                            offset,
                            data,
                        })
                    };
                    take_extents(data, &large.entry, &p, &mut progress, |at, b| {
                        gather.push(&pool.shared.buffers, at, &b, &mut submit)
                    })?;
                    gather.flush(&mut submit)?;
                } else {
                    take_extents(data, &large.entry, &p, &mut progress, |at, b| {
                        pool.submit(Job::Piece {
                            file: large.clone(),
                            offset: at,
                            data: b,
                        })
                    })?;
                }
                // The last reference, here or on a writer, finishes the file.
                large.complete.store(true, Ordering::Relaxed);
                continue;
            }
            Kind::Symlink => {
                let t = e.target_bytes();
                let ct = cname(&t).map_err(|err| SnapshotError::io(&p, err))?;
                // SAFETY: valid C strings relative to an open directory fd.
                check_rc(
                    unsafe { libc::symlinkat(ct.as_ptr(), dir_fd, c.as_ptr()) },
                    &p,
                )?;
            }
            Kind::Hardlink => {
                let t = e.target_bytes();
                if absent.contains(&t) {
                    warnings.push(format!(
                        "{}: not restored: it is a further name of a file the backup skipped",
                        p.display()
                    ));
                    absent.insert(rel);
                    continue;
                }
                // No drain: the walk created the file's name, and whatever a writer
                // still does to it (data, length, owner, mode, times) is to the inode
                // both names share.
                // The link source is opened the same careful way as the destination;
                // linkat without AT_SYMLINK_FOLLOW never follows a symlink there.
                let mut src_dirs = Dirs {
                    root: root.to_path_buf(),
                    last: None,
                };
                let (sdir, sname) = src_dirs.parent(&t)?;
                let cs = cname(sname).map_err(|err| SnapshotError::io(&p, err))?;
                // SAFETY: valid C strings relative to open directory fds.
                check_rc(
                    unsafe { libc::linkat(sdir, cs.as_ptr(), dir_fd, c.as_ptr(), 0) },
                    &p,
                )?;
                continue;
            }
            Kind::Fifo | Kind::Char | Kind::Block => {
                let fmt = match e.kind {
                    Kind::Fifo => libc::S_IFIFO,
                    Kind::Char => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                // SAFETY: valid C string relative to an open directory fd.
                if unsafe { libc::mknodat(dir_fd, c.as_ptr(), fmt | 0o600, e.rdev as libc::dev_t) }
                    != 0
                {
                    warnings.push(format!(
                        "{}: mknod: {}",
                        p.display(),
                        std::io::Error::last_os_error()
                    ));
                    absent.insert(rel);
                    continue;
                }
            }
        }
        apply_metadata(&mut dirs, root, &rel, &e, opts, &mut warnings)?;
    }
    // A writer's failure is reported before anything more is changed.
    pool.drain()?;
    for (d, de) in open.drain(..).rev() {
        apply_metadata(&mut meta_dirs, root, &d, &de, opts, &mut warnings)?;
    }
    warnings.extend(pool.warnings());
    Ok(warnings)
}

fn apply_metadata(
    dirs: &mut Dirs,
    root: &Path,
    rel: &[u8],
    e: &Entry,
    opts: WriteOptions,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let p = join_rel(root, rel);
    // The root has no parent inside the volume: it is addressed through its own fd.
    let rootfd;
    let (dir, c) = if rel.is_empty() {
        rootfd = open_root(root).map_err(|err| SnapshotError::io(&p, err))?;
        (rootfd.as_raw_fd(), CString::from(c"."))
    } else {
        let (dir, name) = dirs.parent(rel)?;
        (dir, cname(name).map_err(|err| SnapshotError::io(&p, err))?)
    };
    let flags = if rel.is_empty() {
        0
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    if opts.owners {
        // SAFETY: valid C string relative to an open directory fd.
        check_rc(
            unsafe { libc::fchownat(dir, c.as_ptr(), e.uid, e.gid, flags) },
            &p,
        )?;
    }
    if e.kind != Kind::Symlink {
        // chown clears setuid/setgid, so the mode comes after it. fchmodat cannot
        // refuse to follow a symlink, but the name was just created by us as this
        // kind and is not a symlink; the stat check makes sure it still is not.
        let st = at::stat(dir, &c).map_err(|err| SnapshotError::io(&p, err))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(SnapshotError::Other(format!(
                "{}: became a symlink during the restore; refused",
                p.display()
            )));
        }
        // SAFETY: as above.
        check_rc(
            unsafe { libc::fchmodat(dir, c.as_ptr(), e.mode as libc::mode_t, 0) },
            &p,
        )?;
    }
    let proc = if rel.is_empty() {
        root.as_os_str().as_bytes().to_vec()
    } else {
        at::proc_path(dir, c.as_bytes())
    };
    let cp = cname(&proc).map_err(|err| SnapshotError::io(&p, err))?;
    set_xattrs(&p, e, warnings, |name, v| {
        // SAFETY: valid C strings and buffer.
        unsafe { libc::lsetxattr(cp.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) }
    });
    let times = times(e);
    // SAFETY: valid C string and a two-element timespec array.
    if unsafe { libc::utimensat(dir, c.as_ptr(), times.as_ptr(), flags) } != 0 {
        warnings.push(format!(
            "{}: times: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::format::Name;

    fn entry(path: &str, kind: Kind, size: u64, extents: Option<Vec<[u64; 2]>>) -> Entry {
        Entry {
            path: Name::from_bytes(path.as_bytes()),
            kind,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            mtime_ns: 0,
            atime: 1_700_000_000,
            atime_ns: 0,
            size,
            extents,
            target: None,
            rdev: 0,
            xattrs: Default::default(),
            ctime: 0,
            ctime_ns: 0,
            ino: 0,
            skipped: None,
            linked: false,
            dev: 0,
        }
    }

    /// A tree whose file `bad` cannot be finished (its length is past what a file
    /// may have), followed by `after` small files.
    fn failing(bad_data: u64, after: usize) -> (Vec<Entry>, Vec<u8>) {
        let mut entries = vec![
            entry("", Kind::Dir, 0, None),
            entry("bad", Kind::File, u64::MAX, Some(vec![[0, bad_data]])),
        ];
        let mut data = vec![7u8; bad_data as usize];
        for i in 0..after {
            entries.push(entry(&format!("f{i:05}"), Kind::File, 10, None));
            data.extend_from_slice(b"0123456789");
        }
        (entries, data)
    }

    fn write(root: &Path, entries: Vec<Entry>, data: Vec<u8>) -> Result<Vec<String>> {
        write_with(root, entries, data, true)
    }

    fn write_with(
        root: &Path,
        entries: Vec<Entry>,
        data: Vec<u8>,
        direct: bool,
    ) -> Result<Vec<String>> {
        write_volume(
            root,
            &mut entries.into_iter(),
            &mut std::io::Cursor::new(data),
            WriteOptions {
                owners: false,
                direct,
            },
            |_| {},
        )
    }

    #[test]
    fn a_small_file_failing_on_a_writer_fails_the_walk_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("v");
        let (entries, data) = failing(100, 3000);
        let e = write(&root, entries, data).unwrap_err().to_string();
        assert!(e.contains("/v/bad"), "{e}");
    }

    /// A file name whose job panics on the writer.
    pub(super) const PANICS: &str = "panics-on-a-writer";

    #[test]
    fn a_writer_that_panics_fails_the_walk_instead_of_hanging_it() {
        // A small file (one job) and a large one (pieces, finished by the last to let
        // go of it); the files after it make the walk wait in a hand-out, not only
        // in the final drain.
        for size in [10, 3 * PIECE_MAX as u64 + 5] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("v");
            let mut entries = vec![
                entry("", Kind::Dir, 0, None),
                entry(PANICS, Kind::File, size, None),
            ];
            let mut data = vec![7u8; size as usize];
            for i in 0..3000 {
                entries.push(entry(&format!("f{i:05}"), Kind::File, 10, None));
                data.extend_from_slice(b"0123456789");
            }
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                tx.send(write(&root, entries, data).map_err(|e| e.to_string()))
            });
            let r = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("the walk hung after a writer panicked ({size} bytes)"));
            let e = r.unwrap_err();
            assert!(e.contains(PANICS) && e.contains("a test's file"), "{e}");
        }
    }

    #[test]
    fn a_large_file_failing_as_it_is_finished_fails_the_walk_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("v");
        // More than one job's worth, so it is written in pieces and finished by
        // whichever thread lets go of it last.
        let (entries, data) = failing(3 * PIECE_MAX as u64 + 5, 0);
        let e = write(&root, entries, data).unwrap_err().to_string();
        assert!(e.contains("/v/bad"), "{e}");
    }

    #[test]
    fn pieces_and_holes_land_at_their_offsets_and_directories_keep_their_metadata() {
        // Large files go through direct I/O where the filesystem has it, and through
        // ordinary writes otherwise: both must give the same tree.
        for direct in [true, false] {
            pieces_and_holes(direct);
        }
    }

    fn pieces_and_holes(direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("v");
        let mut ro = entry("ro", Kind::Dir, 0, None);
        ro.mode = 0o555;
        ro.mtime = 1_600_000_000;
        let mut entries = vec![entry("", Kind::Dir, 0, None), ro];
        let mut data = Vec::new();
        let mut expect = Vec::new();
        for i in 0..400u64 {
            // Every 50th file holds two islands of several pieces between holes,
            // at offsets and of lengths that are not multiples of a block.
            let (size, extents, body) = if i % 50 == 0 {
                let n = PIECE_MAX as u64 + 1000 + i;
                let mut body = vec![0u8; (3 * n) as usize];
                for (k, b) in body.iter_mut().enumerate() {
                    let island = (k as u64) < n || (k as u64 >= 2 * n);
                    *b = if island { (k as u64 * 31 + i) as u8 } else { 0 };
                }
                data.extend_from_slice(&body[..n as usize]);
                data.extend_from_slice(&body[2 * n as usize..]);
                (3 * n + 7, Some(vec![[0, n], [2 * n, n]]), body)
            } else {
                let body: Vec<u8> = (0..i * 37).map(|k| (k ^ i) as u8).collect();
                data.extend_from_slice(&body);
                (body.len() as u64, None, body)
            };
            let mut full = body;
            full.resize(size as usize, 0);
            let name = format!("ro/f{i:04}");
            entries.push(entry(&name, Kind::File, size, extents));
            expect.push((name, full));
        }
        let mut link = entry("ro/link", Kind::Hardlink, 0, None);
        link.target = Some(Name::from_bytes(b"ro/f0399"));
        entries.push(link);
        let warnings = write_with(&root, entries, data, direct).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        for (name, full) in &expect {
            let got = std::fs::read(root.join(name)).unwrap();
            assert!(got == *full, "{name} differs (direct {direct})");
            let md = std::fs::metadata(root.join(name)).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                (md.mode() & 0o7777, md.mtime()),
                (0o644, 1_700_000_000),
                "{name}"
            );
        }
        assert_eq!(
            std::fs::read(root.join("ro/link")).unwrap(),
            expect.last().unwrap().1
        );
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(root.join("ro")).unwrap();
        assert_eq!((md.mode() & 0o7777, md.mtime()), (0o555, 1_600_000_000));
    }
}
