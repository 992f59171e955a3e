//! Shared helpers for the snapshot tests: a real moto S3 server on 127.0.0.1, key
//! files, and a tree hash that covers everything a restore must reproduce.
#![allow(dead_code)]

use imgbuild::snapshot::{Keys, Store, StoreConfig};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Moto {
    pub endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// One moto server per test binary. It is started from a thread that lives as long
/// as the process, with PR_SET_PDEATHSIG, so it dies with the test binary even when
/// the harness exits without running destructors.
pub fn moto() -> &'static Moto {
    static M: OnceLock<Moto> = OnceLock::new();
    M.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let port = free_port();
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn();
            match child {
                Ok(c) => {
                    tx.send(Ok(port)).ok();
                    let _keep = c;
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    tx.send(Err(e)).ok();
                }
            }
        });
        let port = match rx.recv().expect("moto thread") {
            Ok(p) => p,
            Err(e) => panic!(
                "cannot start moto_server ({e}). The snapshot tests need the moto S3 server: \
                 install it with `bash .ci/deps.sh` (pip moto[s3]==5.2.5 flask flask-cors)"
            ),
        };
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on 127.0.0.1:{port} within 60s; install with `bash .ci/deps.sh`"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    })
}

/// A single-node Garage (the self-hosters' S3 server) on 127.0.0.1, one per test
/// binary, with one key that owns every bucket the tests create.
pub struct Garage {
    pub endpoint: String,
    config: PathBuf,
    key_id: String,
    secret: String,
    _dir: tempfile::TempDir,
}

fn garage_cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new("garage")
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run garage ({e}). The compatibility tests need Garage 2.5: \
                 install it with `bash .ci/deps.sh --tests` (cargo install garage --version 2.5.0)"
            )
        });
    assert!(
        out.status.success(),
        "garage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory for a test server's data. The servers live in statics, which are never
/// dropped, so their directories are not removed when the test process ends: each
/// lives under `<tmp>/imgbuild-test-servers/<pid>-…`, and those of processes that are
/// gone are removed here first (a 2 GB Garage per process otherwise piles up).
pub fn server_dir() -> tempfile::TempDir {
    let base = std::env::temp_dir().join("imgbuild-test-servers");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(&base).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&base)
        .unwrap()
}

pub fn garage() -> &'static Garage {
    static G: OnceLock<Garage> = OnceLock::new();
    G.get_or_init(|| {
        let dir = server_dir();
        let (rpc, s3) = (free_port(), free_port());
        let mut secret = [0u8; 32];
        getrandom::getrandom(&mut secret).unwrap();
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{sec}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                d = dir.path().display(),
                sec = hex::encode(secret),
            ),
        )
        .unwrap();
        let cfg = config.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("garage");
            cmd.arg("-c")
                .arg(&cfg)
                .arg("server")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(c) => {
                    tx.send(Ok(())).ok();
                    let _keep = c;
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    tx.send(Err(e)).ok();
                }
            }
        });
        if let Err(e) = rx.recv().expect("garage thread") {
            panic!(
                "cannot start garage ({e}). The compatibility tests need Garage 2.5: \
                 install it with `bash .ci/deps.sh --tests` (cargo install garage --version 2.5.0)"
            );
        }
        let start = Instant::now();
        let node = loop {
            let out = Command::new("garage")
                .arg("-c")
                .arg(&config)
                .args(["node", "id", "-q"])
                .output();
            if let Some(o) = out.ok().filter(|o| o.status.success()) {
                let id = String::from_utf8_lossy(&o.stdout);
                break id.split('@').next().unwrap_or("").trim().to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "garage did not come up on 127.0.0.1:{rpc} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // `node id` reads the key file and answers before the RPC server listens; the
        // layout commands need the server (seen failing on a loaded machine).
        while std::net::TcpStream::connect(("127.0.0.1", rpc)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "garage RPC not listening on 127.0.0.1:{rpc} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        garage_cli(
            &config,
            &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
        );
        garage_cli(&config, &["layout", "apply", "--version", "1"]);
        let out = garage_cli(&config, &["key", "create", "imgbuild-tests"]);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in `garage key create` output:\n{out}"))
        };
        let (key_id, secret) = (field("Key ID:"), field("Secret key:"));
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", s3)).is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "garage S3 API not listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Garage {
            endpoint: format!("http://127.0.0.1:{s3}"),
            config,
            key_id,
            secret,
            _dir: dir,
        }
    })
}

