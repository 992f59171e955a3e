//! Packed snapshots against a real S3 server (moto on 127.0.0.1): object and request
//! counts, ranged reads across pack boundaries, format-1 buckets, repack (also under
//! Object Lock), lost index objects, and kill -9 during prune.

#[path = "snapshot-fixtures/common.rs"]
mod common;
#[path = "snapshot-fixtures/packs.rs"]
mod packs;

use common::*;
use imgbuild::hostconfig::Retention;
use imgbuild::progress::Progress;
use imgbuild::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::pack::{self, Index};
use imgbuild::snapshot::prune::{self, PruneOptions};
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::{check, format, Keys, Store};
use std::path::Path;

fn opts(pack_target: usize) -> BackupOptions {
    BackupOptions {
        host: "test".into(),
        parallel: 4,
        progress: Progress::quiet(),
        pack_target,
    }
}

fn src(root: &Path) -> Vec<Source> {
    vec![Source {
        name: "v".into(),
        root: root.to_path_buf(),
        wal_start: None,
    }]
}

async fn restore_to(store: &Store, env: &Env, id: &str, out: &Path) -> restore::RestoreReport {
    let keys = env.keys();
    let m = restore::load_manifest(store, &keys, id).await.unwrap();
    restore::restore(store, &keys, &m, out, &RestoreOptions::default())
        .await
        .unwrap_or_else(|e| panic!("restore {id}: {e}"))
}

async fn backup_of(
    store: &Store,
    keys: &Keys,
    v: &Path,
    pack_target: usize,
) -> backup::BackupReport {
    backup::backup(store, keys, &src(v), &mut NoHooks, &opts(pack_target))
        .await
        .unwrap()
}

async fn check_of(store: &Store, keys: &Keys, read_data: bool) -> check::CheckReport {
    check::check(store, keys, read_data, 4, &Progress::quiet())
        .await
        .unwrap()
}

/// Files of many sizes, a few hundred small ones among them.
fn mixed_tree(root: &Path, seed: u64, mib: u64) {
    std::fs::create_dir_all(root.join("small")).unwrap();
    let mut left = mib << 20;
    let mut i = 0;
    while left > 0 {
        let len = (((seed + i) * 7919) % (3 << 20) + 1).min(left);
        std::fs::write(
            root.join(format!("f{i}")),
            noise(seed * 1000 + i, len as usize),
        )
        .unwrap();
        left -= len;
        i += 1;
    }
    for j in 0..400 {
        std::fs::write(
            root.join(format!("small/{j}")),
            noise(seed + j, 1 + (j as usize * 37) % 9000),
        )
        .unwrap();
    }
}

