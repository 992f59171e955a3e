//! Disk image tests without booting: reproducibility, verify (raw and qcow2, every
//! tampered range named, wrong key), and the base's own quadlet generator accepting the
//! quadlets. They build real images from the cached trixie base (the first run builds
//! the base with mmdebstrap, about two minutes).

#[path = "common.rs"]
mod common;

use common::*;
use imgbuild::image::{self, DiskFormat, ImageError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn helper() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"))
}

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).expect("write byte");
}

fn verify_fails_naming(image_path: &Path, what: &str) {
    let key = signing_key().verifying_key();
    match image::verify(image_path, &key) {
        Err(ImageError::VerifyFailed { mismatches, .. }) => {
            let all = mismatches.join("; ");
            assert!(
                all.contains(what),
                "verify should name {what:?}, said: {all}"
            );
        }
        Err(e) => panic!("verify failed with an unexpected error: {e}"),
        Ok(_) => panic!("verify passed after tampering with {what}"),
    }
}

#[test]
fn builds_are_reproducible_and_verify_names_every_tampered_range() {
    let dir = scratch("image-verify");
    let keys = keys(&dir);
    let tree = test_tree(&keys);
    let oci = dir.join("hello.oci.tar");
    hello_archive(&oci);
    let baked = vec![(HELLO_ARCHIVE.to_string(), oci.clone())];

    let a = dir.join("a/qemutest.raw");
    let b = dir.join("b/qemutest.raw");
    let t = std::time::Instant::now();
    let ra = build(&tree, &a, DiskFormat::Raw, &helper(), baked.clone());
    eprintln!(
        "first build: {:.1}s {:?}",
        t.elapsed().as_secs_f64(),
        ra.timings
    );
    let t = std::time::Instant::now();
    let rb = build(&tree, &b, DiskFormat::Raw, &helper(), baked.clone());
    eprintln!(
        "second build: {:.1}s {:?}",
        t.elapsed().as_secs_f64(),
        rb.timings
    );
    assert_eq!(
        sha256_file(&a),
        sha256_file(&b),
        "two builds of the same inputs differ"
    );
    assert_eq!(
        std::fs::read(&ra.manifest).unwrap(),
        std::fs::read(&rb.manifest).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "image holds secrets: must be 0600");

    let key = signing_key().verifying_key();
    let rep = image::verify(&a, &key).expect("fresh raw image verifies");
    assert_eq!(rep.manifest_source, "sidecar");
    for r in ["gpt-primary", "esp", "root", "var", "gpt-backup"] {
        assert!(rep.checked.iter().any(|c| c == r), "{r} not checked");
    }

    // Another key: the signature is what fails, and is named.
    let other = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    match image::verify(&a, &other) {
        Err(ImageError::VerifyFailed { mismatches, .. }) => {
            assert!(mismatches.join(" ").contains("signature"), "{mismatches:?}")
        }
        other => panic!("verify with another key must fail on the signature: {other:?}"),
    }

    // One flipped byte in each range → verify names that range; flip back → passes.
    let m = &rep.manifest;
    let region = |n: &str| m.regions.iter().find(|r| r.name == n).unwrap().clone();
    let cases = [
        (
            region("gpt-primary").offset + 512 + 24,
            "GPT (protective MBR, primary",
        ),
        (
            region("esp").offset + region("esp").length / 3,
            "partition esp",
        ),
        (
            region("root").offset + region("root").length / 2,
            "partition root",
        ),
        (region("var").offset + 4096 * 3, "partition var"),
        (m.disk_size - 512 + 24, "GPT (backup"),
    ];
    for (off, what) in cases {
        flip(&a, off);
        verify_fails_naming(&a, what);
        flip(&a, off);
    }
    image::verify(&a, &key).expect("restored image verifies again");

    // The manifest inside the image alone is enough.
    std::fs::rename(&ra.manifest, dir.join("side.json")).unwrap();
    let rep = image::verify(&a, &key).expect("embedded manifest verifies");
    assert_eq!(rep.manifest_source, "embedded");
    std::fs::rename(dir.join("side.json"), &ra.manifest).unwrap();

    // qcow2 (zstd) of the same inputs verifies with the same manifest.
    let q = dir.join("q/qemutest.qcow2");
    let t = std::time::Instant::now();
    let rq = build(&tree, &q, DiskFormat::Qcow2, &helper(), baked);
    eprintln!(
        "qcow2 build: {:.1}s, {} bytes {:?}",
        t.elapsed().as_secs_f64(),
        rq.size_bytes,
        rq.timings
    );
    assert_eq!(
        std::fs::read(&rq.manifest).unwrap(),
        std::fs::read(&ra.manifest).unwrap()
    );
    image::verify(&q, &key).expect("fresh qcow2 verifies");
    let other_q = image::verify(&q, &other);
    assert!(other_q.is_err(), "qcow2 must not verify with another key");
}

