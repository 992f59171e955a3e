//! The profile verbs: build, render, keys, summary. Each loads the profile the same
//! way (`render::prepare`) and reports with context at the edge.

use crate::cli::{
    BuildArgs, Format, KeysArgs, ProfileArgs, RenderArgs, RenderTarget, RunArgs, Selection,
    SummaryArgs, VerifyArgs,
};
use crate::emit;
use crate::hostconfig::HostConfig;
use crate::profile::LoadOptions;
use crate::progress::Progress;
use crate::render::{self, RenderInput, Target};
use crate::secrets::SecretsRoot;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

pub(crate) fn load(args: &ProfileArgs, progress: &Progress) -> Result<(RenderInput, SecretsRoot)> {
    let opts = LoadOptions {
        env: args.env.clone(),
        overlays: args.overlays.clone(),
    };
    let unlock = crate::secrets::Unlock::from_env(args.identity.clone());
    let (input, root) = render::prepare(&args.profile, &opts, args.secrets.as_deref(), &unlock)?;
    if !input.created.is_empty() {
        progress.note(&format!(
            "imgbuild: created {} new key file(s) in {} (keep this directory safe: it is the host's identity)",
            input.created.len(),
            root.root.display()
        ));
    }
    Ok((input, root))
}

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

pub fn build(args: &BuildArgs) -> Result<i32> {
    let progress = Progress::detect(args.quiet || args.json);
    let format = pick_format(args.format, &args.out)?;
    let (input, root) = load(&args.profile, &progress)?;
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
            let tree = render::render(&input, Target::Image)?;
            check_configs(&tree, &progress)?;
            let (signing_key, created) = root.ensure_builder()?;
            if !created.0.is_empty() {
                progress.note(&format!(
                    "imgbuild: created the builder's image-signing key in {}",
                    root.builder_dir().display()
                ));
            }
            let base_def = match &args.base {
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
                out: args.out.clone(),
                format: if format == Format::Raw {
                    crate::image::DiskFormat::Raw
                } else {
                    crate::image::DiskFormat::Qcow2
                },
                base_def,
                refresh_base: args.refresh_base,
                signing_key: &signing_key,
                profile_digest: input.host.digest.clone(),
                baked_images: baked,
                helper_binary: helper_bin,
                progress: progress.clone(),
                cache_dir: None,
                mirror: std::env::var("IMGBUILD_MIRROR")
                    .ok()
                    .filter(|m| !m.is_empty()),
            };
            let report = crate::image::build(&req)?;
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

pub fn render_cmd(args: &RenderArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    let (input, _) = load(&args.profile, &progress)?;
    let target = match args.target {
        RenderTarget::Image => Target::Image,
        RenderTarget::Ignition => Target::Ignition,
    };
    let tree = render::render(&input, target)?;
    emit::dir::write(&tree, &args.out)
        .with_context(|| format!("writing the host tree to {}", args.out.display()))?;
    if args.json {
        let entries: Vec<_> = tree
            .entries
            .values()
            .map(|e| {
                let (kind, size) = match &e.kind {
                    crate::tree::EntryKind::File { content } => ("file", content.len()),
                    crate::tree::EntryKind::Dir => ("dir", 0),
                    crate::tree::EntryKind::Symlink { .. } => ("symlink", 0),
                };
                json!({ "path": e.path, "kind": kind, "mode": format!("{:04o}", e.mode), "owner": e.owner, "group": e.group, "size": size, "secret": e.secret })
            })
            .collect();
        println!(
            "{}",
            json!({ "host": tree.host, "env": input.host.env, "digest": tree.digest(), "entries": entries, "enable": tree.enable.iter().map(|e| json!({"unit": e.unit, "wanted_by": e.wanted_by})).collect::<Vec<_>>() })
        );
    } else {
        progress.note(&format!(
            "imgbuild: wrote {} entries to {}",
            tree.entries.len(),
            args.out.display()
        ));
    }
    Ok(0)
}

pub fn keys(args: &KeysArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    let (input, root) = load(&args.profile, &progress)?;
    let (_, builder_created) = root.ensure_builder()?;
    let mut created = input.created.clone();
    created.extend(builder_created.0);
    let dir = root.host_dir(input.host.name());
    let wg_pub =
        std::fs::read_to_string(dir.join("wireguard.pub")).context("reading wireguard.pub")?;
    let ssh_pub = std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub"))
        .context("reading ssh_host_ed25519_key.pub")?;
    if args.json {
        println!(
            "{}",
            json!({ "host": input.host.name(), "secrets": dir, "created": created, "wireguard_public_key": wg_pub.trim(), "ssh_host_key": ssh_pub.trim() })
        );
    } else {
        println!("host {} — secrets in {}", input.host.name(), dir.display());
        println!(
            "  created: {}",
            if created.is_empty() {
                "nothing (all keys existed)".to_string()
            } else {
                created
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        println!("  wireguard public key: {}", wg_pub.trim());
        println!("  ssh host key: {}", ssh_pub.trim());
        println!(
            "  known_hosts line: {} {}",
            input
                .host
                .profile
                .wireguard
                .as_ref()
                .and_then(|w| w.endpoint.as_deref())
                .and_then(|e| e.rsplit_once(':').map(|(h, _)| h))
                .unwrap_or(input.host.name()),
            ssh_pub.trim()
        );
    }
    Ok(0)
}

pub fn summary(args: &SummaryArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    let (input, _) = load(&args.profile, &progress)?;
    let tree = render::render(&input, Target::Image)?;
    let p = &input.host.profile;
    let containers: Vec<_> = p.containers.iter().map(|(n, c)| json!({ "name": n, "image": c.image, "publish": c.publish, "domain": c.domain, "volumes": c.volumes, "auto_update": c.auto_update, "baked": c.bake.is_some() })).collect();
    let peers: Vec<_> = input.peers.iter().map(|pe| json!({ "host": pe.host, "address": pe.address, "endpoint": pe.endpoint, "public_key": pe.public_key })).collect();
    let backup = p.backup.as_ref().map(|b| json!({ "bucket": b.bucket, "prefix": b.prefix.clone().unwrap_or_else(|| input.host.name().to_string()), "endpoint": b.endpoint, "schedule": b.schedule, "restore": format!("{:?}", b.restore).to_lowercase(), "object_lock_days": b.object_lock_days }));
    let s = json!({ "host": input.host.name(), "env": input.host.env, "profile": input.host.path, "profile_digest": input.host.digest, "tree_digest": tree.digest(), "files": tree.entries.len(), "containers": containers, "peers": peers, "backup": backup });
    if args.json {
        println!("{s}");
    } else {
        println!(
            "host {} (env {}) from {}",
            input.host.name(),
            input.host.env,
            input.host.path.display()
        );
        println!(
            "  tree: {} entries, digest {}",
            tree.entries.len(),
            &tree.digest()[..16]
        );
        for (n, c) in &p.containers {
            let extra = c
                .domain
                .as_ref()
                .map(|d| format!(" → https://{d}"))
                .unwrap_or_default();
            println!(
                "  container {n}: {}{}{}",
                c.image,
                if c.publish.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", c.publish.join(", "))
                },
                extra
            );
        }
        for pe in &input.peers {
            println!(
                "  wireguard peer {} at {} ({})",
                pe.host,
                pe.address,
                pe.endpoint.as_deref().unwrap_or("dials in")
            );
        }
        match &p.backup {
            Some(b) => println!(
                "  backup: s3://{}/{} at {:?}, restore {:?}",
                b.bucket,
                b.prefix
                    .clone()
                    .unwrap_or_else(|| input.host.name().to_string()),
                b.schedule,
                b.restore
            ),
            None => println!("  backup: none"),
        }
    }
    Ok(0)
}

/// Profile → (host config as the host would read it, host secrets dir), for the
/// snapshot verbs.
pub fn resolver(
    sel: &Selection,
) -> impl Fn(&str) -> Result<(HostConfig, crate::secrets::SecretsRoot)> + '_ {
    move |profile: &str| {
        let opts = LoadOptions {
            env: sel.env.clone(),
            overlays: vec![],
        };
        let (input, _) = render::prepare(
            profile,
            &opts,
            sel.secrets.as_deref(),
            &crate::secrets::Unlock::from_env(None),
        )?;
        let tree = render::render(&input, Target::Image)?;
        Ok((host_config_of(&tree)?, input.secrets.clone()))
    }
}

/// The host config a rendered tree installs (what the in-image helper will read).
pub(crate) fn host_config_of(tree: &crate::tree::HostTree) -> Result<HostConfig> {
    match tree
        .entries
        .get(crate::hostconfig::HOST_CONFIG_PATH)
        .map(|e| &e.kind)
    {
        Some(crate::tree::EntryKind::File { content }) => {
            toml::from_str::<HostConfig>(&String::from_utf8_lossy(content))
                .context("the rendered host config does not parse")
        }
        _ => bail!(
            "the rendered tree has no {}",
            crate::hostconfig::HOST_CONFIG_PATH
        ),
    }
}

fn read_pubkey(spec: &str) -> Result<ed25519_dalek::VerifyingKey> {
    let text = if Path::new(spec).is_file() {
        std::fs::read_to_string(spec).with_context(|| format!("reading {spec}"))?
    } else {
        spec.to_string()
    };
    let bytes = hex::decode(text.trim()).context("the key is not 64 hex characters")?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("the key is not 32 bytes"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&arr).context("not an ed25519 public key")
}

/// The key an image must be signed with: `--key` (a file or the hex itself), else the
/// builder's public key in the secrets root.
pub fn builder_pubkey(
    key: Option<&str>,
    root: &SecretsRoot,
) -> Result<ed25519_dalek::VerifyingKey> {
    match key {
        Some(k) => read_pubkey(k),
        None => {
            let p = root.builder_dir().join("image-signing.pub");
            read_pubkey(&p.to_string_lossy()).with_context(|| {
                format!(
                    "builder key {}\n  hint: pass --key PUB or --secrets DIR",
                    p.display()
                )
            })
        }
    }
}

pub fn verify(args: &VerifyArgs) -> Result<i32> {
    let root = SecretsRoot::new(
        args.secrets
            .clone()
            .unwrap_or_else(|| PathBuf::from("secrets")),
    );
    let key = builder_pubkey(args.key.as_deref(), &root)?;
    match crate::image::verify(&args.image, &key) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "image": args.image, "ok": true, "manifest": report.manifest_source, "checked": report.checked })
                );
            } else {
                println!(
                    "{}: OK ({} regions match the {} manifest, signature valid)",
                    args.image.display(),
                    report.checked.len(),
                    report.manifest_source
                );
            }
            Ok(0)
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "image": args.image, "ok": false, "error": e.to_string() })
                );
            }
            Err(e).with_context(|| format!("{} does not verify", args.image.display()))
        }
    }
}

