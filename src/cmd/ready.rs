//! `imgbuild ready`, in the image (imgbuild-ready.service): the console readiness line.

use crate::cli::ReadyArgs;

pub fn run(args: &ReadyArgs) -> anyhow::Result<i32> {
    crate::agent::ready::ready(&args.config)
}
