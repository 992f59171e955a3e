//! Nothing that carries a secret is world-readable on the host: the sample profiles
//! (services and monitoring, both environments) are rendered with test secrets, a
//! backup ping URL, a hook command and a secret profile file, and every world-readable
//! file of the host tree and of the Ignition config (data URLs decoded, units, users)
//! is searched for every secret value. A planted copy proves the search finds one.

mod common;
use base64::Engine;
use common::*;
use imgbuild::emit::ignition;
use imgbuild::profile::{self, LoadOptions};
use imgbuild::render::{self, Target};
use imgbuild::secrets::SecretsRoot;
use imgbuild::tree::{EntryKind, HostTree};
use std::io::Read;
use std::path::Path;

/// Values the overlays put in the profile that are as secret as a key: whoever knows
/// the ping URL can report "backup ok"; a hook command may carry a password.
fn overlay(host: &str) -> (String, Vec<(String, String)>) {
    let ping = format!("PINGTOKEN-{host}-3f9c2b7e41d8");
    let hook = format!("HOOKSECRET-{host}-81b4c2d9e7");
    let file = format!("FILESECRET-{host}-c0ffee5a7d");
    let volume = if host == "services" {
        "nextcloud-db"
    } else {
        "alertmanager-data"
    };
    let text = format!(
        r#"
[backup]
ping_url = "https://hc-ping.example.org/ping/{ping}"

[volumes.{volume}]
backup = "hook"
hook = "podman exec {volume} dump --password={hook}"

[files."/etc/imgbuild-test/api.token"]
content = "token={file}\n"
secret = true
"#
    );
    let needles = vec![
        ("backup.ping_url token".to_string(), ping),
        (format!("volumes.{volume}.hook"), hook),
        ("secret profile file".to_string(), file),
    ];
    (text, needles)
}

/// Every secret value under the secrets root: each line of a key file (PEM armour
/// aside), each value of a KEY=VALUE file.
fn secrets_needles(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            // Public halves are not secrets; `.gitignore` is the root's own.
            if p.extension().is_some_and(|x| x == "pub")
                || e.file_name().to_string_lossy().starts_with('.')
            {
                continue;
            }
            let name = p.strip_prefix(root).unwrap().display().to_string();
            let text = std::fs::read_to_string(&p).unwrap();
            for line in text.lines().map(str::trim) {
                let value = match line.split_once('=') {
                    Some((k, v))
                        if !k.is_empty()
                            && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
                    {
                        v
                    }
                    _ => line,
                };
                if value.len() >= 16 && !value.starts_with("-----") {
                    out.push((name.clone(), value.to_string()));
                }
            }
        }
    }
    out
}

/// (what, where) for each needle found in a world-readable file.
fn scan(files: &[(String, Vec<u8>)], needles: &[(String, String)]) -> Vec<String> {
    let mut hits = Vec::new();
    for (path, data) in files {
        for (what, n) in needles {
            if data.windows(n.len()).any(|w| w == n.as_bytes()) {
                hits.push(format!("{what} in {path}"));
            }
        }
    }
    hits
}

/// Files of the tree, each with whether it is world-readable.
fn tree_files(tree: &HostTree) -> Vec<(String, Vec<u8>, bool)> {
    tree.entries
        .values()
        .filter_map(|e| match &e.kind {
            EntryKind::File { content } => {
                Some((e.path.clone(), content.clone(), e.mode & 0o004 != 0))
            }
            _ => None,
        })
        .collect()
}

fn decode_data_url(src: &str, compression: Option<&str>) -> Vec<u8> {
    let rest = src.strip_prefix("data:").expect("data URL");
    let (meta, data) = rest.split_once(',').expect("data URL comma");
    let raw = if meta.ends_with(";base64") {
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64")
    } else {
        let b = data.as_bytes();
        let mut out = vec![];
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("percent escape");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    };
    match compression {
        Some("gzip") => {
            let mut s = vec![];
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut s)
                .expect("gunzip");
            s
        }
        None => raw,
        Some(o) => panic!("unexpected compression {o}"),
    }
}

/// What an Ignition config puts on the host, each with whether it is world-readable:
/// files (their Ignition `mode`), units (Ignition writes them 0644) and the users'
/// authorized keys (readable by design).
fn ignition_files(tree: &HostTree) -> Vec<(String, Vec<u8>, bool)> {
    let helper = ignition::Helper {
        url: "https://downloads.example.org/imgbuild".into(),
        sha512: "00".repeat(64),
    };
    let cfg = ignition::emit(tree, "3.4.0", Some(&helper), &[]).expect("ignition emits");
    let inner = ignition::unwrap_config(&cfg).expect("unwraps");
    let v: serde_json::Value = serde_json::from_slice(&inner).expect("json");
    let mut out = Vec::new();
    for f in v["storage"]["files"].as_array().expect("files") {
        let path = f["path"].as_str().unwrap().to_string();
        let src = f["contents"]["source"].as_str().unwrap();
        if !src.starts_with("data:") {
            continue; // the helper binary, fetched by URL
        }
        let data = decode_data_url(src, f["contents"]["compression"].as_str());
        let mode = f["mode"].as_u64().expect("every file has a mode");
        out.push((format!("ignition {path}"), data, mode & 0o004 != 0));
    }
    for u in v["systemd"]["units"].as_array().expect("units") {
        if let Some(c) = u["contents"].as_str() {
            let name = u["name"].as_str().unwrap();
            out.push((format!("ignition unit {name}"), c.as_bytes().to_vec(), true));
        }
    }
    for u in v["passwd"]["users"].as_array().expect("users") {
        out.push((
            format!("ignition passwd user {}", u["name"]),
            u.to_string().into_bytes(),
            true,
        ));
    }
    out
}

