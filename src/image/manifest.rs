//! The signed manifest: what an image is made of (tool, profile, base, host tree) and
//! the sha256 of every byte range that matters. Written beside the image
//! (`<image>.manifest.json` + `.sig`) and into the image's `imgbuild-manifest`
//! partition, the one range the manifest cannot hash because it holds the manifest;
//! verify holds that partition to its exact content (the embedded manifest, then zeros)
//! instead, so every byte of the disk is checked.

use super::disk::{self, hash_span, Span};
use super::tools::{self, QEMU_IMG};
use super::{io_err, ImageError};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const FORMAT: &str = "imgbuild-manifest/1";
const EMBED_MAGIC: &str = "IMGBUILD-MANIFEST/1\n";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub tool_version: String,
    pub host: String,
    pub profile_digest: String,
    pub base_digest: String,
    pub base_name: String,
    pub kernel_version: String,
    pub host_tree_digest: String,
    pub disk_size: u64,
    pub disk_guid: String,
    /// Where the embedded copy lives (not hashed: it is the manifest; verify requires
    /// it to hold exactly that copy followed by zeros).
    pub manifest_partition: Extent,
    pub regions: Vec<Region>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// `gpt-primary` (protective MBR, GPT header and entries, up to the first
    /// partition), a partition label (`esp`, `root`, `var`), or `gpt-backup`.
    pub name: String,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

pub(crate) fn sign(m: &Manifest, key: &SigningKey) -> Result<(Vec<u8>, Signature), ImageError> {
    let mut json = serde_json::to_vec_pretty(m).map_err(|e| ImageError::Manifest(e.to_string()))?;
    json.push(b'\n');
    let sig = key.sign(&json);
    Ok((json, sig))
}

pub(crate) fn sig_text(sig: &Signature) -> String {
    format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
    )
}

/// The partition content: magic, length, manifest bytes, signature line; zero padded.
pub(crate) fn embed(json: &[u8], sig: &Signature) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(EMBED_MAGIC.as_bytes());
    v.extend_from_slice(format!("{}\n", json.len()).as_bytes());
    v.extend_from_slice(json);
    v.extend_from_slice(sig_text(sig).as_bytes());
    v
}

fn parse_embedded(buf: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let rest = buf.strip_prefix(EMBED_MAGIC.as_bytes())?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let len: usize = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
    let rest = &rest[nl + 1..];
    if rest.len() < len {
        return None;
    }
    let json = rest[..len].to_vec();
    let sig_line = &rest[len..];
    let end = sig_line.iter().position(|&b| b == b'\n')?;
    Some((json, sig_line[..end].to_vec()))
}

fn decode_sig(bytes: &[u8]) -> Option<Signature> {
    if bytes.len() == 64 {
        return Signature::from_slice(bytes).ok();
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .or_else(|| hex::decode(text).ok())?;
    Signature::from_slice(&raw).ok()
}

#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub manifest: Manifest,
    /// `sidecar` or `embedded`: which copy of the manifest was checked.
    pub manifest_source: &'static str,
    /// Every region whose hash matched.
    pub checked: Vec<String>,
}

