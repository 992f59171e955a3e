//! The drill's read-only door to the bucket: a small HTTP/1.1 server on 127.0.0.1 that
//! a restricted guest reaches through a QEMU guestfwd and that answers the two S3 calls
//! a restore makes (ListObjectsV2 and GetObject, plus HeadObject) by calling the real
//! bucket with the workstation's credentials.
//!
//! Read-only is structural, not a promise of the guest's code: this server has no code
//! path that writes, and the guest has no other route to the bucket (with
//! `--allow-egress` it has the internet, but no key to the bucket: see
//! `super::guest_input`). Every other method,
//! sub-resource or key outside the host's prefix is answered 403 and counted, so the
//! report can say how many writes the drilled image attempted. SigV4 signatures are not
//! checked: only the drill's own guest can connect (127.0.0.1, through its guestfwd).

use crate::snapshot::Store;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests and headers larger than this are not S3 reads.
const MAX_HEAD: usize = 64 * 1024;
/// Bodies of refused uploads are read and dropped (so the client sees the 403, not a
/// reset) up to this size; beyond it the connection is closed.
const MAX_DRAIN: u64 = 64 * 1024 * 1024;
/// Refused requests kept verbatim for the report.
const REFUSED_KEPT: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(std::io::Error),
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    lists: AtomicU64,
    objects: AtomicU64,
    bytes: AtomicU64,
    writes_refused: AtomicU64,
    reads_refused: AtomicU64,
    upstream_errors: AtomicU64,
    refused: Mutex<Vec<String>>,
}

/// What the gateway saw, for the drill report.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GatewayStats {
    pub requests: u64,
    pub lists: u64,
    pub objects_served: u64,
    pub bytes_served: u64,
    /// PUT, POST, DELETE... (anything but GET and HEAD): all refused.
    pub writes_refused: u64,
    /// Reads outside the host's prefix or of sub-resources restore does not use.
    pub reads_refused: u64,
    pub upstream_errors: u64,
    /// The first refused requests, `METHOD /path?query`.
    pub refused: Vec<String>,
}

/// A running gateway; dropping it stops accepting connections.
pub struct Gateway {
    port: u16,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    store: Store,
    rt: tokio::runtime::Handle,
    /// `<prefix>/`: every key served starts with it.
    prefix: String,
    counters: Arc<Counters>,
}

impl Gateway {
    /// Serves `store` (its bucket, restricted to its prefix) on 127.0.0.1 at a free port.
    /// `rt` runs the S3 calls; it must outlive the gateway.
    pub fn start(store: Store, rt: tokio::runtime::Handle) -> Result<Gateway, GatewayError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(GatewayError::Listen)?;
        let port = listener.local_addr().map_err(GatewayError::Listen)?.port();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            prefix: format!("{}/", store.prefix.trim_matches('/')),
            store,
            rt,
            counters: counters.clone(),
        });
        let stop2 = stop.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve_connection(&shared, conn));
            }
        });
        Ok(Gateway {
            port,
            counters,
            stop,
            accept: Some(accept),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stats(&self) -> GatewayStats {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::SeqCst);
        GatewayStats {
            requests: n(&c.requests),
            lists: n(&c.lists),
            objects_served: n(&c.objects),
            bytes_served: n(&c.bytes),
            writes_refused: n(&c.writes_refused),
            reads_refused: n(&c.reads_refused),
            upstream_errors: n(&c.upstream_errors),
            refused: c.refused.lock().map(|v| v.clone()).unwrap_or_default(),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept() so the thread sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    /// Decoded path, without the query.
    path: String,
    query: BTreeMap<String, String>,
    raw_target: String,
    headers: BTreeMap<String, String>,
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Body,
    /// HEAD: send the length of `body` but not the body.
    head_only: bool,
    close: bool,
}

enum Body {
    Bytes(Vec<u8>),
    /// An object, passed on chunk by chunk as the bucket sends it: chunks and
    /// manifests can be large, and a restore fetches several at once.
    Stream(crate::snapshot::store::ObjectStream),
    /// HEAD of an object: its length, and nothing fetched.
    Length(u64),
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Body {
        Body::Bytes(b)
    }
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::Stream(s) => s.len,
            Body::Length(n) => *n,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        502 => "Bad Gateway",
        _ => "Error",
    }
}

fn serve_connection(sh: &Shared, conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut out = std::io::BufWriter::new(write_half);
    let mut input = BufReader::new(conn);
    loop {
        let req = match read_request(&mut input) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(msg) => {
                let _ = write_response(sh, &mut out, error(400, "InvalidRequest", &msg, true));
                return;
            }
        };
        sh.counters.requests.fetch_add(1, Ordering::SeqCst);
        let body_len: u64 = req
            .headers
            .get("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let chunked = req
            .headers
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let mut resp = handle(sh, &req);
        // A client waiting for `100 Continue` never sends the body it announced.
        let expects = req
            .headers
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if !expects && (chunked || body_len > MAX_DRAIN) {
            resp.close = true;
        } else if !expects && body_len > 0 {
            let drained = std::io::copy(&mut (&mut input).take(body_len), &mut std::io::sink());
            if !matches!(drained, Ok(n) if n == body_len) {
                resp.close = true;
            }
        } else if expects {
            resp.close = true;
        }
        if req
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            resp.close = true;
        }
        let close = resp.close;
        if write_response(sh, &mut out, resp).is_err() || close {
            let _ = out.flush();
            if let Ok(s) = out.get_ref().try_clone() {
                let _ = s.shutdown(Shutdown::Both);
            }
            return;
        }
    }
}

