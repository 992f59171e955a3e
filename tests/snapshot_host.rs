//! The in-image verbs against moto: the backup timer's job (strategies, metrics,
//! ping) and first boot (restore into podman's volume dir, policies, retries).

#[path = "snapshot-fixtures/common.rs"]
mod common;

use common::*;
use imgbuild::agent::{backup_host, firstboot, FirstbootOutcome, HostPaths};
use imgbuild::hostconfig::{
    BackupConfig, HostConfig, RestorePolicy, Retention, Strategy, VolumeBackup,
};
use imgbuild::progress::Progress;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

fn host_config(
    env: &Env,
    restore: RestorePolicy,
    ping: Option<String>,
    metrics: &Path,
) -> HostConfig {
    HostConfig {
        host: "services".into(),
        env: "staging".into(),
        units: vec![],
        metrics_dir: metrics.display().to_string(),
        backup: Some(BackupConfig {
            bucket: env.cfg.bucket.clone(),
            prefix: env.cfg.prefix.clone(),
            endpoint: env.cfg.endpoint.clone(),
            region: "us-east-1".into(),
            path_style: true,
            schedule: "daily".into(),
            keep: Retention {
                last: 3,
                daily: 7,
                weekly: 4,
                monthly: 6,
            },
            object_lock_days: None,
            accept_unlocked_bucket: false,
            ping_url: ping,
            restore,
            restore_timeout_secs: 3,
            volumes: vec![
                VolumeBackup {
                    name: "pgdata".into(),
                    strategy: Strategy::Stop,
                    hook: None,
                    units: vec!["postgres.service".into()],
                    from: None,
                    postgres: None,
                },
                VolumeBackup {
                    name: "app".into(),
                    strategy: Strategy::Hook,
                    hook: Some(format!(
                        "echo dumped > {}/app/_data/dump.sql",
                        env.path("vols").display()
                    )),
                    units: vec![],
                    from: None,
                    postgres: None,
                },
                VolumeBackup {
                    name: "cache".into(),
                    strategy: Strategy::Live,
                    hook: None,
                    units: vec![],
                    from: None,
                    postgres: None,
                },
            ],
            credentials_file: Some(env.secrets.join("s3.env").display().to_string()),
            encryption_key_file: env
                .secrets
                .join("snapshot-encryption.key")
                .display()
                .to_string(),
            signing_key_file: env
                .secrets
                .join("snapshot-signing.key")
                .display()
                .to_string(),
            packs: Default::default(),
            check: Default::default(),
            final_snapshot: Default::default(),
        }),
    }
}

/// The volumes `host_config` names, each with one file of `len` noise bytes.
fn host_volumes(env: &Env, len: usize) -> std::path::PathBuf {
    let vols = env.path("vols");
    for (v, n) in [("pgdata", 5u64), ("app", 6), ("cache", 7)] {
        let d = vols.join(v).join("_data");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("data.bin"), noise(n, len)).unwrap();
    }
    vols
}

/// An executable `systemctl` stand-in: appends its arguments to `log`, then runs
/// `rest` (shell lines).
fn systemctl_stub(env: &Env, log: &Path, rest: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let stub = env.path("systemctl");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$@\" >> {}\n{rest}", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    stub
}

/// A tiny HTTP server on 127.0.0.1 that records request paths (the ping target).
fn ping_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ping/abc", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).ok();
            s2.lock()
                .unwrap()
                .push(line.split(' ').nth(1).unwrap_or("").to_string());
            let mut c = c;
            c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK")
                .ok();
        }
    });
    (url, seen)
}

