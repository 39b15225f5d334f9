//! Acceptance tests of the foundation: QUIC mTLS between anchor and node on loopback UDP, with
//! real quinn and rustls.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anchorage_mesh::pki::{CertificateAuthority, IssuedCert, parse_cert};
use anchorage_mesh::tls::{
    self, AnchorTls, PeerKind, RevocationSet, ServerCertResolver, classify_connection,
};
use anchorage_mesh::{DeviceId, DeviceKey, Fingerprint, framed};
use anchorage_wire::{ALPN_BOOTSTRAP, ALPN_NODE, ANCHOR_SERVER_NAME, ErrorCode};
use tokio::sync::mpsc;

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Anchor {
    ca: CertificateAuthority,
    revocation: Arc<RevocationSet>,
    addr: SocketAddr,
    accepted: mpsc::Receiver<Result<PeerKind, ErrorCode>>,
    _endpoint: quinn::Endpoint,
}

/// Starts an anchor endpoint on 127.0.0.1:0 that classifies every connection, closes the
/// ones `classify_connection` refuses, and reports what it saw.
fn start_anchor() -> Anchor {
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate("test CA", 3650 * DAY, now).unwrap();
    let server = ca.issue_server(90 * DAY, now).unwrap();
    let revocation = Arc::new(RevocationSet::new());
    let tls = AnchorTls {
        ca: ca.cert_der().clone(),
        server_cert: Arc::new(ServerCertResolver::new(server).unwrap()),
        revocation: revocation.clone(),
        renewal_grace: tls::DEFAULT_RENEWAL_GRACE,
    };
    let config = tls::anchor_server_config(&tls).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, accepted) = mpsc::channel(16);
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else {
                    return; // handshake failed; the client sees why
                };
                let kind = classify_connection(&conn, SystemTime::now());
                if let Err(code) = &kind {
                    framed::close(&conn, *code, "refused");
                } else {
                    // Serve one bidirectional stream: echo one frame's worth of bytes.
                    if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let mut buf = [0u8; 4];
                        if recv.read_exact(&mut buf).await.is_ok() {
                            let _ = send.write_all(&buf).await;
                            let _ = send.finish();
                        }
                    }
                }
                let _ = tx.send(kind).await;
                conn.closed().await;
            });
        }
    });
    Anchor {
        ca,
        revocation,
        addr,
        accepted,
        _endpoint: endpoint,
    }
}

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn issue(
    ca: &CertificateAuthority,
    key: &DeviceKey,
    validity: Duration,
    now: SystemTime,
) -> IssuedCert {
    let csr = key.csr_der("test-node").unwrap();
    ca.sign_csr(&csr, "test-node", validity, now).unwrap()
}

async fn connect_node(
    anchor: &Anchor,
    ca_der: &rustls::pki_types::CertificateDer<'static>,
    cert: &IssuedCert,
    key: &DeviceKey,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let config =
        tls::node_client_config(ca_der, vec![cert.der.clone()], key.private_key_der()).unwrap();
    let ep = client_endpoint();
    ep.connect_with(config, anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await
}

/// Asserts the anchor refused a node's certificate: either the client saw the handshake fail,
/// or (TLS 1.3 lets the client finish first) the anchor closed it with a TLS alert before any
/// stream was served.
async fn assert_refused(res: Result<quinn::Connection, quinn::ConnectionError>, what: &str) {
    let reason = match res {
        Err(e) => e,
        Ok(conn) => {
            assert!(echo(&conn).await.is_err(), "{what}: a stream was served");
            conn.closed().await
        }
    };
    match &reason {
        quinn::ConnectionError::ConnectionClosed(close) => {
            // 0x100..=0x1ff are TLS alerts carried as QUIC crypto errors.
            let code = u64::from(close.error_code);
            assert!(
                (0x100..=0x1ff).contains(&code),
                "{what}: not a TLS alert: {reason:?}"
            );
        }
        other => panic!("{what}: expected a TLS alert, got {other:?}"),
    }
}

/// Asserts the anchor took `conn` as a node's and served it a stream.
async fn assert_served_as_node(anchor: &mut Anchor, conn: &quinn::Connection) {
    assert_eq!(&echo(conn).await.unwrap(), b"ping");
    assert!(matches!(
        anchor.accepted.recv().await,
        Some(Ok(PeerKind::Node(_)))
    ));
}

async fn echo(conn: &quinn::Connection) -> Result<[u8; 4], String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}