/// A second single-node Garage on 127.0.0.1 whose log (every S3 request, one line
/// each, at its default level) goes to a file, so a benchmark can count every tool's
/// requests on the server side. (The Garage installed here is built without the
/// `metrics` feature, so its admin API serves no Prometheus metrics.)
pub struct LoggedServer<T> {
    pub server: T,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn garage_logged() -> &'static LoggedServer<Garage> {
    static G: OnceLock<LoggedServer<Garage>> = OnceLock::new();
    G.get_or_init(|| {
        let dir = server_dir();
        let log = dir.path().join("garage.log");
        LoggedServer {
            server: spawn_garage(Some(&log)),
            log,
            _dir: dir,
        }
    })
}

/// A second moto server on 127.0.0.1 whose request log (werkzeug's, one line per
/// request on stderr) goes to a file.
pub fn moto_logged() -> &'static LoggedServer<Moto> {
    static M: OnceLock<LoggedServer<Moto>> = OnceLock::new();
    M.get_or_init(|| {
        let dir = server_dir();
        let log = dir.path().join("moto.log");
        let port = free_port();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || match cmd.spawn() {
            Ok(c) => {
                tx.send(Ok(())).ok();
                let _keep = c;
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                tx.send(Err(e)).ok();
            }
        });
        if let Err(e) = rx.recv().expect("moto thread") {
            panic!("cannot start moto_server ({e}): install it with `bash .ci/deps.sh`");
        }
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on 127.0.0.1:{port} within 60s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        LoggedServer {
            server: Moto {
                endpoint: format!("http://127.0.0.1:{port}"),
            },
            log,
            _dir: dir,
        }
    })
}

/// The S3 requests logged since byte `from` of a server log written by
/// `garage_logged()` or `moto_logged()`, by the classes imgbuild counts (PUT, GET,
/// HEAD, LIST, DELETE, retention, other). Path-style requests only.
pub fn logged_requests(log: &Path, from: u64) -> BTreeMap<String, u64> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let mut out = BTreeMap::new();
    for l in text.lines() {
        // Garage: "... generic_server...: 127.0.0.1:PORT (key GK...) METHOD URI"
        // moto:   "127.0.0.1 - - [date] \"METHOD URI HTTP/1.1\" 200 -"
        let (method, uri) = if l.contains("generic_server") {
            if l.contains("in response to") {
                continue;
            }
            let Some(i) = l.rfind(" 127.0.0.1:") else {
                continue;
            };
            // "127.0.0.1:PORT (key GK...) METHOD URI": the method is the first
            // upper-case word.
            let mut w = l[i..]
                .split_whitespace()
                .skip_while(|t| !["GET", "PUT", "POST", "HEAD", "DELETE"].contains(t));
            match (w.next(), w.next()) {
                (Some(m), Some(u)) => (m.to_string(), u.to_string()),
                _ => continue,
            }
        } else if let Some(i) = l.find("] \"") {
            let mut w = l[i + 3..].split_whitespace();
            match (w.next(), w.next()) {
                (Some(m), Some(u)) => (m.to_string(), u.to_string()),
                _ => continue,
            }
        } else {
            continue;
        };
        if uri.starts_with("/moto-api") {
            continue;
        }
        let (path, query) = uri.split_once('?').unwrap_or((&uri, ""));
        let has_key = path
            .trim_start_matches('/')
            .split_once('/')
            .is_some_and(|(_, k)| !k.is_empty());
        let q = |k: &str| query.split('&').any(|p| p.split('=').next() == Some(k));
        let class = match method.as_str() {
            _ if q("retention") || q("object-lock") => "retention",
            "PUT" => "PUT",
            "POST" if q("delete") => "DELETE",
            "POST" => "PUT",
            "HEAD" => "HEAD",
            "DELETE" => "DELETE",
            "GET" if has_key && !q("uploadId") => "GET",
            "GET"
                if !has_key
                    && (query.is_empty() || q("list-type") || q("prefix") || q("versions")) =>
            {
                "LIST"
            }
            _ => "other",
        };
        *out.entry(class.to_string()).or_insert(0) += 1;
    }
    out
}

