//! `imgbuild drill`: a disaster-recovery rehearsal in one command. The host's image boots
//! in QEMU with no route anywhere (user-mode network with `restrict=on`); its one door
//! is a guestfwd to [`gateway`], which serves the host's snapshots read-only from the
//! real bucket. The guest is told it is drilled by a systemd credential
//! (`crate::agent::drill_mode`, the protocol both sides share):
//! first boot restores the pinned snapshot through the gateway with backups and
//! WireGuard off, `imgbuild ready` lists every unit's state. The workstation times the
//! boot (RTO), judges the snapshot's age (RPO), checks the published ports through
//! host forwards, and reports. Exit 0 passed, 1 failed (with named reasons), 2 usage.

pub mod gateway;

use crate::agent::drill_mode as guest;

use crate::cli::DrillArgs;
use crate::hostconfig::RestorePolicy;
use crate::progress::Progress;
use crate::qemu::{self, RunOptions, SerialTarget};
use crate::snapshot::{self, restore, Target};
use anyhow::{Context, Result};
use guest::{RestoreLine, UnitLine};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the guest's own restore retries transport errors.
const GUEST_RESTORE_TIMEOUT: u64 = 120;
/// HTTP/TCP checks: the unit is active, the app may still be binding its port.
const CHECK_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// Backup start (seconds since the epoch): the verified manifest's when the guest
    /// restored it, else the time in the id.
    pub time: i64,
    pub taken: String,
    pub age_seconds: i64,
    pub rpo_hours: u32,
    pub within_rpo: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreInfo {
    pub ok: bool,
    pub bytes: u64,
    pub files: u64,
    pub volumes: u64,
    pub seconds: f64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub container: String,
    /// `http` (the container's `check` path) or `tcp` (a connection is accepted).
    pub kind: String,
    /// The host's published port (in the guest).
    pub port: u16,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketInfo {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub writes_attempted: u64,
    pub writes_refused: u64,
    pub gateway: gateway::GatewayStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub host: String,
    pub env: String,
    pub ok: bool,
    /// Every reason the drill failed, one line each.
    pub failures: Vec<String>,
    pub snapshot: Option<SnapshotInfo>,
    pub restore: Option<RestoreInfo>,
    /// From QEMU start to the readiness line, seconds.
    pub rto_seconds: Option<f64>,
    pub ready_line: Option<String>,
    pub accel: Option<String>,
    pub units: Vec<UnitLine>,
    pub checks: Vec<Check>,
    pub bucket: BucketInfo,
    pub image: Option<PathBuf>,
    pub image_verified: bool,
    /// The guest could reach the internet (`--allow-egress`); otherwise it had no route
    /// but the gateway and the forwarded ports.
    pub egress: bool,
    pub console_log: Option<PathBuf>,
}

/// Unix time from a snapshot id (`YYYYMMDDTHHMMSS.mmmZ-…`, UTC).
pub fn id_time(id: &str) -> Option<i64> {
    if !snapshot::format::is_snapshot_id(id) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| id.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi, s) = (n(9..11)?, n(11..13)?, n(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// "3 d", "5 h", "12 min", "40 s": ages as a person reads them in a report.
pub fn human_age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

fn now() -> i64 {
    snapshot::backup::now_unix()
}

/// The `imgbuild drill` verb.
pub fn run(args: &DrillArgs) -> Result<i32> {
    use is_terminal::IsTerminal;
    let progress = if !args.json && !args.quiet && std::io::stderr().is_terminal() {
        Progress::detect(false)
    } else {
        // Cron mails whatever is printed: steps are noise there, the report is not.
        Progress::quiet()
    };
    let (input, root) = crate::workstation::load(&args.profile, &progress)?;
    let tree = crate::render::render(&input, crate::render::Target::Image)?;
    let hc = crate::workstation::host_config_of(&tree)?;
    let usage = |msg: String| -> Result<i32> {
        eprintln!("error: {msg}");
        Ok(2)
    };
    let Some(bc) = &hc.backup else {
        return usage(format!(
            "{}: the profile has no [backup] section: there is nothing to restore in a drill",
            input.host.path.display()
        ));
    };
    if bc.restore == RestorePolicy::Skip {
        return usage(format!(
            "{}: backup.restore = \"skip\" (env {}): the image never restores, so a drill cannot either",
            input.host.path.display(),
            input.host.env
        ));
    }
    let rpo_hours = input
        .host
        .profile
        .backup
        .as_ref()
        .map(|b| b.rpo_hours)
        .unwrap_or(30);
    let overrides = args.bucket.overrides();
    let mut target = crate::workstation::target(&hc.host, bc, &input.secrets_dir, &overrides);
    crate::workstation::use_secrets(&mut target, &input.secrets)?;
    let mut report = Report {
        host: hc.host.clone(),
        env: input.host.env.clone(),
        ok: false,
        failures: Vec::new(),
        snapshot: None,
        restore: None,
        rto_seconds: None,
        ready_line: None,
        accel: None,
        units: Vec::new(),
        checks: Vec::new(),
        bucket: BucketInfo {
            bucket: target.store.bucket.clone(),
            prefix: target.store.prefix.clone(),
            endpoint: target.store.endpoint.clone(),
            writes_attempted: 0,
            writes_refused: 0,
            gateway: gateway::GatewayStats::default(),
        },
        image: None,
        image_verified: false,
        egress: args.allow_egress,
        console_log: args.console_log.clone(),
    };
    let rt = snapshot::runtime()?;
    let drilled = drill(
        args,
        &input,
        &root,
        &target,
        rpo_hours,
        &rt,
        &progress,
        &mut report,
    );
    if let Err(e) = drilled {
        report.failures.push(format!("{e:#}"));
    }
    // Decided from the snapshot alone, yet the drill still boots: an old snapshot that
    // restores is worth knowing as much as one that does not.
    if let Some(s) = report.snapshot.as_ref().filter(|s| !s.within_rpo) {
        report.failures.insert(
            0,
            format!(
                "snapshot {}: {} old, older than the RPO of {} h",
                s.id,
                human_age(s.age_seconds),
                s.rpo_hours
            ),
        );
    }
    report.ok = report.failures.is_empty();
    print_report(&report, args);
    Ok(if report.ok { 0 } else { 1 })
}

#[allow(clippy::too_many_arguments)]
fn drill(
    args: &DrillArgs,
    input: &crate::render::RenderInput,
    root: &crate::secrets::SecretsRoot,
    target: &Target,
    rpo_hours: u32,
    rt: &tokio::runtime::Runtime,
    progress: &Progress,
    report: &mut Report,
) -> Result<()> {
    // The snapshot: chosen here, pinned for the guest, so a broken newest snapshot
    // fails the drill instead of the guest silently restoring an older one.
    let store = rt
        .block_on(target.connect())
        .context("connecting to the bucket")?;
    let ids = rt
        .block_on(restore::list_ids(&store))
        .context("listing snapshots")?;
    let where_ = format!("s3://{}/{}", store.bucket, store.prefix);
    // Locked snapshots someone hid with a delete marker: a failure of the drill (the
    // bucket is not in the state the host believes), restorable with --snapshot.
    let hidden = rt
        .block_on(restore::hidden_snapshots(&store))
        .context("listing object versions under snapshots/")?;
    for h in &hidden {
        report.failures.push(format!(
            "snapshot {} is hidden by a delete marker although locked until {}: someone deleted it (tampering?); drill it with --snapshot {}",
            h.id,
            snapshot::format::rfc3339(h.locked_until),
            h.id
        ));
    }
    let id = match &args.snapshot {
        Some(want) if ids.contains(want) || hidden.iter().any(|h| &h.id == want) => want.clone(),
        Some(want) => anyhow::bail!("snapshot {want} not found in {where_}"),
        None => match ids.last() {
            Some(id) => id.clone(),
            None => {
                // The empty-start marker means a first deployment that has not backed up
                // yet; without it, the bucket, prefix or endpoint is likely wrong.
                let keys = target.keys()?;
                match rt.block_on(snapshot::marker::read(&store, &keys, &target.host)) {
                    Ok(Some(m)) => anyhow::bail!(
                        "no snapshot in {where_} yet: it holds only the empty-start marker `imgbuild init` wrote {} (a first deployment): nothing to drill until the host's first backup",
                        snapshot::format::rfc3339(m.created)
                    ),
                    Ok(None) => anyhow::bail!(
                        "no snapshot and no empty-start marker in {where_}: nothing to restore (a first deployment needs `imgbuild init`; otherwise check the bucket, prefix and endpoint)"
                    ),
                    Err(e) => anyhow::bail!("no snapshot in {where_}, and {e}"),
                }
            }
        },
    };
    let time = id_time(&id).unwrap_or(0);
    let set_snapshot = |report: &mut Report, time: i64| {
        let age = now() - time;
        report.snapshot = Some(SnapshotInfo {
            id: id.clone(),
            time,
            taken: snapshot::format::rfc3339(time),
            age_seconds: age,
            rpo_hours,
            within_rpo: age <= i64::from(rpo_hours) * 3600,
        });
    };
    set_snapshot(report, time);

    // The image: the one given (verified like `imgbuild verify`), or a fresh build.
    let scratch = tempfile::Builder::new()
        .prefix("imgbuild-drill-")
        .tempdir()
        .context("creating a scratch directory")?;
    let image = match &args.image {
        Some(p) => {
            let key = crate::workstation::builder_pubkey(args.key.as_deref(), root)?;
            let step = progress.step("verify", None);
            let verified = crate::image::verify(p, &key)
                .with_context(|| format!("{} does not verify", p.display()))?;
            step.finish();
            report.image_verified = true;
            if args.allow_egress {
                check_image_for_egress(&verified.manifest.host_tree_digest, input)?;
            }
            p.clone()
        }
        None => {
            let out = scratch.path().join(format!("{}.raw", input.host.name()));
            let opts = crate::cmd::build::DiskOptions {
                out: out.clone(),
                qcow2: false,
                base: None,
                refresh_base: false,
                helper_bin: std::env::current_exe().context("locating this imgbuild binary")?,
            };
            crate::cmd::build::disk_image(&guest_input(input), root, &opts, progress)
                .context("building the image to drill")?;
            out
        }
    };
    report.image = Some(image.clone());

    // The door: the read-only gateway, and the credential that points the guest at it.
    let gw = gateway::Gateway::start(store.clone(), rt.handle().clone())?;
    let cfg = drill_config(input, &store.bucket, &store.prefix, &id);
    let serial = args
        .console_log
        .clone()
        .unwrap_or_else(|| scratch.path().join("console.log"));
    let _ = std::fs::remove_file(&serial);
    let mut opts = RunOptions::new(&image);
    opts.serial = SerialTarget::File(serial.clone());
    opts.memory_mib = args.memory;
    opts.cpus = args.cpus;
    opts.restrict = !args.allow_egress;
    // One relay process per guest connection (the restore fetches in parallel); a
    // plain chardev guestfwd would carry a single connection.
    let exe = std::env::current_exe().context("locating this imgbuild binary")?;
    opts.guest_forward_cmds = vec![(
        guest::GATEWAY_ADDR,
        guest::GATEWAY_PORT,
        format!(
            "'{}' drill-relay {}",
            exe.display().to_string().replace('\'', "'\\''"),
            gw.port()
        ),
    )];
    opts.credentials = vec![(guest::CREDENTIAL.into(), serde_json::to_vec(&cfg)?)];
    // Public TCP ports, each forwarded from a free port on the host's 127.0.0.1.
    let mut probes = Vec::new();
    for (name, c) in &input.host.profile.containers {
        if let Some(port) = crate::profile::public_tcp_port(c) {
            let host_port = free_port()?;
            opts.forwards.push((host_port, port));
            probes.push((name.clone(), port, host_port, c.check.clone()));
        }
    }

    let outcome = boot_and_watch(&opts, &serial, &report.host, args.timeout, progress);
    let stats = gw.stats();
    report.bucket.writes_attempted = stats.writes_refused;
    report.bucket.writes_refused = stats.writes_refused;
    report.bucket.gateway = stats;
    let mut vm = match outcome {
        Ok(w) => w,
        Err(e) => {
            finish_restore_info(report, &serial, rpo_hours, &set_snapshot);
            return Err(e);
        }
    };
    report.accel = Some(format!("{:?}", vm.vm.accel).to_lowercase());
    report.rto_seconds = vm.rto.map(|d| d.as_secs_f64());
    report.ready_line = vm.ready_line.clone();
    let log = read_log(&serial);
    report.units = log.lines().filter_map(UnitLine::parse).collect();
    let restored = finish_restore_info(report, &serial, rpo_hours, &set_snapshot);

    if vm.ready_line.is_some() {
        let step = progress.step("checks", None);
        for (name, port, host_port, path) in &probes {
            report
                .checks
                .push(probe(name, *port, *host_port, path.as_deref()));
        }
        step.finish();
    }
    vm.vm.kill();
    let stats = gw.stats();
    report.bucket.writes_attempted = stats.writes_refused;
    report.bucket.writes_refused = stats.writes_refused;
    report.bucket.gateway = stats;
    drop(gw);

    // The verdict, one named reason per problem.
    let f = &mut report.failures;
    if let Some(r) = &report.restore {
        if let Some(e) = &r.error {
            f.push(format!("restore failed: {e}"));
        }
    }
    if !restored && vm.stopped.is_none() {
        f.push("the guest reported no restore (is the image older than `imgbuild drill`?)".into());
    }
    if let Some(reason) = &vm.stopped {
        f.push(reason.clone());
    }
    for u in &report.units {
        match u.state.as_str() {
            "up" if u.health == "unhealthy" => {
                f.push(format!("unit {}: container unhealthy", u.unit))
            }
            "up" => {}
            "failed" => f.push(format!(
                "unit {} failed{}",
                u.unit,
                u.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )),
            _ => f.push(format!(
                "unit {} not ready{}",
                u.unit,
                u.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )),
        }
    }
    if let Some(line) = &report.ready_line {
        if report.units.is_empty() && line.contains(" FAILED: ") {
            f.push(line.trim().to_string());
        }
    }
    for c in &report.checks {
        if !c.ok {
            f.push(format!("check {} failed: {}", c.container, c.detail));
        }
    }
    if report.bucket.writes_attempted > 0 {
        f.push(format!(
            "the drilled guest attempted {} bucket write(s) (all refused by the gateway): {}",
            report.bucket.writes_attempted,
            report.bucket.gateway.refused.join(", ")
        ));
    }
    if args.console_log.is_none() && !f.is_empty() && !args.json {
        // The scratch dir goes away with this function: the console is the evidence.
        eprintln!("--- last console lines ---\n{}", tail(&log, 40));
    }
    Ok(())
}

/// What the drilled guest is told (as a systemd credential): the gateway's address,
/// the bucket and prefix it serves, the pinned snapshot. No credentials: the gateway
/// holds the workstation's, and the guest presents dummies it ignores.
pub fn drill_config(
    input: &crate::render::RenderInput,
    bucket: &str,
    prefix: &str,
    snapshot: &str,
) -> guest::DrillConfig {
    guest::DrillConfig {
        endpoint: format!("http://{}:{}", guest::GATEWAY_ADDR, guest::GATEWAY_PORT),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        snapshot: Some(snapshot.to_string()),
        restore_timeout_secs: GUEST_RESTORE_TIMEOUT,
        ready_timeout_secs: input.host.profile.host.ready_timeout,
        wireguard_interfaces: input
            .host
            .profile
            .wireguard
            .iter()
            .map(|w| w.interface.clone())
            .collect(),
    }
}

/// The `s3.env` of an image the drill builds, in place of the host's: the same
/// dummies the drilled first boot presents to the gateway.
pub const DRILL_S3_ENV: &str =
    "# imgbuild drill: not the host's credentials; the bucket is read through the drill's gateway\nAWS_ACCESS_KEY_ID=imgbuild-drill\nAWS_SECRET_ACCESS_KEY=imgbuild-drill\n";

/// The input the drill builds its image from: the host's own, except that the bucket
/// credentials (`s3.env`) are replaced by [`DRILL_S3_ENV`]. The guest reads the bucket
/// only through the gateway, which holds the workstation's credentials; with
/// `--allow-egress` it can reach the internet, and real keys on its disk would let it
/// reach the bucket around the gateway, writes included.
pub fn guest_input(input: &crate::render::RenderInput) -> crate::render::RenderInput {
    let mut g = input.clone();
    if g.keys.s3_env.is_some() {
        g.keys.s3_env = Some(DRILL_S3_ENV.to_string());
    }
    g
}

/// `--allow-egress` with `--image`: the image is booted as it is, and one built for
/// deployment carries the host's bucket credentials. It may have the internet only
/// when its signed manifest shows it is this profile rendered without real
/// credentials (the drill's dummies, or no `s3.env` at all).
pub fn check_image_for_egress(
    manifest_tree_digest: &str,
    input: &crate::render::RenderInput,
) -> Result<()> {
    let mut bare = input.clone();
    bare.keys.s3_env = None;
    for candidate in [guest_input(input), bare] {
        let tree = crate::render::render(&candidate, crate::render::Target::Image)?;
        if tree.digest() == manifest_tree_digest {
            return Ok(());
        }
    }
    anyhow::bail!(
        "--allow-egress with --image: the image may carry {}'s bucket credentials (s3.env), and a guest that can reach the internet could use them to reach the bucket around the read-only gateway, writes included. Drop --image (the drill then builds its own image, with dummy credentials in place of the real ones), or drop --allow-egress",
        input.host.name()
    )
}

/// `imgbuild drill-relay PORT`, run by QEMU for each connection the guest opens to the
/// gateway's address: stdin/stdout (and stderr) are that connection, so this copies
/// bytes both ways to the gateway on 127.0.0.1 and never prints anything.
pub fn relay(port: u16) -> i32 {
    use std::net::{Shutdown, TcpStream};
    use std::os::fd::AsFd;
    let run = || -> std::io::Result<()> {
        let mut from_guest = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        let mut to_guest = from_guest.try_clone()?;
        let gw = TcpStream::connect(("127.0.0.1", port))?;
        let mut from_gw = gw.try_clone()?;
        let mut to_gw = gw;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_guest, &mut to_gw);
            let _ = to_gw.shutdown(Shutdown::Write);
        });
        std::io::copy(&mut from_gw, &mut to_guest)?;
        Ok(())
    };
    // Exiting closes the guest's connection; a thread still reading it ends with us.
    match run() {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Fills `report.restore` from the console; true when a restore line was found.
fn finish_restore_info(
    report: &mut Report,
    serial: &Path,
    _rpo_hours: u32,
    set_snapshot: &dyn Fn(&mut Report, i64),
) -> bool {
    let log = read_log(serial);
    if let Some(r) = log.lines().find_map(RestoreLine::parse) {
        // The verified manifest's time beats the one in the id.
        set_snapshot(report, r.time);
        report.restore = Some(RestoreInfo {
            ok: true,
            bytes: r.bytes,
            files: r.files,
            volumes: r.volumes,
            seconds: r.seconds,
            error: None,
        });
        return true;
    }
    if let Some(e) = log.lines().find_map(guest::parse_restore_failed) {
        report.restore = Some(RestoreInfo {
            ok: false,
            bytes: 0,
            files: 0,
            volumes: 0,
            seconds: 0.0,
            error: Some(e),
        });
        return true;
    }
    false
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port on 127.0.0.1")?
        .port())
}

fn read_log(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Watched {
    vm: qemu::Vm,
    rto: Option<Duration>,
    ready_line: Option<String>,
    /// Why watching stopped early (restore failure, timeout...), when it did.
    stopped: Option<String>,
}

/// Boots and reads the console until the readiness line, a restore failure (services
/// then never start: waiting longer tells nothing), QEMU's exit or the timeout.
fn boot_and_watch(
    opts: &RunOptions,
    serial: &Path,
    host: &str,
    timeout: u64,
    progress: &Progress,
) -> Result<Watched> {
    let step = progress.step("boot", None);
    let mut vm = qemu::start(opts).context("starting QEMU")?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let ready = format!("imgbuild: {host} ready (");
    let failed = format!("imgbuild: {host} FAILED: ");
    let mut stopped = None;
    let mut ready_line = None;
    let mut rto = None;
    loop {
        let log = read_log(serial);
        if let Some(l) = log
            .lines()
            .find(|l| l.contains(&ready) || l.contains(&failed))
        {
            rto = Some(vm.started.elapsed());
            ready_line = Some(l.trim().to_string());
            break;
        }
        if log
            .lines()
            .any(|l| guest::parse_restore_failed(l).is_some())
        {
            // Named by the restore line itself; the drill stops here.
            break;
        }
        if log.contains("imgbuild firstboot:") && !log.contains(guest::LINE) {
            stopped = Some(
                "the guest's first boot did not enter drill mode (an image built by an imgbuild without drills?)"
                    .into(),
            );
            break;
        }
        if let Some(st) = vm.try_wait()? {
            stopped = Some(format!("QEMU exited ({st}) before the host was ready"));
            break;
        }
        if Instant::now() >= deadline {
            stopped = Some(format!(
                "the host was not ready within {timeout} s (--timeout)"
            ));
            break;
        }
        step.set_message(&format!("{:.0} s", vm.started.elapsed().as_secs_f64()));
        std::thread::sleep(Duration::from_millis(250));
    }
    step.finish();
    Ok(Watched {
        vm,
        rto,
        ready_line,
        stopped,
    })
}

/// One container check through its forwarded port. Redirects are not followed: a 3xx
/// passes, and its target is a production address the drill must never contact.
fn probe(name: &str, port: u16, host_port: u16, path: Option<&str>) -> Check {
    let deadline = Instant::now() + CHECK_PATIENCE;
    loop {
        let c = match path {
            Some(p) => http_check(name, port, host_port, p),
            None => tcp_check(name, port, host_port),
        };
        if c.ok || Instant::now() >= deadline {
            return c;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn http_check(name: &str, port: u16, host_port: u16, path: &str) -> Check {
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout(Duration::from_secs(10))
        .build();
    let url = format!("http://127.0.0.1:{host_port}{path}");
    let (status, detail) = match agent.get(&url).call() {
        Ok(r) => (Some(r.status()), format!("GET {path} → {}", r.status())),
        Err(ureq::Error::Status(code, _)) => (Some(code), format!("GET {path} → {code}")),
        Err(ureq::Error::Transport(t)) => (None, format!("GET {path}: {t}")),
    };
    Check {
        container: name.into(),
        kind: "http".into(),
        port,
        path: Some(path.into()),
        status,
        ok: status.is_some_and(|s| (200..400).contains(&s)),
        detail,
    }
}

/// QEMU accepts a forwarded connection on the host before it knows whether the guest
/// does, and closes it when the guest refuses: a connection still open (or already
/// talking) after a moment is a listening guest.
fn tcp_check(name: &str, port: u16, host_port: u16) -> Check {
    use std::io::Read;
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], host_port).into(),
            Duration::from_secs(5),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 1];
        match s.read(&mut buf) {
            Ok(0) => Err(std::io::Error::other("connection closed: nothing listens")),
            Ok(_) => Ok("accepted (the service spoke first)".into()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok("accepted".into())
            }
            Err(e) => Err(e),
        }
    })();
    let (ok, detail) = match result {
        Ok(d) => (true, format!("TCP {port}: {d}")),
        Err(e) => (false, format!("TCP {port}: {e}")),
    };
    Check {
        container: name.into(),
        kind: "tcp".into(),
        port,
        path: None,
        status: None,
        ok,
        detail,
    }
}

