//! The two-host setup end to end: the real services and monitoring profiles (test
//! overlays swap the apps for the real Prometheus, Alertmanager and node-exporter
//! binaries from Debian's packages, packed as OCI archives) boot side by side, joined by
//! a private QEMU datagram LAN on 127.0.0.1 that carries only their WireGuard tunnel.
//!
//! Checked on the running pair: the tunnel handshakes in both directions; Prometheus on
//! the monitoring host scrapes the services host's node-exporter over the tunnel; from
//! the services host the monitoring host's service ports are closed on the LAN and open
//! on the tunnel, and the services host's metrics are reachable only on its tunnel
//! address; a backup made to fail on a short schedule fires BackupFailed in
//! Alertmanager, which delivers it to a webhook receiver on the test machine.

#[path = "common.rs"]
mod common;
#[path = "../tests/snapshot-fixtures/common.rs"]
mod snapfix;

use common::*;
use imgbuild::qemu::{self, LanNic, RunOptions, SerialTarget};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Both guests boot at once on two cores under TCG: each is slower than alone.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
const TOOLS: &str = "/usr/local/lib/imgbuild-tools/usr/bin";
const LAN_SERVICES: &str = "192.168.77.1";
const LAN_MONITORING: &str = "192.168.77.2";
const WG_SERVICES: &str = "10.8.0.1";
const WG_MONITORING: &str = "10.8.0.2";

fn main() {
    run_tests(&[(
        "two_hosts_tunnel_scrape_firewall_and_backup_alert",
        two_hosts_tunnel_scrape_firewall_and_backup_alert,
    )]);
}

fn tool(name: &str) -> PathBuf {
    let p = Path::new(TOOLS).join(name);
    assert!(
        p.is_file(),
        "{} is required by this test (the binary from Debian's package); install it with: bash .ci/deps.sh",
        p.display()
    );
    p
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free UDP port on 127.0.0.1")
}

/// An HTTP receiver on 127.0.0.1 that keeps every request body (Alertmanager's webhook
/// notifications) and answers 200.
fn webhook() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind webhook");
    let port = l.local_addr().expect("webhook addr").port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = BufReader::new(&conn);
            let mut len = 0usize;
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_ok() {
                sink.lock()
                    .expect("webhook lock")
                    .push(String::from_utf8_lossy(&body).into_owned());
            }
            let _ = (&conn)
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, got)
}

/// A copy of a real profile with a `qemu` environment that only moves its WireGuard
/// endpoint onto the test LAN: peers read endpoints from each other's profiles, so this
/// must be an environment (loaded for the peer too), not a build overlay.
fn profile_copy(dir: &Path, name: &str, endpoint: &str) -> PathBuf {
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("profiles")
        .join(format!("{name}.toml"));
    let mut text = std::fs::read_to_string(&real).expect("read profile");
    text.push_str(&format!(
        "\n[environments.qemu]\nwireguard = {{ endpoint = \"{endpoint}:51820\" }}\n"
    ));
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("write profile copy");
    p
}

fn lan_file(mac: &str, addr: &str) -> String {
    format!(
        "[files.\"/etc/systemd/network/05-qemu-lan.network\"]\n\
         content = \"\"\"\n[Match]\nMACAddress={mac}\n\n[Network]\nAddress={addr}/24\n\"\"\"\n\n"
    )
}

fn backup_section(bucket: &str, prefix: &str, s3_port: u16, extra: &str) -> String {
    format!(
        "[backup]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"http://10.0.2.2:{s3_port}\"\n\
         region = \"us-east-1\"\nrestore = \"allow-empty\"\nrestore_timeout = 120\nkeep = {{ last = 3 }}\n{extra}\n"
    )
}

fn node_exporter(archive: &Path, wg_addr: &str) -> String {
    format!(
        "[containers.node-exporter]\nimage = \"localhost/node-exporter:1.5.0\"\nbake = \"{}\"\nhost_network = true\n\
         command = [\"--path.rootfs=/host\", \"--web.listen-address={wg_addr}:9100\", \"--collector.systemd\", \"--collector.textfile.directory=/host/var/lib/imgbuild/metrics\"]\n\
         volumes = [\"/:/host:ro\", \"/run/dbus/system_bus_socket:/var/run/dbus/system_bus_socket:ro\"]\n\
         metrics_port = 9100\n\n",
        archive.display()
    )
}

