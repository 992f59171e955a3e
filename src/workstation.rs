//! The operator's view of a host: from a profile argument to what the workstation
//! verbs need — the rendered host config (what the image's helper will read), the
//! bucket with the host's keys (a locked secrets root decrypted in memory), and the
//! builder's public key. Shared by `crate::cmd` and `crate::drill`.

use crate::cli::{ProfileArgs, Selection};
use crate::hostconfig::{BackupConfig, HostConfig};
use crate::profile::LoadOptions;
use crate::progress::Progress;
use crate::render::{self, RenderInput, Target as RenderTarget};
use crate::secrets::SecretsRoot;
use crate::snapshot::{Keys, SnapshotError, Target};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Loads a profile and gathers its keys and peers (creating missing keys, with a
/// one-line notice).
pub fn load(args: &ProfileArgs, progress: &Progress) -> Result<(RenderInput, SecretsRoot)> {
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

/// Like [`load`], but nothing is written: keys that do not exist yet are made in memory
/// (`SecretsRoot::preview`) and listed in `RenderInput::created`. For verbs that only
/// look (`summary`).
pub fn load_preview(args: &ProfileArgs) -> Result<RenderInput> {
    let opts = LoadOptions {
        env: args.env.clone(),
        overlays: args.overlays.clone(),
    };
    let cwd = std::env::current_dir().context("current directory")?;
    let path = crate::profile::resolve(&args.profile, &cwd).ok_or_else(|| {
        anyhow::anyhow!(
            "no profile `{0}`: looked for profiles/{0}.toml and {0}.toml (or give a path to a .toml file)",
            args.profile
        )
    })?;
    let host = crate::profile::load(&path, &opts)?;
    let dir = match &args.secrets {
        Some(s) => s.clone(),
        None => SecretsRoot::default_for(&host.dir).root,
    };
    let unlock = crate::secrets::Unlock::from_env(args.identity.clone());
    let root = SecretsRoot::open(dir, &unlock)?.preview();
    Ok(render::gather(host, &root)?)
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
        let tree = render::render(&input, RenderTarget::Image)?;
        Ok((host_config_of(&tree)?, input.secrets.clone()))
    }
}

/// The host config a rendered tree installs (what the in-image helper will read).
pub fn host_config_of(tree: &crate::tree::HostTree) -> Result<HostConfig> {
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

/// Overrides a user can give on the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
}

/// The host's bucket as seen from a workstation: the key files are in the host's
/// secrets dir (same file names as in the image). Credentials: the standard AWS chain
/// when the environment names any (AWS_ACCESS_KEY_ID, AWS_PROFILE...), else the
/// secrets dir's s3.env if present. AWS_ENDPOINT_URL_S3 in the environment beats the
/// profile's endpoint, so the same profile can be pointed at a local test server.
pub fn target(host: &str, b: &BackupConfig, secrets_dir: &Path, o: &Overrides) -> Target {
    let mut t = crate::agent::target(host, b);
    let file_name = |p: &str, default: &str| {
        Path::new(p)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    t.encryption_key =
        secrets_dir.join(file_name(&b.encryption_key_file, "snapshot-encryption.key"));
    t.signing_key = secrets_dir.join(file_name(&b.signing_key_file, "snapshot-signing.key"));
    let s3_env = secrets_dir.join("s3.env");
    t.store.credentials_file = (!env_names_credentials() && s3_env.exists()).then_some(s3_env);
    if let Some(ep) = std::env::var("AWS_ENDPOINT_URL_S3")
        .ok()
        .filter(|s| !s.is_empty())
    {
        t.store.endpoint = Some(ep);
        t.store.path_style = true;
    }
    if let Some(ep) = &o.endpoint {
        t.store.endpoint = Some(ep.clone());
        t.store.path_style = true;
    }
    if let Some(bk) = &o.bucket {
        t.store.bucket = bk.clone();
    }
    if let Some(p) = &o.prefix {
        t.store.prefix = p.trim_matches('/').to_string();
    }
    t
}

/// Whether this process's environment points the AWS credential chain somewhere.
pub fn env_names_credentials() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// With a locked secrets root the key files exist only inside its archive: read them
/// from there (in memory) instead of from the disk. A plain root changes nothing.
pub fn use_secrets(t: &mut Target, root: &SecretsRoot) -> Result<(), SnapshotError> {
    if !root.is_locked() {
        return Ok(());
    }
    let keys = Keys::load_with(&t.encryption_key, &t.signing_key, |p| {
        if root.is_file(p) {
            root.read(p)
                .map(Some)
                .map_err(|e| std::io::Error::other(e.to_string()))
        } else {
            Ok(None)
        }
    })?;
    t.keys_in_memory = Some(keys);
    Ok(())
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

/// Resolves a profile argument (name or path) to the host config and the secrets root
/// (opened: a locked root is decrypted in memory).
pub type ResolveHost<'a> =
    &'a dyn Fn(&str) -> anyhow::Result<(HostConfig, crate::secrets::SecretsRoot)>;

/// Host config and bucket target of a profile, for the snapshot verbs.
pub fn snapshot_target(
    profile: &str,
    b: &crate::cli::snapshot::BucketArgs,
    resolve: ResolveHost,
) -> anyhow::Result<(HostConfig, Target)> {
    let (hc, root) = resolve(profile)?;
    let Some(bc) = &hc.backup else {
        bail!("profile {profile} has no backup section: it has no snapshots");
    };
    let mut t = target(&hc.host, bc, &root.host_dir(&hc.host), &b.overrides());
    use_secrets(&mut t, &root)?;
    Ok((hc, t))
}
