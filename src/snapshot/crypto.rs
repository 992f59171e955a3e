//! Keys and the sealed object formats (chunks and manifests).
//!
//! One 32-byte host key (`snapshot-encryption.key`) is expanded with BLAKE3's
//! key-derivation mode into independent subkeys, so a leak of one use (e.g. the
//! chunk-id key through some side channel) says nothing about the others. The exact
//! byte layouts are in docs/snapshot-format.md; change them only with a new version.

use super::error::{Result, SnapshotError};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::path::Path;

pub const CTX_CHUNK_ID: &str = "imgbuild snapshot v1 chunk id";
pub const CTX_CHUNK_DATA: &str = "imgbuild snapshot v1 chunk data";
pub const CTX_MANIFEST: &str = "imgbuild snapshot v1 manifest";
pub const CTX_CHUNKER: &str = "imgbuild snapshot v1 chunker seed";
pub const CTX_PACK_ID: &str = "imgbuild snapshot v3 pack id";
pub const CTX_INDEX: &str = "imgbuild snapshot v3 index";
pub const CTX_PACK_HEADER: &str = "imgbuild snapshot v3 pack header";
pub const CTX_WAL: &str = "imgbuild snapshot v5 wal segment";
/// A key of its own for AES: no key is used with two algorithms.
pub const CTX_CHUNK_DATA_AES: &str = "imgbuild snapshot v6 chunk data aes-256-gcm";
/// Index objects: `INDEX_MAGIC | signature | host length | host | nonce | ciphertext`,
/// signed like a v2 manifest under their own domain.
pub const INDEX_MAGIC: &[u8; 8] = b"IMGIDX01";
pub const SIGN_DOMAIN_INDEX: &[u8] = b"imgbuild snapshot index v1\0";
/// AAD of a pack's sealed header (it cannot name the pack: the id hashes the header).
const PACK_HEADER_AAD: &[u8] = b"imgbuild pack header v1";

/// First byte of a sealed chunk / after the magic of a manifest.
pub const FORMAT_VERSION: u8 = 1;
/// First byte of a chunk sealed with AES-256-GCM (every chunk written since): with
/// AES-NI it opens about 3.6x as fast as ChaCha20-Poly1305 here (7.8 against
/// 2.2 GB/s), which was the largest part of a restore's own CPU after the kernel's
/// copy into the page cache. Chunks of version 1 still open.
pub const CHUNK_VERSION_AES: u8 = 2;
pub const MANIFEST_MAGIC: &[u8; 8] = b"IMGSNAP1";
/// Manifests written since the signature binds host and prefix.
pub const MANIFEST_MAGIC_V2: &[u8; 8] = b"IMGSNAP2";
/// Domain separation for the manifest signature, so a signature made by this key for
/// anything else (e.g. an image manifest) can never pass as a snapshot signature.
pub const SIGN_DOMAIN: &[u8] = b"imgbuild snapshot manifest v1\0";
pub const SIGN_DOMAIN_V2: &[u8] = b"imgbuild snapshot manifest v2\0";
/// Host names are DNS labels; this bounds the cleartext header of a v2 manifest.
const MAX_HOST_LEN: usize = 255;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// A sealed chunk is at most this much larger than its plaintext: version byte, nonce,
/// storage flag, tag (zstd output is only kept when smaller than the input).
pub const CHUNK_OVERHEAD: u64 = (1 + NONCE_LEN + 1 + TAG_LEN) as u64;
/// Plaintext flag byte: how the chunk payload is stored.
const STORED_RAW: u8 = 0;
const STORED_ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 3;

/// The verification half: enough to list and check signatures.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    data_key: [u8; 32],
    manifest_key: [u8; 32],
    pack_id_key: [u8; 32],
    index_key: [u8; 32],
    pack_header_key: [u8; 32],
    wal_key: [u8; 32],
    data_aes_key: [u8; 32],
    chunker_seed: u64,
    verifying: VerifyingKey,
    /// The host these keys belong to, when the caller knows it: manifests of any
    /// other host are refused even if they verify (shared keys, copied objects).
    host: Option<String>,
    signing: Option<SigningKey>,
}

impl std::fmt::Debug for Keys {
    // Never print key material, not even by accident in a {:?}.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("verifying", &hex::encode(self.verifying.as_bytes()))
            .field("can_sign", &self.signing.is_some())
            .finish()
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

impl Keys {
    /// From the raw key bytes (tests and the loaders below).
    pub fn from_bytes(
        master: [u8; 32],
        signing_seed: Option<[u8; 32]>,
        public: [u8; 32],
    ) -> Result<Self> {
        let verifying = VerifyingKey::from_bytes(&public).map_err(|e| SnapshotError::KeyFile {
            path: "snapshot-signing.pub".into(),
            reason: format!("not an ed25519 public key: {e}"),
        })?;
        let signing = signing_seed.map(|s| SigningKey::from_bytes(&s));
        if let Some(sk) = &signing {
            if sk.verifying_key() != verifying {
                return Err(SnapshotError::KeyFile {
                    path: "snapshot-signing.pub".into(),
                    reason: "does not match snapshot-signing.key".into(),
                });
            }
        }
        let seed_bytes = blake3::derive_key(CTX_CHUNKER, &master);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&seed_bytes[..8]);
        Ok(Keys {
            id_key: blake3::derive_key(CTX_CHUNK_ID, &master),
            data_key: blake3::derive_key(CTX_CHUNK_DATA, &master),
            manifest_key: blake3::derive_key(CTX_MANIFEST, &master),
            pack_id_key: blake3::derive_key(CTX_PACK_ID, &master),
            index_key: blake3::derive_key(CTX_INDEX, &master),
            pack_header_key: blake3::derive_key(CTX_PACK_HEADER, &master),
            wal_key: blake3::derive_key(CTX_WAL, &master),
            data_aes_key: blake3::derive_key(CTX_CHUNK_DATA_AES, &master),
            chunker_seed: u64::from_le_bytes(seed),
            verifying,
            signing,
            host: None,
        })
    }

