//! `imgbuild render PROFILE --out DIR`: the host tree as files, to read and diff.

use crate::cli::{RenderArgs, RenderTarget};
use crate::emit;
use crate::progress::Progress;
use crate::render::{self, Target};
use crate::workstation::load;
use anyhow::{Context, Result};
use serde_json::json;

pub fn run(args: &RenderArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    let (input, _) = load(&args.profile, &progress)?;
    let target = match args.target {
        RenderTarget::Image => Target::Image,
        RenderTarget::Ignition => Target::Ignition,
    };
    let tree = render::render(&input, target)?;
    emit::dir::write(&tree, &args.out)
        .with_context(|| format!("writing the host tree to {}", args.out.display()))?;
    if args.json {
        let entries: Vec<_> = tree
            .entries
            .values()
            .map(|e| {
                let (kind, size) = match &e.kind {
                    crate::tree::EntryKind::File { content } => ("file", content.len()),
                    crate::tree::EntryKind::Dir => ("dir", 0),
                    crate::tree::EntryKind::Symlink { .. } => ("symlink", 0),
                };
                json!({ "path": e.path, "kind": kind, "mode": format!("{:04o}", e.mode), "owner": e.owner, "group": e.group, "size": size, "secret": e.secret })
            })
            .collect();
        println!(
            "{}",
            json!({ "host": tree.host, "env": input.host.env, "digest": tree.digest(), "entries": entries, "enable": tree.enable.iter().map(|e| json!({"unit": e.unit, "wanted_by": e.wanted_by})).collect::<Vec<_>>() })
        );
    } else {
        progress.note(&format!(
            "imgbuild: wrote {} entries to {}",
            tree.entries.len(),
            args.out.display()
        ));
    }
    Ok(0)
}
