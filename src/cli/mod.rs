//! Command-line types (clap). `main.rs` parses, `crate::cmd` runs one verb per file.

pub mod snapshot;

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
    /// First deployment: create the host's keys and mark its (empty) bucket prefix so its first boot starts empty
    Init(InitArgs),
    /// Show what a profile builds: containers, ports, peers, backups
    Summary(SummaryArgs),
    /// Check an image against its signed manifest
    Verify(VerifyArgs),
    /// Boot an image in QEMU: a disposable staging copy of the host
    Run(RunArgs),
    /// Snapshot volumes to S3 (in the image; or from a workstation with a profile and --from)
    Backup {
        #[command(flatten)]
        args: snapshot::BackupArgs,
        #[command(flatten)]
        sel: Selection,
    },
    /// List a host's snapshots
    Snapshots {
        #[command(flatten)]
        args: snapshot::SnapshotsArgs,
        #[command(flatten)]
        sel: Selection,
    },
    /// Restore a snapshot into a directory
    Restore {
        #[command(flatten)]
        args: snapshot::RestoreArgs,
        #[command(flatten)]
        sel: Selection,
    },
    /// Check a host's snapshots (all packs read with --read-data, a share with --read-data-subset; in the image: the check timer's job)
    Check {
        #[command(flatten)]
        args: snapshot::CheckArgs,
        #[command(flatten)]
        sel: Selection,
    },
    /// Disaster-recovery drill: boot the host's image in an isolated QEMU, restore from the bucket read-only, check services
    Drill(DrillArgs),
    /// Drill internals: QEMU runs this once per guest connection to the read-only gateway
    #[command(hide = true, name = "drill-relay")]
    DrillRelay {
        /// The gateway's port on 127.0.0.1
        port: u16,
    },
    /// In the image: restore volumes from the latest snapshot before services start
    Firstboot(snapshot::FirstbootArgs),
    /// In the image: wait for the host's units, print the readiness line on the console
    Ready(ReadyArgs),
    /// In the image: write a PostgreSQL volume's WAL archive settings before its container starts
    PostgresPrepare {
        /// The volume (marked `postgres` in the profile)
        volume: String,
        #[command(flatten)]
        host: ReadyArgs,
    },
    /// In the image: ship PostgreSQL WAL files from the spool to the bucket as they are finished (imgbuild-wal.service)
    WalShip(ReadyArgs),
    /// Upload an image (and its signed manifest) to s3://bucket/key for a provider's import
    Upload(UploadArgs),
    /// Encrypt (lock) or decrypt (unlock) the secrets directory with age
    Secrets(SecretsArgs),
    /// Regenerate man pages and shell completions (for packagers; docs/ holds a copy)
    #[command(hide = true)]
    GenDocs {
        /// Output directory (gets man/ and completions/)
        out: PathBuf,
    },
}

/// Environment and secrets for verbs whose profile argument belongs to another module.
#[derive(Debug, Args, Clone, Default)]
pub struct Selection {
    /// Environment overlay from the profile's [environments]
    #[arg(long)]
    pub env: Option<String>,
    /// Secrets root holding <host>/ (default: secrets/ beside profiles/)
    #[arg(long)]
    pub secrets: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Image to check (raw or qcow2)
    pub image: PathBuf,
    /// Builder's public key: a file with 64 hex characters, or the hex itself
    #[arg(long, conflicts_with = "secrets")]
    pub key: Option<String>,
    /// Secrets root whose builder/image-signing.pub to use (default: ./secrets)
    #[arg(long)]
    pub secrets: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `imgbuild drill`: exit 0 when the drill passes, 1 when it fails (with the reasons),
/// 2 for a bad profile or usage.
#[derive(Debug, Args)]
pub struct DrillArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Snapshot id to restore (default: the newest in the bucket)
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Drill this image (checked against its signed manifest first) instead of building one
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Builder's public key for --image: a file with 64 hex characters, or the hex itself
    /// (default: <secrets>/builder/image-signing.pub)
    #[arg(long, requires = "image")]
    pub key: Option<String>,
    #[command(flatten)]
    pub bucket: snapshot::BucketArgs,
    /// Give up when the guest is not ready after this many seconds
    #[arg(long, default_value_t = 1200, value_name = "SECS")]
    pub timeout: u64,
    /// Keep the guest's serial console log in this file
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Let the guest reach the internet, for containers whose images are pulled from a
    /// registry rather than baked. WireGuard stays down, backups stay off and the bucket
    /// is still reached only through the read-only gateway (the guest holds dummy
    /// bucket credentials, so --image, which carries the real ones, is refused), but the
    /// apps themselves may talk to the outside (federation, mail): bake the images
    /// instead when you can
    #[arg(long)]
    pub allow_egress: bool,
    /// Print the report as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Print nothing unless the drill fails (for cron)
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image to boot (raw or qcow2)
    pub image: PathBuf,
    /// Keep the guest's writes in the image (default: throw them away)
    #[arg(long)]
    pub persist: bool,
    /// Host port on 127.0.0.1 forwarded to the guest's SSH
    #[arg(long, default_value_t = 2222)]
    pub ssh_port: u16,
    /// Extra forward HOST:GUEST (TCP, on 127.0.0.1); may repeat
    #[arg(long = "forward", value_name = "HOST:GUEST")]
    pub forwards: Vec<String>,
    /// Forward the public TCP ports this profile publishes (ports below 1024 as 8000+port)
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Present a bigger disk, like a provider's (e.g. 20G)
    #[arg(long)]
    pub disk_size: Option<String>,
}