#[test]
fn backup_timer_then_firstboot_restores_volumes_before_services() {
    let env = Env::new(false);
    let vols = host_volumes(&env, 1 << 20);
    // systemctl stub: records its arguments.
    let log = env.path("systemctl.log");
    let stub = systemctl_stub(&env, &log, "");
    let (url, pings) = ping_server();
    let metrics = env.path("metrics");
    let hc = host_config(&env, RestorePolicy::Require, Some(url), &metrics);
    let paths = HostPaths {
        volumes: vols.clone(),
        firstboot_done: env.path("state/firstboot.done"),
        systemctl: stub,
    };
    // Before first boot finished, the timer refuses (the volumes may be empty).
    let r = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(
        r.error.as_deref().unwrap().contains("first boot"),
        "{:?}",
        r.error
    );
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(&paths.firstboot_done, "{}").unwrap();
    let r = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    let report = r.report.unwrap();
    // Dependency propagation needs a real systemd (the QEMU tests); here: stopped once,
    // started once, and without an atomic snapshot (not btrfs) down for the whole read.
    let calls = std::fs::read_to_string(&log).unwrap();
    let stop_start: Vec<&str> = calls
        .lines()
        .filter(|l| l.starts_with("stop ") || l.starts_with("start "))
        .collect();
    assert_eq!(
        stop_start,
        ["stop postgres.service", "start postgres.service"],
        "{calls}"
    );
    assert!(!r.atomic);
    assert!(r.downtime_seconds > 0.0);
    assert!(vols.join("app/_data/dump.sql").exists(), "hook did not run");
    let prom = std::fs::read_to_string(metrics.join("imgbuild_backup.prom")).unwrap();
    assert!(
        prom.contains("imgbuild_backup_success{host=\"services\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("imgbuild_backup_last_success_timestamp_seconds{host=\"services\"} 1"),
        "{prom}"
    );
    assert_eq!(
        pings.lock().unwrap().as_slice(),
        ["/ping/abc/fail", "/ping/abc"]
    );

    // A fresh machine: empty volumes dir, nothing done yet.
    let fresh = env.path("fresh-vols");
    std::fs::create_dir_all(fresh.join("app/_data")).unwrap(); // an empty volume podman made
    let fresh_paths = HostPaths {
        volumes: fresh.clone(),
        firstboot_done: env.path("fresh-state/firstboot.done"),
        systemctl: "false".into(),
    };
    let o = firstboot(&hc, &fresh_paths).unwrap();
    match &o {
        FirstbootOutcome::Restored { id, bytes, .. } => {
            assert_eq!(id, &report.id);
            assert!(*bytes >= 3 << 20);
        }
        other => panic!("{other:?}"),
    }
    for v in ["pgdata", "app", "cache"] {
        assert_eq!(
            tree_hash(&vols.join(v).join("_data")),
            tree_hash(&fresh.join(v).join("_data")),
            "{v}"
        );
    }
    assert!(!fresh.join(".imgbuild-staging").exists());
    assert!(fresh_paths.firstboot_done.exists());
    assert_eq!(
        firstboot(&hc, &fresh_paths).unwrap(),
        FirstbootOutcome::AlreadyDone
    );

    // A failing run keeps the last success time, says success 0 and pings /fail.
    let mut broken = hc.clone();
    broken.backup.as_mut().unwrap().volumes[0].name = "no-such-volume".into();
    let r = backup_host(&broken, &paths, &Progress::quiet()).unwrap();
    assert!(r.error.as_deref().unwrap().contains("no-such-volume"));
    let prom2 = std::fs::read_to_string(metrics.join("imgbuild_backup.prom")).unwrap();
    assert!(
        prom2.contains("imgbuild_backup_success{host=\"services\"} 0"),
        "{prom2}"
    );
    let last = |p: &str| {
        p.lines()
            .find(|l| l.starts_with("imgbuild_backup_last_success"))
            .unwrap()
            .to_string()
    };
    assert_eq!(last(&prom), last(&prom2));
    assert_eq!(pings.lock().unwrap().last().unwrap(), "/ping/abc/fail");
}

#[test]
fn firstboot_policies_on_an_empty_or_unreadable_bucket() {
    let env = Env::new(false);
    let metrics = env.path("metrics");
    let paths = |n: &str| HostPaths {
        volumes: env.path(&format!("{n}/vols")),
        firstboot_done: env.path(&format!("{n}/done")),
        systemctl: "false".into(),
    };
    // allow-empty: starts with empty volumes and marks done.
    let hc = host_config(&env, RestorePolicy::AllowEmpty, None, &metrics);
    assert_eq!(
        firstboot(&hc, &paths("a")).unwrap(),
        FirstbootOutcome::EmptyBucket
    );
    assert!(paths("a").firstboot_done.exists());
    // skip: never touches S3.
    let mut skip = host_config(&env, RestorePolicy::Skip, None, &metrics);
    skip.backup.as_mut().unwrap().endpoint = Some("http://127.0.0.1:9".into());
    assert_eq!(
        firstboot(&skip, &paths("s")).unwrap(),
        FirstbootOutcome::Skipped
    );
    // require + empty bucket: retries until the timeout, then fails naming why.
    let hc = host_config(&env, RestorePolicy::Require, None, &metrics);
    let t = std::time::Instant::now();
    let e = firstboot(&hc, &paths("r")).unwrap_err().to_string();
    assert!(
        e.contains("holds no snapshot and no empty-start marker") && e.contains("imgbuild init"),
        "{e}"
    );
    assert!(!e.contains('\n'), "the FAILED line is one line: {e}");
    assert!(t.elapsed().as_secs() >= 2, "did not retry");
    assert!(!paths("r").firstboot_done.exists());
    // require + unreachable bucket: the cause is the network.
    let mut down = host_config(&env, RestorePolicy::Require, None, &metrics);
    down.backup.as_mut().unwrap().endpoint = Some("http://127.0.0.1:9".into());
    down.backup.as_mut().unwrap().restore_timeout_secs = 1;
    let e = firstboot(&down, &paths("d")).unwrap_err().to_string();
    assert!(
        e.contains("cannot reach") || e.contains("ListObjects"),
        "{e}"
    );
    eprintln!("unreachable bucket → {e}");
    // allow-empty does not hide unreadable snapshots: wrong key fails.
    let src = env.path("v/pgdata/_data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"x").unwrap();
    for v in ["app", "cache"] {
        std::fs::create_dir_all(env.path(&format!("v/{v}/_data"))).unwrap();
    }
    std::fs::write(env.path("done-marker"), "{}").unwrap();
    let bp = HostPaths {
        volumes: env.path("v"),
        firstboot_done: env.path("done-marker"),
        systemctl: "true".into(),
    };
    let mut nohook = host_config(&env, RestorePolicy::AllowEmpty, None, &metrics);
    nohook.backup.as_mut().unwrap().volumes[1].hook = None;
    assert!(backup_host(&nohook, &bp, &Progress::quiet())
        .unwrap()
        .error
        .is_none());
    let other = env.path("other");
    write_keys(&other, 9);
    let mut wrong = nohook.clone();
    let b = wrong.backup.as_mut().unwrap();
    b.encryption_key_file = other.join("snapshot-encryption.key").display().to_string();
    b.restore_timeout_secs = 1;
    let e = firstboot(&wrong, &paths("w")).unwrap_err().to_string();
    assert!(e.contains("wrong key"), "{e}");
    eprintln!("wrong key at first boot → {e}");
    assert!(!paths("w").firstboot_done.exists());
}

#[test]
fn workstation_verbs_back_up_list_check_and_restore() {
    use imgbuild::cli::snapshot::{BackupArgs, BucketArgs, CheckArgs, RestoreArgs, SnapshotsArgs};
    use imgbuild::cmd::{backup, check, restore, snapshots};
    let env = Env::new(false);
    let metrics = env.path("metrics");
    let mut hc = host_config(&env, RestorePolicy::Require, None, &metrics);
    // The profile's endpoint is a host name only the servers resolve; --endpoint wins.
    hc.backup.as_mut().unwrap().endpoint = Some("http://s3.invalid".into());
    // A secrets root holds one dir per host; the fixture's key dir becomes `services/`.
    let root = env.path("root");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(&env.secrets, root.join("services")).unwrap();
    let secrets = imgbuild::secrets::SecretsRoot::new(root);
    let resolve = move |p: &str| -> anyhow::Result<(HostConfig, imgbuild::secrets::SecretsRoot)> {
        anyhow::ensure!(p == "services", "unknown profile {p}");
        Ok((hc.clone(), secrets.clone()))
    };
    let from = env.path("copy");
    for v in ["pgdata", "app", "cache"] {
        std::fs::create_dir_all(from.join(v)).unwrap();
        std::fs::write(from.join(v).join("f"), noise(v.len() as u64, 100_000)).unwrap();
    }
    let bucket = BucketArgs {
        endpoint: env.cfg.endpoint.clone(),
        ..Default::default()
    };
    let backup = BackupArgs {
        profile: Some("services".into()),
        from: Some(from.clone()),
        prune: true,
        bucket: bucket.clone(),
        json: true,
        quiet: true,
        ..Default::default()
    };
    assert_eq!(backup::run(&backup, &resolve).unwrap(), 0);
    let list = SnapshotsArgs {
        profile: "services".into(),
        bucket: bucket.clone(),
        json: false,
    };
    assert_eq!(snapshots::run(&list, &resolve).unwrap(), 0);
    let to = env.path("restored");
    let restore = RestoreArgs {
        profile: "services".into(),
        to: to.clone(),
        bucket: bucket.clone(),
        quiet: true,
        ..Default::default()
    };
    assert_eq!(restore::run(&restore, &resolve).unwrap(), 0);
    for v in ["pgdata", "app", "cache"] {
        assert_eq!(
            tree_hash(&from.join(v)),
            tree_hash(&to.join(v).join("_data")),
            "{v}"
        );
    }
    let check = CheckArgs {
        profile: Some("services".into()),
        read_data: true,
        read_data_subset: None,
        config: Default::default(),
        bucket: bucket.clone(),
        json: true,
        quiet: true,
    };
    assert_eq!(check::run(&check, &resolve).unwrap(), 0);
    // Restoring over an existing directory is refused, not merged.
    let e = restore::run(&restore, &resolve).unwrap_err();
    assert!(format!("{e:#}").contains("exists"), "{e:#}");
    // --prefix elsewhere: no snapshots there.
    let empty = RestoreArgs {
        to: env.path("r2"),
        bucket: BucketArgs {
            prefix: Some("nobody".into()),
            ..bucket.clone()
        },
        ..restore.clone()
    };
    let e = restore::run(&empty, &resolve).unwrap_err();
    assert!(format!("{e:#}").contains("no snapshot in s3://"), "{e:#}");
    // A missing volume directory is named.
    std::fs::remove_dir_all(from.join("cache")).unwrap();
    let e = backup::run(&backup, &resolve).unwrap_err();
    assert!(format!("{e:#}").contains("volume cache"), "{e:#}");
}

#[test]
fn the_empty_start_marker_lets_a_first_deployment_boot_and_the_first_backup_removes_it() {
    use imgbuild::snapshot::marker;
    let env = Env::new(false);
    let metrics = env.path("metrics");
    let paths = |n: &str| HostPaths {
        volumes: env.path(&format!("{n}/vols")),
        firstboot_done: env.path(&format!("{n}/done")),
        systemctl: "true".into(),
    };
    let mut hc = host_config(&env, RestorePolicy::Require, None, &metrics);
    hc.backup.as_mut().unwrap().restore_timeout_secs = 1;
    let keys = imgbuild::snapshot::Keys::load(
        &env.secrets.join("snapshot-encryption.key"),
        &env.secrets.join("snapshot-signing.key"),
    )
    .unwrap();
    let rt = rt();
    let store = rt
        .block_on(imgbuild::snapshot::Store::connect(&env.cfg))
        .unwrap();

    // A marker signed by another host's key is an integrity failure: final, not retried.
    let other = env.path("other");
    write_keys(&other, 9);
    let other_keys = imgbuild::snapshot::Keys::load(
        &other.join("snapshot-encryption.key"),
        &other.join("snapshot-signing.key"),
    )
    .unwrap();
    rt.block_on(marker::write(
        &store,
        &other_keys,
        "services",
        1_700_000_000,
    ))
    .unwrap();
    let e = firstboot(&hc, &paths("forged")).unwrap_err().to_string();
    assert!(
        e.contains("empty-start marker") && e.contains("signature"),
        "{e}"
    );
    assert!(!paths("forged").firstboot_done.exists());

    // A marker for another host name under this prefix does not count either.
    rt.block_on(marker::write(&store, &keys, "other-host", 1_700_000_000))
        .unwrap();
    let e = firstboot(&hc, &paths("host")).unwrap_err().to_string();
    assert!(e.contains("written for host other-host"), "{e}");

    // The host's own marker: first deployment, empty volumes, done.
    rt.block_on(marker::write(&store, &keys, "services", 1_700_000_000))
        .unwrap();
    assert_eq!(
        firstboot(&hc, &paths("first")).unwrap(),
        FirstbootOutcome::EmptyStart {
            created: 1_700_000_000
        }
    );
    assert!(paths("first").firstboot_done.exists());

    // The same marker copied to another prefix does not verify there.
    let mut moved_cfg = env.cfg.clone();
    moved_cfg.prefix = "hosts/typo".into();
    let moved = rt
        .block_on(imgbuild::snapshot::Store::connect(&moved_cfg))
        .unwrap();
    let bytes = rt
        .block_on(store.get(&marker::key(&env.cfg.prefix), u64::MAX))
        .unwrap()
        .unwrap();
    rt.block_on(moved.put(&marker::key("hosts/typo"), bytes, false, None))
        .unwrap();
    let mut typo = hc.clone();
    typo.backup.as_mut().unwrap().prefix = "hosts/typo".into();
    let e = firstboot(&typo, &paths("typo")).unwrap_err().to_string();
    assert!(e.contains("does not verify"), "{e}");

    // The first backup removes the marker; later first boots restore the snapshot.
    let bp = paths("first");
    for v in ["pgdata", "app", "cache"] {
        std::fs::create_dir_all(bp.volumes.join(v).join("_data")).unwrap();
    }
    std::fs::write(
        bp.volumes.join("cache/_data/x"),
        b"written after the first boot",
    )
    .unwrap();
    let mut nohook = hc.clone();
    nohook.backup.as_mut().unwrap().volumes[1].hook = None;
    let r = backup_host(&nohook, &bp, &Progress::quiet()).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(!rt
        .block_on(store.exists(&marker::key(&env.cfg.prefix)))
        .unwrap());
    match firstboot(&hc, &paths("second")).unwrap() {
        FirstbootOutcome::Restored { .. } => {}
        o => panic!("expected a restore, got {o:?}"),
    }
    assert_eq!(
        std::fs::read(paths("second").volumes.join("cache/_data/x")).unwrap(),
        b"written after the first boot"
    );
}

/// A relay to the S3 server that cuts the connection of any request naming `poison`
/// (a connection reset mid-restore). Each request gets its own upstream connection
/// (`Connection: close`), so every request is seen.
fn resetting_proxy(upstream: &str, poison: String) -> String {
    use std::io::Read;
    let up = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let up = up.clone();
            let poison = poison.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let first = text.lines().next().unwrap_or_default().to_string();
                if first.contains(&poison) {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let mut out = String::new();
                for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                    if !line.to_ascii_lowercase().starts_with("connection:") {
                        out.push_str(line);
                        out.push_str("\r\n");
                    }
                }
                out.push_str("Connection: close\r\n\r\n");
                let Ok(mut u) = std::net::TcpStream::connect(&up) else {
                    return;
                };
                let _ = u.write_all(out.as_bytes());
                let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                });
                let _ = std::io::copy(&mut u, &mut c);
            });
        }
    });
    url
}

