//! Key material: generated once per host by `imgbuild keys` (or the first build),
//! never overwritten, so rebuilt images carry the same identities.
//!
//! Layout under the secrets root (default `secrets/` beside the profiles):
//! `<host>/wireguard.key|.pub`, `<host>/ssh_host_ed25519_key|.pub`,
//! `<host>/snapshot-encryption.key`, `<host>/snapshot-signing.key|.pub`,
//! `<host>/app/<name>` (generated app passwords), optional `<host>/s3.env`;
//! `builder/image-signing.key|.pub` (never copied into a host output).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
    #[error("no random numbers from the OS: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn random<const N: usize>() -> Result<[u8; N], SecretsError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| SecretsError::Random(e.to_string()))?;
    Ok(b)
}

/// Keys a preview made in memory, by path.
type PreviewKeys = std::sync::Arc<std::sync::Mutex<BTreeMap<PathBuf, Vec<u8>>>>;

/// The secrets root and the file names in it. A locked root (`<root>.age`, see
/// `lock`) is decrypted into memory only; nothing of it is written to disk.
#[derive(Debug, Clone)]
pub struct SecretsRoot {
    pub root: PathBuf,
    locked: Option<std::sync::Arc<BTreeMap<PathBuf, Vec<u8>>>>,
    /// A preview (`imgbuild summary`): keys that do not exist are made in memory here
    /// and never written, so looking at a profile changes nothing on disk.
    preview: Option<PreviewKeys>,
}

/// How to open a locked secrets root.
#[derive(Debug, Clone, Default)]
pub struct Unlock {
    /// age identity file (`AGE-SECRET-KEY-1...` lines).
    pub identity: Option<PathBuf>,
    /// Passphrase (scrypt recipient).
    pub passphrase: Option<String>,
}

impl Unlock {
    /// From flags, else the environment: IMGBUILD_AGE_IDENTITY (a file), IMGBUILD_PASSPHRASE.
    pub fn from_env(identity: Option<PathBuf>) -> Unlock {
        Unlock {
            identity: identity
                .or_else(|| std::env::var_os("IMGBUILD_AGE_IDENTITY").map(PathBuf::from)),
            passphrase: std::env::var("IMGBUILD_PASSPHRASE")
                .ok()
                .filter(|p| !p.is_empty()),
        }
    }
}

/// Files created by one call, for the one-line notice.
#[derive(Debug, Default, Clone)]
pub struct Created(pub Vec<PathBuf>);

