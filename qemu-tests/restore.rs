//! The data half end to end: a services image (test overlay: one baked busybox web
//! server serving a volume, backups to a moto S3 server on the host's 127.0.0.1, which
//! the guest reaches as 10.0.2.2, restore = "require") boots onto an empty prefix and
//! keeps its service down, saying why in one line; `imgbuild init` then marks the prefix
//! as a first deployment and the same boot comes up with empty volumes. Data written
//! into the volume is backed up (which removes the marker); a fresh copy of the same
//! image (pristine /var) then restores the volume at first boot before the container
//! starts, and says so on the console. A write made after the last backup survives too:
//! the first copy is shut down with the ACPI power button and takes a final snapshot
//! once its containers have stopped (planned replacement loses nothing). Last, a
//! second host whose volume says `from = "vps1:www"` boots with vps1's data.

#[path = "common.rs"]
mod common;
#[path = "../tests/snapshot-fixtures/common.rs"]
mod snapfix;

use common::*;
use imgbuild::qemu::{self, RunOptions, SerialTarget};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Long enough to see the 10 s waiting lines, short enough to reach FAILED quickly.
const RESTORE_TIMEOUT: u64 = 30;
/// The dependent app (`after = ["web"]`, so `Requires=web.service`): a `stop` backup of
/// web's volume takes it down too, and must bring it back.
const APP_PORT: u16 = 8081;

fn main() {
    run_tests(&[(
        "data_written_on_one_boot_is_restored_before_services_on_a_fresh_copy",
        data_written_on_one_boot_is_restored_before_services_on_a_fresh_copy,
    )]);
}

/// Boots `image` (host `host`) and waits until it says it is ready.
fn boot(
    host: &str,
    image: &Path,
    serial: &Path,
    ssh_port: u16,
    web_port: u16,
    s3_port: u16,
    staging: bool,
) -> (qemu::Vm, String, Duration) {
    let _ = std::fs::remove_file(serial);
    let mut opts = RunOptions::new(image);
    if staging {
        // What `imgbuild run` passes: a staging copy restores but never backs up.
        opts.credentials.push((
            imgbuild::agent::drill_mode::STAGING_CREDENTIAL.to_string(),
            b"1".to_vec(),
        ));
    }
    opts.serial = SerialTarget::File(serial.to_path_buf());
    opts.ssh_port = Some(ssh_port);
    opts.forwards = vec![(web_port, HELLO_PORT), (free_port(), APP_PORT)];
    isolate(&mut opts, &[s3_port]);
    let mut vm = qemu::start(&opts).expect("start qemu");
    let (seen, log) =
        qemu::wait_for_serial(&mut vm, serial, &format!("imgbuild: {host} "), BOOT_TIMEOUT)
            .expect("serial");
    let t = vm.started.elapsed();
    let tail: String = log
        .lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        seen && log.contains(&format!("imgbuild: {host} ready (")),
        "{host} not ready within {BOOT_TIMEOUT:?}:\n{tail}"
    );
    (vm, log, t)
}

