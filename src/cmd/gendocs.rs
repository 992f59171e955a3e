//! `imgbuild gen-docs DIR` (hidden): man pages and shell completions from the clap
//! definition, for packagers; docs/ keeps a copy that a test keeps current.

use std::path::Path;

pub fn run(out: &Path) -> anyhow::Result<i32> {
    for p in crate::gendocs::generate(out)? {
        println!("{}", p.display());
    }
    Ok(0)
}
