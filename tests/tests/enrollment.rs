//! Enrollment and trust end to end over netsim at 10 % loss (issue 4), simulated time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{PairMethod, RequestState, TrustState};
use anchorage_node::RunError;
use anchorage_node::agent::AgentError;
use anchorage_node::pair::PairError;
use anchorage_sim::{Sim, eventually, lossy};
use anchorage_wire::bootstrap::PairFailure;

const SEED: u64 = 0x4e0;

fn refused(r: Result<anchorage_node::pair::Paired, PairError>) -> PairFailure {
    match r {
        Err(PairError::Refused { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn pin_pairing_end_to_end_under_loss() {
    let sim = Sim::start(SEED, lossy(0.10), |_| {}).await;
    let node = sim.add_node("laptop");
    let code = sim.mint(PairMethod::Pin, None).await;
    assert!(
        code.len() == 16 && code.as_bytes()[4] == b'-' && code.as_bytes()[9] == b'-',
        "PIN looks like K7QF-M2XA-482913: {code}"
    );
    let task = node.spawn_pair(sim.addr(), &code);
    let req = sim.wait_pending("laptop").await;
    assert_eq!(req.state, RequestState::PendingApproval);
    assert_eq!(req.sas.len(), 9);
    let pending = node
        .state
        .pending()
        .unwrap()
        .expect("the node saved its pending request");
    assert_eq!(pending.sas, req.sas, "node and console show the same SAS");

    sim.backend()
        .approve(&sim.owner, &req.request_id)
        .await
        .unwrap();
    let paired = task.await.unwrap().expect("pairing completes");
    assert_eq!(paired.device_id, req.device_id);

    // The node holds key (0600), certificate and CA; the certificate verifies with openssl.
    let dir = node.state.path();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        sim.anchor().ca_pem(),
        "the node pinned this anchor's CA"
    );

    let device = sim.backend().device(req.device_id).await.unwrap();
    assert_eq!(device.trust, TrustState::Trusted);
    assert_eq!(device.name, "laptop");
    let done = eventually(Duration::from_secs(30), || async {
        let r = sim.backend().request(&req.request_id).await.unwrap();
        (r.state == RequestState::Completed).then_some(r)
    })
    .await;
    assert!(
        done.is_some(),
        "the request ends completed once the node has its files"
    );
    // The code was single use.
    let again = sim.add_node("second");
    assert_eq!(
        refused(
            again
                .pair_with(sim.addr(), again.opts(sim.addr(), &code).code)
                .await
        ),
        PairFailure::CodeConsumed
    );
}

#[tokio::test(start_paused = true)]
async fn qr_pairing_pins_the_ca_fingerprint() {
    let sim = Sim::start(SEED + 1, lossy(0.10), |c| c.public_addr = None).await;
    let uri = sim.mint(PairMethod::Qr, None).await;
    assert!(uri.starts_with("anchorage://pair?"), "{uri}");
    assert!(
        uri.contains(&format!("fp={}", sim.anchor().ca_fingerprint())),
        "{uri}"
    );

    // A QR code whose fingerprint is not this anchor's CA: the TLS handshake fails.
    let fp = sim.anchor().ca_fingerprint().to_string();
    let forged = uri.replace(&fp, &"0".repeat(64));
    let mallory = sim.add_node("mallory");
    let err = mallory
        .pair_with(sim.addr(), mallory.opts(sim.addr(), &forged).code)
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::Unreachable { .. }), "{err}");

    let node = sim.add_node("kiosk");
    let task = node.spawn_pair(sim.addr(), &uri);
    let req = sim.wait_pending("kiosk").await;
    sim.backend()
        .approve(&sim.owner, &req.request_id)
        .await
        .unwrap();
    task.await.unwrap().expect("QR pairing completes");
}

#[tokio::test(start_paused = true)]
async fn operator_rejection_reaches_the_node_with_its_reason() {
    let sim = Sim::start(SEED + 2, lossy(0.10), |_| {}).await;
    let node = sim.add_node("unknown-box");
    let code = sim.mint(PairMethod::Pin, None).await;
    let task = node.spawn_pair(sim.addr(), &code);
    let req = sim.wait_pending("unknown-box").await;
    sim.backend()
        .reject(&sim.owner, &req.request_id, Some("not ours".into()))
        .await
        .unwrap();
    match task.await.unwrap() {
        Err(PairError::Refused {
            reason: PairFailure::Rejected,
            message,
        }) => {
            assert!(message.contains("not ours"), "{message}")
        }
        other => panic!("expected rejection, got {other:?}"),
    }
    assert!(
        node.state.identity().is_err(),
        "no certificate after a rejection"
    );
    let r = sim.backend().request(&req.request_id).await.unwrap();
    assert_eq!(r.state, RequestState::Rejected);
    // A decided request cannot be approved afterwards.
    let err = sim
        .backend()
        .approve(&sim.owner, &req.request_id)
        .await
        .unwrap_err();
    assert_eq!(err.code, "conflict");
}

#[tokio::test(start_paused = true)]
async fn codes_and_requests_expire() {
    let sim = Sim::start(SEED + 3, lossy(0.10), |_| {}).await;
    // A pending request expires with its code's TTL, and the node is told.
    let code = sim.mint(PairMethod::Pin, Some(30)).await;
    let node = sim.add_node("slow-operator");
    let task = node.spawn_pair(sim.addr(), &code);
    let req = sim.wait_pending("slow-operator").await;
    assert_eq!(refused(task.await.unwrap()), PairFailure::RequestExpired);
    let r = sim.backend().request(&req.request_id).await.unwrap();
    assert_eq!(r.state, RequestState::Expired);
    let err = sim
        .backend()
        .approve(&sim.owner, &req.request_id)
        .await
        .unwrap_err();
    assert_eq!(err.code, "expired");

    // An unused code expires after its TTL.
    let code = sim.mint(PairMethod::Pin, Some(30)).await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let late = sim.add_node("late");
    assert_eq!(
        refused(
            late.pair_with(sim.addr(), late.opts(sim.addr(), &code).code)
                .await
        ),
        PairFailure::CodeExpired
    );

    // TTLs outside 30 s..24 h are refused.
    for ttl in [29, 86_401] {
        let err = sim
            .backend()
            .mint_code(
                &sim.owner,
                anchorage_console::api::MintCodeRequest {
                    method: PairMethod::Pin,
                    ttl_secs: Some(ttl),
                    labels: Default::default(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code, "bad_request", "ttl {ttl}");
    }
}

fn wrong_pin(code: &str) -> String {
    let (id, digits) = code.rsplit_once('-').unwrap();
    format!(
        "{id}-{:06}",
        (digits.parse::<u32>().unwrap() + 1) % 1_000_000
    )
}

async fn code_info(sim: &Sim, code: &str) -> anchorage_console::api::PairingCodeInfo {
    let id = code.rsplit_once('-').unwrap().0.replace('-', "");
    let codes = sim.backend().list_codes().await.unwrap();
    codes.into_iter().find(|c| c.code_id == id).unwrap()
}

#[tokio::test(start_paused = true)]
async fn wrong_pins_from_one_place_cannot_burn_the_code() {
    let sim = Sim::start(SEED + 4, lossy(0.10), |_| {}).await;
    let code = sim.mint(PairMethod::Pin, None).await;
    let wrong = wrong_pin(&code);
    let guesser = sim.add_node("guesser");
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(refused(
            guesser
                .pair_with(sim.addr(), guesser.opts(sim.addr(), &wrong).code)
                .await,
        ));
    }
    assert_eq!(
        outcomes,
        vec![
            PairFailure::WrongSecret,
            PairFailure::WrongSecret,
            PairFailure::Overloaded
        ],
        "the third guess from the same address is not even looked at"
    );
    let info = code_info(&sim, &code).await;
    assert_eq!(info.state, anchorage_console::api::CodeState::Active);
    assert_eq!(info.failed_attempts, 2);
    // The person with the real PIN, elsewhere, still pairs.
    let honest = sim.add_node("honest");
    let task = honest.spawn_pair(sim.addr(), &code);
    let req = sim.wait_pending("honest").await;
    sim.backend()
        .approve(&sim.owner, &req.request_id)
        .await
        .unwrap();
    task.await.unwrap().expect("the honest node pairs");
}

#[tokio::test(start_paused = true)]
async fn wrong_pins_from_three_places_burn_the_code_and_only_the_right_pin_learns_it() {
    let sim = Sim::start(SEED + 14, lossy(0.10), |_| {}).await;
    let code = sim.mint(PairMethod::Pin, None).await;
    let wrong = wrong_pin(&code);
    for i in 0..3 {
        let guesser = sim.add_node(&format!("guesser-{i}"));
        assert_eq!(
            refused(
                guesser
                    .pair_with(sim.addr(), guesser.opts(sim.addr(), &wrong).code)
                    .await
            ),
            PairFailure::WrongSecret,
            "the guess that burns the code does not say so"
        );
    }
    let info = code_info(&sim, &code).await;
    assert_eq!(info.state, anchorage_console::api::CodeState::Burned);
    assert_eq!(info.failed_attempts, 3);
    // Even the right PIN is useless now; its holder is told why, a guesser is not.
    let honest = sim.add_node("honest");
    assert_eq!(
        refused(
            honest
                .pair_with(sim.addr(), honest.opts(sim.addr(), &code).code)
                .await
        ),
        PairFailure::CodeBurned
    );
    let guesser = sim.add_node("guesser-3");
    assert_eq!(
        refused(
            guesser
                .pair_with(sim.addr(), guesser.opts(sim.addr(), &wrong).code)
                .await
        ),
        PairFailure::WrongSecret
    );
}

/// A relay that terminates TLS on both sides and forwards the pairing stream byte for byte.
async fn run_relay(
    relay: anchorage_netsim::Host,
    anchor: std::net::SocketAddr,
) -> std::net::SocketAddr {
    use anchorage_mesh::pki::CertificateAuthority;
    use anchorage_mesh::tls::{AnchorTls, RevocationSet, ServerCertResolver};
    use std::sync::Arc;
    let now = std::time::SystemTime::now();
    let ca = CertificateAuthority::generate("relay", Duration::from_secs(86400), now).unwrap();
    let tls = AnchorTls {
        ca: ca.cert_der().clone(),
        server_cert: Arc::new(
            ServerCertResolver::new(ca.issue_server(Duration::from_secs(86400), now).unwrap())
                .unwrap(),
        ),
        revocation: Arc::new(RevocationSet::new()),
        renewal_grace: Duration::ZERO,
    };
    let server = relay
        .endpoint(
            9000,
            Some(anchorage_mesh::tls::anchor_server_config(&tls).unwrap()),
        )
        .unwrap();
    let addr = std::net::SocketAddr::new(relay.ip(), 9000);
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let Ok(down) = incoming.await else { return };
                let Ok((mut d_send, mut d_recv)) = down.accept_bi().await else {
                    return;
                };
                let up = server
                    .connect_with(
                        anchorage_mesh::tls::bootstrap_client_config(None).unwrap(),
                        anchor,
                        "anchorage-anchor",
                    )
                    .unwrap()
                    .await
                    .unwrap();
                let (mut u_send, mut u_recv) = up.open_bi().await.unwrap();
                let a =
                    tokio::spawn(async move { tokio::io::copy(&mut d_recv, &mut u_send).await });
                let b =
                    tokio::spawn(async move { tokio::io::copy(&mut u_recv, &mut d_send).await });
                let _ = tokio::join!(a, b);
            });
        }
    });
    addr
}