    /// Loads the encryption key and the signing key pair. `signing` may be absent
    /// (restore only needs to verify); the public key is then read from `<signing>.pub`
    /// or derived when the seed is there.
    pub fn load(encryption_key: &Path, signing_key: &Path) -> Result<Self> {
        Keys::load_with(encryption_key, signing_key, |p| {
            if p.exists() {
                std::fs::read(p).map(Some)
            } else {
                Ok(None)
            }
        })
    }

    /// `load`, with the files read by `read` (None: the file does not exist), e.g.
    /// from a locked secrets root decrypted in memory.
    pub fn load_with(
        encryption_key: &Path,
        signing_key: &Path,
        read: impl Fn(&Path) -> std::io::Result<Option<Vec<u8>>>,
    ) -> Result<Self> {
        let hex32 = |path: &Path| -> Result<Option<[u8; 32]>> {
            let bytes = read(path).map_err(|e| SnapshotError::KeyFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            let Some(bytes) = bytes else { return Ok(None) };
            let text = String::from_utf8_lossy(&bytes);
            parse_hex32(text.trim())
                .map(Some)
                .ok_or_else(|| SnapshotError::KeyFile {
                    path: path.to_path_buf(),
                    reason: "expected 64 hexadecimal characters".into(),
                })
        };
        let master = hex32(encryption_key)?.ok_or_else(|| SnapshotError::KeyFile {
            path: encryption_key.to_path_buf(),
            reason: "No such file or directory".into(),
        })?;
        let pub_path = signing_key.with_extension("pub");
        let seed = hex32(signing_key)?;
        let public = match (seed, hex32(&pub_path)?) {
            (_, Some(p)) => p,
            (Some(s), None) => SigningKey::from_bytes(&s).verifying_key().to_bytes(),
            (None, None) => {
                return Err(SnapshotError::KeyFile {
                    path: signing_key.to_path_buf(),
                    reason: "neither the signing key nor its .pub exists".into(),
                })
            }
        };
        Keys::from_bytes(master, seed, public)
    }

    /// Binds the keys to one host: loading a manifest that another host wrote fails.
    pub fn for_host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }

    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    pub fn can_sign(&self) -> bool {
        self.signing.is_some()
    }

    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// Keyed BLAKE3 of the plaintext: equal data gives equal ids (dedup) but without the
    /// key an id says nothing about the content.
    pub fn chunk_id(&self, plain: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, plain).as_bytes()
    }

    /// `version(2) | nonce(24) | AES-256-GCM(flag(1) | payload)` (see [`aes_key`]), AAD =
    /// chunk id, so a chunk stored under another chunk's name fails to open.
    pub fn seal_chunk(&self, id: &[u8; 32], plain: &[u8]) -> Vec<u8> {
        seal_buf_as(&AES, &self.data_aes_key, id, flagged_body(plain))
    }

    /// A chunk as releases before [`CHUNK_VERSION_AES`] sealed it (XChaCha20-Poly1305
    /// under `K_data`), for tests of what older buckets hold.
    #[doc(hidden)]
    pub fn seal_chunk_v1(&self, id: &[u8; 32], plain: &[u8]) -> Vec<u8> {
        seal_buf(&self.data_key, id, flagged_body(plain))
    }

    /// Opens and verifies a chunk: AEAD tag, then the keyed hash of the plaintext
    /// against the id it was asked for. `expected_len` bounds decompression.
    pub fn open_chunk(&self, id: &[u8; 32], sealed: &[u8], expected_len: usize) -> Result<Vec<u8>> {
        let mut buf = sealed.to_vec();
        Ok(
            match self.open_chunk_in_place(id, &mut buf, expected_len)? {
                Opened::Within(r) => {
                    buf.truncate(r.end);
                    buf.drain(..r.start);
                    buf
                }
                Opened::Owned(v) => v,
            },
        )
    }

    /// As [`Keys::open_chunk`], decrypting in `sealed`'s own buffer: a stored-raw
    /// chunk's plaintext is then a range of it, and a restore hands it on without
    /// copying it.
    pub fn open_chunk_in_place(
        &self,
        id: &[u8; 32],
        sealed: &mut [u8],
        expected_len: usize,
    ) -> Result<Opened> {
        let hid = hex::encode(id);
        let corrupt = |reason: &str| SnapshotError::CorruptChunk {
            id: hid.clone(),
            reason: reason.to_string(),
        };
        let (sealing, key) = match sealed.first() {
            Some(&CHUNK_VERSION_AES) => (&AES, &self.data_aes_key),
            _ => (&XCHACHA, &self.data_key),
        };
        let body = open_in_place_as(sealing, key, id, sealed).map_err(&corrupt)?;
        let flag = *sealed
            .get(body.start)
            .filter(|_| !body.is_empty())
            .ok_or_else(|| corrupt("empty payload"))?;
        let payload = body.start + 1..body.end;
        let opened = match flag {
            STORED_RAW => Opened::Within(payload),
            STORED_ZSTD => Opened::Owned(
                decompress(&sealed[payload], expected_len)
                    .map_err(|e| corrupt(&format!("zstd: {e}")))?,
            ),
            other => return Err(corrupt(&format!("unknown storage flag {other}"))),
        };
        let plain = match &opened {
            Opened::Within(r) => &sealed[r.clone()],
            Opened::Owned(v) => &v[..],
        };
        if plain.len() != expected_len {
            return Err(corrupt(&format!(
                "length {} where the manifest says {expected_len}",
                plain.len()
            )));
        }
        if &self.chunk_id(plain) != id {
            return Err(corrupt("content does not match its id"));
        }
        Ok(opened)
    }

    /// A shipped WAL file: `version(1) | nonce(24) | XChaCha20-Poly1305(flag(1) |
    /// payload)` under its own key, AAD = `name` (host, volume and file name), so an
    /// object copied under another name, volume or host fails to open. The payload is
    /// zstd-compressed when that is smaller (a segment switched early by
    /// archive_timeout is mostly zeros).
    pub fn seal_wal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        seal_buf(&self.wal_key, name.as_bytes(), flagged_body(plain))
    }

    /// Opens a shipped WAL file sealed under `name`; `max` bounds decompression.
    pub fn open_wal(
        &self,
        name: &str,
        sealed: &[u8],
        max: usize,
    ) -> std::result::Result<Vec<u8>, String> {
        let body = open(&self.wal_key, name.as_bytes(), sealed).map_err(str::to_string)?;
        let (flag, payload) = body.split_first().ok_or("empty payload")?;
        match *flag {
            STORED_RAW => Ok(payload.to_vec()),
            STORED_ZSTD => zstd::bulk::decompress(payload, max).map_err(|e| format!("zstd: {e}")),
            other => Err(format!("unknown storage flag {other}")),
        }
    }

    /// `MAGIC2(8) | signature(64) | host length(1) | host | nonce(24) | ciphertext`; the
    /// signature covers `SIGN_DOMAIN_V2 | prefix | 0 | host | 0 | id | 0 | nonce |
    /// ciphertext`, so it can be checked without the encryption key and binds the
    /// manifest to its object name, its host and the prefix it was written under: a
    /// manifest copied to another host's or environment's prefix no longer verifies.
    pub fn seal_manifest(
        &self,
        snapshot_id: &str,
        host: &str,
        prefix: &str,
        json: &[u8],
    ) -> Result<Vec<u8>> {
        let z = zstd::bulk::compress(json, ZSTD_LEVEL)
            .map_err(|e| SnapshotError::Other(format!("zstd: {e}")))?;
        self.seal_manifest_zstd(snapshot_id, host, prefix, z)
    }

    /// [`Self::seal_manifest`] of `value` as JSON, compressed as it serializes: a
    /// manifest listing a million chunks is 80 MB of JSON, never held whole.
    pub fn seal_manifest_value(
        &self,
        snapshot_id: &str,
        host: &str,
        prefix: &str,
        value: &impl serde::Serialize,
    ) -> Result<Vec<u8>> {
        let zerr = |e: std::io::Error| SnapshotError::Other(format!("zstd: {e}"));
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(zerr)?;
        serde_json::to_writer(&mut enc, value).map_err(|e| SnapshotError::Other(e.to_string()))?;
        let z = enc.finish().map_err(zerr)?;
        self.seal_manifest_zstd(snapshot_id, host, prefix, z)
    }

    fn seal_manifest_zstd(
        &self,
        snapshot_id: &str,
        host: &str,
        prefix: &str,
        z: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let signing = self
            .signing
            .as_ref()
            .ok_or_else(|| SnapshotError::Other("no signing key: cannot write snapshots".into()))?;
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(SnapshotError::Other(format!(
                "host name {host:?} cannot name a snapshot (1 to {MAX_HOST_LEN} bytes)"
            )));
        }
        let sealed = seal(&self.manifest_key, snapshot_id.as_bytes(), &z);
        // seal() starts with the version byte; the manifest has its own magic instead.
        let nonce_and_ct = &sealed[1..];
        let sig = signing.sign(&sign_message_v2(prefix, host, snapshot_id, nonce_and_ct));
        let mut out = Vec::with_capacity(8 + 64 + 1 + host.len() + nonce_and_ct.len());
        out.extend_from_slice(MANIFEST_MAGIC_V2);
        out.extend_from_slice(&sig.to_bytes());
        out.push(host.len() as u8);
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(nonce_and_ct);
        Ok(out)
    }

    /// The format-1 layout (`MAGIC | signature | nonce | ciphertext`, signature over the
    /// id only). Nothing writes it any more; compatibility tests use it to make the
    /// manifests older versions wrote.
    #[doc(hidden)]
    pub fn seal_manifest_v1(&self, snapshot_id: &str, json: &[u8]) -> Result<Vec<u8>> {
        let signing = self
            .signing
            .as_ref()
            .ok_or_else(|| SnapshotError::Other("no signing key: cannot write snapshots".into()))?;
        let z = zstd::bulk::compress(json, ZSTD_LEVEL)
            .map_err(|e| SnapshotError::Other(format!("zstd: {e}")))?;
        let sealed = seal(&self.manifest_key, snapshot_id.as_bytes(), &z);
        let nonce_and_ct = &sealed[1..];
        let sig = signing.sign(&sign_message(snapshot_id, nonce_and_ct));
        let mut out = Vec::with_capacity(8 + 64 + nonce_and_ct.len());
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&sig.to_bytes());
        out.extend_from_slice(nonce_and_ct);
        Ok(out)
    }

    /// Verifies the signature first (so "tampered" and "wrong key" are told apart),
    /// then decrypts. Returns the JSON and, for a v2 manifest, the host its signature
    /// names (the caller compares it with the JSON's).
    pub fn open_manifest(
        &self,
        snapshot_id: &str,
        prefix: &str,
        bytes: &[u8],
    ) -> Result<(Vec<u8>, Option<String>)> {
        let (z, host) = self.open_manifest_zstd(snapshot_id, prefix, bytes)?;
        let json = zstd::stream::decode_all(&z[..]).map_err(|e| SnapshotError::BadManifest {
            id: snapshot_id.to_string(),
            reason: format!("zstd: {e}"),
        })?;
        Ok((json, host))
    }

    /// [`Self::open_manifest`] up to the zstd frame, for a reader that parses the JSON
    /// as it decompresses (a manifest listing a million chunks is 80 MB of JSON).
    pub fn open_manifest_zstd(
        &self,
        snapshot_id: &str,
        prefix: &str,
        bytes: &[u8],
    ) -> Result<(Vec<u8>, Option<String>)> {
        let signed = self.verify_manifest(snapshot_id, prefix, bytes)?;
        let mut sealed = Vec::with_capacity(bytes.len() - signed.body_at + 1);
        sealed.push(FORMAT_VERSION);
        sealed.extend_from_slice(&bytes[signed.body_at..]);
        let z = open(&self.manifest_key, snapshot_id.as_bytes(), &sealed).map_err(|_| {
            SnapshotError::WrongKey {
                id: snapshot_id.to_string(),
            }
        })?;
        Ok((z, signed.host))
    }

    /// Checks a manifest object's signature (v1: id only; v2: id, host and prefix).
    pub fn verify_manifest(
        &self,
        snapshot_id: &str,
        prefix: &str,
        bytes: &[u8],
    ) -> Result<SignedHeader> {
        let bad = |reason: &str| SnapshotError::BadManifest {
            id: snapshot_id.to_string(),
            reason: reason.to_string(),
        };
        let min = 8 + 64 + NONCE_LEN + TAG_LEN;
        if bytes.len() < min {
            return Err(bad("not an imgbuild snapshot manifest (too short)"));
        }
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&bytes[8..72]);
        let sig = Signature::from_bytes(&sig);
        let (message, header) = if &bytes[..8] == MANIFEST_MAGIC {
            (
                sign_message(snapshot_id, &bytes[72..]),
                SignedHeader {
                    host: None,
                    body_at: 72,
                },
            )
        } else if &bytes[..8] == MANIFEST_MAGIC_V2 {
            let n = usize::from(bytes[72]);
            let body_at = 73 + n;
            if n == 0 || bytes.len() < body_at + NONCE_LEN + TAG_LEN {
                return Err(bad("truncated header"));
            }
            let host = std::str::from_utf8(&bytes[73..body_at])
                .map_err(|_| bad("host name in the header is not UTF-8"))?;
            (
                sign_message_v2(prefix, host, snapshot_id, &bytes[body_at..]),
                SignedHeader {
                    host: Some(host.to_string()),
                    body_at,
                },
            )
        } else {
            return Err(bad("not an imgbuild snapshot manifest (bad magic)"));
        };
        self.verifying
            .verify(&message, &sig)
            .map_err(|_| SnapshotError::BadSignature {
                id: snapshot_id.to_string(),
            })?;
        Ok(header)
    }
}

