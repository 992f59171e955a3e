//! `imgbuild drill` end to end: a services image (test overlay: one baked busybox web
//! server serving volume `www`, `check = "/proof.txt"`, RPO 2 h) is drilled against a
//! real moto S3 server on the host's 127.0.0.1, which the restricted guest can only
//! reach through the drill's read-only gateway.
//!
//! Three boots: a good snapshot passes (restored bytes, RTO, RPO, the HTTP check, every
//! unit up, no bucket write, the bucket unchanged); a snapshot older than the RPO fails
//! naming the RPO (it still boots: the restore result is part of the report); a
//! corrupted chunk fails naming the corruption.

#[path = "common.rs"]
mod common;
#[path = "../tests/snapshot-fixtures/common.rs"]
mod snapfix;
#[path = "../tests/snapshot-fixtures/packs.rs"]
mod snappacks;

use common::*;
use imgbuild::snapshot::backup;
use imgbuild::snapshot::{format, restore, Keys, Store, StoreConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

const PREFIX: &str = "vps1-drill";
const RPO_HOURS: u32 = 2;

fn main() {
    run_tests(&[
        (
            "drill_passes_for_a_good_snapshot_and_leaves_the_bucket_untouched",
            drill_passes_for_a_good_snapshot_and_leaves_the_bucket_untouched,
        ),
        (
            "drill_fails_naming_the_rpo_for_an_old_snapshot",
            drill_fails_naming_the_rpo_for_an_old_snapshot,
        ),
        (
            "drill_fails_naming_the_corrupted_chunk",
            drill_fails_naming_the_corrupted_chunk,
        ),
    ]);
}

struct Fixture {
    dir: PathBuf,
    bucket: String,
    endpoint: String,
    secrets: PathBuf,
    overlay: PathBuf,
    image: PathBuf,
    cfg: StoreConfig,
    keys: Keys,
    good: String,
    old: String,
}

fn store(f: &Fixture) -> Store {
    snapfix::rt()
        .block_on(Store::connect(&f.cfg))
        .expect("connect to moto")
}

/// Every key and ETag in the bucket.
fn inventory(f: &Fixture) -> BTreeMap<String, String> {
    let s = store(f);
    snapfix::rt().block_on(snapfix::bucket_inventory(&s))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        require(
            "qemu-system-x86_64",
            "sudo apt-get install -t bookworm-backports qemu-system-x86 ovmf",
        );
        let moto = snapfix::moto();
        let port: u16 = moto
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("moto port");
        let bucket = snapfix::unique("drill").to_lowercase();
        // The workstation's credentials for moto (the drill's real-store side).
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        let dir = scratch("qemu-drill");
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(secrets.join("vps1")).unwrap();
        snapfix::write_keys(&secrets.join("vps1"), 9);
        std::fs::write(
            secrets.join("vps1/s3.env"),
            "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_REGION=us-east-1\n",
        )
        .unwrap();
        let cfg = StoreConfig {
            bucket: bucket.clone(),
            prefix: PREFIX.into(),
            endpoint: Some(moto.endpoint.clone()),
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: Some(secrets.join("vps1/s3.env")),
            ..Default::default()
        };
        snapfix::rt().block_on(async {
            let s = Store::connect(&cfg).await.expect("connect");
            s.client()
                .create_bucket()
                .bucket(&bucket)
                .send()
                .await
                .expect("create bucket");
        });

        let k = keys(&dir);
        let oci = dir.join("hello.oci.tar");
        hello_archive(&oci);
        let overlay = dir.join("overlay.toml");
        // The image's own endpoint is the host's moto (10.0.2.2): the drill must not use
        // it, and with the restricted network it could not.
        std::fs::write(
            &overlay,
            format!(
                "replace = [\"containers\", \"volumes\", \"networks\", \"proxy\", \"backup\", \"admin\"]\n\n\
                 [admin]\nuser = \"admin\"\nssh_keys = [\"{}\"]\n\n\
                 [backup]\nbucket = \"{bucket}\"\nprefix = \"{PREFIX}\"\nendpoint = \"http://10.0.2.2:{port}\"\nregion = \"us-east-1\"\n\
                 restore = \"require\"\nrestore_timeout = 120\nrpo_hours = {RPO_HOURS}\nkeep = {{ last = 3 }}\n\n\
                 [volumes.www]\nbackup = \"live\"\n\n\
                 [containers.web]\nimage = \"{HELLO_REF}\"\nbake = \"{}\"\npublish = [\"{HELLO_PORT}:{HELLO_PORT}\"]\nvolumes = [\"www:/www\"]\ncheck = \"/proof.txt\"\n",
                k.admin_pub.trim(),
                oci.display()
            ),
        )
        .unwrap();
        let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
        let helper = strip(&cli, &dir);
        let image = dir.join("vps1.raw");
        let t = Instant::now();
        cli_build(&profile(), &overlay, &secrets, &helper, &image, &["--quiet"]);
        eprintln!("image built in {:.1}s", t.elapsed().as_secs_f64());

        // The data: a volume with a known file, snapshotted by the library as the
        // host's backup would.
        let data = dir.join("data/www");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let proof = format!("drilled-{}", std::process::id());
        std::fs::write(data.join("proof.txt"), format!("{proof}\n")).unwrap();
        std::fs::write(data.join("sub/blob"), snapfix::noise(3, 2 << 20)).unwrap();
        let keys = Keys::load(
            &secrets.join("vps1/snapshot-encryption.key"),
            &secrets.join("vps1/snapshot-signing.key"),
        )
        .expect("keys");
        let (good, old) = snapfix::rt().block_on(async {
            let s = Store::connect(&cfg).await.expect("connect");
            let r = snapfix::backup_volume(&s, &keys, "www", &data, "vps1").await;
            // The same data as a snapshot taken three days ago: a re-signed manifest
            // with an older id and time (the library has no clock to turn back).
            let mut m = restore::load_manifest(&s, &keys, &r.id)
                .await
                .expect("manifest");
            let then_ms = backup::now_unix_ms() - 3 * 86_400_000;
            m.id = format::new_snapshot_id(then_ms);
            m.time = then_ms / 1000;
            let sealed = keys
                .seal_manifest(&m.id, &m.host, PREFIX, &serde_json::to_vec(&m).unwrap())
                .expect("seal");
            s.put(&format::snapshot_key(PREFIX, &m.id), sealed, true, None)
                .await
                .expect("put old manifest");
            (r.id, m.id)
        });
        Fixture {
            dir,
            bucket,
            endpoint: moto.endpoint.clone(),
            secrets,
            overlay,
            image,
            cfg,
            keys,
            good,
            old,
        }
    })
}