#[test]
fn the_base_quadlet_generator_accepts_the_quadlets_without_warnings() {
    let dir = scratch("image-quadlet");
    let (base, _) = image::base::ensure(
        &base_def(),
        &imgbuild::image::default_cache_dir(),
        false,
        None,
        &imgbuild::progress::Progress::detect(false),
    )
    .expect("base builds or is cached");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let tar = require("tar", "sudo apt-get install tar");
    let st = Command::new(tar)
        .arg("-xf")
        .arg(base.rootfs_tar())
        .arg("-C")
        .arg(&root)
        .args(["--exclude=./dev/*", "--no-same-owner"])
        .status()
        .expect("run tar");
    assert!(st.success(), "extracting the base failed");
    let qdir = root.join("etc/containers/systemd");
    std::fs::create_dir_all(&qdir).unwrap();
    for (name, body) in quadlets() {
        std::fs::write(qdir.join(name), body).unwrap();
    }
    let run_generator = |root: &Path| -> (String, String) {
        let is_root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let mut cmd = if is_root {
            Command::new(require("chroot", "sudo apt-get install coreutils"))
        } else {
            let mut c = Command::new(require("unshare", "sudo apt-get install util-linux"));
            c.args(["--map-root-user", "chroot"]);
            c
        };
        let out = cmd
            .arg(root)
            .args([
                "/usr/lib/systemd/system-generators/podman-system-generator",
                "--dryrun",
            ])
            .output()
            .expect("run the quadlet generator in the base");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "generator failed:\n{stderr}");
        let complaints: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("warn") || l.contains("error") || l.contains("unsupported")
            })
            .collect();
        assert!(complaints.is_empty(), "generator complained:\n{stderr}");
        (stdout, stderr)
    };
    let (stdout, stderr) = run_generator(&root);
    assert!(
        stdout.contains("---hello.service---"),
        "no hello.service generated:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("oci-archive:/usr/share/imgbuild/images/hello.oci.tar"));

    // Every quadlet the renderer makes for the real profiles, through the same generator.
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
    for (profile, env) in [
        ("services", "production"),
        ("services", "staging"),
        ("monitoring", "production"),
    ] {
        let out = dir.join(format!("tree-{profile}-{env}"));
        let st = Command::new(&cli)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["render", profile, "--env", env, "--secrets"])
            .arg(dir.join("secrets"))
            .arg("--out")
            .arg(&out)
            .status()
            .expect("imgbuild render");
        assert!(st.success(), "render {profile}/{env} failed");
        for e in std::fs::read_dir(&qdir).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let mut containers = vec![];
        for e in std::fs::read_dir(out.join("etc/containers/systemd"))
            .unwrap()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".container") {
                containers.push(stem.to_string());
            }
            std::fs::copy(e.path(), qdir.join(&name)).unwrap();
        }
        assert!(containers.len() >= 5, "{profile}: only {containers:?}");
        let (stdout, stderr) = run_generator(&root);
        for c in &containers {
            assert!(
                stdout.contains(&format!("---{c}.service---")),
                "{profile}/{env}: no {c}.service generated:\n{stderr}"
            );
        }
        eprintln!(
            "quadlet generator: {profile}/{env}: {} containers, no warnings",
            containers.len()
        );
    }
}
