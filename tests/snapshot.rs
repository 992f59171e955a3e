//! Snapshots against a real S3 server (moto on 127.0.0.1): round trip, incremental
//! uploads, faults a restore must name, retention, Object Lock, first boot.

#[path = "snapshot-fixtures/common.rs"]
mod common;
#[path = "snapshot-fixtures/packs.rs"]
mod packs;

use common::*;
use imgbuild::hostconfig::Retention;
use imgbuild::progress::Progress;
use imgbuild::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::fsio::WriteOptions;
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::{check, format, prune, SnapshotError, Store};
use std::path::Path;

fn opts() -> BackupOptions {
    BackupOptions {
        host: "test".into(),
        parallel: 8,
        progress: Progress::quiet(),
        pack_target: imgbuild::snapshot::pack::PACK_TARGET,
    }
}

fn ropts() -> RestoreOptions {
    RestoreOptions {
        parallel: 8,
        progress: Progress::quiet(),
        write: WriteOptions::default(),
        volumes: Vec::new(),
    }
}

fn src(name: &str, root: &Path) -> Source {
    Source {
        name: name.into(),
        root: root.to_path_buf(),
        wal_start: None,
    }
}

async fn restore_id(store: &Store, env: &Env, id: &str, into: &Path) -> Result<(), SnapshotError> {
    let keys = env.keys();
    let m = restore::load_manifest(store, &keys, id).await?;
    restore::restore(store, &keys, &m, into, &ropts())
        .await
        .map(|_| ())
}

#[test]
fn round_trip_restores_an_identical_tree() {
    let env = Env::new(false);
    let v1 = env.path("src/vol-one");
    let v2 = env.path("src/vol-two");
    make_rich_tree(&v1);
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("db.dump"), noise(9, 3_000_000)).unwrap();
    // Islands of more than one writer job each, after a hole and before a trailing one.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(v2.join("islands.img")).unwrap();
        for (off, seed) in [(1u64 << 20, 5u64), (40 << 20, 6)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&noise(seed, 6 << 20)).unwrap();
        }
        f.set_len(64 << 20).unwrap();
    }
    let rt = rt();
    let out = env.path("out");
    let report = rt.block_on(async {
        let store = env.store().await;
        let r = backup::backup(
            &store,
            &env.keys(),
            &[src("vol-one", &v1), src("vol-two", &v2)],
            &mut NoHooks,
            &opts(),
        )
        .await
        .unwrap();
        restore_id(&store, &env, &r.id, &out).await.unwrap();
        r
    });
    eprintln!("round trip: {:?}", report.stats);
    let a = tree_lines(&v1);
    let b = tree_lines(&out.join("vol-one/_data"));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y);
    }
    assert_eq!(a.len(), b.len());
    assert_eq!(tree_hash(&v1), tree_hash(&out.join("vol-one/_data")));
    assert_eq!(tree_hash(&v2), tree_hash(&out.join("vol-two/_data")));
    // The sparse file stayed sparse (3 islands of 300 kB in 256 MiB).
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(out.join("vol-one/_data/sparse.img")).unwrap();
    assert_eq!(md.len(), 256 << 20);
    assert!(
        md.blocks() * 512 < 4 << 20,
        "sparse file restored dense: {} blocks",
        md.blocks()
    );
    // The sparse holes were not uploaded: logical data is ~41 MiB, not 349.
    assert!(report.stats.bytes_total < 56 << 20, "{:?}", report.stats);
    let md = std::fs::metadata(out.join("vol-two/_data/islands.img")).unwrap();
    assert_eq!(md.len(), 64 << 20);
    assert!(
        md.blocks() * 512 < 16 << 20,
        "islands.img restored dense: {} blocks",
        md.blocks()
    );
    assert!(
        !is_root() || a.iter().any(|l| l.contains("uid=100000")),
        "owners were not exercised"
    );
}

