//! The HTTP client under the S3 SDK: hyper and rustls (aws-lc, the system's roots, the
//! SDK's cipher suites), as the SDK's default client, except that every connection
//! acknowledges what it reads at once (`TCP_QUICKACK`). With a proxy in the
//! environment the SDK's own client is used instead (see [`client`]).
//!
//! Why: a server that leaves Nagle's algorithm on (Garage 2.5's S3 API does) writes a
//! response's headers, then holds a body tail shorter than a segment until the headers
//! are acknowledged, and Linux delays that acknowledgement by 40 ms (more on a slow
//! path) once a connection looks interactive, which request, response, request is.
//! Measured against Garage on 127.0.0.1: every GET under ~64 KiB took 43 ms instead of
//! 2, and one restore of the benchmark's 402 MiB sat through about 38 such stalls
//! (manifest, entry lists, the short ranges). One `setsockopt` per read ends them; the
//! kernel re-enters delayed acknowledgements by itself, hence after every read.

use aws_smithy_runtime_api::client::connection::{CaptureSmithyConnection, ConnectionMetadata};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::retries::ErrorKind;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{
    capture_connection, Connected, Connection, HttpConnector as TcpConnector,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The client for [`aws_sdk_s3::config::Builder::http_client`], or `None` when the
/// environment names a proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, any case): the
/// SDK's own client goes through it (honouring `NO_PROXY`), this one does not.
pub fn client(connect_timeout: Duration) -> Result<Option<SharedHttpClient>, String> {
    let proxied = ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"]
        .iter()
        .flat_map(|v| [v.to_string(), v.to_lowercase()])
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if proxied {
        return Ok(None);
    }
    Ok(Some(SharedHttpClient::new(QuickAckClient {
        connector: SharedHttpConnector::new(Connector::new(connect_timeout)?),
    })))
}

#[derive(Debug, Clone)]
struct QuickAckClient {
    connector: SharedHttpConnector,
}

impl HttpClient for QuickAckClient {
    // One pool for every operation: the settings the SDK passes are the timeouts that
    // `Store::connect` already gave `client`.
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        self.connector.clone()
    }
}

type Https = Timed<hyper_rustls::HttpsConnector<Tcp>>;

struct Connector {
    client: hyper_util::client::legacy::Client<Https, SdkBody>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("quickack connector")
    }
}

impl Connector {
    fn new(connect_timeout: Duration) -> Result<Connector, String> {
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Tcp(tcp));
        // The timeout covers name lookup, TCP and the TLS handshake together, as the
        // SDK's client's does: hyper's own covers TCP only, so a front end that took
        // the connection and never answered the handshake would hold each attempt
        // for the whole operation timeout.
        let https = Timed {
            inner: https,
            timeout: connect_timeout,
        };
        // Without a timer the pool never closes idle connections.
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Connector { client })
    }
}

/// TLS as the SDK's default client sets it up: aws-lc with the SDK's cipher suites,
/// the system's root certificates (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured),
/// TLS 1.2 and 1.3.
fn tls_config() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    // Certificates that do not load are skipped, as the SDK's client does (an http
    // endpoint on the local network needs none), but said: an https endpoint they
    // would have vouched for then fails with "unknown issuer".
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        eprintln!("warning: loading the system's root certificates: {e}");
    }
    roots.add_parsable_certificates(found.certs);
    let base = rustls::crypto::aws_lc_rs::default_provider();
    let suites = [
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: base
            .cipher_suites
            .iter()
            .filter(|c| suites.contains(&c.suite()))
            .cloned()
            .collect(),
        ..base
    };
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let mut request = match request.try_into_http1x() {
            Ok(r) => r,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        // Lets the SDK poison the connection after a transient failure (a timeout, a
        // 5xx), so the pool does not hand the same connection to the retry.
        let captured = capture_connection(&mut request);
        if let Some(smithy) = request.extensions().get::<CaptureSmithyConnection>() {
            smithy.set_connection_retriever(move || {
                captured.connection_metadata().as_ref()?;
                let poison = captured.clone();
                Some(
                    ConnectionMetadata::builder()
                        .proxied(false)
                        .poison_fn(move || {
                            if let Some(c) = poison.connection_metadata().as_ref() {
                                c.poison();
                            }
                        })
                        .build(),
                )
            });
        }
        let response = self.client.request(request);
        HttpConnectorFuture::new(async move {
            match response.await {
                Ok(r) => HttpResponse::try_from(r.map(SdkBody::from_body_1_x))
                    .map_err(|e| ConnectorError::other(e.into(), None)),
                Err(e) => Err(classify(e)),
            }
        })
    }
}

fn find<'a, E: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    std::iter::successors(Some(e), |&e| e.source()).find_map(|e| e.downcast_ref::<E>())
}

/// Sorts a failed request for the SDK's retry rules, as its default client does: a
/// refused or dropped connection, a timeout or a truncated response is retried;
/// anything the request itself got wrong is not.
fn classify(e: hyper_util::client::legacy::Error) -> ConnectorError {
    let timed_out = find::<io::Error>(&e).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
    if e.is_connect() {
        return if timed_out {
            ConnectorError::timeout(e.into())
        } else {
            ConnectorError::io(e.into())
        };
    }
    if let Some(h) = find::<hyper::Error>(&e) {
        if h.is_timeout() || timed_out {
            return ConnectorError::timeout(e.into());
        }
        if h.is_user() {
            return ConnectorError::user(e.into());
        }
        if h.is_closed() || h.is_canceled() || find::<io::Error>(h).is_some() {
            return ConnectorError::io(e.into());
        }
        if h.is_incomplete_message() {
            return ConnectorError::other(e.into(), Some(ErrorKind::TransientError));
        }
    }
    if find::<io::Error>(&e).is_some() {
        return ConnectorError::io(e.into());
    }
    ConnectorError::other(e.into(), None)
}

/// The TCP connector whose connections acknowledge at once.
#[derive(Clone)]
struct Tcp(TcpConnector);

impl tower_service::Service<hyper::Uri> for Tcp {
    type Response = QuickAck;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAck, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(QuickAck(connecting.await?)) })
    }
}

/// A connector whose connecting (name lookup, TCP, TLS) fails with `TimedOut` past
/// `timeout`.
#[derive(Clone)]
struct Timed<C> {
    inner: C,
    timeout: Duration,
}

impl<C> tower_service::Service<hyper::Uri> for Timed<C>
where
    C: tower_service::Service<hyper::Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let (connecting, timeout) = (self.inner.call(uri), self.timeout);
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {} s", timeout.as_secs()),
                )
                .into()),
            }
        })
    }
}

/// A connection that sends the acknowledgement for what it read straight away.
struct QuickAck(TokioIo<TcpStream>);

impl QuickAck {
    fn ack_now(&self) {
        // A failure (a socket already closed) only leaves the kernel's default.
        let _ = socket2::SockRef::from(self.0.inner()).set_tcp_quickack(true);
    }
}

impl Read for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.ack_now();
        }
        r
    }
}

impl Write for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl Connection for QuickAck {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}
