//! The monitoring host's rendered Prometheus, rules and Alertmanager configs pass
//! promtool and amtool; the scrape targets cross the tunnel; the alert rules exist.

mod common;
use common::*;
use std::process::Command;

#[test]
fn rendered_monitoring_configs_pass_promtool_and_amtool() {
    require_tool(&["promtool", "--version"], "promtool");
    require_tool(&["amtool", "--version"], "amtool");
    let tmp = tempfile::tempdir().unwrap();
    for env in ["production", "staging"] {
        let out = tmp.path().join(env);
        run_ok(
            &[
                "render",
                "monitoring",
                "--env",
                env,
                "--out",
                out.to_str().unwrap(),
                "--secrets",
                tmp.path().join("s").to_str().unwrap(),
            ],
            &repo(),
        );
        let cfg = out.join("etc/imgbuild/config");
        for (tool, args, file) in [
            (
                "promtool",
                vec!["check", "config", "--syntax-only"],
                cfg.join("prometheus/prometheus.yml"),
            ),
            (
                "promtool",
                vec!["check", "rules"],
                cfg.join("prometheus/rules/imgbuild.yml"),
            ),
            (
                "amtool",
                vec!["check-config"],
                cfg.join("alertmanager/alertmanager.yml"),
            ),
        ] {
            let res = Command::new(tool).args(&args).arg(&file).output().unwrap();
            assert!(
                res.status.success(),
                "{tool} {args:?} {}:\n{}{}",
                file.display(),
                String::from_utf8_lossy(&res.stdout),
                String::from_utf8_lossy(&res.stderr)
            );
        }
        let prom = std::fs::read_to_string(cfg.join("prometheus/prometheus.yml")).unwrap();
        let (svc, mon) = if env == "production" {
            ("10.8.0.1", "10.8.0.2")
        } else {
            ("10.9.0.1", "10.9.0.2")
        };
        assert!(
            prom.contains(&format!("\"{svc}:9100\"")),
            "services host scraped over the tunnel:\n{prom}"
        );
        assert!(
            prom.contains(&format!("\"{mon}:9100\"")),
            "own node-exporter scraped"
        );
        assert!(
            prom.contains("https://cloud.example.org") || env == "staging",
            "TLS probes of the services' domains"
        );
        let rules = std::fs::read_to_string(cfg.join("prometheus/rules/imgbuild.yml")).unwrap();
        for alert in [
            "HostDown",
            "BackupTooOld",
            "BackupFailed",
            "ObjectLockNotEnforced",
            "SnapshotCheckFailed",
            "SnapshotCheckNotRun",
            "DiskAlmostFull",
            "UnitFailed",
            "CertificateExpiring",
        ] {
            assert!(
                rules.contains(&format!("alert: {alert}")),
                "missing alert {alert}"
            );
        }
    }
}

#[test]
fn a_broken_rendered_config_fails_the_build() {
    // The check runs on the real tree: feed it a tree whose rules do not parse.
    require_tool(&["promtool", "--version"], "promtool");
    let mut t = imgbuild::tree::HostTree::new("x");
    t.file(
        "/etc/imgbuild/config/prometheus/rules/imgbuild.yml",
        0o644,
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: up ==\n",
    )
    .unwrap();
    let err = imgbuild::render::check::check_tree(&t).unwrap_err();
    assert!(err.to_string().contains("promtool rejects"), "{err}");
}

#[test]
fn alert_rules_use_the_metrics_the_backup_really_writes() {
    // The real metrics writer of the in-image backup, for a failed run.
    let dir = tempfile::tempdir().unwrap();
    let failed = imgbuild::agent::HostBackupResult {
        report: None,
        prune: None,
        error: Some("Object Lock is configured (30 days) but s3://b does not enforce it".into()),
        seconds: 1.0,
        atomic: false,
        downtime_seconds: 0.0,
        object_lock_enforced: Some(false),
    };
    imgbuild::agent::write_metrics(dir.path(), "vps1", &failed).unwrap();
    // And the real writer of the check timer, for a check that could not run.
    let check = imgbuild::agent::HostCheckResult {
        report: None,
        error: Some("s3://b is unreachable".into()),
        seconds: 1.0,
        read_data: "10%".into(),
    };
    imgbuild::agent::write_check_metrics(dir.path(), "vps1", &check).unwrap();
    let mut written = String::new();
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        written.push_str(&std::fs::read_to_string(e.path()).unwrap());
    }
    assert!(
        written.contains("imgbuild_backup_success{host=\"vps1\"} 0"),
        "{written}"
    );
    assert!(
        written.contains("imgbuild_check_success{host=\"vps1\"} 0"),
        "{written}"
    );
    assert!(
        written.contains("imgbuild_check_requests{host=\"vps1\",kind=\"get\"} 0"),
        "{written}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t");
    run_ok(
        &[
            "render",
            "monitoring",
            "--out",
            out.to_str().unwrap(),
            "--secrets",
            tmp.path().join("s").to_str().unwrap(),
        ],
        &repo(),
    );
    let rules =
        std::fs::read_to_string(out.join("etc/imgbuild/config/prometheus/rules/imgbuild.yml"))
            .unwrap();
    let dash =
        std::fs::read_to_string(out.join("etc/imgbuild/config/grafana/dashboards/hosts.json"))
            .unwrap();
    for text in [&rules, &dash] {
        for prefix in ["imgbuild_backup_", "imgbuild_check_"] {
            for (i, _) in text.match_indices(prefix) {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(written.contains(&format!("\n{name}{{")) || written.starts_with(&format!("{name}{{")), "`{name}` is used by the monitoring host but never written by the backup or the check:\n{written}");
            }
        }
    }
}