/// The current length of a server log: where the next operation's lines begin.
pub fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// Starts a single-node Garage on 127.0.0.1, its output to `log` if given.
fn spawn_garage(log: Option<&Path>) -> Garage {
    let log = log.map(Path::to_path_buf);
    let dir = server_dir();
    let (rpc, s3) = (free_port(), free_port());
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).unwrap();
    let config = dir.path().join("garage.toml");
    std::fs::write(
        &config,
        format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{sec}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n",
            d = dir.path().display(),
            sec = hex::encode(secret),
        ),
    )
    .unwrap();
    let cfg = config.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut cmd = Command::new("garage");
        cmd.arg("-c")
            .arg(&cfg)
            .arg("server")
            .stdout(Stdio::null())
            .stderr(match &log {
                Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
                None => Stdio::null(),
            });
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => {
                tx.send(Ok(())).ok();
                let _keep = c;
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                tx.send(Err(e)).ok();
            }
        }
    });
    if let Err(e) = rx.recv().expect("garage thread") {
        panic!(
            "cannot start garage ({e}). The compatibility tests need Garage 2.5: \
             install it with `bash .ci/deps.sh --tests` (cargo install garage --version 2.5.0)"
        );
    }
    let start = Instant::now();
    let node = loop {
        let out = Command::new("garage")
            .arg("-c")
            .arg(&config)
            .args(["node", "id", "-q"])
            .output();
        if let Some(o) = out.ok().filter(|o| o.status.success()) {
            let id = String::from_utf8_lossy(&o.stdout);
            break id.split('@').next().unwrap_or("").trim().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "garage did not come up on 127.0.0.1:{rpc} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    garage_cli(
        &config,
        &["layout", "assign", "-z", "dc1", "-c", "1G", &node],
    );
    garage_cli(&config, &["layout", "apply", "--version", "1"]);
    let out = garage_cli(&config, &["key", "create", "imgbuild-tests"]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in `garage key create` output:\n{out}"))
    };
    let (key_id, secret) = (field("Key ID:"), field("Secret key:"));
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", s3)).is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "garage S3 API not listening"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Garage {
        endpoint: format!("http://127.0.0.1:{s3}"),
        config,
        key_id,
        secret,
        _dir: dir,
    }
}

pub fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub secrets: PathBuf,
    pub cfg: StoreConfig,
}

impl Env {
    /// A fresh bucket (with Object Lock enabled when `lock`) and fresh host keys.
    pub fn new(lock: bool) -> Env {
        let m = moto();
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        write_keys(&secrets, 1);
        std::fs::write(
            secrets.join("s3.env"),
            "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_REGION=us-east-1\n",
        )
        .unwrap();
        let bucket = unique("bkt").to_lowercase();
        let cfg = StoreConfig {
            bucket: bucket.clone(),
            prefix: "hosts/test".into(),
            endpoint: Some(m.endpoint.clone()),
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: Some(secrets.join("s3.env")),
            object_lock_days: None,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        };
        let env = Env { dir, secrets, cfg };
        rt().block_on(async {
            let s = env.store().await;
            s.client()
                .create_bucket()
                .bucket(&bucket)
                .object_lock_enabled_for_bucket(lock)
                .send()
                .await
                .expect("create bucket");
        });
        env
    }