#[tokio::test]
async fn node_certificate_connects_and_anchor_reads_device_id() {
    let mut anchor = start_anchor();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&anchor.ca, &key, 30 * DAY, SystemTime::now());
    let conn = connect_node(&anchor, anchor.ca.cert_der(), &cert, &key)
        .await
        .expect("a CA-issued certificate connects");
    assert_eq!(&echo(&conn).await.unwrap(), b"ping");
    match anchor.accepted.recv().await.unwrap() {
        Ok(PeerKind::Node(info)) => {
            assert_eq!(info.key_id, key.device_id());
            assert_eq!(info.san_device_id, Some(key.device_id()));
        }
        other => panic!("expected a node, got {other:?}"),
    }
}

#[tokio::test]
async fn node_alpn_without_certificate_is_closed_with_unauthenticated() {
    let mut anchor = start_anchor();
    let config = tls::rustls_client_config(anchor.ca.cert_der(), None, ALPN_NODE).unwrap();
    let conn = client_endpoint()
        .connect_with(config, anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await
        .expect("the handshake itself completes: client auth is optional at TLS level");
    // No stream is served: opening one and asking for an echo fails with the close code.
    echo(&conn).await.expect_err("no stream may be served");
    let reason = conn.closed().await;
    assert_eq!(
        framed::close_code(&reason),
        Some(ErrorCode::Unauthenticated.as_u32()),
        "closed with {reason:?}"
    );
    assert_eq!(
        anchor.accepted.recv().await.unwrap().unwrap_err(),
        ErrorCode::Unauthenticated
    );
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let anchor = start_anchor();
    let other = CertificateAuthority::generate("rogue CA", 365 * DAY, SystemTime::now()).unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&other, &key, 30 * DAY, SystemTime::now());
    let res = connect_node(&anchor, anchor.ca.cert_der(), &cert, &key).await;
    assert_refused(res, "rogue CA").await;
}

#[tokio::test]
async fn expired_certificate_beyond_grace_fails_the_handshake() {
    let anchor = start_anchor();
    let key = DeviceKey::generate().unwrap();
    // Issued 40 days ago for 30 days: expired 10 days ago, beyond the 7-day grace.
    let cert = issue(&anchor.ca, &key, 30 * DAY, SystemTime::now() - 40 * DAY);
    let res = connect_node(&anchor, anchor.ca.cert_der(), &cert, &key).await;
    assert_refused(res, "expired beyond grace").await;
}

#[tokio::test]
async fn expired_certificate_inside_grace_connects_for_renewal_only() {
    let mut anchor = start_anchor();
    let key = DeviceKey::generate().unwrap();
    // Expired two days ago: inside the 7-day grace period.
    let cert = issue(&anchor.ca, &key, 30 * DAY, SystemTime::now() - 32 * DAY);
    let conn = connect_node(&anchor, anchor.ca.cert_der(), &cert, &key)
        .await
        .expect("inside the grace period the handshake succeeds");
    let _ = echo(&conn).await;
    match anchor.accepted.recv().await.unwrap() {
        Ok(PeerKind::NodeRenewalOnly(info)) => assert_eq!(info.key_id, key.device_id()),
        other => panic!("expected renewal-only, got {other:?}"),
    }
}

#[tokio::test]
async fn revoked_device_fails_and_revocation_is_live() {
    let mut anchor = start_anchor();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&anchor.ca, &key, 30 * DAY, SystemTime::now());
    // Connected first: the check is consulted at every handshake, not snapshotted at start.
    let first = connect_node(&anchor, anchor.ca.cert_der(), &cert, &key)
        .await
        .unwrap();
    assert_served_as_node(&mut anchor, &first).await;

    anchor.revocation.revoke_device(key.device_id());
    let res = connect_node(&anchor, anchor.ca.cert_der(), &cert, &key).await;
    assert_refused(res, "revoked device").await;

    // Revoking one serial (a superseded certificate) refuses that certificate only.
    let key2 = DeviceKey::generate().unwrap();
    let old = issue(&anchor.ca, &key2, 30 * DAY, SystemTime::now());
    let new = issue(&anchor.ca, &key2, 30 * DAY, SystemTime::now());
    anchor.revocation.revoke_serial(old.info.serial.clone());
    let res = connect_node(&anchor, anchor.ca.cert_der(), &old, &key2).await;
    assert_refused(res, "revoked serial").await;
    let conn = connect_node(&anchor, anchor.ca.cert_der(), &new, &key2)
        .await
        .unwrap();
    assert_eq!(&echo(&conn).await.unwrap(), b"ping");
}

