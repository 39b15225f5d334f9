//! The console's HTTP/1 server: the accept loop and connection handling in front of the
//! [router](crate::routes), hardened against clients that hold connections open.
//!
//! [`serve`] accepts on a listener and serves each connection with hyper's HTTP/1 server:
//!
//! - **Header read timeout.** hyper starts it when it begins to read a request head: at once on
//!   a new connection (before the first byte), and again each time a keep-alive connection goes
//!   idle after a response. A client that has not sent a complete head by then is disconnected,
//!   so half a header cannot hold a connection. The timer stops once the head is read: a long
//!   response (the event stream) is not cut by it.
//! - **Idle timeout.** A connection with no request in flight and nothing read from it for
//!   [`ServeOptions::idle_timeout`] is closed (a keep-alive connection between requests, or a
//!   new one that sent nothing). A request counts as in flight until its response body has been
//!   sent or dropped, so an open event stream is never idle. Because hyper restarts the header
//!   read timeout when a connection goes idle, an idle connection lasts at most the shorter of
//!   the two.
//! - **Connection caps.** At most [`ServeOptions::max_connections`] connections at once, and
//!   [`ServeOptions::max_connections_per_source`] from one source (an IPv4 address, or an
//!   IPv6 /64). A connection over a cap gets a JSON 503 (`unavailable`, `Connection: close`) and
//!   is closed at once instead of waiting for a slot.
//! - **Accept backoff.** An accept error that is not about one connection (out of file
//!   descriptors, out of memory) pauses accepting, 10 ms doubling up to 1 s while it lasts,
//!   with one warning per episode rather than per error, instead of spinning on it.
//! - **Request head limits below hyper's.** A request target over [`MAX_REQUEST_TARGET`] bytes is
//!   a JSON 414 (`uri_too_long`); more than [`MAX_HEADERS`] header lines or a header section
//!   over [`MAX_HEADER_BYTES`] is a JSON 431 (`headers_too_large`). hyper's own buffer
//!   ([`HYPER_MAX_BUF_SIZE`]) and header count ([`HYPER_MAX_HEADERS`]) are set well above those,
//!   so hyper's bodiless answers only reach a client that sends more than that (see
//!   `docs/console.md`).
//! - **TLS.** [`serve_tls`] runs the same loop over TLS (rustls on ring, HTTP/1.1 by ALPN): a
//!   connection must finish its handshake within [`ServeOptions::tls_handshake_timeout`], and
//!   the caps apply before the handshake, so a flood of handshakes costs at most the caps. A
//!   connection over a cap is answered its 503 over TLS (when a refusal slot is free and its
//!   handshake finishes in time) or closed. The timeouts above count from the end of the
//!   handshake, with bytes read through TLS as activity.
//! - **Graceful shutdown.** When the stop signal turns `true`, accepting stops, idle
//!   connections close, requests in flight finish (event streams end on the same signal
//!   through [`RouterOptions::shutdown`](crate::RouterOptions)), and connections still open
//!   after [`ServeOptions::shutdown_timeout`] are dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::header::{CONNECTION, HeaderValue};
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::ErrorBody;
use crate::error::ApiError;