    /// A fresh bucket on Garage and fresh host keys. `object_lock_days` is set as a
    /// profile would set it; Garage accepts the headers and enforces nothing.
    pub fn garage(object_lock_days: Option<u32>) -> Env {
        let g = garage();
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        write_keys(&secrets, 1);
        std::fs::write(
            secrets.join("s3.env"),
            format!(
                "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_REGION=garage\n",
                g.key_id, g.secret
            ),
        )
        .unwrap();
        let bucket = unique("bkt").to_lowercase();
        garage_cli(&g.config, &["bucket", "create", &bucket]);
        garage_cli(
            &g.config,
            &[
                "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &g.key_id,
            ],
        );
        let cfg = StoreConfig {
            bucket,
            prefix: "hosts/test".into(),
            endpoint: Some(g.endpoint.clone()),
            region: String::new(),
            path_style: true,
            credentials_file: Some(secrets.join("s3.env")),
            object_lock_days,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        };
        Env { dir, secrets, cfg }
    }

    /// A fresh bucket on the Garage of `garage_logged()` and fresh host keys.
    pub fn garage_logged() -> Env {
        let g = &garage_logged().server;
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        write_keys(&secrets, 1);
        std::fs::write(
            secrets.join("s3.env"),
            format!(
                "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_REGION=garage\n",
                g.key_id, g.secret
            ),
        )
        .unwrap();
        let bucket = unique("bkt").to_lowercase();
        garage_cli(&g.config, &["bucket", "create", &bucket]);
        garage_cli(
            &g.config,
            &[
                "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &g.key_id,
            ],
        );
        let cfg = StoreConfig {
            bucket,
            prefix: "hosts/test".into(),
            endpoint: Some(g.endpoint.clone()),
            region: String::new(),
            path_style: true,
            credentials_file: Some(secrets.join("s3.env")),
            object_lock_days: None,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        };
        Env { dir, secrets, cfg }
    }

