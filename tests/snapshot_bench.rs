//! Snapshot benchmark (not a timed test): run by benches/snapshot.sh as
//! `cargo test --release --test snapshot_bench -- --ignored --nocapture`.
//!
//! One run measures the same data on two S3 servers on 127.0.0.1, Garage 2.5 (single
//! node) and moto: imgbuild, restic (Debian package) and rustic (crates.io rustic-rs)
//! when installed, and a raw parallel ranged GET of the packs imgbuild's restore reads
//! as the ceiling, and imgbuild's fetches alone (the restore's GETs, decryption,
//! decompression and verification, nothing written) as the floor of a verified
//! restore on the same cores. imgbuild's backups and restore and the raw GET run as child
//! processes of this test, like restic and rustic, so every tool's time includes its
//! process start and every peak RSS is read the same way (GNU time). Requests:
//! imgbuild counts its own (`requests` in its reports), and both servers' request
//! logs (Garage's own log, moto's werkzeug log) count every tool's the same way.

#[path = "snapshot-fixtures/common.rs"]
mod common;

use common::*;
use imgbuild::progress::Progress;
use imgbuild::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::store::Requests;
use imgbuild::snapshot::{Keys, Store, StoreConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PARALLEL: usize = 16;

struct Measured {
    secs: f64,
    max_rss_kib: u64,
    /// User + system CPU seconds of the process and its children.
    cpu: f64,
    ok: bool,
    stdout: String,
    stderr: String,
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
        .arg("IMGBUILD-MAXRSS-KIB %M\nIMGBUILD-CPU %U %S")
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
    let cpu = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("IMGBUILD-CPU "))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|t| t.parse::<f64>().ok())
                .sum()
        })
        .next_back()
        .unwrap_or(0.0);
    Measured {
        secs,
        max_rss_kib,
        cpu,
        ok: status.success(),
        stdout: std::fs::read_to_string(out.path()).unwrap_or_default(),
        stderr,
    }
}

/// CPU seconds (user + system) used so far by the server whose output goes to `log`:
/// on 2 cores a restore's time is shared with the server that answers it.
fn server_cpu(log: &Path) -> f64 {
    let log = log.canonicalize().unwrap_or_else(|_| log.to_path_buf());
    // SAFETY: sysconf only reads a constant.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    let mut found = false;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        let writes_log = ["1", "2"]
            .iter()
            .any(|fd| std::fs::read_link(p.join("fd").join(fd)).is_ok_and(|t| t == log));
        if !writes_log {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // After the command name: state, ppid, ..., utime (12th), stime (13th).
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
            .sum();
        total += ticks / ticks_per_s;
        found = true;
    }
    if !found {
        eprintln!(
            "no process writes {}: its server CPU shows as 0",
            log.display()
        );
    }
    total
}

/// The link a VPS restores over: the restores are measured again with the loopback
/// limited to it, where the link, not the CPU, is what bounds a restore.
const LINK_RATE: &str = "1gbit";
const LINK_NAME: &str = "1 Gbit/s";

/// The loopback limited to `rate` by a token bucket (`tc qdisc ... tbf`) while this
/// lives: all of `lo`, not only the server's port, so the benchmark runs alone. Needs
/// root; the limit is removed on drop, panics included, and benches/snapshot.sh also
/// removes one that a killed run left behind.
struct LinkLimit;

