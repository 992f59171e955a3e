//! Semantic checks the types cannot express. Reports every problem found, each at
//! the key that causes it.

use super::model::*;
use super::source::{Seg, SourceMap};
use super::systemd_time;
use super::{locate_error, ProfileError};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

struct Ctx<'a> {
    map: &'a SourceMap,
    errors: Vec<ProfileError>,
    /// Host ports by protocol and who took them first: SSH, WireGuard, firewall lists
    /// and published ports must not collide.
    taken: BTreeMap<(&'static str, u16), String>,
}

impl Ctx<'_> {
    fn err(&mut self, path: &[Seg], msg: impl Into<String>, hint: impl Into<Option<String>>) {
        self.errors
            .push(locate_error(self.map, path, msg, hint.into()));
    }

    fn claim(&mut self, proto: &'static str, port: u16, who: String, at: &[Seg]) {
        if port == 0 {
            self.err(at, "port 0 is not a port", "1-65535".to_string());
            return;
        }
        if let Some(prev) = self.taken.get(&(proto, port)) {
            let prev = prev.clone();
            self.err(
                at,
                format!("host port {port}/{proto} is already used by {prev}"),
                "each host port can be published once per protocol".to_string(),
            );
        } else {
            self.taken.insert((proto, port), who);
        }
    }
}

fn k(s: &str) -> Seg {
    Seg::Key(s.to_string())
}

/// Usable as a systemd unit name stem and a podman object name.
pub fn is_unit_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.contains("..")
        && !name.ends_with('.')
}

fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_domain(d: &str) -> bool {
    d.len() <= 253
        && d.contains('.')
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn no_control(s: &str) -> bool {
    !s.chars().any(|c| c.is_control())
}

/// A published port: `[IP:]HOST:CONTAINER[/tcp|udp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: &'static str,
}

pub fn parse_publish(s: &str) -> Result<Publish, String> {
    let (spec, proto) = match s.rsplit_once('/') {
        Some((spec, "tcp")) => (spec, "tcp"),
        Some((spec, "udp")) => (spec, "udp"),
        Some((_, p)) => return Err(format!("unknown protocol `{p}` (tcp or udp)")),
        None => (s, "tcp"),
    };
    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    let (ip, host, cont) = match parts.as_slice() {
        [c, h] => (None, *h, *c),
        [c, h, ip] => {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("`{ip}` is not an IP address"))?;
            (Some(ip), *h, *c)
        }
        _ => return Err("expected [IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]".into()),
    };
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(format!("`{p}` is not a port number 1-65535")),
        }
    };
    Ok(Publish {
        ip,
        host_port: port(host)?,
        container_port: port(cont)?,
        proto,
    })
}

/// The first host port a container publishes for TCP on every address (what a drill
/// forwards to check it); loopback- or WireGuard-bound ports are not public.
pub fn public_tcp_port(c: &Container) -> Option<u16> {
    c.publish
        .iter()
        .filter_map(|s| parse_publish(s).ok())
        .find(|p| p.proto == "tcp" && p.ip.is_none_or(|ip| ip.is_unspecified()))
        .map(|p| p.host_port)
}

/// A container image reference pinned by tag or digest, with an explicit registry.
pub fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() || !no_control(image) || image.contains(' ') {
        return Err("image reference is empty or has spaces/control characters".into());
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let first = name.split('/').next().unwrap_or("");
    if !name.contains('/') || !(first.contains('.') || first.contains(':') || first == "localhost")
    {
        return Err(format!(
            "`{image}` has no registry: podman's short-name resolution would pick one"
        ));
    }
    let last = name.rsplit('/').next().unwrap_or("");
    let tag = last.split_once(':').map(|(_, t)| t);
    if let Some(d) = digest {
        let ok = d
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()));
        if !ok {
            return Err(format!("`{d}` is not a sha256 digest"));
        }
    } else {
        match tag {
            None => return Err(format!("`{image}` is not pinned: no tag or digest")),
            Some("latest") => return Err(format!("`{image}` uses `latest`, which is not a pin")),
            Some(t)
                if t.is_empty()
                    || t.len() > 128
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
            {
                return Err(format!("`{t}` is not a valid tag"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A Go `time.ParseDuration` string (podman reads `HealthInterval=` and
/// `HealthStartPeriod=` with it): `[-+]?([0-9]*(\.[0-9]*)?(ns|us|µs|μs|ms|s|m|h))+` or
/// `0`, no spaces, within ±2^63 ns. Returns nanoseconds.
pub fn parse_go_duration(orig: &str) -> Result<i128, String> {
    let invalid = || format!("`{}` is not a duration", orig.escape_debug());
    if orig.contains(char::is_whitespace) {
        return Err(format!(
            "`{}` has a space: Go durations are written without (\"2m30s\")",
            orig.escape_debug()
        ));
    }
    let mut s = orig;
    let mut neg = false;
    if let Some(rest) = s.strip_prefix('-') {
        neg = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    const LIMIT: u128 = 1 << 63;
    let mut total: u128 = 0;
    while !s.is_empty() {
        if !s.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return Err(invalid());
        }
        let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let mut v: u128 = 0;
        for b in s[..int_len].bytes() {
            v = v * 10 + u128::from(b - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
        }
        s = &s[int_len..];
        // Fraction digits as numerator/denominator; Go drops digits past overflow.
        let (mut num, mut den) = (0u128, 1u128);
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            for b in rest[..frac_len].bytes() {
                if den < LIMIT {
                    num = num * 10 + u128::from(b - b'0');
                    den *= 10;
                }
            }
            s = &rest[frac_len..];
            if int_len == 0 && frac_len == 0 {
                return Err(invalid());
            }
        } else if int_len == 0 {
            return Err(invalid());
        }
        let unit_len = s
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_len == 0 {
            return Err(format!(
                "`{}` has a number without a unit",
                orig.escape_debug()
            ));
        }
        let unit: u128 = match &s[..unit_len] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            u => {
                return Err(format!(
                    "unknown unit `{}` in `{}`",
                    u.escape_debug(),
                    orig.escape_debug()
                ))
            }
        };
        s = &s[unit_len..];
        v = v
            .checked_mul(unit)
            .filter(|v| *v <= LIMIT)
            .ok_or_else(invalid)?;
        v += num * unit / den;
        total += v;
        if v > LIMIT || total > LIMIT {
            return Err(invalid());
        }
    }
    if !neg && total > LIMIT - 1 {
        return Err(invalid());
    }
    Ok(if neg { -(total as i128) } else { total as i128 })
}

/// A host as a client program resolves it: an IPv4 address or a DNS name (one label
/// allowed: `minio` on a container network). IPv6 goes in brackets, see `split_host_port`.
fn is_host(h: &str) -> bool {
    if h.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let labels_ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    // An all-digit last label is a mistyped address (`10.0.0.256`), not a name.
    labels_ok
        && !h
            .rsplit('.')
            .next()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
}

/// `host:port` or `[v6]:port` with a port 1-65535 (WireGuard `Endpoint=`, Alertmanager
/// `smarthost`).
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:")?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        (v6, port)
    } else {
        let (h, port) = s.rsplit_once(':')?;
        if !is_host(h) {
            return None;
        }
        (h, port)
    };
    if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    Some((host, port))
}

/// An absolute http(s) URL with a host, as the S3 client, curl and Alertmanager's
/// config loader require, and safe inside the double-quoted YAML it is rendered into.
fn check_http_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| format!("`{}` is not an http(s) URL", u.escape_debug()))?;
    if let Some(c) = u
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '<' | '>'))
    {
        return Err(format!(
            "URL `{}` contains {:?}, which must be percent-encoded",
            u.escape_debug(),
            c
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let ok = if hostport.starts_with('[') {
        split_host_port(hostport).is_some()
            || hostport
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        match hostport.rsplit_once(':') {
            Some(_) => split_host_port(hostport).is_some(),
            None => is_host(hostport),
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "URL `{}` has no valid host[:port]",
            u.escape_debug()
        ))
    }
}

/// One plain e-mail address, `local@domain`: what Caddy's `email` directive (unquoted
/// in the Caddyfile) and Alertmanager's `to`/`from` accept without quoting.
fn is_email(e: &str) -> bool {
    e.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && local.len() <= 64
            && local
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && is_domain(domain)
    })
}

