//! What the backup job reports outside the journal: the node-exporter textfile the
//! monitoring host scrapes, and the dead-man's-switch ping.

use super::backup_job::HostBackupResult;
use super::check_job::HostCheckResult;
use super::log;
use crate::snapshot::backup;
use crate::snapshot::store::Requests;
use std::path::Path;
use std::time::Duration;

const METRICS_FILE: &str = "imgbuild_backup.prom";
const CHECK_METRICS_FILE: &str = "imgbuild_check.prom";

/// `name{host="...",kind="get"} n` for each billed request class, and bytes each way.
fn request_metrics(t: &mut String, prefix: &str, what: &str, host: &str, r: &Requests) {
    let name = format!("{prefix}_requests");
    t.push_str(&format!(
        "# HELP {name} S3 requests {what}, by billed class.\n# TYPE {name} gauge\n"
    ));
    for (kind, n) in [
        ("put", r.put),
        ("get", r.get),
        ("head", r.head),
        ("list", r.list),
        ("delete", r.delete),
        ("retention", r.retention),
    ] {
        t.push_str(&format!("{name}{{host=\"{host}\",kind=\"{kind}\"}} {n}\n"));
    }
    for (dir, n) in [("sent", r.bytes_sent), ("received", r.bytes_received)] {
        let name = format!("{prefix}_bytes_{dir}");
        t.push_str(&format!(
            "# HELP {name} Bytes {dir} to S3 {what}.\n# TYPE {name} gauge\n{name}{{host=\"{host}\"}} {n}\n"
        ));
    }
}

/// Written to a temp file and renamed: the collector never reads half a file.
fn write_atomically(dir: &Path, file: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(file))
}

fn label_value(host: &str) -> String {
    host.replace(['\\', '"', '\n'], "_")
}

/// node-exporter textfile: written to a temp file and renamed, so the collector never
/// reads half a file. The last success time survives failed runs (read back from the
/// previous file).
pub fn write_metrics(dir: &Path, host: &str, r: &HostBackupResult) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(METRICS_FILE);
    let previous_success = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("imgbuild_backup_last_success_timestamp_seconds"))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let now = backup::now_unix();
    let ok = r.error.is_none();
    let last_success = if ok { now as f64 } else { previous_success };
    let (total, new, uploaded) = r
        .report
        .as_ref()
        .map(|x| {
            (
                x.stats.bytes_total,
                x.stats.bytes_new,
                x.stats.bytes_uploaded,
            )
        })
        .unwrap_or((0, 0, 0));
    let host = label_value(host);
    let l = format!("{{host=\"{host}\"}}");
    let mut t = String::new();
    let mut metric = |name: &str, help: &str, v: String| {
        t.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{l} {v}\n"
        ));
    };
    metric(
        "imgbuild_backup_last_success_timestamp_seconds",
        "Time of the last successful snapshot.",
        format!("{last_success}"),
    );
    metric(
        "imgbuild_backup_last_run_timestamp_seconds",
        "Time the last backup run ended.",
        format!("{now}"),
    );
    metric(
        "imgbuild_backup_success",
        "1 if the last backup run succeeded.",
        format!("{}", u8::from(ok)),
    );
    metric(
        "imgbuild_backup_duration_seconds",
        "Duration of the last backup run.",
        format!("{:.3}", r.seconds),
    );
    metric(
        "imgbuild_backup_bytes_total",
        "File data bytes in the last snapshot.",
        format!("{total}"),
    );
    metric(
        "imgbuild_backup_bytes_new",
        "Bytes of new chunks in the last snapshot.",
        format!("{new}"),
    );
    metric(
        "imgbuild_backup_bytes_uploaded",
        "Bytes uploaded by the last snapshot.",
        format!("{uploaded}"),
    );
    metric(
        "imgbuild_backup_atomic",
        "1 if the last backup read one atomic snapshot of all volumes (crash-consistent).",
        format!("{}", u8::from(r.atomic)),
    );
    metric(
        "imgbuild_backup_downtime_seconds",
        "How long units of `stop` volumes were down during the last backup.",
        format!("{:.3}", r.downtime_seconds),
    );
    if let Some(enforced) = r.object_lock_enforced {
        metric(
            "imgbuild_backup_object_lock_enforced",
            "1 if the bucket was seen to enforce the configured Object Lock (configuration and read-back retention).",
            format!("{}", u8::from(enforced)),
        );
    }
    if let Some(p) = &r.prune {
        metric(
            "imgbuild_backup_snapshots",
            "Snapshots in the bucket after pruning.",
            format!("{}", p.snapshots_left),
        );
    }
    // The backup's requests and its prune's: one run, one bill.
    let mut requests = r.report.as_ref().map(|x| x.requests).unwrap_or_default();
    if let Some(p) = &r.prune {
        requests = add(&requests, &p.requests);
    }
    request_metrics(
        &mut t,
        "imgbuild_backup",
        "of the last backup run (prune included)",
        &host,
        &requests,
    );
    write_atomically(dir, METRICS_FILE, &t)
}