struct Guest {
    name: &'static str,
    vm: qemu::Vm,
    serial: PathBuf,
    ssh_port: u16,
}

fn start(
    name: &'static str,
    image: &Path,
    serial: PathBuf,
    lan: LanNic,
    host_ports: &[u16],
) -> Guest {
    let _ = std::fs::remove_file(&serial);
    let mut opts = RunOptions::new(image);
    opts.serial = SerialTarget::File(serial.clone());
    let ssh_port = free_port();
    opts.ssh_port = Some(ssh_port);
    // One vCPU each: two TCG guests on a two-core machine.
    opts.cpus = 1;
    opts.lans = vec![lan];
    isolate(&mut opts, host_ports);
    // A provider's disk is bigger than the image: /var grows into it at first boot, and
    // the daemons' images (Prometheus alone is 100 MB) are unpacked there.
    opts.disk_size = Some(4 << 30);
    let vm = qemu::start(&opts).expect("start qemu");
    Guest {
        name,
        vm,
        serial,
        ssh_port,
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn wait_ready(g: &mut Guest, host: &str) -> Duration {
    let (seen, log) = qemu::wait_for_serial(
        &mut g.vm,
        &g.serial,
        &format!("imgbuild: {host} "),
        BOOT_TIMEOUT,
    )
    .expect("serial");
    if !(seen && log.contains(&format!("imgbuild: {host} ready ("))) {
        // The console says which units failed; their journal says why.
        let dir = g.serial.parent().expect("scratch dir");
        let (_, journal) = ssh_status(
            dir,
            g.ssh_port,
            "sudo systemctl --no-pager --failed; sudo journalctl -b --no-pager -o cat \
             -u 'prometheus*' -u 'alertmanager*' -u 'node-exporter*' -u 'web*' -u 'imgbuild*' | tail -n 120",
        );
        panic!(
            "{} not ready within {BOOT_TIMEOUT:?}:\n{}\n--- journal ---\n{journal}",
            g.name,
            tail(&log, 40)
        );
    }
    g.vm.started.elapsed()
}

/// An HTTP GET made inside a guest with bash's /dev/tcp (the base has no curl): the
/// request comes from the guest itself, so it exercises the guest's routes and firewall.
fn guest_http(dir: &Path, g: &Guest, addr: &str, port: u16, path: &str) -> String {
    ssh(
        dir,
        g.ssh_port,
        &format!(
            "timeout 20 bash -c 'exec 3<>/dev/tcp/{addr}/{port}; \
             printf \"GET {path} HTTP/1.0\\r\\nHost: {addr}\\r\\n\\r\\n\" >&3; cat <&3'"
        ),
    )
}

/// Whether a TCP connection from inside the guest to addr:port completes within 4 s.
fn guest_connects(dir: &Path, g: &Guest, addr: &str, port: u16) -> bool {
    let out = ssh(
        dir,
        g.ssh_port,
        &format!("if timeout 4 bash -c '</dev/tcp/{addr}/{port}' 2>/dev/null; then echo OPEN; else echo SHUT; fi"),
    );
    out.contains("OPEN")
}

fn poll<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_or(what, timeout, f, String::new)
}

/// `poll`, and on timeout the failure message carries what `diag` gathers.
fn poll_or<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    diag: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", diag());
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(resp)
}

