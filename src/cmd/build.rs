//! `imgbuild build PROFILE --out FILE` (or just `imgbuild PROFILE --out FILE`): the
//! disk image or the Ignition config, from one rendered host tree.

use crate::cli::{BuildArgs, Format};
use crate::emit;
use crate::progress::Progress;
use crate::render::{self, Target};
use crate::workstation::load;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The format from `--format`, else from the extension of `--out`.
pub fn pick_format(format: Option<Format>, out: &Path) -> Result<Format> {
    if let Some(f) = format {
        return Ok(f);
    }
    match out.extension().and_then(|e| e.to_str()) {
        Some("ign") | Some("json") => Ok(Format::Ignition),
        Some("qcow2") => Ok(Format::Qcow2),
        Some("raw") | Some("img") => Ok(Format::Raw),
        _ => bail!("cannot tell the output format from `{}`\n  hint: use a .qcow2, .raw, .img or .ign extension, or --format", out.display()),
    }
}

/// Third-party configs in the tree, checked by their own tools before any output.
fn check_configs(tree: &crate::tree::HostTree, progress: &Progress) -> Result<()> {
    for note in render::check::check_tree(tree)? {
        progress.note(&format!("imgbuild: note: {note}"));
    }
    Ok(())
}

/// A host that backs up or restores needs S3 credentials in its image; without them
/// it would boot into a 15-minute wait and stay down (restore = "require"), or never
/// back up. Said at build time, where it can be fixed, not on a provider's console.
fn check_credentials(
    input: &crate::render::RenderInput,
    root: &crate::secrets::SecretsRoot,
    allow_missing: bool,
) -> Result<()> {
    let Some(b) = &input.host.profile.backup else {
        return Ok(());
    };
    let host = input.host.name();
    let s3_env = root.host_dir(host).join("s3.env");
    let problem = if !root.is_file(&s3_env) {
        format!("{} does not exist", s3_env.display())
    } else {
        let text = root.read_text(&s3_env)?;
        let has = |k: &str| {
            text.lines().any(|l| {
                let l = l.trim().strip_prefix("export ").unwrap_or(l.trim());
                l.split_once('=')
                    .is_some_and(|(n, v)| n.trim() == k && !v.trim().trim_matches('"').is_empty())
            })
        };
        match (has("AWS_ACCESS_KEY_ID"), has("AWS_SECRET_ACCESS_KEY")) {
            (true, true) => return Ok(()),
            _ => format!(
                "{} lacks AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY",
                s3_env.display()
            ),
        }
    };
    let place = format!(
        "s3://{}/{}",
        b.bucket,
        b.prefix.clone().unwrap_or_else(|| host.to_string())
    );
    let fix = format!(
        "put the host's bucket key in {}:\n      AWS_ACCESS_KEY_ID=...\n      AWS_SECRET_ACCESS_KEY=...\n      AWS_REGION=...   (if the bucket is not in the profile's region)\n    (a key that can only reach this bucket; see docs/security.md), then build again",
        s3_env.display()
    );
    let require = b.restore == crate::profile::model::RestoreMode::Require;
    if require && !allow_missing {
        bail!(
            "{host} restores from {place} at first boot (restore = \"require\"), but the image would carry no S3 credentials: {problem}\n  \
             Booted, it would wait restore_timeout and then keep every service down.\n  \
             hint: {fix}.\n  \
             If the host gets credentials another way (an instance role), pass --allow-missing-credentials.\n  \
             First deployment onto an empty bucket: also run `imgbuild init {}`.",
            input.host.path.display()
        );
    }
    eprintln!(
        "imgbuild: warning: {host} backs up to {place}, but the image carries no S3 credentials: {problem}.\n  {}\n  hint: {fix}.",
        if require {
            "Its first boot will keep services down until it can read the bucket (--allow-missing-credentials)."
        } else {
            "Its backups will fail (imgbuild_backup_success 0, the BackupFailed alert) until it has some."
        }
    );
    Ok(())
}

/// A `from` volume is read with a key of its own (read-only on the other host's
/// prefix); without one, first boot could not fetch it and would keep services down.
fn check_moved_credentials(input: &crate::render::RenderInput, allow_missing: bool) -> Result<()> {
    for m in input.moved.iter().filter(|m| m.s3_env.is_none()) {
        let msg = format!(
            "volume {} starts from {}:{} (s3://{}/{}), but {} does not exist: first boot could not read it.\n  \
             hint: create a key that can only read that prefix (docs/disaster-recovery.md, \"Moving a service\") and put it there:\n      \
             AWS_ACCESS_KEY_ID=...\n      AWS_SECRET_ACCESS_KEY=...",
            m.volume,
            m.source.host,
            m.source.volume,
            m.source.bucket,
            m.source.prefix,
            m.s3_env_path.display()
        );
        if !allow_missing {
            bail!("{msg}\n  If the host gets credentials another way, pass --allow-missing-credentials.");
        }
        eprintln!("imgbuild: warning: {msg}");
    }
    Ok(())
}

