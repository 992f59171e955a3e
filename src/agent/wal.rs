//! Continuous PostgreSQL WAL shipping on the host, for volumes marked `postgres`.
//!
//! - `imgbuild postgres-prepare VOLUME` (ExecStartPre of the database's container)
//!   writes the archive settings into the data directory's `postgresql.auto.conf`:
//!   the archiver only *copies* each finished WAL file into a spool volume, so a slow
//!   or unreachable bucket never blocks PostgreSQL.
//! - `imgbuild wal-ship` (imgbuild-wal.service) seals each spooled file with the
//!   snapshot keys, uploads it (Object-Locked like a pack), then removes it from the
//!   spool; it exports the spool's size and the age of the oldest file not yet in the
//!   bucket for the monitoring host.
//! - At first boot, after the snapshot is restored, [`fetch_for_replay`] downloads the
//!   files shipped after the snapshot into the spool and sets PostgreSQL up to replay
//!   them to the end (`recovery.signal`, `restore_command`, `hot_standby = off`) before
//!   it accepts connections. Once it has promoted, the shipper removes what is left.
//! - The backup job records each snapshot's first needed WAL file (`wal_start`, read
//!   from `global/pg_control`), and prunes shipped files no kept snapshot needs.

use super::{human_age, log, HostPaths};
use crate::hostconfig::{BackupConfig, HostConfig, PostgresWal, VolumeBackup, WAL_SPOOL_MOUNT};
use crate::snapshot::format::{self, rfc3339};
use crate::snapshot::store::PutOutcome;
use crate::snapshot::wal::{self, WalName};
use crate::snapshot::{Keys, Store};
use anyhow::Context;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Where the archiver puts finished files, inside the spool volume. Not the volume's
/// root: podman hands an empty volume's root back to the container's user (root) when
/// it mounts it, and PostgreSQL runs as its own.
const ARCHIVE_DIR: &str = "archive";
/// Where first boot puts the files a replay needs, inside the spool volume.
const RESTORE_DIR: &str = "restore";
/// What first boot fetched, read back when PostgreSQL has finished the replay.
const REPLAY_NOTE: &str = ".imgbuild-replay.json";
/// Settings imgbuild owns in `postgresql.auto.conf`, rewritten at every start.
const ARCHIVE_KEYS: [&str; 3] = ["archive_mode", "archive_command", "archive_timeout"];
const DEFAULT_SEGMENT: u64 = 16 << 20;

/// The postgres volumes of a host, with their settings.
pub fn volumes(b: &BackupConfig) -> impl Iterator<Item = (&VolumeBackup, &PostgresWal)> {
    b.volumes
        .iter()
        .filter_map(|v| v.postgres.as_ref().map(|pg| (v, pg)))
}

pub fn data_dir(paths: &HostPaths, volume: &str, pg: &PostgresWal) -> PathBuf {
    let root = paths.volumes.join(volume).join("_data");
    if pg.data == "." || pg.data.is_empty() {
        root
    } else {
        root.join(&pg.data)
    }
}

pub fn spool_dir(paths: &HostPaths, pg: &PostgresWal) -> PathBuf {
    paths.volumes.join(&pg.spool_volume).join("_data")
}

/// The archiver's command: copy, flush, then rename into place, so the shipper never
/// sees half a file. A file already spooled (archived again after a crash) is success.
pub fn archive_command() -> String {
    let d = format!("{WAL_SPOOL_MOUNT}/{ARCHIVE_DIR}");
    format!(
        "test -f {d}/%f || {{ cp %p {d}/.%f.tmp && (sync {d}/.%f.tmp 2>/dev/null || sync) && mv {d}/.%f.tmp {d}/%f; }}"
    )
}

/// Replay reads what first boot fetched; a name it does not have ends the archive.
pub fn restore_command() -> String {
    format!("cp {WAL_SPOOL_MOUNT}/{RESTORE_DIR}/%f %p")
}

