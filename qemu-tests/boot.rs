//! Boots a test host's image under QEMU (TCG here; KVM only if a probe guest runs) and
//! checks from the serial console and forwarded ports what a user would: the readiness
//! line, no failed units, a read-only /usr, /var grown over a bigger disk, the quadlet
//! answering, a firewalled port closed, sshd presenting the host key from the tree.
//!
//! harness = false: this binary is also the in-image helper (`imgbuild ready`) when the
//! imgbuild CLI in this checkout has no `ready` verb yet, so the test can run before the
//! CLI wiring lands, with the same library code the CLI calls.

#[path = "common.rs"]
mod common;

use common::*;
use imgbuild::image::{self, DiskFormat};
use imgbuild::qemu::{self, RunOptions, SerialTarget};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("ready") {
        let cfg = Path::new(imgbuild::hostconfig::HOST_CONFIG_PATH);
        let code = imgbuild::agent::ready::ready(cfg).unwrap_or_else(|e| {
            eprintln!("imgbuild ready: {e:#}");
            2
        });
        std::process::exit(code);
    }
    run_tests(&[
        (
            "services_profile_built_by_the_cli_boots_to_ready",
            services_profile_built_by_the_cli_boots_to_ready,
        ),
        (
            "boots_to_ready_with_quadlet_firewall_ssh_and_grown_var",
            boots_to_ready_with_quadlet_firewall_ssh_and_grown_var,
        ),
    ]);
}

