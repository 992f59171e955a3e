//! The host tree overlaid on the base, as two tar streams that `mkfs.ext4 -d` turns into
//! the root and /var filesystems.
//!
//! The base tarball is streamed once, in its own order; an entry the overlay replaces is
//! written in the base entry's place (so a replaced directory still precedes its
//! children), and the overlay's new entries follow, sorted (parents before children).
//! Nothing is extracted to disk, so owners, modes and xattrs survive without root.

use super::base::{norm_tar_path, Base};
use super::{io_err, ImageError};
use crate::tree::{EntryKind, HostTree};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub(crate) enum Source {
    Bytes(Vec<u8>),
    File(PathBuf),
}

#[derive(Debug)]
pub(crate) enum Kind {
    File(Source),
    Dir,
    Symlink(String),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

#[derive(Debug)]
pub(crate) struct Item {
    pub kind: Kind,
    /// None: keep the base entry's mode and owner (the account databases).
    pub meta: Option<Meta>,
}

const ROOT: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
};

/// Account databases of the base, extended with the host's users.
struct Accounts {
    passwd: Vec<String>,
    group: Vec<String>,
    shadow: Vec<String>,
    gshadow: Vec<String>,
}

impl Accounts {
    fn from_base(base: &Base) -> Accounts {
        let lines = |f: &str| -> Vec<String> {
            base.index
                .files
                .get(f)
                .map(|s| s.lines().map(str::to_string).collect())
                .unwrap_or_default()
        };
        Accounts {
            passwd: lines("/etc/passwd"),
            group: lines("/etc/group"),
            shadow: lines("/etc/shadow"),
            gshadow: lines("/etc/gshadow"),
        }
    }

    fn id_of(lines: &[String], name: &str) -> Option<u64> {
        lines.iter().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name))
                .then(|| f.nth(1).and_then(|v| v.parse().ok()))
                .flatten()
        })
    }

    fn uid(&self, name: &str) -> Option<u64> {
        Self::id_of(&self.passwd, name)
    }

    fn gid(&self, name: &str) -> Option<u64> {
        Self::id_of(&self.group, name)
    }

    fn id_taken(lines: &[String], id: u64) -> bool {
        lines
            .iter()
            .any(|l| l.split(':').nth(2).and_then(|v| v.parse().ok()) == Some(id))
    }

    fn add_member(lines: &mut [String], group: &str, user: &str, member_field: usize) -> bool {
        for l in lines.iter_mut() {
            let mut f: Vec<String> = l.split(':').map(str::to_string).collect();
            if f.first().map(String::as_str) != Some(group) {
                continue;
            }
            while f.len() <= member_field {
                f.push(String::new());
            }
            let mut members: Vec<&str> = f[member_field]
                .split(',')
                .filter(|m| !m.is_empty())
                .collect();
            if !members.contains(&user) {
                members.push(user);
            }
            f[member_field] = members.join(",");
            *l = f.join(":");
            return true;
        }
        false
    }
}

fn join_lines(v: &[String]) -> Vec<u8> {
    let mut s = v.join("\n");
    s.push('\n');
    s.into_bytes()
}

