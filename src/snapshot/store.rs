//! The S3 side: one client per bucket, with the few operations snapshots need.
//!
//! Works against AWS and the S3-compatible servers self-hosters use: path-style
//! addressing for custom endpoints, checksums only when an operation requires them
//! (many servers reject the SDK's default trailing CRC32 chunks), Content-MD5 on every
//! PUT (AWS demands it when Object Lock retention is set), retries with backoff.

use super::error::{Result, SnapshotError};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ObjectLockMode};
use aws_sdk_s3::Client;
use aws_smithy_types::DateTime;
use base64::Engine;
use md5::{Digest, Md5};
use std::path::Path;
use std::time::Duration;

/// Objects larger than this go up in parts (chunks never do; huge manifests may).
pub const MULTIPART_THRESHOLD: usize = 64 * 1024 * 1024;
const PART_SIZE: usize = 16 * 1024 * 1024;

/// Where and how to reach the bucket.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    pub bucket: String,
    pub prefix: String,
    /// Custom endpoint; None uses AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS.
    pub endpoint: Option<String>,
    /// Empty: from the environment / profile.
    pub region: String,
    pub path_style: bool,
    /// An env file with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the host's
    /// s3.env); None uses the standard chain (env vars, ~/.aws profiles, SSO...).
    pub credentials_file: Option<std::path::PathBuf>,
    /// Object Lock retention (COMPLIANCE mode) for every object written.
    pub object_lock_days: Option<u32>,
    /// Multipart threshold override (tests); 0 = default.
    pub multipart_threshold: usize,
    /// Back up even when the bucket does not enforce `object_lock_days` (warn only).
    pub accept_unlocked_bucket: bool,
}

#[derive(Clone)]
pub struct Store {
    client: Client,
    pub bucket: String,
    pub prefix: String,
    pub object_lock_days: Option<u32>,
    /// The profile accepts a bucket that does not enforce Object Lock (the backup
    /// then warns instead of failing; the metric still says so).
    pub accept_unlocked_bucket: bool,
    multipart_threshold: usize,
    /// Cleared after a server answers 501 to If-None-Match (then we HEAD first).
    conditional_put: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Every HTTP request sent through this client (retries included), by kind.
    counters: std::sync::Arc<Counters>,
}

/// Requests by the classes providers bill separately, and bytes each way. Counted on
/// the wire by an SDK interceptor, so retries, multipart parts and list pages all
/// count, as they do on the bill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Requests {
    /// PutObject, UploadPart, Create/CompleteMultipartUpload (class A).
    pub put: u64,
    /// GetObject, whole or ranged (class B).
    pub get: u64,
    /// HeadObject.
    pub head: u64,
    /// ListObjectsV2 / ListObjectVersions pages (class A on most providers).
    pub list: u64,
    pub delete: u64,
    /// Put/GetObjectRetention and GetObjectLockConfiguration.
    pub retention: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Requests {
    pub fn total(&self) -> u64 {
        self.put + self.get + self.head + self.list + self.delete + self.retention
    }
    /// What happened between `earlier` and `self` (both read from one store).
    pub fn since(&self, earlier: &Requests) -> Requests {
        Requests {
            put: self.put - earlier.put,
            get: self.get - earlier.get,
            head: self.head - earlier.head,
            list: self.list - earlier.list,
            delete: self.delete - earlier.delete,
            retention: self.retention - earlier.retention,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
        }
    }
}