#[test]
fn incremental_backup_uploads_about_the_change() {
    let env = Env::new(false);
    let v = env.path("vol");
    std::fs::create_dir_all(v.join("media")).unwrap();
    // 160 MiB: 40 files of 4 MiB (incompressible).
    for i in 0..40u64 {
        std::fs::write(v.join(format!("media/{i:02}.bin")), noise(100 + i, 4 << 20)).unwrap();
    }
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let first = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts()).await.unwrap();
        assert_eq!(first.stats.bytes_new, 160 << 20);
        // Change 1 %: rewrite 1.6 MiB in the middle of one file.
        let change = (160u64 << 20) / 100;
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(v.join("media/17.bin")).unwrap();
            f.seek(SeekFrom::Start(1 << 20)).unwrap();
            f.write_all(&noise(7777, change as usize)).unwrap();
        }
        let second = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts()).await.unwrap();
        eprintln!(
            "incremental: change {change} bytes, new {} bytes, uploaded {} bytes ({:.2}x the change)",
            second.stats.bytes_new,
            second.stats.bytes_uploaded,
            second.stats.bytes_uploaded as f64 / change as f64
        );
        assert!(second.stats.bytes_new >= change);
        // The change plus at most the chunks around its two edges.
        assert!(
            second.stats.bytes_uploaded <= change + 2 * u64::from(backup::CHUNK_MAX),
            "{:?}",
            second.stats
        );
        let out = env.path("out");
        restore_id(&store, &env, &second.id, &out).await.unwrap();
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
    });
}

/// A repository whose snapshots were chunked with an earlier release's sizes (1 MiB
/// average, then 512 KiB) keeps them (other sizes would store every changed file again
/// in full, once); a new one chunks with the current, smaller sizes. The chunk count
/// of a 48 MiB incompressible file tells them apart.
#[test]
fn a_repository_keeps_the_chunk_sizes_it_began_with() {
    let env = Env::new(false);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("big.bin"), noise(31, 48 << 20)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        backup_volume(&store, &keys, "v", &v, "test").await;
        let mut m = restore::latest_manifest(&store, &keys)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.chunker.min, m.chunker.avg, m.chunker.max),
            (backup::CHUNK_MIN, backup::CHUNK_AVG, backup::CHUNK_MAX)
        );
        let mut counts = vec![m.volumes[0].chunks.len()];
        for (i, old) in backup::CHUNK_SIZES_KEPT.iter().enumerate() {
            // The newest snapshot as that release wrote it: the same, with its sizes.
            let mut as_old = m.clone();
            as_old.chunker.min = old.min;
            as_old.chunker.avg = old.avg;
            as_old.chunker.max = old.max;
            let sealed = keys
                .seal_manifest_value(&as_old.id, "test", &store.prefix, &as_old)
                .unwrap();
            store
                .client()
                .put_object()
                .bucket(&store.bucket)
                .key(format::snapshot_key(&store.prefix, &as_old.id))
                .body(sealed.into())
                .send()
                .await
                .unwrap();

            std::fs::write(v.join("big.bin"), noise(32 + i as u64, 48 << 20)).unwrap();
            let next = backup_volume(&store, &keys, "v", &v, "test").await;
            m = restore::latest_manifest(&store, &keys)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(m.id, next.id);
            assert_eq!(
                (m.chunker.min, m.chunker.avg, m.chunker.max),
                (old.min, old.avg, old.max),
                "the sizes were not kept"
            );
            // The minimum was used too, not only the average.
            let chunks = &m.volumes[0].chunks;
            let short = chunks[..chunks.len() - 1]
                .iter()
                .filter(|c| c.1 < u64::from(old.min))
                .count();
            assert_eq!(short, 0, "chunks under the kept minimum of {}", old.min);
            counts.push(chunks.len());
            let out = env.path(&format!("out{i}"));
            restore_id(&store, &env, &next.id, &out).await.unwrap();
            assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
        }
        eprintln!("48 MiB in {counts:?} chunks (current sizes, then each kept one)");
        // Each larger average gives far fewer chunks: the sizes were really used.
        for w in counts.windows(2) {
            assert!(
                w[1] * 3 < w[0] * 2,
                "a larger average should give far fewer chunks: {counts:?}"
            );
        }
    });
}

