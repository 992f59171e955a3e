//! The by-hand restore script of docs/snapshot-format.md, run for real: it is cut out
//! of the markdown (so the doc and the test cannot drift), pointed at buckets the Rust
//! engine wrote into a moto S3 server on 127.0.0.1, and its output compared with the
//! backed-up tree byte for byte (contents, modes, owners, times, symlinks, hard links,
//! holes, xattrs). Packed buckets (format 2, manifest JSON 4 with its entry lists in
//! chunks of their own) and format-1 buckets (one object per chunk, manifests
//! IMGSNAP1/JSON 1 and IMGSNAP2/JSON 2, entry lists inline) both; and the script must
//! refuse tampered manifests, corrupt chunks and version-4 entry lists that break the
//! documented rules.
//!
//! Its Python libraries (pynacl, cryptography, blake3, zstandard, boto3) come from
//! `.ci/deps.sh --tests`; when they are missing the test installs them into a venv
//! under the target directory.

#[path = "snapshot-fixtures/common.rs"]
mod common;
#[path = "snapshot-fixtures/packs.rs"]
mod packs;

use common::*;
use imgbuild::snapshot::backup::{backup, BackupOptions, NoHooks, Source};
use imgbuild::snapshot::pack::{Index, Location, PACK_TARGET_MIN};
use imgbuild::snapshot::{entries, format, restore, Keys, Store};
use packs::{entry_list, inline_entries};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The script's libraries, pinned like `.ci/deps.sh --tests` pins them.
const PY_PACKAGES: &[&str] = &[
    "pynacl==1.6.2",
    "blake3==1.0.11",
    "zstandard==0.25.0",
    "cryptography==48.0.0",
    "boto3",
];
const PY_IMPORTS: &str = "import boto3, blake3, nacl, zstandard, cryptography";

fn has_modules(py: &Path) -> bool {
    Command::new(py)
        .args(["-c", PY_IMPORTS])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Python 3 that has the script's libraries: the system's, or a venv under the
/// target directory that this installs them into (once; later runs reuse it).
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let system = PathBuf::from("python3");
        if has_modules(&system) {
            return system;
        }
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-restore-venv");
        let py = venv.join("bin/python3");
        if !has_modules(&py) {
            eprintln!(
                "python3 lacks {PY_PACKAGES:?}: installing them into {}",
                venv.display()
            );
            run_ok(
                Command::new("python3")
                    .args(["-m", "venv", "--system-site-packages"])
                    .arg(&venv),
            );
            run_ok(
                Command::new(&py)
                    .args(["-m", "pip", "install", "-q"])
                    .args(PY_PACKAGES),
            );
        }
        assert!(
            has_modules(&py),
            "{} still cannot `{PY_IMPORTS}`; install them with `bash .ci/deps.sh --tests`",
            py.display()
        );
        py
    })
}

/// The script as docs/snapshot-format.md shows it: the python block of its last section.
fn script_text() -> String {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/snapshot-format.md"),
    )
    .expect("docs/snapshot-format.md");
    let section = doc
        .split_once("\n## Restoring by hand (Python)\n")
        .expect("the doc has a section `## Restoring by hand (Python)`")
        .1;
    let code = section
        .split_once("\n```python\n")
        .expect("that section has a ```python block")
        .1;
    let code = code.split_once("\n```\n").expect("the block is closed").0;
    format!("{code}\n")
}

