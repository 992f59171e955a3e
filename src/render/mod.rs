//! Render: a validated host (+ its keys and its peers' public data) → `HostTree`,
//! through minijinja templates compiled into the binary.

pub mod check;
pub mod keys;

pub use keys::HostSecrets;
mod monitoring;

use crate::hostconfig::{
    self, BackupConfig, CheckSettings, FinalSnapshotSettings, FinalSnapshotWhen, HostConfig,
    PackSettings, RestorePolicy, Retention, Strategy, VolumeBackup,
};
use crate::profile::{
    self, BackupStrategy, Container, FinalSnapshot, Host, LoadOptions, RestoreMode, SshAccess,
};
use crate::secrets::{self, SecretsRoot};
use crate::tree::{HostTree, TreeError, QUADLET_DIR, SYSTEMD_UNIT_DIR};
use minijinja::{context, Environment};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Profile(#[from] profile::ProfileErrors),
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("template {name}: {source}")]
    Template {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("{profile}: peer `{peer}`: {what}")]
    Peer {
        profile: PathBuf,
        peer: String,
        what: String,
    },
}

/// podman's network definitions on an image host (its /etc is read-only).
pub const PODMAN_NETWORKS: &str = "/var/lib/containers/networks";

/// Where the helper binary lives on the target: in the read-only /usr of an image,
/// or in /usr/local/bin where an Ignition config installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Image,
    Ignition,
}

impl Target {
    pub fn helper_path(self) -> &'static str {
        match self {
            Target::Image => "/usr/bin/imgbuild",
            Target::Ignition => "/usr/local/bin/imgbuild",
        }
    }
}

/// What a peer contributes to this host's WireGuard config: all from its own profile
/// and secrets, nothing typed by hand.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub host: String,
    pub public_key: String,
    pub address: String,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    pub keepalive: Option<u16>,
}

/// Everything the renderer needs, gathered (and keys created) before rendering so the
/// render itself is a pure function of its inputs.
#[derive(Debug, Clone)]
pub struct RenderInput {
    pub host: Host,
    pub secrets_dir: PathBuf,
    /// Where secret files are read from (a directory, or a locked archive in memory).
    pub secrets: SecretsRoot,
    pub peers: Vec<PeerInfo>,
    /// This host's key material, read once (the render never reads the secrets root).
    pub keys: HostSecrets,
    /// Hosts this host scrapes (monitoring): name and WireGuard address.
    pub scrape: Vec<(String, Host)>,
    pub app_secrets: BTreeMap<String, String>,
    /// Files created while gathering (for the one-line notice).
    pub created: Vec<PathBuf>,
    /// Volumes that start from another host's snapshot (`from`), with what reading it
    /// takes.
    pub moved: Vec<MovedVolume>,
}

/// A `from` volume: where its data is and the other host's keys to read it.
#[derive(Clone)]
pub struct MovedVolume {
    /// This host's volume.
    pub volume: String,
    /// The other host's name, volume and bucket settings (key paths filled by render).
    pub source: hostconfig::MoveSource,
    pub encryption_key: String,
    pub signing_pub: String,
    /// `secrets/<this host>/from-<other host>.s3.env`: a read-only key for the other
    /// host's prefix, when the secrets dir has one.
    pub s3_env: Option<String>,
    /// Where that file is (or would be).
    pub s3_env_path: PathBuf,
}