fn read_request(input: &mut BufReader<TcpStream>) -> Result<Option<Request>, String> {
    let mut line = String::new();
    let mut total = 0usize;
    // Idle keep-alive connections end here.
    match input.read_line(&mut line) {
        Ok(0) => return Ok(None),
        Ok(n) => total += n,
        Err(_) => return Ok(None),
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(_version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line".into());
    };
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        let n = input
            .read_line(&mut h)
            .map_err(|e| format!("reading headers: {e}"))?;
        total += n;
        if n == 0 || total > MAX_HEAD {
            return Err("headers too long or cut short".into());
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|q| !q.is_empty())
        .map(|q| {
            let (k, v) = q.split_once('=').unwrap_or((q, ""));
            Ok((pct_decode(k)?, pct_decode(v)?))
        })
        .collect::<Result<_, String>>()?;
    Ok(Some(Request {
        method: method.to_string(),
        path: pct_decode(path)?,
        query,
        raw_target: target.to_string(),
        headers,
    }))
}

/// Percent-decodes to bytes, then reads them as UTF-8: a key with multibyte
/// characters (raw or encoded) comes out as it went in, and bytes that are not UTF-8
/// are an error rather than a silently different key.
fn pct_decode(s: &str) -> Result<String, String> {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        // '+' stays '+': S3 clients percent-encode spaces, and keys may hold a '+'.
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8"))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn error(status: u16, code: &str, msg: &str, close: bool) -> Response {
    Response {
        status,
        headers: vec![("Content-Type", "application/xml".into())],
        body: format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message></Error>",
            xml_escape(msg)
        )
        .into_bytes()
        .into(),
        head_only: false,
        close,
    }
}

fn refuse(sh: &Shared, req: &Request, write: bool, why: &str) -> Response {
    let c = &sh.counters;
    if write {
        c.writes_refused.fetch_add(1, Ordering::SeqCst);
    } else {
        c.reads_refused.fetch_add(1, Ordering::SeqCst);
    }
    if let Ok(mut v) = c.refused.lock() {
        if v.len() < REFUSED_KEPT {
            v.push(format!("{} {}", req.method, req.raw_target));
        }
    }
    error(
        403,
        "AccessDenied",
        &format!("imgbuild drill gateway is read-only: {why}"),
        false,
    )
}