/// A node keeps its client configuration across reconnections (as the agent does), so a
/// TLS session ticket from an earlier connection would let it resume without the certificate
/// check: the anchor issues none, and a device revoked in between is refused at the handshake.
#[tokio::test]
async fn revoked_device_is_refused_when_it_reconnects_with_the_same_client_configuration() {
    let mut anchor = start_anchor();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&anchor.ca, &key, 30 * DAY, SystemTime::now());
    let config = tls::node_client_config(
        anchor.ca.cert_der(),
        vec![cert.der.clone()],
        key.private_key_der(),
    )
    .unwrap();
    let ep = client_endpoint();
    let first = ep
        .connect_with(config.clone(), anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    assert_served_as_node(&mut anchor, &first).await;
    // Tickets, when sent, follow the handshake: give them time to arrive before closing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.close(0u32.into(), b"done");
    ep.wait_idle().await;

    anchor.revocation.revoke_device(key.device_id());
    let res = ep
        .connect_with(config, anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await;
    assert_refused(res, "revoked device, same client configuration").await;
}

#[tokio::test]
async fn bootstrap_alpn_needs_no_certificate_and_qr_pins_the_ca() {
    let mut anchor = start_anchor();
    // PIN pairing: no CA known yet; the handshake succeeds without a client certificate.
    let config = tls::bootstrap_client_config(None).unwrap();
    let conn = client_endpoint()
        .connect_with(config, anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    assert_eq!(&echo(&conn).await.unwrap(), b"ping");
    assert!(matches!(
        anchor.accepted.recv().await,
        Some(Ok(PeerKind::Bootstrap))
    ));

    // QR pairing with the right fingerprint connects; with a wrong one it does not.
    let right = tls::bootstrap_client_config(Some(anchor.ca.fingerprint())).unwrap();
    assert!(
        client_endpoint()
            .connect_with(right, anchor.addr, ANCHOR_SERVER_NAME)
            .unwrap()
            .await
            .is_ok()
    );
    let wrong = tls::bootstrap_client_config(Some(Fingerprint([0u8; 32]))).unwrap();
    assert!(
        client_endpoint()
            .connect_with(wrong, anchor.addr, ANCHOR_SERVER_NAME)
            .unwrap()
            .await
            .is_err()
    );
    let _ = ALPN_BOOTSTRAP;
}

#[tokio::test]
async fn unknown_alpn_is_refused() {
    let anchor = start_anchor();
    let config = tls::rustls_client_config(anchor.ca.cert_der(), None, b"h3").unwrap();
    let res = client_endpoint()
        .connect_with(config, anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await;
    assert!(res.is_err(), "no shared ALPN must fail the handshake");
}

#[test]
fn issued_certificate_passes_openssl_verify() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate("openssl CA", 3650 * DAY, now).unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&ca, &key, 30 * DAY, now);
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert.pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("cert.pem"))
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And the anchor's server certificate verifies for TLS server use.
    let server = ca.issue_server(90 * DAY, now).unwrap();
    std::fs::write(
        dir.path().join("server.pem"),
        anchorage_mesh::pki::der_to_pem(&server.chain[0]),
    )
    .unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("server.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn issued_certificate_carries_the_device_id_and_ignores_csr_claims() {
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate("CA", 3650 * DAY, now).unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&ca, &key, 30 * DAY, now);
    let info = parse_cert(&cert.der).unwrap();
    assert_eq!(info.key_id, key.device_id());
    assert_eq!(info.san_device_id, Some(key.device_id()));
    let validity = info.not_after.duration_since(info.not_before).unwrap();
    assert!(validity >= 30 * DAY && validity <= 30 * DAY + Duration::from_secs(600));
    // A CSR that is garbage, or whose signature does not verify, is refused.
    assert!(ca.sign_csr(b"not a csr", "x", DAY, now).is_err());
    let mut csr = key.csr_der("n").unwrap();
    let last = csr.len() - 1;
    csr[last] ^= 0x55;
    assert!(ca.sign_csr(&csr, "x", DAY, now).is_err());
    // CA round-trips through PEM, and a mismatched key is refused.
    let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(again.fingerprint(), ca.fingerprint());
    let other = CertificateAuthority::generate("other", DAY, now).unwrap();
    assert!(CertificateAuthority::from_pem(ca.cert_pem(), &other.key_pem()).is_err());
    let _: DeviceId = info.key_id;
}