#[tokio::test(start_paused = true)]
async fn a_relay_that_does_not_know_the_pin_cannot_complete_pairing() {
    let sim = Sim::start(SEED + 5, lossy(0.10), |_| {}).await;
    let relay_addr = run_relay(sim.net.add_host("relay"), sim.addr()).await;
    let code = sim.mint(PairMethod::Pin, None).await;
    let victim = sim.add_node("victim");
    // The node dials the relay (thinking it is the anchor); the relay forwards every byte.
    let mut opts = victim.opts(relay_addr, &code);
    opts.anchor_addr = relay_addr;
    let result = anchorage_node::pair::pair(&victim.endpoint, &victim.state, &opts, |_| {}).await;
    match result {
        Err(PairError::Refused {
            reason: PairFailure::WrongSecret,
            ..
        })
        | Err(PairError::AnchorNotAuthenticated) => {}
        other => panic!("the relay must not be able to pair: {other:?}"),
    }
    let pending = sim.backend().list_requests(None).await.unwrap();
    assert!(pending.is_empty(), "no request was created: {pending:?}");
    let codes = sim.backend().list_codes().await.unwrap();
    assert_eq!(
        codes[0].failed_attempts, 1,
        "the relayed attempt counted against the code"
    );
}

#[tokio::test(start_paused = true)]
async fn revocation_closes_the_live_connection_and_refuses_the_next() {
    let sim = Sim::start(SEED + 6, lossy(0.10), |_| {}).await;
    let node = sim.add_node("stolen-laptop");
    let paired = sim.pair(&node).await;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(60)).await,
        "the node registers"
    );

    let revoked_at = tokio::time::Instant::now();
    sim.backend()
        .revoke(&sim.owner, paired.device_id, Some("stolen".into()))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), agent.task)
        .await
        .expect("the agent stops")
        .unwrap();
    assert!(
        matches!(result, Err(RunError::Agent(AgentError::Revoked))),
        "{result:?}"
    );
    let took = revoked_at.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "closed {took:?} after the revoke"
    );

    // The next handshake is refused, and a revoked device cannot simply pair again.
    let again = node.start_agent(sim.addr(), |_| {});
    let result = tokio::time::timeout(Duration::from_secs(30), again.task)
        .await
        .expect("refused")
        .unwrap();
    assert!(
        matches!(result, Err(RunError::Agent(AgentError::Revoked))),
        "{result:?}"
    );
    let code = sim.mint(PairMethod::Pin, None).await;
    assert_eq!(
        refused(
            node.pair_with(sim.addr(), node.opts(sim.addr(), &code).code)
                .await
        ),
        PairFailure::DeviceRevoked
    );
    let device = sim.backend().device(paired.device_id).await.unwrap();
    assert_eq!(device.trust, TrustState::Revoked);
    assert_eq!(device.revoked_reason.as_deref(), Some("stolen"));

    // After an operator removes it, the same device pairs again.
    sim.backend()
        .remove(&sim.owner, paired.device_id)
        .await
        .unwrap();
    assert!(sim.backend().device(paired.device_id).await.is_err());
    let repaired = sim.pair(&node).await;
    assert_eq!(
        repaired.device_id, paired.device_id,
        "the key, and so the id, is kept"
    );
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(60)).await,
        "the re-paired node connects"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn operator_rotation_gives_the_node_a_new_certificate_without_repairing() {
    let sim = Sim::start(SEED + 7, lossy(0.10), |_| {}).await;
    let node = sim.add_node("rotor");
    let paired = sim.pair(&node).await;
    let id = paired.device_id;
    let old_serial = sim.backend().device(id).await.unwrap().cert_serial.unwrap();
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(60)).await);

    let d = sim.backend().rotate(&sim.owner, id).await.unwrap();
    assert!(d.rotation_pending);
    let rotated = eventually(Duration::from_secs(30), || async {
        let d = sim.backend().device(id).await.unwrap();
        let on_disk = node.state.cert_info().unwrap().unwrap().serial_hex();
        (!d.rotation_pending
            && d.cert_serial.as_deref() != Some(old_serial.as_str())
            && d.cert_serial.as_deref() == Some(on_disk.as_str()))
        .then_some(d)
    })
    .await
    .expect("the node rotated");
    let on_disk = node.state.cert_info().unwrap().unwrap();
    assert_eq!(
        Some(on_disk.serial_hex()),
        rotated.cert_serial,
        "the node saved the new certificate"
    );
    assert_eq!(
        agent
            .stats
            .renewals
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        agent
            .stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed),
        "still connected"
    );

    // The next connection uses the new certificate.
    agent.stop().await.unwrap();
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(60)).await);
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn anchor_restart_while_pending_then_approval_completes_the_node() {
    let mut sim = Sim::start(SEED + 8, lossy(0.10), |_| {}).await;
    let node = sim.add_node("patient");
    let code = sim.mint(PairMethod::Pin, None).await;
    let task = node.spawn_pair(sim.addr(), &code);
    let req = sim.wait_pending("patient").await;
    sim.restart().await;
    let listed = sim.backend().request(&req.request_id).await.unwrap();
    assert_eq!(
        listed.state,
        RequestState::PendingApproval,
        "the request survived the restart"
    );
    sim.backend()
        .approve(&sim.owner, &req.request_id)
        .await
        .unwrap();
    let paired = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the node resumes and completes")
        .unwrap()
        .unwrap();
    assert_eq!(paired.device_id, req.device_id);
    assert!(node.state.pending().unwrap().is_none());
}