impl std::fmt::Display for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests (PUT {}, GET {}, HEAD {}, LIST {}, DELETE {}, retention {}), {} sent, {} received",
            self.total(),
            self.put,
            self.get,
            self.head,
            self.list,
            self.delete,
            self.retention,
            human_bytes(self.bytes_sent),
            human_bytes(self.bytes_received)
        )
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Debug, Default)]
struct Counters {
    put: std::sync::atomic::AtomicU64,
    get: std::sync::atomic::AtomicU64,
    head: std::sync::atomic::AtomicU64,
    list: std::sync::atomic::AtomicU64,
    delete: std::sync::atomic::AtomicU64,
    retention: std::sync::atomic::AtomicU64,
    bytes_sent: std::sync::atomic::AtomicU64,
    bytes_received: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct CountRequests(std::sync::Arc<Counters>);

impl aws_sdk_s3::config::Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "imgbuild-request-counter"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_s3::error::BoxError> {
        use std::sync::atomic::Ordering::Relaxed;
        let req = context.request();
        let query = req.uri().split_once('?').map_or("", |(_, q)| q);
        let has = |name: &str| {
            query
                .split('&')
                .any(|p| p == name || p.starts_with(&format!("{name}=")))
        };
        let c = &self.0;
        let counter = match req.method() {
            _ if has("retention") || has("object-lock") => &c.retention,
            "GET" if has("list-type") || has("versions") => &c.list,
            "GET" => &c.get,
            "HEAD" => &c.head,
            "DELETE" => &c.delete,
            _ => &c.put,
        };
        counter.fetch_add(1, Relaxed);
        if let Some(n) = req.body().content_length() {
            c.bytes_sent.fetch_add(n, Relaxed);
        }
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> std::result::Result<(), aws_sdk_s3::error::BoxError> {
        let n = context
            .response()
            .headers()
            .get("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        self.0
            .bytes_received
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// An object version hidden by a delete marker.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HiddenVersion {
    pub key: String,
    pub version_id: String,
    /// Object Lock date of the hidden version, if it has one.
    pub retain_until: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// Conditional PUT refused: the key already exists.
    Exists,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// Refused by Object Lock (or a policy): still there.
    Refused,
}

#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct PageObject {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<i64>,
    pub etag: Option<String>,
}

/// An object's body as the server sends it (see [`Store::get_stream`]).
pub struct ObjectStream {
    /// Bytes announced (Content-Length): the whole object, or the range.
    pub len: u64,
    /// `bytes A-B/TOTAL` for a ranged read.
    pub content_range: Option<String>,
    pub body: ByteStream,
}

#[derive(Debug, Clone)]
pub struct ListPage {
    pub objects: Vec<PageObject>,
    /// Set when the listing goes on.
    pub next_continuation: Option<String>,
}

fn parse_env_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| SnapshotError::KeyFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'');
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect())
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Store {
    pub async fn connect(cfg: &StoreConfig) -> Result<Store> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        let mut region = cfg.region.clone();
        if let Some(file) = &cfg.credentials_file {
            let vars = parse_env_file(file)?;
            let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let (Some(id), Some(secret)) = (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"))
            else {
                return Err(SnapshotError::KeyFile {
                    path: file.clone(),
                    reason: "needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                });
            };
            if region.is_empty() {
                region = get("AWS_REGION").unwrap_or_default();
            }
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret,
                get("AWS_SESSION_TOKEN"),
                None,
                "imgbuild-s3-env",
            ));
        }
        if !region.is_empty() {
            loader = loader.region(Region::new(region));
        }
        if let Some(ep) = &cfg.endpoint {
            loader = loader.endpoint_url(ep);
        }
        let shared = loader.load().await;
        let env_endpoint = std::env::var_os("AWS_ENDPOINT_URL_S3")
            .or_else(|| std::env::var_os("AWS_ENDPOINT_URL"))
            .is_some();
        let counters = std::sync::Arc::new(Counters::default());
        let http = super::http::client(CONNECT_TIMEOUT).map_err(SnapshotError::Other)?;
        let mut b = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(http) = http {
            b = b.http_client(http);
        }
        let mut b = b
            .interceptor(CountRequests(counters.clone()))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard()
                    .with_max_attempts(6)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        // Custom endpoints (MinIO, Garage, moto, most providers' docs) expect path style;
        // virtual-hosted style needs wildcard DNS they often lack.
        if cfg.path_style || (cfg.endpoint.is_none() && env_endpoint) {
            b = b.force_path_style(true);
        }
        if shared.region().is_none() {
            // Custom endpoints ignore the region but SigV4 needs one.
            b = b.region(Region::new("us-east-1"));
        }
        Ok(Store {
            client: Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.trim_matches('/').to_string(),
            object_lock_days: cfg.object_lock_days.filter(|d| *d > 0),
            accept_unlocked_bucket: cfg.accept_unlocked_bucket,
            multipart_threshold: if cfg.multipart_threshold == 0 {
                MULTIPART_THRESHOLD
            } else {
                cfg.multipart_threshold
            },
            conditional_put: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            counters,
        })
    }

    /// Requests sent so far through this store (and its clones).
    pub fn requests(&self) -> Requests {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        Requests {
            put: c.put.load(Relaxed),
            get: c.get.load(Relaxed),
            head: c.head.load(Relaxed),
            list: c.list.load(Relaxed),
            delete: c.delete.load(Relaxed),
            retention: c.retention.load(Relaxed),
            bytes_sent: c.bytes_sent.load(Relaxed),
            bytes_received: c.bytes_received.load(Relaxed),
        }
    }

    /// The bytes `start..start+len` of an object, verified to be exactly that many;
    /// `Ok(None)` when the key does not exist. A short answer (a truncated object) is
    /// an error naming the object, never a short buffer.
    pub async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>> {
        self.get_range_after(key, start, len, 0).await
    }

    /// As [`Store::get_range`], the bytes placed after `headroom` zeroes that the
    /// caller fills with what precedes them (a restore's chunk cut by a GET boundary),
    /// so that no copy of the whole range is needed to put the two together.
    pub async fn get_range_after(
        &self,
        key: &str,
        start: u64,
        len: u64,
        headroom: usize,
    ) -> Result<Option<Vec<u8>>> {
        if len == 0 {
            return Ok(Some(vec![0; headroom]));
        }
        let resp = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={start}-{}", start + len - 1))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || status(&e) == Some(404)
                {
                    return Ok(None);
                }
                if status(&e) == Some(416) {
                    return Err(SnapshotError::S3 {
                        op: "GetObject",
                        bucket: self.bucket.clone(),
                        key: key.to_string(),
                        message: format!(
                            "bytes {start}..{} lie past the end of the object (truncated?)",
                            start + len
                        ),
                    });
                }
                return Err(self.err("GetObject", key, e));
            }
        };
        let short = |got: u64| SnapshotError::S3 {
            op: "GetObject",
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: format!(
                "asked for {len} bytes at {start}, got {got} (the object is shorter: truncated?)"
            ),
        };
        let announced = resp.content_length.unwrap_or(0).max(0) as u64;
        // A server that ignores Range sends the whole object: refuse rather than buffer it.
        if announced != len {
            return Err(short(announced));
        }
        let mut out = Vec::with_capacity(headroom + len as usize);
        out.resize(headroom, 0);
        let out = self.read_capped(key, resp.body, out, len, short).await?;
        if (out.len() - headroom) as u64 != len {
            return Err(short((out.len() - headroom) as u64));
        }
        Ok(Some(out))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, HttpResponse>,
    ) -> SnapshotError {
        SnapshotError::S3 {
            op,
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: describe(&e),
        }
    }

    /// Retention date for an object written now, if Object Lock is on.
    pub fn lock_until(&self, now: i64) -> Option<i64> {
        self.object_lock_days.map(|d| now + i64::from(d) * 86_400)
    }

    /// GET of an object that may hold at most `max` bytes; `Ok(None)` when the key does
    /// not exist. Anyone who can write to the bucket could plant a huge object where a
    /// manifest or chunk is expected: the announced length is checked before anything
    /// is read, and the body is read no further than `max` in case the server lies.
    pub async fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let resp = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || status(&e) == Some(404)
                {
                    return Ok(None);
                }
                return Err(self.err("GetObject", key, e));
            }
        };
        let too_large = |n: u64| SnapshotError::TooLarge {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            size: n,
            max,
        };
        let announced = resp.content_length.unwrap_or(0).max(0) as u64;
        if announced > max {
            return Err(too_large(announced));
        }
        Ok(Some(
            self.read_capped(
                key,
                resp.body,
                Vec::with_capacity(announced.min(max) as usize),
                max,
                too_large,
            )
            .await?,
        ))
    }

    /// Reads a body onto the end of `out` (made with room for what the response
    /// announced), refusing with `over` (given the body bytes seen so far) as soon as
    /// it would exceed `cap`: the server may send more than it announced.
    async fn read_capped(
        &self,
        key: &str,
        mut body: ByteStream,
        mut out: Vec<u8>,
        cap: u64,
        over: impl Fn(u64) -> SnapshotError,
    ) -> Result<Vec<u8>> {
        let base = out.len() as u64;
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| SnapshotError::S3 {
                op: "GetObject",
                bucket: self.bucket.clone(),
                key: key.to_string(),
                message: format!("reading body: {e}"),
            })?;
            let seen = out.len() as u64 - base + part.len() as u64;
            if seen > cap {
                return Err(over(seen));
            }
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    /// GET as a stream, of the whole object or of the inclusive byte range
    /// `start..=end`; `Ok(None)` when the key does not exist. Nothing is buffered: the
    /// caller pulls the body as the server sends it.
    pub async fn get_stream(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Option<ObjectStream>> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some((start, end)) = range {
            req = req.range(format!("bytes={start}-{end}"));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || status(&e) == Some(404)
                {
                    return Ok(None);
                }
                return Err(self.err("GetObject", key, e));
            }
        };
        let len = resp
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| SnapshotError::S3 {
                op: "GetObject",
                bucket: self.bucket.clone(),
                key: key.to_string(),
                message: "the response has no Content-Length".into(),
            })?;
        Ok(Some(ObjectStream {
            len,
            content_range: resp.content_range().map(str::to_string),
            body: resp.body,
        }))
    }

    /// The object's size (HeadObject); `Ok(None)` when the key does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(h) => h
                .content_length()
                .and_then(|n| u64::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| SnapshotError::S3 {
                    op: "HeadObject",
                    bucket: self.bucket.clone(),
                    key: key.to_string(),
                    message: "the response has no Content-Length".into(),
                }),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.err("HeadObject", key, e)),
        }
    }

    /// PUT with Content-MD5 and, when configured and `retain_from` (the snapshot time)
    /// is given, Object Lock retention. With `if_none_match`, never replaces an
    /// existing object.
    pub async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        if_none_match: bool,
        retain_from: Option<i64>,
    ) -> Result<PutOutcome> {
        use std::sync::atomic::Ordering;
        let conditional = if_none_match && self.conditional_put.load(Ordering::Relaxed);
        if if_none_match && !conditional && self.exists(key).await? {
            return Ok(PutOutcome::Exists);
        }
        if body.len() > self.multipart_threshold {
            return self
                .put_multipart(key, body, conditional, retain_from)
                .await;
        }
        // Bytes: the 501 fallback below resends without copying the body.
        let body = bytes::Bytes::from(body);
        let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(&body));
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_md5(md5)
            .body(ByteStream::from(body.clone()));
        if conditional {
            req = req.if_none_match("*");
        }
        if let Some(until) = retain_from.and_then(|t| self.lock_until(t)) {
            req = req
                .object_lock_mode(ObjectLockMode::Compliance)
                .object_lock_retain_until_date(DateTime::from_secs(until));
        }
        match req.send().await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) => match status(&e) {
                Some(412) => Ok(PutOutcome::Exists),
                // Servers without conditional writes: remember, then check-and-put.
                Some(501) if conditional => {
                    self.conditional_put.store(false, Ordering::Relaxed);
                    Box::pin(self.put(key, body.to_vec(), if_none_match, retain_from)).await
                }
                _ => Err(self.err("PutObject", key, e)),
            },
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        body: Vec<u8>,
        conditional: bool,
        retain_from: Option<i64>,
    ) -> Result<PutOutcome> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key);
        if let Some(until) = retain_from.and_then(|t| self.lock_until(t)) {
            create = create
                .object_lock_mode(ObjectLockMode::Compliance)
                .object_lock_retain_until_date(DateTime::from_secs(until));
        }
        let up = create
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", key, e))?;
        let upload_id = up.upload_id().unwrap_or_default().to_string();
        let result: Result<PutOutcome> = async {
            let mut parts = Vec::new();
            for (i, part) in body.chunks(PART_SIZE).enumerate() {
                let n = i as i32 + 1;
                let md5 = base64::engine::general_purpose::STANDARD.encode(Md5::digest(part));
                let r = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .content_md5(md5)
                    .body(ByteStream::from(part.to_vec()))
                    .send()
                    .await
                    .map_err(|e| self.err("UploadPart", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(r.e_tag().map(str::to_string))
                        .build(),
                );
            }
            let mut done = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                );
            if conditional {
                done = done.if_none_match("*");
            }
            match done.send().await {
                Ok(_) => Ok(PutOutcome::Created),
                Err(e) if status(&e) == Some(412) => Ok(PutOutcome::Exists),
                // S3 reports late failures as an <Error> body with status 200, so the SDK
                // rejects any 200 whose root element it does not expect; some servers
                // (moto) name the root `...Response` instead of `...Result`. A 200
                // without <Error> is a completed upload.
                Err(e) if status(&e) == Some(200) && !body_has_error(&e) => Ok(PutOutcome::Created),
                Err(e) => Err(self.err("CompleteMultipartUpload", key, e)),
            }
        }
        .await;
        if !matches!(result, Ok(PutOutcome::Created)) {
            // Parts left behind cost money until a lifecycle rule removes them.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(self.err("HeadObject", key, e)),
        }
    }

    /// Whether the bucket says it enforces Object Lock (GetObjectLockConfiguration).
    /// `Err(why)` names what is missing; a server that does not implement the call
    /// (Garage answers NotImplemented and ignores the lock headers) does not enforce it.
    pub async fn object_lock_enabled(&self) -> Result<std::result::Result<(), String>> {
        match self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(r) => {
                let enabled = r
                    .object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| e.as_str() == "Enabled");
                Ok(if enabled {
                    Ok(())
                } else {
                    Err("its Object Lock configuration is not Enabled".to_string())
                })
            }
            Err(e) => {
                let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("");
                let st = status(&e);
                if code == "ObjectLockConfigurationNotFoundError"
                    || code == "NotImplemented"
                    || st == Some(501)
                    || st == Some(404)
                {
                    let why = if code.is_empty() {
                        format!("HTTP {}", st.unwrap_or(0))
                    } else {
                        code.to_string()
                    };
                    Ok(Err(format!(
                        "GetObjectLockConfiguration answered {why}: the bucket was not created with Object Lock, or the server does not implement it"
                    )))
                } else {
                    Err(self.err("GetObjectLockConfiguration", "", e))
                }
            }
        }
    }

    /// Object Lock retain-until date (seconds), read through HeadObject.
    pub async fn retention(&self, key: &str) -> Result<Option<i64>> {
        let h = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err("HeadObject", key, e))?;
        Ok(h.object_lock_retain_until_date().map(|d| d.secs()))
    }

    /// Moves an object's retention forward (COMPLIANCE dates can only grow).
    pub async fn extend_retention(&self, key: &str, until: i64) -> Result<()> {
        use aws_sdk_s3::types::{ObjectLockRetention, ObjectLockRetentionMode};
        self.client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(key)
            .retention(
                ObjectLockRetention::builder()
                    .mode(ObjectLockRetentionMode::Compliance)
                    .retain_until_date(DateTime::from_secs(until))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err("PutObjectRetention", key, e))?;
        Ok(())
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("ListObjectsV2", prefix, e))?;
            for o in page.contents() {
                out.push(Listed {
                    key: o.key().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: o.last_modified().map(|d| d.secs()),
                });
            }
        }
        Ok(out)
    }

    /// One ListObjectsV2 page, as the server cut it: the drill's gateway relays pages
    /// one for one so a guest's continuation tokens are the real bucket's.
    pub async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<&str>,
        max_keys: Option<i32>,
    ) -> Result<ListPage> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_continuation_token(continuation.map(str::to_string))
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| self.err("ListObjectsV2", prefix, e))?;
        Ok(ListPage {
            objects: page
                .contents()
                .iter()
                .map(|o| PageObject {
                    key: o.key().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: o.last_modified().map(|d| d.secs()),
                    etag: o.e_tag().map(str::to_string),
                })
                .collect(),
            next_continuation: page
                .next_continuation_token()
                .filter(|_| page.is_truncated() == Some(true))
                .map(str::to_string),
        })
    }

    /// DELETE by key. On a versioned (Object Lock) bucket this only adds a delete
    /// marker; the locked version stays until its date and a lifecycle rule.
    /// Objects under `prefix` whose current version is a delete marker while an
    /// older version still exists, with that version and its Object Lock date. Empty
    /// where the server keeps no versions (or does not implement the listing).
    pub async fn hidden_versions(&self, prefix: &str) -> Result<Vec<HiddenVersion>> {
        let mut marked: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut newest: std::collections::BTreeMap<String, String> = Default::default();
        let (mut key_marker, mut version_marker) = (None::<String>, None::<String>);
        loop {
            let resp = match self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(version_marker.clone())
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) if matches!(status(&e), Some(501) | Some(404) | Some(400)) => {
                    return Ok(Vec::new())
                }
                Err(e) => return Err(self.err("ListObjectVersions", prefix, e)),
            };
            for m in resp.delete_markers() {
                if m.is_latest() == Some(true) {
                    if let Some(k) = m.key() {
                        marked.insert(k.to_string());
                    }
                }
            }
            // Versions of a key are listed newest first.
            for v in resp.versions() {
                if let (Some(k), Some(id)) = (v.key(), v.version_id()) {
                    newest
                        .entry(k.to_string())
                        .or_insert_with(|| id.to_string());
                }
            }
            if resp.is_truncated() != Some(true) {
                break;
            }
            key_marker = resp.next_key_marker().map(str::to_string);
            version_marker = resp.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        let mut out = Vec::new();
        for (key, version_id) in newest {
            if !marked.contains(&key) {
                continue;
            }
            let h = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&key)
                .version_id(&version_id)
                .send()
                .await
                .map_err(|e| self.err("HeadObject", &key, e))?;
            out.push(HiddenVersion {
                retain_until: h.object_lock_retain_until_date().map(|d| d.secs()),
                key,
                version_id,
            });
        }
        Ok(out)
    }

    /// GET of one version of an object (bounded like [`Store::get`]).
    pub async fn get_version(&self, key: &str, version_id: &str, max: u64) -> Result<Vec<u8>> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .version_id(version_id)
            .send()
            .await
            .map_err(|e| self.err("GetObject", key, e))?;
        let n = resp.content_length.unwrap_or(0).max(0) as u64;
        if n > max {
            return Err(SnapshotError::TooLarge {
                bucket: self.bucket.clone(),
                key: key.to_string(),
                size: n,
                max,
            });
        }
        let body = resp.body.collect().await.map_err(|e| SnapshotError::S3 {
            op: "GetObject",
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: format!("reading body: {e}"),
        })?;
        Ok(body.into_bytes().to_vec())
    }

    pub async fn delete(&self, key: &str) -> Result<DeleteOutcome> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(DeleteOutcome::Deleted),
            Err(e) if matches!(status(&e), Some(403)) => Ok(DeleteOutcome::Refused),
            Err(e) => Err(self.err("DeleteObject", key, e)),
        }
    }
}

