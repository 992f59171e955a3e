//! `imgbuild upload` against a real S3 server (moto on 127.0.0.1): multipart, each part
//! checked, the object equal to the file, the signed manifest beside it.

#[path = "snapshot-fixtures/common.rs"]
mod snapfix;

use sha2::{Digest, Sha256};

#[test]
fn upload_streams_multipart_and_puts_the_manifest_beside_the_image() {
    let env = snapfix::Env::new(false);
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("vps1.raw");
    // 12 MiB + a tail, so 5 MiB parts give three parts, the last short.
    let data: Vec<u8> = (0..(12 * 1024 * 1024 + 12345u32))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&image, &data).unwrap();
    std::fs::write(tmp.path().join("vps1.raw.manifest.json"), b"{\"test\":1}\n").unwrap();
    std::fs::write(tmp.path().join("vps1.raw.manifest.json.sig"), b"c2ln\n").unwrap();
    let dest = format!("s3://{}/images/vps1.raw", env.cfg.bucket);
    let out = assert_cmd::Command::cargo_bin("imgbuild")
        .unwrap()
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .args([
            "upload",
            image.to_str().unwrap(),
            &dest,
            "--endpoint",
            env.cfg.endpoint.as_deref().unwrap(),
            "--part-mib",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"], data.len() as u64);
    snapfix::rt().block_on(async {
        let mut cfg = env.cfg.clone();
        cfg.prefix = String::new();
        let store = imgbuild::snapshot::Store::connect(&cfg).await.unwrap();
        let got = store
            .get("images/vps1.raw", u64::MAX)
            .await
            .unwrap()
            .expect("image object");
        assert_eq!(
            Sha256::digest(&got),
            Sha256::digest(&data),
            "uploaded object differs"
        );
        let head = store
            .client()
            .head_object()
            .bucket(&cfg.bucket)
            .key("images/vps1.raw")
            .send()
            .await
            .unwrap();
        assert!(
            head.e_tag().unwrap_or_default().ends_with("-3\""),
            "three parts: {:?}",
            head.e_tag()
        );
        assert_eq!(
            store
                .get("images/vps1.raw.manifest.json", u64::MAX)
                .await
                .unwrap()
                .unwrap(),
            b"{\"test\":1}\n"
        );
        assert!(store
            .get("images/vps1.raw.manifest.json.sig", u64::MAX)
            .await
            .unwrap()
            .is_some());
    });
}

#[test]
fn upload_rejects_a_bad_destination() {
    let out = assert_cmd::Command::cargo_bin("imgbuild")
        .unwrap()
        .args(["upload", "/dev/null", "s3://bucket-only"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("s3://bucket/key"));
}
