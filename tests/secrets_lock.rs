//! Secrets at rest: a locked secrets dir (age, passphrase or X25519 identity) builds
//! the same output as the plain one, decrypting in memory only; wrong keys fail clearly.

mod common;
#[path = "snapshot-fixtures/common.rs"]
mod snapfix;
use age::secrecy::ExposeSecret;
use common::*;
use std::os::unix::fs::PermissionsExt;

fn build(
    dir: &std::path::Path,
    secrets: &std::path::Path,
    out: &str,
    envs: &[(&str, &str)],
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = imgbuild();
    cmd.current_dir(repo())
        .env_remove("IMGBUILD_PASSPHRASE")
        .env_remove("IMGBUILD_AGE_IDENTITY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.args([
        "services",
        "--allow-missing-credentials",
        "--out",
        dir.join(out).to_str().unwrap(),
        "--secrets",
        secrets.to_str().unwrap(),
        "--helper-url",
        "https://example.org/imgbuild",
    ])
    .args(extra);
    cmd.output().unwrap()
}

/// `build` without extra environment, which must succeed.
fn build_ok(dir: &std::path::Path, secrets: &std::path::Path, out: &str, extra: &[&str]) {
    let o = build(dir, secrets, out, &[], extra);
    assert!(
        o.status.success(),
        "building {out}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A new age identity written to `dir/name`.
fn identity_file(dir: &std::path::Path, name: &str) -> (age::x25519::Identity, std::path::PathBuf) {
    let id = age::x25519::Identity::generate();
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", id.to_string().expose_secret())).unwrap();
    (id, path)
}

/// Locks `secrets` to a new identity, which must succeed; returns the identity file.
fn lock_to_new_identity(dir: &std::path::Path, secrets: &std::path::Path) -> std::path::PathBuf {
    let (id, path) = identity_file(dir, "me.key");
    let res = imgbuild()
        .args([
            "secrets",
            "lock",
            "--secrets",
            secrets.to_str().unwrap(),
            "-r",
        ])
        .arg(id.to_public().to_string())
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    path
}

fn tree_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    for e in walk(dir) {
        out.push((
            e.strip_prefix(dir).unwrap().display().to_string(),
            std::fs::read(&e).unwrap(),
        ));
    }
    out.sort();
    out
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = vec![];
    for e in std::fs::read_dir(d).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            v.extend(walk(&e.path()));
        } else {
            v.push(e.path());
        }
    }
    v
}

