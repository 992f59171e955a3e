//! One file per CLI verb (the operator side, plus the thin entry points of the
//! in-image verbs). Each verb parses nothing itself: clap types are in `crate::cli`,
//! profile loading in `crate::workstation`, the work in the modules of its stage.

pub mod backup;
pub mod build;
pub mod check;
pub mod drill;
pub mod firstboot;
pub mod gendocs;
pub mod init;
pub mod keys;
pub mod ready;
pub mod render;
pub mod restore;
pub mod run;
pub mod secrets;
pub mod snapshots;
pub mod summary;
pub mod upload;
pub mod verify;
pub mod wal;

use crate::cli::{Cli, Command};
use crate::workstation::resolver;

/// Runs the verb; the result is the process exit code (0 ok, 1 failure).
pub fn dispatch(cli: &Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Build(a) => build::run(a),
        Command::Render(a) => render::run(a),
        Command::Keys(a) => keys::run(a),
        Command::Init(a) => init::run(a),
        Command::Summary(a) => summary::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Run(a) => run::run(a),
        Command::Backup { args, sel } => backup::run(args, &resolver(sel)),
        Command::Snapshots { args, sel } => snapshots::run(args, &resolver(sel)),
        Command::Restore { args, sel } => restore::run(args, &resolver(sel)),
        Command::Check { args, sel } => check::run(args, &resolver(sel)),
        Command::Drill(a) => drill::run(a),
        Command::DrillRelay { port } => drill::relay(*port),
        Command::Firstboot(a) => firstboot::run(a),
        Command::Ready(a) => ready::run(a),
        Command::PostgresPrepare { volume, host } => wal::prepare(volume, host),
        Command::WalShip(a) => wal::ship(a),
        Command::Secrets(a) => secrets::run(a),
        Command::Upload(a) => upload::run(a),
        Command::GenDocs { out } => gendocs::run(out),
    }
}

/// Bad input (a profile error, a usage error) exits 2, anything else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    let bad_input = err.chain().any(|c| {
        c.is::<crate::profile::ProfileErrors>()
            || c.is::<crate::profile::ProfileError>()
            || matches!(
                c.downcast_ref::<crate::render::RenderError>(),
                Some(crate::render::RenderError::Profile(_))
            )
    });
    if bad_input {
        2
    } else {
        1
    }
}
