//! imgbuild: host profiles → host tree → Ignition config or signed disk image, plus the
//! in-image helper (first-boot restore, backups, readiness).
//!
//! Three sides, one direction of imports (checked by `tests/layering.rs`):
//!
//! - **build side** (the operator's machine): [`profile`] (parse, merge, validate) →
//!   [`render`] (pure: validated host + secrets read once → [`tree::HostTree`]) →
//!   [`emit`] (Ignition, a directory) | [`image`] (disk, manifest, verify);
//!   [`secrets`] holds the keys, [`hostconfig`] the file the host side reads.
//! - **host side** (inside the image, the same binary): [`agent`] (first boot, the
//!   backup job, readiness, drill mode) on top of the [`snapshot`] engine (format,
//!   crypto, store, chunking, file I/O), which knows nothing of images or drills.
//! - **operator side**: [`cmd`] (one file per CLI verb, clap types in [`cli`]),
//!   [`workstation`] (profile → host config, bucket, keys), [`drill`], [`upload`],
//!   and the QEMU harness ([`qemu`]).

// build side
pub mod emit;
pub mod hostconfig;
pub mod image;
pub mod profile;
pub mod render;
pub mod secrets;
pub mod tree;

// host side
pub mod agent;
pub mod snapshot;

// operator side
pub mod cli;
pub mod cmd;
pub mod drill;
pub mod gendocs;
pub mod qemu;
pub mod upload;
pub mod workstation;

// shared by all sides
pub mod progress;