fn profile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/services.toml")
}

/// Runs `imgbuild drill --json`; returns (exit code, report, stderr).
fn drill(f: &Fixture, extra: &[&str], log: &str) -> (i32, serde_json::Value, String) {
    drill_with(f, Some(&f.image), extra, log)
}

/// `image: None` lets the drill build the image itself from the profile.
fn drill_with(
    f: &Fixture,
    image: Option<&Path>,
    extra: &[&str],
    log: &str,
) -> (i32, serde_json::Value, String) {
    let t = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgbuild"));
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .arg("drill")
        .arg(profile())
        .arg("--overlay")
        .arg(&f.overlay)
        .arg("--secrets")
        .arg(&f.secrets);
    if let Some(image) = image {
        cmd.arg("--image").arg(image);
    }
    let o = cmd
        .args([
            "--bucket",
            &f.bucket,
            "--prefix",
            PREFIX,
            "--endpoint",
            &f.endpoint,
        ])
        .args(["--timeout", "600", "--json", "--console-log"])
        .arg(f.dir.join(log))
        .args(extra)
        .output()
        .expect("run imgbuild drill");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("drill printed no JSON report ({e}):\n{stdout}\n{stderr}"));
    eprintln!(
        "drill {extra:?}: exit {:?} in {:.1}s; RTO {} ({}); failures {}",
        o.status.code(),
        t.elapsed().as_secs_f64(),
        report["rto_seconds"],
        report["accel"],
        report["failures"]
    );
    (o.status.code().unwrap_or(-1), report, stderr)
}

