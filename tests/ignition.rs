//! Ignition output of both profiles × both environments × each spec version:
//! valid against the official schema, every data URL decodes to its hash, no
//! duplicate paths, quadlets are files, units enabled, secrets file 0600.

mod common;
use base64::Engine;
use common::*;
use flate2::read::GzDecoder;
use sha2::{Digest, Sha512};
use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;

fn decode_data_url(src: &str, compression: Option<&str>) -> Vec<u8> {
    let rest = src.strip_prefix("data:").expect("data URL");
    let (meta, data) = rest.split_once(',').unwrap();
    let raw = if meta.ends_with(";base64") {
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap()
    } else {
        let b = data.as_bytes();
        let mut out = vec![];
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(
                    u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap(),
                );
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
            GzDecoder::new(&raw[..]).read_to_end(&mut s).unwrap();
            s
        }
        None => raw,
        Some(o) => panic!("unexpected compression {o}"),
    }
}

#[test]
fn ignition_configs_validate_against_the_official_schemas() {
    require_tool(
        &["python3", "-c", "import jsonschema"],
        "python3 jsonschema",
    );
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    let mut checked = 0;
    for profile in ["services", "monitoring"] {
        for env in ["production", "staging"] {
            for version in ["3.4.0", "3.5.0", "3.6.0"] {
                let out = tmp.path().join(format!("{profile}-{env}-{version}.ign"));
                let stdout = run_ok(
                    &[
                        profile,
                        "--env",
                        env,
                        "--allow-missing-credentials",
                        "--out",
                        out.to_str().unwrap(),
                        "--secrets",
                        secrets.to_str().unwrap(),
                        "--ignition-version",
                        version,
                        "--helper-url",
                        "https://downloads.example.org/imgbuild-0.1.0",
                        "--json",
                    ],
                    &repo(),
                );
                let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                assert_eq!(summary["format"], "ignition");
                let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{} holds keys: must be 0600", out.display());
                let schema = repo()
                    .join("tests/data/ignition-schema")
                    .join(format!("v{}.json", version[..3].replace('.', "_")));
                assert!(
                    schema.is_file(),
                    "official schema {} missing (tests/data/ignition-schema)",
                    schema.display()
                );
                let py = "import json,sys,jsonschema\nschema=json.load(open(sys.argv[1]))\ncfg=json.load(open(sys.argv[2]))\njsonschema.Draft7Validator(schema).validate(cfg)\nprint('valid')";
                let res = std::process::Command::new("python3")
                    .args(["-c", py])
                    .arg(&schema)
                    .arg(&out)
                    .output()
                    .unwrap();
                assert!(
                    res.status.success(),
                    "{} does not validate against {}:\n{}",
                    out.display(),
                    schema.display(),
                    String::from_utf8_lossy(&res.stderr)
                );

                // A large config ships gzip'd inside an outer one: both must validate.
                let outer = std::fs::read(&out).unwrap();
                // The smallest user-data cap among common providers (AWS: 16 KiB).
                assert!(
                    outer.len() <= 16 * 1024,
                    "{} is {} bytes: over the 16 KiB user-data limit",
                    out.display(),
                    outer.len()
                );
                let inner = imgbuild::emit::ignition::unwrap_config(&outer).unwrap();
                let inner_path = tmp.path().join("inner.json");
                std::fs::write(&inner_path, &inner).unwrap();
                let res = std::process::Command::new("python3")
                    .args(["-c", py])
                    .arg(&schema)
                    .arg(&inner_path)
                    .output()
                    .unwrap();
                assert!(
                    res.status.success(),
                    "inner config of {} does not validate:\n{}",
                    out.display(),
                    String::from_utf8_lossy(&res.stderr)
                );
                let cfg: serde_json::Value = serde_json::from_slice(&inner).unwrap();
                assert_eq!(cfg["ignition"]["version"], version);
                let mut paths = BTreeSet::new();
                let mut nm_keyfiles = 0;
                // The build ships the running binary as the helper.
                let helper_hash = format!(
                    "sha512-{}",
                    hex::encode(Sha512::digest(
                        std::fs::read(env!("CARGO_BIN_EXE_imgbuild")).unwrap()
                    ))
                );
                for f in cfg["storage"]["files"].as_array().unwrap() {
                    let path = f["path"].as_str().unwrap();
                    assert!(paths.insert(path.to_string()), "duplicate path {path}");
                    assert!(f["mode"].is_u64(), "{path}: mode must be a decimal number");
                    let src = f["contents"]["source"].as_str().unwrap();
                    if path == "/usr/local/bin/imgbuild" {
                        // Fetched at first boot: only its hash vouches for it.
                        assert!(src.starts_with("https://"));
                        assert_eq!(f["mode"], 0o755);
                        assert_eq!(
                            f["contents"]["verification"]["hash"],
                            helper_hash.as_str(),
                            "the helper's hash is not the binary's"
                        );
                        continue;
                    }
                    // Inline data needs no hash (it is inside the config); it must decode.
                    assert!(src.starts_with("data:"), "{path}: {src}");
                    assert!(f["contents"]["verification"].is_null(), "{path}");
                    let data = decode_data_url(src, f["contents"]["compression"].as_str());
                    if path.starts_with("/etc/NetworkManager/system-connections/") {
                        // Fedora CoreOS brings WireGuard up from this keyfile.
                        let text = String::from_utf8_lossy(&data);
                        assert_eq!(f["mode"], 0o600, "{path} holds the private key");
                        for want in [
                            "type=wireguard",
                            "private-key=",
                            "[wireguard-peer.",
                            "allowed-ips=10.",
                            "address1=10.",
                        ] {
                            assert!(text.contains(want), "{path} lacks {want}:\n{text}");
                        }
                        nm_keyfiles += 1;
                    }
                }
                assert_eq!(nm_keyfiles, 1, "one NetworkManager WireGuard keyfile");
                for l in cfg["storage"]["links"].as_array().unwrap() {
                    assert!(
                        paths.insert(l["path"].as_str().unwrap().to_string()),
                        "duplicate link path"
                    );
                }
                let quadlets: Vec<_> = paths
                    .iter()
                    .filter(|p| p.starts_with("/etc/containers/systemd/"))
                    .collect();
                assert!(
                    quadlets.iter().any(|p| p.ends_with(".container"))
                        && quadlets.iter().any(|p| p.ends_with(".volume"))
                );
                let units = cfg["systemd"]["units"].as_array().unwrap();
                let mut names = BTreeSet::new();
                for u in units {
                    let name = u["name"].as_str().unwrap();
                    assert!(names.insert(name), "duplicate unit {name}");
                    for ext in [".container", ".volume", ".network", ".pod"] {
                        assert!(
                            !name.ends_with(ext),
                            "quadlet {name} must be a file, not a unit"
                        );
                    }
                }
                for want in [
                    "imgbuild-firstboot.service",
                    "imgbuild-backup.timer",
                    "imgbuild-ready.service",
                    "nftables.service",
                ] {
                    let u = units
                        .iter()
                        .find(|u| u["name"] == want)
                        .unwrap_or_else(|| panic!("{want} missing"));
                    assert_eq!(u["enabled"], true, "{want} not enabled");
                }
                assert!(units
                    .iter()
                    .any(|u| u["name"] == "imgbuild-firstboot.service"
                        && u["contents"]
                            .as_str()
                            .unwrap()
                            .contains("ExecStart=/usr/local/bin/imgbuild firstboot")));
                let users = cfg["passwd"]["users"].as_array().unwrap();
                assert_eq!(users[0]["name"], "admin");
                assert!(!users[0]["sshAuthorizedKeys"].as_array().unwrap().is_empty());
                let size = outer.len();
                assert!(
                    size <= 32 * 1024,
                    "{profile}: {size} bytes is over common user-data limits"
                );
                println!(
                    "{profile}/{env}/{version}: {size} bytes as written ({} inner), {} files, {} units",
                    inner.len(),
                    paths.len(),
                    units.len()
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn ignition_without_helper_url_is_an_error_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.ign");
    let res = imgbuild()
        .current_dir(repo())
        .args([
            "services",
            "--allow-missing-credentials",
            "--out",
            out.to_str().unwrap(),
            "--secrets",
            tmp.path().join("s").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1));
    assert!(
        stderr.contains("--helper-url") && stderr.contains("hint"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn ignition_output_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let a = tmp.path().join("a.ign");
    let b = tmp.path().join("b.ign");
    for o in [&a, &b] {
        run_ok(
            &[
                "services",
                "--allow-missing-credentials",
                "--out",
                o.to_str().unwrap(),
                "--secrets",
                s.to_str().unwrap(),
                "--helper-url",
                "s3://bucket/imgbuild",
            ],
            &repo(),
        );
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}