/// An OpenSSH public key line whose base64 blob decodes and names the same key type
/// (sshd silently skips a line that does not, and nobody can log in).
fn check_ssh_key(key: &str) -> Result<(), &'static str> {
    use base64::Engine;
    let mut parts = key.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    let known = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !known.contains(&kind) || blob.len() < 16 || !no_control(key) {
        return Err("not an OpenSSH public key line");
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "the key's base64 part does not decode (truncated or mangled when pasted?)")?;
    let inner = data
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| data.get(4..4 + n));
    if inner != Some(kind.as_bytes()) {
        return Err("the key's base64 part is not a key of the type it starts with");
    }
    Ok(())
}

pub fn validate(p: &Profile, env: &str, path: &Path, map: &SourceMap) -> Vec<ProfileError> {
    let mut c = Ctx {
        map,
        errors: vec![],
        taken: BTreeMap::new(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    check_host(&mut c, p, env);
    check_admin(&mut c, p);
    check_ssh(&mut c, p);
    let wg_addr = check_wireguard(&mut c, p, path, dir);
    check_firewall(&mut c, p);
    check_networks(&mut c, p);
    check_volumes(&mut c, p);
    let mut domains = BTreeMap::new();
    for (name, ct) in &p.containers {
        check_container(&mut c, p, wg_addr, &mut domains, name, ct);
    }
    check_dependency_cycles(&mut c, p);
    check_proxy(&mut c, p);
    check_backup(&mut c, p);
    check_files(&mut c, p);
    check_monitoring(&mut c, p, dir);
    c.errors
}

fn check_host(c: &mut Ctx, p: &Profile, env: &str) {
    if !is_hostname(&p.host.name) {
        c.err(
            &[k("host"), k("name")],
            format!("`{}` is not a valid host name", p.host.name.escape_debug()),
            "use lowercase letters, digits and '-', at most 63 characters".to_string(),
        );
    }
    if !is_unit_safe(env) {
        c.err(
            &[k("host"), k("default_env")],
            format!(
                "environment name `{}` is not a safe name",
                env.escape_debug()
            ),
            None,
        );
    }
    if !systemd_time::timezone_is_valid(&p.host.timezone) {
        c.err(
            &[k("host"), k("timezone")],
            format!(
                "`{}` is not a time zone of the tz database: /etc/localtime would point nowhere and the host would run on UTC",
                p.host.timezone.escape_debug()
            ),
            tz_hint(&p.host.timezone),
        );
    }
    if !is_unit_safe(&p.host.base) {
        c.err(
            &[k("host"), k("base")],
            "not a base definition name",
            "a file name in images/ without .toml".to_string(),
        );
    }
}

/// Points at the listed name that differs only in case, if there is one.
fn tz_hint(tz: &str) -> String {
    match systemd_time::tz_names().find(|n| n.eq_ignore_ascii_case(tz)) {
        Some(n) => format!("did you mean \"{n}\"?"),
        None => "a name `timedatectl list-timezones` prints, e.g. \"Europe/Paris\" or \"UTC\""
            .to_string(),
    }
}

fn check_admin(c: &mut Ctx, p: &Profile) {
    let user = &p.admin.user;
    let user_ok = !user.is_empty()
        && user.len() <= 32
        && user != "root"
        && user
            .chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_lowercase() || ch == '_')
        && user
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-');
    if !user_ok {
        c.err(
            &[k("admin"), k("user")],
            format!("`{}` is not a usable user name", user.escape_debug()),
            "lowercase letters, digits, '-' and '_'; not root".to_string(),
        );
    }
    if p.admin.ssh_keys.is_empty() {
        c.err(
            &[k("admin"), k("ssh_keys")],
            "no SSH key: nobody could log in",
            "paste your public key, e.g. the line in ~/.ssh/id_ed25519.pub".to_string(),
        );
    }
    for (i, key) in p.admin.ssh_keys.iter().enumerate() {
        if let Err(e) = check_ssh_key(key) {
            c.err(
                &[k("admin"), k("ssh_keys"), Seg::Index(i)],
                e,
                "the one-line `ssh-ed25519 AAAA... comment` format, copied whole from the .pub file"
                    .to_string(),
            );
        }
    }
}

fn check_ssh(c: &mut Ctx, p: &Profile) {
    if p.ssh.port == 0 {
        c.err(
            &[k("ssh"), k("port")],
            "port 0 is not a port",
            "1-65535".to_string(),
        );
    }
    if p.ssh.access == SshAccess::Wireguard && p.wireguard.is_none() {
        c.err(
            &[k("ssh"), k("access")],
            "SSH over WireGuard only, but the host has no [wireguard] section",
            "add [wireguard] or set access = \"public\"".to_string(),
        );
    }

    c.claim("tcp", p.ssh.port, "ssh.port".into(), &[k("ssh"), k("port")]);
}

/// The tunnel; returns this host's address on it (published ports may bind it).
fn check_wireguard(c: &mut Ctx, p: &Profile, path: &Path, dir: &Path) -> Option<IpAddr> {
    let mut wg_addr: Option<IpAddr> = None;
    if let Some(wg) = &p.wireguard {
        if !is_unit_safe(&wg.interface) || wg.interface.len() > 15 {
            c.err(
                &[k("wireguard"), k("interface")],
                "not a usable interface name",
                "at most 15 characters, e.g. wg0".to_string(),
            );
        }
        match wg.address.parse::<ipnet::IpNet>() {
            Ok(n) => wg_addr = Some(n.addr()),
            Err(_) => c.err(
                &[k("wireguard"), k("address")],
                format!(
                    "`{}` is not an address with prefix length",
                    wg.address.escape_debug()
                ),
                "e.g. \"10.8.0.1/24\"".to_string(),
            ),
        }
        c.claim(
            "udp",
            wg.listen_port,
            "wireguard.listen_port".into(),
            &[k("wireguard"), k("listen_port")],
        );
        if let Some(ep) = &wg.endpoint {
            if split_host_port(ep).is_none() {
                c.err(
                    &[k("wireguard"), k("endpoint")],
                    format!("`{}` is not host:port", ep.escape_debug()),
                    "a DNS name or IPv4 address and a port 1-65535, e.g. \"vps1.example.org:51820\"; IPv6 in brackets: \"[2001:db8::1]:51820\"".to_string(),
                );
            }
        }
        let mut seen = BTreeSet::new();
        for (i, peer) in wg.peers.iter().enumerate() {
            let at = [k("wireguard"), k("peers"), Seg::Index(i), k("host")];
            if !is_hostname(&peer.host) {
                c.err(&at, "not a profile name", None);
            } else if peer.host == p.host.name || dir.join(format!("{}.toml", peer.host)) == path {
                c.err(&at, "a host cannot be its own peer", None);
            } else if !dir.join(format!("{}.toml", peer.host)).is_file() {
                c.err(
                    &at,
                    format!("no profile `{}` next to this one", peer.host),
                    format!(
                        "peers name another profile: create {}.toml in {}",
                        peer.host,
                        dir.display()
                    ),
                );
            }
            if !seen.insert(peer.host.clone()) {
                c.err(&at, format!("peer `{}` listed twice", peer.host), None);
            }
            for (j, a) in peer.allowed_ips.iter().enumerate() {
                if a.parse::<ipnet::IpNet>().is_err() {
                    c.err(
                        &[
                            k("wireguard"),
                            k("peers"),
                            Seg::Index(i),
                            k("allowed_ips"),
                            Seg::Index(j),
                        ],
                        format!("`{}` is not a CIDR", a.escape_debug()),
                        "e.g. \"10.8.0.0/24\"".to_string(),
                    );
                }
            }
        }
    }
    wg_addr
}

fn check_firewall(c: &mut Ctx, p: &Profile) {
    for (field, proto, wg_only) in [
        ("allow_tcp", "tcp", false),
        ("allow_udp", "udp", false),
        ("wireguard_tcp", "tcp", true),
        ("wireguard_udp", "udp", true),
    ] {
        let list = match field {
            "allow_tcp" => &p.firewall.allow_tcp,
            "allow_udp" => &p.firewall.allow_udp,
            "wireguard_tcp" => &p.firewall.wireguard_tcp,
            _ => &p.firewall.wireguard_udp,
        };
        if wg_only && !list.is_empty() && p.wireguard.is_none() {
            c.err(
                &[k("firewall"), k(field)],
                "WireGuard-only ports but no [wireguard] section",
                None,
            );
        }
        for (i, port) in list.iter().enumerate() {
            c.claim(
                proto,
                *port,
                format!("firewall.{field}"),
                &[k("firewall"), k(field), Seg::Index(i)],
            );
        }
    }
}

fn check_networks(c: &mut Ctx, p: &Profile) {
    for name in p.networks.keys() {
        if !is_unit_safe(name) {
            c.err(
                &[k("networks"), k(name)],
                format!(
                    "network name `{}` is not usable as a unit/podman name",
                    name.escape_debug()
                ),
                "letters, digits, '-', '_', '.'; no '/', spaces or '..'".to_string(),
            );
        }
    }
}

fn check_volumes(c: &mut Ctx, p: &Profile) {
    for (name, v) in &p.volumes {
        if !is_unit_safe(name) {
            c.err(
                &[k("volumes"), k(name)],
                format!(
                    "volume name `{}` is not usable as a unit/podman name",
                    name.escape_debug()
                ),
                "letters, digits, '-', '_', '.'; no '/', spaces or '..'".to_string(),
            );
        }
        match (v.backup, &v.hook) {
            (BackupStrategy::Hook, None) => c.err(&[k("volumes"), k(name), k("backup")], "backup = \"hook\" needs a `hook` command", "e.g. hook = \"podman exec db pg_dumpall -U postgres -f /var/lib/postgresql/data/dump.sql\"".to_string()),
            (s, Some(_)) if s != BackupStrategy::Hook => c.err(&[k("volumes"), k(name), k("hook")], "a hook is only run with backup = \"hook\"", None),
            (_, Some(h)) if h.trim().is_empty() || h.contains('\n') => c.err(&[k("volumes"), k(name), k("hook")], "hook must be one non-empty line", None),
            _ => {}
        }
        if let Some(from) = &v.from {
            let at = [k("volumes"), k(name), k("from")];
            match v.from_parts() {
                Some((h, vol)) if is_unit_safe(h) && is_unit_safe(vol) => {
                    if p.backup.is_none() {
                        c.err(&at, "a volume restored from another host needs a [backup] section (its bucket settings and this host's keys)", None);
                    }
                    if v.backup == BackupStrategy::None {
                        c.err(&at, "the moved data would never be backed up on this host (backup = \"none\"), and the next first boot would fetch the old host's copy again", "set backup = \"live\" (or stop/hook)".to_string());
                    }
                }
                _ => c.err(&at, format!("`{}` is not HOST:VOLUME", from.escape_debug()), "e.g. from = \"services:nextcloud-data\" (the profile services.toml beside this one, its volume nextcloud-data)".to_string()),
            }
        }
        if let Some(pg) = &v.postgres {
            check_postgres_volume(c, p, name, v, pg);
        }
    }
}

/// A volume whose PostgreSQL WAL is shipped: the container must exist and mount it,
/// and the volume must be backed up (a replay starts from one of its snapshots).
fn check_postgres_volume(
    c: &mut Ctx,
    p: &Profile,
    name: &str,
    v: &crate::profile::model::Volume,
    pg: &crate::profile::model::PostgresVolume,
) {
    let at = |f: &str| [k("volumes"), k(name), k("postgres"), k(f)];
    if p.backup.is_none() {
        c.err(
            &[k("volumes"), k(name), k("postgres")],
            "WAL shipping needs a [backup] section (the bucket and this host's keys)",
            None,
        );
    }
    if v.backup == BackupStrategy::None {
        c.err(
            &[k("volumes"), k(name), k("postgres")],
            "WAL is replayed on top of a snapshot of the volume, and backup = \"none\" takes none",
            "set backup = \"live\" (an atomic snapshot is crash-consistent for PostgreSQL)"
                .to_string(),
        );
    }
    match p.containers.get(&pg.container) {
        None => c.err(
            &at("container"),
            format!(
                "no container `{}` in this profile",
                pg.container.escape_debug()
            ),
            format!(
                "one of: {}",
                p.containers.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ),
        Some(ct) => {
            if !ct.volumes.iter().any(|m| m.split(':').next() == Some(name)) {
                c.err(
                    &at("container"),
                    format!(
                        "container `{}` does not mount volume `{name}`",
                        pg.container
                    ),
                    format!("add \"{name}:/var/lib/postgresql/data\" to its volumes"),
                );
            }
            if ct
                .volumes
                .iter()
                .any(|m| m.split(':').nth(1) == Some(crate::hostconfig::WAL_SPOOL_MOUNT))
            {
                c.err(
                    &at("container"),
                    format!(
                        "{} is where imgbuild mounts the WAL spool",
                        crate::hostconfig::WAL_SPOOL_MOUNT
                    ),
                    "mount nothing else there".to_string(),
                );
            }
        }
    }
    let d = std::path::Path::new(&pg.data);
    let bad = pg.data.is_empty()
        || d.is_absolute()
        || d.components()
            .any(|x| matches!(x, std::path::Component::ParentDir))
        || !no_control(&pg.data);
    if bad {
        c.err(&at("data"), format!("`{}` is not a directory inside the volume", pg.data.escape_debug()), "a relative path such as \"pgdata\" (PGDATA relative to where the volume is mounted), or \".\"".to_string());
    }
    let spool = crate::hostconfig::wal_spool_volume(name);
    if p.volumes.contains_key(&spool) {
        c.err(
            &[k("volumes"), k(&spool)],
            format!("`{spool}` is the name of volume {name}'s WAL spool"),
            "rename this volume".to_string(),
        );
    }
}

fn check_container_image(c: &mut Ctx, name: &str, ct: &Container) {
    let at = |f: &str| ct_at(name, f);
    let base = [k("containers"), k(name)];
    if !is_unit_safe(name) {
        c.err(
            &base,
            format!(
                "container name `{}` is not usable as a unit/podman name",
                name.escape_debug()
            ),
            "letters, digits, '-', '_', '.'; no '/', spaces or '..'".to_string(),
        );
    }
    if let Err(e) = check_image(&ct.image) {
        c.err(
            &at("image"),
            e,
            "pin a real version, e.g. \"docker.io/library/caddy:2.8.4\" or \"...@sha256:<digest>\""
                .to_string(),
        );
    }
    if let Some(b) = &ct.bake {
        if b.is_empty() || !no_control(b) {
            c.err(&at("bake"), "not a path", None);
        }
        if ct.auto_update {
            c.err(
                &at("auto_update"),
                "a baked image cannot auto-update from a registry",
                None,
            );
        }
    }
}

fn check_container_publish(c: &mut Ctx, name: &str, ct: &Container, wg_addr: Option<IpAddr>) {
    let at_i = |f: &str, i: usize| ct_at_i(name, f, i);
    for (i, spec) in ct.publish.iter().enumerate() {
        match parse_publish(spec) {
            Ok(pb) => {
                if ct.host_network {
                    c.err(
                        &at_i("publish", i),
                        "a host-network container cannot publish ports",
                        "it listens on the host directly; open the port under [firewall]"
                            .to_string(),
                    );
                }
                if let Some(ip) = pb.ip {
                    if !ip.is_loopback() && Some(ip) != wg_addr && !ip.is_unspecified() {
                        c.err(&at_i("publish", i), format!("{ip} is neither this host's WireGuard address nor loopback"), "publish on all addresses (no IP), on 127.0.0.1, or on the wireguard.address".to_string());
                    }
                }
                c.claim(
                    pb.proto,
                    pb.host_port,
                    format!("containers.{name}.publish"),
                    &at_i("publish", i),
                );
            }
            Err(e) => c.err(
                &at_i("publish", i),
                e,
                "e.g. \"443:443\", \"443:443/udp\" or \"10.8.0.1:9100:9100\"".to_string(),
            ),
        }
    }
}

fn check_container_volumes(c: &mut Ctx, p: &Profile, name: &str, ct: &Container) {
    let at_i = |f: &str, i: usize| ct_at_i(name, f, i);
    for (i, spec) in ct.volumes.iter().enumerate() {
        let parts: Vec<&str> = spec.split(':').collect();
        if parts.len() < 2 || parts.len() > 3 {
            c.err(
                &at_i("volumes", i),
                format!("`{}` is not VOLUME:/path[:options]", spec.escape_debug()),
                None,
            );
            continue;
        }
        let (src, dst) = (parts[0], parts[1]);
        if src.starts_with('/') {
            if src.contains("..") || !no_control(src) {
                c.err(&at_i("volumes", i), "bad host path", None);
            }
        } else if !p.volumes.contains_key(src) {
            c.err(
                &at_i("volumes", i),
                format!("volume `{}` is not defined", src.escape_debug()),
                format!(
                    "add [volumes.{}] (every mounted volume is declared, so it is backed up)",
                    src.escape_debug()
                ),
            );
        }
        if !dst.starts_with('/') || dst.contains("..") || !no_control(dst) {
            c.err(
                &at_i("volumes", i),
                format!("`{}` is not an absolute container path", dst.escape_debug()),
                None,
            );
        }
        if let Some(opts) = parts.get(2) {
            if !opts.split(',').all(|o| {
                matches!(
                    o,
                    "ro" | "rw" | "z" | "Z" | "U" | "noexec" | "nosuid" | "nodev"
                )
            }) {
                c.err(
                    &at_i("volumes", i),
                    format!("unknown mount options `{opts}`"),
                    "ro, rw, z, Z, U, noexec, nosuid, nodev".to_string(),
                );
            }
        }
    }
}

fn check_container_networks(c: &mut Ctx, p: &Profile, name: &str, ct: &Container) {
    let at = |f: &str| ct_at(name, f);
    let at_i = |f: &str, i: usize| ct_at_i(name, f, i);
    for (i, n) in ct.networks.iter().enumerate() {
        if !p.networks.contains_key(n) {
            c.err(
                &at_i("networks", i),
                format!("network `{}` is not defined", n.escape_debug()),
                format!("add [networks.{}]", n.escape_debug()),
            );
        }
    }
    if ct.host_network && !ct.networks.is_empty() {
        c.err(
            &at("networks"),
            "a host-network container joins no podman network",
            None,
        );
    }
}

fn check_container_env(c: &mut Ctx, name: &str, ct: &Container) {
    for (key, val) in &ct.env {
        let ok = !key.is_empty()
            && key
                .chars()
                .next()
                .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
            && key
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !ok {
            c.err(
                &[k("containers"), k(name), k("env"), k(key)],
                "not an environment variable name",
                None,
            );
        }
        if !no_control(val) {
            c.err(
                &[k("containers"), k(name), k("env"), k(key)],
                "value has a newline or control character",
                None,
            );
        }
    }
    for (key, secret) in &ct.secret_env {
        let at = [k("containers"), k(name), k("secret_env"), k(key)];
        let ok = !key.is_empty()
            && key
                .chars()
                .next()
                .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
            && key
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !ok {
            c.err(&at, "not an environment variable name", None);
        }
        if ct.env.contains_key(key) {
            c.err(&at, "also set in `env`", None);
        }
        if !is_hostname(secret) {
            c.err(
                &at,
                format!(
                    "secret name `{}` must be lowercase letters, digits and '-'",
                    secret.escape_debug()
                ),
                None,
            );
        }
    }
}

fn check_container_process(c: &mut Ctx, p: &Profile, name: &str, ct: &Container) {
    let at = |f: &str| ct_at(name, f);
    let at_i = |f: &str, i: usize| ct_at_i(name, f, i);
    for (i, dep) in ct.after.iter().enumerate() {
        if dep == name {
            c.err(
                &at_i("after", i),
                "a container cannot wait for itself",
                None,
            );
        } else if !p.containers.contains_key(dep) {
            c.err(
                &at_i("after", i),
                format!("container `{}` is not defined", dep.escape_debug()),
                None,
            );
        }
    }
    for (i, a) in ct.command.iter().enumerate() {
        if !no_control(a) {
            c.err(
                &at_i("command", i),
                "argument has a newline or control character",
                None,
            );
        }
    }
    if let Some(h) = &ct.health {
        if h.cmd.trim().is_empty() || !no_control(&h.cmd) {
            c.err(
                &[k("containers"), k(name), k("health"), k("cmd")],
                "health command must be one non-empty line",
                None,
            );
        }
        // podman parses both with Go's time.ParseDuration: "5min" or "1d" make the
        // container fail to start.
        let hint = "Go duration syntax as podman reads it: \"30s\", \"5m\", \"1h30m\" (units ns, us, ms, s, m, h; no spaces)".to_string();
        let at_h = |f: &str| vec![k("containers"), k(name), k("health"), k(f)];
        match parse_go_duration(&h.interval) {
            Err(e) => c.err(&at_h("interval"), e, hint.clone()),
            Ok(ns) if ns < 1_000_000_000 => c.err(
                &at_h("interval"),
                format!(
                    "health interval `{}` is under 1s: 0 switches the check off, and a container with a health check only counts as started once it is healthy",
                    h.interval.escape_debug()
                ),
                hint.clone(),
            ),
            Ok(_) => {}
        }
        match parse_go_duration(&h.start_period) {
            Err(e) => c.err(&at_h("start_period"), e, hint),
            Ok(ns) if ns < 0 => c.err(
                &at_h("start_period"),
                "podman refuses a negative start period",
                None,
            ),
            Ok(_) => {}
        }
        if h.retries == 0 {
            c.err(
                &at_h("retries"),
                "podman refuses 0 retries (healthcheck-retries must be greater than 0)",
                None,
            );
        }
    }
    if let Some(u) = &ct.user {
        let part_ok = |s: &str| {
            s.starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_')
                && s.len() <= 32
                && s.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch))
        };
        let ok = match u.split_once(':') {
            Some((user, group)) => part_ok(user) && part_ok(group),
            None => part_ok(u),
        };
        if !ok {
            c.err(
                &at("user"),
                format!("`{}` is not a user[:group] spec", u.escape_debug()),
                "a name or number, optionally `:group`, e.g. \"1000:1000\" or \"www-data\""
                    .to_string(),
            );
        }
    }
    if let Some(path) = &ct.check {
        if !path.starts_with('/') || path.contains(' ') || !no_control(path) {
            c.err(
                &at("check"),
                format!("`{}` is not an HTTP path", path.escape_debug()),
                "e.g. \"/\" or \"/status.php\"".to_string(),
            );
        }
        if public_tcp_port(ct).is_none() {
            c.err(
                &at("check"),
                "the drill reaches a check through a public TCP port, and this container publishes none",
                "publish a TCP port on all addresses (e.g. \"80:80\"), or remove `check`"
                    .to_string(),
            );
        }
    }
}