fn two_hosts_tunnel_scrape_firewall_and_backup_alert() {
    require(
        "qemu-system-x86_64",
        "sudo apt-get install -t bookworm-backports qemu-system-x86 ovmf",
    );
    let t0 = Instant::now();
    let dir = scratch("qemu-monitoring");
    let keys = keys(&dir);
    let moto = snapfix::moto();
    let s3_port = endpoint_port(&moto.endpoint);
    let bucket = snapfix::unique("twohosts").to_lowercase();
    create_bucket(&moto.endpoint, &bucket);
    let (hook_port, notifications) = webhook();

    // OCI archives of the real daemons, from Debian's package binaries.
    let prom = dir.join("prometheus.oci.tar");
    binary_archive(
        &prom,
        "localhost/prometheus:2.42.0",
        &tool("prometheus"),
        "prometheus",
        &[],
    );
    // Debian's Alertmanager reads its notification templates from /usr/share.
    let share = Path::new(TOOLS).join("../share/prometheus/alertmanager");
    let am = dir.join("alertmanager.oci.tar");
    binary_archive(
        &am,
        "localhost/alertmanager:0.25.0",
        &tool("prometheus-alertmanager"),
        "alertmanager",
        &[
            (
                share.join("default.tmpl"),
                "/usr/share/prometheus/alertmanager/default.tmpl",
            ),
            (
                share.join("email.tmpl"),
                "/usr/share/prometheus/alertmanager/email.tmpl",
            ),
        ],
    );
    let ne = dir.join("node-exporter.oci.tar");
    binary_archive(
        &ne,
        "localhost/node-exporter:1.5.0",
        &tool("prometheus-node-exporter"),
        "node_exporter",
        &[],
    );
    let web = dir.join("hello.oci.tar");
    hello_archive(&web);

    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let services = profile_copy(&profiles, "services", LAN_SERVICES);
    let monitoring = profile_copy(&profiles, "monitoring", LAN_MONITORING);
    let secrets = dir.join("secrets");
    for h in ["vps1", "monitoring"] {
        std::fs::create_dir_all(secrets.join(h)).unwrap();
        std::fs::write(
            secrets.join(h).join("s3.env"),
            "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_REGION=us-east-1\n",
        )
        .unwrap();
    }
    let admin = format!(
        "[admin]\nuser = \"admin\"\nssh_keys = [\"{}\"]\n\n",
        keys.admin_pub.trim()
    );

    // Services host: a web app on a volume, node-exporter on the tunnel, and a backup
    // every 20 s (no jitter) whose hook fails: the failure the monitoring host must see.
    let mut ov = String::from(
        "replace = [\"containers\", \"volumes\", \"networks\", \"proxy\", \"backup\", \"admin\"]\n\n",
    );
    ov += &admin;
    ov += &backup_section(
        &bucket,
        "vps1-test",
        s3_port,
        "schedule = \"*:*:0/20\"\njitter = 0\n",
    );
    ov += "[volumes.www]\nbackup = \"hook\"\nhook = \"echo 'test: this backup is made to fail' >&2; exit 3\"\n\n";
    ov += &format!(
        "[containers.web]\nimage = \"{HELLO_REF}\"\nbake = \"{}\"\npublish = [\"{HELLO_PORT}:{HELLO_PORT}\"]\nvolumes = [\"www:/www\"]\n\n",
        web.display()
    );
    ov += &node_exporter(&ne, WG_SERVICES);
    ov += &lan_file("52:54:00:77:00:01", LAN_SERVICES);
    let services_overlay = dir.join("services-overlay.toml");
    std::fs::write(&services_overlay, ov).unwrap();

    // Monitoring host: Prometheus, Alertmanager (receiver: the webhook above, reached
    // through the guest's user-mode NIC as 10.0.2.2) and node-exporter.
    let mut ov = String::from(
        "replace = [\"containers\", \"volumes\", \"networks\", \"backup\", \"admin\", \"monitoring\"]\n\n",
    );
    ov += &admin;
    ov += &format!(
        "[monitoring]\nscrape = [\"services\"]\nalerts = {{ receiver = \"webhook\", url = \"http://10.0.2.2:{hook_port}/alert\" }}\n\n"
    );
    ov += &backup_section(&bucket, "monitoring-test", s3_port, "");
    ov += "[networks.monitoring]\n\n[volumes.prometheus-data]\nbackup = \"stop\"\n[volumes.alertmanager-data]\nbackup = \"live\"\n\n";
    ov += &format!(
        "[containers.prometheus]\nimage = \"localhost/prometheus:2.42.0\"\nbake = \"{}\"\nnetworks = [\"monitoring\"]\n\
         publish = [\"{WG_MONITORING}:9090:9090\"]\nvolumes = [\"prometheus-data:/prometheus\"]\n\
         command = [\"--config.file=/etc/prometheus/prometheus.yml\", \"--storage.tsdb.path=/prometheus\"]\n\
         metrics_port = 9090\nhealth = {{ cmd = \"wget -q -O /dev/null http://127.0.0.1:9090/-/ready\", interval = \"10s\", start_period = \"120s\" }}\n\n",
        prom.display()
    );
    ov += &format!(
        "[containers.alertmanager]\nimage = \"localhost/alertmanager:0.25.0\"\nbake = \"{}\"\nnetworks = [\"monitoring\"]\n\
         publish = [\"{WG_MONITORING}:9093:9093\"]\nvolumes = [\"alertmanager-data:/alertmanager\"]\n\
         command = [\"--config.file=/etc/alertmanager/alertmanager.yml\", \"--storage.path=/alertmanager\"]\n\
         health = {{ cmd = \"wget -q -O /dev/null http://127.0.0.1:9093/-/ready\", interval = \"10s\", start_period = \"120s\" }}\n\n",
        am.display()
    );
    ov += &node_exporter(&ne, WG_MONITORING);
    ov += &lan_file("52:54:00:77:00:02", LAN_MONITORING);
    let monitoring_overlay = dir.join("monitoring-overlay.toml");
    std::fs::write(&monitoring_overlay, ov).unwrap();

    let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
    let helper = strip(&cli, &dir);
    let services_img = dir.join("vps1.raw");
    let monitoring_img = dir.join("monitoring.raw");
    for (profile, overlay, image) in [
        (&services, &services_overlay, &services_img),
        (&monitoring, &monitoring_overlay, &monitoring_img),
    ] {
        cli_build(
            profile,
            overlay,
            &secrets,
            &helper,
            image,
            &["--env", "qemu"],
        );
    }
    eprintln!("two images built in {:.1}s", t0.elapsed().as_secs_f64());

    let (pa, pb) = (free_udp_port(), free_udp_port());
    let mut svc = start(
        "services",
        &services_img,
        dir.join("serial-services.log"),
        LanNic {
            mac: "52:54:00:77:00:01".into(),
            local_port: pa,
            remote_port: pb,
        },
        &[s3_port, hook_port],
    );
    let mut mon = start(
        "monitoring",
        &monitoring_img,
        dir.join("serial-monitoring.log"),
        LanNic {
            mac: "52:54:00:77:00:02".into(),
            local_port: pb,
            remote_port: pa,
        },
        &[s3_port, hook_port],
    );
    let ts = wait_ready(&mut svc, "vps1");
    let tm = wait_ready(&mut mon, "monitoring");
    eprintln!(
        "ready: services {:.1}s, monitoring {:.1}s after start",
        ts.as_secs_f64(),
        tm.as_secs_f64()
    );

    // 1. The tunnel: each side has completed a handshake with the other and received
    //    data through it, and each side can open a connection through it.
    for (g, peer_wg, port) in [(&svc, WG_MONITORING, 9090), (&mon, WG_SERVICES, 9100)] {
        assert!(
            poll(
                &format!("{} to reach {peer_wg}:{port} over the tunnel", g.name),
                Duration::from_secs(120),
                || { guest_connects(&dir, g, peer_wg, port).then_some(true) }
            ),
            "unreachable"
        );
    }
    for g in [&svc, &mon] {
        let out = ssh(
            &dir,
            g.ssh_port,
            "sudo wg show wg0 latest-handshakes; sudo wg show wg0 transfer",
        );
        let mut lines = out.lines().filter(|l| !l.trim().is_empty());
        let hs: u64 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let rx: u64 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            hs > 0 && rx > 0,
            "{}: no handshake or nothing received on wg0:\n{out}",
            g.name
        );
        eprintln!("{}: wg0 handshake at {hs}, {rx} bytes received", g.name);
    }

    // 2. Prometheus on the monitoring host scrapes the services host over the tunnel.
    let targets = poll(
        "the services host's node target to be up in Prometheus",
        Duration::from_secs(240),
        || {
            let r = guest_http(
                &dir,
                &mon,
                WG_MONITORING,
                9090,
                "/api/v1/targets?state=active",
            );
            let v: serde_json::Value = serde_json::from_str(body(&r)).ok()?;
            let active = v["data"]["activeTargets"].as_array()?.clone();
            let up = active.iter().any(|t| {
                t["labels"]["host"] == "vps1"
                    && t["labels"]["job"] == "node"
                    && t["scrapeUrl"]
                        .as_str()
                        .is_some_and(|u| u.contains(&format!("{WG_SERVICES}:9100")))
                    && t["health"] == "up"
            });
            up.then_some(active)
        },
    );
    let summary: Vec<String> = targets
        .iter()
        .map(|t| format!("{} {} {}", t["labels"]["job"], t["scrapeUrl"], t["health"]))
        .collect();
    eprintln!("Prometheus targets: {summary:?}");

    // 3. Firewall. From the services host, on the LAN (the monitoring host's public side):
    //    its service ports are closed, SSH (public in the profile) is open; the same
    //    services answer on the tunnel.
    for port in [9090u16, 9093, 9094, 9100, 3000, 8080] {
        assert!(
            !guest_connects(&dir, &svc, LAN_MONITORING, port),
            "monitoring port {port} is reachable from the services host outside the tunnel"
        );
    }
    assert!(
        guest_connects(&dir, &svc, LAN_MONITORING, 22),
        "monitoring SSH is closed on the LAN"
    );
    for port in [9090u16, 9093, 9100] {
        assert!(
            guest_connects(&dir, &svc, WG_MONITORING, port),
            "monitoring port {port} is not reachable over the tunnel"
        );
    }
    //    The services host's metrics exist only on its tunnel address; its public app
    //    port is public.
    assert!(
        !guest_connects(&dir, &mon, LAN_SERVICES, 9100),
        "the services host's node-exporter answers outside the tunnel"
    );
    assert!(guest_connects(&dir, &mon, WG_SERVICES, 9100));
    assert!(
        guest_connects(&dir, &mon, LAN_SERVICES, HELLO_PORT),
        "the services host's published app port is closed"
    );
    eprintln!("firewall checks passed");

    // 4. The failing backup: the services host records it, Prometheus sees it over the
    //    tunnel, Alertmanager fires and notifies the receiver.
    let metrics = poll(
        "a failed backup run on the services host",
        Duration::from_secs(180),
        || {
            let out = ssh(
                &dir,
                svc.ssh_port,
                "sudo sh -c 'cat /var/lib/imgbuild/metrics/*.prom' 2>/dev/null || true",
            );
            out.lines()
                .any(|l| l.starts_with("imgbuild_backup_success") && l.trim_end().ends_with(" 0"))
                .then_some(out)
        },
    );
    eprintln!(
        "services host metrics: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("imgbuild_backup_success"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let diag = || {
        let mut d = String::new();
        for path in ["/api/v1/rules", "/api/v1/alerts", "/api/v1/alertmanagers"] {
            let r = guest_http(&dir, &mon, WG_MONITORING, 9090, path);
            d += &format!("--- prometheus {path}\n{}\n", body(&r));
        }
        let r = guest_http(&dir, &mon, WG_MONITORING, 9093, "/api/v2/alerts");
        d += &format!("--- alertmanager /api/v2/alerts\n{}\n", body(&r));
        d += &ssh_status(
            &dir,
            mon.ssh_port,
            "sudo journalctl -b --no-pager -o cat -u prometheus -u alertmanager | grep -v Copying | tail -n 60",
        )
        .1;
        d
    };
    let alert = poll_or(
        "BackupFailed to be active in Alertmanager",
        Duration::from_secs(300),
        || {
            let r = guest_http(
                &dir,
                &mon,
                WG_MONITORING,
                9093,
                "/api/v2/alerts?active=true",
            );
            let v: serde_json::Value = serde_json::from_str(body(&r)).ok()?;
            v.as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "BackupFailed" && a["labels"]["host"] == "vps1"
                })
                .cloned()
        },
        diag,
    );
    eprintln!(
        "Alertmanager: BackupFailed {} since {}",
        alert["status"]["state"], alert["startsAt"]
    );
    let note = poll(
        "the webhook receiver to be notified",
        Duration::from_secs(240),
        || {
            notifications
                .lock()
                .expect("webhook lock")
                .iter()
                .find(|b| {
                    b.contains("BackupFailed") && b.contains("vps1") && b.contains("\"firing\"")
                })
                .cloned()
        },
    );
    eprintln!(
        "webhook received {} bytes: BackupFailed firing for vps1",
        note.len()
    );
    svc.vm.kill();
    mon.vm.kill();
    eprintln!("two-host test passed in {:.1}s", t0.elapsed().as_secs_f64());
}
