//! The drill's read-only gateway against a real S3 server (moto on 127.0.0.1): the
//! calls a restore makes pass through (paged listings, GetObject, ranges, HEAD), a
//! whole restore works through it, and every write or out-of-prefix read is refused,
//! counted, and leaves the bucket exactly as it was.

#[path = "snapshot-fixtures/common.rs"]
mod snapfix;

use imgbuild::drill::gateway::Gateway;
use imgbuild::snapshot::restore::{self, RestoreOptions};
use imgbuild::snapshot::{Store, StoreConfig};
use snapfix::Env;

fn status<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// A client of the gateway, as the guest's is: path style, credentials it ignores.
async fn through(env: &Env, gw: &Gateway) -> Store {
    let creds = env.dir.path().join("dummy.env");
    std::fs::write(
        &creds,
        "AWS_ACCESS_KEY_ID=nobody\nAWS_SECRET_ACCESS_KEY=nothing\n",
    )
    .unwrap();
    Store::connect(&StoreConfig {
        endpoint: Some(format!("http://127.0.0.1:{}", gw.port())),
        credentials_file: Some(creds),
        ..env.cfg.clone()
    })
    .await
    .expect("connect to the gateway")
}

#[test]
fn gateway_serves_restore_reads_and_refuses_everything_else() {
    let env = Env::new(false);
    let rt = snapfix::rt();
    let direct = rt.block_on(env.store());
    let prefix = direct.prefix.clone();
    // Objects in the host's prefix, and one beside it that must stay out of reach.
    let body: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    rt.block_on(async {
        for i in 0..5 {
            direct
                .put(
                    &format!("{prefix}/locks/l{i}"),
                    vec![i as u8; 10],
                    false,
                    None,
                )
                .await
                .unwrap();
        }
        direct
            .put(&format!("{prefix}/blob"), body.clone(), false, None)
            .await
            .unwrap();
        direct
            .put("other-host/secret", b"not yours".to_vec(), false, None)
            .await
            .unwrap();
    });
    let gw = Gateway::start(direct.clone(), rt.handle().clone()).expect("gateway");
    let before = rt.block_on(snapfix::bucket_inventory(&direct));

    rt.block_on(async {
        let g = through(&env, &gw).await;
        // Paged listing: max-keys 2 over 5 objects takes 3 pages and continuation tokens.
        let mut keys = Vec::new();
        let mut pages = g
            .client()
            .list_objects_v2()
            .bucket(&g.bucket)
            .prefix(format!("{prefix}/locks/"))
            .max_keys(2)
            .into_paginator()
            .send();
        let mut n = 0;
        while let Some(p) = pages.next().await {
            let p = p.expect("page through the gateway");
            n += 1;
            keys.extend(p.contents().iter().map(|o| o.key().unwrap().to_string()));
        }
        assert_eq!(n, 3, "pages");
        assert_eq!(
            keys,
            (0..5)
                .map(|i| format!("{prefix}/locks/l{i}"))
                .collect::<Vec<_>>()
        );
        // GetObject, HEAD, Range.
        assert_eq!(
            g.get(&format!("{prefix}/blob"), u64::MAX).await.unwrap(),
            Some(body.clone())
        );
        assert_eq!(
            g.get(&format!("{prefix}/nope"), u64::MAX).await.unwrap(),
            None
        );
        assert!(g.exists(&format!("{prefix}/blob")).await.unwrap());
        let part = g
            .client()
            .get_object()
            .bucket(&g.bucket)
            .key(format!("{prefix}/blob"))
            .range("bytes=1000-1009")
            .send()
            .await
            .expect("ranged get");
        assert_eq!(part.content_range(), Some("bytes 1000-1009/5000"));
        let got = part.body.collect().await.unwrap().into_bytes();
        assert_eq!(&got[..], &body[1000..1010]);

        // Outside the prefix: refused, not "not found".
        let e = g
            .get("other-host/secret", u64::MAX)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AccessDenied") && e.contains("403"), "{e}");
        let e = g.list("other-host/").await.unwrap_err().to_string();
        assert!(e.contains("AccessDenied"), "{e}");
        let e = g
            .get(&format!("{prefix}/../other-host/secret"), u64::MAX)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AccessDenied"), "{e}");

        // Writes of every kind: refused.
        let e = g
            .put(
                &format!("{prefix}/snapshots/new"),
                b"x".to_vec(),
                false,
                None,
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AccessDenied"), "PUT: {e}");
        let e = g
            .put(&format!("{prefix}/blob"), vec![1; 100], true, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AccessDenied"), "conditional PUT: {e}");
        assert_eq!(
            g.delete(&format!("{prefix}/blob")).await.unwrap(),
            imgbuild::snapshot::store::DeleteOutcome::Refused
        );
        let e = g
            .client()
            .create_multipart_upload()
            .bucket(&g.bucket)
            .key(format!("{prefix}/big"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(403), "multipart upload");
        let e = g
            .client()
            .delete_bucket()
            .bucket(&g.bucket)
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&e), Some(403));
    });
    let stats = gw.stats();
    assert!(stats.writes_refused >= 5, "{stats:?}");
    assert!(stats.reads_refused >= 3, "{stats:?}");
    assert!(
        stats.refused.iter().any(|r| r.starts_with("PUT ")),
        "{stats:?}"
    );
    assert!(
        stats.refused.iter().any(|r| r.starts_with("DELETE ")),
        "{stats:?}"
    );
    assert_eq!(stats.objects_served, 3, "{stats:?}");
    let after = rt.block_on(snapfix::bucket_inventory(&direct));
    assert_eq!(
        before, after,
        "the bucket changed behind the read-only gateway"
    );
}

#[test]
fn a_whole_restore_goes_through_the_gateway() {
    let env = Env::new(false);
    let rt = snapfix::rt();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("proof.txt"), "restored through the gateway\n").unwrap();
    std::fs::write(src.join("sub/blob"), snapfix::noise(7, 3 << 20)).unwrap();
    let direct = rt.block_on(env.store());
    let keys = env.keys();
    rt.block_on(snapfix::backup_volume(&direct, &keys, "www", &src, "test"));
    let before = rt.block_on(snapfix::bucket_inventory(&direct));
    let gw = Gateway::start(direct.clone(), rt.handle().clone()).expect("gateway");
    let out = env.path("out");
    let report = rt.block_on(async {
        let g = through(&env, &gw).await;
        let m = restore::latest_manifest(&g, &keys)
            .await
            .expect("list and load through the gateway")
            .expect("a snapshot");
        let mut opts = RestoreOptions::default();
        opts.write.owners = false;
        restore::restore(&g, &keys, &m, &out, &opts)
            .await
            .expect("restore through the gateway")
    });
    assert!(report.bytes > 3 << 20);
    assert_eq!(
        std::fs::read_to_string(out.join("www/_data/proof.txt")).unwrap(),
        "restored through the gateway\n"
    );
    assert_eq!(
        snapfix::tree_hash(&src),
        snapfix::tree_hash(&out.join("www/_data"))
    );
    let stats = gw.stats();
    assert_eq!(stats.writes_refused, 0, "{stats:?}");
    assert!(stats.bytes_served > 0 && stats.lists >= 1, "{stats:?}");
    assert_eq!(before, rt.block_on(snapfix::bucket_inventory(&direct)));
}
