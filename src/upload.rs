//! `imgbuild upload IMAGE s3://bucket/key`: for providers that import custom images
//! from object storage. Streams the image in multipart parts (never the whole image
//! in memory), each part with its Content-MD5, then the signed manifest beside it.

use crate::progress::Progress;
use crate::snapshot::Store;
use anyhow::{bail, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use md5::{Digest, Md5};
use std::io::Read;
use std::path::Path;

pub fn parse_dest(dest: &str) -> Result<(String, String)> {
    let rest = dest
        .strip_prefix("s3://")
        .with_context(|| format!("`{dest}` is not s3://bucket/key"))?;
    match rest.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() && !k.ends_with('/') => {
            Ok((b.to_string(), k.to_string()))
        }
        _ => bail!("`{dest}` is not s3://bucket/key (the key names the image object)"),
    }
}

fn read_part(f: &mut std::fs::File, size: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut n = 0;
    while n < size {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    buf.truncate(n);
    Ok(buf)
}

pub async fn upload_file(
    store: &Store,
    path: &Path,
    key: &str,
    part: usize,
    progress: &Progress,
) -> Result<u64> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let client = store.client();
    let step = progress.step("upload", Some(size));
    let up = client
        .create_multipart_upload()
        .bucket(&store.bucket)
        .key(key)
        .send()
        .await
        .with_context(|| format!("starting the upload of {key}"))?;
    let id = up.upload_id().unwrap_or_default().to_string();
    let result: Result<()> = async {
        let mut parts = vec![];
        let mut n = 1;
        loop {
            let data =
                read_part(&mut f, part).with_context(|| format!("reading {}", path.display()))?;
            if data.is_empty() && n > 1 {
                break;
            }
            let len = data.len() as u64;
            let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&data));
            let r = client
                .upload_part()
                .bucket(&store.bucket)
                .key(key)
                .upload_id(&id)
                .part_number(n)
                .content_md5(md5)
                .body(ByteStream::from(data))
                .send()
                .await
                .with_context(|| format!("uploading part {n} of {key}"))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(r.e_tag().map(str::to_string))
                    .build(),
            );
            step.inc(len);
            n += 1;
            if len < part as u64 {
                break;
            }
        }
        let done = client
            .complete_multipart_upload()
            .bucket(&store.bucket)
            .key(key)
            .upload_id(&id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match done {
            Ok(_) => Ok(()),
            // Some servers (moto) answer a completed upload with a root element the SDK
            // does not expect; a 200 without <Error> is a completed upload.
            Err(e)
                if crate::snapshot::store::status(&e) == Some(200)
                    && !crate::snapshot::store::body_has_error(&e) =>
            {
                Ok(())
            }
            Err(e) => {
                Err(anyhow::Error::from(e).context(format!("completing the upload of {key}")))
            }
        }
    }
    .await;
    if result.is_err() {
        // Parts of an abandoned upload are billed until aborted.
        let _ = client
            .abort_multipart_upload()
            .bucket(&store.bucket)
            .key(key)
            .upload_id(&id)
            .send()
            .await;
    }
    result?;
    step.finish();
    Ok(size)
}
