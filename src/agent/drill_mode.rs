//! What the workstation tells a drilled guest, and the console lines the guest answers
//! with. Both halves (the `imgbuild drill` verb and the in-image `firstboot`/`ready`)
//! use these definitions, so the format cannot drift between them.
//!
//! The guest learns it is drilled from a systemd system credential (`imgbuild.drill`,
//! passed through SMBIOS by QEMU, read by `imgbuild firstboot`). A production boot has
//! no such credential, so nothing in this module changes what a real host does.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// systemd credential name.
pub const CREDENTIAL: &str = "imgbuild.drill";
/// Written by firstboot in drill mode so later units of the same boot (ready, the
/// backup service) know it without importing the credential themselves. /run: gone
/// at the next boot, never on a real host.
pub const RUNTIME_FILE: &str = "/run/imgbuild/drill.json";
/// The guest-side address of the read-only gateway (QEMU guestfwd).
pub const GATEWAY_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 100);
pub const GATEWAY_PORT: u16 = 80;
/// Every console line of a drill starts with this.
pub const LINE: &str = "imgbuild drill: ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// S3 endpoint the guest restores from (the gateway).
    pub endpoint: String,
    /// Bucket and prefix as the gateway serves them (the workstation's overrides win
    /// over the image's host.toml).
    pub bucket: String,
    pub prefix: String,
    /// Snapshot to restore; the workstation always pins one so a broken newest
    /// snapshot fails the drill instead of silently restoring an older one.
    pub snapshot: Option<String>,
    /// Retry budget for transport errors (integrity failures are final anyway).
    pub restore_timeout_secs: u64,
    /// `imgbuild ready`'s wait in drill mode.
    pub ready_timeout_secs: u64,
    /// Taken down at once: a drilled copy must not speak for the real host.
    #[serde(default)]
    pub wireguard_interfaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("drill credential {path}: {reason}")]
pub struct CredentialError {
    pub path: String,
    pub reason: String,
}

/// Where PID 1 keeps the credentials the machine was booted with (SMBIOS type 11).
pub const SYSTEM_CREDENTIALS: &str = "/run/credentials/@system";

/// `imgbuild run` boots a copy with this credential: a staging copy restores like the
/// host but never writes snapshots (its data must never become the host's newest).
pub const STAGING_CREDENTIAL: &str = "imgbuild.staging";

/// Whether this machine is a staging copy booted by `imgbuild run`.
pub fn staging_copy() -> bool {
    Path::new(SYSTEM_CREDENTIALS)
        .join(STAGING_CREDENTIAL)
        .exists()
}

/// The drill credential, if this machine was booted with one: the unit's own
/// (`$CREDENTIALS_DIRECTORY`, when a unit imports it) or the system's.
pub fn from_credentials() -> Option<Result<DrillConfig, CredentialError>> {
    let unit_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let path = unit_dir
        .into_iter()
        .chain([std::path::PathBuf::from(SYSTEM_CREDENTIALS)])
        .map(|d| d.join(CREDENTIAL))
        .find(|p| p.is_file())?;
    let bytes = std::fs::read(&path).ok()?;
    Some(serde_json::from_slice(&bytes).map_err(|e| CredentialError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }))
}

/// The drill config of this boot, if firstboot entered drill mode.
pub fn active() -> Option<DrillConfig> {
    let bytes = std::fs::read(RUNTIME_FILE).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn remember(cfg: &DrillConfig) -> std::io::Result<()> {
    let p = Path::new(RUNTIME_FILE);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, serde_json::to_vec(cfg).map_err(std::io::Error::other)?)
}

/// What the guest restored, as printed on the console and parsed back by the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreLine {
    pub id: String,
    /// Backup start, from the verified manifest (seconds since the epoch).
    pub time: i64,
    pub bytes: u64,
    pub files: u64,
    pub volumes: u64,
    pub seconds: f64,
}

impl RestoreLine {
    pub fn render(&self) -> String {
        format!(
            "{LINE}restore ok id={} time={} bytes={} files={} volumes={} seconds={:.1}",
            self.id, self.time, self.bytes, self.files, self.volumes, self.seconds
        )
    }

    pub fn parse(line: &str) -> Option<RestoreLine> {
        let rest = line.split(&format!("{LINE}restore ok ")).nth(1)?;
        let kv: std::collections::BTreeMap<&str, &str> = rest
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .collect();
        Some(RestoreLine {
            id: kv.get("id")?.to_string(),
            time: kv.get("time")?.parse().ok()?,
            bytes: kv.get("bytes")?.parse().ok()?,
            files: kv.get("files")?.parse().ok()?,
            volumes: kv.get("volumes")?.parse().ok()?,
            seconds: kv.get("seconds")?.parse().ok()?,
        })
    }
}