/// The reason a refused connection ended, whether the handshake failed at the client or the
/// anchor closed it right after (TLS 1.3 lets the client finish first).
async fn refusal(res: Result<quinn::Connection, quinn::ConnectionError>) -> quinn::ConnectionError {
    match res {
        Err(e) => e,
        Ok(conn) => {
            let _ = echo(&conn).await;
            conn.closed().await
        }
    }
}

/// The classifier on real handshakes: each way the anchor refuses a node maps to the reason
/// the anchor counts and the action the node takes.
#[tokio::test]
async fn real_refusals_classify_as_node_and_anchor_expect() {
    use anchorage_mesh::conn_error::{ConnFailure, NodeAction};
    let anchor = start_anchor();
    let now = SystemTime::now();

    let key = DeviceKey::generate().unwrap();
    let cert = issue(&anchor.ca, &key, 30 * DAY, now);
    anchor.revocation.revoke_device(key.device_id());
    let e = refusal(connect_node(&anchor, anchor.ca.cert_der(), &cert, &key).await).await;
    let f = ConnFailure::classify(&e);
    assert_eq!(f, ConnFailure::CertificateRevoked, "{e:?}");
    assert!(ConnFailure::by_peer(&e), "the anchor raised it: {e:?}");
    assert_eq!(f.node_action(), NodeAction::Revoked);

    let key = DeviceKey::generate().unwrap();
    let cert = issue(&anchor.ca, &key, 30 * DAY, now - 40 * DAY);
    let e = refusal(connect_node(&anchor, anchor.ca.cert_der(), &cert, &key).await).await;
    assert_eq!(
        ConnFailure::classify(&e),
        ConnFailure::CertificateExpired,
        "{e:?}"
    );
    assert_eq!(ConnFailure::classify(&e).node_action(), NodeAction::Expired);

    let rogue = CertificateAuthority::generate("rogue CA", 365 * DAY, now).unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert = issue(&rogue, &key, 30 * DAY, now);
    let e = refusal(connect_node(&anchor, anchor.ca.cert_der(), &cert, &key).await).await;
    let f = ConnFailure::classify(&e);
    assert!(f.is_tls(), "{e:?}");
    assert_eq!(f.node_action(), NodeAction::Removed, "{e:?}");

    // No ALPN in common: refused by the anchor with no_application_protocol.
    let config = tls::rustls_client_config(anchor.ca.cert_der(), None, b"h3").unwrap();
    let e = refusal(
        client_endpoint()
            .connect_with(config, anchor.addr, ANCHOR_SERVER_NAME)
            .unwrap()
            .await,
    )
    .await;
    assert_eq!(
        ConnFailure::classify(&e),
        ConnFailure::NoApplicationProtocol,
        "{e:?}"
    );
    assert_eq!(ConnFailure::classify(&e).name(), "no_application_protocol");

    // A QR code pinning another CA: this side refuses the anchor's certificate.
    let wrong = tls::bootstrap_client_config(Some(Fingerprint([0u8; 32]))).unwrap();
    let e = client_endpoint()
        .connect_with(wrong, anchor.addr, ANCHOR_SERVER_NAME)
        .unwrap()
        .await
        .unwrap_err();
    let f = ConnFailure::classify(&e);
    assert!(f.is_tls() && !ConnFailure::by_peer(&e), "{e:?}");
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
}
