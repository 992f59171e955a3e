//! The S3 client's own HTTP stack (src/snapshot/http.rs): TLS that trusts the
//! system's certificates and nothing else, and no 40 ms delayed-ACK stall on a server
//! that leaves Nagle's algorithm on (Garage's S3 API).

#[path = "snapshot-fixtures/common.rs"]
mod common;
use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests here run one at a time: one sets `SSL_CERT_FILE`, which every
/// `Store::connect` reads.
static SERIAL: Mutex<()> = Mutex::new(());

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca.pem`) and a certificate it signs for 127.0.0.1 (`<name>.pem`,
/// `<name>.key`).
fn make_pki(dir: &Path, name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    // Each CA its own name: with the same name, rustls checks the server's
    // certificate against the wrong CA and says BadSignature, not UnknownIssuer.
    let subject = format!("/CN=imgbuild test CA {name}");
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(dir, &a);
    let (key, csr, cert) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// A TLS front on 127.0.0.1 for a plain-HTTP server, as a reverse proxy in front of
/// Garage would be; returns its port. It runs until the test process ends.
fn tls_front(upstream: SocketAddr, cert: &Path, key: &Path) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake (the untrusted case) just ends this connection.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        })
    });
    port
}

#[test]
fn https_trusts_the_system_certificates_and_no_others() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new(false);
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path(), "server");
    make_pki(pki.path(), "stranger");
    let upstream: SocketAddr = env
        .cfg
        .endpoint
        .as_deref()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let port = tls_front(
        upstream,
        &pki.path().join("server.pem"),
        &pki.path().join("server.key"),
    );
    let mut cfg = env.cfg.clone();
    cfg.endpoint = Some(format!("https://127.0.0.1:{port}"));
    let keys = env.keys();
    let rt = rt();

    // Trusting another CA only: the server's certificate is refused, named as such.
    std::env::set_var("SSL_CERT_FILE", pki.path().join("stranger-ca.pem"));
    let err = rt.block_on(async {
        let store = imgbuild::snapshot::Store::connect(&cfg).await.unwrap();
        imgbuild::snapshot::restore::list_ids(&store)
            .await
            .unwrap_err()
    });
    let chain = format!("{err:?}");
    assert!(
        chain.contains("UnknownIssuer"),
        "an untrusted certificate must be refused as such, got: {chain}"
    );

    // Trusting the server's CA: a backup and a restore go through the TLS front.
    std::env::set_var("SSL_CERT_FILE", pki.path().join("server-ca.pem"));
    let src = env.path("src");
    make_rich_tree(&src);
    std::fs::write(src.join("big.bin"), noise(7, 3 << 20)).unwrap();
    let out = env.path("out");
    rt.block_on(async {
        let store = imgbuild::snapshot::Store::connect(&cfg).await.unwrap();
        backup_volume(&store, &keys, "vol", &src, "test").await;
        let m = imgbuild::snapshot::restore::latest_manifest(&store, &keys)
            .await
            .unwrap()
            .expect("a snapshot over https");
        imgbuild::snapshot::restore::restore(
            &store,
            &keys,
            &m,
            &out,
            &imgbuild::snapshot::restore::RestoreOptions::default(),
        )
        .await
        .unwrap();
    });
    assert_eq!(tree_hash(&src), tree_hash(&out.join("vol/_data")));
}

#[test]
fn a_small_get_is_not_held_back_by_a_delayed_ack() {
    // Garage 2.5 sends a response's headers and its body in two writes with Nagle on:
    // unless the client acknowledges the headers at once, every body shorter than a
    // segment waits for Linux's delayed ACK (40 ms; 43 ms measured here, against 2 ms
    // with the acknowledgement sent at once). 40 kB: Garage keeps objects under 3 KiB
    // in its metadata and sends those with the headers, so they never stall.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::garage(None);
    let rt = rt();
    let median = |mut t: Vec<Duration>| {
        t.sort();
        t[t.len() / 2]
    };
    let (ours, sdk) = rt.block_on(async {
        let store = env.store().await;
        let key = format!("{}/small", store.prefix);
        store
            .put(&key, noise(3, 40_000), false, None)
            .await
            .unwrap();
        let mut ours = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            let got = store.get(&key, 1 << 20).await.unwrap().unwrap();
            ours.push(t.elapsed());
            assert_eq!(got.len(), 40_000);
        }
        // The control: the SDK's own client, which does not acknowledge at once,
        // against the same server and object. Without the stall showing here, the
        // check above would prove nothing.
        let sdk = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .endpoint_url(env.cfg.endpoint.as_deref().unwrap())
                .region(aws_sdk_s3::config::Region::new(env.s3_var("AWS_REGION")))
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    env.s3_var("AWS_ACCESS_KEY_ID"),
                    env.s3_var("AWS_SECRET_ACCESS_KEY"),
                    None,
                    None,
                    "test",
                ))
                .force_path_style(true)
                .build(),
        );
        let mut theirs = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            let r = sdk
                .get_object()
                .bucket(&store.bucket)
                .key(&key)
                .send()
                .await
                .unwrap();
            let got = r.body.collect().await.unwrap().into_bytes();
            theirs.push(t.elapsed());
            assert_eq!(got.len(), 40_000);
        }
        (ours, theirs)
    });
    eprintln!("40 kB GETs: ours {ours:?}, the SDK client's {sdk:?}");
    assert!(
        median(sdk.clone()) >= Duration::from_millis(30),
        "the SDK's client did not stall ({sdk:?}): this check no longer shows anything"
    );
    // The median: one slow GET on a busy machine says nothing; a stall hits most.
    assert!(
        median(ours.clone()) < Duration::from_millis(25),
        "small GETs took {ours:?}: the delayed-ACK stall is back"
    );
}