fn add(a: &Requests, b: &Requests) -> Requests {
    Requests {
        put: a.put + b.put,
        get: a.get + b.get,
        head: a.head + b.head,
        list: a.list + b.list,
        delete: a.delete + b.delete,
        retention: a.retention + b.retention,
        bytes_sent: a.bytes_sent + b.bytes_sent,
        bytes_received: a.bytes_received + b.bytes_received,
    }
}

/// The check timer's textfile, beside the backup's: the monitoring host alerts when a
/// check finds problems or stops running.
pub fn write_check_metrics(dir: &Path, host: &str, r: &HostCheckResult) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let host = label_value(host);
    let l = format!("{{host=\"{host}\"}}");
    let mut t = String::new();
    let mut metric = |name: &str, help: &str, v: String| {
        t.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{l} {v}\n"
        ));
    };
    let report = r.report.clone().unwrap_or_default();
    metric(
        "imgbuild_check_last_run_timestamp_seconds",
        "Time the last check of the bucket ended.",
        format!("{}", backup::now_unix()),
    );
    metric(
        "imgbuild_check_success",
        "1 if the last check ran to the end and found no problem.",
        format!("{}", u8::from(r.ok())),
    );
    metric(
        "imgbuild_check_problems",
        "Problems the last check found (missing or corrupted chunks, packs, manifests); 0 when it could not run (see imgbuild_check_success).",
        format!("{}", report.problems.len()),
    );
    metric(
        "imgbuild_check_duration_seconds",
        "Duration of the last check.",
        format!("{:.3}", r.seconds),
    );
    metric(
        "imgbuild_check_snapshots",
        "Snapshots the last check verified.",
        format!("{}", report.snapshots),
    );
    metric(
        "imgbuild_check_packs",
        "Packs in the bucket at the last check.",
        format!("{}", report.packs),
    );
    metric(
        "imgbuild_check_packs_read",
        "Packs the last check downloaded and verified.",
        format!("{}", report.packs_read),
    );
    metric(
        "imgbuild_check_bytes_read",
        "Bytes of packs and chunks the last check downloaded and verified.",
        format!("{}", report.bytes_read),
    );
    request_metrics(
        &mut t,
        "imgbuild_check",
        "of the last check",
        &host,
        &report.requests,
    );
    write_atomically(dir, CHECK_METRICS_FILE, &t)
}

/// Pings `url` on success and `url/fail` on failure (the healthchecks.io convention;
/// other monitors ignore the suffix or accept it). Best effort: a monitor that is down
/// must not fail the backup.
pub fn ping(url: &str, ok: bool) {
    let u = if ok {
        url.to_string()
    } else {
        format!("{}/fail", url.trim_end_matches('/'))
    };
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    for attempt in 0..3 {
        match agent.get(&u).call() {
            Ok(_) => return,
            // The URL often embeds a secret token: log the cause, never the URL.
            Err(e) if attempt == 2 => {
                let cause = match e {
                    ureq::Error::Status(code, _) => format!("HTTP {code}"),
                    ureq::Error::Transport(t) => t.kind().to_string(),
                };
                log(&format!("imgbuild backup: ping failed: {cause}"));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

/// What the last first boot restored: the monitoring host alerts when newer snapshots
/// were skipped (they failed an integrity check: tampering or bit rot in the bucket).
pub fn write_restore_metrics(
    dir: &Path,
    host: &str,
    snapshot_time: i64,
    skipped: usize,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let host = host.replace(['\\', '"', '\n'], "_");
    let t = format!(
        "# HELP imgbuild_restore_skipped_snapshots Newer snapshots first boot skipped because they failed an integrity check.\n\
         # TYPE imgbuild_restore_skipped_snapshots gauge\n\
         imgbuild_restore_skipped_snapshots{{host=\"{host}\"}} {skipped}\n\
         # HELP imgbuild_restore_snapshot_timestamp_seconds Time of the snapshot first boot restored.\n\
         # TYPE imgbuild_restore_snapshot_timestamp_seconds gauge\n\
         imgbuild_restore_snapshot_timestamp_seconds{{host=\"{host}\"}} {snapshot_time}\n"
    );
    let path = dir.join("imgbuild_restore.prom");
    let tmp = dir.join(".imgbuild_restore.prom.tmp");
    std::fs::write(&tmp, t)?;
    std::fs::rename(&tmp, &path)
}
