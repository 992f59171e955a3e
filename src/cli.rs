//! Command-line types. `main.rs` parses and dispatches; the work is in the modules.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "imgbuild",
    version,
    about = "Build signed, bootable, disposable server images and Ignition configs from host profiles",
    long_about = "Build signed, bootable, disposable server images and Ignition configs from host profiles.\n\n\
                  `imgbuild services --out vps1.qcow2` is `imgbuild build services --out vps1.qcow2`: a profile \
                  name as the first word builds it."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a host: disk image (raw, qcow2) or Ignition config
    Build(BuildArgs),
    /// Write the host tree to a directory, for reading and diffing
    Render(RenderArgs),
    /// Create the host's keys (WireGuard, SSH host key, snapshot keys) and the builder's signing key
    Keys(KeysArgs),
    /// Show what a profile builds: containers, ports, peers, backups
    Summary(SummaryArgs),
}

/// Which profile, which environment, which secrets: shared by every profile verb.
#[derive(Debug, Args, Clone)]
pub struct ProfileArgs {
    /// Profile name (profiles/NAME.toml) or path to a .toml file
    pub profile: String,
    /// Environment overlay from the profile's [environments] (default: host.default_env)
    #[arg(long)]
    pub env: Option<String>,
    /// Secrets root holding <host>/ and builder/ (default: secrets/ beside profiles/)
    #[arg(long)]
    pub secrets: Option<PathBuf>,
    /// Extra overlay file merged last (tests, local tweaks); may repeat
    #[arg(long = "overlay", value_name = "FILE")]
    pub overlays: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
    Ignition,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Output file; its extension (.raw, .img, .qcow2, .ign) picks the format
    #[arg(long, short)]
    pub out: PathBuf,
    /// Output format (overrides the extension)
    #[arg(long)]
    pub format: Option<Format>,
    /// Ignition spec version
    #[arg(long, default_value = "3.4.0", value_parser = ["3.4.0", "3.5.0", "3.6.0"])]
    pub ignition_version: String,
    /// Where an Ignition host downloads this imgbuild binary (https:// or s3://)
    #[arg(long)]
    pub helper_url: Option<String>,
    /// The helper binary put in the image or hashed for --helper-url (default: this binary)
    #[arg(long)]
    pub helper: Option<PathBuf>,
    /// Base OS definition (default: images/<host.base>.toml)
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Rebuild the cached base OS
    #[arg(long)]
    pub refresh_base: bool,
    /// No progress output
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RenderTarget {
    Image,
    Ignition,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Directory to write (must not exist, or be empty)
    #[arg(long, short)]
    pub out: PathBuf,
    /// Render for a disk image (helper in /usr/bin) or an Ignition host (/usr/local/bin)
    #[arg(long, default_value = "image")]
    pub target: RenderTarget,
    /// Print the tree as JSON (paths, modes, owners, sizes; never contents) on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[arg(long)]
    pub json: bool,
}

pub const VERBS: &[&str] = &["build", "render", "keys", "summary", "help"];

/// `imgbuild services --out x` → `imgbuild build services --out x`.
pub fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        if !first.starts_with('-') && !VERBS.contains(&first) {
            args.insert(1, "build".into());
        }
    }
    args
}
