//! The rendered host tree checked by the real tools: `nft -c -f` for the firewall,
//! `systemd-analyze verify` for imgbuild's units (inside the rendered root, with the
//! real imgbuild binary at its ExecStart path).

mod common;
use common::*;
use std::process::Command;

fn render(
    profile: &str,
    env: &str,
    dir: &std::path::Path,
    secrets: &std::path::Path,
) -> std::path::PathBuf {
    let out = dir.join(format!("{profile}-{env}"));
    run_ok(
        &[
            "render",
            profile,
            "--env",
            env,
            "--out",
            out.to_str().unwrap(),
            "--secrets",
            secrets.to_str().unwrap(),
        ],
        &repo(),
    );
    out
}

/// `imgbuild render PROFILE` with an overlay holding `overlay_text`, into `dir/<name>`.
fn render_overlay(
    profile: &str,
    name: &str,
    overlay_text: &str,
    dir: &std::path::Path,
    secrets: &std::path::Path,
) -> std::path::PathBuf {
    let overlay = dir.join(format!("{name}.toml"));
    std::fs::write(&overlay, overlay_text).unwrap();
    let out = dir.join(name);
    run_ok(
        &[
            "render",
            profile,
            "--overlay",
            overlay.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--secrets",
            secrets.to_str().unwrap(),
        ],
        &repo(),
    );
    out
}

#[test]
fn nftables_ruleset_passes_nft_check() {
    require_tool(&["nft", "--version"], "nft (nftables)");
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    for profile in ["services", "monitoring"] {
        for env in ["production", "staging"] {
            let root = render(profile, env, tmp.path(), &secrets);
            let conf = root.join("etc/nftables.conf");
            let res = Command::new("nft")
                .arg("-c")
                .arg("-f")
                .arg(&conf)
                .output()
                .unwrap();
            assert!(
                res.status.success(),
                "{profile}/{env}: nft -c rejects {}:\n{}",
                conf.display(),
                String::from_utf8_lossy(&res.stderr)
            );
            let text = std::fs::read_to_string(&conf).unwrap();
            assert!(text.contains("policy drop"), "default deny");
            assert!(text.contains("tcp dport 22 accept"), "public ssh");
            assert!(text.contains("udp dport 51820 accept"), "wireguard");
            if profile == "services" {
                assert!(
                    text.contains("tcp dport 443 accept") && text.contains("udp dport 443 accept")
                );
                assert!(
                    text.contains("iifname \"wg0\" tcp dport 9100 accept"),
                    "metrics only on the tunnel"
                );
                assert!(
                    !text.contains("\ttcp dport 9100 accept"),
                    "metrics never public"
                );
            } else {
                // The monitoring host opens nothing publicly but SSH and WireGuard.
                let public: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        l.trim_start().starts_with("tcp dport")
                            || l.trim_start().starts_with("udp dport")
                    })
                    .collect();
                assert_eq!(public.len(), 2, "monitoring public rules: {public:?}");
                for port in [9090, 9093, 3000] {
                    assert!(
                        text.contains(&format!("iifname \"wg0\" tcp dport {port} accept")),
                        "{port} on the tunnel only"
                    );
                }
            }
        }
    }
}

#[test]
fn imgbuild_units_pass_systemd_analyze_verify() {
    require_tool(&["systemd-analyze", "--version"], "systemd-analyze");
    let tmp = tempfile::tempdir().unwrap();
    let root = render(
        "services",
        "production",
        tmp.path(),
        &tmp.path().join("secrets"),
    );
    // The units' ExecStart must exist inside the root: the real binary, not a stand-in.
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::copy(
        assert_cmd::cargo::cargo_bin("imgbuild"),
        root.join("usr/bin/imgbuild"),
    )
    .unwrap();
    // Targets our units order against (sysinit, network-online...) come from the build
    // machine's own systemd unit directory.
    let sys = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| std::path::Path::new(d).join("sysinit.target").exists())
        .expect("systemd unit directory");
    // Copied entry by entry: the build machine's package manager may be changing that
    // directory while the test runs, and a vanished file is not our problem.
    let dst = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(sys).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if let Ok(target) = std::fs::read_link(e.path()) {
            let _ = std::os::unix::fs::symlink(target, &to);
        } else if e.path().is_file() {
            let _ = std::fs::copy(e.path(), &to);
        }
    }
    assert!(dst.join("sysinit.target").is_file());
    let units: Vec<String> = [
        "imgbuild-firstboot.service",
        "imgbuild-backup.service",
        "imgbuild-backup.timer",
        "imgbuild-check.service",
        "imgbuild-check.timer",
        "imgbuild-ready.service",
        "imgbuild-final-snapshot.service",
        "imgbuild-wal.service",
    ]
    .iter()
    .map(|u| format!("{}/etc/systemd/system/{u}", root.display()))
    .collect();
    let res = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    println!(
        "systemd-analyze verify --root: exit {:?}\n{stderr}",
        res.status.code()
    );
    // Lines about units of the host OS that are absent from a bare rendered root are
    // expected; anything about our own units is a failure.
    assert!(
        res.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("imgbuild-")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze complains about imgbuild units:\n{}",
        ours.join("\n")
    );
}