/// The CLI as a user runs it: `imgbuild build services --overlay test.toml`, where the
/// overlay swaps the apps (which cannot be pulled offline) for one baked busybox web
/// server, drops S3 backup, and sets the admin's SSH key to one the test holds.
fn services_profile_built_by_the_cli_boots_to_ready() {
    require(
        "qemu-system-x86_64",
        "sudo apt-get install -t bookworm-backports qemu-system-x86 ovmf",
    );
    let ssh_bin = require("ssh", "sudo apt-get install openssh-client");
    let keyscan = require("ssh-keyscan", "sudo apt-get install openssh-client");
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
    let help = Command::new(&cli)
        .arg("--help")
        .output()
        .expect("run imgbuild --help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("ready"),
        "the imgbuild CLI has no `ready` verb: the image could not report readiness"
    );
    let dir = scratch("qemu-boot-cli");
    let keys = keys(&dir);
    let oci = dir.join("hello.oci.tar");
    hello_archive(&oci);
    let overlay = dir.join("test-overlay.toml");
    std::fs::write(
        &overlay,
        format!(
            "replace = [\"containers\", \"volumes\", \"networks\", \"proxy\", \"backup\", \"admin\"]\n\n\
             [admin]\nuser = \"admin\"\nssh_keys = [\"{}\"]\n\n\
             [containers.web]\nimage = \"{HELLO_REF}\"\nbake = \"{}\"\npublish = [\"{HELLO_PORT}:{HELLO_PORT}\"]\n",
            keys.admin_pub.trim(),
            oci.display()
        ),
    )
    .expect("write overlay");
    let helper = strip(&cli, &dir);
    let secrets = dir.join("secrets");
    let out = dir.join("vps1.raw");
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/services.toml");
    let t = Instant::now();
    cli_build(&profile, &overlay, &secrets, &helper, &out, &[]);
    eprintln!("CLI build: {:.1}s", t.elapsed().as_secs_f64());
    let st = Command::new(&cli)
        .arg("verify")
        .arg(&out)
        .arg("--secrets")
        .arg(&secrets)
        .status()
        .expect("run imgbuild verify");
    assert!(st.success(), "imgbuild verify failed on a fresh image");

    let serial = dir.join("serial.log");
    let (ssh, hello, closed) = (free_port(), free_port(), free_port());
    let mut opts = RunOptions::new(&out);
    opts.serial = SerialTarget::File(serial.clone());
    opts.ssh_port = Some(ssh);
    opts.forwards = vec![(hello, HELLO_PORT), (closed, CLOSED_PORT)];
    isolate(&mut opts, &[]);
    let disk = std::fs::metadata(&out).expect("image").len();
    let grow = 2u64 << 30;
    opts.disk_size = Some(disk + grow);
    let mut vm = qemu::start(&opts).expect("start qemu");
    let (seen, log) = qemu::wait_for_serial(&mut vm, &serial, "imgbuild: vps1 ", BOOT_TIMEOUT)
        .expect("serial log");
    let boot = vm.started.elapsed();
    assert!(
        seen,
        "no readiness line within {BOOT_TIMEOUT:?}:\n{}",
        tail(&log, 60)
    );
    let line = log
        .lines()
        .find(|l| l.contains("imgbuild: vps1 "))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "BOOT TIME (services via CLI): {:.1}s to `{}` ({:?})",
        boot.as_secs_f64(),
        line.trim(),
        vm.accel
    );
    assert!(
        line.contains("imgbuild: vps1 ready ("),
        "readiness: {line}\n{}",
        tail(&log, 80)
    );

    let body = http_get(hello, "/", Duration::from_secs(10));
    assert!(
        body.contains(HELLO_BODY),
        "the baked container did not answer: {body:?}"
    );
    let got = http_get(closed, "/", Duration::from_secs(8));
    assert!(
        got.is_empty(),
        "a port the profile does not open answered: {got:?}"
    );

    // sshd presents the host key from the secrets dir, and lets the admin in.
    let want = std::fs::read_to_string(secrets.join("vps1/ssh_host_ed25519_key.pub"))
        .expect("host key in secrets");
    let ks = Command::new(keyscan)
        .args(["-T", "20", "-t", "ed25519", "-p"])
        .arg(ssh.to_string())
        .arg("127.0.0.1")
        .output()
        .expect("run ssh-keyscan");
    let body_of = |k: &str| k.split_whitespace().nth(1).unwrap_or("-").to_string();
    assert!(
        String::from_utf8_lossy(&ks.stdout).contains(&body_of(&want)),
        "sshd did not present the host key from the secrets dir"
    );
    let o = Command::new(ssh_bin)
        .arg("-i")
        .arg(dir.join("admin_ed25519"))
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=20",
            "-p",
        ])
        .arg(ssh.to_string())
        .arg("admin@127.0.0.1")
        .arg(
            "echo failed=$(systemctl list-units --state=failed --no-legend --plain | wc -l); \
             systemctl list-units --state=failed --no-legend --plain; \
             echo rootopts=$(findmnt -no OPTIONS /); \
             echo var_bytes=$(df -B1 --output=size /var | tail -n 1 | tr -d ' '); \
             echo volumes_fs=$(findmnt -no FSTYPE /var/lib/containers/storage/volumes); \
             echo volumes_bytes=$(df -B1 --output=size /var/lib/containers/storage/volumes | tail -n 1 | tr -d ' ')",
        )
        .output()
        .expect("run ssh");
    let out_s = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "admin ssh login failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let val = |k: &str| {
        out_s
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    assert_eq!(val("failed"), "0", "failed units:\n{out_s}");
    assert!(
        val("rootopts").split(',').any(|o| o == "ro"),
        "root not read-only: {out_s}"
    );
    // repart shares the disk's extra space: a quarter grows /var, three quarters make
    // the btrfs volumes partition.
    let var_bytes: u64 = val("var_bytes").parse().unwrap_or(0);
    let volumes_bytes: u64 = val("volumes_bytes").parse().unwrap_or(0);
    assert!(var_bytes > grow / 8, "/var not grown: {out_s}");
    assert_eq!(
        val("volumes_fs"),
        "btrfs",
        "no btrfs volumes partition: {out_s}"
    );
    assert!(
        volumes_bytes > grow / 2,
        "volumes partition too small: {out_s}"
    );
    // No secret from the host's secrets dir is in a file other users can read, on any
    // filesystem of the booted image (root, /var, the volumes).
    let mut needles = Vec::new();
    for e in std::fs::read_dir(secrets.join("vps1"))
        .expect("secrets dir")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pub") || !e.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        needles.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                // `NAME=value` env lines give their value; base64 keys (which end in
                // '=') are taken whole.
                .map(|l| match l.split_once('=') {
                    Some((k, v))
                        if !k.is_empty()
                            && k.chars().all(|c| {
                                c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
                            }) =>
                    {
                        v.trim_matches('"').to_string()
                    }
                    _ => l.to_string(),
                })
                .filter(|l| l.len() >= 16),
        );
    }
    assert!(!needles.is_empty(), "no secrets to look for");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(needles.join("\n") + "\n");
    let o = Command::new(require("ssh", "sudo apt-get install openssh-client"))
        .arg("-i")
        .arg(dir.join("admin_ed25519"))
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-p"])
        .arg(ssh.to_string())
        .arg("admin@127.0.0.1")
        .arg(format!(
            "printf %s {b64} | base64 -d > /dev/shm/needles; \
             sudo grep -rlF -f /dev/shm/needles /etc/imgbuild /etc/ssh /etc/wireguard /var/lib/imgbuild 2>/dev/null | sed 's/^/private: /'; \
             echo private=$(sudo grep -rlF -f /dev/shm/needles /etc/imgbuild /etc/ssh /etc/wireguard /var/lib/imgbuild 2>/dev/null | wc -l); \
             sudo find / /var /var/lib/containers/storage/volumes -xdev -type f -perm -0004 -size -8M -print0 \
               | sudo xargs -0 -r grep -lF -f /dev/shm/needles 2>/dev/null | sed 's/^/exposed: /'; \
             echo scanned=$(sudo find / /var /var/lib/containers/storage/volumes -xdev -type f -perm -0004 | wc -l)"
        ))
        .output()
        .expect("run ssh");
    let scan = String::from_utf8_lossy(&o.stdout).into_owned();
    let field = |k: &str| {
        scan.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    // The scan is not vacuous: the same needles are found where the secrets belong.
    assert!(
        field("private").parse::<u32>().unwrap_or(0) > 0,
        "the secrets were not found even in their own root-only files: {scan}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let exposed: Vec<&str> = scan
        .lines()
        .filter(|l| l.starts_with("exposed: "))
        .collect();
    assert!(
        exposed.is_empty(),
        "secrets in world-readable files of the booted image: {exposed:?}"
    );
    for l in scan.lines().filter(|l| l.starts_with("private: ")) {
        eprintln!("secret scan: {l}");
    }
    eprintln!(
        "secret scan: {} secret lines, {} world-readable files scanned, none holds one; found in {} root-only files",
        needles.len(),
        field("scanned"),
        field("private")
    );
    vm.kill();
    eprintln!(
        "services boot test passed; boot to ready {:.1}s",
        boot.as_secs_f64()
    );
}

/// The CLI binary if it has the `ready` verb, else this test binary (see module doc).
/// Debug info is stripped from the copy put into the image: it is most of its size.
fn helper(dir: &Path) -> PathBuf {
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
    let help = Command::new(&cli).arg("--help").output();
    let has_ready = help
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("ready"))
        .unwrap_or(false);
    let src = if has_ready {
        cli
    } else {
        eprintln!(
            "note: {} has no `ready` verb yet; the test binary serves as the in-image helper",
            cli.display()
        );
        std::env::current_exe().expect("current exe")
    };
    strip(&src, dir)
}