struct Script {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn script() -> Script {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restore.py");
    std::fs::write(&path, script_text()).unwrap();
    Script { path, _dir: dir }
}

/// Runs the documented script against `prefix` of the env's bucket into `out`.
fn run_script(env: &Env, s: &Script, prefix: &str, out: &Path, snapshot: Option<&str>) -> Output {
    run_script_with(env, &env.secrets, s, prefix, out, snapshot)
}

/// `run_script` with another secrets dir.
fn run_script_with(
    env: &Env,
    secrets: &Path,
    s: &Script,
    prefix: &str,
    out: &Path,
    snapshot: Option<&str>,
) -> Output {
    let mut cmd = Command::new(python());
    cmd.arg(&s.path)
        .arg(secrets)
        .arg(&env.cfg.bucket)
        .arg(prefix)
        .arg(out)
        .args(snapshot)
        .env("AWS_ENDPOINT_URL_S3", &moto().endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE");
    let o = cmd.output().expect("run the restore script");
    eprintln!(
        "restore.py {prefix} {snapshot:?} → {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The script succeeded and reproduced `expected` (tree lines of the source) as volume
/// `vol` under `out`.
fn assert_restored(o: &Output, out: &Path, vol: &str, expected: &[String]) {
    assert!(o.status.success(), "the script failed:\n{}", stderr(o));
    let got = tree_lines(&out.join(vol).join("_data"));
    if got != expected {
        let missing: Vec<_> = expected.iter().filter(|l| !got.contains(l)).collect();
        let extra: Vec<_> = got.iter().filter(|l| !expected.contains(l)).collect();
        panic!("restored tree differs\nexpected, not found: {missing:#?}\nfound, not expected: {extra:#?}");
    }
}

async fn backup_with(store: &Store, keys: &Keys, root: &Path, pack_target: usize) -> String {
    let mut opts = BackupOptions::new("test");
    opts.pack_target = pack_target;
    let r = backup(
        store,
        keys,
        &[Source {
            name: "data".into(),
            root: root.to_path_buf(),
            wal_start: None,
        }],
        &mut NoHooks,
        &opts,
    )
    .await
    .expect("backup");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    r.id
}

/// Replaces an object (tampering, and putting the original back).
async fn put(store: &Store, key: &str, bytes: Vec<u8>) {
    store.put(key, bytes, false, None).await.expect("put");
}

async fn get(store: &Store, key: &str) -> Vec<u8> {
    store
        .get(key, 1 << 30)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} is not in the bucket"))
}

/// Two packed snapshots (small packs, so there are several, and two index objects).
/// The script restores both; it falls back to the packs' own headers when the index
/// objects fail their signature; it refuses a tampered manifest and a corrupt pack.
#[test]
fn the_documented_script_restores_a_packed_bucket() {
    let env = Env::new(false);
    let s = script();
    let vol = env.path("vol");
    make_rich_tree(&vol);
    // Enough entries for an entry list of several chunks (more than the 1 MiB maximum).
    std::fs::create_dir_all(vol.join("many")).unwrap();
    for i in 0..6000 {
        std::fs::write(vol.join(format!("many/empty-file-{i:05}")), b"").unwrap();
    }
    let rt = rt();
    let store = rt.block_on(env.store());
    let keys = env.keys();
    let prefix = store.prefix.clone();

    let first = rt.block_on(backup_with(&store, &keys, &vol, PACK_TARGET_MIN));
    let lines_first = tree_lines(&vol);
    std::fs::write(vol.join("new.bin"), noise(9, 5 << 20)).unwrap();
    std::fs::write(vol.join("small/f0001.txt"), b"changed\n").unwrap();
    // An existing file in a group of others: the group keeps them as slices.
    std::fs::write(vol.join("small/a/f0004.txt"), b"changed too\n").unwrap();
    let second = rt.block_on(backup_with(&store, &keys, &vol, PACK_TARGET_MIN));
    let lines_second = tree_lines(&vol);

    let (packs, indexes) = rt.block_on(async {
        let ix = Index::load(&store, &keys).await.unwrap();
        (ix.packs.len(), ix.objects.clone())
    });
    assert!(packs >= 4, "small packs: expected several, got {packs}");
    assert_eq!(indexes.len(), 2, "one index object per backup: {indexes:?}");
    let m2 = rt
        .block_on(restore::load_manifest(&store, &keys, &second))
        .unwrap();
    assert_eq!(m2.version, 5);
    let v = &m2.volumes[0];
    // The changed small file's group keeps its other files as slices, which the
    // script must read as such.
    assert!(
        v.chunks.iter().any(|c| c.2.is_some()),
        "no slice in the second snapshot"
    );
    assert!(v.entries.is_empty(), "version 4 keeps no entries inline");
    assert!(v.meta.len() >= 2, "entry chunks: {:?}", v.meta);
    // The writer cuts the entry stream after lines (lines cut anywhere, as earlier
    // writers did, are read by the version-4 test below).
    let meta: Vec<bytes::Bytes> = rt.block_on(async {
        let ix = Index::load(&store, &keys).await.unwrap();
        let mut out = Vec::new();
        for f in restore::plan(&ix, &v.meta, u64::MAX).unwrap() {
            out.extend(restore::fetch(&store, &keys, &f).await.unwrap());
        }
        out
    });
    assert_eq!(meta.len(), v.meta.len());
    assert!(
        meta.iter().all(|c| c.last() == Some(&b'\n')),
        "an entry chunk ends inside a line"
    );

    // The newest snapshot (no id given), then the first one by its id.
    let o = run_script(&env, &s, &prefix, &env.path("out-newest"), None);
    assert_restored(&o, &env.path("out-newest"), "data", &lines_second);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let o = run_script(&env, &s, &prefix, &env.path("out-first"), Some(&first));
    assert_restored(&o, &env.path("out-first"), "data", &lines_first);

    // Index objects whose cleartext host was rewritten: only the signature can tell
    // (the AEAD does not cover the host). The script skips them and finds every chunk
    // through the packs' own headers.
    let originals: Vec<(String, Vec<u8>)> = rt.block_on(async {
        let mut v = Vec::new();
        for k in &indexes {
            v.push((k.clone(), get(&store, k).await));
        }
        v
    });
    rt.block_on(async {
        for (k, b) in &originals {
            let mut t = b.clone();
            assert_eq!(&t[..8], b"IMGIDX01");
            assert_eq!(&t[73..77], b"test");
            t[73] = b'T';
            put(&store, k, t).await;
        }
    });
    let o = run_script(&env, &s, &prefix, &env.path("out-headers"), None);
    assert_restored(&o, &env.path("out-headers"), "data", &lines_second);
    let err = stderr(&o);
    assert_eq!(
        err.matches("warning: index").count(),
        2,
        "both index objects must be skipped: {err}"
    );
    assert_eq!(err.matches("signature does not verify").count(), 2, "{err}");
    rt.block_on(async {
        for (k, b) in originals {
            put(&store, &k, b).await;
        }
    });

    // A manifest whose cleartext host was rewritten: refused, nothing restored.
    let mkey = format::snapshot_key(&prefix, &second);
    let manifest = rt.block_on(get(&store, &mkey));
    let mut t = manifest.clone();
    assert_eq!((&t[..8], &t[73..77]), (&b"IMGSNAP2"[..], &b"test"[..]));
    t[73] = b'T';
    rt.block_on(put(&store, &mkey, t));
    let o = run_script(&env, &s, &prefix, &env.path("out-forged"), None);
    assert!(!o.status.success(), "a forged manifest was accepted");
    assert!(
        stderr(&o).contains(&format!("refused: {second}: signature does not verify")),
        "{}",
        stderr(&o)
    );
    assert!(!env.path("out-forged").exists());
    rt.block_on(put(&store, &mkey, manifest));

    // The right public key with another encryption key: signed, but does not decrypt.
    let wrong = env.path("wrong-key");
    write_keys(&wrong, 2);
    std::fs::copy(
        env.secrets.join("snapshot-signing.pub"),
        wrong.join("snapshot-signing.pub"),
    )
    .unwrap();
    let o = run_script_with(&env, &wrong, &s, &prefix, &env.path("out-key"), None);
    assert!(!o.status.success(), "another encryption key was accepted");
    assert!(
        stderr(&o).contains(&format!("{second}: signed but does not decrypt")),
        "{}",
        stderr(&o)
    );

    // One byte of a chunk's ciphertext flipped inside its pack: the AEAD refuses it.
    let last = m2.volumes[0].chunks.last().unwrap().0.clone();
    let (pack_key, blob) = rt.block_on(async {
        let ix = Index::load(&store, &keys).await.unwrap();
        let id: [u8; 32] = hex::decode(&last).unwrap().try_into().unwrap();
        match ix.locate(&id) {
            Some(Location::Pack { pack, blob }) => (ix.packs[pack].key.clone(), blob),
            other => panic!("chunk {last} is not in a pack: {other:?}"),
        }
    });
    let pack = rt.block_on(get(&store, &pack_key));
    let mut t = pack.clone();
    t[blob.offset as usize + 25 + 7] ^= 0x01;
    rt.block_on(put(&store, &pack_key, t));
    let o = run_script(&env, &s, &prefix, &env.path("out-corrupt"), None);
    assert!(!o.status.success(), "a corrupt pack was accepted");
    assert!(
        stderr(&o).contains(&format!("chunk {last} does not decrypt")),
        "{}",
        stderr(&o)
    );
    // ...and with the byte back, the same bucket restores again.
    rt.block_on(put(&store, &pack_key, pack));
    let o = run_script(&env, &s, &prefix, &env.path("out-again"), None);
    assert_restored(&o, &env.path("out-again"), "data", &lines_second);
}

/// A format-1 prefix as older releases wrote it (one object per chunk under
/// `chunks/`, an IMGSNAP1 manifest with JSON version 1 and a newer IMGSNAP2 one with
/// JSON version 2), then a packed backup onto it whose version-3 manifest names chunk
/// objects and packed chunks at once. The script restores all three and refuses a
/// corrupt chunk object.
#[test]
fn the_documented_script_restores_a_format1_bucket() {
    let env = Env::new(false);
    let s = script();
    let vol = env.path("vol");
    make_rich_tree(&vol);
    let lines = tree_lines(&vol);
    let rt = rt();
    let keys = env.keys();
    let mut old_cfg = env.cfg.clone();
    old_cfg.prefix = "hosts/old".into();
    let (old, v1_id, v2_id) = rt.block_on(async {
        // The Rust engine does the chunking; its chunks are then re-sealed one object
        // each under another prefix, the way format-1 backups stored them.
        let store = env.store().await;
        let id = backup_with(&store, &keys, &vol, imgbuild::snapshot::pack::PACK_TARGET).await;
        let m = restore::load_manifest(&store, &keys, &id).await.unwrap();
        let vols: Vec<_> = m.volumes.iter().collect();
        let (_, plans) = restore::plan_all(&store, &keys, &vols).await.unwrap();
        let old = Store::connect(&old_cfg).await.unwrap();
        let refs = &m.volumes[0].chunks;
        let mut n = 0;
        for f in &plans[0] {
            for plain in restore::fetch(&store, &keys, f).await.unwrap() {
                let cid = keys.chunk_id(&plain);
                assert_eq!(hex::encode(cid), refs[n].0);
                n += 1;
                put(
                    &old,
                    &format::chunk_key(&old.prefix, &hex::encode(cid)),
                    keys.seal_chunk_v1(&cid, &plain),
                )
                .await;
            }
        }
        assert_eq!(n, refs.len());
        // Versions 1-3 carry the list inline and know no `linked` marks.
        let list = entry_list(&store, &keys, &m.volumes[0]).await;
        assert!(list.iter().any(|e| e.linked), "the tree has hard links");
        let mut m = m.clone();
        inline_entries(&store, &keys, &mut m).await;
        let ms = m.time * 1000;
        let mut m1 = m.clone();
        m1.version = 1;
        m1.id = format::new_snapshot_id(ms - 7_200_000);
        let sealed = keys
            .seal_manifest_v1(&m1.id, &serde_json::to_vec(&m1).unwrap())
            .unwrap();
        put(&old, &format::snapshot_key(&old.prefix, &m1.id), sealed).await;
        let mut m2 = m.clone();
        m2.version = 2;
        m2.id = format::new_snapshot_id(ms - 3_600_000);
        let sealed = keys
            .seal_manifest(
                &m2.id,
                "test",
                &old.prefix,
                &serde_json::to_vec(&m2).unwrap(),
            )
            .unwrap();
        put(&old, &format::snapshot_key(&old.prefix, &m2.id), sealed).await;
        (old, m1.id, m2.id)
    });
    let prefix = old.prefix.clone();
    rt.block_on(async {
        let listed = old.list(&format::packs_dir(&prefix)).await.unwrap();
        assert!(listed.is_empty(), "format 1 has no packs");
        let listed = old.list(&format::index_dir(&prefix)).await.unwrap();
        assert!(listed.is_empty(), "format 1 has no index objects");
    });
    assert_eq!(
        &rt.block_on(get(&old, &format::snapshot_key(&prefix, &v1_id)))[..8],
        b"IMGSNAP1"
    );

    // Newest (JSON 2, IMGSNAP2), then the older one (JSON 1, IMGSNAP1) by its id.
    let o = run_script(&env, &s, &prefix, &env.path("out-v2"), None);
    assert_restored(&o, &env.path("out-v2"), "data", &lines);
    assert!(stderr(&o).contains("JSON version 2"), "{}", stderr(&o));
    let o = run_script(&env, &s, &prefix, &env.path("out-v1"), Some(&v1_id));
    assert_restored(&o, &env.path("out-v1"), "data", &lines);
    assert!(stderr(&o).contains("JSON version 1"), "{}", stderr(&o));

    // The first packed backup onto the old prefix re-uses the chunk objects and packs
    // only what is new (the entry list included): its manifest names both kinds.
    std::fs::write(vol.join("new.bin"), noise(11, 3 << 20)).unwrap();
    let lines_new = tree_lines(&vol);
    let v4_id = rt.block_on(backup_with(
        &old,
        &keys,
        &vol,
        imgbuild::snapshot::pack::PACK_TARGET,
    ));
    rt.block_on(async {
        let m = restore::load_manifest(&old, &keys, &v4_id).await.unwrap();
        assert_eq!(m.version, 5);
        let ix = Index::load(&old, &keys).await.unwrap();
        let (mut packed, mut objects) = (0, 0);
        for c in &m.volumes[0].chunks {
            let id: [u8; 32] = hex::decode(&c.0).unwrap().try_into().unwrap();
            match ix.locate(&id) {
                Some(Location::Pack { .. }) => packed += 1,
                Some(Location::Object { .. }) => objects += 1,
                None => panic!("chunk {} has no place", c.0),
            }
        }
        assert!(
            packed > 0 && objects > 0,
            "{packed} packed, {objects} objects"
        );
    });
    let o = run_script(&env, &s, &prefix, &env.path("out-v4"), None);
    assert_restored(&o, &env.path("out-v4"), "data", &lines_new);
    assert!(stderr(&o).contains("JSON version 5"), "{}", stderr(&o));

    // A chunk object with its tag flipped: refused.
    let m2 = rt
        .block_on(restore::load_manifest(&old, &keys, &v2_id))
        .unwrap();
    let cid = m2.volumes[0].chunks[0].0.clone();
    let ckey = format::chunk_key(&prefix, &cid);
    let mut t = rt.block_on(get(&old, &ckey));
    let n = t.len();
    t[n - 1] ^= 0x80;
    rt.block_on(put(&old, &ckey, t));
    let o = run_script(&env, &s, &prefix, &env.path("out-corrupt"), Some(&v2_id));
    assert!(!o.status.success(), "a corrupt chunk object was accepted");
    assert!(
        stderr(&o).contains(&format!("chunk {cid} does not decrypt")),
        "{}",
        stderr(&o)
    );
}

/// Entry lines as the stream holds them.
fn encode(list: &[format::Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in list {
        entries::encode(e, &mut out);
    }
    out
}

/// Publishes a copy of the one-volume version-4 manifest `m` whose entry list is
/// `list`, cut at the offsets `cuts` into chunk objects (format-1 places: an entry
/// chunk is found wherever a data chunk would be), under a new snapshot id.
async fn publish_list(
    store: &Store,
    keys: &Keys,
    m: &format::Manifest,
    list: &[u8],
    cuts: &[usize],
) -> String {
    let mut meta = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([list.len()]) {
        let piece = &list[start..end];
        let id = keys.chunk_id(piece);
        let hid = hex::encode(id);
        let key = format::chunk_key(&store.prefix, &hid);
        put(store, &key, keys.seal_chunk(&id, piece)).await;
        meta.push(format::ChunkRef::whole(hid, piece.len() as u64));
        start = end;
    }
    let mut m = m.clone();
    m.id = format::new_snapshot_id(m.time * 1000 - 60_000);
    m.volumes[0].meta = meta;
    let json = serde_json::to_vec(&m).unwrap();
    let sealed = keys
        .seal_manifest(&m.id, "test", &store.prefix, &json)
        .unwrap();
    put(store, &format::snapshot_key(&store.prefix, &m.id), sealed).await;
    m.id
}

/// Version-4 entry lists the script reads line by line across chunk boundaries and
/// checks before it writes anything: a hard link to a file marked `linked`, a name
/// that needs base64 and a symlink restore; a list whose hard link names an unmarked
/// file, an entry below a symlink, names out of order or twice, or a last line without
/// its newline are refused with nothing written.
#[test]
fn the_documented_script_checks_version4_entry_lists() {
    let env = Env::new(false);
    let s = script();
    let vol = env.path("vol");
    std::fs::create_dir_all(vol.join("d")).unwrap();
    std::fs::create_dir_all(vol.join("z")).unwrap();
    std::fs::write(vol.join("a.txt"), b"two names\n".repeat(1000)).unwrap();
    std::fs::hard_link(vol.join("a.txt"), vol.join("d/b")).unwrap();
    std::fs::write(vol.join("d/c"), noise(5, 300_000)).unwrap();
    use std::os::unix::ffi::OsStrExt;
    let latin1 = std::ffi::OsStr::from_bytes(b"latin1-\xe9\xff");
    std::fs::write(vol.join(latin1), b"bytes, not UTF-8\n").unwrap();
    std::os::unix::fs::symlink("d", vol.join("s")).unwrap();
    std::fs::write(vol.join("z/f"), b"last\n").unwrap();
    let lines = tree_lines(&vol);
    let rt = rt();
    let store = rt.block_on(env.store());
    let keys = env.keys();
    let prefix = store.prefix.clone();
    let id = rt.block_on(backup_with(&store, &keys, &vol, PACK_TARGET_MIN));
    let m = rt
        .block_on(restore::load_manifest(&store, &keys, &id))
        .unwrap();
    assert_eq!((m.version, m.volumes[0].meta.len()), (5, 1));
    let list = rt.block_on(entry_list(&store, &keys, &m.volumes[0]));
    let paths: Vec<Vec<u8>> = list.iter().map(|e| e.path.to_bytes().unwrap()).collect();
    let expected: [&[u8]; 9] = [
        b"",
        b"a.txt",
        b"d",
        b"d/b",
        b"d/c",
        b"latin1-\xe9\xff",
        b"s",
        b"z",
        b"z/f",
    ];
    assert_eq!(paths, expected, "stream order");
    let at = |p: &[u8]| paths.iter().position(|q| q == p).unwrap();
    assert!(list[at(b"a.txt")].linked);
    assert_eq!(list[at(b"d/b")].kind, format::Kind::Hardlink);
    assert!(matches!(
        list[at(b"latin1-\xe9\xff")].path,
        format::Name::Bytes { .. }
    ));

    // The snapshot as written, then the same list cut into three chunks mid-line.
    let o = run_script(&env, &s, &prefix, &env.path("out"), None);
    assert_restored(&o, &env.path("out"), "data", &lines);
    assert!(stderr(&o).contains("JSON version 5"), "{}", stderr(&o));
    let bytes = encode(&list);
    let cuts = [bytes.len() / 3, bytes.len() / 3 + 7];
    assert!(cuts.iter().all(|&c| bytes[c - 1] != b'\n'), "cuts mid-line");
    let cut = rt.block_on(publish_list(&store, &keys, &m, &bytes, &cuts));
    let o = run_script(&env, &s, &prefix, &env.path("out-cut"), Some(&cut));
    assert_restored(&o, &env.path("out-cut"), "data", &lines);

    // Broken lists: refused before anything is written.
    let mut unmarked = list.clone();
    unmarked[at(b"a.txt")].linked = false;
    let mut below = list.clone();
    let mut evil = list[at(b"z/f")].clone();
    (evil.path, evil.size) = (format::Name::Utf8("s/evil".into()), 0);
    below.insert(at(b"s") + 1, evil);
    let mut swapped = list.clone();
    swapped.swap(at(b"latin1-\xe9\xff"), at(b"s"));
    let mut twice = list.clone();
    twice.push(list[at(b"z/f")].clone());
    let mut cut_short = encode(&list);
    cut_short.pop();
    let cases = [
        (
            encode(&unmarked),
            "hard link does not name an earlier linked file",
        ),
        (encode(&below), "b's/evil' lies below a symlink entry"),
        (encode(&swapped), "is out of order"),
        (encode(&twice), "b'z/f' is listed twice"),
        (cut_short, "the entry list ends inside a line"),
    ];
    for (i, (bytes, why)) in cases.into_iter().enumerate() {
        let forged = rt.block_on(publish_list(&store, &keys, &m, &bytes, &[bytes.len() / 2]));
        let out = env.path(&format!("out-forged-{i}"));
        let o = run_script(&env, &s, &prefix, &out, Some(&forged));
        assert!(!o.status.success(), "case {i} ({why}) was accepted");
        assert!(
            stderr(&o).contains("refused: volume data: "),
            "{}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains(why),
            "case {i}: expected {why:?}: {}",
            stderr(&o)
        );
        assert!(!out.exists(), "case {i}: something was written");
    }
}