impl SecretsRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SecretsRoot {
            root: root.into(),
            locked: None,
            preview: None,
        }
    }

    /// The encrypted form of this root: `secrets/` → `secrets.age`.
    pub fn locked_path(&self) -> PathBuf {
        let mut p = self.root.clone().into_os_string();
        p.push(".age");
        PathBuf::from(p)
    }

    pub fn is_locked(&self) -> bool {
        self.locked.is_some()
    }

    /// A plain directory when it exists; else the locked file, decrypted in memory.
    pub fn open(root: impl Into<PathBuf>, unlock: &Unlock) -> Result<Self, SecretsError> {
        let mut me = SecretsRoot::new(root);
        let lp = me.locked_path();
        if me.root.is_dir() || !lp.is_file() {
            return Ok(me);
        }
        let data = fs::read(&lp).map_err(io(&lp))?;
        let plain = decrypt(&data, unlock).map_err(|what| SecretsError::Bad {
            path: lp.clone(),
            what,
        })?;
        let map = unpack(&plain, &lp)?
            .into_iter()
            .map(|(rel, data)| (me.root.join(rel), data))
            .collect();
        me.locked = Some(std::sync::Arc::new(map));
        Ok(me)
    }

    /// The same root, but every key it would create stays in memory (see `preview`).
    pub fn preview(&self) -> SecretsRoot {
        SecretsRoot {
            preview: Some(Default::default()),
            ..self.clone()
        }
    }

    fn previewed(&self, p: &Path) -> Option<Vec<u8>> {
        let m = self.preview.as_ref()?;
        let m = m.lock().unwrap_or_else(|e| e.into_inner());
        m.get(p).cloned()
    }

    /// Writes a new key file, or keeps it in memory for a preview.
    fn put_new(&self, path: &Path, data: &[u8], mode: u32) -> Result<(), SecretsError> {
        match &self.preview {
            Some(m) => {
                m.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(path.to_path_buf(), data.to_vec());
                Ok(())
            }
            None => write_new(path, data, mode),
        }
    }

    fn exists(&self, p: &Path) -> bool {
        if self.previewed(p).is_some() {
            return true;
        }
        match &self.locked {
            Some(m) => m.contains_key(p) || m.keys().any(|k| k.starts_with(p)),
            None => p.exists(),
        }
    }

    /// Reads a secret file, from the directory or the unlocked archive.
    pub fn read(&self, p: &Path) -> Result<Vec<u8>, SecretsError> {
        if let Some(v) = self.previewed(p) {
            return Ok(v);
        }
        match &self.locked {
            Some(m) => m.get(p).cloned().ok_or_else(|| SecretsError::Io {
                path: p.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not in the locked secrets",
                ),
            }),
            None => fs::read(p).map_err(io(p)),
        }
    }

    pub fn read_text(&self, p: &Path) -> Result<String, SecretsError> {
        String::from_utf8(self.read(p)?).map_err(|_| SecretsError::Bad {
            path: p.to_path_buf(),
            what: "not UTF-8".into(),
        })
    }

    pub fn is_file(&self, p: &Path) -> bool {
        if self.previewed(p).is_some() {
            return true;
        }
        match &self.locked {
            Some(m) => m.contains_key(p),
            None => p.is_file(),
        }
    }

    fn refuse_if_locked(&self, what: &Path) -> Result<(), SecretsError> {
        if self.locked.is_some() && self.preview.is_none() {
            return Err(SecretsError::Bad {
                path: what.to_path_buf(),
                what: "missing, and the secrets are locked: run `imgbuild secrets unlock` to create new keys".into(),
            });
        }
        Ok(())
    }

    /// Default: `secrets/` next to the profiles directory (or next to the profile file
    /// when it is not in a `profiles/` directory).
    pub fn default_for(profile_dir: &Path) -> Self {
        let base = if profile_dir.file_name().is_some_and(|n| n == "profiles") {
            profile_dir.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            profile_dir.to_path_buf()
        };
        SecretsRoot::new(base.join("secrets"))
    }

    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.root.join(host)
    }

    pub fn builder_dir(&self) -> PathBuf {
        self.root.join("builder")
    }

    fn ensure_dir(&self, dir: &Path) -> Result<(), SecretsError> {
        if self.preview.is_some() {
            return Ok(());
        }
        if self.locked.is_some() {
            return if self.exists(dir) {
                Ok(())
            } else {
                self.refuse_if_locked(dir)
            };
        }
        if !self.root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.root)
                .map_err(io(&self.root))?;
        }
        let gi = self.root.join(".gitignore");
        if !gi.exists() {
            // Plain keys must never reach a git repository by accident.
            self.put_new(
                &gi,
                b"# imgbuild secrets: never commit these in clear\n*\n",
                0o600,
            )?;
        }
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        Ok(())
    }

    /// Creates every missing host key; existing files are left untouched.
    pub fn ensure_host(&self, host: &str) -> Result<Created, SecretsError> {
        let dir = self.host_dir(host);
        self.ensure_dir(&dir)?;
        let mut created = Created::default();

        let wg = dir.join("wireguard.key");
        if !self.exists(&wg) {
            self.refuse_if_locked(&wg)?;
            let mut k = random::<32>()?;
            // Clamp as `wg genkey` does, so the file is interchangeable with wg's own.
            k[0] &= 248;
            k[31] = (k[31] & 127) | 64;
            self.put_new(&wg, format!("{}\n", B64.encode(k)).as_bytes(), 0o600)?;
            created.0.push(wg.clone());
        }
        let wg_pub = dir.join("wireguard.pub");
        let derived = format!(
            "{}\n",
            wireguard_public(&parse_wireguard_private(&wg, &self.read_text(&wg)?)?)
        );
        if !self.exists(&wg_pub) {
            self.refuse_if_locked(&wg_pub)?;
            self.put_new(&wg_pub, derived.as_bytes(), 0o600)?;
            created.0.push(wg_pub);
        } else if self.read_text(&wg_pub)? != derived {
            return Err(SecretsError::Bad {
                path: wg_pub,
                what: "does not match wireguard.key; delete it to re-derive".into(),
            });
        }

        let ssh = dir.join("ssh_host_ed25519_key");
        if !self.exists(&ssh) {
            self.refuse_if_locked(&ssh)?;
            let seed = random::<32>()?;
            let comment = format!("root@{host}");
            self.put_new(&ssh, openssh_private(&seed, &comment).as_bytes(), 0o600)?;
            self.put_new(
                &dir.join("ssh_host_ed25519_key.pub"),
                format!("{}\n", openssh_public(&seed, &comment)).as_bytes(),
                0o600,
            )?;
            created.0.push(ssh);
        }

        let enc = dir.join("snapshot-encryption.key");
        if !self.exists(&enc) {
            self.refuse_if_locked(&enc)?;
            self.put_new(
                &enc,
                format!("{}\n", hex::encode(random::<32>()?)).as_bytes(),
                0o600,
            )?;
            created.0.push(enc);
        }
        let sign = dir.join("snapshot-signing.key");
        if !self.exists(&sign) {
            self.refuse_if_locked(&sign)?;
            let seed = random::<32>()?;
            self.put_new(&sign, format!("{}\n", hex::encode(seed)).as_bytes(), 0o600)?;
            let pk = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
            self.put_new(
                &dir.join("snapshot-signing.pub"),
                format!("{}\n", hex::encode(pk.as_bytes())).as_bytes(),
                0o600,
            )?;
            created.0.push(sign);
        }
        Ok(created)
    }

    /// The builder's image-signing key, created when missing.
    pub fn ensure_builder(&self) -> Result<(ed25519_dalek::SigningKey, Created), SecretsError> {
        let dir = self.builder_dir();
        self.ensure_dir(&dir)?;
        let path = dir.join("image-signing.key");
        let mut created = Created::default();
        if !self.exists(&path) {
            self.refuse_if_locked(&path)?;
            let seed = random::<32>()?;
            self.put_new(&path, format!("{}\n", hex::encode(seed)).as_bytes(), 0o600)?;
            let pk = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
            self.put_new(
                &dir.join("image-signing.pub"),
                format!("{}\n", hex::encode(pk.as_bytes())).as_bytes(),
                0o644,
            )?;
            created.0.push(path.clone());
        }
        Ok((
            // Through `read_text`: a locked root holds the key only in memory.
            ed25519_dalek::SigningKey::from_bytes(&parse_hex32(&path, &self.read_text(&path)?)?),
            created,
        ))
    }

    /// An application secret (database password...), generated once.
    pub fn ensure_app_secret(
        &self,
        host: &str,
        name: &str,
    ) -> Result<(String, bool), SecretsError> {
        let dir = self.host_dir(host).join("app");
        self.ensure_dir(&dir)?;
        let path = dir.join(name);
        let mut created = false;
        if !self.exists(&path) {
            self.refuse_if_locked(&path)?;
            // 32 characters from a 62-letter alphabet: ~190 bits, safe in any env file or URL.
            const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let mut out = String::new();
            while out.len() < 32 {
                for b in random::<64>()? {
                    // Rejection sampling keeps the distribution uniform.
                    if (b as usize) < ALPHA.len() * 4 && out.len() < 32 {
                        out.push(ALPHA[b as usize % ALPHA.len()] as char);
                    }
                }
            }
            self.put_new(&path, format!("{out}\n").as_bytes(), 0o600)?;
            created = true;
        }
        let v = self.read_text(&path)?;
        let v = v.trim_end_matches('\n').to_string();
        if v.is_empty() || v.contains('\n') || v.chars().any(|c| c.is_control()) {
            return Err(SecretsError::Bad {
                path,
                what: "must be one non-empty line".into(),
            });
        }
        Ok((v, created))
    }
}

