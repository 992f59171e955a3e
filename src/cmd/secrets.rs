//! `imgbuild secrets lock|unlock`: keep the secrets directory encrypted at rest.

use crate::secrets::SecretsRoot;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub fn run(args: &crate::cli::SecretsArgs) -> Result<i32> {
    use crate::cli::SecretsAction;
    use crate::secrets::{self, LockTo, Locked, Unlock};
    let env_pass = |var: &Option<String>| -> Result<Option<String>> {
        match var {
            Some(v) => {
                Ok(Some(std::env::var(v).with_context(|| {
                    format!("environment variable {v} is not set")
                })?))
            }
            None => Ok(None),
        }
    };
    match &args.action {
        SecretsAction::Lock {
            secrets: dir,
            recipients,
            identity,
            passphrase_env,
            confirm_with,
        } => {
            let root = SecretsRoot::new(dir.clone().unwrap_or_else(|| PathBuf::from("secrets")));
            if let Some(id) = confirm_with {
                let u = Unlock {
                    identity: Some(id.clone()),
                    passphrase: None,
                };
                let out = secrets::confirm_lock(&root, &u)?;
                println!(
                    "checked: {} opens with {} and holds every file of {} byte for byte; removed the directory",
                    out.display(),
                    id.display(),
                    root.root.display()
                );
                return Ok(0);
            }
            let to = match (env_pass(passphrase_env)?, identity) {
                (Some(p), _) => LockTo::Passphrase(p),
                (None, Some(file)) => LockTo::Identity {
                    file: file.clone(),
                    also: recipients.clone(),
                },
                (None, None) if !recipients.is_empty() => LockTo::Recipients(recipients.clone()),
                (None, None) => bail!(
                    "say who can unlock: --identity FILE, --recipient age1... (repeatable) or --passphrase-env VAR"
                ),
            };
            match secrets::lock(&root, &to)? {
                Locked::Done(out) => println!(
                    "locked {} into {} (checked: it opens and holds every file byte for byte; the directory is removed, builds read the locked file in memory)",
                    root.root.display(),
                    out.display()
                ),
                Locked::Pending(out) => println!(
                    "wrote {}, but kept the directory {}: nothing has shown yet that the archive opens.\n  \
                     Run `imgbuild secrets lock --confirm-with IDENTITY_FILE` (the identity of one of the recipients) \
                     to check it and remove the directory; until then builds use the directory.",
                    out.display(),
                    root.root.display()
                ),
            }
        }
        SecretsAction::Unlock {
            secrets: dir,
            identity,
            passphrase_env,
        } => {
            let root = dir.clone().unwrap_or_else(|| PathBuf::from("secrets"));
            let mut u = Unlock::from_env(identity.clone());
            if let Some(p) = env_pass(passphrase_env)? {
                u.passphrase = Some(p);
            }
            secrets::unlock(&root, &u)?;
            println!("unlocked into {}", root.display());
        }
    }
    Ok(0)
}