/// A change spread over a tree of small files (every 400th file rewritten with a new
/// size) uploads only the changed files and the entry-list chunks holding a changed
/// line: a group's end and an entry chunk's end do not depend on the sizes of the
/// files before them (ends that followed byte counts moved with every changed size,
/// and the rest of the tree was uploaded again), and the unchanged files of a changed
/// group are kept as slices of its old chunk (whole groups were uploaded again before,
/// about ten times the change). Every snapshot restores, and a group that changes
/// again and again is read afresh instead of fragmenting.
#[test]
fn a_spread_change_uploads_only_the_changed_files_and_entry_chunks() {
    use imgbuild::snapshot::entries::MetaChunker;
    use imgbuild::snapshot::fsio::Walker;
    let env = Env::new(false);
    let v = env.path("vol");
    let (dirs, per_dir) = (8u64, 500u64);
    for i in 0..dirs * per_dir {
        let d = v.join(format!("d{:02}", i / per_dir));
        std::fs::create_dir_all(&d).unwrap();
        let len = (i * 7919 % 2049) as usize;
        std::fs::write(d.join(format!("f{i:05}")), noise(i, len)).unwrap();
    }
    let name = |i: u64| format!("d{:02}/f{i:05}", i / per_dir);
    let changed: Vec<String> = (0..dirs * per_dir).step_by(400).map(name).collect();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let restores_as_now = |id: String, n: u32| {
            let (store, env, v) = (&store, &env, &v);
            async move {
                let out = env.path(&format!("out{n}"));
                restore_id(store, env, &id, &out).await.unwrap();
                assert_eq!(
                    tree_hash(v),
                    tree_hash(&out.join("v/_data")),
                    "snapshot {n}"
                );
                std::fs::remove_dir_all(&out).unwrap();
            }
        };
        backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let mut written = 0u64;
        for (k, c) in changed.iter().enumerate() {
            let body = format!("changed {k}\n");
            written += body.len() as u64;
            std::fs::write(v.join(c), body).unwrap();
        }
        let second = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        // What the new tree's groups and entry chunks are, and which hold a change.
        let list: Vec<format::Entry> = Walker::new(&v).unwrap().collect();
        let touched = |e: &format::Entry| changed.contains(&e.path.to_string());
        let groups = backup::segments(&list, &keys);
        let group_bytes: u64 = groups
            .iter()
            .filter(|g| g.iter().any(touched))
            .flat_map(|g| g.iter().map(|e| e.stream_len()))
            .sum();
        let mut meta = MetaChunker::new(&keys);
        let (mut in_chunk, mut entries_touched, mut entries_total) = (false, 0u64, 0u64);
        for e in &list {
            in_chunk |= touched(e);
            if let Some(c) = meta.push(e) {
                entries_total += c.len() as u64;
                entries_touched += if in_chunk { c.len() as u64 } else { 0 };
                in_chunk = false;
            }
        }
        if let Some(c) = meta.finish() {
            entries_total += c.len() as u64;
            entries_touched += if in_chunk { c.len() as u64 } else { 0 };
        }
        let st = &second.stats;
        eprintln!(
            "spread change: {} of {} data bytes uploaded ({written} written, {} kept as \
             slices), {} of {} entry-list bytes",
            st.bytes_new, st.bytes_total, st.bytes_sliced, st.entry_bytes_new, st.entry_bytes
        );
        assert_eq!(entries_total, st.entry_bytes, "not the backup's entry list");
        // Exactly the changed files; their groups' other files are slices.
        assert_eq!(st.bytes_new, written, "{st:?}");
        assert_eq!(st.bytes_sliced, group_bytes - written, "{st:?}");
        assert_eq!(st.entry_bytes_new, entries_touched, "{st:?}");
        assert!(entries_touched * 2 < st.entry_bytes, "{st:?}");
        let m = restore::load_manifest(&store, &keys, &second.id)
            .await
            .unwrap();
        assert_eq!(m.version, 5);
        let slices = m.volumes[0].chunks.iter().filter(|c| c.2.is_some()).count();
        assert!(slices >= changed.len(), "{slices} slices");
        restores_as_now(second.id.clone(), 2).await;

        // The neighbours change next, round after round: the same groups, now slices,
        // are patched again until a group has too many pieces and is read whole, so
        // the pieces per group stay bounded (without the bound, every round would add
        // two to each touched group: 16 after eight rounds).
        let mut ids = vec![second.id.clone()];
        for round in 1..=8u64 {
            let mut written = 0u64;
            for i in (0..dirs * per_dir).step_by(400) {
                let body = format!("round {round} file {i}\n");
                written += body.len() as u64;
                std::fs::write(v.join(name(i + 2 * round)), body).unwrap();
            }
            let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
                .await
                .unwrap();
            eprintln!(
                "round {round}: {} bytes uploaded ({written} written), {} kept as slices",
                r.stats.bytes_new, r.stats.bytes_sliced
            );
            assert!(r.stats.bytes_new >= written, "{:?}", r.stats);
            if round == 1 {
                assert_eq!(r.stats.bytes_new, written, "{:?}", r.stats);
            }
            let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
            let pieces = m.volumes[0].chunks.len();
            // At most 7 pieces for each of the (at most 2 × 10) touched groups.
            assert!(
                pieces <= groups.len() + 6 * 2 * changed.len(),
                "round {round}: {pieces} pieces for {} groups",
                groups.len()
            );
            restores_as_now(r.id.clone(), 2 + round as u32).await;
            ids.push(r.id);
        }
        let c = check::check(&store, &keys, true, 4, &Progress::quiet())
            .await
            .unwrap();
        assert!(c.ok(), "{:?}", c.problems);
    });
}

