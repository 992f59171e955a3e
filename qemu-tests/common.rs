//! Shared by the image and boot tests: a host tree like the renderer's (quadlet, ssh,
//! nftables, readiness unit), a tiny OCI image made from busybox-static, keys, builds.
//!
//! Tests never skip: a missing tool fails with the command that installs it.
#![allow(dead_code)]

use imgbuild::hostconfig::HostConfig;
use imgbuild::image::{self, DiskFormat, ImageReport, ImageRequest};
use imgbuild::progress::Progress;
use imgbuild::tree::{HostTree, User};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const HOST: &str = "qemutest";
pub const HELLO_REF: &str = "localhost/hello:1";
pub const HELLO_ARCHIVE: &str = "/usr/share/imgbuild/images/hello.oci.tar";
pub const HELLO_BODY: &str = "hello from imgbuild";
/// Guest port the quadlet publishes (opened in nftables).
pub const HELLO_PORT: u16 = 8080;
/// Guest port a host service listens on that nftables does NOT open.
pub const CLOSED_PORT: u16 = 9090;

pub fn require(tool: &str, install: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is required by this test; install it with: {install} (or run .ci/deps.sh)");
}

pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

pub fn base_def() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian-trixie.toml")
}

pub fn signing_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[42u8; 32])
}

pub struct Keys {
    pub host_key: String,
    pub host_pub: String,
    pub admin_pub: String,
}

/// Fixed keys (generated once per scratch dir with ssh-keygen), so two builds of the
/// test tree are the same inputs.
pub fn keys(dir: &Path) -> Keys {
    let keygen = require("ssh-keygen", "sudo apt-get install openssh-client");
    let gen = |name: &str| {
        let p = dir.join(name);
        if !p.exists() {
            let st = Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(&p)
                .status()
                .expect("run ssh-keygen");
            assert!(st.success(), "ssh-keygen failed");
        }
        (
            std::fs::read_to_string(&p).expect("read key"),
            std::fs::read_to_string(p.with_extension("pub")).expect("read pub key"),
        )
    };
    let (host_key, host_pub) = gen("host_ed25519");
    let (_, admin_pub) = gen("admin_ed25519");
    Keys {
        host_key,
        host_pub,
        admin_pub,
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// One entry of an OCI image layer.
pub enum LayerEntry {
    Dir(String),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
}

/// An OCI archive with one uncompressed layer, named with a full reference so podman
/// keeps that name when it loads it. `config` is the image config's `config` object
/// (Entrypoint, Cmd...).
pub fn oci_archive(out: &Path, reference: &str, entries: &[LayerEntry], config: serde_json::Value) {
    let mut layer = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_735_689_600);
        match e {
            LayerEntry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                layer.append_data(&mut h, p, &b""[..]).expect("layer dir");
            }
            LayerEntry::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                layer.append_data(&mut h, p, &data[..]).expect("layer file");
            }
            LayerEntry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                layer.append_link(&mut h, p, target).expect("layer link");
            }
        }
    }
    let layer = layer.into_inner().expect("layer tar");
    oci_archive_from_layer(out, reference, &layer, config);
}

/// An OCI archive (what `Image=oci-archive:` loads) of one prepared layer tar.
pub fn oci_archive_from_layer(
    out: &Path,
    reference: &str,
    layer: &[u8],
    config: serde_json::Value,
) {
    let layer_d = sha256_hex(layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2025-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_d}")]},
    });
    let config = serde_json::to_vec(&config).expect("config json");
    let config_d = sha256_hex(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_d}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_d}"), "size": layer.len()}],
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_d = sha256_hex(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_d}"), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": reference}}],
    });
    let index = serde_json::to_vec(&index).expect("index json");
    let f = std::fs::File::create(out).expect("create oci archive");
    let mut ar = tar::Builder::new(f);
    let mut put = |path: &str, data: &[u8], dir: bool| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_mtime(1_735_689_600);
        h.set_size(data.len() as u64);
        ar.append_data(&mut h, path, data).expect("oci entry");
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, false);
    put("index.json", &index, false);
    put("blobs", b"", true);
    put("blobs/sha256", b"", true);
    put(&format!("blobs/sha256/{manifest_d}"), &manifest, false);
    put(&format!("blobs/sha256/{config_d}"), &config, false);
    put(&format!("blobs/sha256/{layer_d}"), layer, false);
    ar.into_inner().expect("finish oci archive");
}

