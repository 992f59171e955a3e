//! The base OS: a definition in `images/<name>.toml`, built once with mmdebstrap into a
//! tarball and cached by the digest of the definition and of the recipe below.
//!
//! The cache entry (`<cache>/base/<digest>/`) holds `rootfs.tar`, the boot files the ESP
//! needs and `index.json` (every path, the account databases, sizes), so a warm image
//! build never has to scan the tarball before streaming it.

use super::tools::{self, MMDEBSTRAP};
use super::{io_err, ImageError};
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Bumped whenever the customize script or the cache layout changes, so old caches are
/// not reused with a new meaning.
const RECIPE_VERSION: &str = "imgbuild-base-recipe-3";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BaseDefinition {
    pub name: String,
    pub suite: String,
    #[serde(default = "default_variant")]
    pub variant: String,
    #[serde(default)]
    pub mirror: Option<String>,
    #[serde(default = "default_arch")]
    pub architecture: String,
    pub kernel: String,
    pub packages: Vec<String>,
    #[serde(default)]
    pub enable: Vec<String>,
    #[serde(default)]
    pub initramfs_modules: Vec<String>,
    #[serde(default)]
    pub cmdline: String,
}

fn default_variant() -> String {
    "minbase".into()
}
fn default_arch() -> String {
    "amd64".into()
}

/// What the image assembler needs to know about the base without reading the tarball.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseIndex {
    /// Every path in the tarball, absolute (`/etc/passwd`), including `/`.
    pub paths: BTreeSet<String>,
    /// Contents of the account databases (`/etc/passwd`, `/etc/group`, `/etc/shadow`,
    /// `/etc/gshadow`), which the assembler extends with the host's users.
    pub files: BTreeMap<String, String>,
    pub kernel_version: String,
    /// Bytes of regular files (each rounded up to 4 KiB) and entry counts, outside and
    /// inside /var: they size the two filesystems.
    pub root_bytes: u64,
    pub root_entries: u64,
    pub var_bytes: u64,
    pub var_entries: u64,
}

#[derive(Debug, Clone)]
pub struct Base {
    pub digest: String,
    pub dir: PathBuf,
    pub def: BaseDefinition,
    pub index: BaseIndex,
}

impl Base {
    pub fn rootfs_tar(&self) -> PathBuf {
        self.dir.join("rootfs.tar")
    }
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("boot/vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("boot/initrd.img")
    }
    pub fn bootloader(&self) -> PathBuf {
        self.dir.join("boot/systemd-bootx64.efi")
    }
}

pub fn load_definition(path: &Path) -> Result<(BaseDefinition, Vec<u8>), ImageError> {
    let bytes = fs::read(path).map_err(io_err(format!(
        "cannot read base definition {}",
        path.display()
    )))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ImageError::BaseDefinition {
        path: path.to_path_buf(),
        msg: "not UTF-8".into(),
    })?;
    let def: BaseDefinition = toml::from_str(text).map_err(|e| ImageError::BaseDefinition {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let bad = |s: &String| {
        s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-+.:_@".contains(c))
    };
    for p in def
        .packages
        .iter()
        .chain([&def.kernel, &def.suite, &def.variant, &def.architecture])
        .chain(&def.enable)
        .chain(&def.initramfs_modules)
    {
        if bad(p) {
            return Err(ImageError::BaseDefinition {
                path: path.to_path_buf(),
                msg: format!("{p:?} is not a valid package, unit or module name"),
            });
        }
    }
    Ok((def, bytes))
}

/// The cache key: the definition's bytes and the recipe that turns them into a rootfs.
pub fn digest_of(def_bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.as_bytes());
    h.update([0]);
    h.update(def_bytes);
    hex::encode(h.finalize())
}