#[test]
fn host_config_is_readable_by_the_helper() {
    let tmp = tempfile::tempdir().unwrap();
    let root = render(
        "services",
        "production",
        tmp.path(),
        &tmp.path().join("secrets"),
    );
    let text = std::fs::read_to_string(root.join("etc/imgbuild/host.toml")).unwrap();
    let hc: imgbuild::hostconfig::HostConfig = toml::from_str(&text).unwrap();
    assert_eq!(hc.host, "vps1");
    let b = hc.backup.unwrap();
    assert_eq!(b.restore, imgbuild::hostconfig::RestorePolicy::Require);
    assert!(b.path_style, "custom endpoints default to path-style");
    let db = b.volumes.iter().find(|v| v.name == "nextcloud-db").unwrap();
    // Atomic snapshots make a database volume safe to back up live.
    assert_eq!(db.strategy, imgbuild::hostconfig::Strategy::Live);
    assert_eq!(db.units, vec!["nextcloud-db.service".to_string()]);
    assert!(
        !b.volumes.iter().any(|v| v.name == "caddy-config"),
        "backup = none is not backed up"
    );
    assert!(hc.units.contains(&"caddy.service".to_string()));
    // The profile sets none of the pack and check keys: the defaults reach the helper.
    assert_eq!(b.packs, imgbuild::hostconfig::PackSettings::default());
    assert_eq!(b.check.schedule, "Sun *-*-* 04:30:00");
    assert_eq!(b.check.read_data, "10%");
    assert_eq!(
        b.final_snapshot,
        imgbuild::hostconfig::FinalSnapshotSettings::default()
    );
}

/// The final snapshot's unit is stopped after every container and periodic job of the
/// profile and before the network; `off` renders no unit at all.
#[test]
fn final_snapshot_unit_stops_after_the_containers_and_before_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    let render = |name: &str, overlay_text: &str| {
        render_overlay("services", name, overlay_text, tmp.path(), &secrets)
    };
    let out = render("on", "[backup]\nfinal_snapshot_timeout = 300\n");
    let units = out.join("etc/systemd/system");
    let unit = std::fs::read_to_string(units.join("imgbuild-final-snapshot.service")).unwrap();
    let profile: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("profiles/services.toml")).unwrap())
            .unwrap();
    let containers = profile["containers"].as_table().unwrap();
    assert!(containers.len() >= 5);
    for c in containers.keys() {
        assert!(
            unit.contains(&format!("\nBefore={c}.service\n")),
            "{c}:\n{unit}"
        );
    }
    for needle in [
        "Before=imgbuild-backup.service\n",
        "Before=imgbuild-check.service\n",
        "After=network-online.target nss-lookup.target imgbuild-firstboot.service\n",
        "Requires=imgbuild-firstboot.service\n",
        "RequiresMountsFor=/var/lib/containers/storage/volumes\n",
        "ExecStop=/usr/bin/imgbuild backup --final --timeout 300\n",
        "TimeoutStopSec=360\n",
        "RemainAfterExit=yes\n",
    ] {
        assert!(unit.contains(needle), "{needle}:\n{unit}");
    }
    assert!(units
        .join("multi-user.target.wants/imgbuild-final-snapshot.service")
        .symlink_metadata()
        .is_ok());
    let hc: imgbuild::hostconfig::HostConfig =
        toml::from_str(&std::fs::read_to_string(out.join("etc/imgbuild/host.toml")).unwrap())
            .unwrap();
    assert_eq!(hc.backup.unwrap().final_snapshot.timeout_secs, 300);

    let out = render("off", "[backup]\nfinal_snapshot = \"off\"\n");
    assert!(!out
        .join("etc/systemd/system/imgbuild-final-snapshot.service")
        .exists());
    let hc: imgbuild::hostconfig::HostConfig =
        toml::from_str(&std::fs::read_to_string(out.join("etc/imgbuild/host.toml")).unwrap())
            .unwrap();
    assert_eq!(
        hc.backup.unwrap().final_snapshot.when,
        imgbuild::hostconfig::FinalSnapshotWhen::Off
    );
}