/// busybox-static as /bin/busybox with the applets images' health checks use.
pub fn busybox_entries() -> Vec<LayerEntry> {
    let busybox = require("busybox", "sudo apt-get install busybox-static");
    let bb = std::fs::read(&busybox).expect("read busybox");
    let mut v = vec![
        LayerEntry::Dir("bin".into()),
        LayerEntry::File("bin/busybox".into(), 0o755, bb),
    ];
    for applet in ["sh", "wget", "cat", "ls"] {
        v.push(LayerEntry::Symlink(
            format!("bin/{applet}"),
            "busybox".into(),
        ));
    }
    v
}

/// A tiny OCI image: busybox-static serving a web root.
pub fn hello_archive(out: &Path) {
    let mut entries = busybox_entries();
    entries.push(LayerEntry::Dir("www".into()));
    entries.push(LayerEntry::File(
        "www/index.html".into(),
        0o644,
        format!("{HELLO_BODY}\n").into_bytes(),
    ));
    oci_archive(
        out,
        HELLO_REF,
        &entries,
        // busybox httpd runs as PID 1, where SIGTERM is ignored: without a stop signal
        // it dies of, every `systemctl stop` would wait podman's 10 s timeout, which is
        // this test image's quirk, not what a `stop` backup costs a real app.
        serde_json::json!({
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", HELLO_PORT.to_string(), "-h", "/www"],
            "StopSignal": "SIGKILL",
        }),
    );
}

/// An OCI image of a dynamically linked binary from the build machine (a Debian
/// package's), with the libraries `ldd` names and busybox for health checks. The binary
/// becomes `/bin/<name>` and the entrypoint; `extra` files (host path, image path) come
/// along (Debian's builds read some assets from /usr/share).
pub fn binary_archive(
    out: &Path,
    reference: &str,
    binary: &Path,
    name: &str,
    extra: &[(PathBuf, &str)],
) {
    let ldd = require("ldd", "sudo apt-get install libc-bin");
    let o = Command::new(ldd).arg(binary).output().expect("run ldd");
    assert!(o.status.success(), "ldd {} failed", binary.display());
    let mut entries = busybox_entries();
    entries.push(LayerEntry::File(
        format!("bin/{name}"),
        0o755,
        std::fs::read(binary).expect("read binary"),
    ));
    let mut dirs = std::collections::BTreeSet::new();
    let mut libs = vec![];
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        let Some(path) = path else { continue };
        let real = std::fs::canonicalize(path).expect("resolve library");
        let rel = path.trim_start_matches('/').to_string();
        let mut parent = Path::new(&rel).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        libs.push(LayerEntry::File(
            rel,
            0o755,
            std::fs::read(real).expect("read library"),
        ));
    }
    entries.extend(dirs.into_iter().map(LayerEntry::Dir));
    entries.extend(libs);
    entries.push(LayerEntry::Dir("etc".into()));
    entries.push(LayerEntry::File(
        "etc/nsswitch.conf".into(),
        0o644,
        b"hosts: files dns\n".to_vec(),
    ));
    entries.push(LayerEntry::Dir("tmp".into()));
    let mut extra_dirs = std::collections::BTreeSet::new();
    for (src, dst) in extra {
        let dst = dst.trim_start_matches('/');
        let mut parent = Path::new(dst).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            extra_dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        let data = std::fs::read(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
        entries.push(LayerEntry::File(dst.to_string(), 0o644, data));
    }
    // Parents first, as in any tar podman unpacks.
    let files = entries.split_off(entries.len() - extra.len());
    entries.extend(extra_dirs.into_iter().map(LayerEntry::Dir));
    entries.extend(files);
    oci_archive(
        out,
        reference,
        &entries,
        serde_json::json!({"Entrypoint": [format!("/bin/{name}")]}),
    );
}

pub const HELLO_CONTAINER: &str = "hello.container";

