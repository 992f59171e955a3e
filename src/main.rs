use clap::Parser;
use imgbuild::cli::Cli;

/// Exit codes: 0 ok, 1 failure, 2 bad input (profile errors, usage).
fn main() {
    let cli = Cli::parse_from(imgbuild::cli::normalize_args(std::env::args_os().collect()));
    match imgbuild::cmd::dispatch(&cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(imgbuild::cmd::exit_code(&err));
        }
    }
}
