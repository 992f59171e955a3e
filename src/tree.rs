//! The host tree: the one intermediate form between a profile and every output.
//!
//! Everything a host needs on top of its base OS is an entry here. Both the Ignition
//! emitter and the disk-image assembler consume this and nothing else, so the two outputs
//! cannot drift apart.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// What sits at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File { content: Vec<u8> },
    Dir,
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path inside the host, e.g. `/etc/containers/systemd/caddy.container`.
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    /// Owner and group by name: the base OS (image) or the target OS (Ignition) resolves them.
    pub owner: String,
    pub group: String,
    /// Holds key material: never printed, never logged, output written 0600.
    pub secret: bool,
}

/// A login user the host needs (the admin). Created in /etc/passwd of the image,
/// or through `passwd.users` in Ignition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub groups: Vec<String>,
    pub home: String,
    pub shell: String,
    pub ssh_authorized_keys: Vec<String>,
}

/// A unit to enable: the symlinks `/etc/systemd/system/<target>.wants/<unit>`.
/// The unit file itself may be in the tree or in the base OS.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Enable {
    pub unit: String,
    pub wanted_by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostTree {
    pub host: String,
    /// Keyed by path so iteration is sorted and a path appears once.
    pub entries: BTreeMap<String, Entry>,
    pub users: Vec<User>,
    pub enable: BTreeSet<Enable>,
    /// Units (systemd names, e.g. `caddy.service`) the readiness check waits for.
    pub ready_units: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("path {0} is added twice to the host tree")]
    Duplicate(String),
    #[error("path {0} is not absolute and normalised")]
    BadPath(String),
    #[error("secret file {path} has mode {mode:04o}: other users could read it")]
    WorldReadableSecret { path: String, mode: u32 },
}

pub const SYSTEMD_UNIT_DIR: &str = "/etc/systemd/system";
pub const QUADLET_DIR: &str = "/etc/containers/systemd";

impl HostTree {
    pub fn new(host: &str) -> Self {
        HostTree {
            host: host.to_string(),
            ..Default::default()
        }
    }

    fn insert(&mut self, e: Entry) -> Result<(), TreeError> {
        let p = &e.path;
        if !p.starts_with('/')
            || p.len() < 2
            || p.ends_with('/')
            || p.contains("//")
            || p.split('/').any(|c| c == "." || c == "..")
            || p.contains('\n')
        {
            return Err(TreeError::BadPath(p.clone()));
        }
        if self.entries.contains_key(p) {
            return Err(TreeError::Duplicate(p.clone()));
        }
        self.entries.insert(p.clone(), e);
        Ok(())
    }

    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        content: impl Into<Vec<u8>>,
    ) -> Result<(), TreeError> {
        self.insert(Entry {
            path: path.into(),
            kind: EntryKind::File {
                content: content.into(),
            },
            mode,
            owner: "root".into(),
            group: "root".into(),
            secret: false,
        })
    }

    pub fn secret_file(
        &mut self,
        path: &str,
        mode: u32,
        owner: &str,
        group: &str,
        content: impl Into<Vec<u8>>,
    ) -> Result<(), TreeError> {
        // Both outputs copy the mode as it is: refusing here keeps every secret out of
        // reach of other users on the host.
        if mode & 0o007 != 0 {
            return Err(TreeError::WorldReadableSecret {
                path: path.into(),
                mode,
            });
        }
        self.insert(Entry {
            path: path.into(),
            kind: EntryKind::File {
                content: content.into(),
            },
            mode,
            owner: owner.into(),
            group: group.into(),
            secret: true,
        })
    }

    pub fn dir(
        &mut self,
        path: &str,
        mode: u32,
        owner: &str,
        group: &str,
    ) -> Result<(), TreeError> {
        self.insert(Entry {
            path: path.into(),
            kind: EntryKind::Dir,
            mode,
            owner: owner.into(),
            group: group.into(),
            secret: false,
        })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.insert(Entry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
            mode: 0o777,
            owner: "root".into(),
            group: "root".into(),
            secret: false,
        })
    }

    pub fn enable(&mut self, unit: &str, wanted_by: &str) {
        self.enable.insert(Enable {
            unit: unit.into(),
            wanted_by: wanted_by.into(),
        });
    }

    /// True when some entry holds key material: outputs carrying it are written 0600.
    pub fn has_secrets(&self) -> bool {
        self.entries.values().any(|e| e.secret)
    }

    /// Directories that must exist for the entries' parents but are not listed
    /// themselves (the consumer creates them 0755 root).
    pub fn implied_dirs(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for p in self.entries.keys() {
            let mut cur = p.as_str();
            while let Some(i) = cur.rfind('/') {
                cur = &cur[..i];
                if cur.is_empty() {
                    break;
                }
                if !self.entries.contains_key(cur) {
                    out.insert(cur.to_string());
                }
            }
        }
        out
    }

    /// A digest over every entry, user and enabled unit, in a fixed order. Changes
    /// whenever any byte the host would see changes.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(self.host.as_bytes());
        for e in self.entries.values() {
            field(e.path.as_bytes());
            field(&e.mode.to_le_bytes());
            field(e.owner.as_bytes());
            field(e.group.as_bytes());
            match &e.kind {
                EntryKind::File { content } => {
                    field(b"f");
                    field(content);
                }
                EntryKind::Dir => field(b"d"),
                EntryKind::Symlink { target } => {
                    field(b"l");
                    field(target.as_bytes());
                }
            }
        }
        for u in &self.users {
            field(u.name.as_bytes());
            field(&u.uid.to_le_bytes());
            field(u.groups.join(",").as_bytes());
            field(u.home.as_bytes());
            field(u.shell.as_bytes());
            for k in &u.ssh_authorized_keys {
                field(k.as_bytes());
            }
        }
        for en in &self.enable {
            field(en.unit.as_bytes());
            field(en.wanted_by.as_bytes());
        }
        for u in &self.ready_units {
            field(u.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_open_to_other_users_is_refused() {
        let mut t = HostTree::new("h");
        for mode in [0o644, 0o604, 0o601, 0o602] {
            assert_eq!(
                t.secret_file("/etc/k", mode, "root", "root", "x"),
                Err(TreeError::WorldReadableSecret {
                    path: "/etc/k".into(),
                    mode
                })
            );
        }
        t.secret_file("/etc/k", 0o640, "root", "root", "x")
            .expect("group-readable is allowed");
    }
}