pub fn quadlets() -> Vec<(String, String)> {
    vec![(
        HELLO_CONTAINER.to_string(),
        format!(
            "[Unit]\nDescription=hello (imgbuild test)\n\n[Container]\n\
             Image=oci-archive:{HELLO_ARCHIVE}\nContainerName=hello\n\
             PublishPort={HELLO_PORT}:{HELLO_PORT}\n\n[Service]\nRestart=on-failure\n\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
    )]
}

/// What the services profile renders, reduced to one quadlet: enough to exercise every
/// path of the image (secrets, users, enabled units, quadlets, firewall, readiness).
pub fn test_tree(keys: &Keys) -> HostTree {
    let mut t = HostTree::new(HOST);
    let cfg = HostConfig {
        host: HOST.into(),
        env: "test".into(),
        units: vec!["hello.service".into()],
        backup: None,
        metrics_dir: "/var/lib/prometheus/node-exporter".into(),
    };
    t.file(
        "/etc/imgbuild/host.toml",
        0o644,
        toml::to_string(&cfg).expect("host config toml"),
    )
    .unwrap();
    for (name, body) in quadlets() {
        t.file(&format!("/etc/containers/systemd/{name}"), 0o644, body)
            .unwrap();
    }
    // Netavark defaults to iptables, which the base does not ship.
    t.file(
        "/etc/containers/containers.conf.d/50-imgbuild.conf",
        0o644,
        "[network]\nfirewall_driver = \"nftables\"\n",
    )
    .unwrap();
    t.file(
        "/etc/nftables.conf",
        0o755,
        format!(
            "#!/usr/sbin/nft -f\nflush ruleset\n\ntable inet filter {{\n  chain input {{\n    \
             type filter hook input priority filter; policy drop;\n    iif lo accept\n    \
             ct state established,related accept\n    ct state invalid drop\n    \
             meta l4proto {{ icmp, ipv6-icmp }} accept\n    tcp dport {{ 22, {HELLO_PORT} }} accept\n  }}\n}}\n"
        ),
    )
    .unwrap();
    t.file(
        "/etc/ssh/sshd_config.d/50-imgbuild.conf",
        0o644,
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin no\n",
    )
    .unwrap();
    t.secret_file(
        "/etc/ssh/ssh_host_ed25519_key",
        0o600,
        "root",
        "root",
        keys.host_key.clone(),
    )
    .unwrap();
    t.file(
        "/etc/ssh/ssh_host_ed25519_key.pub",
        0o644,
        keys.host_pub.clone(),
    )
    .unwrap();
    t.file(
        "/etc/systemd/system/imgbuild-ready.service",
        0o644,
        READY_UNIT,
    )
    .unwrap();
    t.enable("imgbuild-ready.service", "multi-user.target");
    // A host service on a port the firewall does not open: proves "closed" means the
    // firewall, not an absent listener.
    let bb = std::fs::read(require("busybox", "sudo apt-get install busybox-static"))
        .expect("read busybox");
    t.file("/usr/local/bin/busybox", 0o755, bb).unwrap();
    t.file("/usr/local/share/closed-www/index.html", 0o644, "closed\n")
        .unwrap();
    t.file(
        "/etc/systemd/system/imgbuild-test-listener.service",
        0o644,
        format!(
            "[Unit]\nDescription=listener on a port nftables keeps closed\n\n[Service]\n\
             ExecStart=/usr/local/bin/busybox httpd -f -p {CLOSED_PORT} -h /usr/local/share/closed-www\n\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
    )
    .unwrap();
    t.enable("imgbuild-test-listener.service", "multi-user.target");
    t.file("/usr/local/libexec/imgbuild-test-probe", 0o755, PROBE)
        .unwrap();
    t.file(
        "/etc/systemd/system/imgbuild-test-probe.service",
        0o644,
        "[Unit]\nDescription=imgbuild boot test probe\nAfter=imgbuild-ready.service\n\n\
         [Service]\nType=oneshot\nExecStart=/usr/local/libexec/imgbuild-test-probe\n",
    )
    .unwrap();
    // Pulled in by the readiness unit, not by multi-user.target: the readiness unit is
    // ordered after multi-user.target, so a unit both wanted by that target and ordered
    // after readiness would form a cycle systemd breaks by dropping a job.
    t.enable("imgbuild-test-probe.service", "imgbuild-ready.service");
    t.users.push(User {
        name: "admin".into(),
        uid: 1000,
        groups: vec!["sudo".into()],
        home: "/var/home/admin".into(),
        shell: "/bin/bash".into(),
        ssh_authorized_keys: vec![keys.admin_pub.trim().to_string()],
    });
    t.ready_units.insert("hello.service".into());
    t
}

/// The unit the renderer is asked to emit (see docs/image.md).
pub const READY_UNIT: &str = "[Unit]\nDescription=imgbuild: report readiness on the console\n\
After=multi-user.target\n\n[Service]\nType=oneshot\nExecStart=/usr/bin/imgbuild ready\n\
RemainAfterExit=yes\nTimeoutStartSec=infinity\nStandardOutput=journal\n\n\
[Install]\nWantedBy=multi-user.target\n";

const PROBE: &str = r#"#!/bin/sh
# Facts the boot test cannot see from outside, printed on the serial console.
exec >/dev/console 2>&1
if touch /usr/imgbuild-probe 2>/dev/null; then echo "PROBE usr=writable"; else echo "PROBE usr=readonly"; fi
echo "PROBE var_source=$(findmnt -no SOURCE /var)"
echo "PROBE var_bytes=$(df -B1 --output=size /var | tail -n 1 | tr -d ' ')"
echo "PROBE volumes_fs=$(findmnt -no FSTYPE /var/lib/containers/storage/volumes)"
echo "PROBE volumes_bytes=$(df -B1 --output=size /var/lib/containers/storage/volumes | tail -n 1 | tr -d ' ')"
echo "PROBE listener=$(/usr/local/bin/busybox wget -q -O - http://127.0.0.1:9090/ 2>&1 | head -n 1)"
echo "PROBE failed_units=$(systemctl list-units --state=failed --no-legend --plain | wc -l)"
systemctl list-units --state=failed --no-legend --plain | sed 's/^/PROBE failed: /'
for u in $(systemctl list-units --state=failed --no-legend --plain | cut -d' ' -f1); do
  journalctl -b -u "$u" --no-pager -n 12 -o cat | sed "s|^|PROBE log $u: |"
done
echo "PROBE done"
"#;

pub fn build(
    tree: &HostTree,
    out: &Path,
    format: DiskFormat,
    helper: &Path,
    baked: Vec<(String, PathBuf)>,
) -> ImageReport {
    let key = signing_key();
    let req = ImageRequest {
        tree,
        out: out.to_path_buf(),
        format,
        base_def: base_def(),
        refresh_base: false,
        signing_key: &key,
        profile_digest: "test-profile".into(),
        baked_images: baked,
        helper_binary: helper.to_path_buf(),
        progress: Progress::detect(false),
        cache_dir: None,
        mirror: None,
    };
    match image::build(&req) {
        Ok(r) => r,
        Err(e) => panic!("image build failed: {e}"),
    }
}

pub fn sha256_file(p: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// A free TCP port on 127.0.0.1 for a QEMU host forward.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port on 127.0.0.1")
}

/// Sends `GET path` and returns whatever came back before EOF or the timeout.
pub fn http_get(port: u16, path: &str, timeout: std::time::Duration) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)
    else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes());
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A copy of the helper binary without debug info (most of a debug build's size).
pub fn strip(src: &Path, dir: &Path) -> PathBuf {
    let dst = dir.join("imgbuild-helper");
    let st = Command::new(require("objcopy", "sudo apt-get install binutils"))
        .arg("--strip-debug")
        .arg(src)
        .arg(&dst)
        .status()
        .expect("run objcopy");
    assert!(st.success(), "objcopy --strip-debug failed");
    dst
}

/// A minimal libtest-like runner for `harness = false` test binaries: `--list` lists,
/// free arguments filter by substring, tests run one at a time (each boots a VM).
pub fn run_tests(tests: &[(&str, fn())]) {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (name, f) in tests {
        if filters.is_empty() || filters.iter().any(|p| name.contains(p.as_str())) {
            eprintln!("test {name} ...");
            f();
            println!("test {name} ... ok");
        }
    }
}

/// Runs `script` as the admin user over SSH on a guest's forwarded port (the key is
/// `admin_ed25519` in `dir`, see `keys`) and returns stdout and stderr. Fails the test
/// when the script fails.
pub fn ssh(dir: &Path, port: u16, script: &str) -> String {
    let (ok, out) = ssh_status(dir, port, script);
    assert!(ok, "ssh `{script}` failed:\n{out}");
    out
}

/// Like `ssh`, but returns whether the script succeeded instead of failing the test.
pub fn ssh_status(dir: &Path, port: u16, script: &str) -> (bool, String) {
    let o = Command::new(require("ssh", "sudo apt-get install openssh-client"))
        .arg("-i")
        .arg(dir.join("admin_ed25519"))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
            "-p",
        ])
        .arg(port.to_string())
        .arg("admin@127.0.0.1")
        .arg(script)
        .output()
        .expect("ssh");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

