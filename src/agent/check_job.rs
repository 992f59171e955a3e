//! `imgbuild check` in the image (imgbuild-check.timer): verify every snapshot's
//! metadata and download a share of the packs (`backup.check_read_data`), then write
//! metrics. Reading a little every week catches bit rot and tampering in the bucket
//! long before a restore needs the data, for a fraction of a full read's egress.

use super::metrics::write_check_metrics;
use super::{log, HostPaths, JobLock};
use crate::hostconfig::{parse_read_data, HostConfig};
use crate::progress::Progress;
use crate::snapshot::check::{self, CheckReport, ReadData};
use crate::snapshot::error::SnapshotError;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct HostCheckResult {
    pub report: Option<CheckReport>,
    /// Why the check could not run to the end (bucket unreachable, keys unreadable...);
    /// problems it found are in the report instead.
    pub error: Option<String>,
    pub seconds: f64,
    /// The share of the packs read, as configured or given on the command line.
    pub read_data: String,
}

impl HostCheckResult {
    /// Ran to the end and found nothing wrong.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.report.as_ref().is_some_and(|r| r.ok())
    }
}

/// The timer's job. `read` overrides host.toml's `check.read_data` (the command line's
/// `--read-data` / `--read-data-subset`). Metrics are written whether it fails or not.
pub fn check_host(
    hc: &HostConfig,
    paths: &HostPaths,
    read: Option<ReadData>,
    progress: &Progress,
) -> anyhow::Result<HostCheckResult> {
    let b = hc
        .backup
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("host.toml has no [backup] section: nothing to check"))?;
    if super::drill_mode::active().is_some() {
        // The drill reaches the bucket through its own gateway; this copy's metrics
        // would only mislead.
        log("imgbuild check: refused: this is a drill boot (imgbuild drill), not the host");
        anyhow::bail!("drill boot: checks are off");
    }
    let start = Instant::now();
    let (read, read_text) = match read {
        Some(r) => (Ok(r), describe(r)),
        None => (
            parse_read_data(&b.check.read_data).map_err(|e| {
                SnapshotError::Other(format!(
                    "host.toml: backup.check.read_data {:?}: {e}",
                    b.check.read_data
                ))
            }),
            b.check.read_data.clone(),
        ),
    };
    let target = super::target(&hc.host, b);
    let run = (|| {
        let read = read?;
        let _lock = JobLock::acquire(&paths.job_lock(), "check")
            .map_err(|e| SnapshotError::Other(format!("{e:#}")))?;
        log(&format!(
            "imgbuild check: checking s3://{}/{} (reading {read_text} of the data)",
            b.bucket, b.prefix
        ));
        let rt = crate::snapshot::runtime()?;
        rt.block_on(async {
            let keys = target.keys()?;
            let store = target.connect().await?;
            check::check(&store, &keys, read, 16, progress).await
        })
        .map(|r| (r, read))
    })();
    let mut result = HostCheckResult {
        report: None,
        error: None,
        seconds: 0.0,
        read_data: read_text,
    };
    match run {
        Ok((r, read)) => {
            for p in &r.problems {
                log(&format!("imgbuild check: problem: {p}"));
            }
            log(&format!("imgbuild check: {}", summary(&r, read)));
            log(&format!("imgbuild check: {}", r.requests));
            log(if r.ok() {
                "imgbuild check: ok"
            } else {
                "imgbuild check: FAILED"
            });
            result.report = Some(r);
        }
        Err(e) => {
            log(&format!("imgbuild check: FAILED: {e}"));
            result.error = Some(e.to_string());
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    if let Err(e) = write_check_metrics(Path::new(&hc.metrics_dir), &hc.host, &result) {
        log(&format!("imgbuild check: cannot write metrics: {e}"));
    }
    Ok(result)
}

/// How a read fraction is shown back ("10%", "all", "none").
pub fn describe(r: ReadData) -> String {
    match r {
        ReadData::None => "none".into(),
        ReadData::All => "all".into(),
        ReadData::Subset(f) => format!("{}%", (f * 1000.0).round() / 10.0),
    }
}

/// One line: what the bucket holds and what was read. Shared with the workstation's
/// `imgbuild check`.
pub fn summary(r: &CheckReport, read: ReadData) -> String {
    let mut line = format!(
        "{} snapshot(s), {} chunks referenced, {} in the bucket ({} unreferenced); {} packs \
         ({} not in the index), {} index objects, {} chunk objects",
        r.snapshots,
        r.chunks_referenced,
        r.chunks_in_bucket,
        r.chunks_unreferenced,
        r.packs,
        r.packs_unindexed,
        r.index_objects,
        r.chunk_objects
    );
    if read != ReadData::None {
        line.push_str(&format!(
            "; read and verified {} packs, {} chunks, {} bytes",
            r.packs_read, r.chunks_read, r.bytes_read
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_fractions_are_shown_as_percentages() {
        assert_eq!(describe(ReadData::Subset(0.1)), "10%");
        assert_eq!(describe(ReadData::Subset(1.0 / 3.0)), "33.3%");
        assert_eq!(describe(ReadData::All), "all");
        assert_eq!(describe(ReadData::None), "none");
    }
}
