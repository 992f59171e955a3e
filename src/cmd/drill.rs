//! `imgbuild drill PROFILE`: the disaster-recovery rehearsal (`crate::drill`), and its
//! hidden helper verb `drill-relay` that QEMU runs per guest connection.

use crate::cli::DrillArgs;

pub fn run(args: &DrillArgs) -> anyhow::Result<i32> {
    crate::drill::run(args)
}

pub fn relay(port: u16) -> anyhow::Result<i32> {
    Ok(crate::drill::relay(port))
}
