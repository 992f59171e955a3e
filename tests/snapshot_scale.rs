//! Memory at scale (issue 13): a full backup, an incremental backup after a 1 % change,
//! a prune, a check reading every pack and a restore of a volume of many small files,
//! each run as a child process under GNU time so its peak RSS is its own.
//!
//! - `memory_does_not_grow_with_the_file_count` (CI, moto): 100,000 files of up to
//!   128 bytes, then 200,000 of up to 64 bytes: the same 6 MB of data, less than one
//!   pack, so the data in flight (packs being filled and uploaded, ranged GETs not yet
//!   written: up to about 130 MiB whatever the file count) weighs the same in both, and
//!   so do the entry-list buffers (a few MB of list fetched ahead), which 100,000
//!   files already fill. Holding a volume's entry list costs about 300 bytes a file
//!   (the list itself, then its JSON in the manifest), so 100,000 more files would add
//!   about 50 MiB to a peak; streamed, a peak may grow by at most 24 MiB.
//! - `scale_2m_files` (ignored; `bash benches/scale.sh`): 2,000,000 files on Garage,
//!   every peak ≤ 256 MiB, the restored tree identical; prints a table for
//!   docs/benchmarks.md.

#[path = "snapshot-fixtures/common.rs"]
mod common;

use common::*;
use imgbuild::progress::Progress;
use imgbuild::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::check;
use imgbuild::snapshot::prune::{self, Retention};
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::Store;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const CHILD: &str = "IMGBUILD_SCALE_CHILD";

/// The child side: one operation against the bucket named in `IMGBUILD_SCALE_CHILD`.
#[test]
fn scale_child() {
    let Some((cfg, keys, source)) = child_target(CHILD) else {
        return;
    };
    let mode = std::env::var("IMGBUILD_SCALE_MODE").unwrap();
    let out = std::env::var("IMGBUILD_SCALE_OUT").ok().map(PathBuf::from);
    println!();
    rt().block_on(async {
        let store = Store::connect(&cfg).await.unwrap();
        match mode.as_str() {
            "backup" => {
                let src = [Source {
                    name: "vol".into(),
                    root: source.unwrap(),
                    wal_start: None,
                }];
                let o = BackupOptions {
                    host: "test".into(),
                    parallel: 4,
                    progress: Progress::quiet(),
                    pack_target: imgbuild::snapshot::pack::PACK_TARGET,
                };
                let r = backup::backup(&store, &keys, &src, &mut NoHooks, &o)
                    .await
                    .unwrap();
                println!(
                    "result files={} entry_bytes={} bytes_new={} entry_bytes_new={} {}",
                    r.stats.files,
                    r.stats.entry_bytes,
                    r.stats.bytes_new,
                    r.stats.entry_bytes_new,
                    r.requests
                );
            }
            "prune" => {
                let keep = Retention {
                    last: 1,
                    daily: 0,
                    weekly: 0,
                    monthly: 0,
                };
                let p = prune::prune(&store, &keys, &keep, &prune::PruneOptions::no_grace())
                    .await
                    .unwrap();
                assert_eq!(p.forgotten.len(), 2, "{p:?}");
                println!(
                    "result forgot 2, packs deleted {} repacked {} {}",
                    p.packs_deleted, p.packs_repacked, p.requests
                );
            }
            "check" => {
                let c = check::check(&store, &keys, true, 4, &Progress::quiet())
                    .await
                    .unwrap();
                assert!(c.ok() && c.entry_lists_checked == 1, "{c:?}");
                println!(
                    "result packs read {} ({} MiB) {}",
                    c.packs_read,
                    c.bytes_read >> 20,
                    c.requests
                );
            }
            _ => {
                let m = restore::latest_manifest(&store, &keys)
                    .await
                    .unwrap()
                    .unwrap();
                let o = RestoreOptions {
                    parallel: 8,
                    ..Default::default()
                };
                let r = restore::restore(&store, &keys, &m, &out.unwrap(), &o)
                    .await
                    .unwrap();
                println!("result files={} bytes={} {}", r.files, r.bytes, r.requests);
            }
        }
    });
}

