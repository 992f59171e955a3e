//! Ignition config (spec 3.4.0 by default; 3.5.0 and 3.6.0 on request) from a host tree.
//! Quadlets are plain files (Ignition rejects them as systemd units); units go to
//! `systemd.units` so `enabled` works; every content is a data URL with a hash.

use crate::tree::{EntryKind, HostTree, SYSTEMD_UNIT_DIR};
use base64::Engine;
use flate2::write::GzEncoder;
use serde::Serialize;
use sha2::{Digest, Sha512};
use std::collections::BTreeMap;
use std::io::Write;

pub const VERSIONS: [&str; 3] = ["3.4.0", "3.5.0", "3.6.0"];

#[derive(Debug, thiserror::Error)]
pub enum IgnitionError {
    #[error("Ignition spec {0} is not supported")]
    Version(String),
    #[error("the host's units run the imgbuild helper, but no --helper-url says where the target fetches it from\n  hint: upload this very binary (e.g. `imgbuild upload $(command -v imgbuild) s3://bucket/imgbuild`) and pass --helper-url https://... or s3://...")]
    NoHelperUrl,
    #[error("--helper-url `{0}` must be https:// or s3:// (the download is only checked by hash, but a plain http URL leaks who fetches it)")]
    BadHelperUrl(String),
    #[error("container `{0}` bakes an OCI archive; Ignition hosts pull images from their registry\n  hint: drop `bake` for Ignition output, or build a disk image instead")]
    Baked(String),
}

/// The helper binary as the target will fetch it.
pub struct Helper {
    pub url: String,
    /// sha512 of the binary's bytes.
    pub sha512: String,
}

#[derive(Serialize)]
struct Config {
    ignition: Meta,
    passwd: Passwd,
    storage: Storage,
    systemd: Systemd,
}

#[derive(Serialize)]
struct Meta {
    version: String,
}

