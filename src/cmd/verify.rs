//! `imgbuild verify IMAGE`: check an image against its signed manifest.

use crate::cli::VerifyArgs;
use crate::secrets::SecretsRoot;
use crate::workstation::builder_pubkey;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::PathBuf;

pub fn run(args: &VerifyArgs) -> Result<i32> {
    let root = SecretsRoot::new(
        args.secrets
            .clone()
            .unwrap_or_else(|| PathBuf::from("secrets")),
    );
    let key = builder_pubkey(args.key.as_deref(), &root)?;
    match crate::image::verify(&args.image, &key) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "image": args.image, "ok": true, "manifest": report.manifest_source, "checked": report.checked })
                );
            } else {
                println!(
                    "{}: OK ({} regions match the {} manifest, signature valid)",
                    args.image.display(),
                    report.checked.len(),
                    report.manifest_source
                );
            }
            Ok(0)
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "image": args.image, "ok": false, "error": e.to_string() })
                );
            }
            Err(e).with_context(|| format!("{} does not verify", args.image.display()))
        }
    }
}