/// Everything the image adds to or replaces in the base, keyed by absolute path.
pub(crate) fn overlay(
    tree: &HostTree,
    base: &Base,
    helper: &Path,
    baked: &[(String, PathBuf)],
    epoch: u64,
) -> Result<BTreeMap<String, Item>, ImageError> {
    let mut acc = Accounts::from_base(base);
    let mut items: BTreeMap<String, Item> = BTreeMap::new();
    let terr = |m: String| ImageError::Tree(m);

    // Users first: tree entries may be owned by them.
    let mut homes: Vec<(String, Meta, Vec<String>)> = Vec::new();
    for u in &tree.users {
        if acc.uid(&u.name).is_some() || acc.gid(&u.name).is_some() {
            return Err(terr(format!("user {} already exists in the base", u.name)));
        }
        if Accounts::id_taken(&acc.passwd, u.uid as u64)
            || Accounts::id_taken(&acc.group, u.uid as u64)
        {
            return Err(terr(format!(
                "uid/gid {} of user {} is taken in the base",
                u.uid, u.name
            )));
        }
        // /bin is a symlink to usr/bin on merged-/usr bases: look the shell up in both.
        let shell_known = base.index.paths.contains(&u.shell)
            || base.index.paths.contains(&format!("/usr{}", u.shell));
        if !shell_known {
            return Err(terr(format!(
                "shell {} of user {} is not in the base",
                u.shell, u.name
            )));
        }
        acc.passwd.push(format!(
            "{n}:x:{id}:{id}::{h}:{s}",
            n = u.name,
            id = u.uid,
            h = u.home,
            s = u.shell
        ));
        acc.group.push(format!("{}:x:{}:", u.name, u.uid));
        // `*`: no password can ever match, yet the account is not "locked" in the sense
        // that makes sshd (with UsePAM=no) refuse key logins.
        acc.shadow
            .push(format!("{}:*:{}:0:99999:7:::", u.name, epoch / 86_400));
        acc.gshadow.push(format!("{}:!::", u.name));
        for g in &u.groups {
            if !Accounts::add_member(&mut acc.group, g, &u.name, 3) {
                return Err(terr(format!(
                    "group {g} of user {} is not in the base",
                    u.name
                )));
            }
            Accounts::add_member(&mut acc.gshadow, g, &u.name, 3);
        }
        let meta = Meta {
            mode: 0o700,
            uid: u.uid as u64,
            gid: u.uid as u64,
        };
        homes.push((u.home.clone(), meta, u.ssh_authorized_keys.clone()));
    }
    if !tree.users.is_empty() {
        for (path, lines) in [
            ("/etc/passwd", &acc.passwd),
            ("/etc/group", &acc.group),
            ("/etc/shadow", &acc.shadow),
            ("/etc/gshadow", &acc.gshadow),
        ] {
            if tree.entries.contains_key(path) {
                return Err(terr(format!(
                    "{path} is in the host tree; users belong in HostTree::users"
                )));
            }
            items.insert(
                path.to_string(),
                Item {
                    kind: Kind::File(Source::Bytes(join_lines(lines))),
                    meta: None,
                },
            );
        }
    }

    for e in tree.entries.values() {
        let uid = acc
            .uid(&e.owner)
            .ok_or_else(|| terr(format!("{}: unknown owner {}", e.path, e.owner)))?;
        let gid = acc
            .gid(&e.group)
            .ok_or_else(|| terr(format!("{}: unknown group {}", e.path, e.group)))?;
        if e.path == "/var" {
            return Err(terr("/var is a mount point; put entries below it".into()));
        }
        let kind = match &e.kind {
            EntryKind::File { content } => Kind::File(Source::Bytes(content.clone())),
            EntryKind::Dir => Kind::Dir,
            EntryKind::Symlink { target } => Kind::Symlink(target.clone()),
        };
        items.insert(
            e.path.clone(),
            Item {
                kind,
                meta: Some(Meta {
                    mode: e.mode & 0o7777,
                    uid,
                    gid,
                }),
            },
        );
    }

    for (home, meta, keys) in homes {
        add_new(&mut items, &home, Kind::Dir, meta);
        if !keys.is_empty() {
            add_new(&mut items, &format!("{home}/.ssh"), Kind::Dir, meta);
            let mut k = keys.join("\n");
            k.push('\n');
            add_new(
                &mut items,
                &format!("{home}/.ssh/authorized_keys"),
                Kind::File(Source::Bytes(k.into_bytes())),
                Meta {
                    mode: 0o600,
                    ..meta
                },
            );
        }
    }

    for en in &tree.enable {
        let in_tree = |u: &str| {
            tree.entries
                .contains_key(&format!("/etc/systemd/system/{u}"))
        };
        let in_base = |u: &str| {
            base.index
                .paths
                .contains(&format!("/usr/lib/systemd/system/{u}"))
        };
        // An instance (foo@bar.service) is enabled through its template's file.
        let template = en.unit.split_once('@').and_then(|(pre, rest)| {
            rest.rsplit_once('.')
                .map(|(_, suffix)| format!("{pre}@.{suffix}"))
        });
        let candidates: Vec<&str> = std::iter::once(en.unit.as_str())
            .chain(template.as_deref())
            .collect();
        let target = if let Some(u) = candidates.iter().find(|u| in_tree(u)) {
            format!("/etc/systemd/system/{u}")
        } else if let Some(u) = candidates.iter().find(|u| in_base(u)) {
            format!("/usr/lib/systemd/system/{u}")
        } else {
            return Err(terr(format!(
                "unit {} is enabled but neither the host tree nor the base has it \
                 (quadlet services are enabled by their [Install] section, not here)",
                en.unit
            )));
        };
        let link = format!("/etc/systemd/system/{}.wants/{}", en.wanted_by, en.unit);
        if items.contains_key(&link) {
            return Err(terr(format!("{link} is both in the tree and enabled")));
        }
        items.insert(
            link,
            Item {
                kind: Kind::Symlink(target),
                meta: Some(Meta {
                    mode: 0o777,
                    ..ROOT
                }),
            },
        );
    }

    // mmdebstrap copies the build machine's hostname into the base; the host's own name
    // belongs there unless the tree brings an /etc/hostname.
    if !tree.entries.contains_key("/etc/hostname") {
        items.insert(
            "/etc/hostname".to_string(),
            Item {
                kind: Kind::File(Source::Bytes(format!("{}\n", tree.host).into_bytes())),
                meta: Some(Meta {
                    mode: 0o644,
                    ..ROOT
                }),
            },
        );
    }

    let mut add_file = |path: &str, src: &Path, mode: u32| -> Result<(), ImageError> {
        if items.contains_key(path) {
            return Err(terr(format!(
                "{path} is both in the host tree and added by the image"
            )));
        }
        if !src.is_file() {
            return Err(terr(format!(
                "{} (for {path}) is not a readable file",
                src.display()
            )));
        }
        items.insert(
            path.to_string(),
            Item {
                kind: Kind::File(Source::File(src.to_path_buf())),
                meta: Some(Meta { mode, ..ROOT }),
            },
        );
        Ok(())
    };
    add_file("/usr/bin/imgbuild", helper, 0o755)?;
    for (dest, src) in baked {
        if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
            return Err(terr(format!(
                "baked image destination {dest} is not absolute"
            )));
        }
        add_file(dest, src, 0o644)?;
    }

    // Parents nobody listed: plain root-owned directories.
    let mut implied = BTreeSet::new();
    for p in items.keys() {
        let mut cur = p.as_str();
        while let Some(i) = cur.rfind('/') {
            cur = &cur[..i];
            if cur.is_empty() {
                break;
            }
            if !items.contains_key(cur) && !base.index.paths.contains(cur) {
                implied.insert(cur.to_string());
            }
        }
    }
    for d in implied {
        items.insert(
            d,
            Item {
                kind: Kind::Dir,
                meta: Some(ROOT),
            },
        );
    }
    Ok(items)
}