    /// A fresh bucket (no Object Lock) on the moto of `moto_logged()` and fresh keys.
    pub fn moto_logged() -> Env {
        let endpoint = moto_logged().server.endpoint.clone();
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        write_keys(&secrets, 1);
        std::fs::write(
            secrets.join("s3.env"),
            "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_REGION=us-east-1\n",
        )
        .unwrap();
        let bucket = unique("bkt").to_lowercase();
        let cfg = StoreConfig {
            bucket: bucket.clone(),
            prefix: "hosts/test".into(),
            endpoint: Some(endpoint),
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: Some(secrets.join("s3.env")),
            object_lock_days: None,
            multipart_threshold: 0,
            accept_unlocked_bucket: false,
        };
        let env = Env { dir, secrets, cfg };
        rt().block_on(async {
            let s = env.store().await;
            s.client()
                .create_bucket()
                .bucket(&bucket)
                .send()
                .await
                .expect("create bucket");
        });
        env
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.cfg).await.expect("connect")
    }

    /// For a Garage env: a new key that may only read this bucket, as an s3.env file
    /// (what a host given `from` on another host's volume carries).
    pub fn garage_read_only_env(&self, file: &Path) {
        let g = garage();
        let out = garage_cli(&g.config, &["key", "create", &unique("ro")]);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in `garage key create` output:\n{out}"))
        };
        let (id, secret) = (field("Key ID:"), field("Secret key:"));
        garage_cli(
            &g.config,
            &["bucket", "allow", "--read", &self.cfg.bucket, "--key", &id],
        );
        std::fs::write(
            file,
            format!("AWS_ACCESS_KEY_ID={id}\nAWS_SECRET_ACCESS_KEY={secret}\nAWS_REGION=garage\n"),
        )
        .unwrap();
    }

    /// A variable of this env's `s3.env` (what a host's credentials file holds).
    pub fn s3_var(&self, name: &str) -> String {
        let file = self.secrets.join("s3.env");
        let text = std::fs::read_to_string(&file).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {}", file.display()))
            .to_string()
    }

    pub fn keys(&self) -> Keys {
        Keys::load(
            &self.secrets.join("snapshot-encryption.key"),
            &self.secrets.join("snapshot-signing.key"),
        )
        .unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

impl Env {
    /// What a child test process needs to reach this bucket with these keys, as JSON
    /// for an environment variable; `source` is passed along for backups.
    pub fn child_config(&self, source: Option<&Path>) -> String {
        serde_json::json!({
            "bucket": self.cfg.bucket, "prefix": self.cfg.prefix, "region": self.cfg.region,
            "endpoint": self.cfg.endpoint, "secrets": self.secrets, "source": source,
        })
        .to_string()
    }
}

/// In a child test process started with `var` set to [`Env::child_config`]: the store
/// configuration, the keys and the `source` directory. `None` when `var` is unset (the
/// test is then not a child and does nothing).
pub fn child_target(var: &str) -> Option<(StoreConfig, Keys, Option<PathBuf>)> {
    let cfg = std::env::var(var).ok()?;
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    let secrets = PathBuf::from(s("secrets"));
    let store_cfg = StoreConfig {
        bucket: s("bucket"),
        prefix: s("prefix"),
        endpoint: Some(s("endpoint")),
        region: s("region"),
        path_style: true,
        credentials_file: Some(secrets.join("s3.env")),
        object_lock_days: None,
        multipart_threshold: 0,
        accept_unlocked_bucket: false,
    };
    let keys = Keys::load(
        &secrets.join("snapshot-encryption.key"),
        &secrets.join("snapshot-signing.key"),
    )
    .unwrap();
    Some((store_cfg, keys, v["source"].as_str().map(PathBuf::from)))
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Key files as `imgbuild keys` writes them; `seed` makes different hosts.
pub fn write_keys(dir: &Path, seed: u8) {
    std::fs::create_dir_all(dir).unwrap();
    let mut enc = [0u8; 32];
    getrandom::getrandom(&mut enc).unwrap();
    enc[0] = seed;
    let mut sk = [0u8; 32];
    getrandom::getrandom(&mut sk).unwrap();
    let signing = ed25519_dalek::SigningKey::from_bytes(&sk);
    std::fs::write(
        dir.join("snapshot-encryption.key"),
        format!("{}\n", hex::encode(enc)),
    )
    .unwrap();
    std::fs::write(
        dir.join("snapshot-signing.key"),
        format!("{}\n", hex::encode(sk)),
    )
    .unwrap();
    std::fs::write(
        dir.join("snapshot-signing.pub"),
        format!("{}\n", hex::encode(signing.verifying_key().to_bytes())),
    )
    .unwrap();
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn set_xattr(p: &Path, name: &str, val: &[u8]) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), val.as_ptr().cast(), val.len(), 0) == 0 }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible like real media.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Everything restore must reproduce, as sorted lines: type, mode, owner, mtime
/// (not atime: reading changes it), size, content hash, link target, hard-link
/// grouping, xattrs, and whether a file is sparse.
pub fn tree_hash(root: &Path) -> String {
    let mut lines = Vec::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    walk(root, root, &mut lines, &mut inodes);
    lines.sort();
    let mut h = blake3::Hasher::new();
    for l in &lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

pub fn tree_lines(root: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inodes = HashMap::new();
    walk(root, root, &mut lines, &mut inodes);
    lines.sort();
    lines
}

fn walk(root: &Path, p: &Path, out: &mut Vec<String>, inodes: &mut HashMap<(u64, u64), String>) {
    let md = std::fs::symlink_metadata(p).unwrap();
    let rel = p.strip_prefix(root).unwrap();
    let name = format!("{:?}", rel.as_os_str());
    let ft = md.file_type();
    let xattrs: BTreeMap<String, String> = list_xattrs(p);
    let mut line = format!(
        "{name} mode={:o} uid={} gid={} x={:?}",
        md.mode(),
        md.uid(),
        md.gid(),
        xattrs
    );
    line.push_str(&format!(" mtime={}.{}", md.mtime(), md.mtime_nsec()));
    if ft.is_symlink() {
        line.push_str(&format!(" -> {:?}", std::fs::read_link(p).unwrap()));
    } else if ft.is_file() {
        let first = inodes
            .entry((md.dev(), md.ino()))
            .or_insert_with(|| name.clone())
            .clone();
        let data = std::fs::read(p).unwrap();
        line.push_str(&format!(
            " size={} b3={} link={} sparse={}",
            md.len(),
            blake3::hash(&data).to_hex(),
            if first == name { "-".into() } else { first },
            md.blocks() * 512 < md.len() / 2
        ));
    } else if ft.is_fifo() {
        line.push_str(" fifo");
    }
    out.push(line);
    if ft.is_dir() {
        let mut kids: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        kids.sort();
        for k in kids {
            walk(root, &k, out, inodes);
        }
    }
}

fn list_xattrs(p: &Path) -> BTreeMap<String, String> {
    imgbuild::snapshot::fsio::read_xattrs(p).unwrap_or_default()
}

/// Builds the round-trip tree: many small files, a large file, a sparse file,
/// symlinks, hard links, empty dirs, odd names, owners and modes, a fifo, xattrs.
pub fn make_rich_tree(root: &Path) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let set_mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    std::fs::create_dir_all(root.join("small/a/b")).unwrap();
    for i in 0..600 {
        let d = if i % 3 == 0 {
            "small"
        } else if i % 3 == 1 {
            "small/a"
        } else {
            "small/a/b"
        };
        std::fs::write(
            root.join(format!("{d}/f{i:04}.txt")),
            format!("small file {i}\n").repeat(i % 17),
        )
        .unwrap();
    }
    std::fs::write(root.join("large.bin"), noise(1, 24 * 1024 * 1024 + 123)).unwrap();
    // Sparse: 256 MiB logical, three islands of data.
    {
        let mut f = std::fs::File::create(root.join("sparse.img")).unwrap();
        use std::io::{Seek, SeekFrom};
        for (off, seed) in [(0u64, 2u64), (100 << 20, 3), (200 << 20, 4)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&noise(seed, 300_000)).unwrap();
        }
        f.set_len(256 << 20).unwrap();
    }
    std::fs::create_dir_all(root.join("empty/dir/deep")).unwrap();
    std::fs::create_dir_all(root.join("links")).unwrap();
    symlink("../large.bin", root.join("links/rel")).unwrap();
    symlink("/etc/does-not-exist", root.join("links/dangling")).unwrap();
    symlink("../small", root.join("links/dir")).unwrap();
    std::fs::write(root.join("links/hard1"), b"shared by three names\n").unwrap();
    std::fs::hard_link(root.join("links/hard1"), root.join("links/hard2")).unwrap();
    std::fs::hard_link(root.join("links/hard1"), root.join("small/hard3")).unwrap();
    let odd = root.join("odd names");
    std::fs::create_dir_all(&odd).unwrap();
    for n in [
        &b"with space"[..],
        b"new\nline",
        b"tab\there",
        b"caf\xc3\xa9",
        b"latin1-\xe9\xff",
        b"-dash",
        b"*star?",
        b"quote\"'",
    ] {
        std::fs::write(odd.join(std::ffi::OsStr::from_bytes(n)), n).unwrap();
    }
    std::fs::write(root.join("empty-file"), b"").unwrap();
    let modes = root.join("modes");
    std::fs::create_dir_all(&modes).unwrap();
    for (n, m) in [
        ("m0600", 0o600),
        ("m0755", 0o755),
        ("m4755", 0o4755),
        ("m2750", 0o2750),
        ("m0000", 0o000),
        ("m0444", 0o444),
    ] {
        std::fs::write(modes.join(n), n).unwrap();
        set_mode(&modes.join(n), m);
    }
    std::fs::create_dir_all(root.join("sticky")).unwrap();
    set_mode(&root.join("sticky"), 0o1777);
    std::fs::create_dir_all(root.join("ro-dir/inner")).unwrap();
    std::fs::write(root.join("ro-dir/inner/file"), b"x").unwrap();
    set_mode(&root.join("ro-dir/inner"), 0o555);
    set_mode(&root.join("ro-dir"), 0o500);
    let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) };
    set_xattr(&root.join("large.bin"), "user.checksum", b"abc\x00\x01");
    set_xattr(&root.join("empty"), "user.dir-attr", b"v");
    if is_root() {
        let own = |p: &str, u: u32, g: u32| {
            let c = CString::new(root.join(p).as_os_str().as_bytes()).unwrap();
            // SAFETY: valid path.
            assert_eq!(unsafe { libc::lchown(c.as_ptr(), u, g) }, 0);
        };
        own("small", 1000, 1000);
        own("small/f0000.txt", 999, 999);
        own("large.bin", 70, 70);
        own("links/rel", 1234, 5678);
        own("odd names", 100_000, 100_000);
        // chown cleared setuid: set it back after.
        own("modes/m4755", 33, 33);
        set_mode(&modes.join("m4755"), 0o4755);
    }
    // Fixed times so the tree is the same at every run.
    let set_times = |p: &Path, t: i64| {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let ts = [
            libc::timespec {
                tv_sec: t,
                tv_nsec: 5,
            },
            libc::timespec {
                tv_sec: t,
                tv_nsec: 123_456_789,
            },
        ];
        // SAFETY: valid path and array.
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
    };
    set_times(&root.join("links/rel"), 1_000_000_000);
    set_times(&root.join("large.bin"), 1_600_000_000);
}