impl Keys {
    /// A pack's name: keyed BLAKE3 of all its bytes, so `check --read-data` can verify
    /// a whole pack (garbage regions included) against its name.
    pub fn pack_id(&self, pack: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.pack_id_key, pack).as_bytes()
    }

    /// The table at the end of a pack (which chunk lies where), sealed so that the
    /// index can be rebuilt from the packs alone.
    pub fn seal_pack_header(&self, table: Vec<u8>) -> Vec<u8> {
        seal(&self.pack_header_key, PACK_HEADER_AAD, &table)
    }

    pub fn open_pack_header(&self, sealed: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
        open(&self.pack_header_key, PACK_HEADER_AAD, sealed)
    }

    /// An index object: the layout of a v2 manifest with its own magic, domain and
    /// key. The signature binds it to its name, host and prefix.
    pub fn seal_index(
        &self,
        index_id: &str,
        host: &str,
        prefix: &str,
        table: &[u8],
    ) -> Result<Vec<u8>> {
        let signing = self
            .signing
            .as_ref()
            .ok_or_else(|| SnapshotError::Other("no signing key: cannot write an index".into()))?;
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(SnapshotError::Other(format!(
                "host name {host:?} cannot name an index (1 to {MAX_HOST_LEN} bytes)"
            )));
        }
        let sealed = seal(&self.index_key, index_id.as_bytes(), table);
        let nonce_and_ct = &sealed[1..];
        let sig = signing.sign(&signed_message(
            SIGN_DOMAIN_INDEX,
            prefix,
            host,
            index_id,
            nonce_and_ct,
        ));
        let mut out = Vec::with_capacity(8 + 64 + 1 + host.len() + nonce_and_ct.len());
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&sig.to_bytes());
        out.push(host.len() as u8);
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(nonce_and_ct);
        Ok(out)
    }

    /// Verifies and decrypts an index object; returns the table and the signed host.
    pub fn open_index(
        &self,
        index_id: &str,
        prefix: &str,
        bytes: &[u8],
    ) -> std::result::Result<(Vec<u8>, String), String> {
        if bytes.len() < 8 + 64 + 1 + NONCE_LEN + TAG_LEN || &bytes[..8] != INDEX_MAGIC {
            return Err("not an imgbuild index object".into());
        }
        let n = usize::from(bytes[72]);
        let body_at = 73 + n;
        if n == 0 || bytes.len() < body_at + NONCE_LEN + TAG_LEN {
            return Err("truncated header".into());
        }
        let host = std::str::from_utf8(&bytes[73..body_at])
            .map_err(|_| "host name in the header is not UTF-8".to_string())?;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&bytes[8..72]);
        let message = signed_message(SIGN_DOMAIN_INDEX, prefix, host, index_id, &bytes[body_at..]);
        self.verifying
            .verify(&message, &Signature::from_bytes(&sig))
            .map_err(|_| {
                "signature does not verify (tampered, copied from another prefix, or another host's key)"
                    .to_string()
            })?;
        let mut sealed = Vec::with_capacity(bytes.len() - body_at + 1);
        sealed.push(FORMAT_VERSION);
        sealed.extend_from_slice(&bytes[body_at..]);
        let table = open(&self.index_key, index_id.as_bytes(), &sealed)
            .map_err(|_| "cannot be decrypted with this host's encryption key".to_string())?;
        Ok((table, host.to_string()))
    }
}