fn add_new(items: &mut BTreeMap<String, Item>, path: &str, kind: Kind, meta: Meta) {
    items.entry(path.to_string()).or_insert(Item {
        kind,
        meta: Some(meta),
    });
}

/// Directories also created under the /var mount point on root, for what runs before
/// /var is mounted.
const VAR_STUBS: [&str; 4] = ["/var/tmp", "/var/lib", "/var/log", "/var/cache"];

/// Size accounting for one filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Usage {
    /// Regular file bytes, each rounded up to 4 KiB.
    pub bytes: u64,
    pub entries: u64,
}

pub(crate) struct Tars {
    pub root: PathBuf,
    pub var: PathBuf,
    pub root_usage: Usage,
    pub var_usage: Usage,
}

struct Out {
    b: tar::Builder<BufWriter<fs::File>>,
    usage: Usage,
}

impl Out {
    fn new(path: &Path) -> Result<Out, ImageError> {
        let f =
            fs::File::create(path).map_err(io_err(format!("cannot create {}", path.display())))?;
        Ok(Out {
            b: tar::Builder::new(BufWriter::with_capacity(1 << 20, f)),
            usage: Usage::default(),
        })
    }

    fn count(&mut self, size: u64) {
        self.usage.bytes += size.div_ceil(4096) * 4096;
        self.usage.entries += 1;
    }
}

/// Where a base path goes: (is_var, path inside that filesystem's tar).
fn place(p: &str) -> (bool, String) {
    if let Some(rest) = p.strip_prefix("/var/") {
        (true, rest.to_string())
    } else if p == "/" {
        (false, ".".to_string())
    } else {
        (false, p.trim_start_matches('/').to_string())
    }
}