fn data_written_on_one_boot_is_restored_before_services_on_a_fresh_copy() {
    require(
        "qemu-system-x86_64",
        "sudo apt-get install -t bookworm-backports qemu-system-x86 ovmf",
    );
    let moto = snapfix::moto();
    let port = endpoint_port(&moto.endpoint);
    let bucket = snapfix::unique("drill").to_lowercase();
    create_bucket(&moto.endpoint, &bucket);

    let dir = scratch("qemu-restore");
    let keys = keys(&dir);
    let oci = dir.join("hello.oci.tar");
    hello_archive(&oci);
    let secrets = moto_secrets(&dir);
    let overlay = dir.join("overlay.toml");
    std::fs::write(
        &overlay,
        overlay_head(
            &keys.admin_pub,
            &bucket,
            "vps1-test",
            port,
            &format!("restore = \"require\"\nrestore_timeout = {RESTORE_TIMEOUT}\n"),
        ) + &format!(
            "[volumes.www]\nbackup = \"stop\"\n\n\
             [containers.web]\nimage = \"{HELLO_REF}\"\nbake = \"{}\"\npublish = [\"{HELLO_PORT}:{HELLO_PORT}\"]\nvolumes = [\"www:/www\"]\n\n\
             [containers.app]\nimage = \"{HELLO_REF}\"\npublish = [\"{APP_PORT}:{HELLO_PORT}\"]\nafter = [\"web\"]\n",
            oci.display()
        ),
    )
    .unwrap();
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
    let helper = strip(&cli, &dir);
    let image = dir.join("vps1.raw");
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/services.toml");
    cli_build(&profile, &overlay, &secrets, &helper, &image, &[]);

    // First boot onto an empty prefix with no marker: it waits, says why every ~10 s,
    // then fails closed with a one-line reason; the service stays down.
    let serial = dir.join("serial1.log");
    let (ssh_port, web) = (free_port(), free_port());
    let _ = std::fs::remove_file(&serial);
    let mut opts = RunOptions::new(&image);
    opts.serial = SerialTarget::File(serial.clone());
    opts.ssh_port = Some(ssh_port);
    let app = free_port();
    opts.forwards = vec![(web, HELLO_PORT), (app, APP_PORT)];
    isolate(&mut opts, &[port]);
    let mut vm = qemu::start(&opts).expect("start qemu");
    let (seen, log0) =
        qemu::wait_for_serial(&mut vm, &serial, "imgbuild: vps1 ", BOOT_TIMEOUT).expect("serial");
    let failed = log0
        .lines()
        .find(|l| l.contains("imgbuild firstboot: FAILED:"))
        .unwrap_or_else(|| panic!("no FAILED line from first boot (seen={seen}):\n{log0}"));
    eprintln!("BOOT 1, empty prefix, no marker: {}", failed.trim());
    assert!(
        failed.contains("holds no snapshot and no empty-start marker")
            && failed.contains("imgbuild init"),
        "{failed}"
    );
    let waiting: Vec<&str> = log0
        .lines()
        .filter(|l| l.contains("imgbuild firstboot: waiting for s3://"))
        .collect();
    assert!(
        waiting.len() >= 2 && waiting.len() <= 6,
        "expected a waiting line about every 10 s over {RESTORE_TIMEOUT} s, got {}:\n{}",
        waiting.len(),
        waiting.join("\n")
    );
    assert!(
        !log0.contains("imgbuild firstboot: attempt") && !log0.contains("DispatchFailure"),
        "per-attempt error chains reached the console (they belong in the journal):\n{log0}"
    );
    assert!(
        log0.contains("imgbuild: vps1 FAILED: ") && log0.contains("held back: first boot failed"),
        "the readiness line does not say the services were held back:\n{log0}"
    );
    let out = ssh(&dir, ssh_port, "systemctl is-active web.service || true");
    assert!(
        !out.lines().next().unwrap_or_default().starts_with("active"),
        "the service started although first boot failed:\n{out}"
    );

    // `imgbuild init` on the workstation marks the prefix; the host retries and is up.
    let init = Command::new(&cli)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .arg("init")
        .arg(&profile)
        .arg("--overlay")
        .arg(&overlay)
        .arg("--secrets")
        .arg(&secrets)
        .args(["--endpoint", &moto.endpoint])
        .output()
        .expect("imgbuild init");
    assert!(
        init.status.success(),
        "init: {}{}",
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    let t = Instant::now();
    ssh(
        &dir,
        ssh_port,
        "sudo systemctl start --no-block multi-user.target imgbuild-ready.service",
    );
    let (seen, log1) =
        qemu::wait_for_serial(&mut vm, &serial, "imgbuild: vps1 ready (", BOOT_TIMEOUT)
            .expect("serial");
    assert!(
        seen,
        "not ready after init:\n{}",
        &log1[log1.len().saturating_sub(4000)..]
    );
    assert!(
        log1.contains("but the empty-start marker `imgbuild init` wrote"),
        "first boot did not name the marker:\n{log1}"
    );
    let t1 = vm.started.elapsed();
    eprintln!(
        "after init: ready {:.1}s later (QEMU up {:.1}s)",
        t.elapsed().as_secs_f64(),
        t1.as_secs_f64()
    );
    eprintln!(
        "BOOT 1 (empty prefix, then init): {:.1}s to ready",
        t1.as_secs_f64()
    );
    let proof = format!("restored-{}", std::process::id());
    let t = Instant::now();
    let out = ssh(&dir, ssh_port, &format!("sudo sh -c 'echo {proof} > /var/lib/containers/storage/volumes/www/_data/proof.txt && mkdir -p /var/lib/containers/storage/volumes/www/_data/sub && head -c 3000000 /dev/urandom > /var/lib/containers/storage/volumes/www/_data/sub/blob && sha256sum /var/lib/containers/storage/volumes/www/_data/sub/blob && systemctl start imgbuild-backup.service && echo backup=ok && journalctl -u imgbuild-backup.service --no-pager | grep -q \"removed the empty-start marker\" && echo marker=removed; findmnt -n -o FSTYPE /var/lib/containers/storage/volumes; journalctl -u imgbuild-backup.service --no-pager | grep -q \"atomic snapshot of all volumes taken\" && echo atomic=yes; grep -h imgbuild_backup_atomic /var/lib/imgbuild/metrics/imgbuild_backup.prom; ls -a /var/lib/containers/storage/volumes'"));
    assert!(out.contains("backup=ok"), "{out}");
    assert!(
        out.contains("marker=removed"),
        "the first backup did not remove the marker:\n{out}"
    );
    // `stop`: web and the app that requires it went down for the snapshot instant only,
    // and both are back.
    let st = ssh(
        &dir,
        ssh_port,
        "systemctl is-active web.service app.service || true; \
         sudo journalctl -u imgbuild-backup.service --no-pager | grep -E 'stopping|started .* again' || true; \
         sudo grep -h imgbuild_backup_downtime_seconds /var/lib/imgbuild/metrics/imgbuild_backup.prom",
    );
    eprintln!("stop strategy:\n{st}");
    assert!(
        st.lines().take(2).all(|l| l.trim() == "active"),
        "web or its dependent app is not active after a stop backup:\n{st}"
    );
    assert!(
        st.contains("stopping app.service web.service") && st.contains("(ok), downtime"),
        "the dependent app was not part of the stop set:\n{st}"
    );
    assert!(
        http_get(app, "/", Duration::from_secs(20)).contains(HELLO_BODY),
        "the dependent app does not answer after the backup"
    );
    // The volumes are their own btrfs, read from one atomic snapshot that is gone after.
    assert!(
        out.lines().any(|l| l.trim() == "btrfs"),
        "volumes are not on btrfs:\n{out}"
    );
    assert!(
        out.contains("atomic=yes"),
        "the backup did not read an atomic snapshot:\n{out}"
    );
    assert!(
        out.contains("imgbuild_backup_atomic{host=\"vps1\"} 1"),
        "{out}"
    );
    assert!(
        !out.contains(".imgbuild-snapshot"),
        "the snapshot was left behind:\n{out}"
    );
    let blob_sum = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    eprintln!("backup in the guest: {:.1}s", t.elapsed().as_secs_f64());
    assert!(
        http_get(web, "/proof.txt", Duration::from_secs(10)).contains(&proof),
        "the container does not serve the volume"
    );
    // Planned replacement: a write after the last scheduled backup, then the ACPI power
    // button (a provider's "shut down"). The final snapshot runs once the containers
    // have stopped, before the network goes; the fresh copy below must have the write.
    let late = format!("late-{}", std::process::id());
    ssh(
        &dir,
        ssh_port,
        &format!(
            "sudo sh -c 'echo {late} > /var/lib/containers/storage/volumes/www/_data/late.txt'"
        ),
    );
    let t = Instant::now();
    let off = vm
        .power_off(Duration::from_secs(300))
        .expect("power button");
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let finals: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("imgbuild final snapshot: "))
        .collect();
    eprintln!(
        "ACPI power-off: {:.1}s to power off; console:\n{}",
        t.elapsed().as_secs_f64(),
        finals.join("\n")
    );
    assert!(
        off,
        "the guest did not power off within 300 s:\n{}",
        &console[console.len().saturating_sub(4000)..]
    );
    assert!(
        finals
            .iter()
            .any(|l| l.contains("imgbuild final snapshot: taken: ")),
        "no final snapshot on the console:\n{}",
        &console[console.len().saturating_sub(4000)..]
    );
    vm.kill();

    // The workstation sees the snapshot the host made.
    let list = Command::new(&cli)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .args(["snapshots", "--json", "--secrets"])
        .arg(&secrets)
        .arg(&profile)
        .args([
            "--bucket",
            &bucket,
            "--prefix",
            "vps1-test",
            "--endpoint",
            &moto.endpoint,
        ])
        .output()
        .expect("imgbuild snapshots");
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "snapshots: {}{}",
        listing,
        String::from_utf8_lossy(&list.stderr)
    );

    // A fresh copy of the image (the same file, pristine /var): data back before the service.
    let serial = dir.join("serial2.log");
    let (ssh_port, web) = (free_port(), free_port());
    let (mut vm, log2, t2) = boot("vps1", &image, &serial, ssh_port, web, port, true);
    let line = log2
        .lines()
        .find(|l| l.contains("imgbuild firstboot: restored snapshot"))
        .unwrap_or_else(|| panic!("no restore line on the console:\n{log2}"));
    eprintln!(
        "BOOT 2 (restore): {:.1}s to ready; console: {}",
        t2.as_secs_f64(),
        line.trim()
    );
    let body = http_get(web, "/proof.txt", Duration::from_secs(10));
    assert!(body.contains(&proof), "restored data not served: {body:?}");
    let body = http_get(web, "/late.txt", Duration::from_secs(10));
    assert!(
        body.contains(&late),
        "the write made just before the power-off is not there: {body:?}"
    );
    let out = ssh(&dir, ssh_port, "sudo sha256sum /var/lib/containers/storage/volumes/www/_data/sub/blob; \
        echo fb_done=$(systemctl show -p ExecMainExitTimestampMonotonic --value imgbuild-firstboot.service); \
        echo web_start=$(systemctl show -p ExecMainStartTimestampMonotonic --value web.service)");
    assert!(out.starts_with(&blob_sum), "restored blob differs:\n{out}");
    // This copy is a staging copy: its backup refuses and writes nothing.
    let (_, st) = ssh_status(
        &dir,
        ssh_port,
        "sudo systemctl start imgbuild-backup.service && echo backup=ran; \
         echo refused=$(sudo journalctl -u imgbuild-backup.service --no-pager | grep -c 'refused: this is a staging copy')",
    );
    let refused: u32 = st
        .lines()
        .find_map(|l| l.strip_prefix("refused="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        !st.contains("backup=ran") && refused >= 1,
        "a staging copy backed up:\n{st}"
    );
    let val = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        val("fb_done") > 0 && val("web_start") > val("fb_done"),
        "the container started before the restore finished:\n{out}"
    );
    vm.kill();

    // Moving the service: host vps2 (a profile of its own beside a minimal vps1 one) has
    // `from = "vps1:www"`. Its first boot starts its own (empty) prefix and fetches the
    // volume from vps1's newest snapshot (the final one above) before its web starts.
    let t3 = move_to_vps2(
        &dir,
        &keys.admin_pub,
        &bucket,
        port,
        &oci,
        &helper,
        &secrets,
        &late,
    );
    eprintln!(
        "restore test passed: boot 1 {:.1}s, boot 2 {:.1}s, vps2 {:.1}s",
        t1.as_secs_f64(),
        t2.as_secs_f64(),
        t3.as_secs_f64()
    );
}