fn print_report(r: &Report, args: &DrillArgs) {
    if args.json {
        match serde_json::to_string_pretty(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot serialise the report: {e}"),
        }
        return;
    }
    if args.quiet && r.ok {
        return;
    }
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "imgbuild drill {} (env {}): {}",
        r.host,
        r.env,
        if r.ok { "PASSED" } else { "FAILED" }
    ));
    if let Some(s) = &r.snapshot {
        line(format!(
            "  snapshot  {} taken {} ({} old; RPO {} h: {})",
            s.id,
            s.taken,
            human_age(s.age_seconds),
            s.rpo_hours,
            if s.within_rpo { "ok" } else { "EXCEEDED" }
        ));
    }
    let booted = r.accel.is_some() || r.restore.is_some();
    match &r.restore {
        _ if !booted => {}
        Some(x) if x.ok => line(format!(
            "  restore   {} bytes, {} files, {} volume(s) in {:.1} s",
            x.bytes, x.files, x.volumes, x.seconds
        )),
        Some(x) => line(format!(
            "  restore   FAILED: {}",
            x.error.as_deref().unwrap_or("?")
        )),
        None => line("  restore   (no report from the guest)".into()),
    }
    match r.rto_seconds {
        _ if !booted => {}
        Some(t) => line(format!(
            "  RTO       {t:.1} s from QEMU start to the readiness line ({})",
            r.accel.as_deref().unwrap_or("?")
        )),
        None => line("  RTO       not reached".into()),
    }
    for u in &r.units {
        line(format!(
            "  unit      {:<32} {}{}{}",
            u.unit,
            u.state,
            if u.health == "none" {
                String::new()
            } else {
                format!(", {}", u.health)
            },
            u.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ));
    }
    for c in &r.checks {
        line(format!(
            "  check     {:<20} {} {}",
            c.container,
            if c.ok { "ok  " } else { "FAIL" },
            c.detail
        ));
    }
    let g = &r.bucket.gateway;
    line(format!(
        "  bucket    s3://{}/{} read-only: {} objects, {} bytes read; bucket writes attempted: {} (all refused)",
        r.bucket.bucket, r.bucket.prefix, g.objects_served, g.bytes_served, r.bucket.writes_attempted
    ));
    line(if r.egress {
        "  network   egress ALLOWED (--allow-egress): the apps could reach the internet".to_string()
    } else {
        "  network   isolated: no route but the read-only gateway and forwarded ports".to_string()
    });
    for f in &r.failures {
        line(format!("  FAILED    {f}"));
    }
    print!("{out}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_id_times() {
        assert_eq!(
            id_time("20231114T221320.042Z-0a1b2c3d"),
            Some(1_700_000_000)
        );
        assert_eq!(id_time("19700101T000000.000Z-00000000"), Some(0));
        assert_eq!(
            id_time("20240229T000000.000Z-00000000"),
            Some(1_709_164_800)
        );
        assert_eq!(id_time("not-an-id"), None);
        let id = snapshot::format::new_snapshot_id(1_795_303_800_123);
        assert_eq!(id_time(&id), Some(1_795_303_800));
    }

    #[test]
    fn ages() {
        assert_eq!(human_age(40), "40 s");
        assert_eq!(human_age(600), "10 min");
        assert_eq!(human_age(5 * 3600), "5 h");
        assert_eq!(human_age(3 * 86_400 + 5), "3 d");
    }
}