/// Default [`ServeOptions::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServeOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`ServeOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default [`ServeOptions::max_connections_per_source`].
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 128;
/// Default [`ServeOptions::tls_handshake_timeout`].
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServeOptions::shutdown_timeout`].
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest request target (path and query, or an absolute URI) answered with anything but a
/// JSON 414, in bytes.
pub const MAX_REQUEST_TARGET: usize = 8 * 1024;
/// Largest header section (every `name: value\r\n` line) answered with anything but a JSON
/// 431, in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header lines answered with anything but a JSON 431.
pub const MAX_HEADERS: usize = 100;
/// hyper's read buffer per connection, in bytes: a request head must fit in it, or hyper
/// answers 431 itself, without a body. Well above [`MAX_REQUEST_TARGET`] plus
/// [`MAX_HEADER_BYTES`], so that our JSON answers are what clients see.
pub const HYPER_MAX_BUF_SIZE: usize = 64 * 1024;
/// Most header lines hyper parses; beyond it hyper answers 431 itself, without a body.
pub const HYPER_MAX_HEADERS: usize = 512;

/// First pause after an accept error; it doubles while errors go on.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while they fail.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Refused connections answered and drained at once; beyond this a refused connection is
/// closed without an answer, so refusing cannot use more descriptors than this.
const MAX_REFUSING: usize = 32;
/// How long a refused connection is read (and what is read thrown away) after its 503, so
/// that closing it does not reset it before the client has read the answer.
const REFUSE_LINGER: Duration = Duration::from_millis(500);
/// At shutdown, how long a connection with no request in flight (one in the middle of
/// sending a request head) is given before it is dropped.
const DRAIN_LINGER: Duration = Duration::from_millis(250);

/// Settings of [`serve`]. Every one is documented with its default in `docs/console.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// Time a client has to send a complete request head, counted from when the connection
    /// opens or goes idle after a response (default 10 s).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and nothing received for this long is closed
    /// (default 5 s).
    pub idle_timeout: Duration,
    /// Most connections open at once; more are answered 503 and closed (default 512).
    pub max_connections: usize,
    /// Most connections open at once from one IPv4 address or IPv6 /64; more are answered 503
    /// and closed (default 128).
    pub max_connections_per_source: usize,
    /// After the stop signal, how long requests in flight may take before their connections
    /// are dropped (default 10 s).
    pub shutdown_timeout: Duration,
    /// With [`serve_tls`], time a client has to finish the TLS handshake, counted from the
    /// TCP accept (default 10 s).
    pub tls_handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns `true` (or its sender is dropped), then shuts
/// down gracefully (see the [module](self) docs) and returns.
///
/// Cancel-safe only in the sense that dropping the future drops every connection at once;
/// use `stop` for a graceful end.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    stop: watch::Receiver<bool>,
) {
    serve_with(listener, app, options, None, stop).await;
}

/// Like [`serve`], over TLS with `tls` (see the [module](self) docs). HTTP/1.1 is the only
/// protocol offered by ALPN, whatever `tls` says.
///
/// Cancel-safe as [`serve`] is.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    tls: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) {
    let mut config = (*tls).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    serve_with(listener, app, options, Some(acceptor), stop).await;
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = Arc::new(Limits::new(
        options.max_connections,
        options.max_connections_per_source,
    ));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut backoff = AcceptBackoff::default();
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => {
                debug!(error = %e, "console connection failed before it was accepted");
                continue;
            }
            Err(e) => {
                let (pause, first) = backoff.failed();
                if first {
                    warn!(
                        error = %e,
                        "console cannot accept connections; pausing accepts until it can \
                         (10 ms doubling up to 1 s; logged once until it recovers)"
                    );
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        if let Some(failures) = backoff.succeeded() {
            info!(failures, "console accepts connections again");
        }
        let Some(permit) = limits.try_acquire(peer.ip()) else {
            match &tls {
                None => refuse(stream, peer, &refusing, &mut tasks),
                Some(acceptor) => refuse_tls(
                    stream,
                    peer,
                    acceptor.clone(),
                    options.tls_handshake_timeout,
                    &refusing,
                    &mut tasks,
                ),
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = info_span!("console_connection", %peer);
        let (app, options, stop) = (app.clone(), options.clone(), stop.clone());
        match &tls {
            None => tasks.spawn(
                async move {
                    let activity = Arc::new(Activity::default());
                    let io = Watched {
                        stream,
                        activity: activity.clone(),
                    };
                    connection(io, activity, permit, app, options, stop).await;
                }
                .instrument(span),
            ),
            Some(acceptor) => tasks.spawn(
                tls_connection(stream, acceptor.clone(), permit, app, options, stop)
                    .instrument(span),
            ),
        };
    }
    drop(listener);
    let open = tasks.len();
    if open > 0 {
        debug!(
            open,
            "console stopped accepting; waiting for open connections"
        );
    }
    let drained = tokio::time::timeout(options.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = tasks.len(),
            timeout_ms = options.shutdown_timeout.as_millis() as u64,
            "console connections still busy after the shutdown timeout; dropping them"
        );
        tasks.shutdown().await;
    }
}

/// Checks a request head against [`MAX_REQUEST_TARGET`], [`MAX_HEADERS`] and
/// [`MAX_HEADER_BYTES`]: 414 `uri_too_long` or 431 `headers_too_large`.
pub fn check_head<B>(req: &Request<B>) -> Result<(), ApiError> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, str::len);
    if target > MAX_REQUEST_TARGET {
        return Err(ApiError::uri_too_long(format!(
            "the request target is {target} bytes; the console accepts at most \
             {MAX_REQUEST_TARGET}"
        )));
    }
    let headers = req.headers();
    if headers.len() > MAX_HEADERS {
        return Err(ApiError::headers_too_large(format!(
            "the request has {} header lines; the console accepts at most {MAX_HEADERS}",
            headers.len()
        )));
    }
    // As on the wire: `name: value\r\n`.
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(ApiError::headers_too_large(format!(
            "the request's headers are {bytes} bytes; the console accepts at most \
             {MAX_HEADER_BYTES}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One connection

/// Runs the TLS handshake of an accepted connection (bounded by
/// [`ServeOptions::tls_handshake_timeout`] and the stop signal), then serves it.
async fn tls_connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    permit: Permit,
    app: Router,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::default());
    let watched = Watched {
        stream,
        activity: activity.clone(),
    };
    let handshake = tokio::time::timeout(options.tls_handshake_timeout, acceptor.accept(watched));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            // A client that does not trust the certificate, speaks plain HTTP, or is not a
            // browser at all: the client's doing, not worth a warning.
            Ok(Err(e)) => return debug!(error = %e, "console TLS handshake failed"),
            Err(_) => return debug!("console TLS handshake timed out"),
        },
        _ = stop.wait_for(|s| *s) => return,
    };
    connection(tls, activity, permit, app, options, stop).await;
}

