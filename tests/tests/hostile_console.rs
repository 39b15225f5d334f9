//! The anchor's console against hostile clients, over real TCP sockets to a real `anchord`
//! started in-process (`anchorage_daemon::start`, port 0): connections that send half a
//! request head, floods of them, oversized request heads, unknown JSON fields and huge free
//! text. What a user would notice: `/healthz` keeps answering, slow connections are closed,
//! every refusal is JSON, nothing oversized is stored.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anchorage_console::api::{
    CreateTokenRequest, Event, MintCodeRequest, PairMethod, Permission, RequestState, TrustState,
};
use anchorage_console::{ClientError, ControlPlaneClient};
use anchorage_daemon::{FileConfig, Running};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough that a test fails rather than hangs; above every timeout configured here.
const PATIENCE: Duration = Duration::from_secs(20);

/// Half a request head: never finished.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: anchor\r\nx-never-finished: ";

/// An anchor whose console was configured through the TOML keys (`console_*`).
async fn anchor(dir: &tempfile::TempDir, console_keys: FileConfig) -> Running {
    let config = FileConfig {
        data_dir: Some(dir.path().to_path_buf()),
        listen: Some("127.0.0.1:0".into()),
        console: Some("127.0.0.1:0".into()),
        ..console_keys
    }
    .validate()
    .unwrap();
    anchorage_daemon::start(config).await.unwrap()
}

/// Reads until the peer closes (EOF or reset); `false` if still open after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(within, async {
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

/// Status, lower-cased head, body of an HTTP answer.
fn parse(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The `{code, message}` of a JSON error answer (and that it is one).
fn json_error(head: &str, body: &str) -> (String, String) {
    assert!(head.contains("content-type: application/json"), "{head}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let object = v.as_object().unwrap();
    assert_eq!(object.len(), 2, "exactly code and message: {v}");
    (
        v["code"].as_str().unwrap().into(),
        v["message"].as_str().unwrap().into(),
    )
}

/// One request on a new connection (`connection: close`); the whole answer.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: anchor\r\n{headers}content-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (closed, got) = read_until_closed(&mut stream, PATIENCE).await;
    assert!(closed, "{method} {target}: the answer did not end");
    parse(&got)
}

async fn healthz(addr: SocketAddr) -> u16 {
    let (status, _, body) = exchange(addr, "GET", "/healthz", "", "").await;
    assert!(body.contains("\"ok\""), "{body}");
    status
}

/// Opens `n` connections from `source` (any local address if `None`) that each send half a
/// request head.
async fn slow_connections(addr: SocketAddr, source: Option<&str>, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(source) = source {
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        }
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(HALF_HEAD).await.unwrap();
        held.push(stream);
    }
    held
}

/// Whether the server still holds `stream` open: nothing to read and no EOF for a moment.
async fn still_open(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf))
        .await
        .is_err()
}

/// `None` while the server holds `stream` open (nothing arrives for a moment); else all it
/// sent before closing it.
async fn refused_with(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = [0u8; 8192];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
        Err(_) => None,
        Ok(Ok(0) | Err(_)) => Some(Vec::new()),
        Ok(Ok(n)) => {
            let mut got = buf[..n].to_vec();
            got.extend(read_until_closed(stream, PATIENCE).await.1);
            Some(got)
        }
    }
}

#[tokio::test]
async fn half_sent_request_heads_are_disconnected_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor(
        &dir,
        FileConfig {
            console_header_read_timeout: Some("1s".into()),
            ..FileConfig::default()
        },
    )
    .await;
    let mut slow = slow_connections(running.console_addr, None, 50).await;
    let closed = futures_util::future::join_all(
        slow.iter_mut()
            .map(|s| async move { read_until_closed(s, PATIENCE).await.0 }),
    )
    .await;
    assert!(
        closed.iter().all(|c| *c),
        "{} of 50 half-sent heads still held their connection",
        closed.iter().filter(|c| !**c).count()
    );
    assert_eq!(healthz(running.console_addr).await, 200);
    running.shutdown().await;
}

