//! A host's first deployment from the command line, against a real S3 server (moto on
//! 127.0.0.1): `imgbuild init` marks the empty prefix (idempotent), a prefix that holds
//! snapshots is never marked, and a backup removes the marker.

mod common;
#[path = "snapshot-fixtures/common.rs"]
mod snapfix;
use common::*;

struct Bucket {
    endpoint: String,
    bucket: String,
    secrets: tempfile::TempDir,
}

impl Bucket {
    fn new() -> Bucket {
        // The production profile sets object_lock_days.
        let env = snapfix::Env::new(true);
        Bucket {
            endpoint: env.cfg.endpoint.clone().unwrap(),
            bucket: env.cfg.bucket.clone(),
            secrets: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, verb: &[&str], extra: &[&str]) -> std::process::Output {
        imgbuild()
            .current_dir(repo())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_PROFILE")
            .args(verb)
            .args(["services", "--secrets"])
            .arg(self.secrets.path())
            .args([
                "--endpoint",
                &self.endpoint,
                "--bucket",
                &self.bucket,
                "--prefix",
                "first/vps1",
            ])
            .args(extra)
            .output()
            .unwrap()
    }

    fn marker_exists(&self) -> bool {
        let cfg = imgbuild::snapshot::StoreConfig {
            bucket: self.bucket.clone(),
            prefix: "first/vps1".into(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: None,
            object_lock_days: None,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        };
        snapfix::rt().block_on(async {
            let store = imgbuild::snapshot::Store::connect(&cfg).await.unwrap();
            store
                .exists(&imgbuild::snapshot::marker::key("first/vps1"))
                .await
                .unwrap()
        })
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn init_marks_an_empty_prefix_once_and_never_one_with_snapshots() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let b = Bucket::new();
    let o = b.run(&["init"], &["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["marker"], "written", "{v}");
    assert_eq!(v["host"], "vps1");
    assert!(b.marker_exists());
    // The keys `init` created are the host's: the same ones `keys` reports.
    assert!(b.secrets.path().join("vps1/snapshot-signing.key").is_file());
    // Again: nothing new, says so.
    let o = b.run(&["init"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("empty-start marker existed"),
        "{}",
        text(&o)
    );

    // The drill knows a first deployment has nothing to drill yet (before any boot).
    let o = b.run(&["drill"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("only the empty-start marker") && text(&o).contains("first backup"),
        "{}",
        text(&o)
    );

    // A backup from the workstation publishes a snapshot and removes the marker.
    let data = tempfile::tempdir().unwrap();
    let profile = std::fs::read_to_string(repo().join("profiles/services.toml")).unwrap();
    for v in profile
        .lines()
        .filter_map(|l| l.strip_prefix("[volumes.")?.strip_suffix(']'))
    {
        std::fs::create_dir_all(data.path().join(v)).unwrap();
    }
    std::fs::write(data.path().join("caddy-data/x"), b"x").unwrap();
    let o = b.run(&["backup"], &["--from", data.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !b.marker_exists(),
        "the first snapshot must remove the marker"
    );
    // Now the prefix holds a snapshot: init refuses and writes nothing.
    let o = b.run(&["init"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("already holds 1 snapshot"),
        "{}",
        text(&o)
    );
    assert!(!b.marker_exists());
}
