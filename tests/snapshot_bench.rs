//! Snapshot benchmark (not a timed test): run by benches/snapshot.sh as
//! `cargo test --release --test snapshot_bench -- --ignored --nocapture`.
//!
//! Same data, same moto server on 127.0.0.1 for every tool: imgbuild, restic (Debian
//! package) and rustic (crates.io rustic-rs) when installed, and raw parallel GetObject
//! of the objects imgbuild's restore downloads as the ceiling. Restores run as child
//! processes so their peak RSS can be read with wait4().

#[path = "snapshot-fixtures/common.rs"]
mod common;

use common::*;
use imgbuild::progress::Progress;
use imgbuild::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::{format, Keys, Store, StoreConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PARALLEL: usize = 16;

struct Measured {
    secs: f64,
    max_rss_kib: u64,
    ok: bool,
    stdout: String,
}

/// Runs `cmd` to completion, timing it and reading its peak RSS. The RSS comes from
/// GNU time (`/usr/bin/time -f %M`): Linux carries a process's high-water RSS across
/// fork+exec, so a child forked straight from this (large) test process would report
/// at least our own RSS.
fn measured(cmd: &mut Command) -> Measured {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut wrapped = Command::new("/usr/bin/time");
    wrapped
        .arg("-f")
        .arg("IMGBUILD-MAXRSS-KIB %M")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    let t = Instant::now();
    let status = wrapped
        .status()
        .unwrap_or_else(|e| panic!("/usr/bin/time (apt-get install time): {e}"));
    let secs = t.elapsed().as_secs_f64();
    let stderr = std::fs::read_to_string(err.path()).unwrap_or_default();
    let max_rss_kib = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("IMGBUILD-MAXRSS-KIB "))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or(0);
    Measured {
        secs,
        max_rss_kib,
        ok: status.success(),
        stdout: std::fs::read_to_string(out.path()).unwrap_or_default(),
    }
}

fn child_cfg() -> Option<serde_json::Value> {
    std::env::var("IMGBUILD_BENCH_CHILD")
        .ok()
        .map(|s| serde_json::from_str(&s).unwrap())
}

fn store_cfg(v: &serde_json::Value) -> (StoreConfig, PathBuf) {
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    let secrets = PathBuf::from(s("secrets"));
    (
        StoreConfig {
            bucket: s("bucket"),
            prefix: s("prefix"),
            endpoint: Some(s("endpoint")),
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: Some(secrets.join("s3.env")),
            object_lock_days: None,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        },
        secrets,
    )
}

/// The child side: `restore` (imgbuild restore of the newest snapshot) or `raw`
/// (GET every object the restore needs, in parallel, discarding the bytes).
#[test]
fn bench_child() {
    let Some(v) = child_cfg() else { return };
    let (cfg, secrets) = store_cfg(&v);
    let keys = Keys::load(
        &secrets.join("snapshot-encryption.key"),
        &secrets.join("snapshot-signing.key"),
    )
    .unwrap();
    rt().block_on(async {
        let store = Store::connect(&cfg).await.unwrap();
        let m = restore::latest_manifest(&store, &keys)
            .await
            .unwrap()
            .unwrap();
        match v["mode"].as_str().unwrap() {
            "restore" => {
                let out = PathBuf::from(v["out"].as_str().unwrap());
                let o = RestoreOptions {
                    parallel: PARALLEL,
                    progress: Progress::quiet(),
                    ..Default::default()
                };
                let r = restore::restore(&store, &keys, &m, &out, &o).await.unwrap();
                println!("bytes {}", r.bytes);
            }
            _ => {
                use futures_util::StreamExt;
                let ids: std::collections::BTreeSet<String> =
                    m.chunk_ids().into_iter().map(str::to_string).collect();
                let total: u64 = futures_util::stream::iter(ids)
                    .map(|id| {
                        let store = store.clone();
                        async move {
                            let k = format::chunk_key(&store.prefix, &id);
                            store.get(&k, u64::MAX).await.unwrap().unwrap().len() as u64
                        }
                    })
                    .buffer_unordered(PARALLEL)
                    .fold(0u64, |a, b| async move { a + b })
                    .await;
                println!("bytes {total}");
            }
        }
    });
}

