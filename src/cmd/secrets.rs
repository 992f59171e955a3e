//! `imgbuild secrets lock|unlock`: keep the secrets directory encrypted at rest.

use crate::secrets::SecretsRoot;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub fn run(args: &crate::cli::SecretsArgs) -> Result<i32> {
    use crate::cli::SecretsAction;
    use crate::secrets::{self, LockTo, Unlock};
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
            passphrase_env,
        } => {
            let root = SecretsRoot::new(dir.clone().unwrap_or_else(|| PathBuf::from("secrets")));
            let to = match env_pass(passphrase_env)? {
                Some(p) => LockTo::Passphrase(p),
                None if !recipients.is_empty() => LockTo::Recipients(recipients.clone()),
                None => bail!(
                    "say who can unlock: --recipient age1... (repeatable) or --passphrase-env VAR"
                ),
            };
            let out = secrets::lock(&root, &to)?;
            println!("locked {} into {} (the directory is removed; builds read the locked file in memory)", root.root.display(), out.display());
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