/// What a verified manifest header says.
#[derive(Debug, Clone)]
pub struct SignedHeader {
    /// The host the signature names (v2); `None` for v1 manifests.
    pub host: Option<String>,
    /// Where nonce and ciphertext start.
    body_at: usize,
}

impl Keys {
    /// Signs a small plaintext record under its own domain (so it can never pass as a
    /// manifest signature, nor a manifest's as one of these).
    pub fn sign_record(&self, domain: &[u8], record: &[u8]) -> Result<[u8; 64]> {
        let signing = self
            .signing
            .as_ref()
            .ok_or_else(|| SnapshotError::Other("no signing key: cannot sign".into()))?;
        Ok(signing.sign(&record_message(domain, record)).to_bytes())
    }

    pub fn verify_record(&self, domain: &[u8], record: &[u8], sig: &[u8; 64]) -> bool {
        self.verifying
            .verify(&record_message(domain, record), &Signature::from_bytes(sig))
            .is_ok()
    }
}

fn record_message(domain: &[u8], record: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + record.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(record);
    m
}

fn sign_message(snapshot_id: &str, nonce_and_ct: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGN_DOMAIN.len() + snapshot_id.len() + 1 + nonce_and_ct.len());
    m.extend_from_slice(SIGN_DOMAIN);
    m.extend_from_slice(snapshot_id.as_bytes());
    m.push(0);
    m.extend_from_slice(nonce_and_ct);
    m
}