fn make_dataset(root: &Path) -> u64 {
    std::fs::create_dir_all(root.join("media")).unwrap();
    std::fs::create_dir_all(root.join("db")).unwrap();
    let mut total = 0u64;
    // 288 MiB of incompressible media.
    for i in 0..48u64 {
        let d = noise(10_000 + i, 6 << 20);
        total += d.len() as u64;
        std::fs::write(root.join(format!("media/{i:02}.bin")), d).unwrap();
    }
    // ~96 MiB of compressible text in 2000 files.
    for i in 0..2000u64 {
        let dir = root.join(format!("text/{:02}", i % 40));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = String::new();
        let mut n = 0u64;
        while s.len() < 50 * 1024 {
            n += 1;
            s.push_str(&format!(
                "2026-11-21T10:{:02}:{:02}Z host{} service=app req={} status={} bytes={}\n",
                n % 60,
                (n * 7) % 60,
                i % 13,
                i * 1000 + n,
                [200, 200, 200, 404, 500][(n % 5) as usize],
                (n * 7919 + i) % 100_000
            ));
        }
        total += s.len() as u64;
        std::fs::write(dir.join(format!("{i:04}.log")), s).unwrap();
    }
    // A 32 MiB database dump: half text, half noise.
    let mut dump = Vec::new();
    for k in 0..64u64 {
        if k % 2 == 0 {
            dump.extend_from_slice(&noise(20_000 + k, 256 << 10));
        } else {
            dump.extend_from_slice(&b"INSERT INTO t VALUES (1, 'x');\n".repeat(8456));
        }
    }
    dump.truncate(32 << 20);
    total += dump.len() as u64;
    std::fs::write(root.join("db/pg.dump"), dump).unwrap();
    total
}