/// Key material never reaches a log through Debug.
impl std::fmt::Debug for MovedVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MovedVolume")
            .field("volume", &self.volume)
            .field("source", &self.source)
            .field("s3_env", &self.s3_env.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Where the image keeps what reading another host's snapshots takes.
pub fn moved_secrets_dir(host: &str) -> String {
    format!("{}/from/{host}", hostconfig::SECRETS_DIR)
}

fn wg_ip(host: &Host) -> Option<String> {
    host.profile
        .wireguard
        .as_ref()
        .and_then(|w| w.address.parse::<ipnet::IpNet>().ok())
        .map(|n| n.addr().to_string())
}

fn load_peer(host: &Host, name: &str, opts_env: &str) -> Result<Host, RenderError> {
    let path = host.dir.join(format!("{name}.toml"));
    let peer_opts = LoadOptions {
        env: Some(opts_env.to_string()),
        overlays: vec![],
    };
    match profile::load(&path, &peer_opts) {
        Ok(h) => Ok(h),
        // A peer without this environment uses its own default; any other error in the
        // peer's profile is reported as it is.
        Err(e)
            if e.0
                .iter()
                .all(|x| x.message.contains("is not defined in this profile")) =>
        {
            profile::load(&path, &LoadOptions::default()).map_err(RenderError::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Loads peers and scrape targets, and creates missing keys (this host's and its peers').
pub fn gather(host: Host, secrets_root: &SecretsRoot) -> Result<RenderInput, RenderError> {
    let mut created = secrets_root.ensure_host(host.name())?.0;
    let mut peers = Vec::new();
    if let Some(wg) = &host.profile.wireguard {
        for p in &wg.peers {
            let peer = load_peer(&host, &p.host, &host.env)?;
            let Some(pwg) = &peer.profile.wireguard else {
                return Err(RenderError::Peer {
                    profile: host.path.clone(),
                    peer: p.host.clone(),
                    what: "its profile has no [wireguard] section".into(),
                });
            };
            // Peer keys are generated here if the peer was never built.
            created.extend(secrets_root.ensure_host(peer.name())?.0);
            let key_path = secrets_root.host_dir(peer.name()).join("wireguard.key");
            let public_key = secrets::wireguard_public(&secrets::parse_wireguard_private(
                &key_path,
                &secrets_root.read_text(&key_path)?,
            )?);
            let addr = wg_ip(&peer).ok_or_else(|| RenderError::Peer {
                profile: host.path.clone(),
                peer: p.host.clone(),
                what: "its wireguard.address does not parse".into(),
            })?;
            let mut allowed = vec![format!(
                "{addr}/{}",
                if addr.contains(':') { 128 } else { 32 }
            )];
            allowed.extend(p.allowed_ips.iter().cloned());
            peers.push(PeerInfo {
                host: peer.name().to_string(),
                public_key,
                address: addr,
                allowed_ips: allowed,
                endpoint: pwg.endpoint.clone(),
                keepalive: p.keepalive,
            });
        }
    }
    let mut scrape = Vec::new();
    if let Some(m) = &host.profile.monitoring {
        for name in &m.scrape {
            let target = load_peer(&host, name, &host.env)?;
            if !peers.iter().any(|p| p.host == target.name()) {
                return Err(RenderError::Peer { profile: host.path.clone(), peer: name.clone(), what: "a scraped host must also be a WireGuard peer (metrics only cross the tunnel)".into() });
            }
            scrape.push((name.clone(), target));
        }
    }
    let mut app_secrets = BTreeMap::new();
    for c in host.profile.containers.values() {
        for secret in c.secret_env.values() {
            if !app_secrets.contains_key(secret) {
                let (v, was_created) = secrets_root.ensure_app_secret(host.name(), secret)?;
                if was_created {
                    created.push(secrets_root.host_dir(host.name()).join("app").join(secret));
                }
                app_secrets.insert(secret.clone(), v);
            }
        }
    }
    let mut moved = Vec::new();
    for (vn, v) in &host.profile.volumes {
        let Some((from_host, from_volume)) = v.from_parts() else {
            continue;
        };
        let err = |what: String| RenderError::Peer {
            profile: host.path.clone(),
            peer: from_host.to_string(),
            what: format!("volumes.{vn}.from: {what}"),
        };
        let other = load_peer(&host, from_host, &host.env)?;
        if other.name() == host.name() {
            return Err(err("that is this host itself".into()));
        }
        let Some(ob) = &other.profile.backup else {
            return Err(err(
                "its profile has no [backup] section: it has no snapshots".into(),
            ));
        };
        match other.profile.volumes.get(from_volume) {
            Some(ov) if ov.backup != BackupStrategy::None => {}
            Some(_) => {
                return Err(err(format!(
                    "its volume {from_volume} has backup = \"none\": no snapshot holds it"
                )))
            }
            None => return Err(err(format!("its profile has no volume {from_volume}"))),
        }
        let dir = secrets_root.host_dir(other.name());
        let key = |f: &str| -> Result<String, RenderError> {
            let path = dir.join(f);
            if !secrets_root.is_file(&path) {
                return Err(err(format!(
                    "{} is missing: reading {}'s snapshots takes its keys (build it once, or copy \
                     its secrets directory here)",
                    path.display(),
                    other.name()
                )));
            }
            Ok(secrets_root.read_text(&path)?)
        };
        let s3_env_path = secrets_root
            .host_dir(host.name())
            .join(format!("from-{}.s3.env", other.name()));
        moved.push(MovedVolume {
            volume: vn.clone(),
            source: hostconfig::MoveSource {
                host: other.name().to_string(),
                volume: from_volume.to_string(),
                bucket: ob.bucket.clone(),
                prefix: ob
                    .prefix
                    .clone()
                    .unwrap_or_else(|| other.name().to_string()),
                endpoint: ob.endpoint.clone(),
                region: ob.region.clone(),
                path_style: ob.path_style.unwrap_or(ob.endpoint.is_some()),
                credentials_file: None,
                encryption_key_file: String::new(),
                signing_key_file: String::new(),
            },
            encryption_key: key("snapshot-encryption.key")?,
            signing_pub: key("snapshot-signing.pub")?,
            s3_env: if secrets_root.is_file(&s3_env_path) {
                Some(secrets_root.read_text(&s3_env_path)?)
            } else {
                None
            },
            s3_env_path,
        });
    }
    let keys = HostSecrets::read(secrets_root, &host)?;
    Ok(RenderInput {
        moved,
        keys,
        secrets_dir: secrets_root.host_dir(host.name()),
        secrets: secrets_root.clone(),
        host,
        peers,
        scrape,
        app_secrets,
        created,
    })
}

fn env() -> Environment<'static> {
    let mut e = Environment::new();
    e.set_keep_trailing_newline(true);
    e.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    macro_rules! t {
        ($($name:literal),*) => {$(
            e.add_template($name, include_str!(concat!("templates/", $name)))
                .expect("templates compiled into the binary parse");
        )*};
    }
    t!(
        "container.j2",
        "volume.j2",
        "network.j2",
        "Caddyfile.j2",
        "nftables.conf.j2",
        "sshd.conf.j2",
        "wg.netdev.j2",
        "wg.network.j2",
        "wg.nmconnection.j2",
        "uplink.network.j2",
        "imgbuild-firstboot.service.j2",
        "imgbuild-backup.service.j2",
        "imgbuild-backup.timer.j2",
        "imgbuild-check.service.j2",
        "imgbuild-check.timer.j2",
        "imgbuild-ready.service.j2",
        "imgbuild-final-snapshot.service.j2",
        "imgbuild-wal.service.j2",
        "tmpfiles.conf.j2",
        "prometheus.yml.j2",
        "alert-rules.yml.j2",
        "alertmanager.yml.j2",
        "grafana-datasource.yml.j2",
        "grafana-dashboards.yml.j2",
        "blackbox.yml.j2"
    );
    e
}

pub(crate) fn render_t(
    e: &Environment,
    name: &str,
    ctx: minijinja::Value,
) -> Result<String, RenderError> {
    e.get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|source| RenderError::Template {
            name: name.into(),
            source,
        })
}

/// systemd/quadlet value quoting: `%` is a specifier, whitespace and quotes need quotes.
pub fn unit_quote(s: &str) -> String {
    let s = s.replace('%', "%%");
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\' || c == ';')
    {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

#[derive(Serialize)]
struct PortRule {
    port: u16,
    why: String,
}

pub const ENV_DIR: &str = "/etc/imgbuild/env";
pub const CONFIG_DIR: &str = "/etc/imgbuild/config";
pub const BAKED_DIR: &str = "/usr/share/imgbuild/images";

/// Destination of a baked OCI archive inside the image.
pub fn baked_path(container: &str) -> String {
    format!("{BAKED_DIR}/{container}.oci.tar")
}

pub fn render(input: &RenderInput, target: Target) -> Result<HostTree, RenderError> {
    let cx = Ctx::new(input, target);
    let mut t = HostTree::new(input.host.name());
    let t = &mut t;
    render_identity(&cx, t)?;
    render_admin(&cx, t)?;
    let wg_addr = render_network(&cx, t)?;
    render_firewall(&cx, t, &wg_addr)?;
    render_podman_objects(&cx, t)?;
    let ready = render_containers(&cx, t, &wg_addr)?;
    render_proxy(&cx, t)?;
    render_podman_services(&cx, t)?;
    render_files(&cx, t)?;
    render_helper_units(&cx, t)?;
    let backup = render_backup(&cx, t)?;
    render_host_config(&cx, t, ready, backup)?;
    Ok(std::mem::replace(t, HostTree::new(input.host.name())))
}

/// What every section of the render reads: the input, the templates, the header line.
struct Ctx<'a> {
    input: &'a RenderInput,
    e: Environment<'static>,
    header: String,
    helper: &'static str,
    target: Target,
}

impl<'a> Ctx<'a> {
    fn new(input: &'a RenderInput, target: Target) -> Ctx<'a> {
        let host = &input.host;
        let header = format!(
            "Generated by imgbuild {} from {} ({}); rebuild the image to change it.",
            env!("CARGO_PKG_VERSION"),
            host.path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            host.env
        );
        Ctx {
            input,
            e: env(),
            header,
            helper: target.helper_path(),
            target,
        }
    }
}

/// Host name and time zone.
fn render_identity(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    let name = cx.input.host.name();
    t.file("/etc/hostname", 0o644, format!("{name}\n"))?;
    t.symlink(
        "/etc/localtime",
        &format!("/usr/share/zoneinfo/{}", p.host.timezone),
    )?;
    Ok(())
}

/// The admin user, sudo, sshd and its host key (stable across rebuilds).
fn render_admin(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let input = cx.input;
    let p = &cx.input.host.profile;
    let e = &cx.e;
    let header = &cx.header;
    let target = cx.target;
    // Admin user and SSH.
    t.users.push(crate::tree::User {
        name: p.admin.user.clone(),
        uid: 1000,
        groups: vec![],
        home: format!("/var/home/{}", p.admin.user),
        shell: "/bin/bash".into(),
        ssh_authorized_keys: p.admin.ssh_keys.clone(),
    });
    let mut keys = p.admin.ssh_keys.join("\n");
    keys.push('\n');
    t.file(
        &format!("/etc/ssh/authorized_keys/{}", p.admin.user),
        0o644,
        keys,
    )?;
    if p.admin.sudo {
        t.file(
            &format!("/etc/sudoers.d/50-imgbuild-{}", p.admin.user),
            0o440,
            format!("{} ALL=(ALL) NOPASSWD: ALL\n", p.admin.user),
        )?;
    }
    t.file(
        "/etc/ssh/sshd_config.d/50-imgbuild.conf",
        0o644,
        render_t(
            e,
            "sshd.conf.j2",
            context! { header, port => p.ssh.port, user => p.admin.user },
        )?,
    )?;
    t.secret_file(
        "/etc/ssh/ssh_host_ed25519_key",
        0o600,
        "root",
        "root",
        input.keys.ssh_host_key.clone(),
    )?;
    t.file(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        0o644,
        input.keys.ssh_host_key_pub.clone(),
    )?;
    t.file(
        "/etc/tmpfiles.d/imgbuild.conf",
        0o644,
        render_t(
            e,
            "tmpfiles.conf.j2",
            context! { header, user => p.admin.user, image => target == Target::Image },
        )?,
    )?;
    if target == Target::Image {
        // podman writes the networks that quadlet .network units create under
        // /etc/containers/networks, which is read-only in the image.
        t.file(
            "/etc/containers/containers.conf.d/50-imgbuild.conf",
            0o644,
            format!(
                "# {header}\n# The root is read-only: podman keeps the networks it creates on /var.\n\
                 [network]\nnetwork_config_dir = \"{PODMAN_NETWORKS}\"\n"
            ),
        )?;
    }
    Ok(())
}

/// The uplink and the WireGuard tunnel; returns this host's tunnel address.
fn render_network(cx: &Ctx, t: &mut HostTree) -> Result<Option<String>, RenderError> {
    let input = cx.input;
    let host = &cx.input.host;
    let p = &cx.input.host.profile;
    let e = &cx.e;
    let header = &cx.header;
    let target = cx.target;
    // Networking.
    t.file(
        "/etc/systemd/network/10-uplink.network",
        0o644,
        render_t(e, "uplink.network.j2", context! { header })?,
    )?;
    t.enable("systemd-networkd.service", "multi-user.target");
    t.enable("systemd-resolved.service", "multi-user.target");
    let wg_addr = wg_ip(host);
    if let Some(wg) = &p.wireguard {
        let key_file = format!("/etc/systemd/network/{}.key", wg.interface);
        let private_key = keys::needed(&input.keys.wireguard_key, "wireguard.key")?;
        t.secret_file(
            &key_file,
            0o600,
            "systemd-network",
            "systemd-network",
            private_key.clone(),
        )?;
        t.file(&format!("/etc/systemd/network/50-{}.netdev", wg.interface), 0o644, render_t(e, "wg.netdev.j2", context! { header, interface => wg.interface, key_file, listen_port => wg.listen_port, peers => input.peers })?)?;
        t.file(
            &format!("/etc/systemd/network/50-{}.network", wg.interface),
            0o644,
            render_t(
                e,
                "wg.network.j2",
                context! { header, interface => wg.interface, address => wg.address },
            )?,
        )?;
        if target == Target::Ignition {
            t.secret_file(
                &format!(
                    "/etc/NetworkManager/system-connections/{}.nmconnection",
                    wg.interface
                ),
                0o600,
                "root",
                "root",
                render_t(
                    e,
                    "wg.nmconnection.j2",
                    context! {
                        header, interface => wg.interface, listen_port => wg.listen_port,
                        private_key => private_key.trim(), peers => input.peers,
                        address => wg.address,
                    },
                )?,
            )?;
        }
    }
    Ok(wg_addr)
}

/// nftables: what the profile opens, and nothing else.
fn render_firewall(
    cx: &Ctx,
    t: &mut HostTree,
    wg_addr: &Option<String>,
) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    let e = &cx.e;
    let header = &cx.header;
    // Firewall: what the profile opens, and nothing else.
    let mut public_tcp = vec![];
    let mut public_udp = vec![];
    let mut wg_tcp = vec![];
    let mut wg_udp = vec![];
    let ssh_rule = PortRule {
        port: p.ssh.port,
        why: "ssh".into(),
    };
    match p.ssh.access {
        SshAccess::Public => public_tcp.push(ssh_rule),
        SshAccess::Wireguard => wg_tcp.push(ssh_rule),
    }
    if let Some(wg) = &p.wireguard {
        public_udp.push(PortRule {
            port: wg.listen_port,
            why: "wireguard".into(),
        });
    }
    for (cname, c) in &p.containers {
        for spec in &c.publish {
            let Ok(pb) = crate::profile::parse_publish(spec) else {
                continue;
            };
            let rule = PortRule {
                port: pb.host_port,
                why: cname.clone(),
            };
            let on_wg = pb
                .ip
                .map(|ip| Some(ip.to_string()) == *wg_addr)
                .unwrap_or(false);
            let local = pb.ip.is_some_and(|ip| ip.is_loopback());
            match (local, on_wg, pb.proto) {
                (true, _, _) => {}
                (_, true, "tcp") => wg_tcp.push(rule),
                (_, true, _) => wg_udp.push(rule),
                (_, false, "tcp") => public_tcp.push(rule),
                _ => public_udp.push(rule),
            }
        }
    }
    for (list, ports, why) in [
        (&mut public_tcp, &p.firewall.allow_tcp, "firewall.allow_tcp"),
        (&mut public_udp, &p.firewall.allow_udp, "firewall.allow_udp"),
        (
            &mut wg_tcp,
            &p.firewall.wireguard_tcp,
            "firewall.wireguard_tcp",
        ),
        (
            &mut wg_udp,
            &p.firewall.wireguard_udp,
            "firewall.wireguard_udp",
        ),
    ] {
        list.extend(ports.iter().map(|&port| PortRule {
            port,
            why: why.into(),
        }));
    }
    for l in [&mut public_tcp, &mut public_udp, &mut wg_tcp, &mut wg_udp] {
        l.sort_by_key(|r| r.port);
    }
    let wg_interface = p.wireguard.as_ref().map(|w| w.interface.clone());
    t.file(
        "/etc/nftables.conf",
        0o755,
        render_t(
            e,
            "nftables.conf.j2",
            context! { header, public_tcp, public_udp, wg_tcp, wg_udp, wg_interface },
        )?,
    )?;
    t.enable("nftables.service", "sysinit.target");
    Ok(())
}

/// Quadlet networks and volumes.
fn render_podman_objects(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    let name = cx.input.host.name();
    let e = &cx.e;
    let header = &cx.header;
    // Podman: networks, volumes, containers.
    for (n, net) in &p.networks {
        t.file(
            &format!("{QUADLET_DIR}/{n}.network"),
            0o644,
            render_t(
                e,
                "network.j2",
                context! { header, name => n, host => name, internal => net.internal },
            )?,
        )?;
    }
    for (v, vol) in &p.volumes {
        let backup = match vol.backup {
            BackupStrategy::Stop => "stop",
            BackupStrategy::Hook => "hook",
            BackupStrategy::Live => "live",
            BackupStrategy::None => "none",
        };
        t.file(
            &format!("{QUADLET_DIR}/{v}.volume"),
            0o644,
            render_t(
                e,
                "volume.j2",
                context! { header, name => v, host => name, backup },
            )?,
        )?;
        if vol.postgres.is_some() {
            // Finished WAL files wait here for imgbuild-wal.service; never in a
            // snapshot (they are in the bucket already, or about to be).
            let spool = hostconfig::wal_spool_volume(v);
            t.file(
                &format!("{QUADLET_DIR}/{spool}.volume"),
                0o644,
                render_t(
                    e,
                    "volume.j2",
                    context! { header, name => spool, host => name, backup => "none" },
                )?,
            )?;
        }
    }
    Ok(())
}

/// One quadlet per container (with the monitoring and proxy mounts); returns the units readiness waits for.
fn render_containers(
    cx: &Ctx,
    t: &mut HostTree,
    wg_addr: &Option<String>,
) -> Result<BTreeSet<String>, RenderError> {
    let input = cx.input;
    let p = &cx.input.host.profile;
    let e = &cx.e;
    let header = &cx.header;
    let monitoring_mounts = monitoring::render(e, header, input, t)?;
    let mut ready = BTreeSet::new();
    for (cname, c) in &p.containers {
        let mut c = c.clone();
        if let Some(px) = &p.proxy {
            if &px.container == cname {
                c.volumes.push(format!(
                    "{CONFIG_DIR}/caddy/Caddyfile:/etc/caddy/Caddyfile:ro"
                ));
            }
        }
        if let Some(extra) = monitoring_mounts.get(cname) {
            c.volumes.extend(extra.iter().cloned());
        }
        // PostgreSQL on a volume that ships WAL: the archiver copies into the spool,
        // and the helper writes the archive settings before every start.
        let mut pre = Vec::new();
        if p.backup.is_some() {
            for (vn, v) in &p.volumes {
                if v.postgres.as_ref().is_some_and(|pg| &pg.container == cname) {
                    c.volumes.push(format!(
                        "{}:{}",
                        hostconfig::wal_spool_volume(vn),
                        hostconfig::WAL_SPOOL_MOUNT
                    ));
                    pre.push(format!("{} postgres-prepare {vn}", cx.helper));
                }
            }
        }
        render_container(e, header, input, cname, &c, &pre, wg_addr.as_deref(), t)?;
        ready.insert(format!("{cname}.service"));
    }
    Ok(ready)
}

/// The reverse proxy's config, one site per app domain.
fn render_proxy(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    let e = &cx.e;
    let header = &cx.header;
    if let Some(px) = &p.proxy {
        #[derive(Serialize)]
        struct Site<'a> {
            domain: &'a str,
            container: &'a str,
            port: u16,
        }
        let sites: Vec<Site> = p
            .containers
            .iter()
            .filter_map(|(n, c)| {
                Some(Site {
                    domain: c.domain.as_deref()?,
                    container: n,
                    port: c.port?,
                })
            })
            .collect();
        t.file(
            &format!("{CONFIG_DIR}/caddy/Caddyfile"),
            0o644,
            render_t(
                e,
                "Caddyfile.j2",
                context! { header, email => px.email, acme_staging => px.acme_staging, sites },
            )?,
        )?;
    }
    Ok(())
}

/// podman-auto-update and the podman API socket, when containers use them.
fn render_podman_services(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    if p.containers.values().any(|c| c.auto_update) {
        t.enable("podman-auto-update.timer", "timers.target");
    }
    // A container that talks to podman's API (the podman exporter's per-container
    // metrics) needs the socket, which podman ships disabled.
    if p.containers.values().any(|c| {
        c.volumes
            .iter()
            .any(|v| v.starts_with("/run/podman/podman.sock:"))
    }) {
        t.enable("podman.socket", "sockets.target");
    }
    Ok(())
}

/// Extra files from the profile; a clash with a generated file is an error (TreeError).
fn render_files(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    // Extra files from the profile; a clash with a generated file is an error (TreeError).
    for (path, f) in &p.files {
        let mode = u32::from_str_radix(f.mode.trim_start_matches("0o"), 8).unwrap_or(0o644);
        if f.secret {
            // `mode` defaults to 0644; a secret keeps the owner and group bits asked for
            // but is never open to other users.
            t.secret_file(path, mode & !0o007, "root", "root", f.content.clone())?;
        } else {
            t.file(path, mode, f.content.clone())?;
        }
    }
    Ok(())
}

/// The in-image helper's first-boot and readiness units.
fn render_helper_units(cx: &Ctx, t: &mut HostTree) -> Result<(), RenderError> {
    let p = &cx.input.host.profile;
    let e = &cx.e;
    let header = &cx.header;
    let helper = cx.helper;
    // The in-image helper: first-boot restore, backups, readiness.
    t.file(
        &format!("{SYSTEMD_UNIT_DIR}/imgbuild-firstboot.service"),
        0o644,
        render_t(
            e,
            "imgbuild-firstboot.service.j2",
            context! { header, helper, done_marker => hostconfig::FIRSTBOOT_DONE },
        )?,
    )?;
    t.enable("imgbuild-firstboot.service", "multi-user.target");
    t.file(
        &format!("{SYSTEMD_UNIT_DIR}/imgbuild-ready.service"),
        0o644,
        render_t(
            e,
            "imgbuild-ready.service.j2",
            context! { header, helper, ready_timeout => p.host.ready_timeout },
        )?,
    )?;
    t.enable("imgbuild-ready.service", "multi-user.target");
    Ok(())
}

/// The backup and check timers, the snapshot keys and credentials, and the backup half of host.toml.
fn render_backup(cx: &Ctx, t: &mut HostTree) -> Result<Option<BackupConfig>, RenderError> {
    let keys = &cx.input.keys;
    let (e, header, helper) = (&cx.e, &cx.header, cx.helper);
    let Some(b) = &cx.input.host.profile.backup else {
        return Ok(None);
    };
    t.file(
        &format!("{SYSTEMD_UNIT_DIR}/imgbuild-backup.service"),
        0o644,
        render_t(e, "imgbuild-backup.service.j2", context! { header, helper })?,
    )?;
    t.file(
        &format!("{SYSTEMD_UNIT_DIR}/imgbuild-backup.timer"),
        0o644,
        render_t(
            e,
            "imgbuild-backup.timer.j2",
            context! { header, schedule => b.schedule, jitter => b.jitter },
        )?,
    )?;
    t.enable("imgbuild-backup.timer", "timers.target");
    t.file(
        &format!("{SYSTEMD_UNIT_DIR}/imgbuild-check.service"),
        0o644,
        render_t(e, "imgbuild-check.service.j2", context! { header, helper })?,
    )?;
    t.file(
        &format!("{SYSTEMD_UNIT_DIR}/imgbuild-check.timer"),
        0o644,
        render_t(
            e,
            "imgbuild-check.timer.j2",
            context! { header, schedule => b.check_schedule },
        )?,
    )?;
    t.enable("imgbuild-check.timer", "timers.target");
    if b.final_snapshot != FinalSnapshot::Off {
        // Stopped after everything it is ordered before: every container and the
        // periodic jobs are down when its ExecStop runs, and it is stopped before the
        // network and the volumes' mount.
        let before: Vec<String> = cx
            .input
            .host
            .profile
            .containers
            .keys()
            .map(|c| format!("{c}.service"))
            .chain([
                "imgbuild-backup.service".into(),
                "imgbuild-check.service".into(),
            ])
            .collect();
        t.file(
            &format!("{SYSTEMD_UNIT_DIR}/imgbuild-final-snapshot.service"),
            0o644,
            render_t(
                e,
                "imgbuild-final-snapshot.service.j2",
                context! {
                    header, helper, before,
                    timeout => b.final_snapshot_timeout,
                    // The helper gives up on its own first, so the console says why.
                    stop_timeout => b.final_snapshot_timeout + 60,
                },
            )?,
        )?;
        t.enable("imgbuild-final-snapshot.service", "multi-user.target");
    }
    let pg: Vec<String> = cx
        .input
        .host
        .profile
        .volumes
        .values()
        .filter_map(|v| {
            v.postgres
                .as_ref()
                .map(|pg| format!("{}.service", pg.container))
        })
        .collect();
    if !pg.is_empty() {
        t.file(
            &format!("{SYSTEMD_UNIT_DIR}/imgbuild-wal.service"),
            0o644,
            render_t(
                e,
                "imgbuild-wal.service.j2",
                context! { header, helper, before => pg },
            )?,
        )?;
        t.enable("imgbuild-wal.service", "multi-user.target");
    }
    let sdir = hostconfig::SECRETS_DIR;
    let enc = keys::needed(&keys.snapshot_encryption_key, "snapshot-encryption.key")?;
    t.secret_file(
        &format!("{sdir}/snapshot-encryption.key"),
        0o600,
        "root",
        "root",
        enc,
    )?;
    let sig = keys::needed(&keys.snapshot_signing_key, "snapshot-signing.key")?;
    t.secret_file(
        &format!("{sdir}/snapshot-signing.key"),
        0o600,
        "root",
        "root",
        sig,
    )?;
    let public = keys::needed(&keys.snapshot_signing_pub, "snapshot-signing.pub")?;
    t.file(&format!("{sdir}/snapshot-signing.pub"), 0o644, public)?;
    let credentials_file = match &keys.s3_env {
        Some(text) => {
            let path = format!("{sdir}/s3.env");
            t.secret_file(&path, 0o600, "root", "root", text.clone())?;
            Some(path)
        }
        None => None,
    };
    let mut moved = BTreeMap::new();
    for m in &cx.input.moved {
        let dir = moved_secrets_dir(&m.source.host);
        let mut src = m.source.clone();
        src.encryption_key_file = format!("{dir}/snapshot-encryption.key");
        src.signing_key_file = format!("{dir}/snapshot-signing.key");
        t.secret_file(
            &src.encryption_key_file,
            0o600,
            "root",
            "root",
            m.encryption_key.clone(),
        )?;
        t.file(
            &format!("{dir}/snapshot-signing.pub"),
            0o644,
            m.signing_pub.clone(),
        )?;
        if let Some(text) = &m.s3_env {
            let path = format!("{dir}/s3.env");
            t.secret_file(&path, 0o600, "root", "root", text.clone())?;
            src.credentials_file = Some(path);
        }
        moved.insert(m.volume.clone(), src);
    }
    Ok(Some(backup_config(
        &cx.input.host,
        b,
        credentials_file,
        &moved,
    )))
}

/// host.toml's [backup]: the profile's section with defaults applied, and each volume's
/// strategy with the units that mount it.
fn backup_config(
    host: &Host,
    b: &crate::profile::Backup,
    credentials_file: Option<String>,
    moved: &BTreeMap<String, hostconfig::MoveSource>,
) -> BackupConfig {
    let p = &host.profile;
    let sdir = hostconfig::SECRETS_DIR;
    let volumes = p
        .volumes
        .iter()
        .filter(|(_, v)| v.backup != BackupStrategy::None)
        .map(|(vn, v)| VolumeBackup {
            name: vn.clone(),
            strategy: match v.backup {
                BackupStrategy::Stop => Strategy::Stop,
                BackupStrategy::Hook => Strategy::Hook,
                _ => Strategy::Live,
            },
            hook: v.hook.clone(),
            units: p
                .containers
                .iter()
                .filter(|(_, c)| {
                    c.volumes
                        .iter()
                        .any(|s| s.split(':').next() == Some(vn.as_str()))
                })
                .map(|(cn, _)| format!("{cn}.service"))
                .collect(),
            from: moved.get(vn).cloned(),
            postgres: v.postgres.as_ref().map(|pg| hostconfig::PostgresWal {
                container: pg.container.clone(),
                data: pg.data.clone(),
                spool_volume: hostconfig::wal_spool_volume(vn),
                archive_timeout_secs: b.archive_timeout.clamp(10, 3600) as u32,
                rpo_secs: b.wal_rpo_seconds.clamp(10, 86_400) as u32,
            }),
        })
        .collect();
    BackupConfig {
        bucket: b.bucket.clone(),
        prefix: b.prefix.clone().unwrap_or_else(|| host.name().to_string()),
        endpoint: b.endpoint.clone(),
        region: b.region.clone(),
        path_style: b.path_style.unwrap_or(b.endpoint.is_some()),
        schedule: b.schedule.clone(),
        keep: Retention {
            last: b.keep.last,
            daily: b.keep.daily,
            weekly: b.keep.weekly,
            monthly: b.keep.monthly,
        },
        object_lock_days: b.object_lock_days,
        accept_unlocked_bucket: b.accept_unlocked_bucket,
        ping_url: b.ping_url.clone(),
        restore: match b.restore {
            RestoreMode::Require => RestorePolicy::Require,
            RestoreMode::AllowEmpty => RestorePolicy::AllowEmpty,
            RestoreMode::Skip => RestorePolicy::Skip,
        },
        restore_timeout_secs: b.restore_timeout,
        volumes,
        credentials_file,
        encryption_key_file: format!("{sdir}/snapshot-encryption.key"),
        signing_key_file: format!("{sdir}/snapshot-signing.key"),
        // Validation has bounded both (4..=128, 1..=99); the fallbacks are unreachable.
        packs: PackSettings {
            size_mib: u32::try_from(b.pack_size_mib).unwrap_or(hostconfig::DEFAULT_PACK_SIZE_MIB),
            repack_garbage_percent: u8::try_from(b.repack_garbage_percent)
                .unwrap_or(hostconfig::DEFAULT_REPACK_GARBAGE_PERCENT),
        },
        check: CheckSettings {
            schedule: b.check_schedule.clone(),
            read_data: b.check_read_data.clone(),
        },
        final_snapshot: FinalSnapshotSettings {
            when: match b.final_snapshot {
                FinalSnapshot::Poweroff => FinalSnapshotWhen::Poweroff,
                FinalSnapshot::Always => FinalSnapshotWhen::Always,
                FinalSnapshot::Off => FinalSnapshotWhen::Off,
            },
            // Validation bounded it to 30..=3600.
            timeout_secs: u32::try_from(b.final_snapshot_timeout)
                .unwrap_or(hostconfig::DEFAULT_FINAL_SNAPSHOT_TIMEOUT),
        },
    }
}

/// /etc/imgbuild/host.toml: what the in-image helper reads.
fn render_host_config(
    cx: &Ctx,
    t: &mut HostTree,
    mut ready: BTreeSet<String>,
    backup: Option<BackupConfig>,
) -> Result<(), RenderError> {
    let host = &cx.input.host;
    let name = cx.input.host.name();
    let header = &cx.header;
    ready.insert("imgbuild-firstboot.service".into());
    ready.insert("systemd-networkd.service".into());
    ready.insert("nftables.service".into());
    t.ready_units = ready.clone();
    let hc = HostConfig {
        host: name.to_string(),
        env: host.env.clone(),
        units: ready.into_iter().collect(),
        backup,
        metrics_dir: format!("{}/metrics", hostconfig::STATE_DIR),
    };
    let hc_text = toml::to_string(&hc).map_err(|err| RenderError::Template {
        name: "host.toml".into(),
        source: minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, err.to_string()),
    })?;
    // Root only: the ping URL's token lets anyone report "backup ok", and the hook
    // commands may carry credentials. Only the helper (as root) reads it.
    t.file(
        hostconfig::HOST_CONFIG_PATH,
        0o600,
        format!("# {header}\n{hc_text}"),
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn render_container(
    e: &Environment,
    header: &str,
    input: &RenderInput,
    cname: &str,
    c: &Container,
    exec_start_pre: &[String],
    wg_addr: Option<&str>,
    t: &mut HostTree,
) -> Result<(), RenderError> {
    let p = &input.host.profile;
    let volumes: Vec<String> = c
        .volumes
        .iter()
        .map(|v| {
            let mut parts = v.splitn(2, ':');
            let src = parts.next().unwrap_or_default();
            let rest = parts.next().unwrap_or_default();
            // Named volumes go through their .volume unit so quadlet orders them first.
            if src.starts_with('/') {
                v.clone()
            } else {
                format!("{src}.volume:{rest}")
            }
        })
        .collect();
    let env: Vec<String> = c
        .env
        .iter()
        .map(|(k, v)| unit_quote(&format!("{k}={v}")))
        .collect();
    let env_file = if c.secret_env.is_empty() {
        None
    } else {
        let path = format!("{ENV_DIR}/{cname}.env");
        let mut body = String::new();
        for (k, secret) in &c.secret_env {
            let v = input.app_secrets.get(secret).cloned().unwrap_or_default();
            body.push_str(&format!("{k}={v}\n"));
        }
        t.secret_file(&path, 0o600, "root", "root", body)?;
        Some(path)
    };
    let image = if c.bake.is_some() {
        format!("oci-archive:{}", baked_path(cname))
    } else {
        c.image.clone()
    };
    let wg_bound = wg_addr.is_some_and(|a| {
        c.publish.iter().any(|s| s.starts_with(&format!("{a}:")))
            || (c.host_network && c.command.iter().any(|x| x.contains(a)))
    });
    #[derive(Serialize)]
    struct HealthCtx {
        cmd: String,
        interval: String,
        retries: u32,
        start_period: String,
    }
    let health = c.health.as_ref().map(|h| HealthCtx {
        cmd: unit_quote(&h.cmd),
        interval: h.interval.clone(),
        retries: h.retries,
        start_period: h.start_period.clone(),
    });
    let exec = if c.command.is_empty() {
        None
    } else {
        Some(
            c.command
                .iter()
                .map(|a| unit_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
        )
    };
    let body = render_t(
        e,
        "container.j2",
        context! {
            header, name => cname, image, host => p.host.name, auto_update => c.auto_update,
            host_network => c.host_network, networks => c.networks, publish => c.publish, volumes, env, env_file,
            user => c.user, read_only => c.read_only, health, exec, after => c.after, wg_bound, exec_start_pre,
            wg_interface => p.wireguard.as_ref().map(|w| w.interface.clone()),
        },
    )?;
    t.file(&format!("{QUADLET_DIR}/{cname}.container"), 0o644, body)?;
    Ok(())
}

/// Resolves a profile argument, loads it, gathers keys and peers: the common front of
/// every verb that takes a profile.
pub fn prepare(
    profile_arg: &str,
    opts: &LoadOptions,
    secrets: Option<&Path>,
    unlock: &secrets::Unlock,
) -> anyhow::Result<(RenderInput, SecretsRoot)> {
    use anyhow::Context;
    let cwd = std::env::current_dir().context("current directory")?;
    let path = profile::resolve(profile_arg, &cwd).ok_or_else(|| anyhow::anyhow!("no profile `{profile_arg}`: looked for profiles/{profile_arg}.toml and {profile_arg}.toml (or give a path to a .toml file)"))?;
    let host = profile::load(&path, opts)?;
    let dir = match secrets {
        Some(s) => s.to_path_buf(),
        None => SecretsRoot::default_for(&host.dir).root,
    };
    let root = SecretsRoot::open(dir, unlock)?;
    let input = gather(host, &root)?;
    Ok((input, root))
}