/// Replaces the node's certificate with one that expired `ago` (signed by the anchor's CA).
fn expire_certificate(sim: &Sim, node: &anchorage_sim::SimNode, ago: Duration) {
    let dir = sim.data_dir.as_path();
    let ca = anchorage_mesh::pki::CertificateAuthority::from_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca.key")).unwrap(),
    )
    .unwrap();
    let key = node.state.key().unwrap().unwrap();
    let validity = Duration::from_secs(30 * 86400);
    let issued_at = std::time::SystemTime::now() - validity - ago;
    let cert = ca
        .sign_csr(&key.csr_der("x").unwrap(), &node.name, validity, issued_at)
        .unwrap();
    node.state
        .save_certificate(&cert.der, ca.cert_der())
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_expired_node_renews_inside_the_grace_period_and_not_after() {
    let sim = Sim::start(SEED + 9, lossy(0.10), |_| {}).await;
    let node = sim.add_node("offline-for-a-month");
    sim.pair(&node).await;
    expire_certificate(&sim, &node, Duration::from_secs(2 * 86400));
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(60)).await,
        "renewed, reconnected, registered"
    );
    assert_eq!(
        agent
            .stats
            .renewals
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let info = node.state.cert_info().unwrap().unwrap();
    assert!(info.not_after > std::time::SystemTime::now() + Duration::from_secs(29 * 86400));
    agent.stop().await.unwrap();

    // Ten days past expiry is beyond the 7-day grace: the node must pair again.
    expire_certificate(&sim, &node, Duration::from_secs(10 * 86400));
    let agent = node.start_agent(sim.addr(), |_| {});
    let result = tokio::time::timeout(Duration::from_secs(30), agent.task)
        .await
        .expect("refused")
        .unwrap();
    assert!(
        matches!(result, Err(RunError::Agent(AgentError::Expired))),
        "{result:?}"
    );
}