impl LinkLimit {
    fn apply(rate: &str) -> Result<LinkLimit, String> {
        let out = Command::new("tc")
            .args(["qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate])
            .args(["burst", "256kb", "latency", "20ms"])
            .output()
            .map_err(|e| format!("tc: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tc qdisc add dev lo root tbf: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LinkLimit)
    }
}

impl Drop for LinkLimit {
    fn drop(&mut self) {
        let removed = Command::new("tc")
            .args(["qdisc", "del", "dev", "lo", "root"])
            .status()
            .is_ok_and(|s| s.success());
        if !removed {
            eprintln!("the loopback may still be limited: run `tc qdisc del dev lo root`");
        }
    }
}

/// The value after `name ` on the child's output line that starts with it.
fn out_field<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
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
            region: s("region"),
            path_style: true,
            credentials_file: Some(secrets.join("s3.env")),
            object_lock_days: None,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        },
        secrets,
    )
}

/// The child side: `backup` (imgbuild backup of `src`), `restore` (imgbuild restore of
/// the newest snapshot into `out`), `fetch` (the restore's plan fetched, opened and
/// verified, the plaintext dropped) or `raw` (GET every pack in ranges of the
/// restore's largest ranged GET, in parallel, discarding the bytes). Each prints its
/// requests.
#[test]
fn bench_child() {
    let Some(v) = child_cfg() else { return };
    let (cfg, secrets) = store_cfg(&v);
    let keys = Keys::load(
        &secrets.join("snapshot-encryption.key"),
        &secrets.join("snapshot-signing.key"),
    )
    .unwrap();
    // libtest has printed "test bench_child ... " without a newline: start a line.
    println!();
    rt().block_on(async {
        let store = Store::connect(&cfg).await.unwrap();
        match v["mode"].as_str().unwrap() {
            "backup" => {
                let src = [Source {
                    name: "vol".into(),
                    root: PathBuf::from(v["src"].as_str().unwrap()),
                    wal_start: None,
                }];
                let o = BackupOptions {
                    host: "bench".into(),
                    parallel: PARALLEL,
                    progress: Progress::quiet(),
                    pack_target: imgbuild::snapshot::pack::PACK_TARGET,
                };
                let r = backup::backup(&store, &keys, &src, &mut NoHooks, &o)
                    .await
                    .unwrap();
                println!("requests {}", serde_json::to_string(&r.requests).unwrap());
            }
            "restore" => {
                let m = restore::latest_manifest(&store, &keys)
                    .await
                    .unwrap()
                    .unwrap();
                let out = PathBuf::from(v["out"].as_str().unwrap());
                let o = RestoreOptions {
                    parallel: PARALLEL,
                    progress: Progress::quiet(),
                    ..Default::default()
                };
                let r = restore::restore(&store, &keys, &m, &out, &o).await.unwrap();
                println!("bytes {}", r.bytes);
                println!("requests {}", serde_json::to_string(&r.requests).unwrap());
            }
            "fetch" => {
                use futures_util::StreamExt;
                let m = restore::latest_manifest(&store, &keys)
                    .await
                    .unwrap()
                    .unwrap();
                let before = store.requests();
                let vols: Vec<_> = m.volumes.iter().collect();
                let (_ix, mut plans) = restore::plan_all(&store, &keys, &vols).await.unwrap();
                // The restore's own plan: GETs meeting on the same boundaries.
                for p in &mut plans {
                    restore::link_aligned(p, restore::GET_ALIGN, restore::DATA_PLAIN_MAX);
                }
                let mut links = restore::Links::default();
                let fetches = futures_util::stream::iter(plans.into_iter().flatten()).map(|f| {
                    let (store, keys) = (store.clone(), keys.clone());
                    let (from, to) = links.next(&f);
                    async move {
                        let c = restore::fetch_linked(&store, &keys, &f, from, to)
                            .await
                            .unwrap();
                        c.iter().map(|b| b.len() as u64).sum::<u64>()
                    }
                });
                run_and_report(&store, &before, fetches).await;
            }
            _ => {
                use futures_util::StreamExt;
                let ix = imgbuild::snapshot::pack::Index::load(&store, &keys)
                    .await
                    .unwrap();
                let before = store.requests();
                let mut ranges = Vec::new();
                for p in &ix.packs {
                    let mut off = 0;
                    while off < p.size {
                        let len = (p.size - off).min(restore::RANGE_MAX);
                        ranges.push((p.key.clone(), off, len));
                        off += len;
                    }
                }
                let gets = futures_util::stream::iter(ranges).map(|(key, off, len)| {
                    let store = store.clone();
                    async move {
                        let b = store.get_range(&key, off, len).await.unwrap().unwrap();
                        b.len() as u64
                    }
                });
                run_and_report(&store, &before, gets).await;
            }
        }
    });
}

/// Runs `requests` (each giving the bytes it read) `PARALLEL` at a time, then prints
/// the bytes and the requests made since `before`, as every child mode does.
async fn run_and_report<F: std::future::Future<Output = u64>>(
    store: &Store,
    before: &Requests,
    requests: impl futures_util::Stream<Item = F>,
) {
    use futures_util::StreamExt;
    let total: u64 = requests
        .buffer_unordered(PARALLEL)
        .fold(0u64, |a, b| async move { a + b })
        .await;
    println!("bytes {total}");
    let r = store.requests().since(before);
    println!("requests {}", serde_json::to_string(&r).unwrap());
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

/// Requests of one operation: as the tool counted them, and as the server did.
#[derive(Default)]
struct Reqs {
    own: Option<Requests>,
    server: BTreeMap<String, u64>,
}

fn own_reqs(m: &Measured) -> Option<Requests> {
    let j: serde_json::Value = serde_json::from_str(out_field(&m.stdout, "requests")?).ok()?;
    let n = |k: &str| j[k].as_u64().unwrap_or(0);
    Some(Requests {
        put: n("put"),
        get: n("get"),
        head: n("head"),
        list: n("list"),
        delete: n("delete"),
        retention: n("retention"),
        bytes_sent: n("bytes_sent"),
        bytes_received: n("bytes_received"),
    })
}

fn fmt_own(r: &Requests) -> String {
    let mut s = format!(
        "{} (PUT {}, GET {}, HEAD {}, LIST {}",
        r.total(),
        r.put,
        r.get,
        r.head,
        r.list
    );
    if r.delete > 0 {
        s.push_str(&format!(", DELETE {}", r.delete));
    }
    if r.retention > 0 {
        s.push_str(&format!(", retention {}", r.retention));
    }
    s + ")"
}

/// Server-logged requests by class.
fn fmt_server(classes: &BTreeMap<String, u64>) -> String {
    let total: u64 = classes.values().sum();
    let order = ["PUT", "GET", "HEAD", "LIST", "DELETE", "retention", "other"];
    let parts: Vec<String> = order
        .iter()
        .filter_map(|c| classes.get(*c).map(|n| format!("{c} {n}")))
        .collect();
    format!("{total} ({})", parts.join(", "))
}

fn fmt_reqs(r: &Reqs) -> String {
    let mut parts = Vec::new();
    if let Some(o) = &r.own {
        parts.push(format!("own count {}", fmt_own(o)));
    }
    parts.push(format!("server log {}", fmt_server(&r.server)));
    parts.join("; ")
}

struct ToolRow {
    name: String,
    full_s: f64,
    full_rss_kib: u64,
    full_reqs: Reqs,
    objects: usize,
    stored: u64,
    incr_s: f64,
    incr_stored: u64,
    restore_s: f64,
    restore_rss_kib: u64,
    restore_reqs: Reqs,
    /// CPU seconds of the restoring tool, and of the server while it restored.
    restore_cpu: (f64, f64),
}

struct Tools {
    restic: Option<PathBuf>,
    rustic: Option<PathBuf>,
}

/// Runs of imgbuild's restore and of the raw GET, taken in turn.
const REPEATS: usize = 3;

/// The run of median time, with the server's requests and CPU measured beside it.
fn median_run<T>(mut runs: Vec<(Measured, T, f64)>) -> (Measured, T, f64) {
    runs.sort_by(|a, b| a.0.secs.total_cmp(&b.0.secs));
    runs.swap_remove(runs.len() / 2)
}

/// Moves a finished restore (or data set) aside instead of deleting it: on ext4
/// without a journal (this machine's) every inode allocated within ~30 s of a large
/// delete first scans the recently freed ones, and freed page cache faults in again
/// (the VM reports free pages to its host). A restore made right after deleting the
/// previous one took 3.4-3.6 s behind the link instead of 2.7-2.8 s, and only the
/// tools that write files paid it, never the raw GET. Everything is deleted with the
/// work directory at the end.
fn retire(work: &Path, p: &Path) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if p.exists() {
        let dir = work.join("retired");
        std::fs::create_dir_all(&dir).unwrap();
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::fs::rename(p, dir.join(n.to_string())).unwrap();
    }
}

/// Everything measured on one server, as a markdown subsection.
fn run_on_server(title: &str, env: &Env, log: &Path, work: &Path, tools: &Tools) -> String {
    let endpoint = env.cfg.endpoint.clone().unwrap();
    let data = work.join("data");
    retire(work, &data);
    let logical = make_dataset(&data);
    eprintln!("{title}: dataset {:.0} MiB", mib(logical));
    let rt = rt();
    let store = rt.block_on(env.store());
    let (access, secret, region) = (
        env.s3_var("AWS_ACCESS_KEY_ID"),
        env.s3_var("AWS_SECRET_ACCESS_KEY"),
        env.s3_var("AWS_REGION"),
    );
    let counts = || log_len(log);
    let server_diff = |before: &u64| {
        // The server logs a request as it answers it: let the last lines land.
        std::thread::sleep(std::time::Duration::from_millis(300));
        logged_requests(log, *before)
    };
    let list_stats = |prefix: &str| -> (usize, u64) {
        let l = rt.block_on(store.list(prefix)).unwrap();
        (l.len(), l.iter().map(|o| o.size).sum())
    };

    let restic_repo = format!("s3:{endpoint}/{}/restic", env.cfg.bucket);
    let region_opt = format!("s3.region={region}");
    let tool_cmd = |tool: &Path, args: &[&str]| {
        let mut c = Command::new(tool);
        c.args(args)
            .env("AWS_ACCESS_KEY_ID", &access)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .env("AWS_DEFAULT_REGION", &region)
            .env("AWS_REGION", &region)
            .env("RESTIC_PASSWORD", "bench")
            .env("RUSTIC_PASSWORD", "bench");
        c
    };
    let restic_args = |sub: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "-r".into(),
            restic_repo.clone(),
            "-o".into(),
            region_opt.clone(),
        ];
        v.extend(sub.iter().map(|s| s.to_string()));
        v
    };
    // rustic takes S3 settings from a profile file (`-P <path without .toml>`).
    let rustic_profile = work.join("rustic-bench");
    std::fs::write(
        rustic_profile.with_extension("toml"),
        format!(
            "[repository]\nrepository = \"opendal:s3\"\npassword = \"bench\"\n\
             [repository.options]\nendpoint = \"{endpoint}\"\nbucket = \"{}\"\nroot = \"/rustic\"\n\
             region = \"{region}\"\naccess_key_id = \"{access}\"\nsecret_access_key = \"{secret}\"\n",
            env.cfg.bucket
        ),
    )
    .unwrap();
    let rustic_args = |sub: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "-P".into(),
            rustic_profile.display().to_string(),
            "--no-progress".into(),
        ];
        v.extend(sub.iter().map(|s| s.to_string()));
        v
    };
    let run_tool = |tool: &Path, args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = counts();
        let m = measured(&mut tool_cmd(tool, &a));
        (m, server_diff(&before))
    };
    let (bucket, prefix) = (env.cfg.bucket.clone(), env.cfg.prefix.clone());
    let child = |mode: &str, out: &Path| {
        let cfg = serde_json::json!({
            "bucket": bucket, "prefix": prefix, "endpoint": endpoint, "region": env.cfg.region,
            "secrets": env.secrets, "mode": mode, "out": out, "src": data,
        });
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "bench_child", "--nocapture", "--test-threads=1"])
            .env("IMGBUILD_BENCH_CHILD", cfg.to_string());
        let before = counts();
        let m = measured(&mut c);
        (m, server_diff(&before))
    };
    let mut notes = Vec::new();

    // --- full backups of the same state
    let (ib_full, ib_full_srv) = child("backup", work);
    assert!(ib_full.ok, "imgbuild backup: {}", ib_full.stderr);
    let (ib_objects, ib_stored) = list_stats(&store.prefix);
    let mut restic_full = None;
    if let Some(r) = &tools.restic {
        let (init, _) = run_tool(r, restic_args(&["init"]));
        let (m, srv) = run_tool(r, restic_args(&["backup", data.to_str().unwrap()]));
        if init.ok && m.ok {
            let (objects, stored) = list_stats("restic/");
            restic_full = Some((m, srv, objects, stored));
        } else {
            let e = format!("restic failed on {title}: {}{}", init.stderr, m.stderr);
            eprintln!("{e}");
            notes.push(format!("restic failed on {title}."));
        }
    }
    let mut rustic_full = None;
    if let Some(r) = &tools.rustic {
        let (init, _) = run_tool(r, rustic_args(&["init"]));
        if init.ok {
            let (m, srv) = run_tool(r, rustic_args(&["backup", data.to_str().unwrap()]));
            if m.ok {
                let (objects, stored) = list_stats("rustic/");
                rustic_full = Some((m, srv, objects, stored));
            } else {
                eprintln!("rustic backup failed on {title}: {}", m.stderr);
                notes.push(format!("rustic's backup failed on {title}."));
            }
        } else {
            eprintln!("rustic init failed on {title}: {}", init.stderr);
            notes.push(format!("rustic init failed on {title}; rustic left out."));
        }
    }

    // --- 1 % change, incremental backups
    let changed = change_one_percent(&data);
    let before = list_stats(&store.prefix).1;
    let (ib_incr, _) = child("backup", work);
    assert!(ib_incr.ok, "imgbuild incremental: {}", ib_incr.stderr);
    let ib_incr_stored = list_stats(&store.prefix).1 - before;

    // --- restores: imgbuild's and the raw GET in turn, REPEATS times; the run of
    // median time of each is the one reported (both vary by a third from run to run
    // here, with the server on the same 2 cores).
    let out = work.join("ib-restore");
    let mut ib_runs = Vec::new();
    let mut raw_runs = Vec::new();
    let mut fetch_runs = Vec::new();
    // A child's run, its server requests and the server's CPU meanwhile.
    let measured = |mode: &str| {
        let s0 = server_cpu(log);
        let (m, srv) = child(mode, &out);
        (m, srv, server_cpu(log) - s0)
    };
    for _ in 0..REPEATS {
        let (m, srv, scpu) = measured("restore");
        assert!(m.ok, "imgbuild restore failed: {}", m.stderr);
        assert_eq!(
            tree_hash(&data),
            tree_hash(&out.join("vol/_data")),
            "restore differs"
        );
        retire(work, &out);
        ib_runs.push((m, srv, scpu));
        let run = measured("raw");
        assert!(run.0.ok, "raw GET: {}", run.0.stderr);
        raw_runs.push(run);
        let run = measured("fetch");
        assert!(run.0.ok, "imgbuild's fetches alone: {}", run.0.stderr);
        fetch_runs.push(run);
    }
    let pairs: Vec<String> = ib_runs
        .iter()
        .zip(&raw_runs)
        .zip(&fetch_runs)
        .map(|((i, r), f)| {
            format!(
                "{:.2} s against {:.2} s ({:.2}×; fetches alone {:.2} s, {:.2}×)",
                i.0.secs,
                r.0.secs,
                r.0.secs / i.0.secs,
                f.0.secs,
                r.0.secs / f.0.secs
            )
        })
        .collect();
    notes.push(format!(
        "imgbuild's restore, the raw GET and imgbuild's fetches alone on {title}, run in \
         turn {REPEATS} times (the median of each is in the tables): {}.",
        pairs.join("; ")
    ));
    let (fetched, _, fetched_scpu) = median_run(fetch_runs);
    let (ib_restore, ib_restore_srv, ib_restore_scpu) = median_run(ib_runs);
    let (raw, raw_srv, raw_scpu) = median_run(raw_runs);
    let raw_bytes: u64 = out_field(&raw.stdout, "bytes")
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    let mut rows = vec![ToolRow {
        name: "imgbuild".into(),
        full_s: ib_full.secs,
        full_rss_kib: ib_full.max_rss_kib,
        full_reqs: Reqs {
            own: own_reqs(&ib_full),
            server: ib_full_srv,
        },
        objects: ib_objects,
        stored: ib_stored,
        incr_s: ib_incr.secs,
        incr_stored: ib_incr_stored,
        restore_s: ib_restore.secs,
        restore_rss_kib: ib_restore.max_rss_kib,
        restore_reqs: Reqs {
            own: own_reqs(&ib_restore),
            server: ib_restore_srv,
        },
        restore_cpu: (ib_restore.cpu, ib_restore_scpu),
    }];

    if let (Some(r), Some((full, full_srv, objects, stored))) = (&tools.restic, restic_full) {
        let before = list_stats("restic/").1;
        let (m, _) = run_tool(r, restic_args(&["backup", data.to_str().unwrap()]));
        let incr_stored = list_stats("restic/").1 - before;
        let rout = work.join("restic-restore");
        let s0 = server_cpu(log);
        let (rr, rr_srv) = run_tool(
            r,
            restic_args(&["restore", "latest", "--target", rout.to_str().unwrap()]),
        );
        let rr_scpu = server_cpu(log) - s0;
        if m.ok && rr.ok {
            rows.push(ToolRow {
                name: "restic 0.14 (Debian)".into(),
                full_s: full.secs,
                full_rss_kib: full.max_rss_kib,
                full_reqs: Reqs {
                    own: None,
                    server: full_srv,
                },
                objects,
                stored,
                incr_s: m.secs,
                incr_stored,
                restore_s: rr.secs,
                restore_rss_kib: rr.max_rss_kib,
                restore_reqs: Reqs {
                    own: None,
                    server: rr_srv,
                },
                restore_cpu: (rr.cpu, rr_scpu),
            });
        } else {
            eprintln!("restic failed on {title}: {}{}", m.stderr, rr.stderr);
            notes.push(format!(
                "restic's incremental or restore failed on {title}."
            ));
        }
        retire(work, &rout);
    }
    if let (Some(r), Some((full, full_srv, objects, stored))) = (&tools.rustic, rustic_full) {
        let before = list_stats("rustic/").1;
        let (m, _) = run_tool(r, rustic_args(&["backup", data.to_str().unwrap()]));
        let incr_stored = list_stats("rustic/").1 - before;
        let rout = work.join("rustic-restore");
        let s0 = server_cpu(log);
        let (rr, rr_srv) = run_tool(
            r,
            rustic_args(&["restore", "latest", rout.to_str().unwrap()]),
        );
        let rr_scpu = server_cpu(log) - s0;
        if m.ok && rr.ok {
            rows.push(ToolRow {
                name: "rustic (crates.io)".into(),
                full_s: full.secs,
                full_rss_kib: full.max_rss_kib,
                full_reqs: Reqs {
                    own: None,
                    server: full_srv,
                },
                objects,
                stored,
                incr_s: m.secs,
                incr_stored,
                restore_s: rr.secs,
                restore_rss_kib: rr.max_rss_kib,
                restore_reqs: Reqs {
                    own: None,
                    server: rr_srv,
                },
                restore_cpu: (rr.cpu, rr_scpu),
            });
        } else {
            eprintln!("rustic failed on {title}: {}{}", m.stderr, rr.stderr);
            notes.push(format!(
                "rustic's incremental or restore failed on {title}."
            ));
        }
        retire(work, &rout);
    }
    // --- the restores again, behind a VPS's link (Garage only: moto's own CPU, not
    // the link, bounds what it serves)
    let mut link_rows: Vec<(String, f64)> = Vec::new();
    if title.starts_with("Garage") {
        match LinkLimit::apply(LINK_RATE) {
            Ok(_limit) => {
                let out = work.join("ib-restore-link");
                let (m, _) = child("restore", &out);
                assert!(m.ok, "imgbuild restore behind the link: {}", m.stderr);
                assert_eq!(tree_hash(&data), tree_hash(&out.join("vol/_data")));
                retire(work, &out);
                link_rows.push(("imgbuild".into(), m.secs));
                let (m, _) = child("raw", &out);
                assert!(m.ok, "raw GET behind the link: {}", m.stderr);
                link_rows.push(("raw parallel ranged GET".into(), m.secs));
                let peers = [
                    (&tools.restic, "restic 0.14 (Debian)", true),
                    (&tools.rustic, "rustic (crates.io)", false),
                ];
                for (tool, name, is_restic) in peers {
                    let Some(t) = tool else { continue };
                    let rout = work.join("peer-restore-link");
                    let args = if is_restic {
                        restic_args(&["restore", "latest", "--target", rout.to_str().unwrap()])
                    } else {
                        rustic_args(&["restore", "latest", rout.to_str().unwrap()])
                    };
                    let (m, _) = run_tool(t, args);
                    if m.ok {
                        link_rows.push((name.into(), m.secs));
                    } else {
                        notes.push(format!(
                            "{name}'s restore behind the link failed on {title}."
                        ));
                    }
                    retire(work, &rout);
                }
            }
            Err(e) => notes.push(format!(
                "The restores behind a {LINK_NAME} link were not measured: {e} (needs root)."
            )),
        }
    }
    retire(work, &data);

    // --- report
    let gb = logical as f64 / 1e9;
    let mut md = format!(
        "### {title}\n\nChange: {:.1} MiB ({:.2} %).\n\n",
        mib(changed),
        changed as f64 * 100.0 / logical as f64
    );
    md.push_str(
        "| tool | full backup | backup peak RSS | incremental (1 %) | stored by incremental | restore | restore MiB/s | restore peak RSS |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.1} s | {:.0} MiB | {:.2} s | {:.1} MiB | {:.1} s | {:.0} | {:.0} MiB |\n",
            r.name,
            r.full_s,
            r.full_rss_kib as f64 / 1024.0,
            r.incr_s,
            mib(r.incr_stored),
            r.restore_s,
            mib(logical) / r.restore_s,
            r.restore_rss_kib as f64 / 1024.0
        ));
    }
    md.push_str(&format!(
        "| raw parallel ranged GET of imgbuild's packs (ceiling) | | | | | {:.1} s ({:.0} MiB) | {:.0} | {:.0} MiB |\n\n",
        raw.secs,
        mib(raw_bytes),
        mib(logical) / raw.secs,
        raw.max_rss_kib as f64 / 1024.0
    ));
    md.push_str(
        "| restore | time | CPU of the tool | CPU of the server meanwhile |\n\
         |---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.2} s | {:.2} s | {:.2} s |\n",
            r.name, r.restore_s, r.restore_cpu.0, r.restore_cpu.1
        ));
    }
    md.push_str(&format!(
        "| imgbuild's fetches alone: the restore's GETs, decryption, decompression and \
         verification, nothing written | {:.2} s | {:.2} s | {:.2} s |\n",
        fetched.secs, fetched.cpu, fetched_scpu
    ));
    md.push_str(&format!(
        "| raw parallel ranged GET | {:.2} s | {:.2} s | {:.2} s |\n\n",
        raw.secs, raw.cpu, raw_scpu
    ));
    md.push_str(
        "| tool | objects after the full backup | objects per GB of data | stored by the full backup | requests per full backup | requests per restore |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} MiB | {} | {} |\n",
            r.name,
            r.objects,
            r.objects as f64 / gb,
            mib(r.stored),
            fmt_reqs(&r.full_reqs),
            fmt_reqs(&r.restore_reqs)
        ));
    }
    md.push_str(&format!(
        "| raw ranged GET | | | | | {} |\n\n",
        fmt_reqs(&Reqs {
            own: own_reqs(&raw),
            server: raw_srv
        })
    ));
    let ib = &rows[0];
    md.push_str(&format!(
        "Ratios on {title} (imgbuild against each): restore throughput {:.2}× the raw GET's \
         (its fetches alone, nothing written: {:.2}×)",
        raw.secs / ib.restore_s,
        raw.secs / fetched.secs
    ));
    for r in rows.iter().skip(1) {
        md.push_str(&format!(
            "; against {}: restore throughput {:.2}×, full backup {:.2}× as fast, \
             incremental {:.2}× as fast, storing {:.2}× its incremental bytes and {:.2}× its objects",
            r.name,
            r.restore_s / ib.restore_s,
            r.full_s / ib.full_s,
            r.incr_s / ib.incr_s,
            ib.incr_stored as f64 / r.incr_stored.max(1) as f64,
            ib.objects as f64 / r.objects.max(1) as f64
        ));
    }
    md.push_str(".\n");
    if let Some((_, ib_s)) = link_rows.first() {
        md.push_str(&format!(
            "\nThe restores again with the loopback limited to {LINK_NAME} (a VPS's link; \
             `tc qdisc ... tbf`):\n\n| restore behind the link | time | MiB/s | imgbuild's throughput against it |\n|---|---|---|---|\n"
        ));
        for (name, secs) in &link_rows {
            md.push_str(&format!(
                "| {name} | {secs:.2} s | {:.0} | {} |\n",
                mib(logical) / secs,
                if name == "imgbuild" {
                    String::new()
                } else {
                    format!("{:.2}×", secs / ib_s)
                }
            ));
        }
    }
    for n in notes {
        md.push_str(&format!("\n{n}\n"));
    }
    md
}