fn signed_message(
    domain: &[u8],
    prefix: &str,
    host: &str,
    id: &str,
    nonce_and_ct: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        domain.len() + prefix.len() + host.len() + id.len() + 3 + nonce_and_ct.len(),
    );
    m.extend_from_slice(domain);
    for part in [prefix.as_bytes(), host.as_bytes(), id.as_bytes()] {
        m.extend_from_slice(part);
        m.push(0);
    }
    m.extend_from_slice(nonce_and_ct);
    m
}

fn sign_message_v2(prefix: &str, host: &str, snapshot_id: &str, nonce_and_ct: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        SIGN_DOMAIN_V2.len()
            + prefix.len()
            + host.len()
            + snapshot_id.len()
            + 3
            + nonce_and_ct.len(),
    );
    m.extend_from_slice(SIGN_DOMAIN_V2);
    for part in [prefix.as_bytes(), host.as_bytes(), snapshot_id.as_bytes()] {
        m.extend_from_slice(part);
        m.push(0);
    }
    m.extend_from_slice(nonce_and_ct);
    m
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    // getrandom only fails on exotic platforms without an entropy source; a fixed
    // nonce there would be catastrophic, so refuse loudly instead.
    if let Err(e) = getrandom::getrandom(&mut n) {
        panic!("no entropy source for nonces: {e}");
    }
    n
}

/// Version byte and nonce: what a sealed object carries before its ciphertext.
const SEALED_HEADER: usize = 1 + NONCE_LEN;

/// XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha) as HChaCha20 over the first 16 nonce
/// bytes, then the RFC 8439 AEAD under that subkey with the last 8. Built from
/// aws-lc's ChaCha20-Poly1305 because its assembly (AVX2 here) opens about 1.7x
/// as fast as the portable crate here, which mattered while chunks were sealed with
/// it (version 1; they still open); the bytes are the same (a test checks them
/// against the reference crate).
fn xchacha_key(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
    use chacha20::cipher::consts::U10;
    let sub = chacha20::hchacha::<U10>(key.into(), nonce[..16].into());
    let mut n12 = [0u8; 12];
    n12[4..].copy_from_slice(&nonce[16..]);
    // A 32-byte key always fits ChaCha20-Poly1305's key length.
    let k = UnboundKey::new(&CHACHA20_POLY1305, sub.as_slice()).expect("32-byte key");
    (LessSafeKey::new(k), Nonce::assume_unique_for_key(n12))
}

/// AES-256-GCM with a subkey per object, so that random nonces are as safe as
/// XChaCha's: the subkey is BLAKE3 keyed with `key` over the first 12 nonce bytes, and
/// GCM's own 96-bit nonce is the last 12. One key with random 96-bit nonces would
/// have to stop at 2^32 objects; this needs a 192-bit collision.
fn aes_key(key: &[u8; 32], nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
    let sub = blake3::keyed_hash(key, &nonce[..12]);
    let mut n12 = [0u8; 12];
    n12.copy_from_slice(&nonce[12..]);
    // A 32-byte key always fits AES-256.
    let k = UnboundKey::new(&AES_256_GCM, sub.as_bytes()).expect("32-byte key");
    (LessSafeKey::new(k), Nonce::assume_unique_for_key(n12))
}

/// A version byte and the cipher it stands for, kept together so that neither is
/// ever paired with the other's.
struct Sealing {
    version: u8,
    cipher: fn(&[u8; 32], &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce),
}

const XCHACHA: Sealing = Sealing {
    version: FORMAT_VERSION,
    cipher: xchacha_key,
};
const AES: Sealing = Sealing {
    version: CHUNK_VERSION_AES,
    cipher: aes_key,
};

/// An empty sealed object with room for `plain_len` bytes of plaintext: push the
/// plaintext, then [`seal_buf`] encrypts it where it lies.
fn sealed_buf(plain_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEALED_HEADER + plain_len + TAG_LEN);
    out.resize(SEALED_HEADER, 0);
    out
}

/// Seals `buf` (from [`sealed_buf`], plaintext after the header) in place:
/// `version | nonce | ciphertext | tag`.
fn seal_buf(key: &[u8; 32], aad: &[u8], buf: Vec<u8>) -> Vec<u8> {
    seal_buf_as(&XCHACHA, key, aad, buf)
}

/// [`seal_buf`] with another [`Sealing`].
fn seal_buf_as(sealing: &Sealing, key: &[u8; 32], aad: &[u8], mut buf: Vec<u8>) -> Vec<u8> {
    let nonce = random_nonce();
    buf[0] = sealing.version;
    buf[1..SEALED_HEADER].copy_from_slice(&nonce);
    let (k, n) = (sealing.cipher)(key, &nonce);
    // Fails only for a message over 256 GiB; chunks, packs' headers and manifests
    // are far below that, and a silently empty ciphertext would be a lost object.
    let tag = k
        .seal_in_place_separate_tag(n, Aad::from(aad), &mut buf[SEALED_HEADER..])
        .expect("plaintext within the AEAD's length limit");
    buf.extend_from_slice(tag.as_ref());
    buf
}

/// `flag | payload` in a [`sealed_buf`]: zstd when that is smaller, else the bytes as
/// they are (media, already compressed dumps), so nothing grows by more than the flag.
fn flagged_body(plain: &[u8]) -> Vec<u8> {
    // Compressed first, so that the buffer (held until its pack is sent) is no larger
    // than what it will hold.
    let (flag, payload) = match zstd::bulk::compress(plain, ZSTD_LEVEL) {
        Ok(z) if z.len() < plain.len() => (STORED_ZSTD, std::borrow::Cow::Owned(z)),
        _ => (STORED_RAW, std::borrow::Cow::Borrowed(plain)),
    };
    let mut buf = sealed_buf(1 + payload.len());
    buf.push(flag);
    buf.extend_from_slice(&payload);
    buf
}

/// zstd's one-shot decompression with a context kept per thread: a restore opens
/// thousands of compressed chunks on a few threads, and making a context for each
/// was 1-2 % of its CPU.
fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(data, capacity)
    })
}

fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut buf = sealed_buf(plain.len());
    buf.extend_from_slice(plain);
    seal_buf(key, aad, buf)
}

/// A chunk's plaintext: a range of the buffer it was decrypted in, or a buffer of
/// its own (decompressed).
pub enum Opened {
    Within(std::ops::Range<usize>),
    Owned(Vec<u8>),
}

/// Decrypts `sealed` (`version | nonce | ciphertext | tag`) where it lies; returns
/// the plaintext's range in it.
fn open_in_place(
    key: &[u8; 32],
    aad: &[u8],
    sealed: &mut [u8],
) -> std::result::Result<std::ops::Range<usize>, &'static str> {
    open_in_place_as(&XCHACHA, key, aad, sealed)
}