fn check_container_ports<'a>(
    c: &mut Ctx,
    p: &Profile,
    name: &'a str,
    ct: &'a Container,
    domains: &mut BTreeMap<&'a str, &'a str>,
) {
    let at = |f: &str| ct_at(name, f);
    if let Some(d) = &ct.domain {
        if !is_domain(d) {
            c.err(
                &at("domain"),
                format!("`{}` is not a domain name", d.escape_debug()),
                None,
            );
        } else if let Some(prev) = domains.insert(d, name) {
            c.err(
                &at("domain"),
                format!("domain {d} is already served by container `{prev}`"),
                None,
            );
        }
        if ct.port.is_none() {
            c.err(
                &at("domain"),
                "a proxied container needs `port` (the container port to forward to)",
                None,
            );
        }
        if p.proxy.is_none() {
            c.err(
                &at("domain"),
                "a domain is set but the profile has no [proxy]",
                None,
            );
        }
    }
    if ct.port == Some(0) {
        c.err(&at("port"), "port 0 is not a port", None);
    }
    if ct.metrics_port == Some(0) {
        c.err(&at("metrics_port"), "port 0 is not a port", None);
    }
}

fn ct_at(name: &str, f: &str) -> Vec<Seg> {
    vec![k("containers"), k(name), k(f)]
}