pub fn run(args: &BuildArgs) -> Result<i32> {
    let progress = Progress::detect(args.quiet || args.json);
    let format = pick_format(args.format, &args.out)?;
    let (input, root) = load(&args.profile, &progress)?;
    check_credentials(&input, &root, args.allow_missing_credentials)?;
    check_moved_credentials(&input, args.allow_missing_credentials)?;
    let helper_bin = match &args.helper {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this imgbuild binary")?,
    };
    match format {
        Format::Ignition => {
            let tree = render::render(&input, Target::Ignition)?;
            check_configs(&tree, &progress)?;
            let helper = match &args.helper_url {
                Some(url) => Some(emit::ignition::Helper {
                    url: url.clone(),
                    sha512: emit::ignition::sha512_file(&helper_bin)
                        .with_context(|| format!("hashing {}", helper_bin.display()))?,
                }),
                None => None,
            };
            let baked: Vec<String> = input
                .host
                .profile
                .containers
                .iter()
                .filter(|(_, c)| c.bake.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            let data =
                emit::ignition::emit(&tree, &args.ignition_version, helper.as_ref(), &baked)?;
            let mode = if tree.has_secrets() { 0o600 } else { 0o644 };
            emit::write_atomic(&args.out, &data, mode)
                .with_context(|| format!("writing {}", args.out.display()))?;
            if tree.has_secrets() {
                progress.note(&format!("imgbuild: {} holds the host's private keys: it is mode 0600; pass it to the provider as user-data, never publish it", args.out.display()));
            }
            if args.json {
                println!(
                    "{}",
                    json!({ "host": tree.host, "env": input.host.env, "format": "ignition", "out": args.out, "bytes": data.len(), "ignition_version": args.ignition_version, "tree_digest": tree.digest(), "profile_digest": input.host.digest })
                );
            } else {
                progress.note(&format!("imgbuild: wrote {} ({} bytes; providers' user-data limits: 16 KiB at some, 64 KiB at most)", args.out.display(), data.len()));
            }
        }
        Format::Raw | Format::Qcow2 => {
            let (tree, report) = disk_image(
                &input,
                &root,
                &DiskOptions {
                    out: args.out.clone(),
                    qcow2: format == Format::Qcow2,
                    base: args.base.clone(),
                    refresh_base: args.refresh_base,
                    helper_bin,
                },
                &progress,
            )?;
            if args.json {
                println!(
                    "{}",
                    json!({ "host": tree.host, "env": input.host.env, "format": if format == Format::Raw { "raw" } else { "qcow2" }, "out": report.out, "manifest": report.manifest, "bytes": report.size_bytes, "tree_digest": tree.digest(), "profile_digest": input.host.digest })
                );
            } else {
                progress.note(&format!(
                    "imgbuild: wrote {} ({} bytes, mode 0600: it holds the host's keys) and {}",
                    report.out.display(),
                    report.size_bytes,
                    report.manifest.display()
                ));
            }
        }
    }
    Ok(0)
}

/// How [`disk_image`] writes the disk.
pub struct DiskOptions {
    pub out: PathBuf,
    pub qcow2: bool,
    pub base: Option<PathBuf>,
    pub refresh_base: bool,
    pub helper_bin: PathBuf,
}

/// Renders `input` and writes the signed disk image (shared with `imgbuild drill`,
/// which builds from an input whose bucket credentials it has replaced).
pub fn disk_image(
    input: &render::RenderInput,
    root: &crate::secrets::SecretsRoot,
    opts: &DiskOptions,
    progress: &Progress,
) -> Result<(crate::tree::HostTree, crate::image::ImageReport)> {
    let tree = render::render(input, Target::Image)?;
    check_configs(&tree, progress)?;
    let (signing_key, created) = root.ensure_builder()?;
    if !created.0.is_empty() {
        progress.note(&format!(
            "imgbuild: created the builder's image-signing key in {}",
            root.builder_dir().display()
        ));
    }
    let base_def = match &opts.base {
        Some(b) => b.clone(),
        None => find_base(&input.host.dir, &input.host.profile.host.base)?,
    };
    let mut baked = vec![];
    for (name, c) in &input.host.profile.containers {
        if let Some(b) = &c.bake {
            let src = input.host.dir.join(b);
            if !src.is_file() {
                bail!(
                    "{}: containers.{name}.bake: {} does not exist",
                    input.host.path.display(),
                    src.display()
                );
            }
            baked.push((render::baked_path(name), src));
        }
    }
    let req = crate::image::ImageRequest {
        tree: &tree,
        out: opts.out.clone(),
        format: if opts.qcow2 {
            crate::image::DiskFormat::Qcow2
        } else {
            crate::image::DiskFormat::Raw
        },
        base_def,
        refresh_base: opts.refresh_base,
        signing_key: &signing_key,
        profile_digest: input.host.digest.clone(),
        baked_images: baked,
        helper_binary: opts.helper_bin.clone(),
        progress: progress.clone(),
        cache_dir: None,
        mirror: std::env::var("IMGBUILD_MIRROR")
            .ok()
            .filter(|m| !m.is_empty()),
    };
    let report = crate::image::build(&req)?;
    Ok((tree, report))
}

/// `images/<base>.toml`, searched beside the profiles and in the current directory.
pub fn find_base(profile_dir: &Path, base: &str) -> Result<PathBuf> {
    let mut candidates = vec![];
    if let Some(parent) = profile_dir.parent() {
        candidates.push(parent.join("images").join(format!("{base}.toml")));
    }
    candidates.push(profile_dir.join("images").join(format!("{base}.toml")));
    candidates.push(PathBuf::from("images").join(format!("{base}.toml")));
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no base OS definition `{base}`: looked for {}\n  hint: pass --base FILE",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