/// [`open_in_place`] for an object of another [`Sealing`].
fn open_in_place_as(
    sealing: &Sealing,
    key: &[u8; 32],
    aad: &[u8],
    sealed: &mut [u8],
) -> std::result::Result<std::ops::Range<usize>, &'static str> {
    check_sealed(sealed, sealing.version)?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[1..SEALED_HEADER]);
    let (k, n) = (sealing.cipher)(key, &nonce);
    let plain = k
        .open_in_place(n, Aad::from(aad), &mut sealed[SEALED_HEADER..])
        .map_err(|_| TAG_FAILED)?;
    Ok(SEALED_HEADER..SEALED_HEADER + plain.len())
}

fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    let mut buf = sealed.to_vec();
    let r = open_in_place(key, aad, &mut buf)?;
    buf.truncate(r.end);
    buf.drain(..r.start);
    Ok(buf)
}

const TAG_FAILED: &str = "authentication tag does not verify (bit rot, tampering or wrong key)";

/// The checks before decrypting `version | nonce | ciphertext | tag`.
fn check_sealed(sealed: &[u8], version: u8) -> std::result::Result<(), &'static str> {
    if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
        return Err("too short");
    }
    if sealed[0] != version {
        return Err("unknown format version (written by a newer imgbuild?)");
    }
    Ok(())
}

