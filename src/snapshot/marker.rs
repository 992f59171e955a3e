//! The empty-start marker: a host's signed statement "this prefix starts empty", written
//! by `imgbuild init` for a first deployment. First boot accepts it in place of a
//! snapshot when `restore = "require"`; a prefix with neither (a typo in the bucket or
//! prefix, a wrong endpoint) still fails closed, so a mistake never boots a host with
//! empty volumes over data that exists elsewhere.
//!
//! Object `<prefix>/empty-start`: `MAGIC(8) | ed25519 signature(64) | JSON`. The
//! signature covers `DOMAIN | bucket | 0 | prefix | 0 | JSON`, so a marker copied to
//! another bucket or prefix does not verify. Nothing in it is secret. The first
//! successful backup deletes it: once a snapshot exists, "start empty" is never again
//! a valid answer, even if every snapshot were later deleted.

use super::crypto::Keys;
use super::error::{Result, SnapshotError};
use super::store::{DeleteOutcome, Store};
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"IMGEMPT1";
const DOMAIN: &[u8] = b"imgbuild empty-start marker v1\0";
/// Far above any real marker; bounds what a planted object can make us read.
const MAX_LEN: usize = 64 * 1024;

pub fn key(prefix: &str) -> String {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        "empty-start".to_string()
    } else {
        format!("{p}/empty-start")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyStart {
    pub version: u32,
    pub host: String,
    pub bucket: String,
    pub prefix: String,
    /// When `imgbuild init` wrote it (seconds since the epoch).
    pub created: i64,
}

fn signed_message(bucket: &str, prefix: &str, json: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(bucket.len() + prefix.len() + json.len() + 2);
    m.extend_from_slice(bucket.as_bytes());
    m.push(0);
    m.extend_from_slice(prefix.as_bytes());
    m.push(0);
    m.extend_from_slice(json);
    m
}

pub fn seal(keys: &Keys, m: &EmptyStart) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(m).map_err(|e| SnapshotError::Other(format!("marker: {e}")))?;
    let sig = keys.sign_record(DOMAIN, &signed_message(&m.bucket, &m.prefix, &json))?;
    let mut out = Vec::with_capacity(8 + 64 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sig);
    out.extend_from_slice(&json);
    Ok(out)
}

/// Verifies a marker read from `bucket`/`prefix` and checks it names them and `host`.
pub fn open(
    keys: &Keys,
    bucket: &str,
    prefix: &str,
    host: &str,
    bytes: &[u8],
) -> Result<EmptyStart> {
    let bad = |reason: &str| SnapshotError::BadMarker {
        key: key(prefix),
        reason: reason.to_string(),
    };
    if bytes.len() < 72 || bytes.len() > MAX_LEN || &bytes[..8] != MAGIC {
        return Err(bad("not an imgbuild empty-start marker"));
    }
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[8..72]);
    let json = &bytes[72..];
    if !keys.verify_record(DOMAIN, &signed_message(bucket, prefix, json), &sig) {
        return Err(bad(
            "its signature does not verify with this host's signing key (written by another host, for another bucket or prefix, or tampered)",
        ));
    }
    let m: EmptyStart = serde_json::from_slice(json).map_err(|e| bad(&format!("{e}")))?;
    if m.host != host {
        return Err(bad(&format!(
            "it was written for host {}, not {host}",
            m.host
        )));
    }
    Ok(m)
}

/// A marker is a small signed JSON record; anything larger is not one.
const MARKER_MAX: u64 = 64 * 1024;

/// The prefix's marker, verified; `None` when there is none.
pub async fn read(store: &Store, keys: &Keys, host: &str) -> Result<Option<EmptyStart>> {
    match store.get(&key(&store.prefix), MARKER_MAX).await? {
        None => Ok(None),
        Some(bytes) => open(keys, &store.bucket, &store.prefix, host, &bytes).map(Some),
    }
}

pub async fn write(store: &Store, keys: &Keys, host: &str, now: i64) -> Result<EmptyStart> {
    let m = EmptyStart {
        version: 1,
        host: host.to_string(),
        bucket: store.bucket.clone(),
        prefix: store.prefix.clone(),
        created: now,
    };
    // No Object Lock: the first backup must be able to delete it.
    store
        .put(&key(&store.prefix), seal(keys, &m)?, false, None)
        .await?;
    Ok(m)
}

/// Called after a snapshot is published. Refused (Object Lock, a policy) is not an
/// error for the backup, but it is reported.
pub async fn remove(store: &Store) -> Result<Option<DeleteOutcome>> {
    let k = key(&store.prefix);
    if !store.exists(&k).await? {
        return Ok(None);
    }
    store.delete(&k).await.map(Some)
}