struct Run {
    op: &'static str,
    secs: f64,
    rss_mib: f64,
    result: String,
}

/// Runs `program` (its arguments and environment set by `setup`) under GNU time and
/// fails the test if it fails: its stdout, seconds and peak RSS in MiB.
fn timed(op: &str, program: &Path, setup: impl FnOnce(&mut Command)) -> (String, f64, f64) {
    let mut c = Command::new("/usr/bin/time");
    c.args(["-f", "SCALE-MAXRSS-KIB %M"]).arg(program);
    setup(&mut c);
    let t = Instant::now();
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("/usr/bin/time (apt-get install time): {e}"));
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{op} failed:\n{stdout}\n{stderr}");
    let kib: f64 = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("SCALE-MAXRSS-KIB "))
        .next_back()
        .and_then(|v| v.trim().parse().ok())
        .expect("GNU time printed no RSS");
    (stdout, secs, kib / 1024.0)
}

impl Run {
    fn new(op: &'static str, secs: f64, rss_mib: f64, result: String) -> Run {
        eprintln!("{op}: {secs:.1} s, peak RSS {rss_mib:.1} MiB; {result}");
        Run {
            op,
            secs,
            rss_mib,
            result,
        }
    }
}

/// Prints the runs as a markdown table under `title` (and writes it where
/// IMGBUILD_SCALE_OUT_TABLE says); every imgbuild peak must be at most 256 MiB.
fn report(title: &str, runs: &[Run]) {
    let mut table =
        format!("{title}\n\n| operation | time | peak RSS | result |\n|---|---|---|---|\n");
    for r in runs {
        table += &format!(
            "| {} | {:.1} s | {:.1} MiB | {} |\n",
            r.op, r.secs, r.rss_mib, r.result
        );
    }
    println!("{table}");
    if let Ok(p) = std::env::var("IMGBUILD_SCALE_OUT_TABLE") {
        std::fs::write(p, &table).unwrap();
    }
    for r in runs
        .iter()
        .filter(|r| !r.op.starts_with("restic") && !r.op.starts_with("rustic"))
    {
        assert!(
            r.rss_mib <= 256.0,
            "{}: peak RSS {:.1} MiB",
            r.op,
            r.rss_mib
        );
    }
}

/// Runs one operation in a child process under GNU time.
fn run(env: &Env, op: &'static str, mode: &str, src: &Path, out: Option<&Path>) -> Run {
    let exe = std::env::current_exe().unwrap();
    let (stdout, secs, rss) = timed(op, &exe, |c| {
        c.args(["--exact", "scale_child", "--nocapture", "--test-threads=1"])
            .env(CHILD, env.child_config(Some(src)))
            .env("IMGBUILD_SCALE_MODE", mode);
        if let Some(o) = out {
            c.env("IMGBUILD_SCALE_OUT", o);
        }
    });
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .unwrap_or("")
        .to_string();
    Run::new(op, secs, rss, result)
}