/// Writes a file that must not exist yet (never overwrite a key), with `mode`.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SecretsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(())
}

fn parse_hex32(path: &Path, s: &str) -> Result<[u8; 32], SecretsError> {
    let bytes = hex::decode(s.trim()).map_err(|_| SecretsError::Bad {
        path: path.to_path_buf(),
        what: "expected 64 hex characters".into(),
    })?;
    bytes.try_into().map_err(|_| SecretsError::Bad {
        path: path.to_path_buf(),
        what: "expected 32 bytes (64 hex characters)".into(),
    })
}

pub fn read_wireguard_private(path: &Path) -> Result<[u8; 32], SecretsError> {
    parse_wireguard_private(path, &fs::read_to_string(path).map_err(io(path))?)
}

pub fn parse_wireguard_private(path: &Path, s: &str) -> Result<[u8; 32], SecretsError> {
    let bytes = B64.decode(s.trim()).map_err(|_| SecretsError::Bad {
        path: path.to_path_buf(),
        what: "expected a base64 WireGuard key".into(),
    })?;
    bytes.try_into().map_err(|_| SecretsError::Bad {
        path: path.to_path_buf(),
        what: "expected a 32-byte WireGuard key".into(),
    })
}

pub fn wireguard_public(private: &[u8; 32]) -> String {
    let secret = x25519_dalek::StaticSecret::from(*private);
    B64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn ssh_public_blob(public: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-ed25519");
    put_string(&mut blob, public);
    blob
}

/// `ssh-ed25519 AAAA... comment` for an ed25519 seed.
pub fn openssh_public(seed: &[u8; 32], comment: &str) -> String {
    let pk = ed25519_dalek::SigningKey::from_bytes(seed).verifying_key();
    format!(
        "ssh-ed25519 {} {comment}",
        B64.encode(ssh_public_blob(pk.as_bytes()))
    )
}

/// An unencrypted `openssh-key-v1` private key, as `ssh-keygen -t ed25519 -N ''` writes.
pub fn openssh_private(seed: &[u8; 32], comment: &str) -> String {
    let pk = ed25519_dalek::SigningKey::from_bytes(seed).verifying_key();
    let mut out = b"openssh-key-v1\0".to_vec();
    put_string(&mut out, b"none");
    put_string(&mut out, b"none");
    put_string(&mut out, b"");
    out.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out, &ssh_public_blob(pk.as_bytes()));
    let mut private = Vec::new();
    // The check integer only detects a wrong passphrase; derive it so output is stable.
    let check = u32::from_be_bytes([seed[0], seed[1], seed[2], seed[3]]);
    private.extend_from_slice(&check.to_be_bytes());
    private.extend_from_slice(&check.to_be_bytes());
    put_string(&mut private, b"ssh-ed25519");
    put_string(&mut private, pk.as_bytes());
    let mut kp = seed.to_vec();
    kp.extend_from_slice(pk.as_bytes());
    put_string(&mut private, &kp);
    put_string(&mut private, comment.as_bytes());
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    put_string(&mut out, &private);
    let b64 = B64.encode(&out);
    let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(70) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    pem
}

