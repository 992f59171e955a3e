//! Every secret value the render needs, read once from the secrets root before the
//! render starts, so `render::render` is a pure function of its input and never
//! touches the secrets root (a directory, or a locked archive in memory).

use super::RenderError;
use crate::profile::Host;
use crate::secrets::SecretsRoot;

#[derive(Clone, Default)]
pub struct HostSecrets {
    pub ssh_host_key: String,
    pub ssh_host_key_pub: String,
    /// With a `[wireguard]` section.
    pub wireguard_key: Option<String>,
    /// With a `[backup]` section.
    pub snapshot_encryption_key: Option<String>,
    pub snapshot_signing_key: Option<String>,
    pub snapshot_signing_pub: Option<String>,
    /// `s3.env`, when the secrets dir has one.
    pub s3_env: Option<String>,
}

/// Values never reach a log through Debug: only which ones are there.
impl std::fmt::Debug for HostSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "<set>" } else { "<none>" };
        f.debug_struct("HostSecrets")
            .field("ssh_host_key", &"<set>")
            .field("wireguard_key", &set(&self.wireguard_key))
            .field(
                "snapshot_encryption_key",
                &set(&self.snapshot_encryption_key),
            )
            .field("snapshot_signing_key", &set(&self.snapshot_signing_key))
            .field("s3_env", &set(&self.s3_env))
            .finish()
    }
}

impl HostSecrets {
    pub fn read(root: &SecretsRoot, host: &Host) -> Result<HostSecrets, RenderError> {
        let dir = root.host_dir(host.name());
        let read = |f: &str| root.read_text(&dir.join(f));
        let p = &host.profile;
        let backup = p.backup.is_some();
        let opt = |on: bool, f: &str| -> Result<Option<String>, RenderError> {
            Ok(if on { Some(read(f)?) } else { None })
        };
        let s3 = dir.join("s3.env");
        Ok(HostSecrets {
            ssh_host_key: read("ssh_host_ed25519_key")?,
            ssh_host_key_pub: read("ssh_host_ed25519_key.pub")?,
            wireguard_key: opt(p.wireguard.is_some(), "wireguard.key")?,
            snapshot_encryption_key: opt(backup, "snapshot-encryption.key")?,
            snapshot_signing_key: opt(backup, "snapshot-signing.key")?,
            snapshot_signing_pub: opt(backup, "snapshot-signing.pub")?,
            s3_env: if backup && root.is_file(&s3) {
                Some(root.read_text(&s3)?)
            } else {
                None
            },
        })
    }
}

/// A key the profile needs but gather did not read: a bug, named rather than panicked.
pub fn needed(v: &Option<String>, what: &str) -> Result<String, RenderError> {
    v.clone().ok_or_else(|| RenderError::Template {
        name: what.to_string(),
        source: minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("{what} was not read before rendering"),
        ),
    })
}