/// Checks a raw or qcow2 image against its signed manifest with the builder's public key.
/// The manifest comes from `<image>.manifest.json` (+ `.sig`) if present, else from the
/// image's own manifest partition; both copies must agree when both exist. The regions
/// and the manifest partition must tile the whole disk, and the manifest partition must
/// hold exactly the embedded manifest followed by zeros. Returns `VerifyFailed` naming
/// every range that does not match (GPT areas, partitions, the signature, the embedded
/// copy and its padding).
pub fn verify(image: &Path, key: &VerifyingKey) -> Result<VerifyReport, ImageError> {
    let bad = |msg: String| ImageError::BadImage {
        path: image.to_path_buf(),
        msg,
    };
    let mut magic = [0u8; 4];
    fs::File::open(image)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(io_err(format!("cannot read {}", image.display())))?;
    let _tmp;
    let raw: PathBuf = if &magic == b"QFI\xfb" {
        let qemu_img = QEMU_IMG.find()?;
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-verify-")
            .tempdir()
            .map_err(io_err("cannot create temp dir"))?;
        let raw = dir.path().join("disk.raw");
        tools::run_captured(
            Command::new(qemu_img)
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(image)
                .arg(&raw),
            "qemu-img convert (qcow2 → raw)",
        )?;
        _tmp = dir;
        raw
    } else {
        image.to_path_buf()
    };
    let raw_len = fs::metadata(&raw)
        .map_err(io_err("cannot stat image"))?
        .len();

    let embedded = read_embedded(&raw);
    let side_m = disk::sidecar(image, ".manifest.json");
    let side_s = disk::sidecar(image, ".manifest.json.sig");
    let (json, sig_bytes, source) = if side_m.is_file() {
        let j = fs::read(&side_m).map_err(io_err(format!("cannot read {}", side_m.display())))?;
        let s = fs::read(&side_s).map_err(io_err(format!(
            "cannot read signature {}",
            side_s.display()
        )))?;
        (j, s, "sidecar")
    } else if let Some((j, s)) = embedded.clone() {
        (j, s, "embedded")
    } else {
        return Err(bad("no manifest beside the image and none inside it".into()));
    };
    let mut mismatches = Vec::new();
    let sig = decode_sig(&sig_bytes).filter(|s| key.verify(&json, s).is_ok());
    let Some(sig) = sig else {
        // Nothing in an unauthenticated manifest is worth comparing against.
        return Err(ImageError::VerifyFailed {
            path: image.to_path_buf(),
            mismatches: vec![format!(
                "signature: the {source} manifest is not signed by this key"
            )],
        });
    };
    let m: Manifest = serde_json::from_slice(&json)
        .map_err(|e| ImageError::Manifest(format!("signed but unreadable: {e}")))?;
    if m.format != FORMAT {
        return Err(ImageError::Manifest(format!(
            "format {} is not {FORMAT}",
            m.format
        )));
    }
    if source == "sidecar" {
        match &embedded {
            Some((j, _)) if *j == json => {}
            Some(_) => mismatches.push("embedded manifest differs from the sidecar".into()),
            None => mismatches.push("embedded manifest missing or unreadable".into()),
        }
    }
    if raw_len != m.disk_size {
        mismatches.push(format!(
            "disk size is {raw_len} bytes, manifest says {}",
            m.disk_size
        ));
    }
    mismatches.extend(coverage_gaps(&m));
    let mut checked = Vec::new();
    for r in &m.regions {
        if r.offset
            .checked_add(r.length)
            .is_none_or(|end| end > raw_len)
        {
            mismatches.push(format!("{}: beyond the end of the image", label(&r.name)));
            continue;
        }
        let h = hash_span(
            &raw,
            Span {
                start: r.offset,
                len: r.length,
            },
        )?;
        if h == r.sha256 {
            checked.push(r.name.clone());
        } else {
            mismatches.push(format!("{}: sha256 differs", label(&r.name)));
        }
    }
    match check_manifest_partition(&raw, m.manifest_partition, raw_len, &embed(&json, &sig))? {
        None => checked.push(disk::MANIFEST_PARTLABEL.to_string()),
        Some(why) => mismatches.push(format!("partition {}: {why}", disk::MANIFEST_PARTLABEL)),
    }
    if !mismatches.is_empty() {
        return Err(ImageError::VerifyFailed {
            path: image.to_path_buf(),
            mismatches,
        });
    }
    Ok(VerifyReport {
        manifest: m,
        manifest_source: source,
        checked,
    })
}

/// Every byte of the disk must lie in exactly one hashed region or in the manifest
/// partition; names what lies in none or in two.
fn coverage_gaps(m: &Manifest) -> Vec<String> {
    let mut spans: Vec<(u64, u64, String)> = m
        .regions
        .iter()
        .map(|r| (r.offset, r.length, label(&r.name)))
        .chain(std::iter::once((
            m.manifest_partition.offset,
            m.manifest_partition.length,
            format!("partition {}", disk::MANIFEST_PARTLABEL),
        )))
        .collect();
    spans.sort();
    let mut out = Vec::new();
    let mut covered = 0u64;
    let mut last = String::from("the start of the disk");
    for (offset, length, name) in spans {
        if offset > covered {
            out.push(format!(
                "bytes {covered}..{offset} (after {last}) are in no signed range"
            ));
        } else if offset < covered {
            out.push(format!("{name} overlaps {last}"));
        }
        covered = covered.max(offset.saturating_add(length));
        last = name;
    }
    if covered < m.disk_size {
        out.push(format!(
            "bytes {covered}..{} (after {last}) are in no signed range",
            m.disk_size
        ));
    }
    out
}