#[tokio::test]
async fn healthz_answers_while_300_slow_connections_are_held() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor(
        &dir,
        FileConfig {
            // Long enough that the slow connections are all still held while /healthz is
            // asked; caps above 300 from this one source.
            console_header_read_timeout: Some("2m".into()),
            console_max_connections: Some(1000),
            console_max_connections_per_source: Some(1000),
            ..FileConfig::default()
        },
    )
    .await;
    let mut slow = slow_connections(running.console_addr, None, 300).await;
    for _ in 0..5 {
        assert_eq!(healthz(running.console_addr).await, 200);
    }
    let open = futures_util::future::join_all(slow.iter_mut().map(still_open)).await;
    assert!(
        open.iter().all(|o| *o),
        "the slow connections were meant to be held during the check"
    );
    drop(slow);
    running.shutdown().await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_flood_from_one_source_is_capped_with_json_503_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    // Default caps: 512 in total, 128 per source.
    let running = anchor(&dir, FileConfig::default()).await;
    let addr = running.console_addr;
    // Linux routes all of 127/8 to loopback: 127.0.0.2 is another source than 127.0.0.1.
    let mut flood = slow_connections(addr, Some("127.0.0.2"), 300).await;
    let outcomes = futures_util::future::join_all(flood.iter_mut().map(refused_with)).await;
    let held = outcomes.iter().filter(|o| o.is_none()).count();
    assert_eq!(held, 128, "the per-source cap");
    // A refused connection gets the JSON 503 (or, when many are refused at once, is just
    // closed); never anything else.
    let mut answered = 0;
    for got in outcomes.iter().flatten().filter(|g| !g.is_empty()) {
        let (status, head, body) = parse(got);
        assert_eq!(status, 503);
        assert_eq!(json_error(&head, &body).0, "unavailable");
        answered += 1;
    }
    assert!(answered > 0, "no refused connection was answered");

    // Another source is served meanwhile.
    assert_eq!(healthz(addr).await, 200);
    // And one more from the flooding source, alone, gets the whole JSON 503.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut extra = socket.connect(addr).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: anchor\r\n\r\n")
        .await
        .unwrap();
    let (closed, got) = read_until_closed(&mut extra, PATIENCE).await;
    assert!(closed);
    let (status, head, body) = parse(&got);
    assert_eq!(status, 503);
    assert!(head.contains("connection: close"), "{head}");
    let (code, message) = json_error(&head, &body);
    assert_eq!(code, "unavailable", "{message}");
    drop(flood);
    running.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_total_cap_get_json_503() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor(
        &dir,
        FileConfig {
            console_max_connections: Some(8),
            ..FileConfig::default()
        },
    )
    .await;
    let addr = running.console_addr;
    let held = slow_connections(addr, None, 8).await;
    let (status, head, body) = exchange(addr, "GET", "/healthz", "", "").await;
    assert_eq!(status, 503);
    assert_eq!(json_error(&head, &body).0, "unavailable");
    drop(held);
    let served = tokio::time::timeout(PATIENCE, async {
        loop {
            if exchange(addr, "GET", "/healthz", "", "").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "closed connections free their slots");
    running.shutdown().await;
}

#[tokio::test]
async fn oversized_request_heads_get_json_414_and_431() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor(&dir, FileConfig::default()).await;
    let addr = running.console_addr;
    let token = running.anchor.owner_token().unwrap();
    let auth = format!("authorization: Bearer {token}\r\n");

    let target = format!("/console/v1/devices?x={}", "a".repeat(20 * 1024));
    let (status, head, body) = exchange(addr, "GET", &target, &auth, "").await;
    assert_eq!(status, 414);
    assert_eq!(json_error(&head, &body).0, "uri_too_long");

    let big = format!("{auth}x-padding: {}\r\n", "p".repeat(40 * 1024));
    let (status, head, body) = exchange(addr, "GET", "/console/v1/devices", &big, "").await;
    assert_eq!(status, 431);
    assert_eq!(json_error(&head, &body).0, "headers_too_large");

    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (status, head, body) = exchange(addr, "GET", "/healthz", &many, "").await;
    assert_eq!(status, 431);
    assert_eq!(json_error(&head, &body).0, "headers_too_large");

    // The other errors a client can provoke are JSON as well.
    for (method, target, headers, body, want, code) in [
        (
            "GET",
            "/console/v1/nope",
            auth.as_str(),
            "",
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/console/v1/pairing/codes",
            auth.as_str(),
            "",
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            "/console/v1/tokens",
            auth.as_str(),
            "{not json",
            400,
            "bad_request",
        ),
        (
            "GET",
            "/console/v1/audit?limit=many",
            auth.as_str(),
            "",
            400,
            "bad_request",
        ),
        ("GET", "/console/v1/devices", "", "", 401, "unauthorized"),
    ] {
        let (status, head, text) = exchange(addr, method, target, headers, body).await;
        assert_eq!(status, want, "{method} {target}: {text}");
        assert_eq!(json_error(&head, &text).0, code, "{method} {target}");
    }
    running.shutdown().await;
}

