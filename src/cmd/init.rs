//! `imgbuild init PROFILE`: a host's first deployment. Creates its keys (as `keys`
//! does) and writes the signed empty-start marker under its prefix, so its first boot
//! starts with empty volumes although `restore = "require"`. A prefix that already
//! holds snapshots is left alone: that host is not new.

use crate::cli::InitArgs;
use crate::progress::Progress;
use crate::render::{self, Target as RenderTarget};
use crate::snapshot::{format::rfc3339, marker, restore};
use crate::workstation::{self, load};
use anyhow::{bail, Result};
use serde_json::json;

pub fn run(args: &InitArgs) -> Result<i32> {
    let progress = Progress::detect(args.json);
    let (input, root) = load(&args.profile, &progress)?;
    root.ensure_builder()?;
    let tree = render::render(&input, RenderTarget::Image)?;
    let hc = workstation::host_config_of(&tree)?;
    let Some(bc) = &hc.backup else {
        bail!(
            "{}: the profile has no [backup] section: its first boot restores nothing, there is nothing to initialise",
            input.host.path.display()
        );
    };
    let mut t = workstation::target(&hc.host, bc, &input.secrets_dir, &args.bucket.overrides());
    workstation::use_secrets(&mut t, &root)?;
    let rt = crate::snapshot::runtime()?;
    let (place, state) = rt.block_on(async {
        let keys = t.keys()?;
        let store = t.connect().await?;
        let place = format!("s3://{}/{}", store.bucket, store.prefix);
        let ids = restore::list_ids(&store).await?;
        if !ids.is_empty() {
            bail!(
                "{place} already holds {} snapshot(s) (newest {}): this host is not new, and its first boot restores the newest; nothing written",
                ids.len(),
                ids.last().map(String::as_str).unwrap_or("?")
            );
        }
        if let Some(m) = marker::read(&store, &keys, &hc.host).await? {
            return anyhow::Ok((place, ("existed", m.created)));
        }
        let now = crate::snapshot::backup::now_unix();
        let m = marker::write(&store, &keys, &hc.host, now).await?;
        anyhow::Ok((place, ("written", m.created)))
    })?;
    let key = marker::key(&t.store.prefix);
    if args.json {
        println!(
            "{}",
            json!({ "host": hc.host, "bucket": t.store.bucket, "key": key, "marker": state.0, "created": rfc3339(state.1) })
        );
    } else {
        println!(
            "{place}: empty-start marker {} ({}): the first boot of {} starts with empty volumes; its first backup removes the marker",
            state.0,
            rfc3339(state.1),
            hc.host
        );
    }
    Ok(0)
}