#[test]
fn packs_cut_objects_and_restore_merges_ranged_reads() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 1, 40);
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        // The smallest pack size makes many packs, so chunks sit at every pack boundary.
        let r = backup_of(&store, &keys, &v, pack::PACK_TARGET_MIN).await;
        let s = &r.stats;
        let packs_listed = packs::pack_count(&store).await;
        assert_eq!(s.packs_new as usize, packs_listed);
        assert!(
            (8..=14).contains(&packs_listed),
            "{packs_listed} packs of 4 MiB for ~41 MiB"
        );
        eprintln!(
            "backup: {} chunks in {} packs; {}",
            s.chunks_total, s.packs_new, r.requests
        );
        // One PUT per pack, plus the index, the manifest and the lock.
        assert!(r.requests.put <= s.packs_new + 4, "{}", r.requests);

        let out = env.path("out");
        let rr = restore_to(&store, &env, &r.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
        eprintln!("restore: {} chunks, {}", s.chunks_total, rr.requests);
        // Adjacent chunks of a pack come in one ranged GET.
        assert!(
            rr.requests.get < s.chunks_total,
            "{} GETs for {} chunks",
            rr.requests.get,
            s.chunks_total
        );
        // Every chunk that starts or ends a pack reads correctly on its own.
        let ix = Index::load(&store, &keys).await.unwrap();
        for p in &ix.packs {
            let blobs = p.blobs.as_ref().unwrap();
            let first = blobs.iter().min_by_key(|b| b.offset).unwrap();
            let last = blobs.iter().max_by_key(|b| b.offset).unwrap();
            assert_eq!(first.offset as usize, pack::PACK_MAGIC.len());
            for b in [first, last] {
                let f = restore::Fetch::Range {
                    key: p.key.clone(),
                    start: u64::from(b.offset),
                    len: u64::from(b.sealed),
                    blobs: vec![*b],
                    lead: 0,
                    pass: 0,
                };
                let got = restore::fetch(&store, &keys, &f).await.unwrap();
                assert_eq!(got[0].len(), b.plain as usize);
            }
        }
        let c = check_of(&store, &keys, true).await;
        assert!(c.ok(), "{:?}", c.problems);
        assert_eq!(c.packs_read as usize, packs_listed);

        // The default pack size: objects per GB against one object per chunk.
        let store2 = {
            let mut cfg = env.cfg.clone();
            cfg.prefix = "hosts/default".into();
            Store::connect(&cfg).await.unwrap()
        };
        let r2 = backup_of(&store2, &keys, &v, pack::PACK_TARGET).await;
        let objects = store2.list("hosts/default/").await.unwrap().len() as u64;
        eprintln!(
            "default packs: {} objects (packs, index, manifest) for {} chunks: 1/{:.0}",
            objects,
            r2.stats.chunks_total,
            r2.stats.chunks_total as f64 / objects as f64
        );
        assert!(objects * 8 <= r2.stats.chunks_total, "{objects} objects");
    });
}

/// What a fetch opens to (plaintext), reads (sealed bytes) and holds (chunks).
fn fetch_size(f: &restore::Fetch) -> (u64, u64, usize) {
    match f {
        restore::Fetch::Range { blobs, len, .. } => (
            blobs.iter().map(|b| u64::from(b.plain)).sum(),
            *len,
            blobs.len(),
        ),
        restore::Fetch::Gather { ranges, .. } => ranges
            .iter()
            .map(fetch_size)
            .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2)),
        restore::Fetch::Object(c) => (c.1, c.1, 1),
    }
}

/// Backs `v` up, hands the restore's plan of its data (with the index and the
/// chunks it plans) to `check`, then restores the snapshot and compares the tree.
fn plan_and_restore(
    env: &Env,
    v: &Path,
    check: impl FnOnce(&Index, &[format::ChunkRef], &[restore::Fetch]),
) {
    rt().block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup_of(&store, &keys, v, pack::PACK_TARGET).await;
        let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        let (index, plans) = restore::plan_all(&store, &keys, &[&m.volumes[0]])
            .await
            .unwrap();
        check(&index, &m.volumes[0].chunks, &plans[0]);
        let out = env.path("out");
        restore_to(&store, env, &r.id, &out).await;
        assert_eq!(tree_hash(v), tree_hash(&out.join("v/_data")));
    });
}

#[test]
fn well_compressed_data_is_fetched_in_bounded_plaintext() {
    let env = Env::new(false);
    let v = env.path("vol");
    // 30 MiB of logs that compress to a few hundred KiB: a range of a few MiB of them
    // would open to all 30. Each file its own (the request number): with only seven
    // distinct files the plan once held less than the 28 MiB checked below (one full
    // run in seven, with 128 KiB chunks), most likely equal chunks stored once.
    for i in 0..600u64 {
        let dir = v.join(format!("logs/{:02}", i % 12));
        std::fs::create_dir_all(&dir).unwrap();
        let line = format!(
            "2026-12-04T10:00:00Z host{} service=app req={i} status=200\n",
            i % 7
        );
        std::fs::write(
            dir.join(format!("{i}.log")),
            line.repeat(50 * 1024 / line.len()),
        )
        .unwrap();
    }
    plan_and_restore(&env, &v, |index, chunks, plan| {
        let total: u64 = plan.iter().map(|f| fetch_size(f).0).sum();
        assert!(total >= 28 << 20, "{total} bytes planned");
        // Planned by sealed size alone, some fetch would open to more.
        let unbounded = restore::plan(index, chunks, restore::RANGE_MAX).unwrap();
        assert!(unbounded
            .iter()
            .any(|f| fetch_size(f).0 > restore::DATA_PLAIN_MAX));
        // No chunk is larger than the bound, so it holds for every fetch.
        for f in plan {
            let (plain, _, blobs) = fetch_size(f);
            assert!(
                plain <= restore::DATA_PLAIN_MAX,
                "a fetch of {blobs} chunks opens to {plain} bytes"
            );
        }
    });
}

