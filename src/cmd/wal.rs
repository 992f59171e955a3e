//! `imgbuild postgres-prepare` and `imgbuild wal-ship`, in the image: the thin entry
//! points of `crate::agent::wal`.

use crate::agent::{self, HostPaths};
use crate::cli::ReadyArgs;

/// ExecStartPre of a PostgreSQL container whose volume ships WAL. A failure keeps the
/// database down: it would otherwise run without the archiving the profile promises.
pub fn prepare(volume: &str, args: &ReadyArgs) -> anyhow::Result<i32> {
    let hc = agent::read_host_config(&args.config)?;
    agent::wal::prepare(&hc, &HostPaths::default(), volume)?;
    Ok(0)
}

pub fn ship(args: &ReadyArgs) -> anyhow::Result<i32> {
    let hc = agent::read_host_config(&args.config)?;
    agent::wal::ship_forever(&hc, &HostPaths::default())?;
    Ok(0)
}