/// Creates `bucket` on the S3 server at `endpoint` (moto: any credentials work).
pub fn create_bucket(endpoint: &str, bucket: &str) {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let cfg = imgbuild::snapshot::StoreConfig {
            bucket: bucket.to_string(),
            endpoint: Some(endpoint.to_string()),
            region: "us-east-1".into(),
            path_style: true,
            ..Default::default()
        };
        let s = imgbuild::snapshot::Store::connect(&cfg)
            .await
            .expect("connect to S3");
        s.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create bucket");
    });
}

/// The port of an `http://127.0.0.1:PORT` endpoint.
pub fn endpoint_port(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("endpoint port")
}

/// `imgbuild build PROFILE --overlay … --secrets … --helper … --out …` plus `extra`, as a
/// user would run it; its output goes to the test's stderr, and failure fails the test.
pub fn cli_build(
    profile: &Path,
    overlay: &Path,
    secrets: &Path,
    helper: &Path,
    out: &Path,
    extra: &[&str],
) {
    let st = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
        .arg("build")
        .arg(profile)
        .arg("--overlay")
        .arg(overlay)
        .arg("--secrets")
        .arg(secrets)
        .arg("--helper")
        .arg(helper)
        .arg("--out")
        .arg(out)
        .args(extra)
        .status()
        .expect("run imgbuild build");
    assert!(
        st.success(),
        "imgbuild build {} failed (its output is above)",
        profile.display()
    );
}

