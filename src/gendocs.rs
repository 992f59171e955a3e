//! Generated documentation: man pages (one per verb) and shell completions, made from
//! the clap definitions so they cannot disagree with the binary.

use crate::cli::Cli;
use clap::CommandFactory;
use std::path::Path;

pub fn generate(out: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut written = vec![];
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let cmd = Cli::command();
    let mut pages = vec![(String::from("imgbuild"), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((
            format!("imgbuild-{}", sub.get_name()),
            sub.clone().name(format!("imgbuild-{}", sub.get_name())),
        ));
    }
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        let p = man.join(format!("{name}.1"));
        std::fs::write(&p, buf)?;
        written.push(p);
    }
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut c = Cli::command();
        let p = clap_complete::generate_to(shell, &mut c, "imgbuild", &comp)?;
        written.push(p);
    }
    Ok(written)
}