/// The segment holding the redo point of the data directory's last checkpoint: the
/// first WAL file a replay from a copy of this directory needs.
pub fn wal_start(data: &Path) -> Result<String, String> {
    let path = data.join("global/pg_control");
    let b = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if b.len() < 56 {
        return Err(format!("{}: {} bytes, too short", path.display(), b.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    // ControlFileData: system_identifier, pg_control_version, catalog_version_no,
    // state, time, checkPoint, then the checkpoint record (redo, ThisTimeLineID, ...),
    // laid out this way since PostgreSQL 9.6 (control version 960).
    let version = u32_at(8);
    if !(960..10_000).contains(&version) {
        return Err(format!(
            "{}: control file version {version} is not one this helper reads (PostgreSQL 9.6 or later)",
            path.display()
        ));
    }
    let (checkpoint, redo, tli) = (u64_at(32), u64_at(40), u32_at(48));
    if tli == 0 || redo > checkpoint {
        return Err(format!(
            "{}: implausible checkpoint (redo {redo:X}, checkpoint {checkpoint:X}, timeline {tli})",
            path.display()
        ));
    }
    Ok(wal::segment_name(tli, redo, segment_size(data)))
}

/// The cluster's WAL segment size: every segment file in pg_wal has exactly that size.
pub fn segment_size(data: &Path) -> u64 {
    std::fs::read_dir(data.join("pg_wal"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            matches!(
                WalName::parse(&e.file_name().to_string_lossy()),
                Some(WalName::Segment { .. })
            )
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .find(|n| n.is_power_of_two() && (1 << 20..=1 << 30).contains(n))
        .unwrap_or(DEFAULT_SEGMENT)
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn conf_key(line: &str) -> Option<&str> {
    let l = line.trim_start();
    if l.starts_with('#') {
        return None;
    }
    let k = l.split(['=', ' ', '\t']).next()?.trim();
    (!k.is_empty()).then_some(k)
}

fn conf_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter(|l| conf_key(l) == Some(key))
        .filter_map(|l| l.split_once('=').map(|(_, v)| v.trim()))
        .next_back()
}

/// Rewrites `postgresql.auto.conf`: lines for `set`'s keys and `remove` go, `set` is
/// appended. Written beside and renamed, owned like the data directory (PostgreSQL
/// refuses to start on a file it cannot read). Returns whether anything changed.
fn rewrite_auto_conf(
    data: &Path,
    set: &[(&str, String)],
    remove: &[&str],
) -> std::io::Result<bool> {
    let path = data.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n".into()
        }
        Err(e) => return Err(e),
    };
    let mut out = String::new();
    for l in old.lines() {
        let k = conf_key(l);
        if k.is_some_and(|k| set.iter().any(|(s, _)| *s == k) || remove.contains(&k)) {
            continue;
        }
        if l.starts_with("# imgbuild:") {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !set.is_empty() {
        out.push_str("# imgbuild: WAL archiving to S3 (imgbuild postgres-prepare rewrites these at every start)\n");
        for (k, v) in set {
            out.push_str(&format!("{k} = {}\n", quote(v)));
        }
    }
    if out == old {
        return Ok(false);
    }
    let meta = std::fs::metadata(data)?;
    let tmp = data.join(".postgresql.auto.conf.imgbuild");
    std::fs::write(&tmp, &out)?;
    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

fn archive_settings(pg: &PostgresWal) -> Vec<(&'static str, String)> {
    vec![
        ("archive_mode", "on".into()),
        ("archive_command", archive_command()),
        ("archive_timeout", format!("{}s", pg.archive_timeout_secs)),
    ]
}

fn configured(data: &Path) -> bool {
    std::fs::read_to_string(data.join("postgresql.auto.conf"))
        .map(|t| conf_value(&t, "archive_command") == Some(quote(&archive_command()).as_str()))
        .unwrap_or(false)
}

fn owner_of(p: &Path) -> Option<(u32, u32)> {
    std::fs::metadata(p).ok().map(|m| (m.uid(), m.gid()))
}

/// The archive directory in the spool must be writable by the user PostgreSQL runs
/// as (the data directory's owner), and the spool's root traversable by it.
fn own_spool(spool: &Path, data: &Path) -> std::io::Result<()> {
    let archive = spool.join(ARCHIVE_DIR);
    std::fs::create_dir_all(&archive)?;
    std::fs::set_permissions(spool, std::fs::Permissions::from_mode(0o755))?;
    if let Some((uid, gid)) = owner_of(data) {
        if owner_of(&archive) != Some((uid, gid)) {
            std::os::unix::fs::chown(&archive, Some(uid), Some(gid))?;
        }
    }
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o700))
}

fn copy_of_host() -> Option<&'static str> {
    if super::drill_mode::staging_copy() {
        Some("a staging copy (imgbuild run)")
    } else if super::drill_mode::active().is_some() {
        Some("a drill boot")
    } else {
        None
    }
}

/// `imgbuild postgres-prepare VOLUME`, before every start of the database container.
pub fn prepare(hc: &HostConfig, paths: &HostPaths, volume: &str) -> anyhow::Result<()> {
    let b = hc.backup.as_ref().context("host.toml has no [backup]")?;
    let (v, pg) = volumes(b)
        .find(|(v, _)| v.name == volume)
        .with_context(|| format!("volume {volume} ships no WAL in host.toml"))?;
    let data = data_dir(paths, &v.name, pg);
    let spool = spool_dir(paths, pg);
    let who = format!("imgbuild postgres-prepare {volume}");
    if !data.join("PG_VERSION").is_file() {
        std::fs::create_dir_all(&spool)
            .with_context(|| format!("creating the WAL spool {}", spool.display()))?;
        log(&format!(
            "{who}: no cluster in {} yet; imgbuild-wal.service turns archiving on once PostgreSQL has created it",
            data.display()
        ));
        return Ok(());
    }
    own_spool(&spool, &data)
        .with_context(|| format!("preparing the WAL spool {}", spool.display()))?;
    let recovering = data.join("recovery.signal").exists();
    // Recovery settings of a finished replay go; a copy of the host never archives
    // (nothing would ship its spool, and its WAL is not the host's).
    let mut remove: Vec<&str> = Vec::new();
    let text = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
    if !recovering
        && conf_value(&text, "restore_command") == Some(quote(&restore_command()).as_str())
    {
        remove.extend(["restore_command", "hot_standby"]);
    }
    let set = match copy_of_host() {
        Some(what) => {
            log(&format!("{who}: {what}: WAL archiving off"));
            remove.extend(ARCHIVE_KEYS);
            Vec::new()
        }
        None => archive_settings(pg),
    };
    if rewrite_auto_conf(&data, &set, &remove)
        .with_context(|| format!("writing {}/postgresql.auto.conf", data.display()))?
    {
        log(&format!(
            "{who}: archive settings written (archive_timeout {} s, spool {WAL_SPOOL_MOUNT})",
            pg.archive_timeout_secs
        ));
    }
    Ok(())
}

/// A file waiting in the spool.
struct Spooled {
    name: String,
    path: PathBuf,
    mtime: i64,
    size: u64,
}

fn mtime(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn spooled(spool: &Path) -> Vec<Spooled> {
    let mut out: Vec<Spooled> = std::fs::read_dir(spool)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            WalName::parse(&name)?;
            let m = e.metadata().ok().filter(|m| m.is_file())?;
            Some(Spooled {
                name,
                path: e.path(),
                mtime: mtime(&m),
                size: m.len(),
            })
        })
        .collect();
    // Histories sort before their timeline's segments ('.' < '0').
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Files PostgreSQL finished but has not handed to the archiver yet (the archive
/// command failing, or the archiver behind): (count, oldest completion time).
fn waiting_in_pg_wal(data: &Path) -> (u64, Option<i64>) {
    let status = data.join("pg_wal/archive_status");
    let mut n = 0;
    let mut oldest: Option<i64> = None;
    for e in std::fs::read_dir(status).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(seg) = name.strip_suffix(".ready") {
            n += 1;
            let t = std::fs::metadata(data.join("pg_wal").join(seg))
                .or_else(|_| e.metadata())
                .map(|m| mtime(&m))
                .unwrap_or(0);
            oldest = Some(oldest.map_or(t, |o: i64| o.min(t)));
        }
    }
    (n, oldest)
}

#[derive(Debug, Default, Clone)]
struct VolumeState {
    shipped: u64,
    shipped_bytes: u64,
    errors: u64,
    last_shipped: Option<i64>,
    restarted: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// How long the shipper keeps going once asked to stop: what the archiver handed over
/// on the way down still ships.
const LAST_PASS: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_secs(2);
const METRICS_EVERY: Duration = Duration::from_secs(15);

/// `imgbuild wal-ship` (imgbuild-wal.service): runs until SIGTERM.
pub fn ship_forever(hc: &HostConfig, paths: &HostPaths) -> anyhow::Result<()> {
    let b = hc.backup.as_ref().context("host.toml has no [backup]")?;
    if let Some(what) = copy_of_host() {
        log(&format!(
            "imgbuild wal: {what}: its WAL never goes to the host's bucket; not shipping"
        ));
        return Ok(());
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
    let target = super::target(&hc.host, b);
    let keys = target.keys()?;
    let rt = crate::snapshot::runtime()?;
    let mut store: Option<Store> = None;
    let names: Vec<String> = volumes(b).map(|(v, _)| v.name.clone()).collect();
    log(&format!(
        "imgbuild wal: shipping PostgreSQL WAL of {} to s3://{}/{}",
        names.join(", "),
        b.bucket,
        format::wal_root(&b.prefix)
    ));
    let mut state: Vec<VolumeState> = vec![VolumeState::default(); names.len()];
    let mut next_metrics = Instant::now();
    let mut backoff = POLL;
    let mut stop_at: Option<Instant> = None;
    let mut last_error_log = Instant::now() - Duration::from_secs(3600);
    loop {
        if STOP.load(Ordering::SeqCst) && stop_at.is_none() {
            stop_at = Some(Instant::now() + LAST_PASS);
            log("imgbuild wal: stopping: shipping what the spool holds first");
        }
        let mut failed = false;
        let mut left = 0usize;
        for ((v, pg), st) in volumes(b).zip(state.iter_mut()) {
            let data = data_dir(paths, &v.name, pg);
            let spool = spool_dir(paths, pg);
            if stop_at.is_none() {
                ensure_archiving(paths, v, pg, &data, &spool, st);
                finish_replay(v, &data, &spool);
            }
            let files = spooled(&spool.join(ARCHIVE_DIR));
            left += files.len();
            if files.is_empty() {
                continue;
            }
            if store.is_none() {
                match rt.block_on(target.connect()) {
                    Ok(s) => store = Some(s),
                    Err(e) => {
                        st.errors += 1;
                        failed = true;
                        if last_error_log.elapsed() > Duration::from_secs(60) {
                            log(&format!("imgbuild wal: cannot reach the bucket: {e}"));
                            last_error_log = Instant::now();
                        }
                        continue;
                    }
                }
            }
            let s = store.as_ref().expect("connected above");
            for f in files {
                if stop_at.is_some_and(|t| Instant::now() >= t) {
                    break;
                }
                match rt.block_on(ship_one(s, &keys, &hc.host, &v.name, &f)) {
                    Ok(outcome) => {
                        st.shipped += 1;
                        st.shipped_bytes += f.size;
                        st.last_shipped = Some(st.last_shipped.map_or(f.mtime, |t| t.max(f.mtime)));
                        left -= 1;
                        if outcome == PutOutcome::Exists {
                            log(&format!(
                                "imgbuild wal: {} {}: already in the bucket (archived twice); kept the stored one",
                                v.name, f.name
                            ));
                        }
                    }
                    Err(e) => {
                        st.errors += 1;
                        failed = true;
                        if last_error_log.elapsed() > Duration::from_secs(60) {
                            log(&format!(
                                "imgbuild wal: {} {}: not shipped yet: {e:#}",
                                v.name, f.name
                            ));
                            last_error_log = Instant::now();
                        }
                        break;
                    }
                }
            }
        }
        let stopping = stop_at.is_some();
        if Instant::now() >= next_metrics || stopping {
            if let Err(e) = write_metrics(hc, b, paths, &state) {
                log(&format!("imgbuild wal: cannot write metrics: {e}"));
            }
            next_metrics = Instant::now() + METRICS_EVERY;
        }
        if stopping && (left == 0 || stop_at.is_some_and(|t| Instant::now() >= t)) {
            if left > 0 {
                log(&format!(
                    "imgbuild wal: stopped with {left} file(s) still in the spool; they ship at the next start"
                ));
            }
            return Ok(());
        }
        backoff = if failed {
            store = None;
            (backoff * 2).min(Duration::from_secs(30))
        } else {
            POLL
        };
        let until = Instant::now() + backoff;
        while Instant::now() < until && (stopping || !STOP.load(Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

async fn ship_one(
    store: &Store,
    keys: &Keys,
    host: &str,
    volume: &str,
    f: &Spooled,
) -> anyhow::Result<PutOutcome> {
    let data = std::fs::read(&f.path).with_context(|| format!("reading {}", f.path.display()))?;
    let outcome = wal::ship(store, keys, host, volume, &f.name, &data, f.mtime).await?;
    std::fs::remove_file(&f.path).with_context(|| format!("removing {}", f.path.display()))?;
    if let Some(dir) = f.path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(outcome)
}

/// A cluster PostgreSQL created on an empty volume after its container's
/// ExecStartPre ran has no archive settings yet: write them and restart the database
/// once, so archiving starts on the first day and not at the next reboot.
fn ensure_archiving(
    paths: &HostPaths,
    v: &VolumeBackup,
    pg: &PostgresWal,
    data: &Path,
    spool: &Path,
    st: &mut VolumeState,
) {
    // PG_VERSION appears before initdb has written its configuration; a server that
    // says "ready" in postmaster.pid is past initdb and out of recovery.
    if st.restarted || !server_ready(data) || data.join("recovery.signal").exists() {
        return;
    }
    if configured(data) {
        if let Err(e) = own_spool(spool, data) {
            log(&format!(
                "imgbuild wal: {}: WAL spool {}: {e}",
                v.name,
                spool.display()
            ));
        }
        return;
    }
    st.restarted = true;
    let r =
        own_spool(spool, data).and_then(|_| rewrite_auto_conf(data, &archive_settings(pg), &[]));
    if let Err(e) = r {
        log(&format!(
            "imgbuild wal: {}: cannot turn archiving on: {e}",
            v.name
        ));
        return;
    }
    let unit = format!("{}.service", pg.container);
    log(&format!(
        "imgbuild wal: {}: PostgreSQL created a new cluster; restarting {unit} once so WAL archiving starts",
        v.name
    ));
    match std::process::Command::new(&paths.systemctl)
        .args(["try-restart", &unit])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => log(&format!("imgbuild wal: systemctl try-restart {unit}: {s}")),
        Err(e) => log(&format!("imgbuild wal: systemctl try-restart {unit}: {e}")),
    }
}

/// Whether a postmaster runs on `data` and accepts connections (the status line
/// PostgreSQL keeps last in postmaster.pid).
fn server_ready(data: &Path) -> bool {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .map(|t| t.lines().last().map(str::trim) == Some("ready"))
        .unwrap_or(false)
}

/// Once PostgreSQL has promoted (its recovery.signal is gone), the files first boot
/// fetched are no longer needed; the console hears how far the replay got.
fn finish_replay(v: &VolumeBackup, data: &Path, spool: &Path) {
    let dir = spool.join(RESTORE_DIR);
    if !dir.is_dir() || data.join("recovery.signal").exists() || !server_ready(data) {
        return;
    }
    let note: Option<serde_json::Value> = std::fs::read(dir.join(REPLAY_NOTE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(n) = note {
        let up_to = n["up_to"].as_i64().unwrap_or(0);
        log(&format!(
            "imgbuild wal: volume {}: PostgreSQL replayed the WAL shipped after snapshot {} and accepts connections: recovered to {} ({} WAL file(s))",
            v.name,
            n["snapshot"].as_str().unwrap_or("?"),
            rfc3339(up_to),
            n["files"].as_u64().unwrap_or(0),
        ));
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        log(&format!(
            "imgbuild wal: cannot remove {}: {e}",
            dir.display()
        ));
    }
}

fn write_metrics(
    hc: &HostConfig,
    b: &BackupConfig,
    paths: &HostPaths,
    state: &[VolumeState],
) -> std::io::Result<()> {
    let dir = Path::new(&hc.metrics_dir);
    std::fs::create_dir_all(dir)?;
    let host = hc.host.replace(['\\', '"', '\n'], "_");
    let now = crate::snapshot::backup::now_unix();
    let mut t = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, rows: &[(String, String)]| {
        t.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in rows {
            t.push_str(&format!("{name}{{{labels}}} {v}\n"));
        }
    };
    let mut spool_bytes = vec![];
    let mut spool_files = vec![];
    let mut pending = vec![];
    let mut oldest = vec![];
    let mut last = vec![];
    let mut shipped = vec![];
    let mut errors = vec![];
    for ((v, pg), st) in volumes(b).zip(state) {
        let l = format!("host=\"{host}\",volume=\"{}\"", v.name);
        let files = spooled(&spool_dir(paths, pg).join(ARCHIVE_DIR));
        let (ready, ready_oldest) = waiting_in_pg_wal(&data_dir(paths, &v.name, pg));
        let o = files
            .iter()
            .map(|f| f.mtime)
            .chain(ready_oldest)
            .min()
            .unwrap_or(0);
        spool_bytes.push((
            l.clone(),
            files.iter().map(|f| f.size).sum::<u64>().to_string(),
        ));
        spool_files.push((l.clone(), files.len().to_string()));
        pending.push((l.clone(), ready.to_string()));
        oldest.push((l.clone(), o.to_string()));
        last.push((l.clone(), st.last_shipped.unwrap_or(0).to_string()));
        shipped.push((l.clone(), st.shipped.to_string()));
        errors.push((l, st.errors.to_string()));
    }
    metric(
        "imgbuild_wal_spool_bytes",
        "Bytes of finished WAL files waiting in the spool to be shipped.",
        "gauge",
        &spool_bytes,
    );
    metric(
        "imgbuild_wal_spool_files",
        "Finished WAL files waiting in the spool.",
        "gauge",
        &spool_files,
    );
    metric(
        "imgbuild_wal_archiver_pending_files",
        "WAL files PostgreSQL finished but has not archived into the spool yet (.ready).",
        "gauge",
        &pending,
    );
    metric(
        "imgbuild_wal_oldest_unshipped_timestamp_seconds",
        "Completion time of the oldest finished WAL file not yet in the bucket; 0 when none waits.",
        "gauge",
        &oldest,
    );
    metric("imgbuild_wal_last_shipped_timestamp_seconds", "Completion time of the newest WAL file this shipper put in the bucket; 0 before the first.", "gauge", &last);
    metric(
        "imgbuild_wal_shipped_files_total",
        "WAL files shipped since the shipper started.",
        "counter",
        &shipped,
    );
    metric(
        "imgbuild_wal_ship_errors_total",
        "Failed attempts to ship (bucket unreachable, refused) since the shipper started.",
        "counter",
        &errors,
    );
    metric(
        "imgbuild_wal_shipper_heartbeat_timestamp_seconds",
        "When the shipper last wrote these metrics.",
        "gauge",
        &[(format!("host=\"{host}\""), now.to_string())],
    );
    let path = dir.join("imgbuild_wal.prom");
    let tmp = dir.join(".imgbuild_wal.prom.tmp");
    std::fs::write(&tmp, t)?;
    std::fs::rename(&tmp, &path)
}

/// What first boot fetched for one volume's replay.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Replay {
    pub files: u64,
    pub bytes: u64,
    /// Completion time of the newest segment before any gap: the replay recovers the
    /// commits made until then.
    pub up_to: i64,
    pub seconds: f64,
}

/// After `volume` was restored from snapshot `snapshot_id` (whose `wal_start` is
/// given), fetches every WAL file shipped since into the spool and sets PostgreSQL up
/// to replay them before it accepts connections. `None`: nothing to replay.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_for_replay(
    store: &Store,
    keys: &Keys,
    host: &str,
    paths: &HostPaths,
    v: &VolumeBackup,
    pg: &PostgresWal,
    snapshot_id: &str,
    snapshot_time: i64,
    wal_start: Option<&str>,
) -> anyhow::Result<Option<Replay>> {
    let who = format!("imgbuild firstboot: volume {}", v.name);
    let data = data_dir(paths, &v.name, pg);
    let Some(start) = wal_start else {
        log(&format!(
            "{who}: snapshot {snapshot_id} records no WAL position (taken before WAL shipping, or no cluster yet): no WAL replay"
        ));
        return Ok(None);
    };
    if !data.join("PG_VERSION").is_file() {
        log(&format!(
            "{who}: no PostgreSQL cluster in {}: no WAL replay",
            data.display()
        ));
        return Ok(None);
    }
    let t = Instant::now();
    let listed = wal::list(store, &v.name).await?;
    let need = wal::needed(&listed, start, segment_size(&data));
    let Some(last) = need.last else {
        log(&format!(
            "{who}: no WAL shipped from {start} on; PostgreSQL recovers from the snapshot alone"
        ));
        return Ok(None);
    };
    if let Some(gap) = need.gap {
        log(&format!(
            "{who}: WARNING: WAL file at position {gap:016X} is missing from the bucket; the replay stops before it and later files are not used"
        ));
    }
    let spool = spool_dir(paths, pg);
    own_spool(&spool, &data)?;
    let dir = spool.join(RESTORE_DIR);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let owner = owner_of(&data);
    let (mut files, mut bytes, mut up_to) = (0u64, 0u64, 0i64);
    // Histories first: a file that does not open ends the segments, and the
    // timelines' histories must be there whichever segment that is.
    let mut order: Vec<&wal::Listed> = need.files.iter().collect();
    order.sort_by_key(|f| f.kind.pos().is_some());
    for f in order {
        if f.kind.pos().is_some_and(|p| p > last) {
            continue;
        }
        let (body, completed) = match wal::fetch(store, keys, host, &v.name, &f.name).await {
            Ok(x) => x,
            // Like a gap: what came before still replays, nothing after it can.
            Err(e @ crate::snapshot::SnapshotError::BadWal { .. }) => {
                log(&format!(
                    "{who}: WARNING: {e}; the replay stops before it and later files are not used"
                ));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let path = dir.join(&f.name);
        let tmp = dir.join(format!(".{}.tmp", f.name));
        std::fs::write(&tmp, &body).with_context(|| format!("writing {}", tmp.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, &path)?;
        files += 1;
        bytes += body.len() as u64;
        if f.kind.pos().is_some() {
            up_to = up_to.max(completed);
        }
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    }
    let replay = Replay {
        files,
        bytes,
        up_to,
        seconds: t.elapsed().as_secs_f64(),
    };
    std::fs::write(
        dir.join(REPLAY_NOTE),
        serde_json::json!({"snapshot": snapshot_id, "files": files, "up_to": up_to}).to_string(),
    )?;
    let signal = data.join("recovery.signal");
    std::fs::write(&signal, b"")?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&signal, Some(uid), Some(gid))?;
    }
    // hot_standby off: no connection sees the database until the whole replay is done.
    let mut set = archive_settings(pg);
    set.push(("restore_command", restore_command()));
    set.push(("hot_standby", "off".into()));
    rewrite_auto_conf(&data, &set, &[])?;
    super::firstboot::sync_filesystem(&paths.volumes)?;
    log(&format!(
        "{who}: {files} WAL file(s) shipped after snapshot {snapshot_id} fetched ({bytes} bytes in {:.1}s); PostgreSQL replays them up to {} ({} after the snapshot's start) before it accepts connections",
        replay.seconds,
        rfc3339(up_to),
        human_age(up_to - snapshot_time),
    ));
    Ok(Some(replay))
}

/// The first WAL file each snapshot still kept needs decides what goes: files before
/// the oldest of them are deleted (after the snapshot prune). A kept snapshot that
/// does not record its position keeps everything: nothing it may need is guessed away.
pub async fn retain(
    store: &Store,
    keys: &Keys,
    b: &BackupConfig,
) -> anyhow::Result<Vec<(String, wal::RetainReport)>> {
    let ids = crate::snapshot::restore::list_ids(store).await?;
    let mut starts: Vec<(String, Option<String>)> = Vec::new();
    for id in &ids {
        let m = crate::snapshot::restore::load_manifest(store, keys, id).await?;
        for mv in m.volumes {
            starts.push((mv.name, mv.wal_start));
        }
    }
    let mut out = Vec::new();
    for (v, _) in volumes(b) {
        let mut keep_from: Option<u64> = None;
        let mut unknown = false;
        for (_, s) in starts.iter().filter(|(n, _)| *n == v.name) {
            match s.as_deref().and_then(WalName::parse).and_then(|n| n.pos()) {
                Some(p) => keep_from = Some(keep_from.map_or(p, |k| k.min(p))),
                None => unknown = true,
            }
        }
        let Some(k) = keep_from.filter(|_| !unknown) else {
            continue;
        };
        out.push((v.name.clone(), wal::retain(store, &v.name, k).await?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(version: u32, checkpoint: u64, redo: u64, tli: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[32..40].copy_from_slice(&checkpoint.to_le_bytes());
        b[40..48].copy_from_slice(&redo.to_le_bytes());
        b[48..52].copy_from_slice(&tli.to_le_bytes());
        b
    }

    #[test]
    fn wal_start_reads_the_redo_segment() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("global")).unwrap();
        std::fs::create_dir_all(d.path().join("pg_wal")).unwrap();
        std::fs::write(
            d.path().join("global/pg_control"),
            control(1700, 0x0700_1000, 0x0612_3456, 1),
        )
        .unwrap();
        assert_eq!(wal_start(d.path()).unwrap(), "000000010000000000000006");
        // 64 MiB segments, seen from a file in pg_wal
        let f = std::fs::File::create(d.path().join("pg_wal/000000010000000000000001")).unwrap();
        f.set_len(64 << 20).unwrap();
        assert_eq!(segment_size(d.path()), 64 << 20);
        assert_eq!(wal_start(d.path()).unwrap(), "000000010000000000000001");
        std::fs::write(d.path().join("global/pg_control"), control(12, 1, 0, 1)).unwrap();
        assert!(wal_start(d.path()).unwrap_err().contains("version 12"));
        std::fs::write(d.path().join("global/pg_control"), control(1300, 5, 9, 1)).unwrap();
        assert!(wal_start(d.path()).unwrap_err().contains("implausible"));
        std::fs::write(d.path().join("global/pg_control"), [0u8; 10]).unwrap();
        assert!(wal_start(d.path()).unwrap_err().contains("too short"));
    }

    #[test]
    fn auto_conf_keeps_other_settings_and_replaces_ours() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("postgresql.auto.conf");
        std::fs::write(
            &p,
            "# Do not edit this file manually!\nwork_mem = '64MB'\narchive_mode = 'off'\n",
        )
        .unwrap();
        let pg = PostgresWal {
            container: "db".into(),
            data: ".".into(),
            spool_volume: "x".into(),
            archive_timeout_secs: 30,
            rpo_secs: 90,
        };
        assert!(rewrite_auto_conf(d.path(), &archive_settings(&pg), &[]).unwrap());
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains("work_mem = '64MB'"), "{t}");
        assert_eq!(conf_value(&t, "archive_mode"), Some("'on'"));
        assert_eq!(conf_value(&t, "archive_timeout"), Some("'30s'"));
        assert!(configured(d.path()));
        assert_eq!(t.matches("archive_mode").count(), 1, "{t}");
        // again: nothing to change
        assert!(!rewrite_auto_conf(d.path(), &archive_settings(&pg), &[]).unwrap());
        assert!(rewrite_auto_conf(d.path(), &[], &ARCHIVE_KEYS).unwrap());
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(!t.contains("archive_"), "{t}");
        assert!(t.contains("work_mem"), "{t}");
        // the command quotes survive PostgreSQL's quoting rules
        assert!(!archive_command().contains('\''));
    }
}
