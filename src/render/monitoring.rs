//! The monitoring host's rendered configuration: Prometheus (scrapes over WireGuard),
//! alert rules, Alertmanager, Grafana provisioning, blackbox probes. Containers are
//! recognised by their image, so a user may rename them freely.

use super::{render_t, wg_ip, RenderError, RenderInput, CONFIG_DIR};
use crate::profile::{Host, ReceiverKind};
use crate::tree::HostTree;
use minijinja::{context, Environment};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize)]
struct BackupHost {
    host: String,
    rpo_hours: u32,
    rpo_seconds: u64,
    /// Volumes that ship PostgreSQL WAL, and how long a finished file may wait.
    wal_volumes: Vec<String>,
    wal_rpo_seconds: i64,
}

impl BackupHost {
    fn new(host: &Host, b: &crate::profile::Backup) -> BackupHost {
        BackupHost {
            host: host.name().to_string(),
            rpo_hours: b.rpo_hours,
            rpo_seconds: u64::from(b.rpo_hours) * 3600,
            wal_volumes: host
                .profile
                .volumes
                .iter()
                .filter(|(_, v)| v.postgres.is_some())
                .map(|(n, _)| n.clone())
                .collect(),
            wal_rpo_seconds: b.wal_rpo_seconds,
        }
    }
}

#[derive(Serialize)]
struct Target {
    host: String,
    address: String,
    port: u16,
    container: String,
}

fn find(host: &Host, repo_suffix: &str) -> Option<String> {
    host.profile
        .containers
        .iter()
        .find(|(_, c)| {
            let name = c.image.split('@').next().unwrap_or("");
            let repo = match name.rsplit_once(':') {
                Some((r, tag)) if !tag.contains('/') => r,
                _ => name,
            };
            repo.ends_with(repo_suffix)
        })
        .map(|(n, _)| n.clone())
}

fn targets(host: &Host, node: &mut Vec<Target>, apps: &mut Vec<Target>) {
    let Some(addr) = wg_ip(host) else { return };
    for (cname, c) in &host.profile.containers {
        if let Some(port) = c.metrics_port {
            let t = Target {
                host: host.name().to_string(),
                address: addr.clone(),
                port,
                container: cname.clone(),
            };
            if c.image.contains("node-exporter") {
                node.push(t)
            } else {
                apps.push(t)
            }
        }
    }
}

/// Renders the configs and returns the extra mounts per container name.
pub(super) fn render(
    e: &Environment,
    header: &str,
    input: &RenderInput,
    t: &mut HostTree,
) -> Result<BTreeMap<String, Vec<String>>, RenderError> {
    let mut mounts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let host = &input.host;
    let Some(m) = &host.profile.monitoring else {
        return Ok(mounts);
    };
    let name = host.name();

    let mut node = vec![];
    let mut apps = vec![];
    targets(host, &mut node, &mut apps);
    let mut domains = vec![];
    // (host, RPO hours): each host's backups are judged against its own objective.
    let mut backup_hosts: Vec<BackupHost> = vec![];
    if let Some(b) = &host.profile.backup {
        backup_hosts.push(BackupHost::new(host, b));
    }
    for (_, other) in &input.scrape {
        targets(other, &mut node, &mut apps);
        domains.extend(
            other
                .profile
                .containers
                .values()
                .filter_map(|c| c.domain.clone()),
        );
        if let Some(b) = &other.profile.backup {
            backup_hosts.push(BackupHost::new(other, b));
        }
    }
    domains.extend(
        host.profile
            .containers
            .values()
            .filter_map(|c| c.domain.clone()),
    );
    domains.sort();

    let am = find(host, "/alertmanager");
    let prom = find(host, "/prometheus");
    let blackbox = find(host, "/blackbox-exporter");
    if let Some(p) = &prom {
        let prom_yml = render_t(
            e,
            "prometheus.yml.j2",
            context! {
                header, host => name, node_targets => node, app_targets => apps,
                alertmanager => am.as_ref().map(|a| format!("{a}:9093")).unwrap_or_else(|| "127.0.0.1:9093".into()),
                domains => if blackbox.is_some() { domains.clone() } else { vec![] },
                blackbox => blackbox.as_ref().map(|b| format!("{b}:9115")).unwrap_or_default(),
            },
        )?;
        t.file(
            &format!("{CONFIG_DIR}/prometheus/prometheus.yml"),
            0o644,
            prom_yml,
        )?;
        let rules = render_t(
            e,
            "alert-rules.yml.j2",
            context! {
                header, backup_hosts,
            },
        )?;
        t.file(
            &format!("{CONFIG_DIR}/prometheus/rules/imgbuild.yml"),
            0o644,
            rules,
        )?;
        mounts.entry(p.clone()).or_default().extend([
            format!("{CONFIG_DIR}/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"),
            format!("{CONFIG_DIR}/prometheus/rules:/etc/prometheus/rules:ro"),
        ]);
    }
    if let Some(a) = &am {
        let (kind, url, to, from, smtp) = match &m.alerts {
            Some(al) => (
                match al.receiver {
                    ReceiverKind::Webhook => "webhook",
                    ReceiverKind::Ntfy => "ntfy",
                    ReceiverKind::Email => "email",
                },
                al.url.clone().unwrap_or_default(),
                al.to.clone().unwrap_or_default(),
                al.from.clone().unwrap_or_default(),
                al.smtp.clone().unwrap_or_default(),
            ),
            None => (
                "none",
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ),
        };
        let yml = render_t(
            e,
            "alertmanager.yml.j2",
            context! { header, receiver => "default", kind, url, to, from, smtp },
        )?;
        t.file(
            &format!("{CONFIG_DIR}/alertmanager/alertmanager.yml"),
            0o644,
            yml,
        )?;
        mounts.entry(a.clone()).or_default().push(format!(
            "{CONFIG_DIR}/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        ));
    }
    if let Some(g) = find(host, "grafana/grafana") {
        let ds = render_t(
            e,
            "grafana-datasource.yml.j2",
            context! { header, prometheus => prom.as_ref().map(|p| format!("{p}:9090")).unwrap_or_else(|| "127.0.0.1:9090".into()) },
        )?;
        t.file(
            &format!("{CONFIG_DIR}/grafana/provisioning/datasources/prometheus.yml"),
            0o644,
            ds,
        )?;
        t.file(
            &format!("{CONFIG_DIR}/grafana/provisioning/dashboards/imgbuild.yml"),
            0o644,
            render_t(e, "grafana-dashboards.yml.j2", context! { header })?,
        )?;
        t.file(
            &format!("{CONFIG_DIR}/grafana/dashboards/hosts.json"),
            0o644,
            include_str!("templates/host-dashboard.json"),
        )?;
        mounts.entry(g).or_default().extend([
            format!("{CONFIG_DIR}/grafana/provisioning:/etc/grafana/provisioning:ro"),
            format!("{CONFIG_DIR}/grafana/dashboards:/etc/grafana/dashboards:ro"),
        ]);
    }
    if let Some(b) = &blackbox {
        t.file(
            &format!("{CONFIG_DIR}/blackbox/blackbox.yml"),
            0o644,
            render_t(e, "blackbox.yml.j2", context! { header })?,
        )?;
        mounts.entry(b.clone()).or_default().push(format!(
            "{CONFIG_DIR}/blackbox/blackbox.yml:/etc/blackbox_exporter/config.yml:ro"
        ));
    }
    Ok(mounts)
}