/// About 1 % of the bytes: 4 MiB rewritten inside one media file, lines appended to
/// 20 logs.
fn change_one_percent(root: &Path) -> u64 {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("media/17.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&noise(999, 4 << 20)).unwrap();
    let mut changed = 4u64 << 20;
    for i in 0..20u64 {
        let p = root.join(format!(
            "text/{:02}/{:04}.log",
            (i * 97) % 40,
            (i * 97) % 2000
        ));
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let line = format!("2026-11-22T00:00:00Z appended line {i}\n").repeat(100);
        f.write_all(line.as_bytes()).unwrap();
        changed += line.len() as u64;
    }
    changed
}

async fn prefix_bytes(store: &Store, prefix: &str) -> u64 {
    store
        .list(prefix)
        .await
        .unwrap()
        .iter()
        .map(|o| o.size)
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([home.join(".cargo/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct ToolRow {
    name: String,
    full_backup_s: f64,
    incr_backup_s: f64,
    incr_stored: u64,
    restore_s: f64,
    restore_rss_kib: u64,
}

#[test]
#[ignore = "benchmark: run benches/snapshot.sh"]
fn bench_snapshots_vs_restic_rustic() {
    let env = Env::new(false);
    let endpoint = env.cfg.endpoint.clone().unwrap();
    let work =
        tempfile::tempdir_in(std::env::var("IMGBUILD_BENCH_DIR").unwrap_or("/var/tmp".into()))
            .unwrap();
    let data = work.path().join("data");
    let logical = make_dataset(&data);
    eprintln!("dataset: {:.0} MiB", mib(logical));
    let rt = rt();
    let store = rt.block_on(env.store());
    let keys = env.keys();
    let aws_env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_REGION", "us-east-1"),
    ];
    let restic = find_tool("restic");
    let rustic = find_tool("rustic");
    let restic_repo = format!("s3:{endpoint}/{}/restic", env.cfg.bucket);
    let tool_cmd = |tool: &Path, args: &[&str]| {
        let mut c = Command::new(tool);
        c.args(args)
            .envs(aws_env)
            .env("RESTIC_PASSWORD", "bench")
            .env("RUSTIC_PASSWORD", "bench");
        c
    };
    // rustic takes S3 settings from a profile file (`-P <path without .toml>`).
    let rustic_profile = work.path().join("rustic-bench");
    std::fs::write(
        rustic_profile.with_extension("toml"),
        format!(
            "[repository]\nrepository = \"opendal:s3\"\npassword = \"bench\"\n\
             [repository.options]\nendpoint = \"{endpoint}\"\nbucket = \"{}\"\nroot = \"/rustic\"\n\
             region = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            env.cfg.bucket
        ),
    )
    .unwrap();
    let rustic_opts = |sub: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "-P".into(),
            rustic_profile.display().to_string(),
            "--no-progress".into(),
        ];
        v.extend(sub.iter().map(|s| s.to_string()));
        v
    };
    let mut rows = Vec::new();

    // --- full backups of the same state
    let src = [Source {
        name: "vol".into(),
        root: data.clone(),
    }];
    let o = BackupOptions {
        host: "bench".into(),
        parallel: PARALLEL,
        progress: Progress::quiet(),
        pack_target: imgbuild::snapshot::pack::PACK_TARGET,
    };
    let t = Instant::now();
    rt.block_on(backup::backup(&store, &keys, &src, &mut NoHooks, &o))
        .unwrap();
    let ib_full = t.elapsed().as_secs_f64();
    let mut restic_full = None;
    if let Some(r) = &restic {
        assert!(
            measured(&mut tool_cmd(r, &["-r", &restic_repo, "init"])).ok,
            "restic init"
        );
        let m = measured(&mut tool_cmd(
            r,
            &["-r", &restic_repo, "backup", data.to_str().unwrap()],
        ));
        assert!(m.ok, "restic backup");
        restic_full = Some(m.secs);
    }
    let mut rustic_full = None;
    if let Some(r) = &rustic {
        let init = rustic_opts(&["init"]);
        let init: Vec<&str> = init.iter().map(String::as_str).collect();
        if measured(&mut tool_cmd(r, &init)).ok {
            let b = rustic_opts(&["backup", data.to_str().unwrap()]);
            let b: Vec<&str> = b.iter().map(String::as_str).collect();
            let m = measured(&mut tool_cmd(r, &b));
            if m.ok {
                rustic_full = Some(m.secs);
            }
        } else {
            eprintln!("rustic init against moto failed; rustic left out");
        }
    }

    // --- 1 % change, incremental backups
    let changed = change_one_percent(&data);
    let before = rt.block_on(prefix_bytes(&store, &store.prefix));
    let t = Instant::now();
    let inc = rt
        .block_on(backup::backup(&store, &keys, &src, &mut NoHooks, &o))
        .unwrap();
    let ib_incr = t.elapsed().as_secs_f64();
    let ib_stored = rt.block_on(prefix_bytes(&store, &store.prefix)) - before;
    eprintln!("imgbuild incremental: {:?}", inc.stats);
    let (bucket, prefix) = (env.cfg.bucket.clone(), env.cfg.prefix.clone());
    let child = |mode: &str, out: &Path| {
        let cfg = serde_json::json!({
            "bucket": bucket, "prefix": prefix, "endpoint": endpoint,
            "secrets": env.secrets, "mode": mode, "out": out,
        });
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "bench_child", "--nocapture", "--test-threads=1"])
            .env("IMGBUILD_BENCH_CHILD", cfg.to_string());
        measured(&mut c)
    };
    let out = work.path().join("ib-restore");
    let ib_restore = child("restore", &out);
    assert!(
        ib_restore.ok,
        "imgbuild restore failed: {}",
        ib_restore.stdout
    );
    assert_eq!(
        tree_hash(&data),
        tree_hash(&out.join("vol/_data")),
        "restore differs"
    );
    std::fs::remove_dir_all(&out).unwrap();
    let raw = child("raw", &out);
    assert!(raw.ok);
    let raw_bytes: u64 = raw
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "bytes")
        .nth(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    rows.push(ToolRow {
        name: "imgbuild".into(),
        full_backup_s: ib_full,
        incr_backup_s: ib_incr,
        incr_stored: ib_stored,
        restore_s: ib_restore.secs,
        restore_rss_kib: ib_restore.max_rss_kib,
    });

    if let (Some(r), Some(full)) = (&restic, restic_full) {
        let before = rt.block_on(prefix_bytes(&store, "restic/"));
        let m = measured(&mut tool_cmd(
            r,
            &["-r", &restic_repo, "backup", data.to_str().unwrap()],
        ));
        assert!(m.ok);
        let stored = rt.block_on(prefix_bytes(&store, "restic/")) - before;
        let rout = work.path().join("restic-restore");
        let rr = measured(&mut tool_cmd(
            r,
            &[
                "-r",
                &restic_repo,
                "restore",
                "latest",
                "--target",
                rout.to_str().unwrap(),
            ],
        ));
        assert!(rr.ok, "restic restore");
        rows.push(ToolRow {
            name: "restic 0.14 (Debian)".into(),
            full_backup_s: full,
            incr_backup_s: m.secs,
            incr_stored: stored,
            restore_s: rr.secs,
            restore_rss_kib: rr.max_rss_kib,
        });
        std::fs::remove_dir_all(&rout).ok();
    }
    if let (Some(r), Some(full)) = (&rustic, rustic_full) {
        let before = rt.block_on(prefix_bytes(&store, "rustic/"));
        let b = rustic_opts(&["backup", data.to_str().unwrap()]);
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        let m = measured(&mut tool_cmd(r, &b));
        let stored = rt.block_on(prefix_bytes(&store, "rustic/")) - before;
        let rout = work.path().join("rustic-restore");
        let rs = rustic_opts(&["restore", "latest", rout.to_str().unwrap()]);
        let rs: Vec<&str> = rs.iter().map(String::as_str).collect();
        let rr = measured(&mut tool_cmd(r, &rs));
        if m.ok && rr.ok {
            rows.push(ToolRow {
                name: "rustic (crates.io)".into(),
                full_backup_s: full,
                incr_backup_s: m.secs,
                incr_stored: stored,
                restore_s: rr.secs,
                restore_rss_kib: rr.max_rss_kib,
            });
        }
        std::fs::remove_dir_all(&rout).ok();
    }

    // --- report
    let mut md = String::new();
    md.push_str(&format!(
        "Data: {:.0} MiB in {} files (288 MiB random media, ~96 MiB logs in 2000 files, a 32 MiB dump); \
         change: {:.1} MiB ({:.2} %). Server: moto on 127.0.0.1, {PARALLEL} connections; 2 cores.\n\n",
        mib(logical),
        2049 + 48,
        mib(changed),
        changed as f64 * 100.0 / logical as f64
    ));
    md.push_str("| tool | full backup | incremental (1 %) | stored by incremental | restore | restore MiB/s | restore peak RSS |\n|---|---|---|---|---|---|---|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.1} s | {:.2} s | {:.1} MiB | {:.1} s | {:.0} | {:.0} MiB |\n",
            r.name,
            r.full_backup_s,
            r.incr_backup_s,
            mib(r.incr_stored),
            r.restore_s,
            mib(logical) / r.restore_s,
            r.restore_rss_kib as f64 / 1024.0
        ));
    }
    md.push_str(&format!(
        "| raw parallel GetObject (ceiling) | | | | {:.1} s ({:.0} MiB of objects) | {:.0} | {:.0} MiB |\n\n",
        raw.secs,
        mib(raw_bytes),
        mib(logical) / raw.secs,
        raw.max_rss_kib as f64 / 1024.0
    ));
    let ib = &rows[0];
    md.push_str(&format!(
        "Ratios: imgbuild restore = {:.2}× raw GetObject throughput",
        raw.secs / ib.restore_s
    ));
    for r in rows.iter().skip(1) {
        md.push_str(&format!(
            "; {:.2}× {} restore, incremental {:.2}× its time and {:.2}× its stored bytes",
            r.restore_s / ib.restore_s,
            r.name,
            ib.incr_backup_s / r.incr_backup_s,
            ib.incr_stored as f64 / r.incr_stored.max(1) as f64
        ));
    }
    md.push_str(".\n");
    if restic.is_none() {
        md.push_str("\nrestic was not installed (apt-get install restic): no comparison.\n");
    }
    if rustic_full.is_none() {
        md.push_str(
            "\nrustic was not measured (not installed, or it could not use the moto server).\n",
        );
    }
    println!("{md}");
    if let Ok(p) = std::env::var("IMGBUILD_BENCH_OUT") {
        std::fs::write(p, &md).unwrap();
    }
}
