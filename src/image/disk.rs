//! Disk assembly: layout, filesystems written in place, GPT, manifest, output format.
//!
//! Layout (512-byte sectors, 1 MiB aligned):
//!   protective MBR + primary GPT | esp | root (ext4, read-only) | imgbuild-manifest | var
//!   | backup GPT
//! /var is last so systemd-repart can grow it over whatever the provider's disk adds.

use super::base;
use super::esp::{self, EspFiles};
use super::manifest::{self, Manifest, Region};
use super::rootfs::{self, Usage};
use super::tools::{self, QEMU_IMG};
use super::{io_err, DiskFormat, ImageError, ImageReport, ImageRequest};
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

pub(crate) const TYPE_ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// Discoverable Partitions Specification: root (x86-64).
pub(crate) const TYPE_ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
/// Discoverable Partitions Specification: /var.
pub(crate) const TYPE_VAR: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";
/// imgbuild's own type for the partition holding the signed manifest.
pub(crate) const TYPE_MANIFEST: &str = "5a1f3c2e-8d47-4b6a-9f1e-2c3d4e5f6a7b";
pub(crate) const MANIFEST_PARTLABEL: &str = "imgbuild-manifest";

/// GPT attribute bit 60: read-only (honoured by systemd's gpt-auto and repart).
const FLAG_READ_ONLY: u64 = 1 << 60;

/// Identifiers derived from what the image is, never random: same inputs, same bytes.
pub(crate) struct Ids {
    seed: Vec<u8>,
}

impl Ids {
    pub fn new(host: &str, tree_digest: &str, base_digest: &str) -> Ids {
        let mut seed = Vec::new();
        for s in [host, tree_digest, base_digest] {
            seed.extend_from_slice(&(s.len() as u64).to_le_bytes());
            seed.extend_from_slice(s.as_bytes());
        }
        Ids { seed }
    }

    pub fn uuid(&self, purpose: &str) -> Uuid {
        let mut h = Sha256::new();
        h.update(b"imgbuild-uuid\0");
        h.update(purpose.as_bytes());
        h.update([0]);
        h.update(&self.seed);
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        // Shaped as a version-4 UUID so tools that check the variant accept it.
        uuid::Builder::from_random_bytes(b).into_uuid()
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub start: u64,
    pub len: u64,
}

impl Span {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// See `layout`: what repart needs at least for the volumes partition (128 MiB) plus
/// room to grow /var a little.
const FIRST_BOOT_FREE: u64 = 256 * MIB;

struct Layout {
    esp: Span,
    root: Span,
    manifest: Span,
    var: Span,
    total: u64,
}

fn layout(esp: u64, root: u64, var: u64) -> Layout {
    let esp = Span {
        start: MIB,
        len: esp,
    };
    let root = Span {
        start: esp.end(),
        len: root,
    };
    let manifest = Span {
        start: root.end(),
        len: MIB,
    };
    let var = Span {
        start: manifest.end(),
        len: var,
    };
    // Unpartitioned space for first boot: systemd-repart creates the btrfs volumes
    // partition there (and grows /var) even when the disk is no bigger than the image,
    // as under `imgbuild run`. Sparse in a raw file, absent from qcow2.
    // The last MiB holds the backup GPT (33 sectors) and keeps the end aligned.
    let total = var.end() + FIRST_BOOT_FREE + MIB;
    Layout {
        esp,
        root,
        manifest,
        var,
        total,
    }
}

fn round_mib(b: u64) -> u64 {
    b.div_ceil(MIB) * MIB
}

/// A read-only root needs no slack: data, inode tables and ext4 metadata, plus a margin
/// that mkfs' own bookkeeping (group descriptors, bitmaps, directories) eats.
fn root_size(u: Usage, extra: f64) -> u64 {
    let est = u.bytes + u.entries * 256;
    round_mib((est as f64 * (1.08 + extra)) as u64 + 32 * MIB)
}

/// /var starts small (what the base and tree put there, plus 64 MiB) and grows over the
/// rest of the disk at first boot; every byte here is written, hashed and compressed on
/// each build, so no more than that.
fn var_size(u: Usage, extra: f64) -> u64 {
    let est = u.bytes + u.entries * 256;
    round_mib((est as f64 * (1.2 + extra)) as u64 + 64 * MIB)
}

pub(crate) fn build(req: &ImageRequest<'_>) -> Result<ImageReport, ImageError> {
    let started = Instant::now();
    let mut timings = Vec::new();
    let cache = req
        .cache_dir
        .clone()
        .unwrap_or_else(super::default_cache_dir);
    let mkfs = tools::mkfs_ext4()?;
    if req.format == DiskFormat::Qcow2 {
        QEMU_IMG.find()?;
    }
    let t = Instant::now();
    let (base, base_built) = base::ensure(
        &req.base_def,
        &cache,
        req.refresh_base,
        req.mirror.as_deref(),
        &req.progress,
    )?;
    timings.push(("base".to_string(), t.elapsed()));
    let epoch = super::source_date_epoch();
    let tree = req.tree;
    let tree_digest = tree.digest();
    let ids = Ids::new(&tree.host, &tree_digest, &base.digest);

    let out_dir = match req.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).map_err(io_err(format!(
        "cannot create output dir {}",
        out_dir.display()
    )))?;
    // Work files live beside the output: the final rename stays on one filesystem, and
    // a crash leaves only a dot-directory that the next build does not read.
    let work = tempfile::Builder::new()
        .prefix(".imgbuild-work-")
        .tempdir_in(&out_dir)
        .map_err(io_err("cannot create work dir beside the output"))?;
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot restrict work dir"))?;