fn decrypt(data: &[u8], unlock: &Unlock) -> Result<Vec<u8>, String> {
    let mut identities: Vec<Box<dyn age::Identity>> = vec![];
    if let Some(p) = &unlock.identity {
        let file = age::IdentityFile::from_file(p.to_string_lossy().into_owned())
            .map_err(|e| format!("identity {}: {e}", p.display()))?;
        identities.extend(
            file.into_identities()
                .map_err(|e| format!("identity {}: {e}", p.display()))?,
        );
    }
    if let Some(pass) = &unlock.passphrase {
        identities.push(Box::new(age::scrypt::Identity::new(
            age::secrecy::SecretString::from(pass.clone()),
        )));
    }
    if identities.is_empty() {
        return Err("the secrets are locked: pass --identity FILE, or set IMGBUILD_AGE_IDENTITY or IMGBUILD_PASSPHRASE".into());
    }
    let dec = age::Decryptor::new(data).map_err(|e| format!("not an age file: {e}"))?;
    let mut r = dec
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| format!("cannot decrypt (wrong identity or passphrase?): {e}"))?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut out).map_err(|e| format!("corrupt age file: {e}"))?;
    Ok(out)
}

/// Who can open a locked root.
pub enum LockTo {
    /// age recipients (`age1...`) only. Nothing here can open the archive, so `lock`
    /// keeps the directory until [`confirm_lock`] proves an identity opens it.
    Recipients(Vec<String>),
    /// An identity file's own recipients, plus any others: the archive is opened with
    /// it before the directory goes.
    Identity { file: PathBuf, also: Vec<String> },
    /// One passphrase (scrypt), which also opens the archive before the directory goes.
    Passphrase(String),
}