fn ct_at_i(name: &str, f: &str, i: usize) -> Vec<Seg> {
    vec![k("containers"), k(name), k(f), Seg::Index(i)]
}

/// One container, section by section.
#[allow(clippy::too_many_arguments)]
fn check_container<'a>(
    c: &mut Ctx,
    p: &Profile,
    wg_addr: Option<IpAddr>,
    domains: &mut BTreeMap<&'a str, &'a str>,
    name: &'a str,
    ct: &'a Container,
) {
    check_container_image(c, name, ct);
    check_container_publish(c, name, ct, wg_addr);
    check_container_volumes(c, p, name, ct);
    check_container_networks(c, p, name, ct);
    check_container_env(c, name, ct);
    check_container_process(c, p, name, ct);
    check_container_ports(c, p, name, ct, domains);
}

fn check_dependency_cycles(c: &mut Ctx, p: &Profile) {
    // Dependency cycles make systemd drop units at boot: refuse them here.
    for name in p.containers.keys() {
        let mut stack = vec![(name.as_str(), 0usize)];
        let mut seen = BTreeSet::new();
        while let Some((cur, depth)) = stack.pop() {
            if depth > p.containers.len() {
                break;
            }
            for dep in p
                .containers
                .get(cur)
                .map(|c| c.after.as_slice())
                .unwrap_or(&[])
            {
                if dep == name {
                    c.err(
                        &[k("containers"), k(name), k("after")],
                        "dependency cycle",
                        "remove one of the `after` links".to_string(),
                    );
                    stack.clear();
                    break;
                }
                if seen.insert(dep.as_str()) {
                    stack.push((dep.as_str(), depth + 1));
                }
            }
        }
    }
}