    let step = req.progress.step("host tree", None);
    let items = rootfs::overlay(tree, &base, &req.helper_binary, &req.baked_images, epoch)?;
    let tars = rootfs::write_tars(&base, &items, work.path(), epoch)?;
    timings.push(("host tree + tar".to_string(), step.finish()));

    let root_uuid = ids.uuid("root-partition");
    let cmdline = format!("root=PARTUUID={root_uuid} ro {}", base.def.cmdline.trim())
        .trim()
        .to_string();
    let esp_files = EspFiles {
        bootloader: &base.bootloader(),
        kernel: &base.kernel(),
        initrd: &base.initrd(),
        entry_title: format!("{} (imgbuild)", tree.host),
        cmdline,
    };
    let esp_size = esp::size_for(&esp_files)?;
    let esp_vol = u32::from_le_bytes(
        ids.uuid("esp-filesystem").as_bytes()[..4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    let raw = work.path().join("disk.raw");

    // Root (the bulk) is made and hashed on one core while /var and the ESP are made and
    // hashed on the other. mkfs fails cleanly when an estimate is short: retry with more
    // room rather than over-allocating every image.
    let mut extra = 0.0;
    let (lay, hashes) = loop {
        let lay = layout(
            esp_size,
            root_size(tars.root_usage, extra),
            var_size(tars.var_usage, extra),
        );
        let _ = fs::remove_file(&raw);
        let disk = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&raw)
            .map_err(io_err("cannot create disk file"))?;
        disk.set_len(lay.total)
            .map_err(io_err("cannot size disk file"))?;
        drop(disk);
        let step = req.progress.step("filesystems", None);
        let (ra, rb) = std::thread::scope(|s| {
            let a = s.spawn(
                || -> Result<Vec<(&'static str, String, Duration)>, ImageError> {
                    let t = Instant::now();
                    let inodes = tars.root_usage.entries + tars.root_usage.entries / 10 + 1024;
                    mkfs_ext4(
                        &mkfs,
                        &raw,
                        lay.root,
                        "root",
                        &ids,
                        &tars.root,
                        epoch,
                        Some(inodes),
                    )?;
                    let d = t.elapsed();
                    let t = Instant::now();
                    let h = hash_span(&raw, lay.root)?;
                    Ok(vec![
                        ("mkfs root", String::new(), d),
                        ("root", h, t.elapsed()),
                    ])
                },
            );
            let b = s.spawn(
                || -> Result<Vec<(&'static str, String, Duration)>, ImageError> {
                    let t = Instant::now();
                    mkfs_ext4(&mkfs, &raw, lay.var, "var", &ids, &tars.var, epoch, None)?;
                    let mut disk = fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&raw)
                        .map_err(io_err("cannot open disk file"))?;
                    esp::write(
                        &mut disk,
                        lay.esp.start,
                        lay.esp.len,
                        esp_vol,
                        &esp_files,
                        epoch,
                    )?;
                    let d = t.elapsed();
                    let t = Instant::now();
                    let hv = hash_span(&raw, lay.var)?;
                    let he = hash_span(&raw, lay.esp)?;
                    Ok(vec![
                        ("mkfs var + esp", String::new(), d),
                        ("var", hv, t.elapsed()),
                        ("esp", he, Duration::ZERO),
                    ])
                },
            );
            let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
                h.join().unwrap_or_else(|_| {
                    Err(ImageError::Manifest("filesystem thread panicked".into()))
                })
            };
            (join(a), join(b))
        });
        match ra.and_then(|a| rb.map(|b| (a, b))) {
            Ok((a, b)) => {
                step.finish();
                let mut all = a;
                all.extend(b);
                break (lay, all);
            }
            Err(ImageError::Command { log_tail, .. })
                if extra < 1.0
                    && (log_tail.contains("No space left")
                        || log_tail.contains("Could not allocate")
                        || log_tail.contains("too small")) =>
            {
                step.finish();
                extra += 0.3;
            }
            Err(e) => return Err(e),
        }
    };
    for (name, _, d) in &hashes {
        let label = match *name {
            "root" | "var" | "esp" => format!("hash {name}"),
            n => n.to_string(),
        };
        if !d.is_zero() {
            timings.push((label, *d));
        }
    }