/// `imgbuild secrets lock|unlock` with the test passphrase, which must succeed.
fn secrets_with_passphrase(verb: &str, secrets: &std::path::Path) {
    let res = imgbuild()
        .env("LOCK_PASS", "correct horse battery staple")
        .args([
            "secrets",
            verb,
            "--secrets",
            secrets.to_str().unwrap(),
            "--passphrase-env",
            "LOCK_PASS",
        ])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "secrets {verb}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

#[test]
fn passphrase_locked_secrets_build_the_same_config() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    let plain = build(tmp.path(), &secrets, "plain.ign", &[], &[]);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let before = tree_files(&secrets);

    secrets_with_passphrase("lock", &secrets);
    assert!(!secrets.exists(), "plain directory removed after locking");
    let locked = tmp.path().join("secrets.age");
    assert_eq!(
        std::fs::metadata(&locked).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let blob = std::fs::read(&locked).unwrap();
    assert!(blob.starts_with(b"age-encryption.org/v1"));
    let wg = &before
        .iter()
        .find(|(n, _)| n == "vps1/wireguard.key")
        .unwrap()
        .1;
    assert!(
        !blob.windows(wg.len()).any(|w| w == &wg[..]),
        "key in clear in the locked file"
    );

    let good = build(
        tmp.path(),
        &secrets,
        "locked.ign",
        &[("IMGBUILD_PASSPHRASE", "correct horse battery staple")],
        &[],
    );
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert_eq!(
        std::fs::read(tmp.path().join("plain.ign")).unwrap(),
        std::fs::read(tmp.path().join("locked.ign")).unwrap(),
        "same output from locked and plain secrets"
    );
    assert!(
        !secrets.exists(),
        "a locked build wrote plaintext secrets to disk"
    );

    let wrong = build(
        tmp.path(),
        &secrets,
        "wrong.ign",
        &[("IMGBUILD_PASSPHRASE", "wrong")],
        &[],
    );
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(err.contains("cannot decrypt"), "{err}");
    assert!(!tmp.path().join("wrong.ign").exists());
    let none = build(tmp.path(), &secrets, "none.ign", &[], &[]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("IMGBUILD_PASSPHRASE"));
    assert!(!secrets.exists());

    secrets_with_passphrase("unlock", &secrets);
    assert_eq!(tree_files(&secrets), before, "unlock restores every file");
    assert!(!locked.exists());
}

#[test]
fn identity_locked_secrets_build_and_a_wrong_identity_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    assert!(build(tmp.path(), &secrets, "plain.ign", &[], &[])
        .status
        .success());
    // The disk image too (builds are reproducible, so equal inputs give equal bytes).
    build_ok(tmp.path(), &secrets, "plain.raw", &[]);
    let id_file = lock_to_new_identity(tmp.path(), &secrets);
    // An identity the root was not locked to.
    let (_, other_file) = identity_file(tmp.path(), "other.key");
    let identity = ["--identity", id_file.to_str().unwrap()];
    build_ok(tmp.path(), &secrets, "locked.ign", &identity);
    assert_eq!(
        std::fs::read(tmp.path().join("plain.ign")).unwrap(),
        std::fs::read(tmp.path().join("locked.ign")).unwrap()
    );
    build_ok(tmp.path(), &secrets, "locked.raw", &identity);
    assert_eq!(
        file_sha256(&tmp.path().join("plain.raw")),
        file_sha256(&tmp.path().join("locked.raw")),
        "a locked secrets dir built a different disk image"
    );
    // The work files (which hold the tree, keys included) go with the build.
    for f in walk(tmp.path()) {
        assert!(
            !f.to_string_lossy().contains(".imgbuild-work-"),
            "work file left behind: {}",
            f.display()
        );
    }
    let bad = build(
        tmp.path(),
        &secrets,
        "bad.ign",
        &[],
        &["--identity", other_file.to_str().unwrap()],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot decrypt"));
    assert!(!tmp.path().join("bad.ign").exists());
}

fn file_sha256(p: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// The workstation's snapshot verbs read the snapshot keys from a locked root in memory:
/// `imgbuild snapshots` lists what a backup made with the plain keys, with the identity
/// and without any key file on disk.
#[test]
fn snapshot_verbs_read_keys_from_a_locked_root() {
    use imgbuild::snapshot::{Keys, Store, StoreConfig};
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    assert!(build(tmp.path(), &secrets, "plain.ign", &[], &[])
        .status
        .success());
    let moto = snapfix::moto();
    let bucket = snapfix::unique("locked").to_lowercase();
    let cfg = StoreConfig {
        bucket: bucket.clone(),
        prefix: "vps1-locked".into(),
        endpoint: Some(moto.endpoint.clone()),
        region: "us-east-1".into(),
        path_style: true,
        ..Default::default()
    };
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let data = tmp.path().join("www");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("index.html"), "locked\n").unwrap();
    let keys = Keys::load(
        &secrets.join("vps1/snapshot-encryption.key"),
        &secrets.join("vps1/snapshot-signing.key"),
    )
    .unwrap();
    let id = snapfix::rt().block_on(async {
        let s = Store::connect(&cfg).await.unwrap();
        s.client()
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        snapfix::backup_volume(&s, &keys, "www", &data, "vps1")
            .await
            .id
    });

    let id_file = lock_to_new_identity(tmp.path(), &secrets);
    assert!(
        !secrets.join("vps1/snapshot-encryption.key").exists(),
        "lock left the plain key on disk"
    );
    let list = |identity: Option<&std::path::Path>| {
        let mut cmd = imgbuild();
        cmd.current_dir(repo())
            .env_remove("IMGBUILD_PASSPHRASE")
            .env_remove("IMGBUILD_AGE_IDENTITY")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test");
        if let Some(i) = identity {
            cmd.env("IMGBUILD_AGE_IDENTITY", i);
        }
        cmd.args(["snapshots", "services", "--json", "--secrets"])
            .arg(&secrets)
            .args([
                "--bucket",
                &bucket,
                "--prefix",
                "vps1-locked",
                "--endpoint",
                &moto.endpoint,
            ])
            .output()
            .unwrap()
    };
    let ok = list(Some(&id_file));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && out.contains(&id),
        "snapshots with a locked root: {out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let locked = list(None);
    assert!(!locked.status.success());
    assert!(
        String::from_utf8_lossy(&locked.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&locked.stderr)
    );
    assert!(!secrets.join("vps1/snapshot-encryption.key").exists());
}