/// Files just under the size that makes a file a segment of its own (256 KiB) group
/// into segments of 1-2 MiB, several chunks long. A change to one of them uploads that
/// file alone, the rest of its group kept as slices of the old chunks (with a fixed
/// limit of four chunks per patched group, such groups were read and chunked afresh,
/// uploading the chunks around each change too).
#[test]
fn a_change_in_a_group_of_large_small_files_uploads_only_that_file() {
    let env = Env::new(false);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    let n = 120u64;
    let len = |i: u64| (150 << 10) + (i * 7919 % (100 << 10)) as usize;
    for i in 0..n {
        std::fs::write(v.join(format!("f{i:03}")), noise(100 + i, len(i))).unwrap();
    }
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let mut written = 0u64;
        for i in (0..n).step_by(20) {
            written += len(i) as u64;
            std::fs::write(v.join(format!("f{i:03}")), noise(500 + i, len(i))).unwrap();
        }
        let second = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let st = &second.stats;
        eprintln!(
            "{} of {} bytes uploaded ({written} changed), {} kept as slices",
            st.bytes_new, st.bytes_total, st.bytes_sliced
        );
        assert_eq!(st.bytes_new, written, "{st:?}");
        assert!(st.bytes_sliced > 0, "{st:?}");
        let out = env.path("out");
        restore_id(&store, &env, &second.id, &out).await.unwrap();
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
    });
}

/// Runs a backup in this process when the kill test asks for it (see below).
#[test]
fn child_backup_for_kill_test() {
    let Some((store_cfg, keys, source)) = child_target("IMGBUILD_SNAPSHOT_CHILD") else {
        return;
    };
    rt().block_on(async {
        let store = Store::connect(&store_cfg).await.unwrap();
        let mut o = opts();
        o.parallel = 4;
        backup::backup(
            &store,
            &keys,
            &[src("v", &source.expect("source"))],
            &mut NoHooks,
            &o,
        )
        .await
        .unwrap();
    });
}

#[test]
fn kill_9_at_random_points_never_lists_a_broken_snapshot() {
    kill_9_test(Env::new(false));
}

/// The same against Garage, the server self-hosters run: its listing and
/// overwrite behaviour must give the same guarantee.
#[test]
fn kill_9_against_garage() {
    kill_9_test(Env::garage(None));
}

fn kill_9_test(env: Env) {
    let v = env.path("vol");
    std::fs::create_dir_all(v.join("d")).unwrap();
    for i in 0..12u64 {
        std::fs::write(v.join(format!("d/{i}.bin")), noise(i, 2 << 20)).unwrap();
    }
    for i in 0..200 {
        std::fs::write(v.join(format!("d/s{i}")), format!("{i}")).unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    let mut states = std::collections::HashSet::new();
    let mut rng = 0x1234_5678_u64;
    let mut killed = 0;
    let mut finished = 0;
    let mut full_run_ms = 0u64;
    for run in 0..24u64 {
        // Change a third of the data every run so snapshots differ and each run
        // uploads new chunks for a while.
        for k in 0..4 {
            std::fs::write(
                v.join(format!("d/{}.bin", (run * 4 + k) % 12)),
                noise(1000 + run * 10 + k, 2 << 20),
            )
            .unwrap();
        }
        std::fs::write(v.join(format!("d/new{run}")), noise(5000 + run, 700_000)).unwrap();
        states.insert(tree_hash(&v));
        let cfg = env.child_config(Some(&v));
        let started = std::time::Instant::now();
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_backup_for_kill_test",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("IMGBUILD_SNAPSHOT_CHILD", &cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Every fourth run finishes and times a whole backup; the others are killed at
        // a random point inside that time.
        let kill = run % 4 != 0;
        if kill {
            let ms = 5 + rng % (full_run_ms * 8 / 10).max(1);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            // SAFETY: killing our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        }
        let st = child.wait().unwrap();
        if !kill {
            full_run_ms = started.elapsed().as_millis() as u64;
            eprintln!("kill test: a whole backup process takes {full_run_ms} ms");
        }
        if st.success() {
            finished += 1;
        } else {
            killed += 1;
        }
    }
    eprintln!("kill test: {killed} backups killed, {finished} finished");
    assert!(killed >= 10, "too few kills landed: {killed}");
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let ids = restore::list_ids(&store).await.unwrap();
        assert!(
            ids.len() >= finished,
            "{} listed, {finished} finished",
            ids.len()
        );
        for (i, id) in ids.iter().enumerate() {
            let out = env.path(&format!("out{i}"));
            restore_id(&store, &env, id, &out).await.unwrap();
            let h = tree_hash(&out.join("v/_data"));
            assert!(
                states.contains(&h),
                "snapshot {id} restored a tree no backup saw"
            );
        }
        let c = check::check(&store, &keys, true, 8, &Progress::quiet())
            .await
            .unwrap();
        assert!(c.ok(), "{:?}", c.problems);
        eprintln!(
            "kill test: {} snapshots listed, all restore; {} orphan chunks",
            ids.len(),
            c.chunks_unreferenced
        );
    });
}

