//! `imgbuild upload IMAGE s3://bucket/key`: an image and its signed manifest, for a
//! provider's image import.

use crate::cli::UploadArgs;
use crate::progress::Progress;
use crate::snapshot::{Store, StoreConfig};
use crate::upload::{parse_dest, upload_file};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

pub fn run(args: &UploadArgs) -> Result<i32> {
    let (bucket, key) = parse_dest(&args.dest)?;
    if args.part_mib < 5 {
        bail!("--part-mib must be at least 5 (S3's minimum part size)");
    }
    let progress = Progress::detect(args.quiet || args.json);
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
        .filter(|e| !e.is_empty());
    let cfg = StoreConfig {
        bucket: bucket.clone(),
        prefix: String::new(),
        path_style: endpoint.is_some(),
        endpoint,
        region: args
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into()),
        credentials_file: None,
        object_lock_days: None,
        multipart_threshold: 0,
        accept_unlocked_bucket: false,
    };
    let rt = crate::snapshot::runtime()?;
    let (bytes, sidecars) = rt.block_on(async {
        let store = Store::connect(&cfg).await?;
        let bytes = upload_file(
            &store,
            &args.image,
            &key,
            args.part_mib * 1024 * 1024,
            &progress,
        )
        .await?;
        let mut sidecars = vec![];
        for ext in ["manifest.json", "manifest.json.sig"] {
            let mut p = args.image.clone().into_os_string();
            p.push(format!(".{ext}"));
            let p = PathBuf::from(p);
            if p.is_file() {
                let k = format!("{key}.{ext}");
                let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                store
                    .put(&k, data, false, None)
                    .await
                    .with_context(|| format!("uploading {k}"))?;
                sidecars.push(k);
            }
        }
        anyhow::Ok((bytes, sidecars))
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "bucket": bucket, "key": key, "bytes": bytes, "sidecars": sidecars })
        );
    } else {
        progress.note(&format!(
            "imgbuild: uploaded {} ({bytes} bytes) to s3://{bucket}/{key}{}",
            args.image.display(),
            if sidecars.is_empty() {
                String::new()
            } else {
                format!(" with {}", sidecars.join(", "))
            }
        ));
    }
    Ok(0)
}