fn check_proxy(c: &mut Ctx, p: &Profile) {
    if let Some(px) = &p.proxy {
        match p.containers.get(&px.container) {
            None => c.err(
                &[k("proxy"), k("container")],
                format!("container `{}` is not defined", px.container.escape_debug()),
                None,
            ),
            Some(ct) => {
                let ports: BTreeSet<u16> = ct
                    .publish
                    .iter()
                    .filter_map(|s| parse_publish(s).ok())
                    .filter(|pb| pb.proto == "tcp")
                    .map(|pb| pb.container_port)
                    .collect();
                if !ports.contains(&80) || !ports.contains(&443) {
                    c.err(
                        &[k("proxy"), k("container")],
                        "the proxy container must publish container ports 80 and 443",
                        "publish = [\"80:80\", \"443:443\", \"443:443/udp\"]".to_string(),
                    );
                }
            }
        }
        if !is_email(&px.email) {
            c.err(
                &[k("proxy"), k("email")],
                format!("`{}` is not an e-mail address", px.email.escape_debug()),
                "one plain address, e.g. \"admin@example.org\" (it goes unquoted into the Caddyfile)".to_string(),
            );
        }
    }
}

fn check_backup(c: &mut Ctx, p: &Profile) {
    if let Some(b) = &p.backup {
        let bucket_ok = (3..=63).contains(&b.bucket.len())
            && b.bucket
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '.')
            && b.bucket.as_bytes()[0].is_ascii_alphanumeric();
        if !bucket_ok {
            c.err(
                &[k("backup"), k("bucket")],
                format!("`{}` is not an S3 bucket name", b.bucket.escape_debug()),
                "3-63 lowercase letters, digits, '-' and '.'".to_string(),
            );
        }
        if let Some(pr) = &b.prefix {
            if pr.is_empty()
                || pr.starts_with('/')
                || pr.ends_with('/')
                || pr.contains("//")
                || pr.contains("..")
                || !no_control(pr)
            {
                c.err(
                    &[k("backup"), k("prefix")],
                    "prefix must be non-empty, without leading/trailing '/' or '..'",
                    None,
                );
            }
        }
        for (f, v) in [("endpoint", &b.endpoint), ("ping_url", &b.ping_url)] {
            if let Some(u) = v {
                if let Err(e) = check_http_url(u) {
                    c.err(&[k("backup"), k(f)], e, None);
                }
            }
        }
        let region_ok = b.region.len() <= 63
            && b.region
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !region_ok {
            c.err(
                &[k("backup"), k("region")],
                format!("`{}` is not a region name", b.region.escape_debug()),
                "letters, digits, '-', '_' and '.', e.g. \"nl-ams\" or \"us-east-1\"".to_string(),
            );
        }
        check_schedule(c, "schedule", &b.schedule, "the backup timer", "backup");
        check_schedule(
            c,
            "check_schedule",
            &b.check_schedule,
            "the check timer",
            "check",
        );
        let (lo, hi) = (
            crate::hostconfig::PACK_SIZE_MIB_MIN,
            crate::hostconfig::PACK_SIZE_MIB_MAX,
        );
        if !(i64::from(lo)..=i64::from(hi)).contains(&b.pack_size_mib) {
            c.err(
                &[k("backup"), k("pack_size_mib")],
                format!(
                    "{} MiB is outside the pack sizes the engine writes ({lo}..={hi} MiB)",
                    b.pack_size_mib
                ),
                format!(
                    "omit it for {} MiB; smaller packs mean more requests, larger ones more \
                     garbage per pack",
                    crate::hostconfig::DEFAULT_PACK_SIZE_MIB
                ),
            );
        }
        if !(1..=99).contains(&b.repack_garbage_percent) {
            c.err(
                &[k("backup"), k("repack_garbage_percent")],
                format!(
                    "{} % is not a repack threshold (1..=99)",
                    b.repack_garbage_percent
                ),
                format!(
                    "omit it for {} %: a pack is rewritten once more than that share of it \
                     is garbage",
                    crate::hostconfig::DEFAULT_REPACK_GARBAGE_PERCENT
                ),
            );
        }
        if let Err(e) = crate::hostconfig::parse_read_data(&b.check_read_data) {
            c.err(
                &[k("backup"), k("check_read_data")],
                format!("{e}: every scheduled check would fail"),
                "a share of the packs to read, e.g. \"10%\", \"0.1\" or \"1/10\"; \"off\" checks metadata only".to_string(),
            );
        }
        let max = crate::hostconfig::FINAL_SNAPSHOT_TIMEOUT_MAX;
        if !(30..=i64::from(max)).contains(&b.final_snapshot_timeout) {
            c.err(
                &[k("backup"), k("final_snapshot_timeout")],
                format!("{} s is outside 30..={max} s", b.final_snapshot_timeout),
                format!(
                    "omit it for {} s; it should end before your provider cuts the power after \
                     an ACPI power-off",
                    crate::hostconfig::DEFAULT_FINAL_SNAPSHOT_TIMEOUT
                ),
            );
        }
        if p.volumes.values().any(|v| v.postgres.is_some())
            || b.archive_timeout != i64::from(crate::hostconfig::DEFAULT_ARCHIVE_TIMEOUT)
        {
            if !(10..=3600).contains(&b.archive_timeout) {
                c.err(
                    &[k("backup"), k("archive_timeout")],
                    format!("{} s is outside 10..=3600 s", b.archive_timeout),
                    format!("omit it for {} s: an unplanned crash loses about this much plus the time to ship", crate::hostconfig::DEFAULT_ARCHIVE_TIMEOUT),
                );
            } else if !(b.archive_timeout..=86_400).contains(&b.wal_rpo_seconds) {
                c.err(
                    &[k("backup"), k("wal_rpo_seconds")],
                    format!("{} s is outside archive_timeout ({} s)..=86400 s", b.wal_rpo_seconds, b.archive_timeout),
                    format!("omit it for {} s; below archive_timeout it would alert on every quiet minute", crate::hostconfig::DEFAULT_WAL_RPO_SECONDS),
                );
            }
        }
        if b.object_lock_days == Some(0) {
            c.err(
                &[k("backup"), k("object_lock_days")],
                "0 days locks nothing",
                "omit it or set at least 1".to_string(),
            );
        }
        if b.keep.last + b.keep.daily + b.keep.weekly + b.keep.monthly == 0 {
            c.err(
                &[k("backup"), k("keep")],
                "retention keeps no snapshot at all",
                None,
            );
        }
        if b.rpo_hours == 0 {
            c.err(
                &[k("backup"), k("rpo_hours")],
                "an RPO of 0 hours fails every snapshot",
                "e.g. 30 for daily backups with a 6 h margin".to_string(),
            );
        }
        if b.restore_timeout == 0 {
            c.err(
                &[k("backup"), k("restore_timeout")],
                "0 seconds gives an unreachable bucket no chance",
                None,
            );
        }
    }
}