#[test]
fn restore_refuses_bad_data_and_names_the_cause() {
    let env = Env::new(false);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("a"), noise(1, 3 << 20)).unwrap();
    std::fs::write(v.join("b"), b"hello").unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        let chunk = m.volumes[0].chunks[0].0.clone();
        let (pkey, off, len) = packs::place(&store, &keys, &chunk).await;
        assert!(pkey.contains("/packs/") && len > 0, "{pkey}");
        let original = store.get(&pkey, u64::MAX).await.unwrap().unwrap();
        let gone = |o: &str| !env.path(o).join("v").exists();

        // corrupted chunk: one flipped bit inside its bytes of the pack
        let mut bad = original.clone();
        bad[(off + len / 2) as usize] ^= 0x10;
        store.put(&pkey, bad, false, None).await.unwrap();
        let e = restore_id(&store, &env, &r.id, &env.path("o1"))
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::CorruptChunk { .. }), "{e}");
        assert!(
            e.to_string().contains(&chunk)
                && e.to_string().contains("corrupted")
                && e.to_string().contains(&pkey),
            "{e}"
        );
        assert!(gone("o1"), "a failed restore left its volume behind");
        eprintln!("corrupted chunk → {e}");
        // check --read-data finds it too, naming the pack
        let c = check::check(&store, &keys, true, 4, &Progress::quiet())
            .await
            .unwrap();
        assert!(
            !c.ok() && c.problems.iter().any(|p| p.contains(&pkey)),
            "{:?}",
            c.problems
        );

        // truncated pack (cut through its chunks): refused before anything is written
        store
            .put(&pkey, original[..original.len() / 2].to_vec(), false, None)
            .await
            .unwrap();
        let e = restore_id(&store, &env, &r.id, &env.path("o1b"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains(&pkey) && e.to_string().contains("truncated"),
            "{e}"
        );
        assert!(!env.path("o1b").exists(), "something was written: {e}");
        eprintln!("truncated pack → {e}");
        let c = check::check(&store, &keys, false, 4, &Progress::quiet())
            .await
            .unwrap();
        assert!(
            c.problems.iter().any(|p| p.contains(&pkey)),
            "{:?}",
            c.problems
        );

        // missing pack
        store.delete(&pkey).await.unwrap();
        let e = restore_id(&store, &env, &r.id, &env.path("o2"))
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::MissingChunk { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!env.path("o2").exists(), "something was written: {e}");
        eprintln!("missing pack → {e}");
        store.put(&pkey, original, false, None).await.unwrap();
        restore_id(&store, &env, &r.id, &env.path("o3"))
            .await
            .unwrap();

        // wrong encryption key (same signing key: the manifest verifies but won't open)
        let other = env.path("other-secrets");
        write_keys(&other, 2);
        for f in ["snapshot-signing.key", "snapshot-signing.pub"] {
            std::fs::copy(env.secrets.join(f), other.join(f)).unwrap();
        }
        let wrong = imgbuild::snapshot::Keys::load(
            &other.join("snapshot-encryption.key"),
            &other.join("snapshot-signing.key"),
        )
        .unwrap();
        let e = restore::load_manifest(&store, &wrong, &r.id)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains("wrong key"), "{e}");
        eprintln!("wrong key → {e}");

        // another host's keys entirely: the signature fails first
        let stranger = env.path("stranger");
        write_keys(&stranger, 3);
        let sk = imgbuild::snapshot::Keys::load(
            &stranger.join("snapshot-encryption.key"),
            &stranger.join("snapshot-signing.key"),
        )
        .unwrap();
        let e = restore::load_manifest(&store, &sk, &r.id)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::BadSignature { .. }), "{e}");

        // tampered manifest: one byte of the ciphertext changed
        let mkey = format::snapshot_key(&store.prefix, &r.id);
        let mut man = store.get(&mkey, u64::MAX).await.unwrap().unwrap();
        let n = man.len() - 10;
        man[n] ^= 1;
        store.put(&mkey, man, false, None).await.unwrap();
        let e = restore::load_manifest(&store, &keys, &r.id)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::BadSignature { .. }), "{e}");
        assert!(e.to_string().contains("tampered"), "{e}");
        eprintln!("tampered manifest → {e}");
        // latest_manifest reports the newest snapshot's cause instead of restoring nothing.
        let e = restore::latest_manifest(&store, &keys).await.unwrap_err();
        assert!(matches!(e, SnapshotError::BadSignature { .. }), "{e}");
    });
}