#[test]
#[ignore = "benchmark: run benches/snapshot.sh"]
fn bench_snapshots_vs_restic_rustic() {
    let work =
        tempfile::tempdir_in(std::env::var("IMGBUILD_BENCH_DIR").unwrap_or("/var/tmp".into()))
            .unwrap();
    let tools = Tools {
        restic: find_tool("restic"),
        rustic: find_tool("rustic"),
    };
    let logical = make_dataset(&work.path().join("probe"));
    retire(work.path(), &work.path().join("probe"));
    let mut md = format!(
        "Data: {:.0} MiB in {} files (288 MiB random media, ~96 MiB logs in 2000 files, a 32 MiB dump), \
         the same on both servers; {PARALLEL} connections for imgbuild, restic and rustic with their \
         defaults; 2 cores shared with the servers. Times include each tool's process start.\n\n",
        mib(logical),
        2049 + 48,
    );
    let genv = Env::garage_logged();
    md.push_str(&run_on_server(
        "Garage 2.5 (single node, 127.0.0.1)",
        &genv,
        &garage_logged().log,
        work.path(),
        &tools,
    ));
    md.push('\n');
    let menv = Env::moto_logged();
    md.push_str(&run_on_server(
        "moto 5.2 (127.0.0.1)",
        &menv,
        &moto_logged().log,
        work.path(),
        &tools,
    ));
    if tools.restic.is_none() {
        md.push_str("\nrestic was not installed (apt-get install restic): no comparison.\n");
    }
    if tools.rustic.is_none() {
        md.push_str(
            "\nrustic was not installed (cargo install rustic-rs --locked): not measured.\n",
        );
    }
    println!("{md}");
    if let Ok(p) = std::env::var("IMGBUILD_BENCH_OUT") {
        std::fs::write(p, &md).unwrap();
    }
}