fn handle(sh: &Shared, req: &Request) -> Response {
    let head = req.method == "HEAD";
    if req.method != "GET" && !head {
        return refuse(sh, req, true, "only GET and HEAD are served");
    }
    let path = req.path.trim_start_matches('/');
    let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
    if bucket != sh.store.bucket {
        return refuse(sh, req, false, "another bucket");
    }
    if key.is_empty() && req.query.contains_key("versions") {
        // First boot asks for object versions to spot hidden snapshots; the drill
        // has already done that against the real bucket and pinned the snapshot.
        return error(
            501,
            "NotImplemented",
            "the drill gateway does not list object versions",
            false,
        );
    }
    if key.is_empty() {
        // Bucket-level: only ListObjectsV2 within the prefix.
        let only_list = req.query.keys().all(|k| {
            matches!(
                k.as_str(),
                "list-type" | "prefix" | "continuation-token" | "max-keys" | "encoding-type"
            )
        });
        let prefix = req.query.get("prefix").map(String::as_str).unwrap_or("");
        if req.query.get("list-type").map(String::as_str) != Some("2") || !only_list {
            return refuse(sh, req, false, "only ListObjectsV2 is served on the bucket");
        }
        if !prefix.starts_with(&sh.prefix) {
            return refuse(sh, req, false, "listing outside the host's prefix");
        }
        let mut r = list(sh, prefix, req);
        r.head_only = head;
        return r;
    }
    // GetObject gets `x-id=GetObject` from the SDK; any other sub-resource (acl,
    // retention, tagging, uploads...) is not object content.
    if req.query.keys().any(|k| k != "x-id")
        || req
            .query
            .get("x-id")
            .is_some_and(|v| v != "GetObject" && v != "HeadObject")
    {
        return refuse(sh, req, false, "sub-resources are not served");
    }
    if !key.starts_with(&sh.prefix) || key.split('/').any(|c| c == ".." || c == ".") {
        return refuse(sh, req, false, "key outside the host's prefix");
    }
    get(sh, key, req.headers.get("range").map(String::as_str), head)
}

