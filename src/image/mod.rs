//! Disk image assembly: base rootfs + host tree + helper binary → GPT disk → signed manifest.
//!
//! The CLI calls [`build`] and [`verify`]; booting an image is the operator side's
//! `crate::qemu`.
//!
//! Nothing here needs root, loop devices or mounts: the root and /var filesystems are
//! written by `mkfs.ext4 -E offset=… -d <tar>` straight into the disk file, the ESP by the
//! `fatfs` crate, the partition table by the `gpt` crate.

pub mod base;
mod disk;
mod esp;
pub mod manifest;
mod rootfs;
pub(crate) mod tools;

pub use manifest::{verify, Manifest, Region, VerifyReport};

use crate::progress::Progress;
use crate::tree::HostTree;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// `.qcow2` → qcow2, anything else → raw; the CLI's `--format` wins over this.
    pub fn from_extension(path: &Path) -> DiskFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("qcow2") => DiskFormat::Qcow2,
            _ => DiskFormat::Raw,
        }
    }
}

/// Everything the assembler needs; the CLI fills it from the profile and flags.
pub struct ImageRequest<'a> {
    pub tree: &'a HostTree,
    pub out: PathBuf,
    pub format: DiskFormat,
    /// Base OS definition, e.g. `images/debian-trixie.toml`.
    pub base_def: PathBuf,
    pub refresh_base: bool,
    /// Builder's image-signing key (never copied into the image).
    pub signing_key: &'a ed25519_dalek::SigningKey,
    /// sha256 of the profile source(s) after environment merge.
    pub profile_digest: String,
    /// OCI archives to bake: (absolute destination path inside the image, e.g.
    /// `/usr/share/imgbuild/images/web.oci.tar`, source path on the build machine).
    /// The quadlets already reference the destination as `Image=oci-archive:<dest>`.
    pub baked_images: Vec<(String, PathBuf)>,
    /// The helper binary to install as /usr/bin/imgbuild (normally `current_exe()`).
    pub helper_binary: PathBuf,
    pub progress: Progress,
    /// Where bases are cached; None = [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Debian mirror for the base build; None = `IMGBUILD_MIRROR`, else the definition's,
    /// else mmdebstrap's default.
    pub mirror: Option<String>,
}

#[derive(Debug)]
pub struct ImageReport {
    pub out: PathBuf,
    pub manifest: PathBuf,
    pub signature: PathBuf,
    /// Size of the written file (qcow2: the compressed file).
    pub size_bytes: u64,
    /// Virtual size of the disk.
    pub disk_bytes: u64,
    pub base_digest: String,
    /// True when the base was built in this run (not taken from the cache).
    pub base_built: bool,
    /// Wall time per step, in order, for the timing summary.
    pub timings: Vec<(String, Duration)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} is not installed; install it with: {hint}")]
    ToolMissing { tool: String, hint: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}){}", tail_fmt(.log_tail))]
    Command {
        cmd: String,
        status: String,
        log_tail: String,
    },
    #[error("base definition {path}: {msg}")]
    BaseDefinition { path: PathBuf, msg: String },
    #[error("base {digest} in the cache is unusable: {msg} (rebuild it with --refresh-base)")]
    BaseCache { digest: String, msg: String },
    #[error("host tree: {0}")]
    Tree(String),
    #[error("image {path}: {msg}")]
    BadImage { path: PathBuf, msg: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("image {path} does not match its manifest: {}", .mismatches.join("; "))]
    VerifyFailed {
        path: PathBuf,
        mismatches: Vec<String>,
    },
    #[error("qemu: {0}")]
    Qemu(String),
}

fn tail_fmt(t: &str) -> String {
    if t.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", t.trim_end())
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Fixed timestamp for every file and filesystem in the image, so the same inputs give
/// the same bytes; `SOURCE_DATE_EPOCH` overrides it (reproducible-builds convention).
pub const DEFAULT_EPOCH: u64 = 1_735_689_600; // 2025-01-01T00:00:00Z

pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_EPOCH)
}

/// Cache root: `$IMGBUILD_CACHE_DIR`, else `$XDG_CACHE_HOME/imgbuild`, else
/// `~/.cache/imgbuild`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("IMGBUILD_CACHE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(x);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("imgbuild");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache").join("imgbuild");
    }
    PathBuf::from("/var/tmp/imgbuild-cache")
}

/// Builds the image the request describes: base (cached), root and /var filesystems,
/// ESP, GPT, signed manifest; then raw or qcow2 output, written to a temp file in the
/// output directory and renamed into place, mode 0600.
pub fn build(req: &ImageRequest<'_>) -> Result<ImageReport, ImageError> {
    disk::build(req)
}