/// `files` small files (0 to `max` bytes, incompressible), a thousand to a directory.
fn make_tree(root: &Path, files: u64, max: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; max];
    for i in 0..files {
        let dir = root.join(format!("d{:05}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % (max as u64 + 1)) as usize;
        let mut y = x ^ i;
        for w in buf[..len].chunks_mut(8) {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            w.copy_from_slice(&y.to_le_bytes()[..w.len()]);
        }
        std::fs::write(dir.join(format!("f{i:07}")), &buf[..len]).unwrap();
    }
}

/// Rewrites every hundredth file (1 %).
fn change_one_percent(root: &Path, files: u64) {
    for i in (0..files).step_by(100) {
        let p = root.join(format!("d{:05}/f{i:07}", i / 1000));
        std::fs::write(p, format!("changed {i}\n")).unwrap();
    }
}

/// Every operation on one volume of `files` files; the restored tree must be equal.
fn operations(env: &Env, work: &Path, files: u64, max: usize) -> Vec<Run> {
    operations_on(env, work, &|src| make_tree(src, files, max), &|src| {
        change_one_percent(src, files)
    })
}

/// `count` sparse files of `gib` GiB each, each holding one 4 MiB extent of data at
/// an offset of its own: a volume of count × gib GiB that fits on a small disk.
fn make_sparse(root: &Path, count: u64, gib: u64) {
    use std::io::{Seek, SeekFrom, Write};
    std::fs::create_dir_all(root).unwrap();
    for i in 0..count {
        let mut f = std::fs::File::create(root.join(format!("disk{i:03}.img"))).unwrap();
        f.set_len(gib << 30).unwrap();
        let at = ((i * 7919) % (gib * 256 - 1)) << 22;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&noise(i + 1, 4 << 20)).unwrap();
    }
}

/// Rewrites the data of one file in a hundred.
fn change_sparse(root: &Path, count: u64) {
    use std::io::{Seek, SeekFrom, Write};
    for i in (0..count).step_by(100) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join(format!("disk{i:03}.img")))
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&noise(i + 1000, 4 << 20)).unwrap();
    }
}

/// Bytes stored under the test host's prefix.
fn stored(env: &Env) -> u64 {
    rt().block_on(async {
        let store = env.store().await;
        let prefix = format!("{}/", store.prefix.trim_end_matches('/'));
        let objects = store.list(&prefix).await.unwrap();
        objects.iter().map(|o| o.size).sum()
    })
}

/// A backup run, with how much the bucket grew (what restic's rows give).
/// Drops the page cache (root only) so that a full backup reads its files from the
/// disk, as the first backup of a data directory written long before does. Left to
/// itself, this machine's reclaim decided how much of a just-written tree was still
/// cached, and the same full backup of 2 million files took 36-203 s.
fn cold_cache() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// The name of a full backup's row, after trying to start it from a cold cache.
fn full_backup_op(tool: &str) -> String {
    if cold_cache() {
        format!("{tool}full backup (cold page cache)")
    } else {
        eprintln!("the page cache could not be dropped (not root): full backups read a warm tree");
        format!("{tool}full backup (page cache as left: not root)")
    }
}

fn backup_run(env: &Env, op: &'static str, src: &Path) -> Run {
    let before = stored(env);
    let mut r = run(env, op, "backup", src, None);
    let grew = stored(env).saturating_sub(before);
    r.result += &format!(", bucket grew by {:.1} MiB", grew as f64 / (1 << 20) as f64);
    eprintln!("{op}: bucket grew by {grew} bytes");
    r
}

fn operations_on(env: &Env, work: &Path, make: &dyn Fn(&Path), change: &dyn Fn(&Path)) -> Vec<Run> {
    let src = work.join("src");
    let t = Instant::now();
    make(&src);
    eprintln!("volume written in {:.1} s", t.elapsed().as_secs_f64());
    let op: &'static str = Box::leak(full_backup_op("").into_boxed_str());
    let mut runs = vec![backup_run(env, op, &src)];
    // Nothing changed: nothing is read or uploaded, not even the entry list (which
    // would differ everywhere if the backup's own reads moved atimes).
    let again = backup_run(env, "backup, nothing changed", &src);
    assert!(
        again.result.contains(" bytes_new=0 entry_bytes_new=0 "),
        "an unchanged tree uploaded something: {}",
        again.result
    );
    runs.push(again);
    change(&src);
    runs.push(backup_run(env, "incremental backup (1 %)", &src));
    runs.push(run(env, "prune (forget 2)", "prune", &src, None));
    runs.push(run(env, "check --read-data", "check", &src, None));
    let out = work.join("out");
    runs.push(run(env, "restore", "restore", &src, Some(&out)));
    let restored = out.join("vol/_data");
    assert_eq!(
        tree_hash(&src),
        tree_hash(&restored),
        "the restored tree differs"
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&src);
    runs
}