fn console_tail(f: &Fixture, log: &str) -> String {
    let text = std::fs::read_to_string(f.dir.join(log)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn drill_passes_for_a_good_snapshot_and_leaves_the_bucket_untouched() {
    let f = fixture();
    let before = inventory(f);
    let (code, r, stderr) = drill(f, &[], "good.log");
    let ctx = || {
        format!(
            "{}\n{stderr}\n--- console ---\n{}",
            serde_json::to_string_pretty(&r).unwrap(),
            console_tail(f, "good.log")
        )
    };
    assert_eq!(code, 0, "the drill failed:\n{}", ctx());
    assert_eq!(r["ok"], true, "{}", ctx());
    assert_eq!(r["snapshot"]["id"], f.good.as_str(), "{}", ctx());
    assert_eq!(r["snapshot"]["within_rpo"], true, "{}", ctx());
    assert_eq!(r["snapshot"]["rpo_hours"], RPO_HOURS, "{}", ctx());
    assert_eq!(r["restore"]["ok"], true, "{}", ctx());
    assert!(
        r["restore"]["bytes"].as_u64().unwrap_or(0) > 2 << 20,
        "{}",
        ctx()
    );
    assert!(r["rto_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{}", ctx());
    assert_eq!(r["image_verified"], true);
    assert_eq!(
        r["egress"], false,
        "the drill guest must be isolated by default"
    );
    let checks = r["checks"].as_array().expect("checks");
    let web = checks
        .iter()
        .find(|c| c["container"] == "web")
        .unwrap_or_else(|| panic!("no check of web:\n{}", ctx()));
    assert_eq!(web["kind"], "http");
    assert_eq!(web["status"], 200, "{}", ctx());
    assert_eq!(web["ok"], true, "{}", ctx());
    let units = r["units"].as_array().expect("units");
    assert!(
        units
            .iter()
            .any(|u| u["unit"] == "web.service" && u["state"] == "up"),
        "{}",
        ctx()
    );
    assert!(units.iter().all(|u| u["state"] == "up"), "{}", ctx());
    // web has no HealthCmd: podman says so ("none"), it is not an unreadable state.
    assert!(
        units
            .iter()
            .any(|u| u["unit"] == "web.service" && u["health"] == "none"),
        "{}",
        ctx()
    );
    assert_eq!(r["bucket"]["writes_attempted"], 0, "{}", ctx());
    assert!(
        r["bucket"]["gateway"]["objects_served"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    );
    // /proof.txt answered 200 above: only the restored volume has it (the image's www
    // volume starts empty).
    let console = std::fs::read_to_string(f.dir.join("good.log")).unwrap_or_default();
    assert!(
        console.contains("imgbuild drill: mode on"),
        "the guest did not enter drill mode"
    );
    assert!(
        console.contains("imgbuild: vps1 ready ("),
        "the normal readiness line is unchanged"
    );
    assert_eq!(before, inventory(f), "the drill changed the bucket");
}

fn drill_fails_naming_the_rpo_for_an_old_snapshot() {
    let f = fixture();
    // This drill builds its own image from the profile (the path a cron job without
    // --image takes); the others drill the prebuilt one.
    let (code, r, stderr) = drill_with(f, None, &["--snapshot", &f.old], "old.log");
    assert_eq!(r["image_verified"], false, "{r}");
    assert!(
        r["image"].as_str().is_some_and(|p| p.ends_with("vps1.raw")),
        "{r}"
    );
    let failures = r["failures"].to_string();
    assert_eq!(code, 1, "{r}\n{stderr}");
    assert!(
        failures.contains(&format!(
            "snapshot {}: 3 d old, older than the RPO of {RPO_HOURS} h",
            f.old
        )),
        "{failures}"
    );
    // Only the age is wrong: the old snapshot itself still restores and serves.
    assert_eq!(r["restore"]["ok"], true, "{r}");
    assert_eq!(r["snapshot"]["within_rpo"], false);
    assert_eq!(
        r["failures"].as_array().map(Vec::len),
        Some(1),
        "{failures}"
    );
}

fn drill_fails_naming_the_corrupted_chunk() {
    let f = fixture();
    // Flip bytes in the middle of one chunk of the good snapshot, in the bucket.
    let s = store(f);
    let chunk = snapfix::rt().block_on(async {
        let m = restore::load_manifest(&s, &f.keys, &f.good)
            .await
            .expect("manifest");
        let id = m.volumes[0].chunks[0].0.clone();
        let (key, off, len) = snappacks::place(&s, &f.keys, &id).await;
        let mut b = s.get(&key, u64::MAX).await.unwrap().expect("pack object");
        let mid = (off + len / 2) as usize;
        for x in &mut b[mid..mid + 8] {
            *x ^= 0xff;
        }
        s.put(&key, b, false, None)
            .await
            .expect("corrupt the chunk");
        id
    });
    let before = inventory(f);
    let (code, r, stderr) = drill(f, &[], "corrupt.log");
    let failures = r["failures"].to_string();
    assert_eq!(code, 1, "{r}\n{stderr}");
    assert!(
        failures.contains(&format!("restore failed: chunk {chunk} is corrupted")),
        "{failures}\n--- console ---\n{}",
        console_tail(f, "corrupt.log")
    );
    assert_eq!(r["restore"]["ok"], false);
    assert_eq!(r["bucket"]["writes_attempted"], 0);
    assert_eq!(before, inventory(f), "the drill changed the bucket");
    // Final at once: no retry loop on an integrity failure.
    let console = std::fs::read_to_string(f.dir.join("corrupt.log")).unwrap_or_default();
    assert!(
        !console.contains("retrying in"),
        "an integrity failure was retried"
    );
}
