//! The bootstrap stream (IO driver): a node proves a pairing code with SPAKE2, sends its CSR,
//! waits for an operator, and receives its certificate.
//!
//! The stream follows `wire::bootstrap`. The anchor never reveals its confirmation before
//! checking the node's, so each wrong guess costs one online attempt; after
//! `pairing_max_attempts` the code is burned. A successful confirmation consumes the code at
//! once (single use), even if the node never sends its CSR. Every decision is the trust
//! service's; this module only moves messages.

use std::sync::Arc;
use std::time::Duration;

use anchorage_mesh::framed::{self as fr, FramedRecv, FramedSend, framed};
use anchorage_mesh::pairing::{CodeId, CodeSecret, EXPORTER_LABEL, EXPORTER_LEN, anchor_respond};
use anchorage_wire::bootstrap::*;
use anchorage_wire::{ErrorCode, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use crate::events::AnchorEvent;
use crate::records::RequestState;
use crate::services::Services;
use crate::store::blocking;
use crate::trust::{AttemptError, AttemptFailure, CodeUnusable, RequestError, request_state};

/// Time the node has for each step of the exchange.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

type Tx = FramedSend<BootstrapResponse>;
type Rx = FramedRecv<BootstrapRequest>;

/// Serves one bootstrap connection: a single pairing stream.
pub async fn serve(services: Arc<Services>, conn: quinn::Connection) {
    let Ok(Ok((send, recv))) = tokio::time::timeout(STEP_TIMEOUT, conn.accept_bi()).await else {
        fr::close(&conn, ErrorCode::Timeout, "no pairing stream");
        return;
    };
    let (mut tx, mut rx) = framed::<BootstrapResponse, BootstrapRequest>(send, recv);
    let outcome = match step(&mut rx).await {
        Ok(BootstrapRequest::Hello(hello)) => {
            fresh(&services, &conn, &mut tx, &mut rx, hello).await
        }
        Ok(BootstrapRequest::Resume(resume)) => {
            resume_pairing(&services, &conn, &mut tx, &mut rx, resume).await
        }
        Ok(_) => Err(Fail::new(
            PairFailure::ProtocolViolation,
            "the first message must be Hello or Resume",
        )),
        Err(f) => Err(f),
    };
    match outcome {
        Ok(()) => fr::close(&conn, ErrorCode::NoError, "paired"),
        Err(fail) => {
            services.metrics.pairing_outcome(fail.reason.name());
            debug!(reason = %fail.reason, message = %fail.message, "pairing failed");
            if fail.reason != PairFailure::Internal || !fail.message.is_empty() {
                let _ = tx
                    .send(&BootstrapResponse::Failed(PairFailed {
                        reason: fail.reason,
                        message: fail.message.clone(),
                    }))
                    .await;
            }
            let _ = tx.finish();
            // Let the node read the reason and close first; bounded.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            fr::close(&conn, ErrorCode::PairingFailed, fail.reason.name());
        }
    }
}

/// A pairing failure to report to the node.
#[derive(Debug)]
struct Fail {
    reason: PairFailure,
    message: String,
}

impl Fail {
    fn new(reason: PairFailure, message: impl Into<String>) -> Fail {
        Fail {
            reason,
            message: message.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> Fail {
        warn!(error = %e, "pairing failed internally");
        Fail::new(PairFailure::Internal, "internal error")
    }

    /// The node went away; nothing to tell it.
    fn gone() -> Fail {
        Fail::new(PairFailure::Internal, "")
    }
}

impl From<crate::store::StoreError> for Fail {
    fn from(e: crate::store::StoreError) -> Fail {
        Fail::internal(e)
    }
}

impl From<AttemptError> for Fail {
    fn from(e: AttemptError) -> Fail {
        match e {
            AttemptError::Unknown => Fail::new(PairFailure::UnknownCode, "no such pairing code"),
            AttemptError::Unusable(CodeUnusable::Expired) => {
                Fail::new(PairFailure::CodeExpired, "the pairing code has expired")
            }
            AttemptError::Unusable(CodeUnusable::Consumed) => Fail::new(
                PairFailure::CodeConsumed,
                "the pairing code was already used",
            ),
            AttemptError::Unusable(CodeUnusable::Burned) => Fail::new(
                PairFailure::CodeBurned,
                "the pairing code was burned after too many wrong attempts",
            ),
            AttemptError::Wrong => Fail::new(PairFailure::WrongSecret, "wrong pairing code"),
            AttemptError::Burned => Fail::new(
                PairFailure::CodeBurned,
                "wrong code; too many attempts, the code is now burned",
            ),
        }
    }
}

async fn step(rx: &mut Rx) -> Result<BootstrapRequest, Fail> {
    match tokio::time::timeout(STEP_TIMEOUT, rx.recv()).await {
        Err(_) => Err(Fail::new(
            PairFailure::ProtocolViolation,
            "timed out waiting for the node",
        )),
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => Err(Fail::gone()),
        Ok(Err(e)) if e.is_peer_fault() => {
            Err(Fail::new(PairFailure::ProtocolViolation, e.to_string()))
        }
        Ok(Err(_)) => Err(Fail::gone()),
    }
}

async fn send(tx: &mut Tx, msg: BootstrapResponse) -> Result<(), Fail> {
    tx.send(&msg).await.map_err(|_| Fail::gone())
}

fn exporter(conn: &quinn::Connection) -> Result<[u8; EXPORTER_LEN], Fail> {
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| Fail::internal("TLS exporter unavailable"))?;
    Ok(out)
}

async fn fresh(
    services: &Arc<Services>,
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    hello: PairHello,
) -> Result<(), Fail> {
    if hello.version != PROTOCOL_VERSION {
        return Err(Fail::new(
            PairFailure::UnsupportedVersion,
            format!("protocol version {} is not supported", hello.version),
        ));
    }
    let code_id: CodeId = hello
        .code_id
        .parse()
        .map_err(|_| Fail::new(PairFailure::UnknownCode, "no such pairing code"))?;
    let code = {
        let s = services.clone();
        let id = code_id.clone();
        blocking(move || s.trust.usable_code(&id).map_err(Fail::from)).await?
    };
    let ex = exporter(conn)?;
    let (keys, spake_msg) = anchor_respond(
        code_id.as_str(),
        &CodeSecret::new(code.secret.clone()),
        &hello.spake_msg,
        &ex,
    )
    .map_err(|_| Fail::new(PairFailure::ProtocolViolation, "malformed SPAKE2 message"))?;
    send(
        tx,
        BootstrapResponse::Challenge(PairChallenge {
            version: PROTOCOL_VERSION,
            spake_msg,
        }),
    )
    .await?;
    let BootstrapRequest::Confirm(confirm) = step(rx).await? else {
        return Err(Fail::new(
            PairFailure::ProtocolViolation,
            "expected Confirm",
        ));
    };
    let correct = keys.verify_node_confirmation(&confirm.mac);
    {
        let s = services.clone();
        let id = code_id.clone();
        blocking(move || match s.trust.record_attempt(&id, correct) {
            Ok(()) => Ok(()),
            Err(AttemptFailure::Refused(e)) => Err(Fail::from(e)),
            Err(AttemptFailure::Store(e)) => Err(Fail::internal(e)),
        })
        .await?;
    }
    send(
        tx,
        BootstrapResponse::Confirm(KeyConfirm {
            mac: keys.anchor_confirmation(),
        }),
    )
    .await?;

    let BootstrapRequest::Csr(csr) = step(rx).await? else {
        return Err(Fail::new(PairFailure::ProtocolViolation, "expected Csr"));
    };
    if !keys.verify_csr_mac(&csr.csr_der, &csr.device_name, &csr.platform, &csr.mac) {
        return Err(Fail::new(
            PairFailure::ProtocolViolation,
            "CSR MAC does not verify",
        ));
    }
    let request = {
        let s = services.clone();
        let sas = keys.sas().to_string();
        let after = keys.after().clone();
        let request_id = keys.request_id().to_string();
        blocking(move || {
            s.trust
                .create_request(&code, csr, request_id, sas, after)
                .map_err(|e| match e {
                    RequestError::BadCsr(m) => Fail::new(PairFailure::BadCsr, m),
                    e @ RequestError::DeviceRevoked => {
                        Fail::new(PairFailure::DeviceRevoked, e.to_string())
                    }
                    e @ RequestError::Exists => {
                        Fail::new(PairFailure::ProtocolViolation, e.to_string())
                    }
                    RequestError::Store(e) => Fail::internal(e),
                })
        })
        .await?
    };
    info!(request_id = %request.request_id, device_id = %request.device_id, sas = %request.sas, "pairing request waits for approval");
    services.events.publish(AnchorEvent::PairingRequested {
        device: request.device_id,
        request_id: request.request_id.clone(),
        device_name: request.device_name.clone(),
        sas: request.sas.clone(),
    });
    send(
        tx,
        BootstrapResponse::Pending(PairPending {
            request_id: request.request_id.clone(),
            sas: request.sas.clone(),
            expires_at_ms: request.expires_at_ms,
        }),
    )
    .await?;
    wait_decision(services, conn, tx, rx, &request.request_id).await
}

async fn resume_pairing(
    services: &Arc<Services>,
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    resume: PairResume,
) -> Result<(), Fail> {
    if resume.version != PROTOCOL_VERSION {
        return Err(Fail::new(
            PairFailure::UnsupportedVersion,
            format!("protocol version {} is not supported", resume.version),
        ));
    }
    let unknown = || Fail::new(PairFailure::UnknownRequest, "no such pairing request");
    let req = {
        let s = services.clone();
        let id = resume.request_id.clone();
        blocking(move || s.trust.request(&id).map_err(Fail::internal)).await?
    }
    .ok_or_else(unknown)?;
    let ex = exporter(conn)?;
    if !req
        .keys
        .verify_resume_proof(&req.request_id, &ex, &resume.proof)
    {
        return Err(unknown());
    }
    // Tell the node where it stands, then wait as a fresh pairing would.
    if request_state(&req, services.clock.now_ms())
        == anchorage_console::api::RequestState::PendingApproval
    {
        send(
            tx,
            BootstrapResponse::Pending(PairPending {
                request_id: req.request_id.clone(),
                sas: req.sas.clone(),
                expires_at_ms: req.expires_at_ms,
            }),
        )
        .await?;
    }
    wait_decision(services, conn, tx, rx, &req.request_id).await
}

async fn wait_decision(
    services: &Arc<Services>,
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    request_id: &str,
) -> Result<(), Fail> {
    use anchorage_console::api::RequestState as S;
    let notify = services.trust.waiter(request_id);
    let result = loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let req = {
            let s = services.clone();
            let id = request_id.to_string();
            blocking(move || s.trust.request(&id).map_err(Fail::internal)).await?
        }
        .ok_or_else(|| Fail::new(PairFailure::UnknownRequest, "no such pairing request"))?;
        let now = services.clock.now_ms();
        match request_state(&req, now) {
            S::PendingApproval => {
                let left = req.expires_at_ms.saturating_sub(now);
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(left)) => {}
                    _ = conn.closed() => break Err(Fail::gone()),
                    msg = rx.recv() => match msg {
                        // The node has nothing to say while waiting.
                        Ok(Some(_)) => break Err(Fail::new(PairFailure::ProtocolViolation, "unexpected message while pending")),
                        _ => break Err(Fail::gone()),
                    },
                }
            }
            S::Expired => {
                break Err(Fail::new(
                    PairFailure::RequestExpired,
                    "the pairing request expired before an operator approved it",
                ));
            }
            S::Rejected => {
                break Err(Fail::new(
                    PairFailure::Rejected,
                    req.reason.unwrap_or_else(|| "rejected by operator".into()),
                ));
            }
            S::Approved | S::Completed => {
                let Some(cert_der) = req.cert_der.clone() else {
                    break Err(Fail::internal("approved request without certificate"));
                };
                let ca_der = services.trust.ca().cert_der().to_vec();
                let mac = req.keys.approved_mac(&req.request_id, &cert_der, &ca_der);
                send(
                    tx,
                    BootstrapResponse::Approved(PairApproved {
                        device_id: req.device_id.to_string(),
                        cert_der,
                        ca_der,
                        mac,
                    }),
                )
                .await?;
                let _ = tx.finish();
                // The node finishes its side once its files are written.
                let done = tokio::time::timeout(STEP_TIMEOUT, rx.recv()).await;
                if matches!(done, Ok(Ok(None))) && req.state == RequestState::Approved {
                    let s = services.clone();
                    let id = request_id.to_string();
                    let completed =
                        blocking(move || s.trust.mark_completed(&id).map_err(Fail::internal))
                            .await?;
                    if completed {
                        services.metrics.pairing_outcome("completed");
                        services.events.publish(AnchorEvent::PairingCompleted {
                            device: req.device_id,
                            request_id: request_id.to_string(),
                        });
                    }
                }
                break Ok(());
            }
        }
    };
    if !matches!(&result, Err(f) if f.message.is_empty()) {
        services.trust.forget_waiter(request_id);
    }
    result
}
