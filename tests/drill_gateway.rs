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

/// One HTTP/1.1 request over a fresh connection, as a guest's client would send it
/// (the raw target, so keys can be encoded any way): the status and the body
/// announced by Content-Length. `None` when the connection is
/// closed before a status line arrives.
fn raw_request(port: u16, method: &str, target: &str) -> Option<(u16, Vec<u8>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = vec![];
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; if method == "HEAD" { 0 } else { len }];
    r.read_exact(&mut body).unwrap();
    Some((status, body))
}

/// Keys travel percent-encoded, and the gateway decodes them to bytes and then UTF-8:
/// multibyte characters (raw or encoded) reach the bucket unchanged, a '%' before a
/// multibyte character is answered (it used to panic the connection's thread), and
/// an encoding that is not UTF-8 is a 400, not a different key.
#[test]
fn multibyte_keys_decode_without_panicking() {
    let env = Env::new(false);
    let rt = snapfix::rt();
    let direct = rt.block_on(env.store());
    let prefix = direct.prefix.clone();
    rt.block_on(direct.put(
        &format!("{prefix}/éé"),
        b"two e-acutes".to_vec(),
        false,
        None,
    ))
    .unwrap();
    let gw = Gateway::start(direct.clone(), rt.handle().clone()).expect("gateway");
    let bucket = &direct.bucket;

    let (status, body) =
        raw_request(gw.port(), "GET", &format!("/{bucket}/{prefix}/é%C3%A9")).expect("an answer");
    assert_eq!(status, 200);
    assert_eq!(body, b"two e-acutes");
    for target in [
        format!("/{bucket}/{prefix}/%Aé"),
        format!("/{bucket}/{prefix}/x%éé"),
        format!("/{bucket}/{prefix}/x?prefix=%2é"),
    ] {
        let got = raw_request(gw.port(), "GET", &target);
        assert!(
            matches!(got, Some((s, _)) if s == 404 || s == 403),
            "{target}: {:?}",
            got.map(|g| g.0)
        );
    }
    let (status, body) =
        raw_request(gw.port(), "GET", &format!("/{bucket}/{prefix}/%C3%28")).expect("an answer");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("UTF-8"));
    // The gateway still serves after all that.
    let (status, _) = raw_request(
        gw.port(),
        "HEAD",
        &format!("/{bucket}/{prefix}/%C3%A9%C3%A9"),
    )
    .unwrap();
    assert_eq!(status, 200);
}

/// A TCP relay in front of the S3 server that passes `hold_after` bytes of what the
/// server sends on each connection and then holds the rest back until released (or
/// 60 s pass): a bucket whose object has only partly arrived.
struct HeldBucket {
    port: u16,
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HeldBucket {
    fn start(upstream: &str, hold_after: u64) -> HeldBucket {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rel = release.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&up) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                });
                let (mut s_in, mut c_out) = (server, client);
                let rel = rel.clone();
                std::thread::spawn(move || {
                    let mut passed = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        if passed >= hold_after {
                            let until =
                                std::time::Instant::now() + std::time::Duration::from_secs(60);
                            while !rel.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                                std::thread::sleep(std::time::Duration::from_millis(20));
                            }
                        }
                        let room = if rel.load(Ordering::SeqCst) {
                            buf.len()
                        } else {
                            (hold_after.saturating_sub(passed) as usize).clamp(1, buf.len())
                        };
                        let n = match s_in.read(&mut buf[..room]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        passed += n as u64;
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        HeldBucket { port, release }
    }
}

/// Objects are streamed: while the bucket has sent only the first 4 MiB of a 24 MiB
/// object, the guest already receives its first bytes (a gateway that reads the
/// object whole before answering sends nothing until the bucket finishes). The whole
/// object and a large range then arrive intact.
#[test]
fn large_objects_stream_through_without_waiting_for_the_whole() {
    use sha2::{Digest, Sha256};
    use std::io::{BufRead, BufReader, Read, Write};
    const LEN: usize = 24 << 20;
    let env = Env::new(false);
    let rt = snapfix::rt();
    let direct = rt.block_on(env.store());
    let prefix = direct.prefix.clone();
    let key = format!("{prefix}/chunks/big");
    let data = snapfix::noise(11, LEN);
    rt.block_on(direct.put(&key, data.clone(), false, None))
        .unwrap();
    let held = HeldBucket::start(&snapfix::moto().endpoint, 4 << 20);
    let behind = rt.block_on(async {
        Store::connect(&StoreConfig {
            endpoint: Some(format!("http://127.0.0.1:{}", held.port)),
            ..env.cfg.clone()
        })
        .await
        .unwrap()
    });
    let gw = Gateway::start(behind, rt.handle().clone()).expect("gateway");

    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        s,
        "GET /{}/{key} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        direct.bucket
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect(
            "no response while the bucket is still sending: the gateway buffers whole objects",
        );
        head.push_str(&l);
        if l == "\r\n" || l.is_empty() {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {LEN}")),
        "{head}"
    );
    let mut first = vec![0u8; 1 << 20];
    r.read_exact(&mut first)
        .expect("no body while the bucket is still sending: the gateway buffers whole objects");
    assert!(
        !held.release.load(std::sync::atomic::Ordering::SeqCst),
        "the relay let go early"
    );
    held.release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    assert_eq!(first.len(), LEN);
    assert_eq!(
        Sha256::digest(&first),
        Sha256::digest(&data),
        "the streamed object differs"
    );

    // A large range, through the SDK as the guest's restore would ask.
    let (a, b) = (1_000_003usize, 20_000_010usize);
    let part = rt.block_on(async {
        let g = through(&env, &gw).await;
        let o = g
            .client()
            .get_object()
            .bucket(&g.bucket)
            .key(&key)
            .range(format!("bytes={a}-{b}"))
            .send()
            .await
            .expect("ranged get");
        assert_eq!(
            o.content_range(),
            Some(format!("bytes {a}-{b}/{LEN}").as_str())
        );
        o.body.collect().await.unwrap().into_bytes()
    });
    assert_eq!(part.len(), b - a + 1);
    assert!(part[..] == data[a..=b], "the ranged bytes differ");
    let stats = gw.stats();
    assert_eq!(stats.bytes_served, (LEN + b - a + 1) as u64, "{stats:?}");
    assert_eq!(stats.upstream_errors, 0, "{stats:?}");
}