/// Serves one accepted connection until it ends, goes idle, or the server stops. `activity`
/// must be told of the bytes read from `io` (it is [`Watched`] somewhere inside).
async fn connection<S>(
    io: S,
    activity: Arc<Activity>,
    _permit: Permit,
    app: Router,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |req| handle(app.clone(), activity.begin(), req)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(HYPER_MAX_BUF_SIZE)
        .max_headers(HYPER_MAX_HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let why = tokio::select! {
        ended = conn.as_mut() => return ended_with(ended),
        _ = activity.idle_for(options.idle_timeout) => "idle",
        _ = stop.wait_for(|s| *s) => "shutdown",
    };
    // hyper closes an idle or untouched connection at once, and one with a request in flight
    // once its response is sent. One in the middle of a request head would wait for the
    // header read timeout; it is dropped after a short linger instead.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        ended = conn.as_mut() => ended_with(ended),
        _ = activity.idle_for(DRAIN_LINGER) => debug!(why, "console connection dropped"),
    }
}

fn ended_with(ended: Result<(), hyper::Error>) {
    match ended {
        Ok(()) => debug!("console connection closed"),
        // Timeouts, resets and malformed requests: the client's doing, not worth a warning.
        Err(e) => debug!(error = %e, "console connection ended"),
    }
}

/// Answers one request: the head limits, then the router. The response body carries the
/// request's [`InFlight`] mark until hyper has sent or dropped it.
async fn handle(
    app: Router,
    in_flight: InFlight,
    req: Request<Incoming>,
) -> Result<Response<Tracked>, Infallible> {
    let response = match check_head(&req) {
        Err(e) => {
            let mut response = e.into_response();
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Ok(()) => match app.oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
    };
    Ok(response.map(|body| Tracked {
        body,
        _in_flight: in_flight,
    }))
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a connection is doing, for its idle timeout: requests in flight, and a counter that
/// moves whenever a request starts or ends or bytes arrive.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    epoch: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn touch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once no request has been in flight and nothing has arrived for `quiet`.
    async fn idle_for(&self, quiet: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before reading the state, so no change between the two is missed.
            changed.as_mut().enable();
            let epoch = self.epoch.load(Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(quiet) => {
                    if self.epoch.load(Ordering::SeqCst) == epoch {
                        return;
                    }
                }
                _ = changed => {}
            }
        }
    }
}

