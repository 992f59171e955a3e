//! Snapshots of a host's volumes in S3: chunking, encryption, manifests, backup,
//! restore, retention.
//!
//! Layers, bottom up: [`crypto`] (keys, sealed objects), [`format`] (manifest, bucket
//! layout), [`store`] (S3, over the client in `http`), [`fsio`] (volume directories ⇄ entries + data stream),
//! then the operations [`backup`], [`restore`], [`prune`], [`check`], and [`wal`] for
//! the PostgreSQL WAL files shipped between snapshots.
//!
//! This is the engine both other sides stand on: the in-image agent (`crate::agent`)
//! and the workstation verbs (`crate::cmd`, `crate::drill`). It knows nothing of
//! images, drills, profiles or systemd; `tests/layering.rs` keeps it that way.
//! The on-bucket format is specified in docs/snapshot-format.md.

pub mod backup;
pub mod check;
pub mod crypto;
pub mod entries;
pub mod error;
pub mod format;
pub mod fsio;
mod http;
pub mod lock;
pub mod marker;
pub mod pack;
pub mod prune;
pub mod restore;
pub mod store;
pub mod wal;

pub use crypto::Keys;
pub use error::SnapshotError;
pub use format::Manifest;
pub use store::{Store, StoreConfig};

use std::path::PathBuf;

/// Everything needed to reach one host's snapshots: the bucket and the key files.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub store: StoreConfig,
    pub encryption_key: PathBuf,
    pub signing_key: PathBuf,
    /// Keys already decrypted in memory (a locked secrets root); then the paths above
    /// only name them in messages.
    pub keys_in_memory: Option<Keys>,
}

impl Target {
    pub fn keys(&self) -> Result<Keys, SnapshotError> {
        let keys = match &self.keys_in_memory {
            Some(k) => k.clone(),
            None => Keys::load(&self.encryption_key, &self.signing_key)?,
        };
        Ok(keys.for_host(&self.host))
    }

    pub async fn connect(&self) -> Result<Store, SnapshotError> {
        Store::connect(&self.store).await
    }
}

/// A multi-threaded runtime for the synchronous CLI edge. Two worker threads are
/// plenty: the work is network-bound and CPU work goes to the blocking pool.
pub fn runtime() -> Result<tokio::runtime::Runtime, SnapshotError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| SnapshotError::Other(format!("tokio runtime: {e}")))
}