fn header_for(kind: &Kind, meta: Meta, epoch: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(match kind {
        Kind::File(_) => tar::EntryType::Regular,
        Kind::Dir => tar::EntryType::Directory,
        Kind::Symlink(_) => tar::EntryType::Symlink,
    });
    h.set_mode(meta.mode);
    h.set_uid(meta.uid);
    h.set_gid(meta.gid);
    h.set_mtime(epoch);
    h.set_size(size);
    h
}

fn write_item(
    out: &mut Out,
    path: &str,
    item: &Item,
    base_meta: Option<Meta>,
    epoch: u64,
) -> Result<(), ImageError> {
    let meta = item.meta.or(base_meta).unwrap_or(ROOT);
    let werr = || io_err(format!("cannot write {path} to the filesystem tar"));
    match &item.kind {
        Kind::File(Source::Bytes(b)) => {
            let mut h = header_for(&item.kind, meta, epoch, b.len() as u64);
            out.count(b.len() as u64);
            out.b.append_data(&mut h, path, &b[..]).map_err(werr())?;
        }
        Kind::File(Source::File(src)) => {
            let f =
                fs::File::open(src).map_err(io_err(format!("cannot open {}", src.display())))?;
            let len = f
                .metadata()
                .map_err(io_err(format!("cannot stat {}", src.display())))?
                .len();
            let mut h = header_for(&item.kind, meta, epoch, len);
            out.count(len);
            // take(len): a file growing while we read must not corrupt the archive.
            out.b
                .append_data(&mut h, path, BufReader::new(f).take(len))
                .map_err(werr())?;
        }
        Kind::Dir => {
            let mut h = header_for(&item.kind, meta, epoch, 0);
            out.count(4096);
            out.b
                .append_data(&mut h, path, io::empty())
                .map_err(werr())?;
        }
        Kind::Symlink(t) => {
            let mut h = header_for(&item.kind, meta, epoch, 0);
            out.count(0);
            out.b.append_link(&mut h, path, t).map_err(werr())?;
        }
    }
    Ok(())
}