#[test]
fn retention_keeps_what_it_promises_and_frees_the_rest() {
    let env = Env::new(false);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("stable"), noise(1, 2 << 20)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let mut ids = Vec::new();
        let mut hashes = Vec::new();
        for i in 0..5u64 {
            std::fs::write(v.join("changing"), noise(50 + i, 1 << 20)).unwrap();
            let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
                .await
                .unwrap();
            ids.push(r.id);
            hashes.push(tree_hash(&v));
        }
        let before = packs::pack_count(&store).await;
        let keep = Retention {
            last: 2,
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        let p = prune::prune(&store, &keys, &keep, &prune::PruneOptions::no_grace())
            .await
            .unwrap();
        eprintln!("prune: {p:?}");
        assert_eq!(p.kept, ids[3..].to_vec());
        assert_eq!(p.forgotten, ids[..3].to_vec());
        // Backups 1 and 2 only hold chunks of forgotten snapshots; backup 0's pack
        // also holds the stable file, so it is repacked (a third of it is garbage).
        assert!(p.packs_deleted >= 3 && p.packs_repacked >= 1, "{p:?}");
        let after = packs::pack_count(&store).await;
        assert_eq!(
            before + p.packs_written as usize - after,
            p.packs_deleted as usize
        );
        assert_eq!(p.bytes_unused, 0, "{p:?}");
        eprintln!("prune requests: {}", p.requests);
        assert_eq!(restore::list_ids(&store).await.unwrap(), ids[3..].to_vec());
        for (i, id) in ids[3..].iter().enumerate() {
            let out = env.path(&format!("out{i}"));
            restore_id(&store, &env, id, &out).await.unwrap();
            assert_eq!(tree_hash(&out.join("v/_data")), hashes[3 + i]);
        }
        let c = check::check(&store, &keys, true, 8, &Progress::quiet())
            .await
            .unwrap();
        assert!(c.ok() && c.chunks_unreferenced == 0, "{c:?}");

        // A prune interrupted after the manifests went (simulated: delete one by hand)
        // leaves only unreferenced chunks; the kept snapshot still restores and the next
        // prune frees them.
        store
            .delete(&format::snapshot_key(&store.prefix, &ids[3]))
            .await
            .unwrap();
        let c = check::check(&store, &keys, false, 8, &Progress::quiet())
            .await
            .unwrap();
        assert!(c.ok() && c.chunks_unreferenced > 0, "{c:?}");
        restore_id(&store, &env, &ids[4], &env.path("out-last"))
            .await
            .unwrap();
        // The first prune merged everything into one pack; the forgotten snapshot's
        // chunk is a quarter of it, so a threshold under that repacks it.
        let eager = prune::PruneOptions {
            repack_garbage_percent: 20,
            ..prune::PruneOptions::no_grace()
        };
        let p = prune::prune(&store, &keys, &keep, &eager).await.unwrap();
        assert!(p.packs_repacked > 0 && p.bytes_unused == 0, "{p:?}");

        // A running backup's lock stops chunk deletion.
        store
            .put(
                &format::lock_key(&store.prefix, "other"),
                b"{}".to_vec(),
                false,
                None,
            )
            .await
            .unwrap();
        std::fs::write(v.join("changing"), noise(99, 1 << 20)).unwrap();
        backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let p = prune::prune(
            &store,
            &keys,
            &Retention {
                last: 1,
                ..Default::default()
            },
            &prune::PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        assert!(
            p.chunks_skipped.is_some() && p.packs_deleted == 0 && p.packs_repacked == 0,
            "{p:?}"
        );
        let last = restore::list_ids(&store).await.unwrap();
        restore_id(&store, &env, &last[0], &env.path("out-locked"))
            .await
            .unwrap();
    });
}

