//! `imgbuild keys PROFILE`: create the host's keys and the builder's signing key;
//! never overwrites.

use crate::cli::KeysArgs;
use crate::progress::Progress;
use crate::workstation::load;
use anyhow::{Context, Result};
use serde_json::json;

pub fn run(args: &KeysArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    let (input, root) = load(&args.profile, &progress)?;
    let (_, builder_created) = root.ensure_builder()?;
    let mut created = input.created.clone();
    created.extend(builder_created.0);
    let dir = root.host_dir(input.host.name());
    let wg_pub =
        std::fs::read_to_string(dir.join("wireguard.pub")).context("reading wireguard.pub")?;
    let ssh_pub = std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub"))
        .context("reading ssh_host_ed25519_key.pub")?;
    if args.json {
        println!(
            "{}",
            json!({ "host": input.host.name(), "secrets": dir, "created": created, "wireguard_public_key": wg_pub.trim(), "ssh_host_key": ssh_pub.trim() })
        );
    } else {
        println!("host {} — secrets in {}", input.host.name(), dir.display());
        println!(
            "  created: {}",
            if created.is_empty() {
                "nothing (all keys existed)".to_string()
            } else {
                created
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        println!("  wireguard public key: {}", wg_pub.trim());
        println!("  ssh host key: {}", ssh_pub.trim());
        println!(
            "  known_hosts line: {} {}",
            input
                .host
                .profile
                .wireguard
                .as_ref()
                .and_then(|w| w.endpoint.as_deref())
                .and_then(|e| e.rsplit_once(':').map(|(h, _)| h))
                .unwrap_or(input.host.name()),
            ssh_pub.trim()
        );
    }
    Ok(0)
}