/// What `lock` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locked {
    /// The archive opened and holds every file byte for byte; the directory is gone.
    Done(PathBuf),
    /// The archive is written but nothing proved it opens: the directory is kept.
    Pending(PathBuf),
}

/// Packs the secrets directory into `<root>.age` (0600). The directory is removed only
/// after the written archive has been read back, decrypted and found to hold every
/// file byte for byte: losing `snapshot-encryption.key` loses every backup, so no
/// archive that has not been shown to open may become the only copy.
pub fn lock(root: &SecretsRoot, to: &LockTo) -> Result<Locked, SecretsError> {
    let bad = |what: String| SecretsError::Bad {
        path: root.root.clone(),
        what,
    };
    if !root.root.is_dir() {
        return Err(bad("no secrets directory to lock".into()));
    }
    let lp = root.locked_path();
    if fs::symlink_metadata(&lp).is_ok() {
        // It may hold keys the directory lacks; replacing it could lose them.
        return Err(SecretsError::Bad {
            path: lp,
            what: "already exists, and locking never replaces it: finish a pending lock with `imgbuild secrets lock --confirm-with IDENTITY`, or move the file away first".into(),
        });
    }
    let files = plain_files(&root.root)?;
    let mut ar = tar::Builder::new(Vec::new());
    for (rel, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_cksum();
        ar.append_data(&mut h, rel, &data[..])
            .map_err(io(&root.root.join(rel)))?;
    }
    let plain = ar.into_inner().map_err(io(&root.root))?;
    let parse = |rs: &[String]| -> Result<Vec<Box<dyn age::Recipient + Send>>, SecretsError> {
        rs.iter()
            .map(|r| {
                r.parse::<age::x25519::Recipient>()
                    .map(|r| Box::new(r) as Box<dyn age::Recipient + Send>)
                    .map_err(|e| bad(format!("recipient {r}: {e}")))
            })
            .collect()
    };
    let mut check = Unlock::default();
    let enc = match to {
        LockTo::Passphrase(p) => {
            check.passphrase = Some(p.clone());
            age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from(p.clone()))
        }
        LockTo::Recipients(rs) | LockTo::Identity { also: rs, .. } => {
            let mut all = parse(rs)?;
            if let LockTo::Identity { file, .. } = to {
                let id = age::IdentityFile::from_file(file.to_string_lossy().into_owned())
                    .map_err(io(file))?;
                let own = id.to_recipients().map_err(|e| SecretsError::Bad {
                    path: file.clone(),
                    what: format!("no recipient in this identity file: {e}"),
                })?;
                all.extend(own);
                check.identity = Some(file.clone());
            }
            age::Encryptor::with_recipients(all.iter().map(|r| r.as_ref() as &dyn age::Recipient))
                .map_err(|e| bad(e.to_string()))?
        }
    };
    let mut out = Vec::new();
    let mut w = enc.wrap_output(&mut out).map_err(io(&root.root))?;
    w.write_all(&plain).map_err(io(&root.root))?;
    w.finish().map_err(io(&root.root))?;

    // Written under a temporary name and checked there: a failed check leaves no
    // archive behind, only the untouched directory.
    let mut tmp = lp.clone().into_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    write_new(&tmp, &out, 0o600)?;
    let placed = (|| {
        if check.identity.is_some() || check.passphrase.is_some() {
            verify_archive(&root.root, &tmp, &check)?;
        }
        if fs::symlink_metadata(&lp).is_ok() {
            return Err(SecretsError::Bad {
                path: lp.clone(),
                what: "appeared while locking (another `secrets lock`?); nothing removed".into(),
            });
        }
        fs::rename(&tmp, &lp).map_err(io(&lp))
    })();
    if placed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    placed?;
    sync_parent(&lp)?;
    if check.identity.is_none() && check.passphrase.is_none() {
        return Ok(Locked::Pending(lp));
    }
    fs::remove_dir_all(&root.root).map_err(io(&root.root))?;
    sync_parent(&root.root)?;
    Ok(Locked::Done(lp))
}

