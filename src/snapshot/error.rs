//! Errors of the snapshot library. Each variant names the cause a user can act on:
//! restore must say *why* it refuses (missing chunk, corrupted chunk, wrong key,
//! tampered manifest), not just that it failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },

    #[error("S3 {op} s3://{bucket}/{key}: {message}")]
    S3 {
        op: &'static str,
        bucket: String,
        key: String,
        message: String,
    },

    #[error("chunk {id} is missing from the bucket: {key}")]
    MissingChunk { id: String, key: String },

    #[error("chunk {id} is corrupted: {reason}")]
    CorruptChunk { id: String, reason: String },

    #[error("manifest {id}: signature does not verify with the host's signing key (tampered manifest, or signed by another host)")]
    BadSignature { id: String },

    #[error("manifest {id}: cannot be decrypted with this host's encryption key (wrong key)")]
    WrongKey { id: String },

    #[error("manifest {id} is malformed: {reason}")]
    BadManifest { id: String, reason: String },

    #[error("manifest {id} is version {version}, newer than the {supported} this imgbuild reads: upgrade imgbuild to restore it (older snapshots are not used in its place)")]
    NewerManifest {
        id: String,
        version: u32,
        supported: u32,
    },

    #[error("snapshot {0} not found")]
    NoSuchSnapshot(String),

    #[error("no snapshot in s3://{bucket}/{prefix}")]
    NoSnapshots { bucket: String, prefix: String },

    #[error("empty-start marker {key}: {reason}")]
    BadMarker { key: String, reason: String },

    #[error("s3://{bucket}/{key} is {size} bytes, more than the {max} an object of its kind can hold (planted or corrupted object); refused")]
    TooLarge {
        bucket: String,
        key: String,
        size: u64,
        max: u64,
    },

    #[error("{key} is held (waited {waited_secs} s): a backup and a prune must not delete and re-use chunks at the same time; try again later")]
    Locked { key: String, waited_secs: u64 },

    #[error("Object Lock is configured ({days} days) but s3://{bucket} does not enforce it: {why}. Create the bucket with Object Lock enabled (or use a server that implements it), or set `accept_unlocked_bucket = true` in the profile's [backup] to run without that protection")]
    ObjectLockNotEnforced {
        bucket: String,
        days: u32,
        why: String,
    },

    #[error("WAL file {key}: {reason}")]
    BadWal { key: String, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Other(String),
}

impl SnapshotError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SnapshotError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