fn world_readable(files: &[(String, Vec<u8>, bool)]) -> Vec<(String, Vec<u8>)> {
    files
        .iter()
        .filter(|(_, _, w)| *w)
        .map(|(p, d, _)| (p.clone(), d.clone()))
        .collect()
}

struct Rendered {
    label: String,
    tree: HostTree,
    ignition_tree: HostTree,
}

#[test]
fn no_secret_is_in_a_world_readable_file_of_the_tree_or_the_ignition_config() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    let mut rendered = Vec::new();
    let mut profile_needles = Vec::new();
    for profile_name in ["services", "monitoring"] {
        let (text, needles) = overlay(profile_name);
        let ov = tmp.path().join(format!("{profile_name}-secrets.toml"));
        std::fs::write(&ov, text).unwrap();
        profile_needles.extend(needles);
        for env in ["production", "staging"] {
            let path = repo().join("profiles").join(format!("{profile_name}.toml"));
            let host = profile::load(
                &path,
                &LoadOptions {
                    env: Some(env.into()),
                    overlays: vec![ov.clone()],
                },
            )
            .unwrap();
            // The bucket credentials the operator puts beside the generated keys.
            let hdir = root.join(host.name());
            std::fs::create_dir_all(&hdir).unwrap();
            let tag = format!("{}{}", host.name().len(), host.name().replace('-', ""));
            std::fs::write(
                hdir.join("s3.env"),
                format!(
                    "AWS_ACCESS_KEY_ID=AKIATEST{tag:0<12}\nAWS_SECRET_ACCESS_KEY=s3secret/{tag}/wJalrXUtnFEMIK7MDENG\n"
                ),
            )
            .unwrap();
            let input = render::gather(host, &SecretsRoot::new(&root)).unwrap();
            rendered.push(Rendered {
                label: format!("{profile_name}/{env}"),
                tree: render::render(&input, Target::Image).unwrap(),
                ignition_tree: render::render(&input, Target::Ignition).unwrap(),
            });
        }
    }
    let mut needles = secrets_needles(&root);
    needles.extend(profile_needles);
    for kind in [
        "wireguard.key",
        "ssh_host_ed25519_key",
        "snapshot-encryption.key",
        "snapshot-signing.key",
        "s3.env",
        "app/",
    ] {
        assert!(
            needles.iter().any(|(w, _)| w.contains(kind)),
            "no secret taken from {kind}: the needle list is wrong"
        );
    }

    let mut hits = Vec::new();
    let mut seen = vec![false; needles.len()];
    for r in &rendered {
        let all: Vec<(String, Vec<u8>, bool)> = tree_files(&r.tree)
            .into_iter()
            .chain(ignition_files(&r.ignition_tree))
            .collect();
        // Not vacuous: every needle must be somewhere in some output, root-only or not.
        for (i, (_, n)) in needles.iter().enumerate() {
            if all
                .iter()
                .any(|(_, d, _)| d.windows(n.len()).any(|w| w == n.as_bytes()))
            {
                seen[i] = true;
            }
        }
        hits.extend(
            scan(&world_readable(&all), &needles)
                .into_iter()
                .map(|h| format!("{}: {h}", r.label)),
        );
    }
    let unseen: Vec<&String> = needles
        .iter()
        .zip(&seen)
        .filter(|(_, s)| !**s)
        .map(|((w, _), _)| w)
        // The builder's key signs images; it never goes into a host's output.
        .filter(|w| !w.starts_with("builder"))
        .collect();
    assert!(
        unseen.is_empty(),
        "secrets in no output at all (the scan would miss them): {unseen:?}"
    );
    assert!(
        hits.is_empty(),
        "secrets in world-readable files:\n  {}",
        hits.join("\n  ")
    );
}

#[test]
fn the_scan_finds_a_secret_made_world_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("secrets");
    let path = repo().join("profiles/services.toml");
    let host = profile::load(&path, &LoadOptions::default()).unwrap();
    let input = render::gather(host, &SecretsRoot::new(&root)).unwrap();
    let needles = secrets_needles(&root);
    let wg = needles
        .iter()
        .find(|(w, _)| w.ends_with("wireguard.key"))
        .expect("wireguard key needle")
        .clone();
    for target in [Target::Image, Target::Ignition] {
        let mut tree = render::render(&input, target).unwrap();
        let clean: Vec<(String, Vec<u8>, bool)> = match target {
            Target::Image => tree_files(&tree),
            Target::Ignition => ignition_files(&tree),
        };
        assert!(scan(&world_readable(&clean), &needles).is_empty());
        // The WireGuard key file made 0644: found in the tree and, through its data URL,
        // in the Ignition config.
        tree.entries
            .get_mut("/etc/systemd/network/wg0.key")
            .expect("wg0.key in the tree")
            .mode = 0o644;
        let planted = match target {
            Target::Image => tree_files(&tree),
            Target::Ignition => ignition_files(&tree),
        };
        let hits = scan(&world_readable(&planted), &needles);
        assert!(
            hits.iter()
                .any(|h| h.contains(&wg.0) && h.contains("wg0.key")),
            "{target:?}: the planted key was not found: {hits:?}"
        );
    }
    // A secret pasted into a unit (Ignition writes units 0644) is found as well.
    let mut tree = render::render(&input, Target::Ignition).unwrap();
    tree.file(
        "/etc/systemd/system/planted.service",
        0o644,
        format!("[Service]\nEnvironment=K={}\n", wg.1),
    )
    .unwrap();
    let hits = scan(&world_readable(&ignition_files(&tree)), &needles);
    assert!(
        hits.iter().any(|h| h.contains("unit planted.service")),
        "{hits:?}"
    );
}