fn parse_size(s: &str) -> Result<u64> {
    let (num, mul) = match s.chars().last() {
        Some('G') | Some('g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("`{s}` is not a size like 20G"))?
        * mul)
}

pub fn run(args: &RunArgs) -> Result<i32> {
    let mut opts = crate::image::RunOptions::new(&args.image);
    opts.persist = args.persist;
    opts.ssh_port = Some(args.ssh_port);
    opts.memory_mib = args.memory;
    opts.cpus = args.cpus;
    opts.disk_size = args.disk_size.as_deref().map(parse_size).transpose()?;
    for f in &args.forwards {
        let (h, g) = f
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--forward {f}: expected HOST:GUEST"))?;
        opts.forwards.push((
            h.parse().context("--forward host port")?,
            g.parse().context("--forward guest port")?,
        ));
    }
    if let Some(p) = &args.profile {
        let progress = Progress::detect(false);
        let (input, _) = load(
            &ProfileArgs {
                profile: p.clone(),
                env: None,
                secrets: None,
                overlays: vec![],
                identity: None,
            },
            &progress,
        )?;
        for c in input.host.profile.containers.values() {
            for spec in &c.publish {
                if let Ok(pb) = crate::profile::parse_publish(spec) {
                    if pb.proto == "tcp" && pb.ip.is_none() {
                        let host_port = if pb.host_port < 1024 {
                            8000 + pb.host_port
                        } else {
                            pb.host_port
                        };
                        progress.note(&format!(
                            "imgbuild: 127.0.0.1:{host_port} → guest port {}",
                            pb.host_port
                        ));
                        opts.forwards.push((host_port, pb.host_port));
                    }
                }
            }
        }
    }
    Ok(crate::image::run(&opts)?)
}

pub fn secrets_cmd(args: &crate::cli::SecretsArgs) -> Result<i32> {
    use crate::cli::SecretsAction;
    use crate::secrets::{self, LockTo, Unlock};
    let env_pass = |var: &Option<String>| -> Result<Option<String>> {
        match var {
            Some(v) => {
                Ok(Some(std::env::var(v).with_context(|| {
                    format!("environment variable {v} is not set")
                })?))
            }
            None => Ok(None),
        }
    };
    match &args.action {
        SecretsAction::Lock {
            secrets: dir,
            recipients,
            passphrase_env,
        } => {
            let root = SecretsRoot::new(dir.clone().unwrap_or_else(|| PathBuf::from("secrets")));
            let to = match env_pass(passphrase_env)? {
                Some(p) => LockTo::Passphrase(p),
                None if !recipients.is_empty() => LockTo::Recipients(recipients.clone()),
                None => bail!(
                    "say who can unlock: --recipient age1... (repeatable) or --passphrase-env VAR"
                ),
            };
            let out = secrets::lock(&root, &to)?;
            println!("locked {} into {} (the directory is removed; builds read the locked file in memory)", root.root.display(), out.display());
        }
        SecretsAction::Unlock {
            secrets: dir,
            identity,
            passphrase_env,
        } => {
            let root = dir.clone().unwrap_or_else(|| PathBuf::from("secrets"));
            let mut u = Unlock::from_env(identity.clone());
            if let Some(p) = env_pass(passphrase_env)? {
                u.passphrase = Some(p);
            }
            secrets::unlock(&root, &u)?;
            println!("unlocked into {}", root.display());
        }
    }
    Ok(0)
}
