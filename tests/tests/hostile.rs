//! The attacks of the hardening issue (docs/security.md), replayed against a real anchor on
//! real UDP and TCP sockets with a raw quinn client that says what a hostile peer would.
//!
//! Each test starts its own anchor on 127.0.0.1 port 0 in a temp dir. Sources are told
//! apart by their loopback address (127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to
//! the loopback interface).

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anchorage_console::api::{CodeState, InvokeRequest, MintCodeRequest, PairMethod};
use anchorage_console::client::ControlPlaneClient as Client;
use anchorage_daemon::config::AnchorConfig;
use anchorage_mesh::framed::{self, FramedRecv, FramedSend};
use anchorage_mesh::pairing::{CodeSecret, EXPORTER_LABEL, EXPORTER_LEN, NodeHandshake};
use anchorage_node::pair::{PairOptions, PairProgress};
use anchorage_node::state::StateDir;
use anchorage_sim::prom;
use anchorage_wire::bootstrap::*;
use anchorage_wire::control::{ControlDown, ControlUp, Register};
use anchorage_wire::datagram::{Datagram, Heartbeat, HeartbeatAck};
use anchorage_wire::limits::MAX_FRAME_LEN;
use anchorage_wire::{ANCHOR_SERVER_NAME, ErrorCode, PROTOCOL_VERSION};

const STEP: Duration = Duration::from_secs(20);

struct Anchor {
    running: anchorage_daemon::Running,
    client: Client,
    _dir: tempfile::TempDir,
}