/// "a: b: c" from an error and its sources, skipping repeats (the SDK nests
/// wrappers that say the same thing).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        let s = x.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = x.source();
    }
    parts.join(": ")
}

pub(crate) fn body_has_error<E>(e: &SdkError<E, HttpResponse>) -> bool {
    e.raw_response()
        .and_then(|r| r.body().bytes())
        .is_none_or(|b| String::from_utf8_lossy(b).contains("<Error>"))
}

pub(crate) fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// A request signed for the wrong region is the commonest first-setup error against
/// self-hosted servers (Garage's region is "garage", MinIO's often "us-east-1", a
/// provider's its zone). The server says which region it wanted; the hint says where
/// to put it.
pub fn region_hint(code: &str, message: &str) -> Option<String> {
    let region_error = matches!(
        code,
        "AuthorizationHeaderMalformed" | "AuthorizationQueryParametersError" | "PermanentRedirect"
    ) || message.contains("region");
    if !region_error {
        return None;
    }
    let expected = expected_region(message);
    let fix = |r: &str| {
        format!(
            "set backup.region = \"{r}\" in the profile (or AWS_REGION={r} in the host's s3.env / the environment)"
        )
    };
    Some(match expected {
        Some(r) => format!("the bucket's region is \"{r}\": {}", fix(&r)),
        None => format!(
            "the request was signed for a region the bucket does not use: {}",
            fix("<the bucket's region>")
        ),
    })
}

