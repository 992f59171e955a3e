//! Disk image assembly: base rootfs + host tree + helper binary → GPT disk → signed manifest.
//!
//! Owned by the disk-image work (issue 3). The CLI calls `build`, `cmd_verify`, `cmd_run`,
//! `cmd_ready`.

use crate::progress::Progress;
use crate::tree::HostTree;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
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
}

#[derive(Debug)]
pub struct ImageReport {
    pub out: PathBuf,
    pub manifest: PathBuf,
    pub size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("disk image output is not implemented yet")]
    NotImplemented,
}

pub fn build(_req: &ImageRequest<'_>) -> Result<ImageReport, ImageError> {
    Err(ImageError::NotImplemented)
}