#[test]
fn memory_does_not_grow_with_the_file_count() {
    let small = {
        let env = Env::new(false);
        operations(&env, &env.path("w"), 100_000, 128)
    };
    let large = {
        let env = Env::new(false);
        operations(&env, &env.path("w"), 200_000, 64)
    };
    for (s, l) in small.iter().zip(&large) {
        eprintln!(
            "{}: {:.1} MiB at 100k files, {:.1} MiB at 200k",
            s.op, s.rss_mib, l.rss_mib
        );
        assert!(
            l.rss_mib - s.rss_mib <= 24.0,
            "{}: peak RSS grew from {:.1} to {:.1} MiB with twice the files",
            s.op,
            s.rss_mib,
            l.rss_mib
        );
    }
}

/// A peer tool measured beside imgbuild.
#[derive(Clone, Copy, PartialEq)]
enum Peer {
    /// restic from Debian's archive.
    Restic,
    /// rustic-rs from crates.io (`cargo install rustic-rs --locked`).
    Rustic,
}

fn find_peer(peer: Peer) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let (candidates, hint) = match peer {
        Peer::Restic => (
            vec![
                PathBuf::from("/usr/bin/restic"),
                "/usr/local/bin/restic".into(),
            ],
            "apt-get install restic",
        ),
        Peer::Rustic => (
            vec![
                PathBuf::from(&home).join(".cargo/bin/rustic"),
                "/usr/local/bin/rustic".into(),
            ],
            "cargo install rustic-rs --locked",
        ),
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("not installed: {hint} (benches/scale.sh INSTALL=1 does this)"))
}