/// Finishes a lock to recipients: proves `<root>.age` opens with `unlock` and holds
/// exactly the directory's files, then removes the directory.
pub fn confirm_lock(root: &SecretsRoot, unlock: &Unlock) -> Result<PathBuf, SecretsError> {
    let lp = root.locked_path();
    if !lp.is_file() {
        return Err(SecretsError::Bad {
            path: lp,
            what: "no locked archive to confirm (run `imgbuild secrets lock -r age1...` first)"
                .into(),
        });
    }
    if !root.root.is_dir() {
        return Err(SecretsError::Bad {
            path: root.root.clone(),
            what: "no secrets directory: the lock is already complete".into(),
        });
    }
    verify_archive(&root.root, &lp, unlock)?;
    fs::remove_dir_all(&root.root).map_err(io(&root.root))?;
    sync_parent(&root.root)?;
    Ok(lp)
}

/// Decrypts the archive at `archive` with `unlock` and compares it with the directory
/// `dir` as it is on disk now: the same file names, each byte for byte. Any
/// difference (a file missing from either side, other content, an archive that does
/// not open) is an error naming it.
pub fn verify_archive(dir: &Path, archive: &Path, unlock: &Unlock) -> Result<(), SecretsError> {
    let data = fs::read(archive).map_err(io(archive))?;
    let plain = decrypt(&data, unlock).map_err(|what| SecretsError::Bad {
        path: archive.to_path_buf(),
        what: format!("the archive does not open, so nothing was removed: {what}"),
    })?;
    let packed = unpack(&plain, archive)?;
    let on_disk = plain_files(dir)?;
    let mut problems = vec![];
    for (rel, data) in &on_disk {
        match packed.get(rel) {
            None => problems.push(format!("{} is not in the archive", rel.display())),
            Some(p) if p != data => problems.push(format!("{} differs", rel.display())),
            Some(_) => {}
        }
    }
    for rel in packed.keys().filter(|r| !on_disk.contains_key(*r)) {
        problems.push(format!(
            "{} is in the archive but not in the directory",
            rel.display()
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(5);
    Err(SecretsError::Bad {
        path: archive.to_path_buf(),
        what: format!(
            "does not match {} ({n} difference(s): {}{}), so nothing was removed",
            dir.display(),
            problems.join("; "),
            if n > 5 { "; ..." } else { "" }
        ),
    })
}

/// The regular files of an archive's tar, by relative path.
fn unpack(plain: &[u8], archive: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>, SecretsError> {
    let bad = |e: std::io::Error| SecretsError::Bad {
        path: archive.to_path_buf(),
        what: format!("archive: {e}"),
    };
    let mut map = BTreeMap::new();
    let mut ar = tar::Archive::new(plain);
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry.path().map_err(bad)?.into_owned();
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(SecretsError::Bad {
                path: archive.to_path_buf(),
                what: format!("unsafe path {} in archive", rel.display()),
            });
        }
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut buf).map_err(bad)?;
        map.insert(rel, buf);
    }
    Ok(map)
}

/// Every file under `dir`, by relative path. Anything but directories and regular
/// files (a symlink, a socket) is refused: the archive could not hold it, and the
/// directory is deleted once the archive is checked.
fn plain_files(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>, SecretsError> {
    let mut rels = vec![];
    collect(dir, dir, &mut rels)?;
    let mut out = BTreeMap::new();
    for rel in rels {
        let p = dir.join(&rel);
        out.insert(rel, fs::read(&p).map_err(io(&p))?);
    }
    Ok(out)
}

/// Makes a rename or removal in `p`'s directory durable before the next step relies on it.
fn sync_parent(p: &Path) -> Result<(), SecretsError> {
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io(parent))
}

/// Unpacks `<root>.age` back into the directory (0700/0600) and removes the file.
pub fn unlock(root: &Path, unlock: &Unlock) -> Result<PathBuf, SecretsError> {
    let plain_root = SecretsRoot::new(root);
    let lp = plain_root.locked_path();
    if root.is_dir() && lp.is_file() {
        return Err(SecretsError::Bad {
            path: lp,
            what: format!(
                "{} exists too: a lock to recipients is waiting for proof that the archive opens; `imgbuild secrets lock --confirm-with IDENTITY` checks it holds every file of the directory and then removes the directory",
                root.display()
            ),
        });
    }
    let opened = SecretsRoot::open(root, unlock)?;
    let Some(map) = &opened.locked else {
        return Err(SecretsError::Bad {
            path: root.to_path_buf(),
            what: "not locked (the directory exists or there is no .age file)".into(),
        });
    };
    // Unpacked beside the root and renamed into place: an unlock cut short leaves the
    // archive and no half directory that could be mistaken for the whole.
    let mut tmp = root.as_os_str().to_owned();
    tmp.push(format!(".unlock-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let unpacked = (|| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io(&tmp))?;
        for (path, data) in map.iter() {
            let rel = path.strip_prefix(root).unwrap_or(path);
            let dest = tmp.join(rel);
            if let Some(parent) = dest.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(io(parent))?;
            }
            let mode = if dest.file_name().is_some_and(|n| n == "image-signing.pub") {
                0o644
            } else {
                0o600
            };
            write_new(&dest, data, mode)?;
        }
        fs::rename(&tmp, root).map_err(io(root))
    })();
    if unpacked.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    unpacked?;
    sync_parent(root)?;
    fs::remove_file(&lp).map_err(io(&lp))?;
    Ok(root.to_path_buf())
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SecretsError> {
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let p = e.path();
        let t = e.file_type().map_err(io(&p))?;
        if t.is_dir() {
            collect(base, &p, out)?;
        } else if t.is_file() {
            out.push(p.strip_prefix(base).unwrap_or(&p).to_path_buf());
        } else {
            return Err(SecretsError::Bad {
                path: p,
                what: "not a regular file or directory (a symlink?): the locked archive cannot hold it; replace it with the file itself".into(),
            });
        }
    }
    Ok(())
}