#[test]
fn a_chunk_used_many_times_is_fetched_once() {
    let env = Env::new(false);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    // 40 equal files of 1 MiB: 40 MiB to write, 1 MiB to fetch. The copies must not
    // count against the fetch's plaintext bound, or the chunk is read again and again.
    let one = noise(77, 1 << 20);
    for i in 0..40 {
        std::fs::write(v.join(format!("copy{i:02}")), &one).unwrap();
    }
    plan_and_restore(&env, &v, |_, _, plan| {
        let read: u64 = plan.iter().map(|f| fetch_size(f).1).sum();
        assert!(
            read < 2 << 20,
            "{read} bytes read in {} fetches for 1 MiB of distinct data",
            plan.len()
        );
    });
}

#[test]
fn format_1_bucket_restores_dedups_and_prunes() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 2, 12);
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        // Make a format-1 bucket: the same chunks as one object each, sealed the way
        // releases before packs sealed them (XChaCha20-Poly1305, version byte 1), and
        // a version-2 manifest. The packed backup below then names chunks of both
        // sealings in one snapshot.
        let r = backup_of(&store, &keys, &v, pack::PACK_TARGET).await;
        let mut m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        packs::inline_entries(&store, &keys, &mut m).await;
        m.version = 2;
        let ix = Index::load(&store, &keys).await.unwrap();
        for p in &ix.packs {
            let bytes = store.get(&p.key, u64::MAX).await.unwrap().unwrap();
            for b in p.blobs.as_ref().unwrap() {
                let key = format::chunk_key(&store.prefix, &hex::encode(b.id));
                let sealed = &bytes[b.offset as usize..b.end() as usize];
                assert_eq!(sealed[0], imgbuild::snapshot::crypto::CHUNK_VERSION_AES);
                let plain = keys.open_chunk(&b.id, sealed, b.plain as usize).unwrap();
                let old = keys.seal_chunk_v1(&b.id, &plain);
                assert_eq!(old[0], 1);
                store.put(&key, old, false, None).await.unwrap();
            }
            store.delete(&p.key).await.unwrap();
        }
        for k in &ix.objects {
            store.delete(k).await.unwrap();
        }
        // The manifest was loaded from `r.id`: it keeps that id.
        put_manifest(&store, &keys, &m, "test").await;
        assert_eq!(packs::pack_count(&store).await, 0);
        let legacy = store
            .list(&format::chunks_dir(&store.prefix))
            .await
            .unwrap()
            .len();
        assert!(legacy >= 10, "{legacy} chunk objects");

        let out = env.path("out1");
        restore_to(&store, &env, &r.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));

        // A packed backup on top uploads only the change. The changed file is one of
        // the large ones (a segment of its own): a small file's change re-reads its
        // whole group when the old group is a format-1 object (those are not sliced),
        // and groups end where the host's keyed path hash says, so the bytes of that
        // would vary from run to run.
        let len = std::fs::metadata(v.join("f40")).unwrap().len();
        assert!((256 << 10..1 << 20).contains(&len), "f40: {len} bytes");
        std::fs::write(v.join("f40"), noise(777, len as usize)).unwrap();
        let r2 = backup_of(&store, &keys, &v, pack::PACK_TARGET).await;
        assert!(
            r2.stats.bytes_new <= len,
            "re-uploaded format-1 data: {:?}",
            r2.stats
        );
        // One pack of data, one of the (now streamed) entry list.
        assert_eq!(r2.stats.packs_new, 2);
        let out = env.path("out2");
        restore_to(&store, &env, &r2.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));

        // Prune frees the format-1 objects only the old snapshot needed.
        let p = prune::prune(
            &store,
            &keys,
            &Retention {
                last: 1,
                ..Default::default()
            },
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        assert!(p.chunks_deleted >= 1, "{p:?}");
        let c = check_of(&store, &keys, true).await;
        assert!(c.ok() && c.chunks_unreferenced == 0, "{c:?}");
        assert!(c.chunk_objects > 0 && c.packs == 1, "{c:?}");
        let out = env.path("out3");
        restore_to(&store, &env, &r2.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
    });
}

