//! A real database survives a live backup, and a crash loses at most about
//! `archive_timeout` of commits. Debian's PostgreSQL 17 (from the trixie archive,
//! packed as an OCI archive and baked into the image) runs on a volume backed up
//! `live` and marked `postgres` (continuous WAL shipping). In the guest: pgbench load,
//! a writer committing sequential ids one per transaction, and CHECKPOINT every 2 s; a
//! backup runs in the middle of it. Then pgbench stops and the writer slows to two
//! commits a second (a quiet database: WAL files are switched by archive_timeout, not
//! by filling up) for a while, and QEMU is killed: no shutdown, no final snapshot.
//! A fresh copy of the image (pristine /var) restores the snapshot at first boot and
//! replays the WAL shipped after it: PostgreSQL starts, `pg_amcheck --heapallindexed`
//! is clean, the pgbench tables have their rows, every id is there with no gap, and
//! the newest restored commit is at most archive_timeout + SHIP_MARGIN older than the
//! kill (the measured RPO is printed).
//!
//! What makes this hold is the one atomic btrfs snapshot of all volumes the backup
//! reads (see src/agent/quiesce.rs): a copy made file by file while PostgreSQL writes
//! is torn (measured: 6 of 6 such copies did not restore clean).

#[path = "common.rs"]
mod common;
#[path = "../tests/snapshot-fixtures/common.rs"]
mod snapfix;

use common::*;
use imgbuild::qemu::{self, RunOptions, SerialTarget};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
const PG_REF: &str = "localhost/postgres:17-test";
/// pgbench scale: 500 000 accounts, enough for checkpoints to write for seconds.
const SCALE: u64 = 5;
/// Load before the backup starts, so checkpoints and WAL recycling are under way.
const LOAD_BEFORE_BACKUP: Duration = Duration::from_secs(20);
/// The profile's archive_timeout: PostgreSQL switches WAL files at least this often.
const ARCHIVE_TIMEOUT: u64 = 60;
/// What shipping adds to archive_timeout: the shipper polls the spool every 2 s and
/// uploads a 16 MiB file (compressed) to a server on the host, under TCG.
const SHIP_MARGIN: f64 = 30.0;
/// Quiet writing after the backup: longer than archive_timeout, so at least one WAL
/// file is switched by the timeout and shipped, and the crash loses the rest.
const QUIET: Duration = Duration::from_secs(150);

/// Starts PostgreSQL on the volume, creating the cluster on an empty one. The
/// container starts as root only to fix ownership of the volume (a restore writes the
/// owners it stored, a new volume is root's), then runs postgres as its own user.
const ENTRYPOINT: &str = r#"#!/bin/sh
set -eu
BIN=/usr/lib/postgresql/17/bin
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  as_pg "$BIN/initdb" -D "$PGDATA" --auth=trust -U postgres >/dev/null
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$BIN/postgres" -D "$PGDATA" \
  -c listen_addresses='' -c unix_socket_directories=/run/postgresql -c jit=off \
  -c max_wal_size=64MB -c checkpoint_timeout=30s
"#;

/// What defines the archive; its digest keys the cache.
fn recipe() -> String {
    format!(
        "suite=trixie variant=minbase include=postgresql-17 \
         exclude=doc,man,locale,i18n,z3,llvm,llvmjit\n{ENTRYPOINT}"
    )
}

