//! `imgbuild firstboot`, in the image (imgbuild-firstboot.service).

use crate::agent::{self, HostPaths};
use crate::cli::snapshot::FirstbootArgs;

/// `imgbuild firstboot`: exit 0 when services may start, 1 when they must not.
pub fn run(args: &FirstbootArgs) -> anyhow::Result<i32> {
    let hc = agent::read_host_config(&args.config)?;
    match agent::firstboot(&hc, &HostPaths::default()) {
        Ok(_) => Ok(0),
        Err(e) => {
            eprintln!("imgbuild firstboot: {e:#}");
            Ok(1)
        }
    }
}