#[test]
fn repack_under_object_lock_leaves_locked_packs_and_loses_nothing() {
    let mut env = Env::new(true);
    env.cfg.object_lock_days = Some(1);
    let v = env.path("vol");
    mixed_tree(&v, 3, 6);
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        // The first snapshot is written without a lock period (as before the profile
        // set one): prune may forget its manifest. The second re-uses its packs and
        // extends their lock, so those packs hold garbage and are locked.
        let unlocked = {
            let mut cfg = env.cfg.clone();
            cfg.object_lock_days = None;
            Store::connect(&cfg).await.unwrap()
        };
        backup_of(&unlocked, &keys, &v, pack::PACK_TARGET).await;
        // Most of the data changes: the first pack becomes mostly garbage.
        for e in std::fs::read_dir(&v).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with('f') {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        std::fs::write(v.join("new"), noise(4242, 2 << 20)).unwrap();
        let r2 = backup_of(&store, &keys, &v, pack::PACK_TARGET).await;
        // Which packs are locked now (the first snapshot's entry-list pack is not: the
        // second snapshot has a list of its own and did not extend that pack's lock).
        let mut locked = Vec::new();
        for k in packs::pack_and_index_keys(&store, &keys).await {
            if k.contains("/packs/") && store.retention(&k).await.unwrap().is_some() {
                locked.push(k);
            }
        }
        assert!(!locked.is_empty());
        let p = prune::prune(
            &store,
            &keys,
            &Retention {
                last: 1,
                ..Default::default()
            },
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        eprintln!("prune under lock: {p:?}");
        assert_eq!(p.forgotten.len(), 1, "{p:?}");
        assert!(p.packs_locked_kept >= 1, "{p:?}");
        assert_eq!(p.packs_repacked, 0, "{p:?}");
        assert!(
            p.packs_deleted <= 1,
            "only the unlocked entry-list pack: {p:?}"
        );
        for k in &locked {
            assert!(store.exists(k).await.unwrap(), "locked {k} is gone");
        }
        let out = env.path("out");
        restore_to(&store, &env, &r2.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
        let c = check_of(&store, &keys, true).await;
        assert!(c.ok(), "{:?}", c.problems);
    });
}

#[test]
fn lost_index_objects_are_rebuilt_from_pack_headers() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 4, 10);
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup_of(&store, &keys, &v, pack::PACK_TARGET_MIN).await;
        let ix = Index::load(&store, &keys).await.unwrap();
        for k in &ix.objects {
            store.delete(k).await.unwrap();
        }
        let c = check_of(&store, &keys, false).await;
        assert!(
            c.ok() && c.index_objects == 0 && c.packs_unindexed == c.packs,
            "{c:?}"
        );
        let out = env.path("out1");
        restore_to(&store, &env, &r.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
        // Prune adopts the packs (nothing is garbage) and writes a new index.
        let same_size = PruneOptions {
            pack_target: pack::PACK_TARGET_MIN,
            ..PruneOptions::no_grace()
        };
        let p = prune::prune(&store, &keys, &Retention::default(), &same_size)
            .await
            .unwrap();
        assert_eq!(p.packs_adopted as usize, ix.packs.len(), "{p:?}");
        assert_eq!(p.packs_deleted, 0, "{p:?}");
        assert!(p.index_written.is_some(), "{p:?}");
        let c = check_of(&store, &keys, true).await;
        assert!(
            c.ok() && c.packs_unindexed == 0 && c.index_objects == 1,
            "{c:?}"
        );
        // A forged index (signed with another key) is refused, not trusted.
        let stranger = env.path("stranger");
        write_keys(&stranger, 9);
        let other = imgbuild::snapshot::Keys::load(
            &stranger.join("snapshot-encryption.key"),
            &stranger.join("snapshot-signing.key"),
        )
        .unwrap();
        let forged = other
            .seal_index(
                "20990101T000000.000Z-00000000",
                "test",
                &store.prefix,
                &pack::encode_index(&[]),
            )
            .unwrap();
        store
            .put(
                &format::index_key(&store.prefix, "20990101T000000.000Z-00000000"),
                forged,
                false,
                None,
            )
            .await
            .unwrap();
        let c = check_of(&store, &keys, false).await;
        assert!(
            c.problems.iter().any(|p| p.contains("signature")),
            "{:?}",
            c.problems
        );
        // ... and stops prune from deleting anything.
        let p = prune::prune(
            &store,
            &keys,
            &Retention::default(),
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        assert!(p.chunks_skipped.is_some(), "{p:?}");
    });
}