/// Returns the cached base for the definition, building it first when absent or when
/// `refresh` is set. The bool is true when it was built now.
pub fn ensure(
    def_path: &Path,
    cache_root: &Path,
    refresh: bool,
    mirror: Option<&str>,
    progress: &Progress,
) -> Result<(Base, bool), ImageError> {
    let (def, bytes) = load_definition(def_path)?;
    let digest = digest_of(&bytes);
    let base_dir = cache_root.join("base");
    let dir = base_dir.join(&digest);
    fs::create_dir_all(&base_dir).map_err(io_err(format!(
        "cannot create cache dir {}",
        base_dir.display()
    )))?;
    // One builder per base at a time (parallel tests, two terminals): the second waits
    // and then finds the first one's base in the cache.
    let lock = fs::File::create(base_dir.join(format!("{digest}.lock")))
        .map_err(io_err("cannot create base lock file"))?;
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ImageError::Io {
                what: "cannot lock the base cache".into(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let mut built = false;
    if refresh || !dir.join("index.json").is_file() {
        build_base(&def, &digest, &base_dir, mirror, progress)?;
        built = true;
    }
    drop(lock);
    let index: BaseIndex = serde_json::from_slice(
        &fs::read(dir.join("index.json")).map_err(io_err("cannot read base index"))?,
    )
    .map_err(|e| ImageError::BaseCache {
        digest: digest.clone(),
        msg: e.to_string(),
    })?;
    let base = Base {
        digest,
        dir,
        def,
        index,
    };
    for p in [
        base.rootfs_tar(),
        base.kernel(),
        base.initrd(),
        base.bootloader(),
    ] {
        if !p.is_file() {
            return Err(ImageError::BaseCache {
                digest: base.digest.clone(),
                msg: format!("{} is missing", p.display()),
            });
        }
    }
    Ok((base, built))
}

fn build_base(
    def: &BaseDefinition,
    digest: &str,
    base_dir: &Path,
    mirror: Option<&str>,
    progress: &Progress,
) -> Result<(), ImageError> {
    let mmdebstrap = MMDEBSTRAP.find()?;
    fs::create_dir_all(base_dir).map_err(io_err(format!(
        "cannot create cache dir {}",
        base_dir.display()
    )))?;
    // Built next to its final place and renamed, so an interrupted build never leaves a
    // half base that a later build would trust.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{digest}.tmp"))
        .tempdir_in(base_dir)
        .map_err(io_err("cannot create temp dir in the cache"))?;
    let script = tmp.path().join("customize.sh");
    fs::write(&script, customize_script(def)).map_err(io_err("cannot write customize hook"))?;
    let tar = tmp.path().join("rootfs.tar");
    let log_path = tmp.path().join("mmdebstrap.log");
    let log = fs::File::create(&log_path).map_err(io_err("cannot create mmdebstrap log"))?;

    let mut include: Vec<&str> = vec![def.kernel.as_str()];
    include.extend(def.packages.iter().map(|s| s.as_str()));
    let mut cmd = Command::new(mmdebstrap);
    cmd.env("SOURCE_DATE_EPOCH", super::source_date_epoch().to_string())
        .arg(format!("--variant={}", def.variant))
        .arg(format!("--architectures={}", def.architecture))
        .arg(format!("--include={}", include.join(",")))
        .arg(format!(
            "--customize-hook=sh {} \"$1\"",
            shell_quote(&script.to_string_lossy())
        ));
    if !tools::is_root() {
        cmd.arg("--mode=unshare");
    }
    cmd.arg(&def.suite).arg(&tar);
    let mirror = mirror
        .map(str::to_string)
        .or_else(|| {
            std::env::var("IMGBUILD_MIRROR")
                .ok()
                .filter(|m| !m.is_empty())
        })
        .or_else(|| def.mirror.clone());
    if let Some(m) = mirror {
        cmd.arg(m);
    }
    let step = progress.step("base", None);
    step.set_message(&format!("mmdebstrap {} ({})", def.suite, def.name));
    let err_log = log
        .try_clone()
        .map_err(io_err("cannot duplicate log handle"))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .status()
        .map_err(io_err("cannot start mmdebstrap"))?;
    if !status.success() {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        return Err(ImageError::Command {
            cmd: "mmdebstrap".into(),
            status: status.to_string(),
            log_tail: tools::tail(&log, 30),
        });
    }
    step.set_message("indexing");
    index_base(tmp.path())?;
    let _ = fs::remove_file(&script);
    let final_dir = base_dir.join(digest);
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(io_err("cannot remove old base"))?;
    }
    let kept = tmp.keep();
    fs::rename(&kept, &final_dir).map_err(io_err("cannot move base into the cache"))?;
    step.finish();
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The customize hook mmdebstrap runs with the new root as $1. It makes the base fit a
/// read-only root: no machine id or SSH host keys baked in (each host brings its own),
/// resolv.conf into /run, /var mounted by partition label and grown at first boot.
fn customize_script(def: &BaseDefinition) -> String {
    let enable = def.enable.join(" ");
    let modules = def.initramfs_modules.join(" ");
    format!(
        r#"set -eu
R="$1"
{enable_line}
# One machine id per boot of each host, never one baked into the base.
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id" "$R"/etc/ssh/ssh_host_* "$R/etc/.resolv.conf.systemd-resolved.bak"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
# gpt-auto mounts the ESP here; the directory must exist on the read-only root.
mkdir -p "$R/efi"
cat > "$R/etc/fstab" <<'EOF'
# imgbuild: the root filesystem is read-only; all state lives on /var, which
# systemd-repart grows to the end of the disk at first boot.
PARTLABEL=root  /     ext4  ro,noatime  0 0
PARTLABEL=var   /var  ext4  defaults,noatime,x-systemd.growfs,x-systemd.after=systemd-repart.service  0 2
# Container volumes: btrfs, so a backup takes one atomic read-only snapshot of them all.
# nofail: without it (a disk with no room for the partition) the host would stop in
# emergency mode; imgbuild-firstboot requires this mount instead, so services stay
# down with the reason on the console. The partition only appears once systemd-repart
# has made it, late in a slow first boot (TCG, a small VPS): the default 90 s device
# timeout fails the mount, and with it first boot, before it exists.
PARTLABEL=volumes  /var/lib/containers/storage/volumes  btrfs  defaults,noatime,x-systemd.growfs,nofail,x-systemd.after=systemd-repart.service,x-systemd.device-timeout=15min  0 0
EOF
mkdir -p "$R/usr/lib/repart.d"
cat > "$R/usr/lib/repart.d/50-var.conf" <<'EOF'
# imgbuild: grow the /var partition (the last one) over the free space a provider's
# larger disk leaves; systemd-growfs then grows its filesystem (fstab x-systemd.growfs).
[Partition]
Type=var
Label=var
EOF
cat > "$R/usr/lib/repart.d/60-volumes.conf" <<'EOF'
# imgbuild: the container volumes, created and formatted btrfs at first boot in the free
# space a provider's disk leaves; three quarters of it (images and logs stay on /var).
# Its own filesystem so that one read-only btrfs snapshot holds every volume at one
# instant: what a backup reads from.
[Partition]
Type=linux-generic
Label=volumes
Format=btrfs
SizeMinBytes=128M
Weight=3000
EOF
# DHCP on the first wired interfaces unless the host tree brings its own network config.
mkdir -p "$R/usr/lib/systemd/network"
cat > "$R/usr/lib/systemd/network/90-imgbuild-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
for m in {modules}; do echo "$m" >> "$R/etc/initramfs-tools/modules"; done
chroot "$R" update-initramfs -u -k all
rm -f "$R"/boot/*.old "$R"/initrd.img.old "$R"/vmlinuz.old
"#,
        enable_line = if enable.is_empty() {
            String::new()
        } else {
            format!("systemctl --root=\"$R\" enable {enable}")
        },
    )
}

/// Reads the finished tarball once: paths, account files, sizes; copies out the kernel,
/// initrd and systemd-boot.
fn index_base(dir: &Path) -> Result<(), ImageError> {
    let f = fs::File::open(dir.join("rootfs.tar")).map_err(io_err("cannot open base tarball"))?;
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let mut idx = BaseIndex {
        paths: BTreeSet::new(),
        files: BTreeMap::new(),
        kernel_version: String::new(),
        root_bytes: 0,
        root_entries: 0,
        var_bytes: 0,
        var_entries: 0,
    };
    fs::create_dir_all(dir.join("boot")).map_err(io_err("cannot create boot dir"))?;
    let mut kernels: BTreeMap<String, ()> = BTreeMap::new();
    let entries = ar.entries().map_err(io_err("cannot read base tarball"))?;
    for e in entries {
        let mut e = e.map_err(io_err("cannot read base tarball"))?;
        let raw = e.path().map_err(io_err("bad path in base tarball"))?;
        let p = norm_tar_path(&raw.to_string_lossy());
        let size = e.header().size().unwrap_or(0);
        let rounded = size.div_ceil(4096) * 4096;
        if p == "/var" || p.starts_with("/var/") {
            idx.var_bytes += rounded;
            idx.var_entries += 1;
        } else {
            idx.root_bytes += rounded;
            idx.root_entries += 1;
        }
        let regular = e.header().entry_type().is_file();
        if regular {
            if ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"].contains(&p.as_str()) {
                let mut s = String::new();
                e.read_to_string(&mut s)
                    .map_err(io_err(format!("cannot read {p} from base")))?;
                idx.files.insert(p.clone(), s);
            } else if let Some(v) = p.strip_prefix("/boot/vmlinuz-") {
                kernels.insert(v.to_string(), ());
                copy_entry(&mut e, &dir.join(format!("boot/vmlinuz-{v}")))?;
            } else if let Some(v) = p.strip_prefix("/boot/initrd.img-") {
                copy_entry(&mut e, &dir.join(format!("boot/initrd.img-{v}")))?;
            } else if p == "/usr/lib/systemd/boot/efi/systemd-bootx64.efi" {
                copy_entry(&mut e, &dir.join("boot/systemd-bootx64.efi"))?;
            }
        }
        idx.paths.insert(p);
    }
    // Newest kernel wins if the base somehow has two (version strings sort well enough
    // for Debian's single-kernel bases).
    let Some(kv) = kernels.keys().next_back().cloned() else {
        return Err(ImageError::BaseCache {
            digest: dir.display().to_string(),
            msg: "no /boot/vmlinuz-* in the base (is a kernel package listed?)".into(),
        });
    };
    let rename = |from: String, to: &str| {
        fs::rename(dir.join(&from), dir.join(to)).map_err(|_| ImageError::BaseCache {
            digest: dir.display().to_string(),
            msg: format!("{from} missing (did update-initramfs run?)"),
        })
    };
    rename(format!("boot/vmlinuz-{kv}"), "boot/vmlinuz")?;
    rename(format!("boot/initrd.img-{kv}"), "boot/initrd.img")?;
    if !dir.join("boot/systemd-bootx64.efi").is_file() {
        return Err(ImageError::BaseCache {
            digest: dir.display().to_string(),
            msg: "no systemd-bootx64.efi (is systemd-boot-efi listed?)".into(),
        });
    }
    for f in ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"] {
        if !idx.files.contains_key(f) {
            return Err(ImageError::BaseCache {
                digest: dir.display().to_string(),
                msg: format!("{f} missing from the base"),
            });
        }
    }
    idx.kernel_version = kv;
    let json = serde_json::to_vec(&idx).map_err(|e| ImageError::BaseCache {
        digest: dir.display().to_string(),
        msg: e.to_string(),
    })?;
    fs::write(dir.join("index.json"), json).map_err(io_err("cannot write base index"))?;
    Ok(())
}

fn copy_entry<R: Read>(e: &mut R, to: &Path) -> Result<(), ImageError> {
    let mut f = fs::File::create(to).map_err(io_err(format!("cannot create {}", to.display())))?;
    std::io::copy(e, &mut f).map_err(io_err(format!("cannot write {}", to.display())))?;
    Ok(())
}

/// `./etc/passwd` → `/etc/passwd`, `./` → `/`.
pub(crate) fn norm_tar_path(p: &str) -> String {
    let t = p.trim_start_matches("./").trim_start_matches('/');
    let t = t.trim_end_matches('/');
    if t.is_empty() || t == "." {
        "/".to_string()
    } else {
        format!("/{t}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_paths_normalise() {
        assert_eq!(norm_tar_path("./"), "/");
        assert_eq!(norm_tar_path("./etc/"), "/etc");
        assert_eq!(norm_tar_path("./etc/passwd"), "/etc/passwd");
        assert_eq!(norm_tar_path("etc/passwd"), "/etc/passwd");
    }

    #[test]
    fn the_shipped_definition_parses_and_digest_is_stable() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-trixie.toml");
        let (def, bytes) = load_definition(&p).expect("definition parses");
        assert_eq!(def.suite, "trixie");
        assert!(def.packages.iter().any(|p| p == "systemd-repart"));
        assert_eq!(digest_of(&bytes), digest_of(&bytes));
        let script = customize_script(&def);
        assert!(script.contains("update-initramfs"));
        assert!(!script.contains("http"), "no mirror host in the recipe");
    }
}