/// Debian's PostgreSQL 17 as an OCI archive, built once per recipe with mmdebstrap
/// (about a minute) and cached under the target dir.
fn postgres_archive() -> PathBuf {
    let digest = hex::encode(sha2::Sha256::digest(recipe().as_bytes()));
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oci-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let out = cache.join(format!("postgres-{}.oci.tar", &digest[..16]));
    if out.is_file() {
        return out;
    }
    let mmdebstrap = require("mmdebstrap", "bash .ci/deps.sh");
    let work = tempfile::tempdir_in(&cache).unwrap();
    let rootfs = work.path().join("rootfs.tar");
    let t = Instant::now();
    let mut cmd = Command::new(mmdebstrap);
    cmd.args([
        "--variant=minbase",
        "--include=postgresql-17",
        "--skip=output/dev",
        // No cluster at install time: the entrypoint makes one on the volume.
        "--essential-hook=mkdir -p \"$1/etc/postgresql-common/createcluster.d\" && \
         printf 'create_main_cluster = false\\n' > \"$1/etc/postgresql-common/createcluster.d/imgbuild.conf\"",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/i18n/*",
        // JIT is off; its LLVM (and LLVM's z3) is most of the package's size.
        "--dpkgopt=path-exclude=/usr/lib/x86_64-linux-gnu/libz3*",
        "--dpkgopt=path-exclude=/usr/lib/x86_64-linux-gnu/libLLVM*",
        "--dpkgopt=path-exclude=/usr/lib/llvm-*",
        "--dpkgopt=path-exclude=/usr/lib/postgresql/17/lib/llvmjit*",
        "--dpkgopt=path-exclude=/usr/lib/postgresql/17/lib/bitcode/*",
    ]);
    if !is_root_user() {
        cmd.arg("--mode=unshare");
    }
    cmd.arg("trixie").arg(&rootfs);
    // The machine's own mirror choice, never one written here.
    if let Some(m) = std::env::var("IMGBUILD_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
    {
        cmd.arg(m);
    }
    let o = cmd.output().expect("run mmdebstrap");
    assert!(
        o.status.success(),
        "mmdebstrap postgresql-17 failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The entrypoint joins the layer (GNU tar appends to an uncompressed archive).
    let extra = work.path().join("extra");
    std::fs::create_dir_all(extra.join("usr/local/bin")).unwrap();
    std::fs::write(extra.join("usr/local/bin/pg-entry"), ENTRYPOINT).unwrap();
    let st = Command::new("tar")
        .args(["--append", "--owner=0", "--group=0", "--mode=0755", "-f"])
        .arg(&rootfs)
        .arg("-C")
        .arg(&extra)
        .arg("usr/local/bin/pg-entry")
        .status()
        .expect("tar --append");
    assert!(st.success(), "tar --append failed");
    let layer = std::fs::read(&rootfs).unwrap();
    let tmp = work.path().join("postgres.oci.tar");
    oci_archive_from_layer(
        &tmp,
        PG_REF,
        &layer,
        serde_json::json!({
            "Entrypoint": ["/usr/local/bin/pg-entry"],
            "Env": [
                "PATH=/usr/lib/postgresql/17/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PGDATA=/var/lib/postgresql/data/pgdata",
                "PGHOST=/run/postgresql",
                "PGUSER=postgres",
            ],
            "StopSignal": "SIGINT",
        }),
    );
    std::fs::rename(&tmp, &out).unwrap();
    eprintln!(
        "postgres OCI archive: {} MiB in {:.0}s",
        std::fs::metadata(&out).unwrap().len() >> 20,
        t.elapsed().as_secs_f64()
    );
    out
}

fn is_root_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn boot(image: &Path, serial: &Path, ssh_port: u16, s3_port: u16) -> (qemu::Vm, String) {
    let _ = std::fs::remove_file(serial);
    let mut opts = RunOptions::new(image);
    opts.serial = SerialTarget::File(serial.to_path_buf());
    opts.ssh_port = Some(ssh_port);
    // A provider's disk: room for the volumes partition the database lives on.
    opts.disk_size = Some(4 << 30);
    isolate(&mut opts, &[s3_port]);
    let mut vm = qemu::start(&opts).expect("start qemu");
    let (seen, log) =
        qemu::wait_for_serial(&mut vm, serial, "imgbuild: vps1 ", BOOT_TIMEOUT).expect("serial");
    assert!(
        seen && log.contains("imgbuild: vps1 ready ("),
        "not ready within {BOOT_TIMEOUT:?}:\n{}",
        &log[log.len().saturating_sub(6000)..]
    );
    (vm, log)
}

/// psql in the container; one value per line.
fn sql(dir: &Path, port: u16, q: &str) -> String {
    ssh(
        dir,
        port,
        &format!("sudo podman exec db psql -qAt -v ON_ERROR_STOP=1 -c \"{q}\""),
    )
    .trim()
    .to_string()
}

fn main() {
    run_tests(&[(
        "postgres_under_load_restores_clean_from_a_live_backup",
        postgres_under_load_restores_clean_from_a_live_backup,
    )]);
}

fn postgres_under_load_restores_clean_from_a_live_backup() {
    require(
        "qemu-system-x86_64",
        "sudo apt-get install -t bookworm-backports qemu-system-x86 ovmf",
    );
    let archive = postgres_archive();
    let moto = snapfix::moto();
    let port = endpoint_port(&moto.endpoint);
    let bucket = snapfix::unique("pg").to_lowercase();
    create_bucket(&moto.endpoint, &bucket);

    let dir = scratch("qemu-postgres");
    let keys = keys(&dir);
    let secrets = moto_secrets(&dir);
    let overlay = dir.join("overlay.toml");
    std::fs::write(
        &overlay,
        overlay_head(
            &keys.admin_pub,
            &bucket,
            "vps1-pg",
            port,
            &format!("restore = \"allow-empty\"\nrestore_timeout = 120\narchive_timeout = {ARCHIVE_TIMEOUT}\n"),
        ) + &format!(
            "[volumes.pgdata]\nbackup = \"live\"\npostgres = {{ container = \"db\", data = \"pgdata\" }}\n\n\
             [containers.db]\nimage = \"{PG_REF}\"\nbake = \"{}\"\nvolumes = [\"pgdata:/var/lib/postgresql/data\"]\n",
            archive.display()
        ),
    )
    .unwrap();
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_imgbuild"));
    let helper = strip(&cli, &dir);
    let image = dir.join("vps1.raw");
    let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles/services.toml");
    cli_build(&profile, &overlay, &secrets, &helper, &image, &["--quiet"]);

    // Boot 1: a new cluster on the volume, then load, and a backup in the middle of it.
    let serial = dir.join("serial1.log");
    let ssh_port = free_port();
    let (mut vm, _) = boot(&image, &serial, ssh_port, port);
    let t = Instant::now();
    let mut ready = false;
    while t.elapsed() < Duration::from_secs(120) {
        let o = ssh(
            &dir,
            ssh_port,
            "sudo podman exec db pg_isready -q && echo up || true",
        );
        if o.contains("up") {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(ready, "postgres did not come up in the guest");
    // initdb ran on the empty volume after the container's ExecStartPre: the shipper
    // turns archiving on and restarts the database once.
    let t = Instant::now();
    let mut archiving = String::new();
    while t.elapsed() < Duration::from_secs(180) {
        archiving = ssh(
            &dir,
            ssh_port,
            "sudo podman exec db psql -qAt -c 'show archive_mode' 2>/dev/null || true",
        );
        if archiving.trim() == "on" {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    assert_eq!(
        archiving.trim(),
        "on",
        "WAL archiving was not turned on:\n{}",
        ssh(
            &dir,
            ssh_port,
            "sudo journalctl -u imgbuild-wal --no-pager | tail -20"
        )
    );
    eprintln!("archive_mode on after {:.0}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    ssh(
        &dir,
        ssh_port,
        &format!("sudo podman exec db pgbench -i -q -s {SCALE} postgres"),
    );
    sql(
        &dir,
        ssh_port,
        "create table seq(id bigint primary key, at timestamptz default now())",
    );
    eprintln!("pgbench -i -s {SCALE}: {:.1}s", t.elapsed().as_secs_f64());
    // Detached in the container: pgbench, the id writer (autocommit: one transaction
    // per id), and a checkpoint every 2 s.
    ssh(
        &dir,
        ssh_port,
        "sudo podman exec -d db pgbench -n -c 4 -T 900 postgres; \
         sudo podman exec -d db sh -c 'i=0; while :; do i=$((i+1)); echo \"insert into seq(id) values ($i);\"; if [ -f /tmp/quiet ]; then sleep 0.5; fi; done | psql -q -v ON_ERROR_STOP=1'; \
         sudo podman exec -d db sh -c 'while :; do psql -qc checkpoint; sleep 2; done'",
    );
    std::thread::sleep(LOAD_BEFORE_BACKUP);
    let before: u64 = sql(&dir, ssh_port, "select coalesce(max(id), 0) from seq")
        .parse()
        .unwrap();
    let t = Instant::now();
    let out = ssh(
        &dir,
        ssh_port,
        "sudo systemctl start imgbuild-backup.service && echo backup=ok; \
         sudo grep -hE 'imgbuild_backup_(downtime|duration)_seconds|imgbuild_backup_atomic|imgbuild_backup_bytes_total' /var/lib/imgbuild/metrics/imgbuild_backup.prom | grep -v '^#'",
    );
    let backup_secs = t.elapsed().as_secs_f64();
    let after: u64 = sql(&dir, ssh_port, "select coalesce(max(id), 0) from seq")
        .parse()
        .unwrap();
    assert!(out.contains("backup=ok"), "{out}");
    assert!(
        out.contains("imgbuild_backup_atomic{host=\"vps1\"} 1"),
        "not an atomic snapshot:\n{out}"
    );
    assert!(
        out.contains("imgbuild_backup_downtime_seconds{host=\"vps1\"} 0.000"),
        "a live backup stopped something:\n{out}"
    );
    eprintln!(
        "backup under load: {backup_secs:.1}s (ids committed: {before} before, {after} after)\n{out}"
    );
    assert!(
        after > before,
        "the writer was not running during the backup"
    );
    // Under pgbench the WAL files fill within seconds: they must reach the bucket.
    let t = Instant::now();
    loop {
        let m = ssh(
            &dir,
            ssh_port,
            "sudo grep -h '^imgbuild_wal_shipped_files_total' /var/lib/imgbuild/metrics/imgbuild_wal.prom || true",
        );
        if m.trim()
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            > 0
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no WAL file shipped under load:\n{}",
            ssh(
                &dir,
                ssh_port,
                "sudo cat /var/lib/imgbuild/metrics/imgbuild_wal.prom; sudo journalctl -u imgbuild-wal --no-pager | tail -20; \
                 sudo podman logs db 2>&1 | grep -iE 'archiv|imgbuild' | tail -20; \
                 sudo ls -la /var/lib/containers/storage/volumes/pgdata-wal-spool/_data /var/lib/containers/storage/volumes/pgdata/_data/pgdata | head -40; \
                 sudo grep -v '^#' /var/lib/containers/storage/volumes/pgdata/_data/pgdata/postgresql.auto.conf; \
                 sudo podman exec db ls -la /imgbuild-wal"
            )
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    eprintln!(
        "first WAL file shipped {:.0}s after the backup",
        t.elapsed().as_secs_f64()
    );
    // A quiet database: pgbench gone, two commits a second.
    ssh(
        &dir,
        ssh_port,
        "sudo podman exec db touch /tmp/quiet; \
         sudo podman exec db psql -qAt -c \"select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = 'pgbench'\"",
    );
    std::thread::sleep(QUIET);
    let wal_metrics = ssh(
        &dir,
        ssh_port,
        "sudo grep -h '^imgbuild_wal_' /var/lib/imgbuild/metrics/imgbuild_wal.prom",
    );
    let shipped: u64 = wal_metrics
        .lines()
        .find(|l| l.starts_with("imgbuild_wal_shipped_files_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(shipped > 0, "no WAL file was shipped:\n{wal_metrics}");
    let killed_at: f64 = sql(
        &dir,
        ssh_port,
        "select extract(epoch from clock_timestamp())",
    )
    .parse()
    .unwrap();
    let last_before_kill: u64 = sql(&dir, ssh_port, "select max(id) from seq")
        .parse()
        .unwrap();
    // A crash: no shutdown, so no final snapshot and no last archiving.
    vm.kill();
    eprintln!(
        "killed after {QUIET:?} of quiet writing; ids committed: {last_before_kill}\n{wal_metrics}"
    );

    // Boot 2: a fresh copy restores the snapshot before postgres starts.
    let serial = dir.join("serial2.log");
    let ssh_port = free_port();
    let t = Instant::now();
    let (mut vm, log) = boot(&image, &serial, ssh_port, port);
    let line = log
        .lines()
        .find(|l| l.contains("imgbuild firstboot: restored snapshot"))
        .unwrap_or_else(|| panic!("no restore line on the console:\n{log}"))
        .to_string();
    let fetched = log
        .lines()
        .find(|l| l.contains("WAL file(s) shipped after snapshot"))
        .unwrap_or_else(|| panic!("first boot fetched no WAL:\n{log}"))
        .to_string();
    let mut up = false;
    while t.elapsed() < BOOT_TIMEOUT {
        let o = ssh(
            &dir,
            ssh_port,
            "sudo podman exec db pg_isready -q && echo up || true",
        );
        if o.contains("up") {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        up,
        "postgres did not start on the restored data:\n{}",
        ssh(&dir, ssh_port, "sudo podman logs db 2>&1 | tail -30")
    );
    eprintln!(
        "restore: {:.1}s to postgres up; console:\n{}\n{}",
        t.elapsed().as_secs_f64(),
        line.trim(),
        fetched.trim()
    );
    assert_eq!(
        sql(&dir, ssh_port, "select pg_is_in_recovery()"),
        "f",
        "PostgreSQL accepted connections before the replay ended"
    );
    let check = ssh(
        &dir,
        ssh_port,
        "sudo podman exec db pg_amcheck --install-missing --all --heapallindexed; echo amcheck=$?",
    );
    assert!(
        check.trim_end().ends_with("amcheck=0"),
        "pg_amcheck found corruption in the restored cluster:\n{check}"
    );
    let counts = sql(
        &dir,
        ssh_port,
        "select (select count(*) from pgbench_accounts) || ' ' || (select count(*) from pgbench_branches) || ' ' || (select count(*) from pgbench_tellers)",
    );
    assert_eq!(
        counts,
        format!("{} {} {}", SCALE * 100_000, SCALE, SCALE * 10),
        "pgbench tables lost rows"
    );
    let seq = sql(
        &dir,
        ssh_port,
        "select count(*) || ' ' || coalesce(max(id), 0) from seq",
    );
    let (n, max) = seq.split_once(' ').expect("count and max");
    let (n, max): (u64, u64) = (n.parse().unwrap(), max.parse().unwrap());
    let newest: f64 = sql(
        &dir,
        ssh_port,
        "select extract(epoch from max(at)) from seq",
    )
    .parse()
    .unwrap();
    let rpo = killed_at - newest;
    eprintln!(
        "restored ids 1..{max} ({n} rows); committed before the backup: {before}, after it: {after}, before the kill: {last_before_kill}\n\
         measured RPO (kill to the newest restored commit): {rpo:.1} s at archive_timeout = {ARCHIVE_TIMEOUT} s"
    );
    assert_eq!(
        n, max,
        "a gap in the committed ids: {n} rows up to id {max}"
    );
    assert!(
        max > after,
        "nothing committed after the snapshot was replayed: restored up to {max}, the backup ended at {after}"
    );
    // The writer runs on for the second between that count and the kill.
    assert!(
        max <= last_before_kill + 10,
        "restored ids that were never committed?"
    );
    assert!(
        rpo <= ARCHIVE_TIMEOUT as f64 + SHIP_MARGIN,
        "the crash lost {rpo:.1} s of commits, more than archive_timeout ({ARCHIVE_TIMEOUT} s) + {SHIP_MARGIN} s"
    );
    // The replay's files are cleaned up and the console says how far it got.
    let t = Instant::now();
    let mut done = String::new();
    while t.elapsed() < Duration::from_secs(60) {
        done = ssh(
            &dir,
            ssh_port,
            "sudo journalctl -u imgbuild-wal --no-pager -o cat | grep 'recovered to' || true; \
             sudo test -e /var/lib/containers/storage/volumes/pgdata-wal-spool/_data/restore && echo restore-dir-left || true",
        );
        if done.contains("recovered to") && !done.contains("restore-dir-left") {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    assert!(
        done.contains("recovered to") && !done.contains("restore-dir-left"),
        "the shipper did not report the end of the replay or left its files:\n{done}"
    );
    eprintln!("{}", done.trim());
    vm.kill();
}