/// Seals `m` as a manifest signed for `host` (and the store's prefix) and puts it
/// under its id, as a backup publishes one.
pub async fn put_manifest(
    store: &Store,
    keys: &Keys,
    m: &imgbuild::snapshot::format::Manifest,
    host: &str,
) {
    let json = serde_json::to_vec(m).unwrap();
    let sealed = keys
        .seal_manifest(&m.id, host, &store.prefix, &json)
        .unwrap();
    let key = imgbuild::snapshot::format::snapshot_key(&store.prefix, &m.id);
    store.put(&key, sealed, false, None).await.unwrap();
}

/// Every key and ETag in the store's bucket, listed directly: what "the bucket did not
/// change" is checked against.
pub async fn bucket_inventory(store: &Store) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(&store.bucket)
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        for o in p.expect("list").contents() {
            out.insert(
                o.key().unwrap_or_default().to_string(),
                o.e_tag().unwrap_or_default().to_string(),
            );
        }
    }
    out
}

/// One snapshot of one volume (`name`, read from `root`) as `host` would take it.
pub async fn backup_volume(
    store: &Store,
    keys: &Keys,
    name: &str,
    root: &Path,
    host: &str,
) -> imgbuild::snapshot::backup::BackupReport {
    use imgbuild::snapshot::backup::{backup, BackupOptions, NoHooks, Source};
    backup(
        store,
        keys,
        &[Source {
            name: name.into(),
            root: root.to_path_buf(),
            wal_start: None,
        }],
        &mut NoHooks,
        &BackupOptions {
            host: host.into(),
            parallel: 4,
            progress: imgbuild::progress::Progress::quiet(),
            pack_target: imgbuild::snapshot::pack::PACK_TARGET,
        },
    )
    .await
    .expect("backup")
}