/// Cuts a test guest off from everything (`restrict=on`: no DNS, NTP or route out of
/// the user-mode network) except the servers the test started on 127.0.0.1, which the
/// guest reaches as 10.0.2.2:<same port>. One relay process per guest connection (the
/// restore fetches in parallel), through `imgbuild drill-relay`.
pub fn isolate(opts: &mut imgbuild::qemu::RunOptions, host_ports: &[u16]) {
    opts.restrict = true;
    opts.host_address = Some(std::net::Ipv4Addr::new(10, 0, 2, 254));
    let exe = env!("CARGO_BIN_EXE_imgbuild");
    opts.guest_forward_cmds = host_ports
        .iter()
        .map(|p| {
            (
                std::net::Ipv4Addr::new(10, 0, 2, 2),
                *p,
                format!("'{}' drill-relay {p}", exe.replace('\'', "'\\''")),
            )
        })
        .collect();
}

/// `secrets/vps1/s3.env` with the moto credentials; returns the secrets root.
pub fn moto_secrets(dir: &Path) -> PathBuf {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(secrets.join("vps1")).expect("secrets dir");
    std::fs::write(
        secrets.join("vps1/s3.env"),
        "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_REGION=us-east-1\n",
    )
    .expect("write s3.env");
    secrets
}

/// The start of a test overlay for the services profile: only the test's admin key and
/// a backup to moto (reached as 10.0.2.2:`port`); `backup_extra` adds keys to
/// [backup]. Containers and volumes follow.
pub fn overlay_head(
    admin_pub: &str,
    bucket: &str,
    prefix: &str,
    port: u16,
    backup_extra: &str,
) -> String {
    format!(
        "replace = [\"containers\", \"volumes\", \"networks\", \"proxy\", \"backup\", \"admin\"]\n\n\
         [admin]\nuser = \"admin\"\nssh_keys = [\"{}\"]\n\n\
         [backup]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"http://10.0.2.2:{port}\"\nregion = \"us-east-1\"\n\
         keep = {{ last = 3 }}\n{backup_extra}\n",
        admin_pub.trim()
    )
}
