use clap::Parser;
use imgbuild::cli::{Cli, Command};
use imgbuild::commands;

/// Exit codes: 0 ok, 1 failure, 2 bad input (profile errors, usage).
fn main() {
    let args = imgbuild::cli::normalize_args(std::env::args_os().collect());
    let cli = Cli::parse_from(args);
    let result = match &cli.command {
        Command::Build(a) => commands::build(a),
        Command::Render(a) => commands::render_cmd(a),
        Command::Keys(a) => commands::keys(a),
        Command::Summary(a) => commands::summary(a),
        Command::Verify(a) => commands::verify(a),
        Command::Run(a) => commands::run(a),
        Command::Backup { args, sel } => {
            imgbuild::snapshot::cli::cmd_backup(args, &commands::resolver(sel))
        }
        Command::Snapshots { args, sel } => {
            imgbuild::snapshot::cli::cmd_snapshots(args, &commands::resolver(sel))
        }
        Command::Restore { args, sel } => {
            imgbuild::snapshot::cli::cmd_restore(args, &commands::resolver(sel))
        }
        Command::Check { args, sel } => {
            imgbuild::snapshot::cli::cmd_check(args, &commands::resolver(sel))
        }
        Command::Drill(a) => imgbuild::drill::cmd_drill(a),
        Command::DrillRelay { port } => Ok(imgbuild::drill::relay(*port)),
        Command::Firstboot(a) => imgbuild::snapshot::cli::cmd_firstboot(a),
        Command::Ready(a) => imgbuild::image::ready(&a.config),
        Command::Secrets(a) => commands::secrets_cmd(a),
        Command::Upload(a) => imgbuild::upload::cmd_upload(a),
        Command::GenDocs { out } => imgbuild::gendocs::generate(out)
            .map(|w| {
                for p in w {
                    println!("{}", p.display());
                }
                0
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            let bad_input = err.chain().any(|c| {
                c.is::<imgbuild::profile::ProfileErrors>()
                    || c.is::<imgbuild::profile::ProfileError>()
                    || matches!(
                        c.downcast_ref::<imgbuild::render::RenderError>(),
                        Some(imgbuild::render::RenderError::Profile(_))
                    )
            });
            eprintln!("error: {err:#}");
            std::process::exit(if bad_input { 2 } else { 1 });
        }
    }
}