pub fn restore_failed_line(reason: &str) -> String {
    // One line: the host parses up to the end of it.
    format!(
        "{LINE}restore FAILED: {}",
        reason.replace(['\r', '\n'], " ")
    )
}

pub fn parse_restore_failed(line: &str) -> Option<String> {
    line.split(&format!("{LINE}restore FAILED: "))
        .nth(1)
        .map(|s| s.trim().to_string())
}

/// One unit's state at readiness time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitLine {
    pub unit: String,
    /// `up`, `failed` or `waiting`.
    pub state: String,
    /// Podman health (`healthy`, `unhealthy`, `starting`) or `none`.
    pub health: String,
    /// Why, when not up.
    pub detail: Option<String>,
}

impl UnitLine {
    pub fn render(&self) -> String {
        let mut s = format!(
            "{LINE}unit {} {} health={}",
            self.unit, self.state, self.health
        );
        if let Some(d) = &self.detail {
            s.push_str(&format!(" why={}", d.replace(['\r', '\n'], " ")));
        }
        s
    }

    pub fn parse(line: &str) -> Option<UnitLine> {
        let rest = line.split(&format!("{LINE}unit ")).nth(1)?.trim_end();
        let (head, detail) = match rest.split_once(" why=") {
            Some((h, d)) => (h, Some(d.to_string())),
            None => (rest, None),
        };
        let mut it = head.split_whitespace();
        let unit = it.next()?.to_string();
        let state = it.next()?.to_string();
        let health = it.next()?.strip_prefix("health=")?.to_string();
        Some(UnitLine {
            unit,
            state,
            health,
            detail,
        })
    }
}

/// A drilled copy must not act as the host: no backup may run (it would write the
/// copy's state into the real bucket if it could reach it), and the WireGuard tunnel
/// to the real peers goes down. Best effort with every step logged: the drill's
/// network has no route out and its gateway refuses writes whatever happens here.
pub fn enter(d: &DrillConfig, paths: &super::HostPaths) {
    use super::log;
    use std::process::Command;
    log(&format!(
        "{LINE}mode on: restoring {} through {} (read-only); backups and WireGuard off",
        d.snapshot.as_deref().unwrap_or("the newest snapshot"),
        d.endpoint
    ));
    if let Err(e) = remember(d) {
        log(&format!(
            "{LINE}warning: cannot write {}: {e}",
            RUNTIME_FILE
        ));
    }
    let run = |what: &str, cmd: &mut Command| match cmd.status() {
        Ok(st) if st.success() => log(&format!("{LINE}{what}: ok")),
        Ok(st) => log(&format!("{LINE}{what}: exited with {st}")),
        Err(e) => log(&format!("{LINE}{what}: {e}")),
    };
    // The check only reads, but its metrics and its load belong to the real host.
    run(
        "mask imgbuild-backup and imgbuild-check (timers and services)",
        Command::new(&paths.systemctl).args([
            "mask",
            "--runtime",
            "imgbuild-backup.timer",
            "imgbuild-backup.service",
            "imgbuild-check.timer",
            "imgbuild-check.service",
        ]),
    );
    // --no-block: this unit runs inside the boot transaction; waiting on another job
    // from here could deadlock it.
    run(
        "stop imgbuild-backup.timer and imgbuild-check.timer",
        Command::new(&paths.systemctl).args([
            "stop",
            "--no-block",
            "imgbuild-backup.timer",
            "imgbuild-check.timer",
        ]),
    );
    for wg in &d.wireguard_interfaces {
        run(
            &format!("wireguard {wg} down"),
            Command::new("networkctl").args(["down", wg]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let r = RestoreLine {
            id: "20260101T000000.000Z-0a1b2c3d".into(),
            time: 1_767_225_600,
            bytes: 3_000_042,
            files: 2,
            volumes: 1,
            seconds: 1.5,
        };
        // The console may prefix a line (timestamps, other output on the same line).
        assert_eq!(
            RestoreLine::parse(&format!("[  3.1] {}", r.render())),
            Some(r)
        );
        let u = UnitLine {
            unit: "web.service".into(),
            state: "failed".into(),
            health: "unhealthy".into(),
            detail: Some("failed: exit-code".into()),
        };
        assert_eq!(UnitLine::parse(&u.render()), Some(u));
        let u = UnitLine {
            unit: "nftables.service".into(),
            state: "up".into(),
            health: "none".into(),
            detail: None,
        };
        assert_eq!(UnitLine::parse(&u.render()), Some(u));
        assert_eq!(
            parse_restore_failed(&restore_failed_line("chunk ab is corrupted:\nx")),
            Some("chunk ab is corrupted: x".into())
        );
    }
}