#[test]
fn first_boot_never_falls_back_on_a_transport_error_but_does_on_a_corrupt_manifest() {
    let env = Env::new(false);
    let metrics = env.path("metrics");
    let vols = env.path("vols");
    for v in ["pgdata", "app", "cache"] {
        std::fs::create_dir_all(vols.join(v).join("_data")).unwrap();
    }
    let mut hc = host_config(&env, RestorePolicy::Require, None, &metrics);
    hc.backup.as_mut().unwrap().volumes[1].hook = None;
    let paths = HostPaths {
        volumes: vols.clone(),
        firstboot_done: env.path("state/done"),
        systemctl: "true".into(),
    };
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(&paths.firstboot_done, "{}").unwrap();
    let file = vols.join("cache/_data/version");
    std::fs::write(&file, "old").unwrap();
    let r1 = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(r1.error.is_none(), "{:?}", r1.error);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(&file, "new").unwrap();
    let r2 = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(r2.error.is_none(), "{:?}", r2.error);
    let (old_id, new_id) = (r1.report.unwrap().id, r2.report.unwrap().id);
    assert!(new_id > old_id);

    // The newest manifest cannot be downloaded (connection reset): no fallback to the
    // older snapshot, first boot fails closed naming the transport problem.
    let proxy = resetting_proxy(env.cfg.endpoint.as_deref().unwrap(), new_id.clone());
    let mut via_proxy = hc.clone();
    let b = via_proxy.backup.as_mut().unwrap();
    b.endpoint = Some(proxy);
    b.restore_timeout_secs = 2;
    let p = |n: &str| HostPaths {
        volumes: env.path(&format!("{n}/vols")),
        firstboot_done: env.path(&format!("{n}/done")),
        systemctl: "true".into(),
    };
    let e = firstboot(&via_proxy, &p("reset")).unwrap_err().to_string();
    assert!(!p("reset").firstboot_done.exists());
    assert!(
        !p("reset").volumes.join("cache/_data/version").exists(),
        "restored something after a transport error"
    );
    assert!(e.contains("gave up after the restore timeout"), "{e}");
    eprintln!("newest manifest unreachable → {e}");

    // The newest manifest is corrupt: the older snapshot restores, loudly.
    let store = rt().block_on(env.store());
    let key = imgbuild::snapshot::format::snapshot_key(&env.cfg.prefix, &new_id);
    let mut m = rt().block_on(store.get(&key, u64::MAX)).unwrap().unwrap();
    let n = m.len() - 5;
    m[n] ^= 0x40;
    rt().block_on(store.put(&key, m, false, None)).unwrap();
    match firstboot(&hc, &p("corrupt")).unwrap() {
        FirstbootOutcome::Restored { id, skipped, .. } => {
            assert_eq!(id, old_id);
            assert_eq!(skipped.len(), 1, "{skipped:?}");
            assert!(skipped[0].starts_with(&new_id), "{skipped:?}");
        }
        o => panic!("expected the older snapshot, got {o:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(p("corrupt").volumes.join("cache/_data/version")).unwrap(),
        "old"
    );
    let done = std::fs::read_to_string(&p("corrupt").firstboot_done).unwrap();
    assert!(
        done.contains(&new_id),
        "the done marker does not name the skipped one: {done}"
    );
    let prom = std::fs::read_to_string(metrics.join("imgbuild_restore.prom")).unwrap();
    assert!(
        prom.contains("imgbuild_restore_skipped_snapshots{host=\"services\"} 1"),
        "{prom}"
    );
}

/// `imgbuild backup --final` at shutdown: a reboot skips it (the disk stays); a
/// power-off snapshots without stopping or starting anything and without pruning; a
/// bucket that does not answer costs at most the timeout, and nothing is published.
#[test]
fn final_snapshot_at_power_off_is_taken_without_touching_units_and_bounded_in_time() {
    use imgbuild::agent::backup_job::final_snapshot;
    use imgbuild::hostconfig::FinalSnapshotWhen;
    use std::time::{Duration, Instant};
    let env = Env::new(false);
    let vols = host_volumes(&env, 300_000);
    // systemctl stub: records its arguments; `list-jobs` prints the jobs file,
    // `is-active` says postgres still runs.
    let log = env.path("systemctl.log");
    let jobs = env.path("jobs");
    let stub = systemctl_stub(
        &env,
        &log,
        &format!(
            "case \"$1\" in\n  list-jobs) cat {} ;;\n  is-active) echo active ;;\nesac\n",
            jobs.display()
        ),
    );
    let metrics = env.path("metrics");
    let hc = host_config(&env, RestorePolicy::Require, None, &metrics);
    let paths = HostPaths {
        volumes: vols.clone(),
        firstboot_done: env.path("state/firstboot.done"),
        systemctl: stub,
    };
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(&paths.firstboot_done, "").unwrap();
    let q = Progress::quiet();
    let timeout = Duration::from_secs(60);
    let listed = || {
        let rt = rt();
        rt.block_on(async {
            let store = env.store().await;
            imgbuild::snapshot::restore::list_ids(&store)
                .await
                .unwrap()
                .len()
        })
    };

    // A reboot: skipped, nothing written.
    std::fs::write(&jobs, "12 reboot.target start waiting\n").unwrap();
    assert!(final_snapshot(&hc, &paths, &q, timeout).unwrap().is_none());
    assert_eq!(listed(), 0);
    // The same with "always": taken.
    let mut always = hc.clone();
    always.backup.as_mut().unwrap().final_snapshot.when = FinalSnapshotWhen::Always;
    let r = final_snapshot(&always, &paths, &q, timeout)
        .unwrap()
        .unwrap();
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(listed(), 1);

    // A power-off: taken, with the latest write in it, no unit stopped or started, no
    // prune (the policy keeps 3; a fourth snapshot would be pruned by the timer).
    std::fs::write(&jobs, "7 poweroff.target start waiting\n").unwrap();
    std::fs::write(&log, "").unwrap();
    for i in 0..3 {
        std::fs::write(vols.join("app/_data/late.txt"), format!("late {i}")).unwrap();
        let r = final_snapshot(&hc, &paths, &q, timeout).unwrap().unwrap();
        assert!(r.error.is_none(), "{r:?}");
        assert!(r.prune.is_none());
        assert_eq!(r.downtime_seconds, 0.0);
    }
    assert_eq!(listed(), 4, "a final snapshot pruned");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        !calls
            .lines()
            .any(|l| l.starts_with("stop") || l.starts_with("start")),
        "a final snapshot stopped or started units:\n{calls}"
    );
    assert!(calls.contains("is-active postgres.service"), "{calls}");
    // The hook of the `hook` volume does not run at shutdown (its container is gone).
    assert!(!vols.join("app/_data/dump.sql").exists());
    let out = env.path("restored");
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let (m, _) = imgbuild::snapshot::restore::newest_manifest(&store, &keys)
            .await
            .unwrap()
            .unwrap();
        imgbuild::snapshot::restore::restore(&store, &keys, &m, &out, &Default::default())
            .await
            .unwrap();
    });
    assert_eq!(
        std::fs::read_to_string(out.join("app/_data/late.txt")).unwrap(),
        "late 2"
    );

    // Another copy of the host (a replacement already up, a staging copy) wrote a newer
    // snapshot: this one's final snapshot would shadow it, so it is refused.
    let other_paths = HostPaths {
        volumes: vols.clone(),
        firstboot_done: env.path("other-state/firstboot.done"),
        systemctl: paths.systemctl.clone(),
    };
    std::fs::create_dir_all(env.path("other-state")).unwrap();
    std::fs::write(&other_paths.firstboot_done, "{\"restored\": null}\n").unwrap();
    let r = imgbuild::agent::backup_job::backup_host_mode(
        &hc,
        &other_paths,
        &q,
        imgbuild::agent::backup_job::Mode::Final { timeout },
    )
    .unwrap();
    assert!(
        r.error
            .as_deref()
            .unwrap_or_default()
            .contains("another copy of this host"),
        "{r:?}"
    );
    assert_eq!(listed(), 4);
    let r = backup_host(&hc, &other_paths, &q).unwrap();
    assert!(r.error.is_none(), "{r:?}");
    let r = final_snapshot(&hc, &paths, &q, timeout).unwrap().unwrap();
    assert!(
        r.error
            .as_deref()
            .unwrap_or_default()
            .contains("another copy of this host"),
        "{r:?}"
    );
    // A bucket that accepts connections and never answers: given up at the timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut dead = hc.clone();
    dead.backup.as_mut().unwrap().endpoint =
        Some(format!("http://{}", silent.local_addr().unwrap()));
    let t = Instant::now();
    let r = final_snapshot(&dead, &paths, &q, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let took = t.elapsed();
    assert!(
        r.error
            .as_deref()
            .unwrap_or_default()
            .contains("final_snapshot_timeout"),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    drop(silent);
}

/// Moving a service: host vps2's volume `nextcloud-data` says `from = vps1:nc-data`.
/// Its first boot restores vps1's newest snapshot of that volume (vps1's keys, a key
/// that may only read vps1's bucket: Garage refuses it any write or delete there).
/// Once vps2 has backed the volume up itself, a reprovisioned vps2 restores its own
/// copy, not vps1's newer one.
#[test]
fn a_moved_volume_starts_from_the_other_hosts_snapshot_with_read_only_access() {
    use imgbuild::hostconfig::MoveSource;
    use imgbuild::snapshot::backup::{backup, BackupOptions, NoHooks, Source};
    use imgbuild::snapshot::store::DeleteOutcome;
    let a = Env::garage(None);
    let src = a.path("nc-data");
    std::fs::create_dir_all(src.join("files/admin")).unwrap();
    std::fs::write(src.join("files/admin/photo.jpg"), noise(11, 700_000)).unwrap();
    std::fs::write(src.join("config.php"), b"<?php $CONFIG = [];\n").unwrap();
    let rt = rt();
    let backup_a = |tag: &str| {
        rt.block_on(async {
            let store = a.store().await;
            let opts = BackupOptions {
                host: "vps1".into(),
                parallel: 4,
                progress: Progress::quiet(),
                pack_target: imgbuild::snapshot::pack::PACK_TARGET,
            };
            let sources = vec![Source {
                name: "nc-data".into(),
                root: src.clone(),
                wal_start: None,
            }];
            let r = backup(
                &store,
                &a.keys().for_host("vps1"),
                &sources,
                &mut NoHooks,
                &opts,
            )
            .await
            .unwrap_or_else(|e| panic!("backup of vps1 ({tag}): {e}"));
            r.id
        })
    };
    backup_a("first");
    let moved_hash = tree_hash(&src);

    // What vps2's image carries for it: vps1's encryption key and public key (not its
    // signing key) and a read-only key.
    let b = Env::new(false);
    let from_dir = b.path("from/vps1");
    std::fs::create_dir_all(&from_dir).unwrap();
    for f in ["snapshot-encryption.key", "snapshot-signing.pub"] {
        std::fs::copy(a.secrets.join(f), from_dir.join(f)).unwrap();
    }
    a.garage_read_only_env(&from_dir.join("s3.env"));
    let metrics = b.path("metrics");
    let mut hc = host_config(&b, RestorePolicy::AllowEmpty, None, &metrics);
    hc.host = "vps2".into();
    let bc = hc.backup.as_mut().unwrap();
    bc.volumes = vec![
        VolumeBackup {
            name: "nextcloud-data".into(),
            strategy: Strategy::Live,
            hook: None,
            units: vec![],
            from: Some(MoveSource {
                host: "vps1".into(),
                volume: "nc-data".into(),
                bucket: a.cfg.bucket.clone(),
                prefix: a.cfg.prefix.clone(),
                endpoint: a.cfg.endpoint.clone(),
                region: String::new(),
                path_style: true,
                credentials_file: Some(from_dir.join("s3.env").display().to_string()),
                encryption_key_file: from_dir
                    .join("snapshot-encryption.key")
                    .display()
                    .to_string(),
                signing_key_file: from_dir.join("snapshot-signing.key").display().to_string(),
            }),
            postgres: None,
        },
        VolumeBackup {
            name: "own".into(),
            strategy: Strategy::Live,
            hook: None,
            units: vec![],
            from: None,
            postgres: None,
        },
    ];
    assert!(!from_dir.join("snapshot-signing.key").exists());
    let boot = |name: &str| {
        let paths = HostPaths {
            volumes: b.path(&format!("{name}/vols")),
            firstboot_done: b.path(&format!("{name}/state/firstboot.done")),
            systemctl: "true".into(),
        };
        std::fs::create_dir_all(&paths.volumes).unwrap();
        let out = firstboot(&hc, &paths).unwrap_or_else(|e| panic!("first boot {name}: {e:#}"));
        (paths, out)
    };
    // vps2's own prefix is empty (allow-empty): its own volume starts empty, the moved
    // one comes from vps1.
    let (paths, out) = boot("boot1");
    eprintln!("boot 1: {out:?}");
    assert_eq!(
        tree_hash(&paths.volumes.join("nextcloud-data/_data")),
        moved_hash
    );

    // The read-only key reads vps1's prefix and can change nothing there.
    rt.block_on(async {
        let mut cfg = a.cfg.clone();
        cfg.credentials_file = Some(from_dir.join("s3.env"));
        let ro = imgbuild::snapshot::Store::connect(&cfg).await.unwrap();
        let listed = ro.list(&format!("{}/", a.cfg.prefix)).await.unwrap();
        assert!(!listed.is_empty());
        let e = ro
            .put(
                &format!("{}/snapshots/forged", a.cfg.prefix),
                b"x".to_vec(),
                false,
                None,
            )
            .await;
        assert!(e.is_err(), "a read-only key wrote under vps1's prefix");
        let victim = &listed[0].key;
        let deleted = ro.delete(victim).await;
        assert!(
            !matches!(deleted, Ok(DeleteOutcome::Deleted)),
            "a read-only key deleted {victim}"
        );
        let rw = a.store().await;
        assert!(rw.exists(victim).await.unwrap(), "{victim} is gone");
    });

    // vps2 backs the volume up itself; vps1 keeps writing (it should have stopped).
    std::fs::write(
        paths.volumes.join("nextcloud-data/_data/on-vps2.txt"),
        b"vps2",
    )
    .unwrap();
    std::fs::create_dir_all(paths.volumes.join("own/_data")).unwrap();
    let r = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(r.error.is_none(), "{r:?}");
    let vps2_hash = tree_hash(&paths.volumes.join("nextcloud-data/_data"));
    std::fs::write(src.join("late-on-vps1.txt"), b"late").unwrap();
    backup_a("second");
    let (paths2, _) = boot("boot2");
    assert_eq!(
        tree_hash(&paths2.volumes.join("nextcloud-data/_data")),
        vps2_hash,
        "a reprovisioned vps2 must restore its own copy"
    );

    // vps1 without a snapshot of the volume: first boot fails rather than start empty.
    let mut missing = hc.clone();
    missing.backup.as_mut().unwrap().volumes[0]
        .from
        .as_mut()
        .unwrap()
        .volume = "no-such-volume".into();
    let fresh = Env::new(false);
    missing.backup.as_mut().unwrap().bucket = fresh.cfg.bucket.clone();
    missing.backup.as_mut().unwrap().restore_timeout_secs = 1;
    let paths3 = HostPaths {
        volumes: b.path("boot3/vols"),
        firstboot_done: b.path("boot3/state/firstboot.done"),
        systemctl: "true".into(),
    };
    std::fs::create_dir_all(&paths3.volumes).unwrap();
    let e = firstboot(&missing, &paths3).unwrap_err();
    assert!(
        format!("{e:#}").contains("has no volume no-such-volume"),
        "{e:#}"
    );
    assert!(!paths3.firstboot_done.exists());
}

/// A synthetic PostgreSQL data directory: PG_VERSION, a control file whose last
/// checkpoint's redo point is in segment `redo_seg` (timeline 1, 16 MiB segments), and
/// one segment file in pg_wal (its size tells the segment size).
fn fake_cluster(data: &Path, redo_seg: u64) {
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    std::fs::write(data.join("PG_VERSION"), "17\n").unwrap();
    let mut c = vec![0u8; 8192];
    c[8..12].copy_from_slice(&1700u32.to_le_bytes());
    let redo = (redo_seg << 24) | 0x28;
    c[32..40].copy_from_slice(&(redo + 0x100).to_le_bytes());
    c[40..48].copy_from_slice(&redo.to_le_bytes());
    c[48..52].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(data.join("global/pg_control"), c).unwrap();
    let seg =
        std::fs::File::create(data.join(format!("pg_wal/0000000100000000{redo_seg:08X}"))).unwrap();
    seg.set_len(16 << 20).unwrap();
}

/// WAL shipping without PostgreSQL (the QEMU postgres test runs the real one): each
/// snapshot records where its replay starts; first boot fetches what was shipped from
/// there on, in order, stops at a file that does not open (sealed for another volume)
/// as at a gap, and sets up the replay; prune drops what no kept snapshot needs.
#[test]
fn shipped_wal_is_fetched_for_replay_and_pruned_by_the_oldest_kept_snapshot() {
    use imgbuild::hostconfig::PostgresWal;
    use imgbuild::snapshot::store::PutOutcome;
    use imgbuild::snapshot::wal;
    let env = Env::new(false);
    let mut hc = host_config(&env, RestorePolicy::Require, None, &env.path("metrics"));
    let bc = hc.backup.as_mut().unwrap();
    bc.keep = Retention {
        last: 1,
        daily: 0,
        weekly: 0,
        monthly: 0,
    };
    bc.volumes = vec![VolumeBackup {
        name: "pgdata".into(),
        strategy: Strategy::Live,
        hook: None,
        units: vec![],
        from: None,
        postgres: Some(PostgresWal {
            container: "db".into(),
            data: "pg".into(),
            spool_volume: "pgdata-wal-spool".into(),
            archive_timeout_secs: 60,
            rpo_secs: 300,
        }),
    }];
    let vols = env.path("vols");
    let data = vols.join("pgdata/_data/pg");
    fake_cluster(&data, 3);
    std::fs::write(data.join("table"), noise(3, 5000)).unwrap();
    let paths = HostPaths {
        volumes: vols.clone(),
        firstboot_done: env.path("state/firstboot.done"),
        systemctl: "true".into(),
    };
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(&paths.firstboot_done, "{}").unwrap();
    let r = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    let first = r.report.as_ref().expect("backup ran").id.clone();
    let keys = env.keys();
    let segment = |n: u64| format!("0000000100000000{n:08X}");
    let body = |n: u64| noise(100 + n, 64 * 1024);
    rt().block_on(async {
        let store = env.store().await;
        let m = imgbuild::snapshot::restore::load_manifest(&store, &keys, &first)
            .await
            .unwrap();
        assert_eq!(m.volumes[0].wal_start.as_deref(), Some(segment(3).as_str()));
        for n in [2u64, 3, 4] {
            let o = wal::ship(
                &store,
                &keys,
                "services",
                "pgdata",
                &segment(n),
                &body(n),
                1_000 + n as i64,
            )
            .await
            .unwrap();
            assert_eq!(o, PutOutcome::Created);
        }
        // written once: the stored file stays
        let o = wal::ship(
            &store,
            &keys,
            "services",
            "pgdata",
            &segment(4),
            b"other",
            1,
        )
        .await
        .unwrap();
        assert_eq!(o, PutOutcome::Exists);
        // segment 5 sealed for another volume and put where pgdata's would be
        let planted = wal::seal(&keys, "services", "other", &segment(5), &body(5), 1_005);
        let key = format!(
            "{}{}",
            imgbuild::snapshot::format::wal_dir(&store.prefix, "pgdata"),
            segment(5)
        );
        store.put(&key, planted, false, None).await.unwrap();
        wal::ship(
            &store,
            &keys,
            "services",
            "pgdata",
            &segment(6),
            &body(6),
            1_006,
        )
        .await
        .unwrap();
        wal::ship(
            &store,
            &keys,
            "services",
            "pgdata",
            "00000002.history",
            b"1\t0/5000000\tno recovery target specified\n",
            1_006,
        )
        .await
        .unwrap();
    });

    // A new machine: the snapshot, then WAL 3 and 4 (2 is older than the snapshot's
    // start, 5 does not open, so 6 cannot be used).
    let fresh = env.path("fresh");
    let fresh_paths = HostPaths {
        volumes: fresh.clone(),
        firstboot_done: env.path("fresh-state/firstboot.done"),
        systemctl: "false".into(),
    };
    firstboot(&hc, &fresh_paths).unwrap();
    let fdata = fresh.join("pgdata/_data/pg");
    let restore = fresh.join("pgdata-wal-spool/_data/restore");
    let mut got: Vec<String> = std::fs::read_dir(&restore)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [segment(3), segment(4), "00000002.history".to_string()]
    );
    assert_eq!(std::fs::read(restore.join(segment(4))).unwrap(), body(4));
    let note: serde_json::Value =
        serde_json::from_slice(&std::fs::read(restore.join(".imgbuild-replay.json")).unwrap())
            .unwrap();
    assert_eq!(note["up_to"], 1_004);
    assert_eq!(note["snapshot"], first.as_str());
    assert!(fdata.join("recovery.signal").is_file());
    let conf = std::fs::read_to_string(fdata.join("postgresql.auto.conf")).unwrap();
    for want in [
        "restore_command = 'cp /imgbuild-wal/restore/%f %p'",
        "hot_standby = 'off'",
        "archive_mode = 'on'",
        "archive_timeout = '60s'",
    ] {
        assert!(conf.contains(want), "{want} missing:\n{conf}");
    }
    // While PostgreSQL still recovers, a restart keeps the recovery settings; once it
    // has promoted (recovery.signal gone), the next start drops them and keeps archiving.
    imgbuild::agent::wal::prepare(&hc, &fresh_paths, "pgdata").unwrap();
    let conf = std::fs::read_to_string(fdata.join("postgresql.auto.conf")).unwrap();
    assert!(conf.contains("restore_command"), "{conf}");
    std::fs::remove_file(fdata.join("recovery.signal")).unwrap();
    std::fs::write(
        fdata.join("postgresql.auto.conf"),
        format!("{conf}work_mem = '8MB'\n"),
    )
    .unwrap();
    imgbuild::agent::wal::prepare(&hc, &fresh_paths, "pgdata").unwrap();
    let conf = std::fs::read_to_string(fdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        !conf.contains("restore_command") && !conf.contains("hot_standby"),
        "{conf}"
    );
    assert!(
        conf.contains("archive_mode = 'on'") && conf.contains("work_mem = '8MB'"),
        "{conf}"
    );
    assert!(fresh.join("pgdata-wal-spool/_data/archive").is_dir());

    // The cluster moved on: the next snapshot starts at 5; with one snapshot kept,
    // prune drops the files before 5 and keeps the history.
    std::fs::remove_dir_all(&data).unwrap();
    fake_cluster(&data, 5);
    let r = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    rt().block_on(async {
        let store = env.store().await;
        let ids = imgbuild::snapshot::restore::list_ids(&store).await.unwrap();
        assert_eq!(ids.len(), 1, "keep last = 1: {ids:?}");
        let left: Vec<String> = wal::list(&store, "pgdata")
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(
            left,
            [segment(5), segment(6), "00000002.history".to_string()]
        );
    });
}

/// Shipped WAL files are locked like packs where the bucket locks.
#[test]
fn shipped_wal_files_are_object_locked() {
    use imgbuild::snapshot::wal;
    let mut env = Env::new(true);
    env.cfg.object_lock_days = Some(3);
    let keys = env.keys();
    rt().block_on(async {
        let store = env.store().await;
        let name = "000000010000000000000007";
        wal::ship(&store, &keys, "services", "pgdata", name, b"wal bytes", 7)
            .await
            .unwrap();
        let key = format!(
            "{}{name}",
            imgbuild::snapshot::format::wal_dir(&store.prefix, "pgdata")
        );
        let until = store
            .retention(&key)
            .await
            .unwrap()
            .expect("a retention date");
        let now = imgbuild::snapshot::backup::now_unix();
        assert!(
            (now + 3 * 86_400 - 120..=now + 3 * 86_400 + 120).contains(&until),
            "{until} vs {now}"
        );
        let (body, completed) = wal::fetch(&store, &keys, "services", "pgdata", name)
            .await
            .unwrap();
        assert_eq!((body.as_slice(), completed), (&b"wal bytes"[..], 7));
    });
}