#[derive(Debug, Args)]
pub struct SecretsArgs {
    #[command(subcommand)]
    pub action: SecretsAction,
}

#[derive(Debug, Subcommand)]
pub enum SecretsAction {
    /// Pack secrets/ into secrets.age (to age recipients, an identity or a passphrase);
    /// the directory is removed only once the archive has been decrypted and matches it
    /// byte for byte
    Lock {
        /// Secrets root (default: ./secrets)
        #[arg(long)]
        secrets: Option<PathBuf>,
        /// age recipient (age1...); may repeat. Without --identity nothing proves the
        /// archive opens, so the directory is kept until `--confirm-with`
        #[arg(long = "recipient", short = 'r')]
        recipients: Vec<String>,
        /// age identity file: lock to its recipient too (besides any -r), and open the
        /// archive with it before removing the directory
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Name of an environment variable holding the passphrase (instead of recipients)
        #[arg(long, conflicts_with_all = ["recipients", "identity"])]
        passphrase_env: Option<String>,
        /// Finish a lock to recipients: check that secrets.age opens with this identity
        /// file and holds every file of the directory, then remove the directory
        #[arg(long, value_name = "IDENTITY", conflicts_with_all = ["recipients", "identity", "passphrase_env"])]
        confirm_with: Option<PathBuf>,
    },
    /// Unpack secrets.age back into secrets/
    Unlock {
        /// Secrets root (default: ./secrets)
        #[arg(long)]
        secrets: Option<PathBuf>,
        /// age identity file
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Name of an environment variable holding the passphrase
        #[arg(long)]
        passphrase_env: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ReadyArgs {
    /// Host config to read
    #[arg(long, default_value = crate::hostconfig::HOST_CONFIG_PATH, hide = true)]
    pub config: PathBuf,
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
    /// age identity file to open a locked secrets root (or IMGBUILD_AGE_IDENTITY;
    /// a passphrase comes from IMGBUILD_PASSPHRASE)
    #[arg(long)]
    pub identity: Option<PathBuf>,
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
    /// Build even though the host restores from its bucket (restore = "require") and the
    /// image would carry no S3 credentials (no secrets/<host>/s3.env): for hosts that get
    /// credentials another way, e.g. an instance role
    #[arg(long)]
    pub allow_missing_credentials: bool,
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
pub struct InitArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[command(flatten)]
    pub bucket: snapshot::BucketArgs,
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

/// The verbs `--help` lists (hidden ones excluded), from the clap definition itself.
pub fn verbs() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect()
}

/// `imgbuild services --out x` → `imgbuild build services --out x`.
pub fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        use clap::CommandFactory;
        let known = Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == first)
            || first == "help";
        if !first.starts_with('-') && !known {
            args.insert(1, "build".into());
        }
    }
    args
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Image file (raw or qcow2)
    pub image: PathBuf,
    /// Destination, s3://bucket/key
    pub dest: String,
    /// S3 endpoint (default: AWS_ENDPOINT_URL_S3, or AWS); implies path-style
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Region (default: AWS_REGION, else us-east-1)
    #[arg(long)]
    pub region: Option<String>,
    /// Part size in MiB (64: a 2 GiB image is 32 parts, far under S3's 10 000-part limit)
    #[arg(long, default_value_t = 64)]
    pub part_mib: usize,
    #[arg(long, short)]
    pub quiet: bool,
    #[arg(long)]
    pub json: bool,
}