#[test]
fn check_timer_follows_the_profile_and_never_overlaps_the_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let out = render_overlay(
        "services",
        "check",
        "[backup]\npack_size_mib = 8\nrepack_garbage_percent = 40\n\
         check_schedule = \"Wed *-*-* 02:00:00\"\ncheck_read_data = \"off\"\n",
        tmp.path(),
        &tmp.path().join("secrets"),
    );
    let units = out.join("etc/systemd/system");
    let timer = std::fs::read_to_string(units.join("imgbuild-check.timer")).unwrap();
    assert!(timer.contains("OnCalendar=Wed *-*-* 02:00:00\n"), "{timer}");
    assert!(timer.contains("Persistent=true"), "{timer}");
    assert!(timer.contains("RandomizedDelaySec="), "{timer}");
    let service = std::fs::read_to_string(units.join("imgbuild-check.service")).unwrap();
    assert!(
        service.contains("ExecStart=/usr/bin/imgbuild check\n"),
        "{service}"
    );
    assert!(
        service.contains("After=imgbuild-backup.service"),
        "{service}"
    );
    let hc: imgbuild::hostconfig::HostConfig =
        toml::from_str(&std::fs::read_to_string(out.join("etc/imgbuild/host.toml")).unwrap())
            .unwrap();
    let b = hc.backup.unwrap();
    assert_eq!(b.packs.size_mib, 8);
    assert_eq!(b.packs.target_bytes(), 8 << 20);
    assert_eq!(b.packs.prune_options().repack_garbage_percent, 40);
    assert_eq!(b.check.read_data, "off");
    assert_eq!(
        imgbuild::hostconfig::parse_read_data(&b.check.read_data),
        Ok(imgbuild::snapshot::check::ReadData::None)
    );
}

/// `from = "services:nextcloud-data"` on the monitoring host: its image carries the
/// services host's encryption key and public key (never its signing key) and the
/// read-only key, and host.toml says where the volume comes from.
#[test]
fn a_moved_volume_carries_the_other_hosts_read_keys_only() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    // The services host's keys exist once it was rendered or built.
    render("services", "production", tmp.path(), &secrets);
    std::fs::write(
        secrets.join("monitoring/from-vps1.s3.env"),
        "AWS_ACCESS_KEY_ID=ro\nAWS_SECRET_ACCESS_KEY=ro-secret\n",
    )
    .unwrap();
    let out = render_overlay(
        "monitoring",
        "moved",
        "[volumes.nextcloud-data]\nbackup = \"live\"\nfrom = \"services:nextcloud-data\"\n",
        tmp.path(),
        &secrets,
    );
    let overlay = tmp.path().join("moved.toml");
    let dir = out.join("etc/imgbuild/secrets/from/vps1");
    assert_eq!(
        std::fs::read_to_string(dir.join("snapshot-encryption.key")).unwrap(),
        std::fs::read_to_string(secrets.join("vps1/snapshot-encryption.key")).unwrap()
    );
    assert!(dir.join("snapshot-signing.pub").is_file());
    assert!(!dir.join("snapshot-signing.key").exists());
    assert!(std::fs::read_to_string(dir.join("s3.env"))
        .unwrap()
        .contains("ro-secret"));
    let hc: imgbuild::hostconfig::HostConfig =
        toml::from_str(&std::fs::read_to_string(out.join("etc/imgbuild/host.toml")).unwrap())
            .unwrap();
    let v = hc
        .backup
        .unwrap()
        .volumes
        .into_iter()
        .find(|v| v.name == "nextcloud-data")
        .unwrap();
    let from = v.from.unwrap();
    assert_eq!(
        (from.host.as_str(), from.volume.as_str()),
        ("vps1", "nextcloud-data")
    );
    assert_eq!(from.prefix, "vps1");
    assert_eq!(
        from.credentials_file.as_deref(),
        Some("/etc/imgbuild/secrets/from/vps1/s3.env")
    );

    // A volume the other host does not back up cannot be moved this way.
    std::fs::write(
        &overlay,
        "[volumes.nextcloud-redis]\nbackup = \"live\"\nfrom = \"services:nextcloud-redis\"\n",
    )
    .unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
        .current_dir(repo())
        .args(["render", "monitoring", "--overlay"])
        .arg(&overlay)
        .arg("--out")
        .arg(tmp.path().join("refused"))
        .arg("--secrets")
        .arg(&secrets)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{err}");
    assert!(
        err.contains("nextcloud-redis has backup = \"none\""),
        "{err}"
    );
    assert!(!tmp.path().join("refused").exists());
}
