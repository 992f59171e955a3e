//! Read-ahead for a backup's file reads.
//!
//! The backup reads files one after the other, in entry order, on one thread. With the
//! files in the page cache that is fine; with a cold cache (the first backup of a data
//! directory, the night after it was written, or on a VM whose host reclaims guest
//! cache) every small file waits for its own trip to the device, one at a time: 200,000
//! files of 0-2 KiB took 22.4 s to back up cold against 4.2 s warm here. Telling the
//! kernel which files come next (`POSIX_FADV_WILLNEED`, which starts the reads and
//! returns) keeps many reads in flight while the reader works through the ones that
//! have arrived.
//!
//! A hint is only a hint: it reads nothing into the backup, so a file that vanished or
//! was replaced is simply not hinted, and the reader's own checks decide what is
//! stored. It opens like the reader does (relative to directory fds, no symlink
//! followed, O_NONBLOCK against a FIFO swapped in, O_NOATIME), and `WILLNEED` moves no
//! atime, so hinted files that are then not read (a backup that stops early) leave no
//! trace in the next entry list either.

use super::{at, cname, split_parent, ParentDir};
use std::path::Path;
use std::sync::mpsc;

/// Files hinted ahead of the reader, at most.
pub const AHEAD_FILES: usize = 256;
/// Bytes hinted ahead of the reader, at most: what the hints may bring into the page
/// cache before the reader takes it.
pub const AHEAD_BYTES: u64 = 32 << 20;
/// Of a larger file only its start is hinted: the kernel's own read-ahead follows a
/// sequential read from there.
pub const FILE_HINT_MAX: u64 = 1 << 20;

/// A thread that hints files to the kernel, in the order given.
pub struct ReadAhead {
    tx: Option<mpsc::SyncSender<(Vec<u8>, u64)>>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl ReadAhead {
    /// Hints for files under `root`. Without a thread (none could be started) hints
    /// are dropped and the backup reads as it would without them.
    pub fn new(root: &Path) -> ReadAhead {
        let (tx, rx) = mpsc::sync_channel::<(Vec<u8>, u64)>(AHEAD_FILES);
        let mut dirs = ParentDir::new(root);
        let thread = std::thread::Builder::new()
            .name("backup-readahead".into())
            .spawn(move || {
                let mut hinted = 0u64;
                for (rel, len) in rx {
                    hinted += u64::from(hint(&mut dirs, &rel, len));
                }
                hinted
            })
            .ok();
        ReadAhead {
            tx: thread.as_ref().map(|_| tx),
            thread,
        }
    }

    /// Hints the first bytes of the file at `rel` (relative to the root), `len` long.
    /// Never blocks: when the thread is behind, the hint is dropped.
    pub fn hint(&self, rel: Vec<u8>, len: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send((rel, len));
        }
    }

    /// Waits for the hints given so far to be handed to the kernel; returns how many
    /// files were hinted (the reads they started may still be under way).
    pub fn finish(mut self) -> u64 {
        self.stop()
    }

    fn stop(&mut self) -> u64 {
        self.tx = None;
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens `rel` as the reader would and asks the kernel to read its start.
fn hint(dirs: &mut ParentDir, rel: &[u8], len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (parent, name) = split_parent(rel);
    let Ok(dir) = dirs.get(parent) else {
        return false;
    };
    let Ok(name) = cname(name) else {
        return false;
    };
    let Ok(fd) = at::open_file(dir, &name) else {
        return false;
    };
    match at::fstat(&fd) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {}
        _ => return false,
    }
    let n = len.min(FILE_HINT_MAX) as libc::off_t;
    // SAFETY: an open fd; fadvise only reads its arguments.
    unsafe { libc::posix_fadvise(fd.as_raw_fd(), 0, n, libc::POSIX_FADV_WILLNEED) == 0 }
}