#[test]
fn child_prune_for_kill_test() {
    let Some((store_cfg, keys, _)) = child_target("IMGBUILD_PRUNE_CHILD") else {
        return;
    };
    rt().block_on(async {
        let store = Store::connect(&store_cfg).await.unwrap();
        let mut o = PruneOptions::no_grace();
        o.pack_target = pack::PACK_TARGET_MIN;
        prune::prune(
            &store,
            &keys,
            &Retention {
                last: 2,
                ..Default::default()
            },
            &o,
        )
        .await
        .unwrap();
    });
}

#[test]
fn kill_9_during_prune_never_loses_a_listed_snapshot() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 5, 16);
    let exe = std::env::current_exe().unwrap();
    let rt = rt();
    let mut rng = 0x9e37_79b9_u64;
    let mut killed = 0;
    let mut full_ms = 0u64;
    let mut states = std::collections::HashMap::new();
    for run in 0..10u64 {
        // Three backups that each replace a part of the data, so prune has packs to
        // delete and packs to repack every time.
        rt.block_on(async {
            let store = env.store().await;
            let keys = env.keys();
            for k in 0..3u64 {
                for f in 0..3 {
                    let name = format!("f{}", (run * 9 + k * 3 + f) % 12);
                    std::fs::write(
                        v.join(&name),
                        noise(90_000 + run * 100 + k * 10 + f, 1 << 20),
                    )
                    .unwrap();
                }
                let r = backup_of(&store, &keys, &v, pack::PACK_TARGET_MIN).await;
                states.insert(r.id, tree_hash(&v));
            }
        });
        let cfg = env.child_config(None);
        let started = std::time::Instant::now();
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_prune_for_kill_test",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("IMGBUILD_PRUNE_CHILD", &cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill = run % 3 != 0;
        if kill {
            let ms = 20 + rng % (full_ms * 9 / 10).max(1);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            // SAFETY: killing our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        }
        let st = child.wait().unwrap();
        if !kill {
            assert!(st.success(), "an unkilled prune failed");
            // The shortest whole prune so far: the first one runs cold (about three
            // times as long here), and kills timed by it mostly came too late.
            let ms = started.elapsed().as_millis() as u64;
            full_ms = if full_ms == 0 { ms } else { full_ms.min(ms) };
            eprintln!("prune kill test: a whole prune takes {ms} ms");
        } else if !st.success() {
            killed += 1;
        }
        rt.block_on(async {
            let store = env.store().await;
            let keys = env.keys();
            // A killed prune leaves its lock behind; the next backup sees that its
            // process is gone (same boot, no such pid) and does not wait for it.
            for id in restore::list_ids(&store).await.unwrap() {
                let out = env.path(&format!("out-{run}-{id}"));
                restore_to(&store, &env, &id, &out).await;
                assert_eq!(
                    Some(&tree_hash(&out.join("v/_data"))),
                    states.get(&id),
                    "run {run}: snapshot {id} restored other data"
                );
                std::fs::remove_dir_all(&out).unwrap();
            }
            let c = check_of(&store, &keys, false).await;
            assert!(c.ok(), "run {run}: {:?}", c.problems);
        });
    }
    eprintln!("prune kill test: {killed} prunes killed; every listed snapshot restored after each");
    assert!(killed >= 4, "too few kills landed: {killed}");
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let c = check_of(&store, &keys, true).await;
        assert!(c.ok(), "{:?}", c.problems);
    });
}