    let step = req.progress.step("sign", None);
    let part_hashes: Vec<(&str, String)> = hashes
        .iter()
        .filter(|(k, _, _)| matches!(*k, "esp" | "root" | "var"))
        .map(|(k, h, _)| (*k, h.clone()))
        .collect();
    let origin = Origin {
        host: tree.host.clone(),
        profile_digest: req.profile_digest.clone(),
        base_digest: base.digest.clone(),
        base_name: base.def.name.clone(),
        kernel_version: base.index.kernel_version.clone(),
        host_tree_digest: tree_digest.clone(),
    };
    let (json, sig) = seal(&raw, &lay, &ids, &part_hashes, origin, req.signing_key)?;
    timings.push(("gpt + sign".to_string(), step.finish()));

    let final_tmp = work.path().join("out");
    match req.format {
        DiskFormat::Raw => fs::rename(&raw, &final_tmp).map_err(io_err("cannot move raw"))?,
        DiskFormat::Qcow2 => {
            let step = req.progress.step("qcow2", None);
            let qemu_img = QEMU_IMG.find()?;
            tools::run_captured(
                Command::new(qemu_img)
                    .args(["convert", "-f", "raw", "-O", "qcow2", "-c", "-o"])
                    .arg("compression_type=zstd")
                    .arg(&raw)
                    .arg(&final_tmp),
                "qemu-img convert",
            )?;
            let _ = fs::remove_file(&raw);
            timings.push(("qcow2 (zstd)".to_string(), step.finish()));
        }
    }
    // 0600 before it gets its public name: the image holds the host's secrets.
    fs::set_permissions(&final_tmp, fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot chmod image"))?;
    let manifest_path = sidecar(&req.out, ".manifest.json");
    let sig_path = sidecar(&req.out, ".manifest.json.sig");
    let mtmp = work.path().join("manifest.json");
    let stmp = work.path().join("manifest.json.sig");
    fs::write(&mtmp, &json).map_err(io_err("cannot write manifest"))?;
    fs::write(&stmp, manifest::sig_text(&sig)).map_err(io_err("cannot write signature"))?;
    fs::rename(&final_tmp, &req.out).map_err(io_err(format!(
        "cannot move image to {}",
        req.out.display()
    )))?;
    fs::rename(&mtmp, &manifest_path).map_err(io_err("cannot move manifest"))?;
    fs::rename(&stmp, &sig_path).map_err(io_err("cannot move signature"))?;
    let total: Duration = timings.iter().map(|(_, d)| *d).sum();
    let summary: Vec<String> = timings
        .iter()
        .map(|(n, d)| format!("{n} {:.2}s", d.as_secs_f64()))
        .collect();
    // Steps on the two filesystem threads overlap, so the wall time is less than the sum.
    req.progress.note(&format!(
        "image timing: {} (sum {:.1}s, wall {:.1}s)",
        summary.join(", "),
        total.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    let size_bytes = fs::metadata(&req.out)
        .map_err(io_err("cannot stat image"))?
        .len();
    Ok(ImageReport {
        out: req.out.clone(),
        manifest: manifest_path,
        signature: sig_path,
        size_bytes,
        disk_bytes: lay.total,
        base_digest: base.digest.clone(),
        base_built,
        timings,
    })
}

/// What the manifest records about where an image comes from (all but its byte ranges).
pub(crate) struct Origin {
    pub host: String,
    pub profile_digest: String,
    pub base_digest: String,
    pub base_name: String,
    pub kernel_version: String,
    pub host_tree_digest: String,
}

/// Writes the GPT, hashes every range but the manifest partition, signs the manifest and
/// writes it into that partition followed by zeros up to its end. `part_hashes` holds the
/// sha256 of `esp`, `root` and `var`, taken while their filesystems were made.
///
/// The padding is written rather than left to the sparse file: verify demands zeros
/// there (the partition cannot hash itself), so they must not depend on what the work
/// file held before.
fn seal(
    raw: &Path,
    lay: &Layout,
    ids: &Ids,
    part_hashes: &[(&str, String)],
    origin: Origin,
    key: &ed25519_dalek::SigningKey,
) -> Result<(Vec<u8>, ed25519_dalek::Signature), ImageError> {
    let mut disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)
        .map_err(io_err("cannot open disk file"))?;
    write_gpt(&mut disk, lay, ids)?;
    // Everything outside the partitions is in these two ranges: the MBR, the primary GPT
    // and the gap up to the ESP; the space left for first boot and the backup GPT.
    let gpt_primary = Span {
        start: 0,
        len: lay.esp.start,
    };
    let gpt_backup = Span {
        start: lay.var.end(),
        len: lay.total - lay.var.end(),
    };
    let mut hashes: Vec<(&str, String)> = part_hashes.to_vec();
    hashes.push(("gpt-primary", hash_span(raw, gpt_primary)?));
    hashes.push(("gpt-backup", hash_span(raw, gpt_backup)?));
    let hash_of = |n: &str| {
        hashes
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, h)| h.clone())
            .ok_or_else(|| ImageError::Manifest(format!("no sha256 of {n} to sign")))
    };
    let region = |name: &str, span: Span, purpose: Option<&str>| -> Result<Region, ImageError> {
        Ok(Region {
            name: name.to_string(),
            offset: span.start,
            length: span.len,
            sha256: hash_of(name)?,
            partuuid: purpose.map(|p| ids.uuid(p).to_string()),
        })
    };
    let regions = vec![
        region("gpt-primary", gpt_primary, None)?,
        region("esp", lay.esp, Some("esp-partition"))?,
        region("root", lay.root, Some("root-partition"))?,
        region("var", lay.var, Some("var-partition"))?,
        region("gpt-backup", gpt_backup, None)?,
    ];
    let m = Manifest {
        format: manifest::FORMAT.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        host: origin.host,
        profile_digest: origin.profile_digest,
        base_digest: origin.base_digest,
        base_name: origin.base_name,
        kernel_version: origin.kernel_version,
        host_tree_digest: origin.host_tree_digest,
        disk_size: lay.total,
        disk_guid: ids.uuid("disk").to_string(),
        manifest_partition: manifest::Extent {
            offset: lay.manifest.start,
            length: lay.manifest.len,
        },
        regions,
    };
    let (json, sig) = manifest::sign(&m, key)?;
    let mut embedded = manifest::embed(&json, &sig);
    if embedded.len() as u64 > lay.manifest.len {
        return Err(ImageError::Manifest(
            "manifest does not fit its partition".into(),
        ));
    }
    embedded.resize(lay.manifest.len as usize, 0);
    disk.write_all_at(&embedded, lay.manifest.start)
        .map_err(io_err("cannot write manifest partition"))?;
    // No fsync: mkfs flushed the filesystems, and a crash before the final rename leaves
    // only the work dir, never a half image under the output name.
    Ok((json, sig))
}