/// Streams the base and the overlay into `dir/root.tar` and `dir/var.tar`.
pub(crate) fn write_tars(
    base: &Base,
    items: &BTreeMap<String, Item>,
    dir: &Path,
    epoch: u64,
) -> Result<Tars, ImageError> {
    let root_path = dir.join("root.tar");
    let var_path = dir.join("var.tar");
    let mut root = Out::new(&root_path)?;
    let mut var = Out::new(&var_path)?;
    let mut done: HashMap<&str, ()> = HashMap::new();
    let rerr = || io_err("cannot read the base tarball");

    let f = fs::File::open(base.rootfs_tar()).map_err(rerr())?;
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    for e in ar.entries().map_err(rerr())? {
        let mut e = e.map_err(rerr())?;
        let raw = e.path().map_err(rerr())?.to_string_lossy().into_owned();
        let p = norm_tar_path(&raw);
        let h = e.header().clone();
        let base_meta = Meta {
            mode: h.mode().unwrap_or(0o644),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
        };
        if p == "/var" {
            // The mount point on root, and the root directory of the /var filesystem.
            let mtime = h.mtime().unwrap_or(epoch);
            for (out, path) in [(&mut root, "var"), (&mut var, ".")] {
                let mut hh = header_for(&Kind::Dir, base_meta, mtime, 0);
                out.count(4096);
                out.b
                    .append_data(&mut hh, path, io::empty())
                    .map_err(io_err("cannot write /var"))?;
            }
            continue;
        }
        let (is_var, path) = place(&p);
        if VAR_STUBS.contains(&p.as_str()) && h.entry_type().is_dir() {
            // Units that start before /var is mounted (systemd-resolved's PrivateTmp needs
            // /var/tmp) see the mount point's own contents, on the read-only root.
            let mut hh = header_for(&Kind::Dir, base_meta, h.mtime().unwrap_or(epoch), 0);
            root.count(4096);
            root.b
                .append_data(&mut hh, format!("var/{path}"), io::empty())
                .map_err(io_err(format!("cannot write {p} stub")))?;
        }
        let out = if is_var { &mut var } else { &mut root };
        if let Some((k, item)) = items.get_key_value(p.as_str()) {
            write_item(out, &path, item, Some(base_meta), epoch)?;
            done.insert(k.as_str(), ());
            continue;
        }
        let pax: Vec<(String, Vec<u8>)> = match e.pax_extensions().map_err(rerr())? {
            Some(exts) => exts
                .filter_map(|x| x.ok())
                .filter_map(|x| {
                    let k = x.key().ok()?;
                    (k.starts_with("SCHILY.xattr.") || k.starts_with("LIBARCHIVE.xattr."))
                        .then(|| (k.to_string(), x.value_bytes().to_vec()))
                })
                .collect(),
            None => Vec::new(),
        };
        if !pax.is_empty() {
            out.b
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(io_err(format!("cannot write xattrs of {p}")))?;
        }
        let mut hh = h.clone();
        let werr = || io_err(format!("cannot copy {p} from the base"));
        match h.entry_type() {
            tar::EntryType::Symlink => {
                let t = e
                    .link_name()
                    .map_err(rerr())?
                    .unwrap_or_default()
                    .into_owned();
                out.count(0);
                out.b.append_link(&mut hh, &path, t).map_err(werr())?;
            }
            tar::EntryType::Link => {
                let t = e.link_name().map_err(rerr())?.unwrap_or_default();
                let tp = norm_tar_path(&t.to_string_lossy());
                let (t_var, t_path) = place(&tp);
                if t_var != is_var {
                    return Err(ImageError::Tree(format!(
                        "hard link {p} → {tp} crosses the /var boundary"
                    )));
                }
                out.count(0);
                out.b.append_link(&mut hh, &path, t_path).map_err(werr())?;
            }
            _ => {
                out.count(h.size().unwrap_or(0));
                out.b.append_data(&mut hh, &path, &mut e).map_err(werr())?;
            }
        }
    }
    for (p, item) in items {
        if done.contains_key(p.as_str()) {
            continue;
        }
        let (is_var, path) = place(p);
        let out = if is_var { &mut var } else { &mut root };
        write_item(out, &path, item, None, epoch)?;
    }
    let finish = |o: Out, path: &Path| -> Result<Usage, ImageError> {
        let usage = o.usage;
        let w =
            o.b.into_inner()
                .map_err(io_err(format!("cannot finish {}", path.display())))?;
        w.into_inner()
            .map_err(|e| ImageError::Io {
                what: format!("cannot flush {}", path.display()),
                source: e.into_error(),
            })?
            .flush()
            .map_err(io_err("flush"))?;
        Ok(usage)
    };
    let root_usage = finish(root, &root_path)?;
    let var_usage = finish(var, &var_path)?;
    Ok(Tars {
        root: root_path,
        var: var_path,
        root_usage,
        var_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_paths_go_to_the_var_filesystem() {
        assert_eq!(place("/var/lib/x"), (true, "lib/x".into()));
        assert_eq!(place("/etc/x"), (false, "etc/x".into()));
        assert_eq!(place("/"), (false, ".".into()));
        assert_eq!(place("/variable"), (false, "variable".into()));
    }

    #[test]
    fn group_members_are_appended_once() {
        let mut g = vec!["sudo:x:27:".to_string(), "adm:x:4:syslog".to_string()];
        assert!(Accounts::add_member(&mut g, "sudo", "admin", 3));
        assert!(Accounts::add_member(&mut g, "sudo", "admin", 3));
        assert!(Accounts::add_member(&mut g, "adm", "admin", 3));
        assert!(!Accounts::add_member(&mut g, "wheel", "admin", 3));
        assert_eq!(g, vec!["sudo:x:27:admin", "adm:x:4:syslog,admin"]);
    }

    /// A base as small as the assembler accepts: the account databases (shadow 0640
    /// root:shadow, as Debian ships it), bash, the units the tree enables, /var, and an
    /// SSH host key at 0644 that the tree replaces.
    fn tiny_base(dir: &Path) -> Base {
        let (def, _) = super::super::base::load_definition(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-trixie.toml"),
        )
        .expect("shipped base definition");
        let files: BTreeMap<String, String> = [
            (
                "/etc/passwd",
                "root:x:0:0:root:/root:/bin/bash\nsystemd-network:x:998:998::/:/usr/sbin/nologin",
            ),
            (
                "/etc/group",
                "root:x:0:\nshadow:x:42:\nsystemd-network:x:998:",
            ),
            (
                "/etc/shadow",
                "root:*:20000:0:99999:7:::\nsystemd-network:!*:20000::::::",
            ),
            ("/etc/gshadow", "root:*::\nshadow:*::\nsystemd-network:!*::"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, mode: u32, gid: u64, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(gid);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).expect("tar entry");
        };
        let mut paths = BTreeSet::new();
        for d in [
            "./",
            "./etc/",
            "./etc/ssh/",
            "./usr/",
            "./usr/bin/",
            "./var/",
        ] {
            add(d, tar::EntryType::Directory, 0o755, 0, b"");
            paths.insert(super::super::base::norm_tar_path(d));
        }
        for (path, body) in &files {
            let (mode, gid) = if path.contains("shadow") {
                (0o640, 42)
            } else {
                (0o644, 0)
            };
            add(
                &format!(".{path}"),
                tar::EntryType::Regular,
                mode,
                gid,
                body.as_bytes(),
            );
            paths.insert(path.clone());
        }
        for (path, mode) in [
            ("/usr/bin/bash", 0o755),
            ("/etc/ssh/ssh_host_ed25519_key", 0o644),
        ] {
            add(
                &format!(".{path}"),
                tar::EntryType::Regular,
                mode,
                0,
                b"base",
            );
            paths.insert(path.to_string());
        }
        fs::write(dir.join("rootfs.tar"), b.into_inner().expect("tar")).expect("write base");
        for u in ["systemd-networkd.service", "nftables.service"] {
            paths.insert(format!("/usr/lib/systemd/system/{u}"));
        }
        Base {
            digest: "test".into(),
            dir: dir.to_path_buf(),
            def,
            index: super::super::base::BaseIndex {
                paths,
                files,
                kernel_version: "test".into(),
                root_bytes: 0,
                root_entries: 0,
                var_bytes: 0,
                var_entries: 0,
            },
        }
    }

    /// Secrets where the renderer puts them (on root, and one under /var), each file with
    /// the mode and owner the renderer gives it, beside public files.
    fn secret_tree() -> (HostTree, Vec<(&'static str, &'static str)>) {
        let secrets = vec![
            (
                "/etc/imgbuild/host.toml",
                "ping_url = \"https://hc-ping.example.org/PINGTOKEN-9d1e\"\n",
            ),
            (
                "/etc/systemd/network/wg0.key",
                "WGKEY+b64+aGVsbG8gd29ybGQgc2VjcmV0a2V5MTI=\n",
            ),
            (
                "/etc/ssh/ssh_host_ed25519_key",
                "SSHKEY-b3BlbnNzaC1rZXktdjEAAAAA-private\n",
            ),
            (
                "/etc/imgbuild/secrets/s3.env",
                "AWS_SECRET_ACCESS_KEY=S3SECRET-wJalrXUtnFEMI\n",
            ),
            (
                "/etc/imgbuild/env/app.env",
                "POSTGRES_PASSWORD=APPSECRET-Zq8rT2\n",
            ),
            ("/var/lib/imgbuild/token", "VARSECRET-7f3a9c\n"),
        ];
        let mut t = HostTree::new("h");
        for (path, body) in &secrets {
            let (mode, owner) = match *path {
                "/etc/imgbuild/host.toml" => (0o600, "root"),
                "/etc/systemd/network/wg0.key" => (0o600, "systemd-network"),
                _ => (0o600, "root"),
            };
            if *path == "/etc/imgbuild/host.toml" {
                t.file(path, mode, *body).expect("file");
            } else {
                t.secret_file(path, mode, owner, owner, *body)
                    .expect("secret file");
            }
        }
        t.file("/etc/hostname", 0o644, "h\n").expect("file");
        t.file(
            "/etc/ssh/ssh_host_ed25519_key.pub",
            0o644,
            "ssh-ed25519 AAAA public\n",
        )
        .expect("file");
        t.file(
            "/etc/systemd/system/imgbuild-ready.service",
            0o644,
            "[Service]\n",
        )
        .expect("file");
        t.enable("systemd-networkd.service", "multi-user.target");
        t.enable("imgbuild-ready.service", "multi-user.target");
        t.users.push(crate::tree::User {
            name: "admin".into(),
            uid: 1000,
            groups: vec![],
            home: "/var/home/admin".into(),
            shell: "/bin/bash".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA admin".into()],
        });
        (t, secrets)
    }

    /// Every regular file of both filesystem tars: (filesystem path, mode, uid, gid, bytes).
    fn tar_files(
        tree: &HostTree,
        base: &Base,
        dir: &Path,
    ) -> Vec<(String, u32, u64, u64, Vec<u8>)> {
        let helper = dir.join("helper");
        fs::write(&helper, b"#!/bin/sh\n").expect("helper");
        let items = overlay(tree, base, &helper, &[], 1).expect("overlay");
        let work = tempfile::tempdir_in(dir).expect("work dir");
        let tars = write_tars(base, &items, work.path(), 1).expect("tars");
        let mut out = Vec::new();
        for (prefix, path) in [("/", &tars.root), ("/var/", &tars.var)] {
            let mut ar = tar::Archive::new(fs::File::open(path).expect("open tar"));
            for e in ar.entries().expect("entries") {
                let mut e = e.expect("entry");
                if e.header().entry_type() != tar::EntryType::Regular {
                    continue;
                }
                let name = format!("{prefix}{}", e.path().expect("path").display());
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read entry");
                out.push((
                    name,
                    h.mode().expect("mode"),
                    h.uid().expect("uid"),
                    h.gid().expect("gid"),
                    data,
                ));
            }
        }
        out
    }

    fn world_readable_hits(
        files: &[(String, u32, u64, u64, Vec<u8>)],
        needles: &[&str],
    ) -> Vec<String> {
        let mut hits = Vec::new();
        for (path, mode, _, _, data) in files {
            if mode & 0o004 == 0 {
                continue;
            }
            for n in needles {
                if data.windows(n.len()).any(|w| w == n.as_bytes()) {
                    hits.push(format!("{n} in {path} ({mode:04o})"));
                }
            }
        }
        hits
    }

    #[test]
    fn the_filesystems_keep_the_trees_modes_and_owners_and_no_secret_is_world_readable() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let base = tiny_base(tmp.path());
        let (tree, secrets) = secret_tree();
        let files = tar_files(&tree, &base, tmp.path());
        let get = |p: &str| {
            files
                .iter()
                .find(|f| f.0 == p)
                .unwrap_or_else(|| panic!("{p} is in neither filesystem"))
        };
        for (path, body) in &secrets {
            let (_, mode, uid, gid, data) = get(path);
            assert_eq!(data.as_slice(), body.as_bytes(), "{path}");
            assert_eq!(mode & 0o7777, 0o600, "{path}");
            let want = if path.ends_with("wg0.key") { 998 } else { 0 };
            assert_eq!((*uid, *gid), (want, want), "{path} owner");
        }
        // The base's shadow keeps its own mode and group; its 0644 host key is replaced
        // by the tree's, with the tree's mode.
        let (_, mode, _, gid, _) = get("/etc/shadow");
        assert_eq!((mode & 0o7777, *gid), (0o640, 42));
        let (_, _, _, _, k) = get("/etc/ssh/ssh_host_ed25519_key");
        assert_ne!(k.as_slice(), b"base");
        let needles: Vec<&str> = secrets.iter().map(|(_, b)| b.trim_end()).collect();
        let hits = world_readable_hits(&files, &needles);
        assert!(hits.is_empty(), "secrets in world-readable files: {hits:?}");

        // The scan is not vacuous: the same secrets, planted world-readable on root and
        // on /var, are found.
        let mut planted = tree.clone();
        planted
            .file("/etc/planted.conf", 0o644, format!("x={}\n", needles[1]))
            .expect("plant");
        planted
            .file("/var/lib/planted", 0o604, needles[3])
            .expect("plant");
        let hits = world_readable_hits(&tar_files(&planted, &base, tmp.path()), &needles);
        assert!(
            hits.iter().any(|h| h.contains("/etc/planted.conf")),
            "{hits:?}"
        );
        assert!(
            hits.iter().any(|h| h.contains("/var/lib/planted")),
            "{hits:?}"
        );
    }
}