#[test]
fn a_lock_left_by_a_dead_process_of_this_boot_is_cleared_others_are_not() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 6, 2);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string();
    // A pid that cannot be running: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let lock = |boot: &str, pid: u32| {
            serde_json::json!({"host": "test", "kind": "prune", "pid": pid, "boot_id": boot})
                .to_string()
                .into_bytes()
        };
        let key = format::lock_key(&store.prefix, "prune-20260101T000000.000Z-00000000");
        // Another machine's (or another boot's) prune: live until stale, so prune
        // leaves the chunks alone.
        store
            .put(
                &key,
                lock("00000000-0000-0000-0000-000000000000", dead),
                false,
                None,
            )
            .await
            .unwrap();
        let p = prune::prune(
            &store,
            &keys,
            &Retention::default(),
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        assert!(p.chunks_skipped.is_some(), "{p:?}");
        assert!(store.exists(&key).await.unwrap());
        // The same lock from this boot, by a process that exited: cleared at once.
        store
            .put(&key, lock(&boot, dead), false, None)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        backup_of(&store, &keys, &v, pack::PACK_TARGET).await;
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        assert!(
            !store.exists(&key).await.unwrap(),
            "the dead lock is still there"
        );
        // A live process of this boot (this test) keeps its lock.
        store
            .put(
                &key,
                lock(&boot, std::os::unix::process::parent_id()),
                false,
                None,
            )
            .await
            .unwrap();
        let p = prune::prune(
            &store,
            &keys,
            &Retention::default(),
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        assert!(p.chunks_skipped.is_some(), "{p:?}");
    });
}

#[test]
fn small_packs_of_incremental_backups_are_merged_once() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 7, 3);
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let mut snaps = Vec::new();
        for i in 0..5u64 {
            std::fs::write(v.join("changing"), noise(700 + i, 200_000)).unwrap();
            let r = backup_of(&store, &keys, &v, pack::PACK_TARGET).await;
            snaps.push((r.id, tree_hash(&v)));
        }
        // Each backup: one pack of data, one of its entry list.
        assert_eq!(packs::pack_count(&store).await, 10);
        let p = prune::prune(
            &store,
            &keys,
            &Retention::default(),
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        eprintln!("merge: {p:?}");
        assert_eq!((p.packs_small, p.packs_written), (10, 1), "{p:?}");
        assert_eq!(packs::pack_count(&store).await, 1);
        for (id, hash) in &snaps {
            let out = env.path(&format!("out-{id}"));
            restore_to(&store, &env, id, &out).await;
            assert_eq!(&tree_hash(&out.join("v/_data")), hash);
        }
        // One pack left: nothing to merge, nothing rewritten.
        let p = prune::prune(
            &store,
            &keys,
            &Retention::default(),
            &PruneOptions::no_grace(),
        )
        .await
        .unwrap();
        assert_eq!(p.packs_repacked + p.packs_deleted, 0, "{p:?}");
        let c = check_of(&store, &keys, true).await;
        assert!(c.ok(), "{:?}", c.problems);
    });
}