/// A request counted as in flight on its connection until dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// The TCP stream, telling [`Activity`] when bytes arrive.
struct Watched<S = TcpStream> {
    stream: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------------------------
// Over the caps

/// Answers a connection over a cap with a JSON 503 and closes it. The answer fits a fresh
/// socket's send buffer, so it is written without waiting; the connection is then read for
/// a moment so that closing it does not reset it before the client read the answer.
fn refuse(stream: TcpStream, peer: SocketAddr, refusing: &Arc<Semaphore>, tasks: &mut JoinSet<()>) {
    debug!(%peer, "console connection over the cap; answered 503");
    let answer = overloaded_response();
    if !matches!(stream.try_write(&answer), Ok(n) if n == answer.len()) {
        return;
    }
    let Ok(slot) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tasks.spawn(async move {
        let _slot = slot;
        let mut stream = stream;
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(REFUSE_LINGER, async {
            let mut sink = [0u8; 4096];
            let mut total = 0;
            while total < HYPER_MAX_BUF_SIZE {
                match stream.try_read(&mut sink) {
                    Ok(0) => break,
                    Ok(n) => total += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if stream.readable().await.is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        })
        .await;
    });
}

/// [`refuse`] over TLS: the handshake (bounded by `handshake_timeout`), then the 503 and a
/// close. Without a free refusal slot, the connection is closed at once.
fn refuse_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    refusing: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
) {
    debug!(%peer, "console connection over the cap; answering 503 over TLS");
    let Ok(slot) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tasks.spawn(async move {
        let _slot = slot;
        let answered = tokio::time::timeout(handshake_timeout.min(REFUSE_LINGER * 4), async {
            let mut tls = acceptor.accept(stream).await?;
            tls.write_all(&overloaded_response()).await?;
            tls.shutdown().await
        })
        .await;
        if !matches!(answered, Ok(Ok(()))) {
            debug!(%peer, "refused console connection closed without its answer");
        }
    });
}

/// The whole HTTP answer to a connection over a cap.
fn overloaded_response() -> Vec<u8> {
    let body = serde_json::to_string(&ErrorBody {
        code: "unavailable".into(),
        message: "the console has too many connections open; try again shortly".into(),
    })
    .unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\ncache-control: no-store\r\nretry-after: 1\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Counts of open connections, in total and per source.
#[derive(Debug)]
struct Limits {
    max: usize,
    per_source: usize,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// Where connections are counted: an IPv4 address, or an IPv6 /64 (one host usually holds a
/// whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(std::net::Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => Source::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

impl Limits {
    fn new(max: usize, per_source: usize) -> Limits {
        Limits {
            max,
            per_source,
            open: Mutex::new(OpenConnections::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // Nothing panics while holding it; the counts stay consistent either way.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection from `ip`, or `None` when a cap is reached.
    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Permit> {
        let source = Source::of(ip);
        let mut open = self.lock();
        let from_source = open.by_source.get(&source).copied().unwrap_or(0);
        if open.total >= self.max || from_source >= self.per_source {
            return None;
        }
        open.total += 1;
        open.by_source.insert(source, from_source + 1);
        Some(Permit {
            limits: self.clone(),
            source,
        })
    }
}

/// One open connection's slot; freed when dropped.
#[derive(Debug)]
struct Permit {
    limits: Arc<Limits>,
    source: Source,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accept errors

/// Whether an accept error concerns only the connection being accepted (the next accept may
/// well succeed at once), rather than the listener or the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The pause after accept errors: [`ACCEPT_BACKOFF_MIN`] doubling up to
/// [`ACCEPT_BACKOFF_MAX`] while they go on; an episode ends at the next accepted connection.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// Errors in the current episode (0: none).
    failures: u32,
}

impl AcceptBackoff {
    /// An accept failed: how long to pause, and whether this error starts an episode (the
    /// one to log).
    fn failed(&mut self) -> (Duration, bool) {
        let first = self.failures == 0;
        let doublings = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        let pause = ACCEPT_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(ACCEPT_BACKOFF_MAX);
        (pause, first)
    }

    /// An accept succeeded: the number of errors of the episode it ends, if one was going on.
    fn succeeded(&mut self) -> Option<u32> {
        let failures = std::mem::take(&mut self.failures);
        (failures > 0).then_some(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn backoff_doubles_up_to_a_second_and_logs_once_per_episode() {
        let mut b = AcceptBackoff::default();
        let pauses: Vec<(u64, bool)> = (0..10)
            .map(|_| {
                let (pause, first) = b.failed();
                (pause.as_millis() as u64, first)
            })
            .collect();
        assert_eq!(
            pauses,
            [
                (10, true),
                (20, false),
                (40, false),
                (80, false),
                (160, false),
                (320, false),
                (640, false),
                (1000, false),
                (1000, false),
                (1000, false),
            ]
        );
        assert_eq!(b.succeeded(), Some(10));
        assert_eq!(b.succeeded(), None);
        assert_eq!(b.failed(), (ACCEPT_BACKOFF_MIN, true), "a new episode");
        for _ in 0..1000 {
            assert!(b.failed().0 <= ACCEPT_BACKOFF_MAX);
        }
    }

    #[test]
    fn per_connection_accept_errors_do_not_back_off() {
        assert!(is_connection_error(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        // EMFILE, "Too many open files".
        assert!(!is_connection_error(&io::Error::from_raw_os_error(24)));
    }

    #[test]
    fn caps_hold_in_total_and_per_source_and_free_on_drop() {
        let limits = Arc::new(Limits::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = limits.try_acquire(a).unwrap();
        let _a2 = limits.try_acquire(a).unwrap();
        assert!(limits.try_acquire(a).is_none(), "per source");
        let _b1 = limits.try_acquire(b).unwrap();
        assert!(limits.try_acquire(c).is_none(), "in total");
        drop(a1);
        assert!(limits.try_acquire(c).is_some(), "a freed slot is reusable");
    }

    #[test]
    fn one_ipv6_prefix_is_one_source_and_mapped_ipv4_is_ipv4() {
        let limits = Arc::new(Limits::new(10, 1));
        let _x = limits.try_acquire("2001:db8::1".parse().unwrap()).unwrap();
        assert!(
            limits
                .try_acquire("2001:db8::ffff:1".parse().unwrap())
                .is_none()
        );
        assert!(
            limits
                .try_acquire("2001:db8:0:1::1".parse().unwrap())
                .is_some()
        );
        let _y = limits.try_acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert!(
            limits
                .try_acquire("::ffff:192.0.2.1".parse().unwrap())
                .is_none()
        );
    }

    fn head(uri: &str, headers: &[(&str, String)]) -> Request<()> {
        let mut req = Request::builder().uri(uri);
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        req.body(()).unwrap()
    }

    #[test]
    fn head_limits_answer_414_and_431() {
        assert!(check_head(&head("/healthz", &[])).is_ok());
        let long = format!("/healthz?x={}", "a".repeat(MAX_REQUEST_TARGET));
        let e = check_head(&head(&long, &[])).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::URI_TOO_LONG, "uri_too_long")
        );
        let at_limit = format!("/?{}", "a".repeat(MAX_REQUEST_TARGET - 2));
        assert!(check_head(&head(&at_limit, &[])).is_ok());

        let big = vec![("x-big", "v".repeat(MAX_HEADER_BYTES))];
        let e = check_head(&head("/", &big)).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large"
            )
        );
        let many: Vec<(&str, String)> = (0..=MAX_HEADERS).map(|i| ("x-n", i.to_string())).collect();
        let e = check_head(&head("/", &many)).unwrap_err();
        assert_eq!(e.code, "headers_too_large");
        assert!(check_head(&head("/", &many[..MAX_HEADERS])).is_ok());
    }

    #[test]
    fn the_refusal_is_a_complete_json_503() {
        let text = String::from_utf8(overloaded_response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"));
        let parsed: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.code, "unavailable");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle() {
        let activity = Arc::new(Activity::default());
        let request = activity.begin();
        let idle = tokio::time::timeout(
            Duration::from_secs(3600),
            activity.idle_for(Duration::from_secs(1)),
        );
        assert!(idle.await.is_err(), "idle while a request was in flight");
        drop(request);
        let idle = tokio::time::timeout(
            Duration::from_secs(2),
            activity.idle_for(Duration::from_secs(1)),
        );
        assert!(idle.await.is_ok(), "not idle after the request ended");
    }
}
