//! `imgbuild run IMAGE`: boot an image in QEMU, a disposable staging copy.

use crate::cli::{ProfileArgs, RunArgs};
use crate::progress::Progress;
use crate::workstation::load;
use anyhow::{Context, Result};

fn parse_size(s: &str) -> Result<u64> {
    let (num, mul) = match s.chars().last() {
        Some('G') | Some('g') => (&s[..s.len() - 1], 1u64 << 30),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("`{s}` is not a size like 20G"))?
        * mul)
}

pub fn run(args: &RunArgs) -> Result<i32> {
    let mut opts = crate::qemu::RunOptions::new(&args.image);
    opts.persist = args.persist;
    opts.ssh_port = Some(args.ssh_port);
    opts.memory_mib = args.memory;
    opts.cpus = args.cpus;
    opts.disk_size = args.disk_size.as_deref().map(parse_size).transpose()?;
    // A staging copy restores like the host, but its backups (timer and final
    // snapshot) refuse: its data must never become the host's newest snapshot.
    opts.credentials.push((
        crate::agent::drill_mode::STAGING_CREDENTIAL.to_string(),
        b"1".to_vec(),
    ));
    for f in &args.forwards {
        let (h, g) = f
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--forward {f}: expected HOST:GUEST"))?;
        opts.forwards.push((
            h.parse().context("--forward host port")?,
            g.parse().context("--forward guest port")?,
        ));
    }
    if let Some(p) = &args.profile {
        let progress = Progress::detect(false);
        let (input, _) = load(
            &ProfileArgs {
                profile: p.clone(),
                env: None,
                secrets: None,
                overlays: vec![],
                identity: None,
            },
            &progress,
        )?;
        for c in input.host.profile.containers.values() {
            for spec in &c.publish {
                if let Ok(pb) = crate::profile::parse_publish(spec) {
                    if pb.proto == "tcp" && pb.ip.is_none() {
                        let host_port = if pb.host_port < 1024 {
                            8000 + pb.host_port
                        } else {
                            pb.host_port
                        };
                        progress.note(&format!(
                            "imgbuild: 127.0.0.1:{host_port} → guest port {}",
                            pb.host_port
                        ));
                        opts.forwards.push((host_port, pb.host_port));
                    }
                }
            }
        }
    }
    Ok(crate::qemu::run(&opts)?)
}