/// A timer's `OnCalendar=`: parsed by systemd's rules, and it must keep firing.
fn check_schedule(c: &mut Ctx, field: &str, schedule: &str, timer: &str, job: &str) {
    let at = [k("backup"), k(field)];
    let hint = "e.g. \"daily\", \"*-*-* 03:15:00\", \"Mon..Fri 22:30 Europe/Paris\" (man systemd.time; check with `systemd-analyze calendar`)".to_string();
    match systemd_time::parse_calendar(schedule) {
        Err(e) => c.err(
            &at,
            format!(
                "`{}` is not a systemd calendar expression ({e}): {timer} would not load and no {job} would ever run",
                schedule.escape_debug()
            ),
            hint,
        ),
        Ok(spec) if spec.names_a_year() => c.err(
            &at,
            format!(
                "`{}` names a year or an instant: {job}s would stop once it is past",
                schedule.escape_debug()
            ),
            hint,
        ),
        Ok(spec) if !spec.ever_elapses() => c.err(
            &at,
            format!(
                "`{}` never elapses (no date matches it): no {job} would ever run",
                schedule.escape_debug()
            ),
            hint,
        ),
        Ok(_) => {}
    }
}

fn check_files(c: &mut Ctx, p: &Profile) {
    for (path, f) in &p.files {
        let at = [k("files"), k(path)];
        let ok = path.starts_with('/')
            && !path.ends_with('/')
            && !path.contains("//")
            && !path.split('/').any(|c| c == "." || c == "..")
            && no_control(path);
        if !ok {
            c.err(
                &at,
                format!(
                    "`{}` is not an absolute, normalised path",
                    path.escape_debug()
                ),
                None,
            );
        } else if !(path.starts_with("/etc/") || path.starts_with("/usr/local/")) {
            c.err(&at, "extra files go under /etc or /usr/local (the rest of the root is the base OS; state belongs on /var)", None);
        }
        if u32::from_str_radix(f.mode.trim_start_matches("0o"), 8)
            .map(|m| m > 0o7777)
            .unwrap_or(true)
        {
            c.err(
                &[k("files"), k(path), k("mode")],
                format!("`{}` is not an octal mode", f.mode.escape_debug()),
                "e.g. \"0644\"".to_string(),
            );
        }
    }
}