fn list(sh: &Shared, prefix: &str, req: &Request) -> Response {
    sh.counters.lists.fetch_add(1, Ordering::SeqCst);
    let token = req.query.get("continuation-token").map(String::as_str);
    let max_keys = req
        .query
        .get("max-keys")
        .and_then(|v| v.parse::<i32>().ok());
    let page = match sh.rt.block_on(sh.store.list_page(prefix, token, max_keys)) {
        Ok(p) => p,
        Err(e) => {
            sh.counters.upstream_errors.fetch_add(1, Ordering::SeqCst);
            return error(502, "InternalError", &e.to_string(), false);
        }
    };
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
    );
    x.push_str(&format!(
        "<Name>{}</Name><Prefix>{}</Prefix><MaxKeys>{}</MaxKeys><KeyCount>{}</KeyCount><IsTruncated>{}</IsTruncated>",
        xml_escape(&sh.store.bucket),
        xml_escape(prefix),
        max_keys.unwrap_or(1000),
        page.objects.len(),
        page.next_continuation.is_some()
    ));
    if let Some(t) = token {
        x.push_str(&format!(
            "<ContinuationToken>{}</ContinuationToken>",
            xml_escape(t)
        ));
    }
    if let Some(t) = &page.next_continuation {
        x.push_str(&format!(
            "<NextContinuationToken>{}</NextContinuationToken>",
            xml_escape(t)
        ));
    }
    for o in &page.objects {
        x.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
            xml_escape(&o.key),
            o.last_modified
                .map(crate::snapshot::format::rfc3339)
                .unwrap_or_else(|| "1970-01-01T00:00:00Z".into()),
            xml_escape(o.etag.as_deref().unwrap_or("\"\"")),
            o.size
        ));
    }
    x.push_str("</ListBucketResult>");
    Response {
        status: 200,
        headers: vec![("Content-Type", "application/xml".into())],
        body: Body::Bytes(x.into_bytes()),
        head_only: false,
        close: false,
    }
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` against a body of `len` bytes.
fn parse_range(spec: &str, len: u64) -> Option<(u64, u64)> {
    let r = spec.trim().strip_prefix("bytes=")?;
    if r.contains(',') {
        return None;
    }
    let (a, b) = r.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?),
        ),
    };
    (start <= end && start < len).then_some((start, end))
}

/// GetObject / HeadObject. A range needs the object's length first (to answer 416 as
/// S3 does), so it costs a HEAD; the bytes themselves are never held here, only passed
/// on as they arrive.
fn get(sh: &Shared, key: &str, range: Option<&str>, head: bool) -> Response {
    let upstream = |e: crate::snapshot::SnapshotError| {
        sh.counters.upstream_errors.fetch_add(1, Ordering::SeqCst);
        error(502, "InternalError", &e.to_string(), false)
    };
    let not_found = || error(404, "NoSuchKey", "The specified key does not exist.", false);
    let mut headers = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let wanted = match range {
        None if !head => None,
        _ => {
            let len = match sh.rt.block_on(sh.store.size(key)) {
                Ok(Some(n)) => n,
                Ok(None) => return with_head(not_found(), head),
                Err(e) => return with_head(upstream(e), head),
            };
            match range.map(|spec| parse_range(spec, len)) {
                None => {
                    sh.counters.objects.fetch_add(1, Ordering::SeqCst);
                    return Response {
                        status: 200,
                        headers,
                        body: Body::Length(len),
                        head_only: true,
                        close: false,
                    };
                }
                Some(None) => {
                    let mut r = error(
                        416,
                        "InvalidRange",
                        "The requested range is not satisfiable",
                        false,
                    );
                    r.headers.push(("Content-Range", format!("bytes */{len}")));
                    return with_head(r, head);
                }
                Some(Some((s, e))) => {
                    headers.push(("Content-Range", format!("bytes {s}-{e}/{len}")));
                    if head {
                        sh.counters.objects.fetch_add(1, Ordering::SeqCst);
                        return Response {
                            status: 206,
                            headers,
                            body: Body::Length(e - s + 1),
                            head_only: true,
                            close: false,
                        };
                    }
                    Some((s, e))
                }
            }
        }
    };
    let stream = match sh.rt.block_on(sh.store.get_stream(key, wanted)) {
        Ok(Some(s)) => s,
        Ok(None) => return not_found(),
        Err(e) => return upstream(e),
    };
    if let Some((s, e)) = wanted {
        if stream.len != e - s + 1 {
            // Changed between the HEAD and the GET: better an error than wrong bytes.
            sh.counters.upstream_errors.fetch_add(1, Ordering::SeqCst);
            return error(
                502,
                "InternalError",
                &format!("the bucket sent {} bytes for the range {s}-{e}", stream.len),
                false,
            );
        }
    }
    sh.counters.objects.fetch_add(1, Ordering::SeqCst);
    Response {
        status: if wanted.is_some() { 206 } else { 200 },
        headers,
        body: Body::Stream(stream),
        head_only: false,
        close: false,
    }
}

fn with_head(mut r: Response, head: bool) -> Response {
    r.head_only = head;
    r
}

/// Writes the response; a streamed body is copied chunk by chunk. An error (the
/// client gone, or the bucket failing mid-body after the length was announced) is
/// returned so the caller closes the connection: the client then sees a short body,
/// never a complete-looking wrong one.
fn write_response(sh: &Shared, out: &mut impl Write, r: Response) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
    head.push_str("Server: imgbuild-drill-gateway\r\n");
    if r.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if r.head_only {
        return out.flush();
    }
    match r.body {
        Body::Bytes(b) => out.write_all(&b)?,
        Body::Length(_) => {}
        Body::Stream(mut s) => {
            let mut sent = 0u64;
            let short = |what: String| {
                sh.counters.upstream_errors.fetch_add(1, Ordering::SeqCst);
                std::io::Error::other(what)
            };
            while let Some(chunk) = sh.rt.block_on(s.body.next()) {
                let chunk = chunk.map_err(|e| short(format!("reading from the bucket: {e}")))?;
                if sent + chunk.len() as u64 > s.len {
                    return Err(short("the bucket sent more than it announced".into()));
                }
                out.write_all(&chunk)?;
                sent += chunk.len() as u64;
                sh.counters
                    .bytes
                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            if sent != s.len {
                return Err(short(format!("the bucket sent {sent} of {} bytes", s.len)));
            }
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,4-5", 100), None);
        assert_eq!(parse_range("bytes=0-1", 0), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(pct_decode("a%2Fb%20c").unwrap(), "a/b c");
        assert_eq!(pct_decode("100%").unwrap(), "100%");
        assert_eq!(pct_decode("%zz").unwrap(), "%zz");
        // Raw and encoded multibyte characters, and a '%' just before one.
        assert_eq!(pct_decode("é%C3%A9").unwrap(), "éé");
        assert_eq!(pct_decode("%aé").unwrap(), "%aé");
        assert_eq!(pct_decode("%é").unwrap(), "%é");
        assert_eq!(pct_decode("x%E2%82%AC%").unwrap(), "x€%");
        // A sign is not a hex digit.
        assert_eq!(pct_decode("%+1").unwrap(), "%+1");
        // Not UTF-8 once decoded: refused, not replaced by U+FFFD.
        assert!(pct_decode("%C3").is_err());
        assert!(pct_decode("%FF%FE").is_err());
    }
}