/// The region a server asked for: AWS says `expecting 'eu-west-1'`, Garage and MinIO
/// quote the credential scope they expected (`expected: KEY/20261203/garage/s3/...`).
fn expected_region(message: &str) -> Option<String> {
    let valid = |r: &str| {
        !r.is_empty()
            && r.len() <= 64
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if let Some(i) = message.find("expecting '") {
        let rest = &message[i + "expecting '".len()..];
        let r = rest.split('\'').next().unwrap_or("");
        if valid(r) {
            return Some(r.to_string());
        }
    }
    // The last mention: "unexpected scope: … expected: …" names both.
    let i = message.rfind("expected")?;
    let scope = &message[i..];
    let parts: Vec<&str> = scope.split(['/', ' ', ',', ';']).collect();
    // …/<yyyymmdd>/<region>/s3/aws4_request
    parts.windows(3).find_map(|w| {
        (w[0].len() == 8 && w[0].chars().all(|c| c.is_ascii_digit()) && w[2] == "s3" && valid(w[1]))
            .then(|| w[1].to_string())
    })
}

fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, HttpResponse>,
) -> String {
    match e {
        SdkError::ServiceError(s) if s.err().code().is_some() => {
            let err = s.err();
            let code = err.code().unwrap_or("error");
            let message = err.message().unwrap_or("(no message)");
            format!(
                "{code} (HTTP {}): {message}{}",
                s.raw().status().as_u16(),
                region_hint(code, message)
                    .map(|h| format!("\n  hint: {h}"))
                    .unwrap_or_default()
            )
        }
        SdkError::ServiceError(s) => format!(
            "HTTP {}: {}",
            s.raw().status().as_u16(),
            String::from_utf8_lossy(s.raw().body().bytes().unwrap_or_default())
                .chars()
                .take(2000)
                .collect::<String>()
        ),
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            format!("cannot reach the endpoint: {}", error_chain(e))
        }
        _ => error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::region_hint;

    #[test]
    fn region_mismatch_names_the_region_to_set() {
        // Garage 2.5's answer to a request signed for us-east-1.
        let garage = "Authorization header malformed, unexpected scope: 20261203/us-east-1/s3/aws4_request; expected: GK31c2f218a2e44f485b94239e/20261203/garage/s3/aws4_request";
        let h = region_hint("AuthorizationHeaderMalformed", garage).unwrap();
        assert!(
            h.contains("\"garage\"") && h.contains("backup.region"),
            "{h}"
        );
        let aws = "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-central-1'";
        let h = region_hint("AuthorizationHeaderMalformed", aws).unwrap();
        assert!(h.contains("\"eu-central-1\""), "{h}");
        assert!(region_hint("NoSuchKey", "The specified key does not exist.").is_none());
    }
}
