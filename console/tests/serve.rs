//! The console's HTTP server ([`anchorage_console::serve`]) over real TCP sockets: timeouts,
//! connection caps, request head limits and graceful shutdown, with small routers of its own
//! (the API routes have their own tests).

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anchorage_console::serve::{MAX_HEADERS, ServeOptions, serve};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Long enough that a test fails rather than hangs, far above every timeout configured here.
const PATIENCE: Duration = Duration::from_secs(15);
/// Longer than any test runs: a timeout set to this never fires in a test.
const NEVER: Duration = Duration::from_secs(600);

struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start(app: Router, options: ServeOptions) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serve(listener, app, options, stop_rx));
    Server { addr, stop, task }
}

fn options(header_read_timeout: Duration, idle_timeout: Duration) -> ServeOptions {
    ServeOptions {
        header_read_timeout,
        idle_timeout,
        ..ServeOptions::default()
    }
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "hello" }))
}

/// Reads until the peer closes the connection (EOF or reset); `false` if it is still open
/// after [`PATIENCE`]. Returns what was read.
async fn read_until_closed(stream: &mut TcpStream) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (closed, got)
}

/// Reads one complete response with a `content-length` off a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    tokio::time::timeout(PATIENCE, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.parse().unwrap())
                    })
                    .unwrap();
                if body.len() >= length {
                    return text;
                }
            }
        }
    })
    .await
    .expect("a response")
}

/// A status, lower-cased head and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn parse(raw: &[u8]) -> Answer {
        let text = String::from_utf8_lossy(raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    /// The `{code, message}` of a JSON error answer.
    fn error(&self) -> (String, String) {
        assert!(
            self.head.contains("content-type: application/json"),
            "{}",
            self.head
        );
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        (
            v["code"].as_str().unwrap().to_string(),
            v["message"].as_str().unwrap().to_string(),
        )
    }
}

/// Sends `request` on a new connection and reads the answer until the server closes it.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let (closed, got) = read_until_closed(&mut stream).await;
    assert!(closed, "the server closed the connection");
    Answer::parse(&got)
}

fn get_request(target: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nhost: console\r\n{extra_headers}connection: close\r\n\r\n")
        .into_bytes()
}

#[tokio::test]
async fn half_a_request_head_is_disconnected_after_the_header_read_timeout() {
    // The idle timeout never fires here: only the header read timeout can end it.
    let server = start(app(), options(Duration::from_millis(500), NEVER)).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: console\r\nx-slow:")
        .await
        .unwrap();
    let (closed, got) = read_until_closed(&mut slow).await;
    assert!(closed, "a half-sent head held its connection");
    assert!(
        got.is_empty() || Answer::parse(&got).status >= 400,
        "{got:?}"
    );
    // A connection that sends nothing at all is cut as well.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(read_until_closed(&mut silent).await.0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // The header read timeout never fires here: only the idle timeout can end it.
    let server = start(app(), options(NEVER, Duration::from_millis(500))).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: console\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello"), "{answer}");
    // Kept alive: a second request on it is answered.
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: console\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut stream).await.ends_with("hello"));
    let (closed, got) = read_until_closed(&mut stream).await;
    assert!(closed, "an idle keep-alive connection stayed open");
    assert!(got.is_empty(), "{got:?}");
}

#[tokio::test]
async fn hyper_restarts_the_header_read_timeout_when_a_connection_goes_idle() {
    // What docs/console.md says: an idle connection lasts at most the shorter of the two.
    let server = start(app(), options(Duration::from_millis(500), NEVER)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: console\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut stream).await.ends_with("hello"));
    assert!(read_until_closed(&mut stream).await.0);
}

#[tokio::test]
async fn a_long_quiet_response_is_not_cut_by_either_timeout() {
    // Like the event stream between keep-alive comments: a response in progress that sends
    // nothing for longer than both timeouts.
    let app = Router::new().route(
        "/stream",
        get(|| async {
            let chunks = futures_util::stream::unfold(0, |i| async move {
                match i {
                    0 => Some((Ok::<_, Infallible>(Bytes::from("first,")), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        Some((Ok(Bytes::from("second")), 2))
                    }
                    _ => None,
                }
            });
            Body::from_stream(chunks)
        }),
    );
    let server = start(
        app,
        options(Duration::from_millis(300), Duration::from_millis(300)),
    )
    .await;
    let answer = exchange(server.addr, &get_request("/stream", "")).await;
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("first,"), "{}", answer.body);
    assert!(answer.body.contains("second"), "cut off: {}", answer.body);
    assert!(
        answer.body.ends_with("0\r\n\r\n"),
        "not finished: {:?}",
        answer.body
    );
}