/// Consecutive GETs of a pack meet on block boundaries (`link_aligned`): each chunk
/// cut by one is put together from the two GETs and verified whole, the bytes come
/// out as without the links, no byte is read twice, and damage in the part of a cut
/// chunk that the earlier GET read is caught and named.
#[test]
fn gets_meet_on_block_boundaries_and_cut_chunks_verify_whole() {
    let env = Env::new(false);
    let v = env.path("vol");
    mixed_tree(&v, 5, 12);
    rt().block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup_of(&store, &keys, &v, pack::PACK_TARGET).await;
        let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        let (index, _) = restore::plan_all(&store, &keys, &[&m.volumes[0]])
            .await
            .unwrap();
        // Short ranges and small blocks, so that many GETs meet inside chunks.
        const BLOCK: u64 = 64 << 10;
        let plan = restore::plan(&index, &m.volumes[0].chunks, 512 << 10).unwrap();
        let mut linked = plan.clone();
        restore::link_aligned(&mut linked, BLOCK, u64::MAX);

        let mut cut = Vec::new();
        for (k, f) in linked.iter().enumerate() {
            if let restore::Fetch::Range {
                start,
                len,
                lead,
                pass,
                blobs,
                ..
            } = f
            {
                assert!(blobs
                    .iter()
                    .all(|b| u64::from(b.offset) >= *start && b.end() <= start + len));
                if *lead > 0 {
                    assert_eq!((start + lead) % BLOCK, 0, "GET {k} starts off a block");
                    assert!(u64::from(blobs[0].offset) < start + lead);
                    assert!(blobs[0].end() > start + lead, "range {k}: the cut chunk");
                    cut.push(k);
                }
                if *pass > 0 {
                    assert_eq!((start + len + pass) % BLOCK, 0, "GET {k} ends off a block");
                }
            }
        }
        assert!(cut.len() >= 8, "only {} ranges linked", cut.len());

        let plain = |fs: Vec<Vec<bytes::Bytes>>| -> Vec<u8> { fs.concat().concat() };
        let before = store.requests();
        let mut want = Vec::new();
        for f in &plan {
            want.push(restore::fetch(&store, &keys, f).await.unwrap());
        }
        let read_unlinked = store.requests().since(&before);
        let before = store.requests();
        let mut links = restore::Links::default();
        let mut got = Vec::new();
        for f in &linked {
            let (from, to) = links.next(f);
            got.push(
                restore::fetch_linked(&store, &keys, f, from, to)
                    .await
                    .unwrap(),
            );
        }
        let read_linked = store.requests().since(&before);
        assert_eq!(plain(got), plain(want));
        assert_eq!(read_linked.get, read_unlinked.get);
        assert_eq!(read_linked.bytes_received, read_unlinked.bytes_received);

        // Fetched alone, a linked range is refused instead of opened half-empty.
        let e = restore::fetch(&store, &keys, &linked[cut[0]])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("fetched alone"), "{e}");

        // One flipped bit in a cut chunk, in the bytes the GET before it read.
        let k = cut[cut.len() / 2];
        let restore::Fetch::Range {
            key,
            start,
            lead,
            blobs,
            ..
        } = &linked[k]
        else {
            unreachable!()
        };
        let original = store.get(key, u64::MAX).await.unwrap().unwrap();
        let mut bad = original.clone();
        bad[(start + lead - 1) as usize] ^= 0x10;
        store.put(key, bad, false, None).await.unwrap();
        let mut links = restore::Links::default();
        let mut failed = None;
        for (j, f) in linked.iter().enumerate() {
            let (from, to) = links.next(f);
            if let Err(e) = restore::fetch_linked(&store, &keys, f, from, to).await {
                failed = Some((j, e));
                break;
            }
        }
        let (j, e) = failed.expect("the damaged chunk was opened");
        assert_eq!(j, k, "{e}");
        assert!(
            matches!(e, imgbuild::snapshot::SnapshotError::CorruptChunk { .. })
                && e.to_string().contains(&hex::encode(blobs[0].id))
                && e.to_string().contains(key.as_str()),
            "{e}"
        );
        store.put(key, original, false, None).await.unwrap();

        // The restore itself links its GETs (at GET_ALIGN) and gives the tree back.
        let out = env.path("out");
        restore_to(&store, &env, &r.id, &out).await;
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
    });
}