/// The manifest partition cannot be hashed in the manifest it holds, so it is held to
/// its exact expected content instead: the embedded copy of the manifest that was just
/// checked (magic, length, JSON, signature line), then zeros to its end. None when it
/// matches, else why not; Err only when the image cannot be read.
fn check_manifest_partition(
    raw: &Path,
    part: Extent,
    raw_len: u64,
    expected: &[u8],
) -> Result<Option<String>, ImageError> {
    if part
        .offset
        .checked_add(part.length)
        .is_none_or(|end| end > raw_len)
    {
        return Ok(Some("beyond the end of the image".into()));
    }
    if expected.len() as u64 > part.length {
        return Ok(Some(format!(
            "{} bytes long, too small for the {}-byte embedded manifest",
            part.length,
            expected.len()
        )));
    }
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(raw).map_err(io_err(format!("cannot open {}", raw.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < part.length {
        let n = ((part.length - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], part.offset + pos)
            .map_err(io_err(format!(
                "cannot read {} at {} (is the image truncated?)",
                raw.display(),
                part.offset + pos
            )))?;
        for (i, &b) in buf[..n].iter().enumerate() {
            let at = pos + i as u64;
            let want = expected.get(at as usize).copied().unwrap_or(0);
            if b != want {
                return Ok(Some(if at < expected.len() as u64 {
                    format!("byte {at} differs from the signed manifest embedded there")
                } else {
                    format!("byte {at} (padding after the embedded manifest) is not zero")
                }));
            }
        }
        pos += n as u64;
    }
    Ok(None)
}

fn label(name: &str) -> String {
    match name {
        "gpt-primary" => "GPT (protective MBR, primary header and entries)".into(),
        "gpt-backup" => "GPT (backup entries and header)".into(),
        p => format!("partition {p}"),
    }
}

/// Finds the manifest partition through the GPT (primary, else backup header).
fn read_embedded(raw: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
    let g = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(raw)
        .ok()?;
    let p = g
        .partitions()
        .values()
        .find(|p| p.name == disk::MANIFEST_PARTLABEL)?;
    let start = p.first_lba * 512;
    let len = ((p.last_lba + 1 - p.first_lba) * 512).min(16 << 20) as usize;
    let mut buf = vec![0u8; len];
    use std::os::unix::fs::FileExt;
    fs::File::open(raw)
        .ok()?
        .read_exact_at(&mut buf, start)
        .ok()?;
    parse_embedded(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_round_trip() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let json = b"{\"a\":1}\n".to_vec();
        let sig = key.sign(&json);
        let mut buf = embed(&json, &sig);
        buf.resize(4096, 0);
        let (j, s) = parse_embedded(&buf).expect("parses");
        assert_eq!(j, json);
        let s = decode_sig(&s).expect("sig decodes");
        assert!(key.verifying_key().verify(&j, &s).is_ok());
        assert!(parse_embedded(&[0u8; 64]).is_none());
    }

    #[test]
    fn regions_and_manifest_partition_must_tile_the_disk() {
        let r = |name: &str, offset: u64, length: u64| Region {
            name: name.into(),
            offset,
            length,
            sha256: String::new(),
            partuuid: None,
        };
        let mut m = Manifest {
            format: FORMAT.into(),
            tool_version: String::new(),
            host: String::new(),
            profile_digest: String::new(),
            base_digest: String::new(),
            base_name: String::new(),
            kernel_version: String::new(),
            host_tree_digest: String::new(),
            disk_size: 100,
            disk_guid: String::new(),
            manifest_partition: Extent {
                offset: 30,
                length: 10,
            },
            regions: vec![r("gpt-primary", 0, 10), r("root", 10, 20), r("var", 40, 60)],
        };
        assert!(coverage_gaps(&m).is_empty(), "{:?}", coverage_gaps(&m));
        m.regions[2].offset = 45;
        m.regions[2].length = 50;
        let gaps = coverage_gaps(&m).join("; ");
        assert!(gaps.contains("bytes 40..45"), "{gaps}");
        assert!(gaps.contains("bytes 95..100"), "{gaps}");
        m.manifest_partition.offset = 25;
        assert!(coverage_gaps(&m).join("; ").contains("overlaps"));
    }
}