#[tokio::test]
async fn connections_over_the_cap_get_a_json_503_and_a_freed_slot_is_reused() {
    let server = start(
        app(),
        ServeOptions {
            max_connections: 2,
            max_connections_per_source: 2,
            ..options(NEVER, NEVER)
        },
    )
    .await;
    let held_a = TcpStream::connect(server.addr).await.unwrap();
    let _held_b = TcpStream::connect(server.addr).await.unwrap();
    let answer = exchange(server.addr, &get_request("/", "")).await;
    assert_eq!(answer.status, 503);
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    assert_eq!(answer.error().0, "unavailable");

    drop(held_a);
    let freed = tokio::time::timeout(PATIENCE, async {
        loop {
            let answer = exchange(server.addr, &get_request("/", "")).await;
            if answer.status == 200 {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the closed connection's slot is freed");
    assert_eq!(freed.body, "hello");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_per_source_cap_leaves_room_for_other_sources() {
    let server = start(
        app(),
        ServeOptions {
            max_connections: 10,
            max_connections_per_source: 1,
            ..options(NEVER, NEVER)
        },
    )
    .await;
    let _held = TcpStream::connect(server.addr).await.unwrap();
    let answer = exchange(server.addr, &get_request("/", "")).await;
    assert_eq!(answer.status, 503);
    // Linux routes all of 127/8 to loopback: 127.0.0.2 is another source.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(server.addr).await.unwrap();
    other.write_all(&get_request("/", "")).await.unwrap();
    let (_, got) = read_until_closed(&mut other).await;
    assert_eq!(Answer::parse(&got).status, 200);
}

#[tokio::test]
async fn oversized_request_heads_get_json_414_and_431() {
    let server = start(app(), ServeOptions::default()).await;
    let uri = format!("/?q={}", "a".repeat(20 * 1024));
    let answer = exchange(server.addr, &get_request(&uri, "")).await;
    assert_eq!(answer.status, 414);
    let (code, message) = answer.error();
    assert_eq!(code, "uri_too_long");
    assert!(message.contains("8192"), "{message}");

    let big = format!("x-big: {}\r\n", "b".repeat(40 * 1024));
    let answer = exchange(server.addr, &get_request("/", &big)).await;
    assert_eq!(answer.status, 431);
    assert_eq!(answer.error().0, "headers_too_large");

    let many: String = (0..MAX_HEADERS + 50)
        .map(|i| format!("x-h{i}: v\r\n"))
        .collect();
    let answer = exchange(server.addr, &get_request("/", &many)).await;
    assert_eq!(answer.status, 431);
    let (code, message) = answer.error();
    assert_eq!(code, "headers_too_large");
    assert!(message.contains("header lines"), "{message}");

    // Within the limits: answered normally.
    let answer = exchange(server.addr, &get_request("/?q=short", "x-small: 1\r\n")).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "hello"));
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_closes_idle_connections_and_stops_accepting() {
    let started = Arc::new(Notify::new());
    let app = Router::new().route(
        "/slow",
        get({
            let started = started.clone();
            move || async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(500)).await;
                "done"
            }
        }),
    );
    let server = start(app, options(NEVER, NEVER)).await;
    // One connection that never sent anything, one kept alive after a request, and one
    // with a request in flight.
    let mut untouched = TcpStream::connect(server.addr).await.unwrap();
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(b"GET /slow HTTP/1.1\r\nhost: console\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.ends_with("done"));
    // Takes the permit that request left, so the wait below is for the next one.
    started.notified().await;
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(&get_request("/slow", "")).await.unwrap();
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the request reached its handler");

    server.stop.send(true).unwrap();
    let (closed, got) = read_until_closed(&mut busy).await;
    assert!(closed);
    let answer = Answer::parse(&got);
    assert_eq!((answer.status, answer.body.as_str()), (200, "done"));
    assert!(
        read_until_closed(&mut untouched).await.0,
        "an untouched connection held the shutdown"
    );
    assert!(
        read_until_closed(&mut kept).await.0,
        "an idle keep-alive connection held the shutdown"
    );
    tokio::time::timeout(PATIENCE, server.task)
        .await
        .expect("serve returns after the shutdown")
        .unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "still accepting after the shutdown"
    );
}

// ---------------------------------------------------------------------------------------------
// Over TLS

/// A server certificate for `localhost` from a fresh CA: the server's configuration, and a
/// client's that trusts the CA.
fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

async fn start_tls(app: Router, options: ServeOptions, tls: Arc<rustls::ServerConfig>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(anchorage_console::serve_tls(
        listener, app, options, tls, stop_rx,
    ));
    Server { addr, stop, task }
}

async fn tls_connect(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends `GET /` with `Connection: close` and reads the whole answer.
async fn tls_get(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_tls_connection_that_never_finishes_its_handshake_is_closed_after_the_timeout() {
    let (server_tls, client_tls) = tls_pair();
    let server = start_tls(
        app(),
        ServeOptions {
            tls_handshake_timeout: Duration::from_millis(300),
            ..options(NEVER, NEVER)
        },
        server_tls,
    )
    .await;
    // Half a ClientHello record, then nothing.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    silent.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    let (closed, _) = read_until_closed(&mut silent).await;
    assert!(closed, "the handshake timeout closed the connection");

    // A client that completes it is served, and the timeout does not cut the connection after.
    let mut client = tls_connect(server.addr, &client_tls).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let answer = tls_get(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello"), "{answer}");
    let _ = server.stop.send(true);
    server.task.await.unwrap();
}

#[tokio::test]
async fn over_tls_the_caps_hold_and_the_refusal_is_a_json_503() {
    let (server_tls, client_tls) = tls_pair();
    let server = start_tls(
        app(),
        ServeOptions {
            max_connections: 1,
            max_connections_per_source: 1,
            ..options(NEVER, NEVER)
        },
        server_tls,
    )
    .await;
    let held = tls_connect(server.addr, &client_tls).await;
    let mut refused = tls_connect(server.addr, &client_tls).await;
    let answer = tls_get(&mut refused).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"unavailable\""), "{answer}");
    drop(held);
    let served = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut client = tls_connect(server.addr, &client_tls).await;
            let answer = tls_get(&mut client).await;
            if answer.starts_with("HTTP/1.1 200") {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the freed slot is reused");
    assert!(served.ends_with("hello"), "{served}");
}