impl Anchor {
    async fn start() -> Anchor {
        Anchor::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut AnchorConfig)) -> Anchor {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AnchorConfig::for_tests(dir.path());
        tweak(&mut config);
        let running = anchorage_daemon::start(config).await.unwrap();
        let token = running.anchor.owner_token().unwrap();
        let client = Client::new(&running.console_url(), token).unwrap();
        Anchor {
            running,
            client,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.running.quic_addr
    }

    /// A PIN code: (code id, digits, the PIN as typed).
    async fn mint(&self) -> (String, String, String) {
        let minted = self
            .client
            .mint_code(MintCodeRequest {
                method: PairMethod::Pin,
                ttl_secs: None,
                labels: Default::default(),
            })
            .await
            .unwrap();
        let digits = minted.code.rsplit_once('-').unwrap().1.to_string();
        (minted.code_id, digits, minted.code)
    }

    async fn code(&self, id: &str) -> anchorage_console::api::PairingCodeInfo {
        let codes = self.client.list_codes().await.unwrap();
        codes.into_iter().find(|c| c.code_id == id).unwrap()
    }

    async fn scrape(&self) -> prom::Exposition {
        let text = self.client.metrics().await.unwrap();
        prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A bootstrap connection from `from`, with its one stream opened.
async fn bootstrap(
    from: IpAddr,
    anchor: SocketAddr,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    FramedSend<BootstrapRequest>,
    FramedRecv<BootstrapResponse>,
) {
    let (endpoint, conn) = connect(
        from,
        anchor,
        anchorage_mesh::tls::bootstrap_client_config(None).unwrap(),
    )
    .await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let (tx, rx) = framed::framed::<BootstrapRequest, BootstrapResponse>(send, recv);
    (endpoint, conn, tx, rx)
}

/// A QUIC connection from `from` to the anchor with `client`.
async fn connect(
    from: IpAddr,
    anchor: SocketAddr,
    client: quinn::ClientConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = quinn::Endpoint::client(SocketAddr::new(from, 0)).unwrap();
    let conn = endpoint
        .connect_with(client, anchor, ANCHOR_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

/// How the anchor closed a connection: (code, reason phrase).
async fn closed(conn: &quinn::Connection) -> (u32, String) {
    let err = tokio::time::timeout(STEP, conn.closed()).await.unwrap();
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => (
            u32::try_from(c.error_code.into_inner()).unwrap(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other}"),
    }
}

/// What one guess at a code got from outside.
#[derive(Debug, PartialEq)]
struct Answer {
    /// Length of the challenge, if one came.
    challenge_len: Option<usize>,
    reason: PairFailure,
    message: String,
    close: (u32, String),
}

/// Tries `code_id` with `secret` from `from`, as a node would, and reports every answer.
async fn guess(from: IpAddr, anchor: SocketAddr, code_id: &str, secret: &str) -> Answer {
    let (_ep, conn, mut tx, mut rx) = bootstrap(from, anchor).await;
    let (handshake, spake_msg) = NodeHandshake::start(code_id, &CodeSecret::new(secret));
    tx.send(&BootstrapRequest::Hello(PairHello {
        version: PROTOCOL_VERSION,
        code_id: code_id.to_string(),
        spake_msg,
    }))
    .await
    .unwrap();
    let mut challenge_len = None;
    let failed = match tokio::time::timeout(STEP, rx.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Some(BootstrapResponse::Challenge(c)) => {
            challenge_len = Some(c.spake_msg.len());
            let mut exporter = [0u8; EXPORTER_LEN];
            conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
                .unwrap();
            let keys = handshake.finish(&c.spake_msg, &exporter).unwrap();
            tx.send(&BootstrapRequest::Confirm(KeyConfirm {
                mac: keys.node_confirmation(),
            }))
            .await
            .unwrap();
            match tokio::time::timeout(STEP, rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                Some(BootstrapResponse::Failed(f)) => f,
                other => panic!("expected Failed after a wrong confirmation, got {other:?}"),
            }
        }
        Some(BootstrapResponse::Failed(f)) => f,
        other => panic!("expected Challenge or Failed, got {other:?}"),
    };
    Answer {
        challenge_len,
        reason: failed.reason,
        message: failed.message,
        close: closed(&conn).await,
    }
}

fn other_digits(digits: &str) -> String {
    if digits == "000000" {
        "111111".into()
    } else {
        "000000".into()
    }
}

#[tokio::test]
async fn an_unknown_code_a_malformed_id_and_a_wrong_secret_get_the_same_answer() {
    let anchor = Anchor::start().await;
    let (id, digits, _) = anchor.mint().await;
    let wrong = guess(loopback(1), anchor.addr(), &id, &other_digits(&digits)).await;
    let unknown = guess(loopback(1), anchor.addr(), "ZZZZ2222", &digits).await;
    let malformed = guess(loopback(1), anchor.addr(), "not-an-id!", &digits).await;
    assert_eq!(wrong.reason, PairFailure::WrongSecret, "{wrong:?}");
    assert!(
        wrong.challenge_len.is_some(),
        "a live code gets a challenge"
    );
    assert_eq!(unknown, wrong, "an unknown id looks like a wrong secret");
    assert_eq!(malformed, wrong, "so does an id that does not even parse");
    assert_eq!(
        wrong.close,
        (
            ErrorCode::PairingFailed.as_u32(),
            "pairing_failed: wrong_secret".into()
        )
    );
    // Only the guess at the live code counted against it.
    assert_eq!(anchor.code(&id).await.failed_attempts, 1);
    anchor.running.shutdown().await;
}

#[tokio::test]
async fn a_flood_from_one_address_is_refused_and_cannot_burn_a_code_while_another_still_pairs() {
    let anchor = Anchor::start().await;
    let (id, digits, pin) = anchor.mint().await;

    // A sweep of made-up ids from 127.0.0.2: ten failures a minute, then refused at once.
    let mut reasons = Vec::new();
    for i in 0..12 {
        let a = guess(
            loopback(2),
            anchor.addr(),
            &format!("SWEEP{i:03}"),
            "123456",
        )
        .await;
        reasons.push((a.reason, a.close.0));
    }
    let wrong = (PairFailure::WrongSecret, ErrorCode::PairingFailed.as_u32());
    let refused = (PairFailure::Overloaded, ErrorCode::Overloaded.as_u32());
    assert_eq!(reasons[..10], [wrong; 10]);
    assert_eq!(reasons[10..], [refused; 2], "{reasons:?}");

    // Junk confirmations at the live code from 127.0.0.3: two count, the third is refused
    // before it counts, so the code lives on.
    let junk = other_digits(&digits);
    for _ in 0..2 {
        let a = guess(loopback(3), anchor.addr(), &id, &junk).await;
        assert_eq!(a.reason, PairFailure::WrongSecret);
    }
    let third = guess(loopback(3), anchor.addr(), &id, &junk).await;
    assert_eq!(third.reason, PairFailure::Overloaded, "{third:?}");
    assert!(third.message.contains("try again in"), "{third:?}");
    assert_eq!(third.close.0, ErrorCode::Overloaded.as_u32());
    let code = anchor.code(&id).await;
    assert_eq!((code.state, code.failed_attempts), (CodeState::Active, 2));

    // The person with the PIN, at 127.0.0.1, pairs as usual.
    let dir = tempfile::tempdir().unwrap();
    pair(&anchor, loopback(1), &pin, &dir.path().join("node")).await;
    anchor.running.shutdown().await;
}

/// Pairs a node at `from` with `pin` through the real flow, approving it; returns its state.
async fn pair(anchor: &Anchor, from: IpAddr, pin: &str, state: &std::path::Path) -> StateDir {
    let endpoint = quinn::Endpoint::client(SocketAddr::new(from, 0)).unwrap();
    let state = StateDir::new(state);
    let opts = PairOptions {
        anchor: anchor.addr().to_string(),
        anchor_addr: anchor.addr(),
        code: anchorage_node::pair::parse_code(Some(pin), None).unwrap(),
        device_name: "honest".into(),
        platform: "test".into(),
    };
    let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = {
        let state = state.clone();
        tokio::spawn(async move {
            anchorage_node::pair::pair(&endpoint, &state, &opts, move |p| {
                if let PairProgress::Pending { request_id, .. } = p {
                    let _ = req_tx.send(request_id);
                }
            })
            .await
        })
    };
    let request_id = tokio::time::timeout(STEP, req_rx.recv())
        .await
        .unwrap()
        .expect("the pairing reaches the operator");
    anchor.client.approve(&request_id).await.unwrap();
    task.await.unwrap().expect("the honest node pairs");
    state
}

#[tokio::test]
async fn bootstrap_failures_close_with_the_codes_protocol_md_gives() {
    let anchor = Anchor::start().await;
    let from = loopback(4);

    // Bytes that are no frame: BAD_FRAME (1), at once, with no postcard text anywhere.
    let (_ep, conn, tx, _rx) = bootstrap(from, anchor.addr()).await;
    let mut send = tx.into_inner();
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let (code, reason) = closed(&conn).await;
    assert_eq!(code, ErrorCode::BadFrame.as_u32(), "{reason}");
    assert!(!reason.to_lowercase().contains("serde"), "{reason}");

    // A header announcing more than MAX_FRAME_LEN: FRAME_TOO_LARGE (9).
    let (_ep, conn, tx, _rx) = bootstrap(from, anchor.addr()).await;
    let mut send = tx.into_inner();
    let len = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
    send.write_all(&len.to_be_bytes()).await.unwrap();
    assert_eq!(closed(&conn).await.0, ErrorCode::FrameTooLarge.as_u32());

    // A version this anchor does not speak: Failed { UnsupportedVersion }, then 2.
    let (_ep, conn, mut tx, mut rx) = bootstrap(from, anchor.addr()).await;
    tx.send(&BootstrapRequest::Hello(PairHello {
        version: 999,
        code_id: "K7QFM2XA".into(),
        spake_msg: vec![0; 33],
    }))
    .await
    .unwrap();
    let Some(BootstrapResponse::Failed(f)) = rx.recv().await.unwrap() else {
        panic!("expected Failed");
    };
    assert_eq!(f.reason, PairFailure::UnsupportedVersion);
    assert_eq!(
        closed(&conn).await.0,
        ErrorCode::UnsupportedVersion.as_u32()
    );

    // A Confirm first: Failed { ProtocolViolation }, then 8.
    let (_ep, conn, mut tx, mut rx) = bootstrap(from, anchor.addr()).await;
    tx.send(&BootstrapRequest::Confirm(KeyConfirm { mac: [0; MAC_LEN] }))
        .await
        .unwrap();
    let Some(BootstrapResponse::Failed(f)) = rx.recv().await.unwrap() else {
        panic!("expected Failed");
    };
    assert_eq!(f.reason, PairFailure::ProtocolViolation);
    assert_eq!(
        closed(&conn).await,
        (
            ErrorCode::ProtocolViolation.as_u32(),
            "protocol_violation: protocol_violation".into()
        )
    );

    // A second stream on a bootstrap connection is refused with 8; the first goes on.
    let (_ep, conn, mut tx, mut rx) = bootstrap(from, anchor.addr()).await;
    tx.send(&BootstrapRequest::Hello(PairHello {
        version: PROTOCOL_VERSION,
        code_id: "K7QFM2XA".into(),
        spake_msg: NodeHandshake::start("K7QFM2XA", &CodeSecret::new("1")).1,
    }))
    .await
    .unwrap();
    assert!(matches!(
        rx.recv().await.unwrap(),
        Some(BootstrapResponse::Challenge(_))
    ));
    assert_refused(&conn).await;
    drop(conn);
    anchor.running.shutdown().await;
}

/// Opens a second bidirectional stream on `conn` and checks the anchor refuses it with 8.
async fn assert_refused(conn: &quinn::Connection) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"anything").await.unwrap();
    let refused = quinn::VarInt::from_u32(ErrorCode::ProtocolViolation.as_u32());
    let read = tokio::time::timeout(STEP, recv.read_to_end(1024))
        .await
        .unwrap();
    assert!(
        matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == refused),
        "{read:?}"
    );
    let stopped = tokio::time::timeout(STEP, send.stopped()).await.unwrap();
    assert_eq!(stopped.unwrap(), Some(refused));
}

#[tokio::test]
async fn a_node_session_refuses_extra_streams_and_counts_what_it_drops() {
    let anchor = Anchor::start().await;
    let (_, _, pin) = anchor.mint().await;
    let dir = tempfile::tempdir().unwrap();
    let state = pair(&anchor, loopback(1), &pin, &dir.path().join("node")).await;
    let identity = state.identity().unwrap();

    let (_endpoint, conn, _tx, _rx) = node_session(&anchor, &identity).await;
    assert_refused(&conn).await;

    // Garbage and a datagram only the anchor sends: dropped and counted, never fatal.
    conn.send_datagram(vec![0xff; 40].into()).unwrap();
    let ack = Datagram::HeartbeatAck(HeartbeatAck {
        seq: 1,
        echo_node_time_ms: 0,
        received: 0,
    });
    conn.send_datagram(ack.encode().unwrap().into()).unwrap();
    // Sequence numbers chosen to overflow a naive loss counter.
    for seq in [0, 1 << 63, u64::MAX] {
        let hb = Datagram::Heartbeat(Heartbeat {
            seq,
            node_time_ms: 0,
            load_centi: None,
            running: 0,
        });
        conn.send_datagram(hb.encode().unwrap().into()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = anchorage_sim::eventually(STEP, || async {
        let m = anchor.scrape().await;
        (m.value("anchorage_heartbeats_received_total", &[]) == Some(3.0)
            && m.value(
                "anchorage_datagrams_dropped_total",
                &[("reason", "unexpected")],
            ) == Some(1.0))
        .then_some(m)
    })
    .await
    .expect("the heartbeats and the dropped datagrams are counted");
    assert_eq!(
        metrics.value(
            "anchorage_datagrams_dropped_total",
            &[("reason", "malformed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.value("anchorage_streams_refused_total", &[]),
        Some(1.0)
    );
    let lost = metrics
        .value("anchorage_heartbeats_lost_total", &[])
        .unwrap();
    assert!(
        lost <= 128.0,
        "at most one loss window per jump, not 2^64: {lost}"
    );
    assert!(
        conn.close_reason().is_none(),
        "the session survived all of it"
    );

    // Invocations of made-up capabilities do not grow the exposition.
    let device = identity.cert_info.key_id;
    let before = anchor.scrape().await.samples.len();
    for i in 0..200 {
        let _ = anchor
            .client
            .invoke(
                &device,
                InvokeRequest {
                    capability: format!("made.up.{i}"),
                    input: serde_json::json!({}),
                    timeout_ms: Some(1000),
                    async_: true,
                },
            )
            .await;
    }
    let after = anchor.scrape().await;
    let labels: std::collections::BTreeSet<&str> = after
        .samples
        .iter()
        .filter_map(|s| s.labels.get("capability").map(String::as_str))
        .collect();
    assert!(
        labels.iter().all(|c| !c.starts_with("made.up")),
        "{labels:?}"
    );
    assert!(
        after.samples.len() < before + 20,
        "{} samples before, {} after",
        before,
        after.samples.len()
    );
    conn.close(0u32.into(), b"");
    anchor.running.shutdown().await;
}

#[tokio::test]
async fn under_handshake_load_clients_prove_their_address_with_a_retry_and_still_pair() {
    // Threshold 0: every client is treated as arriving during a flood.
    let anchor = Anchor::start_with(|c| c.retry_above_handshakes = 0).await;
    let (_, _, pin) = anchor.mint().await;
    let dir = tempfile::tempdir().unwrap();
    pair(&anchor, loopback(5), &pin, &dir.path().join("node")).await;
    let retries = anchor
        .scrape()
        .await
        .value("anchorage_handshake_retries_total", &[])
        .unwrap();
    assert!(
        retries >= 1.0,
        "the pairing went through a Retry: {retries}"
    );
    anchor.running.shutdown().await;
}

/// A client that takes `delay` to check the anchor's certificate, so its handshake stays in
/// progress at the anchor meanwhile (it blocks its thread: run it on a runtime of its own).
#[derive(Debug)]
struct SlowVerifier {
    delay: Duration,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SlowVerifier {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        std::thread::sleep(self.delay);
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn above_its_handshake_bound_the_anchor_refuses_new_handshakes_at_once() {
    let anchor = Anchor::start_with(|c| c.refuse_above_handshakes = 1).await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SlowVerifier {
            delay: Duration::from_secs(5),
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![anchorage_wire::ALPN_BOOTSTRAP.to_vec()];
    let slow = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let addr = anchor.addr();
    let started = tokio::time::Instant::now();
    // On a thread and runtime of its own: the verifier blocks its thread for 5 s, which in the
    // test's runtime could hold up an anchor task queued on that worker (tokio cannot steal a
    // worker's next-task slot), and the anchor would look slow rather than busy.
    let held = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (endpoint, conn) = connect(loopback(7), addr, slow).await;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        });
    });
    // The slow client's handshake is in progress at the anchor once its Initial arrived.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let endpoint = quinn::Endpoint::client(SocketAddr::new(loopback(8), 0)).unwrap();
    let refused = endpoint
        .connect_with(
            anchorage_mesh::tls::bootstrap_client_config(None).unwrap(),
            addr,
            ANCHOR_SERVER_NAME,
        )
        .unwrap()
        .await;
    match refused {
        Err(quinn::ConnectionError::ConnectionClosed(c)) => assert_eq!(
            c.error_code,
            quinn::TransportErrorCode::CONNECTION_REFUSED,
            "{c:?}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let busy = anchor
        .scrape()
        .await
        .value("anchorage_handshake_failures_total", &[("reason", "busy")]);
    assert_eq!(busy, Some(1.0));
    // A handshake in progress for longer than HANDSHAKE_COUNTED_FOR (3 s) no longer counts:
    // its node has most likely given up. The next client gets in while it is still held.
    tokio::time::sleep_until(started + Duration::from_millis(3_500)).await;
    let (_endpoint, _conn, _, _) = bootstrap(loopback(9), addr).await;
    assert!(
        !held.is_finished(),
        "the slow handshake is still in progress"
    );
    tokio::task::spawn_blocking(move || held.join())
        .await
        .unwrap()
        .expect("the slow handshake completes");
    anchor.running.shutdown().await;
}

/// A node connection with `identity`, its control stream open and registered.
async fn node_session(
    anchor: &Anchor,
    identity: &anchorage_node::state::Identity,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    FramedSend<ControlUp>,
    FramedRecv<ControlDown>,
) {
    let (endpoint, conn, mut tx, mut rx) = node_connection(anchor, identity).await;
    tx.send(&register()).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(STEP, rx.recv())
            .await
            .unwrap()
            .unwrap(),
        Some(ControlDown::Registered(_))
    ));
    (endpoint, conn, tx, rx)
}

/// A node connection with `identity` and its control stream open, nothing sent.
async fn node_connection(
    anchor: &Anchor,
    identity: &anchorage_node::state::Identity,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    FramedSend<ControlUp>,
    FramedRecv<ControlDown>,
) {
    let client = anchorage_mesh::tls::node_client_config(
        &identity.ca,
        vec![identity.cert.clone()],
        identity.key.private_key_der(),
    )
    .unwrap();
    let (endpoint, conn) = connect(loopback(1), anchor.addr(), client).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let (tx, rx) = framed::framed::<ControlUp, ControlDown>(send, recv);
    (endpoint, conn, tx, rx)
}

fn register() -> ControlUp {
    ControlUp::Register(Register {
        version: PROTOCOL_VERSION,
        name: "hostile".into(),
        platform: "test".into(),
        agent_version: "0".into(),
        capabilities: Vec::new(),
    })
}

#[tokio::test]
async fn node_connections_close_with_the_codes_protocol_md_gives() {
    let anchor = Anchor::start().await;
    let (_, _, pin) = anchor.mint().await;
    let dir = tempfile::tempdir().unwrap();
    let state = pair(&anchor, loopback(1), &pin, &dir.path().join("node")).await;
    let identity = state.identity().unwrap();
    let code = |(c, _): (u32, String)| c;

    // A newer connection of the same device replaces the older: REPLACED (12).
    let (_e1, first, _t1, _r1) = node_session(&anchor, &identity).await;
    let (_e2, second, mut tx, _r2) = node_session(&anchor, &identity).await;
    assert_eq!(code(closed(&first).await), ErrorCode::Replaced.as_u32());
    // A second Register: PROTOCOL_VIOLATION (8).
    tx.send(&register()).await.unwrap();
    assert_eq!(
        code(closed(&second).await),
        ErrorCode::ProtocolViolation.as_u32()
    );

    // Something other than Register first: 8; a frame that does not decode: BAD_FRAME (1).
    let (_e, conn, mut tx, _rx) = node_connection(&anchor, &identity).await;
    tx.send(&ControlUp::Event(
        anchorage_wire::control::NodeEvent::Stopping {
            reason: "never registered".into(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        code(closed(&conn).await),
        ErrorCode::ProtocolViolation.as_u32()
    );
    let (_e, conn, tx, _rx) = node_connection(&anchor, &identity).await;
    let mut send = tx.into_inner();
    send.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    assert_eq!(code(closed(&conn).await), ErrorCode::BadFrame.as_u32());

    // Revoking the device closes its live connection: REVOKED (4).
    let (_e, live, _tx, _rx) = node_session(&anchor, &identity).await;
    anchor
        .client
        .revoke(&identity.cert_info.key_id, Some("hostile".into()))
        .await
        .unwrap();
    assert_eq!(code(closed(&live).await), ErrorCode::Revoked.as_u32());
    anchor.running.shutdown().await;
}
