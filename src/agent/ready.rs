//! `imgbuild ready`, run inside the image by `imgbuild-ready.service`: waits until every
//! unit the host config lists has started or failed, then prints one line on the console,
//! the line a user watching a provider's serial console (and the boot test) looks for:
//!
//! `imgbuild: <host> ready (N units active)` or `imgbuild: <host> FAILED: <unit>, <unit>`.

use crate::hostconfig::HostConfig;
use anyhow::Context;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Default wait; quadlets pull or import images on first boot, which can take minutes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);
const FIRSTBOOT: &str = "imgbuild-firstboot.service";
/// A service restarting this often has failed, whatever its ActiveState says.
const RESTARTS_FAILED: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Up,
    Failed(String),
    Waiting(String),
}

/// Returns the process exit code: 0 ready, 1 failed (the unit then shows failed too).
pub fn ready(host_config_path: &Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(host_config_path)
        .with_context(|| format!("cannot read {}", host_config_path.display()))?;
    let cfg: HostConfig = toml::from_str(&text)
        .with_context(|| format!("cannot parse {}", host_config_path.display()))?;
    let drill = super::drill_mode::active();
    let timeout = match &drill {
        Some(d) => Duration::from_secs(d.ready_timeout_secs),
        None => std::env::var("IMGBUILD_READY_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT),
    };
    let deadline = Instant::now() + timeout;
    let states = loop {
        let mut states = query(&cfg.units)?;
        let waiting = states.values().any(|s| matches!(s, State::Waiting(_)));
        // Every service waits on first boot (Requires=): once it has failed, nothing
        // still waiting will start this boot. Say so now, not after the timeout.
        if matches!(states.get(FIRSTBOOT), Some(State::Failed(_))) {
            for (unit, st) in states.iter_mut() {
                if let State::Waiting(_) = st {
                    if unit != FIRSTBOOT {
                        *st = State::Waiting("held back: first boot failed".into());
                    }
                }
            }
            break states;
        }
        if !waiting || Instant::now() >= deadline {
            break states;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if drill.is_some() {
        // Before the readiness line, so a watcher that stops at that line has them all.
        for (unit, st) in &states {
            announce(&unit_line(unit, st).render());
        }
    }
    let failed: Vec<String> = states
        .iter()
        .filter_map(|(u, s)| match s {
            State::Up => None,
            State::Failed(why) | State::Waiting(why) => Some(format!("{u} ({why})")),
        })
        .collect();
    let (line, code) = if failed.is_empty() {
        (
            format!(
                "imgbuild: {} ready ({} units active)",
                cfg.host,
                states.len()
            ),
            0,
        )
    } else {
        (
            format!("imgbuild: {} FAILED: {}", cfg.host, failed.join(", ")),
            1,
        )
    };
    announce(&line);
    Ok(code)
}

/// One line on /dev/console (what the serial console shows) and stdout (the journal).
fn announce(line: &str) {
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(c, "{line}");
    }
    println!("{line}");
}

/// A unit's state and, for a quadlet container, its podman health, for the drill report.
fn unit_line(unit: &str, st: &State) -> super::drill_mode::UnitLine {
    let (state, detail) = match st {
        State::Up => ("up", None),
        State::Failed(why) => ("failed", Some(why.clone())),
        State::Waiting(why) => ("waiting", Some(why.clone())),
    };
    let stem = unit.strip_suffix(".service").unwrap_or(unit);
    let is_container = Path::new("/etc/containers/systemd")
        .join(format!("{stem}.container"))
        .exists();
    let health = if is_container {
        Command::new("podman")
            .args([
                "inspect",
                "--type",
                "container",
                "--format",
                // Health is nil (and .Status an error) without a HealthCmd.
                "{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                stem,
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .map(|h| if h.is_empty() { "none".to_string() } else { h })
            .unwrap_or_else(|| "unknown".into())
    } else {
        "none".into()
    };
    super::drill_mode::UnitLine {
        unit: unit.to_string(),
        state: state.into(),
        health,
        detail,
    }
}

fn query(units: &[String]) -> anyhow::Result<BTreeMap<String, State>> {
    let mut out = BTreeMap::new();
    if units.is_empty() {
        return Ok(out);
    }
    let o = Command::new("systemctl")
        .args([
            "show",
            "--property=Id,LoadState,ActiveState,SubState,Result,NRestarts,InactiveExitTimestampMonotonic",
        ])
        .args(units)
        .output()
        .context("cannot run systemctl show")?;
    let text = String::from_utf8_lossy(&o.stdout);
    // `systemctl show a b` prints one blank-line-separated block per unit, in order.
    let blocks: Vec<&str> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .collect();
    for (i, unit) in units.iter().enumerate() {
        let st = blocks
            .get(i)
            .map(|b| classify(b))
            .unwrap_or_else(|| State::Waiting("no status".into()));
        out.insert(unit.clone(), st);
    }
    Ok(out)
}

fn classify(block: &str) -> State {
    let props: BTreeMap<&str, &str> = block.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| props.get(k).copied().unwrap_or("");
    if get("LoadState") == "not-found" {
        return State::Failed("not found".into());
    }
    let restarts: u32 = get("NRestarts").parse().unwrap_or(0);
    match get("ActiveState") {
        "active" | "reloading" => State::Up,
        "failed" => State::Failed(format!("failed: {}", get("Result"))),
        "activating" if get("SubState") == "auto-restart" && restarts >= RESTARTS_FAILED => {
            State::Failed(format!("restarting, {restarts} restarts"))
        }
        // A oneshot without RemainAfterExit that ran and succeeded ends up inactive.
        "inactive"
            if get("Result") == "success"
                && get("InactiveExitTimestampMonotonic")
                    .parse::<u64>()
                    .unwrap_or(0)
                    > 0 =>
        {
            State::Up
        }
        s => State::Waiting(if s.is_empty() {
            "unknown".into()
        } else {
            s.to_string()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_from_systemctl_show() {
        assert_eq!(
            classify("Id=a.service\nLoadState=loaded\nActiveState=active\nSubState=running"),
            State::Up
        );
        assert!(matches!(
            classify("LoadState=loaded\nActiveState=failed\nResult=exit-code"),
            State::Failed(_)
        ));
        assert!(matches!(
            classify("LoadState=not-found\nActiveState=inactive"),
            State::Failed(_)
        ));
        assert!(matches!(
            classify("LoadState=loaded\nActiveState=inactive\nResult=success\nInactiveExitTimestampMonotonic=0"),
            State::Waiting(_)
        ));
        assert_eq!(
            classify("LoadState=loaded\nActiveState=inactive\nResult=success\nInactiveExitTimestampMonotonic=123"),
            State::Up
        );
        assert!(matches!(
            classify(
                "LoadState=loaded\nActiveState=activating\nSubState=auto-restart\nNRestarts=5"
            ),
            State::Failed(_)
        ));
    }
}