/// A peer (restic, rustic) on the same tree, the same steps, the same Garage: each
/// step under GNU time, and the bytes its repository grew by.
fn peer_operations(env: &Env, work: &Path, files: u64, max: usize, peer: Peer) -> Vec<Run> {
    let exe = find_peer(peer);
    let creds = std::fs::read_to_string(env.cfg.credentials_file.as_ref().unwrap()).unwrap();
    let var = |k: &str| {
        creds
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    let endpoint = env.cfg.endpoint.clone().unwrap();
    let (name, dir) = match peer {
        Peer::Restic => ("restic", "restic"),
        Peer::Rustic => ("rustic", "rustic"),
    };
    let repo = format!("s3:{endpoint}/{}/{dir}", env.cfg.bucket);
    // rustic takes its S3 settings from a profile file (`-P <path without .toml>`).
    let profile = work.join("rustic-scale");
    if peer == Peer::Rustic {
        std::fs::create_dir_all(work).unwrap();
        std::fs::write(
            profile.with_extension("toml"),
            format!(
                "[repository]\nrepository = \"opendal:s3\"\npassword = \"scale\"\n\
                 [repository.options]\nendpoint = \"{endpoint}\"\nbucket = \"{}\"\n\
                 root = \"/{dir}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\n\
                 secret_access_key = \"{}\"\n",
                env.cfg.bucket,
                var("AWS_ACCESS_KEY_ID"),
                var("AWS_SECRET_ACCESS_KEY")
            ),
        )
        .unwrap();
    }
    let src = work.join(format!("{name}-src"));
    make_tree(&src, files, max);
    let stored = || {
        rt().block_on(async {
            let store = env.store().await;
            store
                .list(&format!("{dir}/"))
                .await
                .unwrap()
                .iter()
                .map(|o| o.size)
                .sum::<u64>()
        })
    };
    let step = |op: String, args: &[&str]| -> Run {
        let before = stored();
        let (_, secs, rss) = timed(&op, &exe, |c| {
            match peer {
                Peer::Restic => c
                    .args(["-r", &repo, "-o", "s3.region=garage", "-q"])
                    .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
                    .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
                    .env("RESTIC_PASSWORD", "scale"),
                Peer::Rustic => c.args(["-P", profile.to_str().unwrap(), "--no-progress"]),
            };
            c.args(args);
        });
        let grew = stored().saturating_sub(before);
        let result = format!(
            "repository grew by {:.1} MiB",
            grew as f64 / (1 << 20) as f64
        );
        Run::new(Box::leak(op.into_boxed_str()), secs, rss, result)
    };
    step(format!("{name}: init"), &["init"]);
    let src_s = src.to_str().unwrap();
    let mut runs = vec![step(
        full_backup_op(&format!("{name}: ")),
        &["backup", src_s],
    )];
    runs.push(step(
        format!("{name}: backup, nothing changed"),
        &["backup", src_s],
    ));
    change_one_percent(&src, files);
    runs.push(step(
        format!("{name}: incremental backup (1 %)"),
        &["backup", src_s],
    ));
    let out = work.join(format!("{name}-out"));
    let out_s = out.to_str().unwrap();
    let (restore_args, restored) = match peer {
        Peer::Restic => (
            vec!["restore", "latest", "--target", out_s],
            out.join(src.strip_prefix("/").unwrap()),
        ),
        Peer::Rustic => (
            vec!["restore", "latest", out_s],
            out.join(src.strip_prefix("/").unwrap()),
        ),
    };
    runs.push(step(format!("{name}: restore"), &restore_args));
    // rustic may restore the tree at the target itself rather than below its path.
    let restored = if restored.is_dir() {
        restored
    } else {
        out.clone()
    };
    assert_eq!(
        content_hash(&src),
        content_hash(&restored),
        "{name}'s restore differs"
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&src);
    runs
}

#[test]
#[ignore = "takes about 40 minutes: run by benches/scale.sh"]
fn scale_2m_files() {
    let files: u64 = std::env::var("IMGBUILD_SCALE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let env = Env::garage(None);
    let mut runs = operations(&env, &env.path("w"), files, 2048);
    // IMGBUILD_SCALE_PEERS=0 measures imgbuild alone (an hour less); a list such as
    // "rustic" or "restic,rustic" names the peers; unset, both.
    let only = std::env::var("IMGBUILD_SCALE_PEERS").unwrap_or_default();
    let named: Vec<&str> = only
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "0")
        .collect();
    if let Some(bad) = named.iter().find(|p| !["restic", "rustic"].contains(p)) {
        panic!("IMGBUILD_SCALE_PEERS: unknown peer {bad:?} (restic, rustic, or 0 for none)");
    }
    for (peer, name) in [(Peer::Restic, "restic"), (Peer::Rustic, "rustic")] {
        if only.is_empty() || named.contains(&name) {
            runs.extend(peer_operations(&env, &env.path("w"), files, 2048, peer));
        }
    }
    report(
        &format!(
            "{files} files (0-2 KiB each, a thousand per directory) on Garage 2.5, single node \
             on 127.0.0.1; each operation a child process, peak RSS by GNU time:"
        ),
        &runs,
    );
}

#[test]
#[ignore = "a 100 GiB sparse volume, several minutes: run by benches/scale.sh"]
fn scale_100g_sparse() {
    let env = Env::garage(None);
    let (count, gib) = (100, 1);
    let runs = operations_on(
        &env,
        &env.path("w"),
        &|src| make_sparse(src, count, gib),
        &|src| change_sparse(src, count),
    );
    report(
        &format!(
            "{count} sparse files of {gib} GiB ({} GiB in all, 4 MiB of data each: the disk here \
             holds no 100 GB of real data) on Garage 2.5:",
            count * gib
        ),
        &runs,
    );
}

/// Paths and contents only (what any tool's restore must give back).
fn content_hash(root: &Path) -> String {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, blake3::Hash)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap());
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), h));
            }
        }
    }
    let mut all = Vec::new();
    walk(root, root, &mut all);
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = blake3::Hasher::new();
    for (p, c) in &all {
        h.update(p.as_os_str().as_encoded_bytes());
        h.update(c.as_bytes());
    }
    format!("{} files {}", all.len(), h.finalize().to_hex())
}
