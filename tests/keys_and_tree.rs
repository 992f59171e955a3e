//! Keys are generated once and stable; the WireGuard public key derives from the
//! private one; the SSH host key is real OpenSSH; the host tree is deterministic and
//! snapshot-tested (insta) for both profiles.

mod common;
use common::*;
use imgbuild::profile::{self, LoadOptions};
use imgbuild::render::{self, Target};
use imgbuild::secrets::SecretsRoot;
use imgbuild::tree::EntryKind;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn tree_listing(profile: &str, env: &str, secrets: &std::path::Path) -> String {
    let path = repo().join("profiles").join(format!("{profile}.toml"));
    let host = profile::load(
        &path,
        &LoadOptions {
            env: Some(env.into()),
            overlays: vec![],
        },
    )
    .unwrap();
    let input = render::gather(host, &SecretsRoot::new(secrets)).unwrap();
    let tree = render::render(&input, Target::Image).unwrap();
    let mut out = String::new();
    for e in tree.entries.values() {
        match &e.kind {
            // Secrets differ per run: list them without content.
            EntryKind::File { content } if e.secret => out.push_str(&format!(
                "F {:04o} {}:{} {} <secret, {} bytes>\n",
                e.mode,
                e.owner,
                e.group,
                e.path,
                content.len()
            )),
            EntryKind::File { content } => {
                let text = String::from_utf8_lossy(content);
                // Key material that is public but random per run is masked too.
                let masked: String = text
                    .lines()
                    .map(|l| {
                        if l.starts_with("PublicKey=") {
                            "PublicKey=<peer key>"
                        } else if e.path.ends_with(".pub") {
                            "<public key>"
                        } else {
                            l
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push_str(&format!(
                    "F {:04o} {}:{} {}\n{}\n",
                    e.mode,
                    e.owner,
                    e.group,
                    e.path,
                    masked
                        .lines()
                        .map(|l| format!("  | {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
            EntryKind::Dir => out.push_str(&format!(
                "D {:04o} {}:{} {}\n",
                e.mode, e.owner, e.group, e.path
            )),
            EntryKind::Symlink { target } => out.push_str(&format!("L {} -> {}\n", e.path, target)),
        }
    }
    for en in &tree.enable {
        out.push_str(&format!("E {} <- {}\n", en.unit, en.wanted_by));
    }
    for u in &tree.users {
        out.push_str(&format!("U {} {} {}\n", u.name, u.uid, u.home));
    }
    out
}

#[test]
fn host_tree_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    for (profile, env) in [
        ("services", "production"),
        ("services", "staging"),
        ("monitoring", "production"),
    ] {
        let listing = tree_listing(profile, env, &tmp.path().join("s"));
        insta::assert_snapshot!(format!("tree_{profile}_{env}"), listing);
    }
}

#[test]
fn host_tree_is_deterministic_and_keys_are_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let path = repo().join("profiles/services.toml");
    let digest = || {
        let host = profile::load(&path, &LoadOptions::default()).unwrap();
        let input = render::gather(host, &SecretsRoot::new(&s)).unwrap();
        (
            render::render(&input, Target::Image).unwrap().digest(),
            input.created.len(),
        )
    };
    let (d1, created1) = digest();
    let (d2, created2) = digest();
    assert!(created1 > 0, "first build creates keys");
    assert_eq!(created2, 0, "second build creates nothing");
    assert_eq!(d1, d2, "same inputs, same tree");
}

#[test]
fn keys_command_creates_once_and_never_overwrites() {
    require_tool(
        &["sh", "-c", "command -v ssh-keygen"],
        "ssh-keygen (openssh-client)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("secrets");
    let first: serde_json::Value = serde_json::from_str(&run_ok(
        &[
            "keys",
            "services",
            "--secrets",
            s.to_str().unwrap(),
            "--json",
        ],
        &repo(),
    ))
    .unwrap();
    assert!(!first["created"].as_array().unwrap().is_empty());
    let host = s.join("vps1");
    let before: Vec<(String, Vec<u8>)> = std::fs::read_dir(&host)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    let second: serde_json::Value = serde_json::from_str(&run_ok(
        &[
            "keys",
            "services",
            "--secrets",
            s.to_str().unwrap(),
            "--json",
        ],
        &repo(),
    ))
    .unwrap();
    assert!(
        second["created"].as_array().unwrap().is_empty(),
        "second run created {:?}",
        second["created"]
    );
    for (name, data) in &before {
        assert_eq!(
            &std::fs::read(host.join(name)).unwrap(),
            data,
            "{name} changed"
        );
    }
    // Modes: dirs 0700, files 0600, and a .gitignore keeps them out of git.
    assert_eq!(
        std::fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for (name, _) in &before {
        assert_eq!(
            std::fs::metadata(host.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{name}"
        );
    }
    assert!(std::fs::read_to_string(s.join(".gitignore"))
        .unwrap()
        .contains('*'));
    // The peer (monitoring) got its keys too, since services names it as a peer.
    assert!(s.join("monitoring/wireguard.key").is_file());
    assert!(s.join("builder/image-signing.key").is_file());

    // WireGuard: the public key derives from the private one.
    let private = imgbuild::secrets::read_wireguard_private(&host.join("wireguard.key")).unwrap();
    assert_eq!(
        std::fs::read_to_string(host.join("wireguard.pub"))
            .unwrap()
            .trim(),
        imgbuild::secrets::wireguard_public(&private)
    );
    assert_eq!(
        first["wireguard_public_key"].as_str().unwrap(),
        imgbuild::secrets::wireguard_public(&private)
    );
    // If `wg` is installed, it agrees.
    if let Ok(out) = Command::new("wg")
        .arg("pubkey")
        .stdin(std::fs::File::open(host.join("wireguard.key")).unwrap())
        .output()
    {
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                imgbuild::secrets::wireguard_public(&private)
            );
        }
    }
    // SSH: OpenSSH parses the private key and derives the same public key.
    let out = Command::new("ssh-keygen")
        .args(["-y", "-f"])
        .arg(host.join("ssh_host_ed25519_key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen cannot read the key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = String::from_utf8_lossy(&out.stdout);
    let stored = std::fs::read_to_string(host.join("ssh_host_ed25519_key.pub")).unwrap();
    assert_eq!(
        derived.split_whitespace().nth(1),
        stored.split_whitespace().nth(1)
    );
}

#[test]
fn peers_public_keys_come_from_their_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let out = tmp.path().join("tree");
    run_ok(
        &[
            "render",
            "services",
            "--out",
            out.to_str().unwrap(),
            "--secrets",
            s.to_str().unwrap(),
        ],
        &repo(),
    );
    let netdev = std::fs::read_to_string(out.join("etc/systemd/network/50-wg0.netdev")).unwrap();
    let mon_pub = std::fs::read_to_string(s.join("monitoring/wireguard.pub")).unwrap();
    assert!(netdev.contains(&format!("PublicKey={}", mon_pub.trim())));
    assert!(netdev.contains("AllowedIPs=10.8.0.2/32"));
    assert!(netdev.contains("Endpoint=mon.example.org:51820"));
    let key = out.join("etc/systemd/network/wg0.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
