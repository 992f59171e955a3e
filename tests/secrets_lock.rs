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

/// Locks `secrets` to a new identity, which must succeed (and, being checked with
/// that identity, remove the directory); returns the identity file.
fn lock_to_new_identity(dir: &std::path::Path, secrets: &std::path::Path) -> std::path::PathBuf {
    let (_, path) = identity_file(dir, "me.key");
    let res = imgbuild()
        .args(["secrets", "lock", "--secrets"])
        .arg(secrets)
        .arg("--identity")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(!secrets.exists(), "a checked lock removes the directory");
    path
}

/// `imgbuild secrets ARGS...` on the secrets root `secrets`.
fn secrets_cmd(secrets: &std::path::Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut cmd = imgbuild();
    cmd.env_remove("IMGBUILD_PASSPHRASE")
        .env_remove("IMGBUILD_AGE_IDENTITY")
        .arg("secrets")
        .arg(args[0])
        .arg("--secrets")
        .arg(secrets)
        .args(&args[1..]);
    cmd.output().unwrap()
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

/// Locking to a recipient alone proves nothing about whether the archive opens (the
/// identity may be lost, or mistyped into another key's recipient): the keys stay in
/// the directory, builds keep working from it, and only `--confirm-with` with an
/// identity that opens the archive removes the directory. A wrong identity, or an
/// archive that no longer matches the directory, removes nothing.
#[test]
fn recipient_only_lock_keeps_the_keys_until_an_identity_opens_the_archive() {
    use std::ffi::OsStr;
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    build_ok(tmp.path(), &secrets, "plain.ign", &[]);
    let before = tree_files(&secrets);
    let (id, id_file) = identity_file(tmp.path(), "me.key");
    let (_, other_file) = identity_file(tmp.path(), "other.key");
    let recipient = id.to_public().to_string();

    let res = secrets_cmd(
        &secrets,
        &[OsStr::new("lock"), "-r".as_ref(), recipient.as_ref()],
    );
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(out.contains("--confirm-with"), "{out}");
    assert_eq!(
        tree_files(&secrets),
        before,
        "a lock to a recipient alone removed or changed the plain keys"
    );
    let locked = tmp.path().join("secrets.age");
    assert!(locked.is_file());
    // Builds still read the plain directory.
    build_ok(tmp.path(), &secrets, "pending.ign", &[]);
    assert_eq!(
        std::fs::read(tmp.path().join("plain.ign")).unwrap(),
        std::fs::read(tmp.path().join("pending.ign")).unwrap()
    );

    // A second lock never replaces the archive (it may hold keys the directory lacks).
    let again = secrets_cmd(
        &secrets,
        &[OsStr::new("lock"), "-r".as_ref(), recipient.as_ref()],
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Unlock does not guess which of the two is right.
    let un = secrets_cmd(
        &secrets,
        &[
            OsStr::new("unlock"),
            "--identity".as_ref(),
            id_file.as_ref(),
        ],
    );
    assert!(!un.status.success());
    assert!(
        String::from_utf8_lossy(&un.stderr).contains("--confirm-with"),
        "{}",
        String::from_utf8_lossy(&un.stderr)
    );
    assert_eq!(tree_files(&secrets), before);

    // An identity that does not open it: nothing removed, a clear error.
    let wrong = secrets_cmd(
        &secrets,
        &[
            OsStr::new("lock"),
            "--confirm-with".as_ref(),
            other_file.as_ref(),
        ],
    );
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(
        err.contains("does not open") && err.contains("nothing was removed"),
        "{err}"
    );
    assert_eq!(tree_files(&secrets), before);

    // A key added after the archive was written is not in it: nothing removed.
    std::fs::write(secrets.join("vps1/late.key"), "added after locking\n").unwrap();
    let stale = secrets_cmd(
        &secrets,
        &[
            OsStr::new("lock"),
            "--confirm-with".as_ref(),
            id_file.as_ref(),
        ],
    );
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success());
    assert!(err.contains("vps1/late.key is not in the archive"), "{err}");
    assert!(secrets.join("vps1/late.key").is_file());
    std::fs::remove_file(secrets.join("vps1/late.key")).unwrap();

    // The right identity: checked, then the directory goes.
    let ok = secrets_cmd(
        &secrets,
        &[
            OsStr::new("lock"),
            "--confirm-with".as_ref(),
            id_file.as_ref(),
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!secrets.exists());
    build_ok(
        tmp.path(),
        &secrets,
        "locked.ign",
        &["--identity", id_file.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read(tmp.path().join("plain.ign")).unwrap(),
        std::fs::read(tmp.path().join("locked.ign")).unwrap()
    );
    let un = secrets_cmd(
        &secrets,
        &[
            OsStr::new("unlock"),
            "--identity".as_ref(),
            id_file.as_ref(),
        ],
    );
    assert!(
        un.status.success(),
        "{}",
        String::from_utf8_lossy(&un.stderr)
    );
    assert_eq!(tree_files(&secrets), before, "unlock restores every file");
    assert!(!locked.exists());
}

/// `verify_archive`, the check every lock passes before deleting anything: it accepts
/// the archive `lock` wrote and refuses a tampered one, one that lacks a file, one
/// whose file differs, and a wrong key, each with a message naming the problem.
#[test]
fn verify_archive_refuses_tampered_or_different_archives() {
    use imgbuild::secrets::{self, LockTo, Locked, SecretsRoot, Unlock};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("secrets");
    std::fs::create_dir_all(dir.join("vps1")).unwrap();
    std::fs::write(dir.join("vps1/snapshot-encryption.key"), "ab".repeat(32)).unwrap();
    std::fs::write(dir.join("vps1/s3.env"), "AWS_ACCESS_KEY_ID=x\n").unwrap();
    // Big enough for two age payload chunks (64 KiB each).
    std::fs::write(dir.join("big"), vec![7u8; 100_000]).unwrap();
    let pass = Unlock {
        identity: None,
        passphrase: Some("pw".into()),
    };
    // A passphrase lock checks and removes; unlock gives the files back.
    let lp = match secrets::lock(&SecretsRoot::new(&dir), &LockTo::Passphrase("pw".into())) {
        Ok(Locked::Done(p)) => p,
        other => panic!("{other:?}"),
    };
    assert!(!dir.exists());
    secrets::unlock(&dir, &pass).unwrap();
    // A recipient-only lock writes the archive and keeps the directory.
    let id = age::x25519::Identity::generate();
    let id_path = tmp.path().join("id.key");
    std::fs::write(&id_path, format!("{}\n", id.to_string().expose_secret())).unwrap();
    let by_id = Unlock {
        identity: Some(id_path.clone()),
        passphrase: None,
    };
    let to = LockTo::Recipients(vec![id.to_public().to_string()]);
    assert_eq!(
        secrets::lock(&SecretsRoot::new(&dir), &to).unwrap(),
        Locked::Pending(lp.clone())
    );
    assert!(dir.join("vps1/snapshot-encryption.key").is_file());
    secrets::verify_archive(&dir, &lp, &by_id).expect("the archive lock wrote");
    let good = std::fs::read(&lp).unwrap();
    let err = |bytes: &[u8], u: &Unlock| {
        let p = tmp.path().join("probe.age");
        std::fs::write(&p, bytes).unwrap();
        secrets::verify_archive(&dir, &p, u)
            .expect_err("must be refused")
            .to_string()
    };

    // One flipped bit in the payload (past the header) or in the header.
    for at in [good.len() - 20, good.len() / 2, 40] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        let e = err(&bad, &by_id);
        assert!(e.contains("does not open"), "byte {at}: {e}");
    }
    // Cut short.
    let e = err(&good[..good.len() - 100], &by_id);
    assert!(e.contains("does not open"), "{e}");
    // Another identity.
    let other = tmp.path().join("other.key");
    std::fs::write(
        &other,
        format!(
            "{}\n",
            age::x25519::Identity::generate()
                .to_string()
                .expose_secret()
        ),
    )
    .unwrap();
    let e = err(
        &good,
        &Unlock {
            identity: Some(other),
            passphrase: None,
        },
    );
    assert!(e.contains("cannot decrypt"), "{e}");

    // Opens fine but is not this directory: a file changed, one missing, one extra.
    std::fs::write(dir.join("vps1/s3.env"), "AWS_ACCESS_KEY_ID=y\n").unwrap();
    let e = err(&good, &by_id);
    assert!(e.contains("vps1/s3.env differs"), "{e}");
    std::fs::write(dir.join("vps1/s3.env"), "AWS_ACCESS_KEY_ID=x\n").unwrap();
    std::fs::write(dir.join("vps1/new.key"), "new").unwrap();
    let e = err(&good, &by_id);
    assert!(e.contains("vps1/new.key is not in the archive"), "{e}");
    std::fs::remove_file(dir.join("vps1/new.key")).unwrap();
    std::fs::remove_file(dir.join("big")).unwrap();
    let e = err(&good, &by_id);
    assert!(
        e.contains("big is in the archive but not in the directory"),
        "{e}"
    );
    std::fs::write(dir.join("big"), vec![7u8; 100_000]).unwrap();
    // After all that, the real archive still checks and confirms.
    secrets::confirm_lock(&SecretsRoot::new(&dir), &by_id).unwrap();
    assert!(!dir.exists());
}

/// A symlink in the secrets directory cannot go into the archive; locking refuses
/// rather than delete it unarchived.
#[test]
fn lock_refuses_what_the_archive_cannot_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = tmp.path().join("secrets");
    std::fs::create_dir_all(secrets.join("vps1")).unwrap();
    std::fs::write(tmp.path().join("real.env"), "AWS_ACCESS_KEY_ID=x\n").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("real.env"), secrets.join("vps1/s3.env")).unwrap();
    let err = imgbuild::secrets::lock(
        &imgbuild::secrets::SecretsRoot::new(&secrets),
        &imgbuild::secrets::LockTo::Passphrase("pw".into()),
    )
    .expect_err("a symlink must be refused")
    .to_string();
    assert!(err.contains("s3.env") && err.contains("symlink"), "{err}");
    assert!(secrets.join("vps1/s3.env").exists());
    assert!(!tmp.path().join("secrets.age").exists());
}