/// Jitter for retries; not for keys.
pub fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    u16::from_le_bytes(b)
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = getrandom::getrandom(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        Keys::from_bytes([1u8; 32], Some([7u8; 32]), sk.verifying_key().to_bytes()).unwrap()
    }

    /// The sealed bytes are XChaCha20-Poly1305's, whichever library makes them: ours
    /// open with the reference crate and the reference crate's open with ours, across
    /// the lengths where ChaCha20's block and Poly1305's padding change.
    #[test]
    fn sealed_objects_are_the_reference_xchacha20poly1305() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let key = blake3::derive_key("imgbuild test", b"reference");
        let reference = XChaCha20Poly1305::new((&key).into());
        for len in [
            0usize,
            1,
            15,
            16,
            17,
            63,
            64,
            65,
            255,
            256,
            4097,
            (1 << 20) + 7,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let aad = format!("aad {len}");
            let sealed = seal(&key, aad.as_bytes(), &plain);
            assert_eq!(sealed.len(), SEALED_HEADER + len + TAG_LEN);
            assert_eq!(sealed[0], FORMAT_VERSION);
            let opened = reference
                .decrypt(
                    XNonce::from_slice(&sealed[1..SEALED_HEADER]),
                    Payload {
                        msg: &sealed[SEALED_HEADER..],
                        aad: aad.as_bytes(),
                    },
                )
                .unwrap_or_else(|_| panic!("reference refused our {len}-byte object"));
            assert_eq!(opened, plain);

            let nonce = random_nonce();
            let ct = reference
                .encrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: &plain,
                        aad: aad.as_bytes(),
                    },
                )
                .unwrap();
            let mut theirs = vec![FORMAT_VERSION];
            theirs.extend_from_slice(&nonce);
            theirs.extend_from_slice(&ct);
            assert_eq!(open(&key, aad.as_bytes(), &theirs).unwrap(), plain);
            assert!(open(&key, b"other aad", &theirs).is_err());
        }
    }

    /// A chunk that fails to decompress must not fail the next one on the same
    /// thread. zstd resets its context on every call today; this guards that the
    /// kept context stays usable whatever it refused before.
    #[test]
    fn a_refused_frame_leaves_the_thread_context_usable() {
        let plain = b"INSERT INTO t VALUES (1, 'x');\n".repeat(1000);
        let z = zstd::bulk::compress(&plain, ZSTD_LEVEL).unwrap();
        assert_eq!(decompress(&z, plain.len()).unwrap(), plain);
        let mut bad = z.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        bad.truncate(n - 3);
        assert!(decompress(&bad, plain.len()).is_err());
        assert!(
            decompress(&z, plain.len() - 1).is_err(),
            "capacity is a bound"
        );
        assert_eq!(decompress(&z, plain.len()).unwrap(), plain);
    }

    #[test]
    fn chunk_round_trip_and_tamper() {
        let k = keys();
        let data = vec![42u8; 100_000];
        let id = k.chunk_id(&data);
        let mut s = k.seal_chunk(&id, &data);
        assert_eq!(s[0], CHUNK_VERSION_AES);
        assert_eq!(k.open_chunk(&id, &s, data.len()).unwrap(), data);
        let n = s.len();
        s[n - 1] ^= 1;
        assert!(matches!(
            k.open_chunk(&id, &s, data.len()),
            Err(SnapshotError::CorruptChunk { .. })
        ));
    }

    /// Chunks sealed by releases before AES (version 1) still open, and neither
    /// version opens as the other: the version byte picks both cipher and key.
    #[test]
    fn both_chunk_versions_open_and_stay_apart() {
        let k = keys();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let id = k.chunk_id(&data);
        let v1 = k.seal_chunk_v1(&id, &data);
        let v2 = k.seal_chunk(&id, &data);
        assert_eq!((v1[0], v2[0]), (FORMAT_VERSION, CHUNK_VERSION_AES));
        assert_eq!(
            v1.len(),
            v2.len(),
            "same overhead, so pack sizes are unchanged"
        );
        assert_eq!(k.open_chunk(&id, &v1, data.len()).unwrap(), data);
        assert_eq!(k.open_chunk(&id, &v2, data.len()).unwrap(), data);
        for (mut s, other) in [(v1, CHUNK_VERSION_AES), (v2, FORMAT_VERSION)] {
            s[0] = other;
            let e = k.open_chunk(&id, &s, data.len()).unwrap_err().to_string();
            assert!(e.contains("authentication tag"), "{e}");
        }
        let mut v3 = k.seal_chunk(&id, &data);
        v3[0] = 3;
        let e = k.open_chunk(&id, &v3, data.len()).unwrap_err().to_string();
        assert!(e.contains("unknown format version"), "{e}");
    }

    /// Version-2 chunks are AES-256-GCM under `keyed_hash(K_aes, nonce[..12])` with
    /// nonce `nonce[12..]`, checked against the reference crate both ways (the Python
    /// restore in docs/snapshot-format.md, run by tests/python_restore.rs, checks the
    /// same with OpenSSL's).
    #[test]
    fn aes_chunks_are_the_reference_aes_256_gcm() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        use aes_gcm::{Aes256Gcm, Nonce as GcmNonce};
        let k = keys();
        let k_aes = blake3::derive_key(CTX_CHUNK_DATA_AES, &[1u8; 32]);
        for len in [0usize, 1, 15, 16, 17, 255, 4097, (1 << 20) + 7] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let id = k.chunk_id(&plain);
            let sealed = k.seal_chunk(&id, &plain);
            let nonce = &sealed[1..SEALED_HEADER];
            let sub = blake3::keyed_hash(&k_aes, &nonce[..12]);
            let reference = Aes256Gcm::new(sub.as_bytes().into());
            let body = reference
                .decrypt(
                    GcmNonce::from_slice(&nonce[12..]),
                    Payload {
                        msg: &sealed[SEALED_HEADER..],
                        aad: &id,
                    },
                )
                .unwrap_or_else(|_| panic!("reference refused our {len}-byte chunk"));
            let payload = match body[0] {
                STORED_RAW => body[1..].to_vec(),
                _ => zstd::bulk::decompress(&body[1..], len).unwrap(),
            };
            assert_eq!(payload, plain);

            let nonce = random_nonce();
            let sub = blake3::keyed_hash(&k_aes, &nonce[..12]);
            let mut flagged = vec![STORED_RAW];
            flagged.extend_from_slice(&plain);
            let ct = Aes256Gcm::new(sub.as_bytes().into())
                .encrypt(
                    GcmNonce::from_slice(&nonce[12..]),
                    Payload {
                        msg: &flagged,
                        aad: &id,
                    },
                )
                .unwrap();
            let mut theirs = vec![CHUNK_VERSION_AES];
            theirs.extend_from_slice(&nonce);
            theirs.extend_from_slice(&ct);
            assert_eq!(k.open_chunk(&id, &theirs, len).unwrap(), plain);
        }
    }

    #[test]
    fn manifest_causes_are_told_apart() {
        let k = keys();
        let m = k.seal_manifest("s1", "vps1", "vps1/prod", b"{}").unwrap();
        let (json, host) = k.open_manifest("s1", "vps1/prod", &m).unwrap();
        assert_eq!(
            (json.as_slice(), host.as_deref()),
            (&b"{}"[..], Some("vps1"))
        );
        assert!(matches!(
            k.open_manifest("s2", "vps1/prod", &m),
            Err(SnapshotError::BadSignature { .. })
        ));
        let mut t = m.clone();
        let n = t.len();
        t[n - 3] ^= 0x40;
        assert!(matches!(
            k.open_manifest("s1", "vps1/prod", &t),
            Err(SnapshotError::BadSignature { .. })
        ));
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let other =
            Keys::from_bytes([2u8; 32], Some([7u8; 32]), sk.verifying_key().to_bytes()).unwrap();
        assert!(matches!(
            other.open_manifest("s1", "vps1/prod", &m),
            Err(SnapshotError::WrongKey { .. })
        ));
    }

    #[test]
    fn v2_signature_binds_prefix_and_host() {
        let k = keys();
        let m = k.seal_manifest("s1", "vps1", "vps1/prod", b"{}").unwrap();
        // the same object under another environment's prefix
        assert!(matches!(
            k.open_manifest("s1", "vps1/staging", &m),
            Err(SnapshotError::BadSignature { .. })
        ));
        // the cleartext host rewritten to another host of the same length
        let mut t = m.clone();
        t[73..77].copy_from_slice(b"vps2");
        assert!(matches!(
            k.open_manifest("s1", "vps1/prod", &t),
            Err(SnapshotError::BadSignature { .. })
        ));
        // a host length pointing past the end is refused, not a panic
        let mut t = m.clone();
        t[72] = 255;
        t.truncate(200);
        assert!(k.open_manifest("s1", "vps1/prod", &t).is_err());
    }

    #[test]
    fn v1_manifests_still_open() {
        let k = keys();
        let m = k.seal_manifest_v1("s1", b"{}").unwrap();
        // v1 signed the id only: any prefix verifies, and no host is named
        let (json, host) = k.open_manifest("s1", "anything", &m).unwrap();
        assert_eq!((json.as_slice(), host), (&b"{}"[..], None));
        assert!(matches!(
            k.open_manifest("s2", "anything", &m),
            Err(SnapshotError::BadSignature { .. })
        ));
    }
}
