//! Snapshots of a host's volumes in S3: chunking, encryption, manifests, backup,
//! restore, retention. Owned by the snapshot work (issue 4).
//!
//! Layers, bottom up: [`crypto`] (keys, sealed objects), [`format`] (manifest, bucket
//! layout), [`store`] (S3), [`fsio`] (volume directories ⇄ entries + data stream),
//! then the operations [`backup`], [`restore`], [`prune`], [`check`]; [`host`] is the
//! in-image side (firstboot, the backup timer) and [`cli`] the clap verbs.
//! The on-bucket format is specified in docs/snapshot-format.md.

pub mod backup;
pub mod check;
pub mod cli;
pub mod crypto;
pub mod error;
pub mod format;
pub mod fsio;
pub mod host;
pub mod prune;
pub mod restore;
pub mod store;

pub use crypto::Keys;
pub use error::SnapshotError;
pub use format::Manifest;
pub use store::{Store, StoreConfig};

use crate::hostconfig::BackupConfig;
use std::path::{Path, PathBuf};

/// Overrides a user can give on the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
}

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
    /// In the image: paths exactly as host.toml gives them.
    pub fn in_image(host: &str, b: &BackupConfig) -> Target {
        Target {
            host: host.to_string(),
            store: StoreConfig {
                bucket: b.bucket.clone(),
                prefix: b.prefix.clone(),
                endpoint: b.endpoint.clone(),
                region: b.region.clone(),
                path_style: b.path_style,
                credentials_file: b.credentials_file.as_ref().map(PathBuf::from),
                object_lock_days: b.object_lock_days,
                multipart_threshold: 0,
            },
            encryption_key: PathBuf::from(&b.encryption_key_file),
            signing_key: PathBuf::from(&b.signing_key_file),
            keys_in_memory: None,
        }
    }

    /// On a workstation: the key files are in the host's secrets dir (same file names
    /// as in the image). Credentials: the standard AWS chain when the environment names
    /// any (AWS_ACCESS_KEY_ID, AWS_PROFILE...), else the secrets dir's s3.env if present.
    /// AWS_ENDPOINT_URL_S3 in the environment beats the profile's endpoint, so the same
    /// profile can be pointed at a local test server.
    pub fn workstation(host: &str, b: &BackupConfig, secrets_dir: &Path, o: &Overrides) -> Target {
        let mut t = Target::in_image(host, b);
        let file_name = |p: &str, default: &str| {
            Path::new(p)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        t.encryption_key =
            secrets_dir.join(file_name(&b.encryption_key_file, "snapshot-encryption.key"));
        t.signing_key = secrets_dir.join(file_name(&b.signing_key_file, "snapshot-signing.key"));
        let env_creds = [
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
        let s3_env = secrets_dir.join("s3.env");
        t.store.credentials_file = (!env_creds && s3_env.exists()).then_some(s3_env);
        if let Some(ep) = std::env::var("AWS_ENDPOINT_URL_S3")
            .ok()
            .filter(|s| !s.is_empty())
        {
            t.store.endpoint = Some(ep);
            t.store.path_style = true;
        }
        if let Some(ep) = &o.endpoint {
            t.store.endpoint = Some(ep.clone());
            t.store.path_style = true;
        }
        if let Some(bk) = &o.bucket {
            t.store.bucket = bk.clone();
        }
        if let Some(p) = &o.prefix {
            t.store.prefix = p.trim_matches('/').to_string();
        }
        t
    }

    pub fn keys(&self) -> Result<Keys, SnapshotError> {
        match &self.keys_in_memory {
            Some(k) => Ok(k.clone()),
            None => Keys::load(&self.encryption_key, &self.signing_key),
        }
    }

    /// With a locked secrets root the key files exist only inside its archive: read
    /// them from there (in memory) instead of from the disk. A plain root changes
    /// nothing.
    pub fn use_secrets(&mut self, root: &crate::secrets::SecretsRoot) -> Result<(), SnapshotError> {
        if !root.is_locked() {
            return Ok(());
        }
        let keys = Keys::load_with(&self.encryption_key, &self.signing_key, |p| {
            if root.is_file(p) {
                root.read(p)
                    .map(Some)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            } else {
                Ok(None)
            }
        })?;
        self.keys_in_memory = Some(keys);
        Ok(())
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
