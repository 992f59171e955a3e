//! The check timer's job against moto: it reads the configured share of the packs,
//! finds a corrupted pack, writes the metrics the monitoring host alerts on, and waits
//! for a running backup (the job lock) instead of reading packs a prune may delete.

#[path = "snapshot-fixtures/common.rs"]
mod common;

use common::*;
use imgbuild::agent::{backup_host, check_host, HostPaths, JobLock};
use imgbuild::hostconfig::{
    BackupConfig, CheckSettings, HostConfig, PackSettings, RestorePolicy, Retention, Strategy,
    VolumeBackup,
};
use imgbuild::progress::Progress;
use imgbuild::snapshot::check::ReadData;
use std::path::Path;

fn host_config(env: &Env, metrics: &Path, read_data: &str) -> HostConfig {
    let s = |f: &str| env.secrets.join(f).display().to_string();
    HostConfig {
        host: "services".into(),
        env: "test".into(),
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
                daily: 0,
                weekly: 0,
                monthly: 0,
            },
            object_lock_days: None,
            accept_unlocked_bucket: false,
            ping_url: None,
            restore: RestorePolicy::Skip,
            restore_timeout_secs: 3,
            volumes: vec![VolumeBackup {
                name: "app".into(),
                strategy: Strategy::Live,
                hook: None,
                units: vec![],
                from: None,
                postgres: None,
            }],
            credentials_file: Some(s("s3.env")),
            encryption_key_file: s("snapshot-encryption.key"),
            signing_key_file: s("snapshot-signing.key"),
            // The smallest packs the engine writes, so 9 MiB of data makes several.
            packs: PackSettings {
                size_mib: 4,
                repack_garbage_percent: 25,
            },
            check: CheckSettings {
                schedule: "weekly".into(),
                read_data: read_data.into(),
            },
            final_snapshot: Default::default(),
        }),
    }
}

/// `name{labels} value` from the textfile the collector reads.
fn metric(metrics: &Path, file: &str, series: &str) -> f64 {
    let text = std::fs::read_to_string(metrics.join(file)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn check_job_reads_packs_finds_corruption_and_writes_metrics() {
    let env = Env::new(false);
    let vols = env.path("vols");
    let data = vols.join("app/_data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.bin"), noise(1, 9 << 20)).unwrap();
    let metrics = env.path("metrics");
    let paths = HostPaths {
        volumes: vols,
        firstboot_done: env.path("state/firstboot.done"),
        systemctl: "true".into(),
    };
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(&paths.firstboot_done, "{}").unwrap();
    let hc = host_config(&env, &metrics, "100%");
    let b = backup_host(&hc, &paths, &Progress::quiet()).unwrap();
    assert!(b.error.is_none(), "{:?}", b.error);
    let packs_new = b.report.as_ref().unwrap().stats.packs_new;
    // 9 MiB of noise does not compress: 4 MiB packs make at least two.
    assert!(
        packs_new >= 2,
        "pack_size_mib = 4 was not used: {packs_new} packs"
    );
    let puts = metric(
        &metrics,
        "imgbuild_backup.prom",
        "imgbuild_backup_requests{host=\"services\",kind=\"put\"}",
    );
    assert!(
        puts >= packs_new as f64,
        "{puts} PUTs for {packs_new} packs"
    );

    // host.toml's share ("100%"): every pack is read and verified.
    let r = check_host(&hc, &paths, None, &Progress::quiet()).unwrap();
    assert!(r.ok(), "{r:?}");
    let rep = r.report.as_ref().unwrap();
    assert_eq!(rep.packs_read, rep.packs, "{rep:?}");
    assert!(rep.packs_read >= 2 && rep.bytes_read >= 9 << 20, "{rep:?}");
    let m = |s: &str| metric(&metrics, "imgbuild_check.prom", s);
    assert_eq!(m("imgbuild_check_success{host=\"services\"}"), 1.0);
    assert_eq!(m("imgbuild_check_problems{host=\"services\"}"), 0.0);
    assert_eq!(
        m("imgbuild_check_packs_read{host=\"services\"}"),
        rep.packs_read as f64
    );
    assert_eq!(
        m("imgbuild_check_bytes_read{host=\"services\"}"),
        rep.bytes_read as f64
    );
    assert!(m("imgbuild_check_requests{host=\"services\",kind=\"get\"}") >= rep.packs_read as f64);
    let ran = m("imgbuild_check_last_run_timestamp_seconds{host=\"services\"}");
    assert!(ran > 1.7e9, "{ran}");

    // "off": metadata only, no pack downloaded.
    let off = host_config(&env, &metrics, "off");
    let r = check_host(&off, &paths, None, &Progress::quiet()).unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.report.as_ref().unwrap().packs_read, 0);
    assert_eq!(m("imgbuild_check_packs_read{host=\"services\"}"), 0.0);

    // One flipped byte in one pack: the full read finds it, names the pack, and the
    // metrics say so (SnapshotCheckFailed fires on them).
    let rt = rt();
    let victim = rt.block_on(async {
        let store = env.store().await;
        let packs = store
            .list(&imgbuild::snapshot::format::packs_dir(&env.cfg.prefix))
            .await
            .unwrap();
        let key = packs.first().expect("a pack in the bucket").key.clone();
        let mut bytes = store.get(&key, u64::MAX).await.unwrap().unwrap();
        bytes[100] ^= 1;
        store.put(&key, bytes, false, None).await.unwrap();
        key
    });
    let r = check_host(&off, &paths, Some(ReadData::All), &Progress::quiet()).unwrap();
    assert!(!r.ok());
    let problems = &r.report.as_ref().unwrap().problems;
    assert!(problems.iter().any(|p| p.contains(&victim)), "{problems:?}");
    assert_eq!(m("imgbuild_check_success{host=\"services\"}"), 0.0);
    assert_eq!(
        m("imgbuild_check_problems{host=\"services\"}"),
        problems.len() as f64
    );
}

#[test]
fn check_job_waits_for_a_running_backup() {
    let env = Env::new(false);
    let metrics = env.path("metrics");
    let paths = HostPaths {
        volumes: env.path("vols"),
        firstboot_done: env.path("state/firstboot.done"),
        systemctl: "true".into(),
    };
    let hc = host_config(&env, &metrics, "off");
    // What backup_host holds while it snapshots, uploads and prunes.
    let held = JobLock::acquire(&paths.job_lock(), "backup").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = {
        let (hc, paths) = (hc.clone(), paths.clone());
        std::thread::spawn(move || {
            let r = check_host(&hc, &paths, None, &Progress::quiet());
            tx.send(()).unwrap();
            r
        })
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(2)).is_err(),
        "the check ran while the backup held the job lock"
    );
    assert!(!metrics.join("imgbuild_check.prom").exists());
    drop(held);
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the check did not run once the lock was released");
    let r = worker.join().unwrap().unwrap();
    // An empty bucket checks clean.
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.report.unwrap().snapshots, 0);
}