/// `vps1.qcow2` → `vps1.qcow2.manifest.json`.
pub(crate) fn sidecar(image: &Path, suffix: &str) -> PathBuf {
    let mut s = image.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[allow(clippy::too_many_arguments)]
fn mkfs_ext4(
    mkfs: &Path,
    disk: &Path,
    span: Span,
    label: &str,
    ids: &Ids,
    tar: &Path,
    epoch: u64,
    read_only_root: Option<u64>,
) -> Result<(), ImageError> {
    let fs_uuid = ids.uuid(&format!("{label}-filesystem"));
    let seed = ids.uuid(&format!("{label}-hash-seed"));
    let mut cmd = Command::new(mkfs);
    // E2FSPROGS_FAKE_TIME pins every timestamp mke2fs writes itself (superblock,
    // root and lost+found inodes); the tar carries the files' own times.
    cmd.env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", label, "-U"])
        .arg(fs_uuid.to_string())
        .arg("-E");
    if let Some(inodes) = read_only_root {
        // Never mounted read-write: no journal, no reserved blocks, only the inodes the
        // tree needs, and inode tables left unwritten (they are zeros in the sparse
        // file; the kernel's lazy init only runs on read-write mounts). Nothing changes
        // the bytes after the build, which a dm-verity tree over this partition needs.
        cmd.arg(format!(
            "offset={},hash_seed={seed},nodiscard,root_owner=0:0,lazy_itable_init=1",
            span.start
        ))
        .args(["-m", "0", "-O", "^has_journal", "-N"])
        .arg(inodes.to_string());
    } else {
        cmd.arg(format!(
            "offset={},hash_seed={seed},nodiscard,root_owner=0:0",
            span.start
        ));
    }
    cmd.arg("-d")
        .arg(tar)
        .arg(disk)
        .arg(format!("{}k", span.len / 1024));
    tools::run_captured(&mut cmd, &format!("mkfs.ext4 ({label})"))?;
    Ok(())
}

fn write_gpt(disk: &mut fs::File, lay: &Layout, ids: &Ids) -> Result<(), ImageError> {
    use gpt::partition::Partition;
    use gpt::partition_types::{OperatingSystem, Type};
    let gerr = |e: gpt::GptError| ImageError::Io {
        what: "cannot write GPT".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let ty = |s: &str| -> Result<Type, ImageError> {
        Ok(Type {
            guid: Uuid::parse_str(s).map_err(|e| ImageError::Tree(e.to_string()))?,
            os: OperatingSystem::Linux,
        })
    };
    let part = |name: &str, span: Span, t: Type, flags: u64, purpose: &str| Partition {
        part_type_guid: t,
        part_guid: ids.uuid(purpose),
        first_lba: span.start / SECTOR,
        last_lba: span.end() / SECTOR - 1,
        flags,
        name: name.to_string(),
    };
    let mut parts = std::collections::BTreeMap::new();
    parts.insert(1, part("esp", lay.esp, ty(TYPE_ESP)?, 0, "esp-partition"));
    parts.insert(
        2,
        part(
            "root",
            lay.root,
            ty(TYPE_ROOT_X86_64)?,
            FLAG_READ_ONLY,
            "root-partition",
        ),
    );
    parts.insert(
        3,
        part(
            MANIFEST_PARTLABEL,
            lay.manifest,
            ty(TYPE_MANIFEST)?,
            0,
            "manifest-partition",
        ),
    );
    parts.insert(4, part("var", lay.var, ty(TYPE_VAR)?, 0, "var-partition"));
    let dev = disk.try_clone().map_err(io_err("cannot reopen disk"))?;
    let mut g = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(dev, Some(ids.uuid("disk")))
        .map_err(gerr)?;
    g.update_partitions(parts).map_err(gerr)?;
    let mut dev = g.write().map_err(gerr)?;
    let lbs = (lay.total / SECTOR - 1).min(u32::MAX as u64) as u32;
    gpt::mbr::ProtectiveMBR::with_lb_size(lbs)
        .overwrite_lba0(&mut dev)
        .map_err(|e| ImageError::Io {
            what: "cannot write protective MBR".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(())
}

pub(crate) fn hash_span(path: &Path, span: Span) -> Result<String, ImageError> {
    let f = fs::File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut pos = span.start;
    let end = span.end();
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], pos).map_err(io_err(format!(
            "cannot read {} at {pos} (is the image truncated?)",
            path.display()
        )))?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = Ids::new("vps1", "t", "b");
        assert_eq!(a.uuid("root-partition"), a.uuid("root-partition"));
        assert_ne!(a.uuid("root-partition"), a.uuid("var-partition"));
        assert_ne!(
            a.uuid("root-partition"),
            Ids::new("vps2", "t", "b").uuid("root-partition")
        );
        assert_eq!(a.uuid("disk").get_version_num(), 4);
    }

    #[test]
    fn layout_is_aligned_and_var_is_last() {
        let l = layout(64 * MIB, 700 * MIB, 300 * MIB);
        for s in [l.esp, l.root, l.manifest, l.var] {
            assert_eq!(s.start % MIB, 0);
            assert_eq!(s.len % MIB, 0);
        }
        assert!(l.var.start > l.root.start);
        assert_eq!(l.total, l.var.end() + FIRST_BOOT_FREE + MIB);
    }

    /// A small disk laid out and sealed like a real build (same layout, GPT, manifest
    /// and embedding code; a byte pattern stands in for the mkfs'd filesystems), with
    /// its sidecar manifest and signature as `build` writes them.
    struct Sealed {
        _dir: tempfile::TempDir,
        raw: PathBuf,
        lay: Layout,
        embedded_len: u64,
        key: ed25519_dalek::SigningKey,
    }

    fn sealed_disk() -> Sealed {
        let dir = tempfile::tempdir().expect("temp dir");
        let raw = dir.path().join("disk.raw");
        let lay = layout(MIB, 2 * MIB, 3 * MIB);
        let f = fs::File::create(&raw).expect("create disk");
        f.set_len(lay.total).expect("size disk");
        let mut part_hashes = Vec::new();
        for (i, (name, span)) in [("esp", lay.esp), ("root", lay.root), ("var", lay.var)]
            .into_iter()
            .enumerate()
        {
            let fill: Vec<u8> = (0..span.len)
                .map(|b| (b % 251) as u8 ^ (i as u8 + 1))
                .collect();
            f.write_all_at(&fill, span.start).expect("fill partition");
            part_hashes.push((name, hash_span(&raw, span).expect("hash")));
        }
        drop(f);
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let origin = Origin {
            host: "t".into(),
            profile_digest: "p".into(),
            base_digest: "b".into(),
            base_name: "debian-trixie".into(),
            kernel_version: "6.12".into(),
            host_tree_digest: "h".into(),
        };
        let ids = Ids::new("t", "h", "b");
        let (json, sig) = seal(&raw, &lay, &ids, &part_hashes, origin, &key).expect("seal");
        fs::write(sidecar(&raw, ".manifest.json"), &json).expect("sidecar");
        fs::write(
            sidecar(&raw, ".manifest.json.sig"),
            manifest::sig_text(&sig),
        )
        .expect("sidecar sig");
        let embedded_len = manifest::embed(&json, &sig).len() as u64;
        Sealed {
            _dir: dir,
            raw,
            lay,
            embedded_len,
            key,
        }
    }

    fn flip(path: &Path, offset: u64) {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open disk");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).expect("read byte");
        b[0] ^= 0x5a;
        f.write_all_at(&b, offset).expect("write byte");
    }

    fn rejected_naming(image: &Path, key: &ed25519_dalek::VerifyingKey, what: &str, case: &str) {
        match manifest::verify(image, key) {
            Err(ImageError::VerifyFailed { mismatches, .. }) => {
                let all = mismatches.join("; ");
                assert!(
                    all.contains(what),
                    "{case}: should name {what:?}, said: {all}"
                );
            }
            Err(e) => panic!("{case}: failed with an unexpected error: {e}"),
            Ok(_) => panic!("{case}: verify passed"),
        }
    }

    #[test]
    fn verify_rejects_a_flipped_byte_in_the_manifest_padding_and_the_gaps() {
        let d = sealed_disk();
        let key = d.key.verifying_key();
        let side = sidecar(&d.raw, ".manifest.json");
        let side_sig = sidecar(&d.raw, ".manifest.json.sig");
        let hidden = d.raw.with_extension("hidden");
        let hidden_sig = d.raw.with_extension("hidden.sig");
        let rep = manifest::verify(&d.raw, &key).expect("fresh disk verifies");
        assert_eq!(rep.manifest_source, "sidecar");
        assert_eq!(rep.manifest.manifest_partition.offset, d.lay.manifest.start);

        let m = d.lay.manifest;
        let sig_line = d.embedded_len - 10;
        let cases = [
            (
                m.start + d.embedded_len,
                "imgbuild-manifest",
                "first padding byte",
            ),
            (
                m.start + d.embedded_len + 4321,
                "imgbuild-manifest",
                "padding",
            ),
            (
                m.end() - 1,
                "imgbuild-manifest",
                "last byte of the manifest partition",
            ),
            // The signature line is only checked for being a valid signature when the
            // embedded copy is the one read; next to a sidecar it must still be exact.
            (
                m.start + sig_line,
                "imgbuild-manifest",
                "embedded signature line",
            ),
            (
                34 * SECTOR + 100,
                "GPT (protective MBR, primary",
                "gap between the primary GPT and the ESP",
            ),
            (
                d.lay.var.end() + FIRST_BOOT_FREE / 2,
                "GPT (backup",
                "unpartitioned space left for first boot",
            ),
            (d.lay.total - 1, "GPT (backup", "last byte of the disk"),
        ];
        for (off, what, case) in cases {
            flip(&d.raw, off);
            rejected_naming(&d.raw, &key, what, case);
            // The same with only the embedded manifest to go by (no sidecar); a flip
            // inside the embedded signature makes it unreadable or unsigned, which is
            // also a rejection.
            fs::rename(&side, &hidden).unwrap();
            fs::rename(&side_sig, &hidden_sig).unwrap();
            let alone = manifest::verify(&d.raw, &key);
            assert!(alone.is_err(), "{case}: the embedded manifest alone passed");
            fs::rename(&hidden, &side).unwrap();
            fs::rename(&hidden_sig, &side_sig).unwrap();
            flip(&d.raw, off);
        }
        manifest::verify(&d.raw, &key).expect("restored disk verifies again");
        fs::rename(&side, &hidden).unwrap();
        let rep = manifest::verify(&d.raw, &key).expect("embedded manifest alone verifies");
        assert_eq!(rep.manifest_source, "embedded");
    }

    #[test]
    fn verify_of_a_qcow2_covers_the_manifest_padding_too() {
        let d = sealed_disk();
        let key = d.key.verifying_key();
        let qemu_img = QEMU_IMG
            .find()
            .expect("qemu-img (bash .ci/deps.sh installs it)");
        let to_qcow2 = |name: &str| -> PathBuf {
            let q = d.raw.with_file_name(name);
            tools::run_captured(
                Command::new(&qemu_img)
                    .args(["convert", "-f", "raw", "-O", "qcow2", "-c", "-o"])
                    .arg("compression_type=zstd")
                    .arg(&d.raw)
                    .arg(&q),
                "qemu-img convert",
            )
            .expect("convert to qcow2");
            for suffix in [".manifest.json", ".manifest.json.sig"] {
                fs::copy(sidecar(&d.raw, suffix), sidecar(&q, suffix)).expect("sidecar");
            }
            q
        };
        let good = to_qcow2("good.qcow2");
        manifest::verify(&good, &key).expect("fresh qcow2 verifies");
        flip(&d.raw, d.lay.manifest.start + d.embedded_len + 777);
        let bad = to_qcow2("bad.qcow2");
        rejected_naming(
            &bad,
            &key,
            "imgbuild-manifest",
            "qcow2 with flipped padding",
        );
    }
}
