//! imgbuild: host profiles → host tree → Ignition config or signed disk image,
//! plus the in-image helper (first-boot restore, backups, readiness).
//!
//! Data flow, one module per stage:
//! `profile` (parse, merge, validate) → `render` (templates → `tree::HostTree`)
//! → `emit::ignition` | `image` (disk assembly, signing, verify, QEMU run).
//! `secrets` holds key generation; `snapshot` the S3 data half; `hostconfig`
//! the file the in-image helper reads.

pub mod cli;
pub mod commands;
pub mod drill;
pub mod emit;
pub mod gendocs;
pub mod hostconfig;
pub mod image;
pub mod profile;
pub mod progress;
pub mod render;
pub mod secrets;
pub mod snapshot;
pub mod tree;
pub mod upload;