fn probe<'a>(log: &'a str, key: &str) -> &'a str {
    let pat = format!("PROBE {key}=");
    log.lines()
        .find_map(|l| l.split_once(&pat).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {pat} in the serial log"))
}

fn boots_to_ready_with_quadlet_firewall_ssh_and_grown_var() {
    require(
        "qemu-system-x86_64",
        "sudo apt-get install -t bookworm-backports qemu-system-x86 ovmf",
    );
    let keyscan = require("ssh-keyscan", "sudo apt-get install openssh-client");
    let dir = scratch("qemu-boot");
    let keys = keys(&dir);
    let tree = test_tree(&keys);
    let oci = dir.join("hello.oci.tar");
    hello_archive(&oci);
    let helper = helper(&dir);
    let out = dir.join("qemutest.raw");
    let t = Instant::now();
    let rep = build(
        &tree,
        &out,
        DiskFormat::Raw,
        &helper,
        vec![(HELLO_ARCHIVE.to_string(), oci)],
    );
    eprintln!(
        "image built in {:.1}s ({} MiB disk): {:?}",
        t.elapsed().as_secs_f64(),
        rep.disk_bytes >> 20,
        rep.timings
    );
    let manifest = image::verify(&out, &signing_key().verifying_key())
        .expect("fresh image verifies")
        .manifest;
    let var_len = manifest
        .regions
        .iter()
        .find(|r| r.name == "var")
        .map(|r| r.length)
        .expect("var region");

    let serial = dir.join("serial.log");
    let (ssh, hello, closed) = (free_port(), free_port(), free_port());
    let mut opts = RunOptions::new(&out);
    opts.serial = SerialTarget::File(serial.clone());
    opts.ssh_port = Some(ssh);
    opts.forwards = vec![(hello, HELLO_PORT), (closed, CLOSED_PORT)];
    isolate(&mut opts, &[]);
    // A provider's disk is bigger than the image: /var must grow into the difference.
    let grow = 2u64 << 30;
    opts.disk_size = Some(rep.disk_bytes + grow);
    let mut vm = qemu::start(&opts).expect("start qemu");
    eprintln!("qemu started (accel {:?}), pid {}", vm.accel, vm.pid());

    let (seen, log) = qemu::wait_for_serial(&mut vm, &serial, "imgbuild: qemutest ", BOOT_TIMEOUT)
        .expect("serial log");
    let boot = vm.started.elapsed();
    assert!(
        seen,
        "no readiness line within {BOOT_TIMEOUT:?}; serial tail:\n{}",
        tail(&log, 60)
    );
    let line = log
        .lines()
        .find(|l| l.contains("imgbuild: qemutest "))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "BOOT TIME: {:.1}s to `{}` ({:?})",
        boot.as_secs_f64(),
        line.trim(),
        vm.accel
    );
    assert!(
        line.contains("imgbuild: qemutest ready (1 units active)"),
        "readiness line says: {line}\n{}",
        tail(&log, 80)
    );
    let (done, log) =
        qemu::wait_for_serial(&mut vm, &serial, "PROBE done", Duration::from_secs(60))
            .expect("serial log");
    assert!(done, "probe did not finish:\n{}", tail(&log, 60));

    assert_eq!(
        probe(&log, "failed_units"),
        "0",
        "failed units:\n{}",
        failed(&log)
    );
    assert_eq!(probe(&log, "usr"), "readonly", "/usr must not be writable");
    let var_bytes: u64 = probe(&log, "var_bytes").parse().expect("var size");
    eprintln!(
        "/var: ext4 on {}, {} MiB (partition in the image: {} MiB)",
        probe(&log, "var_source"),
        var_bytes >> 20,
        var_len >> 20
    );
    let volumes_bytes: u64 = probe(&log, "volumes_bytes").parse().expect("volumes size");
    eprintln!(
        "volumes: {} on their own partition, {} MiB",
        probe(&log, "volumes_fs"),
        volumes_bytes >> 20
    );
    assert!(
        var_bytes > var_len + grow / 8,
        "/var was not grown: {var_bytes} bytes, image partition {var_len}"
    );
    assert_eq!(
        probe(&log, "volumes_fs"),
        "btrfs",
        "no btrfs volumes partition"
    );
    assert!(
        volumes_bytes > grow / 2,
        "the volumes partition did not get the new space: {volumes_bytes} bytes"
    );
    assert_eq!(
        probe(&log, "listener"),
        "closed",
        "the firewalled listener must run inside the guest"
    );

    // The quadlet answers through netavark's port forward.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let b = http_get(hello, "/", Duration::from_secs(5));
        if b.contains(HELLO_BODY) || Instant::now() > deadline {
            break b;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        body.contains(HELLO_BODY),
        "quadlet did not answer: {body:?}"
    );

    // The listener on the port nftables does not open: nothing comes back.
    let got = http_get(closed, "/", Duration::from_secs(8));
    assert!(
        !got.contains("closed"),
        "a port the profile does not open answered: {got:?}"
    );

    // sshd presents the host key from the tree.
    let ks = Command::new(keyscan)
        .args(["-T", "20", "-t", "ed25519", "-p"])
        .arg(ssh.to_string())
        .arg("127.0.0.1")
        .output()
        .expect("run ssh-keyscan");
    let scanned = String::from_utf8_lossy(&ks.stdout);
    let want = keys
        .host_pub
        .split_whitespace()
        .nth(1)
        .expect("pub key body");
    assert!(
        scanned.contains(want),
        "sshd did not present the host key from the tree: {scanned:?} {}",
        String::from_utf8_lossy(&ks.stderr)
    );
    vm.kill();
    eprintln!("boot test passed; boot to ready {:.1}s", boot.as_secs_f64());
}

fn failed(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("PROBE failed:") || l.contains("PROBE log "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}