fn check_monitoring(c: &mut Ctx, p: &Profile, dir: &Path) {
    if let Some(m) = &p.monitoring {
        for (i, h) in m.scrape.iter().enumerate() {
            let at = [k("monitoring"), k("scrape"), Seg::Index(i)];
            if !is_hostname(h) || !dir.join(format!("{h}.toml")).is_file() {
                c.err(
                    &at,
                    format!("no profile `{}` next to this one", h.escape_debug()),
                    None,
                );
            }
        }
        if let Some(a) = &m.alerts {
            match a.receiver {
                ReceiverKind::Webhook | ReceiverKind::Ntfy => match a.url.as_deref() {
                    None => c.err(
                        &[k("monitoring"), k("alerts")],
                        "this receiver needs an http(s) `url`",
                        None,
                    ),
                    Some(u) => {
                        if let Err(e) = check_http_url(u) {
                            c.err(&[k("monitoring"), k("alerts"), k("url")], e, None);
                        }
                    }
                },
                ReceiverKind::Email => {
                    for f in ["to", "smtp", "from"] {
                        let v = match f {
                            "to" => &a.to,
                            "smtp" => &a.smtp,
                            _ => &a.from,
                        };
                        let Some(v) = v else {
                            c.err(
                                &[k("monitoring"), k("alerts")],
                                format!("the email receiver needs `{f}`"),
                                None,
                            );
                            continue;
                        };
                        let at = [k("monitoring"), k("alerts"), k(f)];
                        if f == "smtp" {
                            if split_host_port(v).is_none() {
                                c.err(
                                    &at,
                                    format!("`{}` is not host:port", v.escape_debug()),
                                    "Alertmanager's smarthost needs the port, e.g. \"smtp.example.org:587\"".to_string(),
                                );
                            }
                        } else if !is_email(v) {
                            c.err(
                                &at,
                                format!("`{}` is not an e-mail address", v.escape_debug()),
                                "one plain address, e.g. \"ops@example.org\"".to_string(),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_as_podman_reads_them() {
        let s = 1_000_000_000i128;
        for (d, want) in [
            ("30s", 30 * s),
            ("0", 0),
            ("5m", 300 * s),
            ("1h30m", 5400 * s),
            ("1.5h", 5400 * s),
            (".5s", s / 2),
            ("5.s", 5 * s),
            ("300ms", 3 * s / 10),
            ("10us", 10_000),
            ("10\u{b5}s", 10_000),
            ("10\u{3bc}s", 10_000),
            ("7ns", 7),
            ("+2s", 2 * s),
            ("-2s", -2 * s),
            ("2562047h", 2_562_047 * 3600 * s),
        ] {
            assert_eq!(parse_go_duration(d), Ok(want), "{d}");
        }
        for d in [
            "", "5", "5min", "1d", "5 s", "2m 30s", "s", ".s", ".", "-", "+", "5S", "1w", "5m5",
            "2562048h", "disable",
        ] {
            assert!(parse_go_duration(d).is_err(), "{d} should be refused");
        }
    }

    #[test]
    fn hosts_and_ports() {
        for ok in [
            "vps1.example.org:51820",
            "203.0.113.7:51820",
            "[2001:db8::1]:51820",
            "minio:9000",
        ] {
            assert!(split_host_port(ok).is_some(), "{ok}");
        }
        for bad in [
            "vps1.example.org",
            "vps1.example.org:",
            "vps1.example.org:0",
            "vps1.example.org:65536",
            "vps1.example.org:+80",
            "2001:db8::1:51820",
            "[2001:db8::1]",
            "[not-v6]:51820",
            "10.0.0.256:51820",
            "-bad.example.org:1",
            "bad_name.example.org:1",
            "vpn example.org:1",
            ":51820",
        ] {
            assert!(split_host_port(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn http_urls() {
        for ok in [
            "https://s3.nl-ams.scw.cloud",
            "http://127.0.0.1:9000",
            "https://ntfy.sh/topic?x=1",
            "https://user:pw@hc-ping.com/uuid",
            "http://[::1]:8080/hook",
            "http://[::1]/hook",
        ] {
            assert!(check_http_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://example.org",
            "https://",
            "https:///path",
            "https://:9000/",
            "https://exa mple.org",
            "https://example.org/a\"b",
            "https://example.org:99999/",
            "example.org",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn email_addresses() {
        for ok in [
            "admin@example.org",
            "ops+alerts@mail.example.org",
            "a.b-c@x.io",
        ] {
            assert!(is_email(ok), "{ok}");
        }
        for bad in [
            "admin",
            "@example.org",
            "admin@",
            "admin@localhost",
            "a b@example.org",
            "Admin <admin@example.org>",
            "a@b@example.org",
            "{env.X}@example.org",
            ".a@example.org",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }

    #[test]
    fn ssh_key_blobs_must_match_their_type() {
        let blob = "AAAAC3NzaC1lZDI1NTE5AAAAIJ6t0Yq8uGzY1mN2oF3pQ4rS5tU6vW7xY8zA9bC0dE1f";
        assert!(check_ssh_key(&format!("ssh-ed25519 {blob} me")).is_ok());
        assert!(check_ssh_key(&format!("ssh-ed25519 {blob}")).is_ok());
        assert!(check_ssh_key(&format!("ssh-rsa {blob} me")).is_err());
        assert!(check_ssh_key(&format!("ssh-ed25519 {} me", &blob[..blob.len() - 1])).is_err());
        assert!(check_ssh_key(&format!("ssh-ed25519 {}! me", &blob[..blob.len() - 1])).is_err());
        assert!(check_ssh_key("ssh-ed25519 AAAAAAAAAAAAAAAAAAAA me").is_err());
        assert!(check_ssh_key("ssh-dss AAAAB3NzaC1kc3MAAACBAP me").is_err());
    }
}