/// Builds and boots vps2, whose volume www comes from vps1; returns its time to ready.
/// moto enforces no key permissions: that vps2's read-only key can change nothing on
/// vps1's prefix is tested on Garage (tests/snapshot_host.rs); here it is the path
/// profile → image → first boot → container.
#[allow(clippy::too_many_arguments)]
fn move_to_vps2(
    dir: &Path,
    admin_pub: &str,
    bucket: &str,
    port: u16,
    oci: &Path,
    helper: &Path,
    secrets: &Path,
    late: &str,
) -> Duration {
    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let head = |name: &str, prefix: &str, restore: &str| {
        format!(
            "[host]\nname = \"{name}\"\ndefault_env = \"production\"\n\n\
             [admin]\nuser = \"admin\"\nssh_keys = [\"{}\"]\n\n\
             [backup]\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"http://10.0.2.2:{port}\"\n\
             region = \"us-east-1\"\nrestore = \"{restore}\"\nrestore_timeout = {RESTORE_TIMEOUT}\nkeep = {{ last = 3 }}\n\n",
            admin_pub.trim()
        )
    };
    // What vps2's build reads of vps1: its bucket settings and that www is backed up.
    std::fs::write(
        profiles.join("vps1.toml"),
        head("vps1", "vps1-test", "require") + "[volumes.www]\nbackup = \"stop\"\n",
    )
    .unwrap();
    std::fs::write(
        profiles.join("vps2.toml"),
        head("vps2", "vps2-test", "allow-empty")
            + &format!(
                "[volumes.www]\nbackup = \"live\"\nfrom = \"vps1:www\"\n\n\
                 [containers.web]\nimage = \"{HELLO_REF}\"\nbake = \"{}\"\npublish = [\"{HELLO_PORT}:{HELLO_PORT}\"]\nvolumes = [\"www:/www\"]\n",
                oci.display()
            ),
    )
    .unwrap();
    std::fs::create_dir_all(secrets.join("vps2")).unwrap();
    let moto_env = "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_REGION=us-east-1\n";
    std::fs::write(secrets.join("vps2/s3.env"), moto_env).unwrap();
    std::fs::write(secrets.join("vps2/from-vps1.s3.env"), moto_env).unwrap();
    let overlay = dir.join("empty-overlay.toml");
    std::fs::write(&overlay, "# nothing: vps2.toml is complete\n").unwrap();
    let image = dir.join("vps2.raw");
    cli_build(
        &profiles.join("vps2.toml"),
        &overlay,
        secrets,
        helper,
        &image,
        &[],
    );

    let serial = dir.join("serial-vps2.log");
    let (ssh_port, web) = (free_port(), free_port());
    let (mut vm, log, t) = boot("vps2", &image, &serial, ssh_port, web, port, false);
    let tail = &log[log.len().saturating_sub(4000)..];
    let line = log
        .lines()
        .find(|l| l.contains("imgbuild firstboot: volume www moved from vps1:www: snapshot "))
        .unwrap_or_else(|| panic!("no move line on vps2's console:\n{tail}"));
    eprintln!(
        "vps2: {:.1}s to ready; console: {}",
        t.as_secs_f64(),
        line.trim()
    );
    let body = http_get(web, "/late.txt", Duration::from_secs(10));
    assert!(
        body.contains(late),
        "vps2 does not serve vps1's data: {body:?}"
    );
    // The image carries vps1's read keys only, never its signing key.
    let out = ssh(
        dir,
        ssh_port,
        "sudo ls /etc/imgbuild/secrets/from/vps1/; sudo stat -c %a /etc/imgbuild/secrets/from/vps1/snapshot-encryption.key",
    );
    assert!(
        out.contains("snapshot-signing.pub")
            && !out.contains("snapshot-signing.key")
            && out.contains("600"),
        "{out}"
    );
    vm.kill();
    t
}