#[test]
fn object_lock_protects_every_object_until_its_date() {
    let mut env = Env::new(true);
    env.cfg.object_lock_days = Some(2);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("a"), noise(3, 2 << 20)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let now = backup::now_unix();
        let mut keys_to_check = vec![format::snapshot_key(&store.prefix, &r.id)];
        keys_to_check.extend(packs::pack_and_index_keys(&store, &keys).await);
        assert!(keys_to_check.len() >= 3, "{keys_to_check:?}");
        for k in &keys_to_check {
            let until = store
                .retention(k)
                .await
                .unwrap()
                .expect("no retention on object");
            assert!(
                (until - (now + 2 * 86_400)).abs() < 120,
                "{k}: retention {until}"
            );
        }
        assert_eq!(
            r.locked_until.map(|t| (t - now - 2 * 86_400).abs() < 120),
            Some(true)
        );
        // Deleting a locked version fails.
        for k in &keys_to_check {
            let head = store
                .client()
                .head_object()
                .bucket(&store.bucket)
                .key(k)
                .send()
                .await
                .unwrap();
            let vid = head.version_id().expect("versioned bucket").to_string();
            let e = store
                .client()
                .delete_object()
                .bucket(&store.bucket)
                .key(k)
                .version_id(vid)
                .send()
                .await;
            assert!(e.is_err(), "{k}: locked version was deleted");
        }
        eprintln!(
            "object lock: {} objects locked until +2d, version deletes refused",
            keys_to_check.len()
        );
        // A second snapshot reuses the chunks; the data still restores after prune.
        std::fs::write(v.join("b"), b"more").unwrap();
        let r2 = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let p = prune::prune(
            &store,
            &keys,
            &Retention {
                last: 1,
                ..Default::default()
            },
            &prune::PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        eprintln!("prune under object lock: {p:?}");
        // A longer lock period later (the previous guarantee, +2 d, is under half of
        // 5 d): the reused chunks are extended to the new date,
        // so the newest snapshot is protected as long as its own objects.
        let mut cfg4 = env.cfg.clone();
        cfg4.object_lock_days = Some(5);
        let store4 = Store::connect(&cfg4).await.unwrap();
        std::fs::write(v.join("c"), b"again").unwrap();
        let r3 = backup::backup(&store4, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let now = backup::now_unix();
        assert!((r3.locked_until.unwrap() - (now + 5 * 86_400)).abs() < 120);
        let m3 = restore::load_manifest(&store4, &keys, &r3.id)
            .await
            .unwrap();
        for id in m3.chunk_ids() {
            let (pkey, _, _) = packs::place(&store4, &keys, id).await;
            let until = store4.retention(&pkey).await.unwrap().unwrap();
            assert!(
                (until - (now + 5 * 86_400)).abs() < 120,
                "chunk {id} locked until {until}"
            );
        }
        restore_id(&store, &env, &r3.id, &env.path("out"))
            .await
            .unwrap();
        assert_eq!(tree_hash(&v), tree_hash(&env.path("out/v/_data")));
        let _ = r2;
    });
}

#[test]
fn multipart_uploads_round_trip() {
    let mut env = Env::new(false);
    env.cfg.multipart_threshold = 1024;
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("a"), noise(3, 1 << 20)).unwrap();
    for i in 0..100 {
        std::fs::write(v.join(format!("n{i}")), format!("{i}")).unwrap();
    }
    rt().block_on(async {
        let store = env.store().await;
        let r = backup::backup(&store, &env.keys(), &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        restore_id(&store, &env, &r.id, &env.path("out"))
            .await
            .unwrap();
    });
    assert_eq!(tree_hash(&v), tree_hash(&env.path("out/v/_data")));
}