/// Pairs one node over real UDP with the anchor; returns its device id as shown.
async fn pair_one(
    running: &Running,
    client: &ControlPlaneClient,
    state: &std::path::Path,
) -> String {
    let code = client
        .mint_code(MintCodeRequest {
            method: PairMethod::Pin,
            ttl_secs: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
    let endpoint = anchorage_node::client_endpoint(running.quic_addr).unwrap();
    let opts = anchorage_node::pair::PairOptions {
        anchor: running.quic_addr.to_string(),
        anchor_addr: running.quic_addr,
        code: anchorage_node::pair::parse_code(Some(&code.code), None).unwrap(),
        device_name: "target".into(),
        platform: "test".into(),
    };
    let state = anchorage_node::state::StateDir::new(state);
    let pairing =
        tokio::spawn(
            async move { anchorage_node::pair::pair(&endpoint, &state, &opts, |_| {}).await },
        );
    let request = tokio::time::timeout(PATIENCE, async {
        loop {
            let pending = client
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .unwrap();
            if let Some(r) = pending.into_iter().next() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a pairing request");
    client.approve(&request.request_id).await.unwrap();
    let paired = pairing.await.unwrap().unwrap();
    paired.device_id.to_string()
}

#[tokio::test]
async fn unknown_fields_and_oversized_text_are_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor(&dir, FileConfig::default()).await;
    let addr = running.console_addr;
    let token = running.anchor.owner_token().unwrap();
    let client = ControlPlaneClient::new(&running.console_url(), &token).unwrap();
    let auth = format!("authorization: Bearer {token}\r\ncontent-type: application/json\r\n");

    // An unknown field: 400 naming it; no token created.
    let tokens_before = client.list_tokens().await.unwrap().len();
    let (status, head, body) = exchange(
        addr,
        "POST",
        "/console/v1/tokens",
        &auth,
        r#"{"name":"ci","permissions":["observability.read"],"expires_in":"1d"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (code, message) = json_error(&head, &body);
    assert_eq!(code, "bad_request");
    assert!(message.contains("unknown field `expires_in`"), "{message}");
    assert_eq!(client.list_tokens().await.unwrap().len(), tokens_before);

    // A reason of a million characters: 400 naming the field and the limit; not stored.
    let state = tempfile::tempdir().unwrap();
    let device = pair_one(&running, &client, state.path()).await;
    let revoke = format!("/console/v1/devices/{device}/revoke");
    let reason = "x".repeat(1_000_000);
    let (status, head, body) = exchange(
        addr,
        "POST",
        &revoke,
        &auth,
        &serde_json::json!({ "reason": reason }).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
    let (_, message) = json_error(&head, &body);
    assert!(message.contains("`reason`"), "{message}");
    assert!(message.contains("512"), "{message}");
    let stored = client.device(&device).await.unwrap();
    assert_eq!(stored.trust, TrustState::Trusted, "not revoked");
    assert_eq!(stored.revoked_reason, None);
    let (status, _, listing) = exchange(addr, "GET", "/console/v1/devices", &auth, "").await;
    assert_eq!(status, 200);
    assert!(
        listing.len() < 16 * 1024,
        "GET /devices is {} bytes",
        listing.len()
    );

    // A reason within the limit is stored: the check above could have failed.
    let revoked = client.revoke(&device, Some("lost".into())).await.unwrap();
    assert_eq!(revoked.revoked_reason.as_deref(), Some("lost"));
    running.shutdown().await;
}

/// The kind of the next event on `stream`.
async fn next_kind(
    stream: &mut (impl futures_util::Stream<Item = Result<Event, ClientError>> + Unpin),
) -> String {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event")
        .expect("the stream is open")
        .unwrap()
        .kind
}

#[tokio::test]
async fn token_events_reach_only_tokens_that_manage_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor(&dir, FileConfig::default()).await;
    let url = running.console_url();
    let owner = ControlPlaneClient::new(&url, running.anchor.owner_token().unwrap()).unwrap();
    let token = |name: &str, permissions: Vec<Permission>| {
        let (owner, url) = (owner.clone(), url.clone());
        let name = name.to_string();
        async move {
            let created = owner
                .create_token(CreateTokenRequest {
                    name: Some(name),
                    permissions,
                    ..Default::default()
                })
                .await
                .unwrap();
            ControlPlaneClient::new(&url, created.token).unwrap()
        }
    };
    let reader = token("reader", vec![Permission::ObservabilityRead]).await;
    let manager = token(
        "manager",
        vec![Permission::ObservabilityRead, Permission::TokensManage],
    )
    .await;
    let reader_events = reader.events().await.unwrap();
    let manager_events = manager.events().await.unwrap();
    let mut reader_events = std::pin::pin!(reader_events);
    let mut manager_events = std::pin::pin!(manager_events);

    // A token event, then a pairing code event.
    token("third", vec![Permission::ObservabilityRead]).await;
    owner
        .mint_code(MintCodeRequest {
            method: PairMethod::Pin,
            ttl_secs: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(next_kind(&mut manager_events).await, "token");
    assert_eq!(next_kind(&mut manager_events).await, "pairing.code");
    assert_eq!(
        next_kind(&mut reader_events).await,
        "pairing.code",
        "the token event was not for a token without tokens.manage"
    );
    running.shutdown().await;
}