#[derive(Serialize)]
struct Passwd {
    users: Vec<User>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct User {
    name: String,
    ssh_authorized_keys: Vec<String>,
    home_dir: String,
    shell: String,
}

#[derive(Serialize)]
struct Storage {
    directories: Vec<Dir>,
    files: Vec<File>,
    links: Vec<Link>,
}

#[derive(Serialize)]
struct Owner {
    name: String,
}

#[derive(Serialize)]
struct Dir {
    path: String,
    mode: u32,
    overwrite: bool,
    user: Owner,
    group: Owner,
}

#[derive(Serialize)]
struct Verification {
    hash: String,
}

#[derive(Serialize)]
struct Contents {
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    compression: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<Verification>,
}

#[derive(Serialize)]
struct File {
    path: String,
    mode: u32,
    overwrite: bool,
    user: Owner,
    group: Owner,
    contents: Contents,
}

#[derive(Serialize)]
struct Link {
    path: String,
    target: String,
    hard: bool,
    overwrite: bool,
}

#[derive(Serialize)]
struct Systemd {
    units: Vec<Unit>,
}

#[derive(Serialize)]
struct Unit {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents: Option<String>,
}

fn sha512_hex(data: &[u8]) -> String {
    hex::encode(Sha512::digest(data))
}

/// RFC 2397 percent-encoding of everything outside the unreserved set.
fn percent(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len());
    for &b in data {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The shorter of a plain and a gzip+base64 data URL. No hash: the bytes travel inside
/// the config itself, so a hash beside them proves nothing, and 64 random bytes per
/// file were a quarter of a compressed config (providers cap user-data at 16 KiB).
fn contents(data: &[u8], allow_gzip: bool) -> Contents {
    let plain = format!("data:,{}", percent(data));
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(data);
    let gz = gz.finish().unwrap_or_default();
    let packed = format!(
        "data:;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&gz)
    );
    let verification = None;
    if allow_gzip && packed.len() < plain.len() {
        Contents {
            source: packed,
            compression: Some("gzip".into()),
            verification,
        }
    } else {
        Contents {
            source: plain,
            compression: None,
            verification,
        }
    }
}

fn is_unit(path: &str) -> Option<&str> {
    let name = path.strip_prefix(SYSTEMD_UNIT_DIR)?.strip_prefix('/')?;
    let units = [
        ".service", ".timer", ".socket", ".path", ".target", ".mount",
    ];
    (!name.contains('/') && units.iter().any(|s| name.ends_with(s))).then_some(name)
}

/// Builds the config JSON (pretty-printed, deterministic).
pub fn emit(
    tree: &HostTree,
    version: &str,
    helper: Option<&Helper>,
    baked: &[String],
) -> Result<Vec<u8>, IgnitionError> {
    let out = emit_inner(tree, version, helper, baked, true)?;
    if out.len() <= WRAP_ABOVE {
        return Ok(out);
    }
    // Inside a compressed wrapper, plain data URLs compress far better together than
    // many small gzip+base64 ones.
    let inner = emit_inner(tree, version, helper, baked, false)?;
    Ok(wrap(version, &inner))
}

fn emit_inner(
    tree: &HostTree,
    version: &str,
    helper: Option<&Helper>,
    baked: &[String],
    allow_gzip: bool,
) -> Result<Vec<u8>, IgnitionError> {
    if !VERSIONS.contains(&version) {
        return Err(IgnitionError::Version(version.into()));
    }
    if let Some(b) = baked.first() {
        return Err(IgnitionError::Baked(b.clone()));
    }
    let needs_helper = tree.entries.values().any(|e| matches!(&e.kind, EntryKind::File { content } if is_unit(&e.path).is_some() && content.windows(8).any(|w| w == b"imgbuild")));
    let mut files = vec![];
    let mut dirs = vec![];
    let mut links = vec![];
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    for e in tree.entries.values() {
        match &e.kind {
            EntryKind::File { content } => {
                if let Some(name) = is_unit(&e.path) {
                    units.insert(
                        name.to_string(),
                        Unit {
                            name: name.into(),
                            enabled: None,
                            contents: Some(String::from_utf8_lossy(content).into_owned()),
                        },
                    );
                    continue;
                }
                files.push(File {
                    path: e.path.clone(),
                    mode: e.mode,
                    overwrite: true,
                    user: Owner {
                        name: e.owner.clone(),
                    },
                    group: Owner {
                        name: e.group.clone(),
                    },
                    contents: contents(content, allow_gzip),
                });
            }
            EntryKind::Dir => dirs.push(Dir {
                path: e.path.clone(),
                mode: e.mode,
                overwrite: false,
                user: Owner {
                    name: e.owner.clone(),
                },
                group: Owner {
                    name: e.group.clone(),
                },
            }),
            EntryKind::Symlink { target } => links.push(Link {
                path: e.path.clone(),
                target: target.clone(),
                hard: false,
                overwrite: true,
            }),
        }
    }
    if needs_helper {
        let h = helper.ok_or(IgnitionError::NoHelperUrl)?;
        if !(h.url.starts_with("https://") || h.url.starts_with("s3://")) {
            return Err(IgnitionError::BadHelperUrl(h.url.clone()));
        }
        files.push(File {
            path: "/usr/local/bin/imgbuild".into(),
            mode: 0o755,
            overwrite: true,
            user: Owner {
                name: "root".into(),
            },
            group: Owner {
                name: "root".into(),
            },
            contents: Contents {
                source: h.url.clone(),
                compression: None,
                verification: Some(Verification {
                    hash: format!("sha512-{}", h.sha512),
                }),
            },
        });
        files.sort_by(|a, b| a.path.cmp(&b.path));
    }
    for en in &tree.enable {
        units
            .entry(en.unit.clone())
            .or_insert_with(|| Unit {
                name: en.unit.clone(),
                enabled: None,
                contents: None,
            })
            .enabled = Some(true);
    }
    let users = tree
        .users
        .iter()
        .map(|u| User {
            name: u.name.clone(),
            ssh_authorized_keys: u.ssh_authorized_keys.clone(),
            home_dir: u.home.clone(),
            shell: u.shell.clone(),
        })
        .collect();
    let cfg = Config {
        ignition: Meta {
            version: version.into(),
        },
        passwd: Passwd { users },
        storage: Storage {
            directories: dirs,
            files,
            links,
        },
        systemd: Systemd {
            units: units.into_values().collect(),
        },
    };
    // Compact JSON: providers cap user-data (16-64 KiB), and nobody edits this by hand.
    let mut out = serde_json::to_vec(&cfg).unwrap_or_default();
    out.push(b'\n');
    Ok(out)
}

/// Configs above this size are shipped gzip-compressed inside a small outer config
/// (`ignition.config.replace`), which every Ignition 3.x understands.
pub const WRAP_ABOVE: usize = 16 * 1024;

#[derive(Serialize)]
struct Outer {
    ignition: OuterMeta,
}

#[derive(Serialize)]
struct OuterMeta {
    version: String,
    config: OuterConfig,
}

#[derive(Serialize)]
struct OuterConfig {
    replace: Contents,
}

fn wrap(version: &str, inner: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
    let _ = gz.write_all(inner);
    let gz = gz.finish().unwrap_or_default();
    let outer = Outer {
        ignition: OuterMeta {
            version: version.into(),
            config: OuterConfig {
                replace: Contents {
                    source: format!(
                        "data:;base64,{}",
                        base64::engine::general_purpose::STANDARD.encode(&gz)
                    ),
                    compression: Some("gzip".into()),
                    verification: Some(Verification {
                        hash: format!("sha512-{}", sha512_hex(inner)),
                    }),
                },
            },
        },
    };
    let mut out = serde_json::to_vec(&outer).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The config itself, unwrapping a compressed `config.replace` (for tests and `verify`).
pub fn unwrap_config(data: &[u8]) -> Result<Vec<u8>, String> {
    let v: serde_json::Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let Some(rep) = v.pointer("/ignition/config/replace") else {
        return Ok(data.to_vec());
    };
    let src = rep["source"].as_str().ok_or("replace without source")?;
    let b64 = src
        .strip_prefix("data:;base64,")
        .ok_or("replace is not a base64 data URL")?;
    let gz = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| e.to_string())?;
    let mut inner = Vec::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut inner)
        .map_err(|e| e.to_string())?;
    let want = rep["verification"]["hash"].as_str().unwrap_or_default();
    if want != format!("sha512-{}", sha512_hex(&inner)) {
        return Err("inner config hash mismatch".into());
    }
    Ok(inner)
}

/// sha512 of a file, for `--helper`.
pub fn sha512_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha512::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
