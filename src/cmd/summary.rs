//! `imgbuild summary PROFILE`: what a profile builds.

use crate::cli::SummaryArgs;
use crate::progress::Progress;
use crate::render::{self, Target};
use crate::workstation::load_preview;
use anyhow::Result;
use serde_json::json;

pub fn run(args: &SummaryArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    // Looking at a profile must not create its keys.
    let input = load_preview(&args.profile)?;
    if !input.created.is_empty() {
        progress.note(&format!(
            "imgbuild: {} key file(s) do not exist yet (shown with temporary keys; `imgbuild keys {}` creates them): the tree digest will differ",
            input.created.len(),
            args.profile.profile
        ));
    }
    let tree = render::render(&input, Target::Image)?;
    let p = &input.host.profile;
    let containers: Vec<_> = p.containers.iter().map(|(n, c)| json!({ "name": n, "image": c.image, "publish": c.publish, "domain": c.domain, "volumes": c.volumes, "auto_update": c.auto_update, "baked": c.bake.is_some() })).collect();
    let peers: Vec<_> = input.peers.iter().map(|pe| json!({ "host": pe.host, "address": pe.address, "endpoint": pe.endpoint, "public_key": pe.public_key })).collect();
    let backup = p.backup.as_ref().map(|b| json!({ "bucket": b.bucket, "prefix": b.prefix.clone().unwrap_or_else(|| input.host.name().to_string()), "endpoint": b.endpoint, "schedule": b.schedule, "restore": format!("{:?}", b.restore).to_lowercase(), "object_lock_days": b.object_lock_days }));
    let s = json!({ "host": input.host.name(), "env": input.host.env, "profile": input.host.path, "profile_digest": input.host.digest, "tree_digest": tree.digest(), "files": tree.entries.len(), "containers": containers, "peers": peers, "backup": backup });
    if args.json {
        println!("{s}");
    } else {
        println!(
            "host {} (env {}) from {}",
            input.host.name(),
            input.host.env,
            input.host.path.display()
        );
        println!(
            "  tree: {} entries, digest {}",
            tree.entries.len(),
            &tree.digest()[..16]
        );
        for (n, c) in &p.containers {
            let extra = c
                .domain
                .as_ref()
                .map(|d| format!(" → https://{d}"))
                .unwrap_or_default();
            println!(
                "  container {n}: {}{}{}",
                c.image,
                if c.publish.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", c.publish.join(", "))
                },
                extra
            );
        }
        for pe in &input.peers {
            println!(
                "  wireguard peer {} at {} ({})",
                pe.host,
                pe.address,
                pe.endpoint.as_deref().unwrap_or("dials in")
            );
        }
        match &p.backup {
            Some(b) => println!(
                "  backup: s3://{}/{} at {:?}, restore {:?}",
                b.bucket,
                b.prefix
                    .clone()
                    .unwrap_or_else(|| input.host.name().to_string()),
                b.schedule,
                b.restore
            ),
            None => println!("  backup: none"),
        }
    }
    Ok(0)
}
