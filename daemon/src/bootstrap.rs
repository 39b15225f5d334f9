//! The bootstrap stream (IO driver): a node proves a pairing code with SPAKE2, sends its CSR,
//! waits for an operator, and receives its certificate.
//!
//! The stream follows `wire::bootstrap`. Nothing about a code can be learnt without its
//! secret: an unknown id and a wrong secret (at a live or a dead code) both get a challenge
//! (from a random secret when there is no code), then `wrong_secret`, no sooner than
//! [`WRONG_SECRET_DELAY`] after the node's confirmation; only a node that proved the secret
//! of an expired, used or burned code is told which. The anchor never reveals
//! its confirmation before checking the node's, so each wrong guess costs one online attempt;
//! after `pairing_max_attempts` the code is burned. A successful confirmation consumes the
//! code at once (single use), even if the node never sends its CSR. Who may try how often is
//! [`crate::admission`]'s; every decision about codes and requests is the trust service's; this module
//! only moves messages.

use std::sync::Arc;
use std::time::Duration;

use anchorage_mesh::framed::{self as fr, FramedRecv, FramedSend, StreamError, framed};
use anchorage_mesh::pairing::{CodeId, CodeSecret, EXPORTER_LABEL, EXPORTER_LEN, anchor_respond};
use anchorage_wire::bootstrap::*;
use anchorage_wire::{ErrorCode, PROTOCOL_VERSION};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::admission::{Refused, Source};
use crate::events::AnchorEvent;
use crate::records::RequestState;
use crate::services::Services;
use crate::store::blocking;
use crate::trust::{AttemptError, AttemptFailure, CodeUnusable, RequestError, request_state};

/// Time the node has for each step of the exchange.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// A wrong secret is answered no sooner than this after the node's confirmation, so the time
/// of the answer does not tell a live code (whose failure is written to the store) from an
/// unknown one.
pub const WRONG_SECRET_DELAY: Duration = Duration::from_millis(250);
/// How long a connection refused by the limits may take to open its stream and be told why.
pub const REFUSED_STREAM_WAIT: Duration = Duration::from_secs(2);
/// How long the anchor waits, after its last message, for the node to read it and close.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

type Tx = FramedSend<BootstrapResponse>;
type Rx = FramedRecv<BootstrapRequest>;

/// Serves one bootstrap connection: a single pairing stream.
pub async fn serve(services: Arc<Services>, conn: quinn::Connection) {
    // Admitted (or not) before anything else, so connections held open count too.
    let mut attempt = Attempt::new(&services, &conn);
    let admitted = attempt.admit();
    // A refused connection is not held for long: it is told if it opens its stream at once.
    let wait = if admitted.is_ok() {
        STEP_TIMEOUT
    } else {
        REFUSED_STREAM_WAIT
    };
    let Ok(Ok((send, recv))) = tokio::time::timeout(wait, conn.accept_bi()).await else {
        if admitted.is_ok() {
            attempt.finish(Some(&Fail::timed_out()));
            fr::close(&conn, ErrorCode::Timeout, "timeout: no pairing stream");
        } else {
            services.metrics.pairing_outcome("overloaded");
            fr::close(&conn, ErrorCode::Overloaded, "overloaded: try again later");
        }
        return;
    };
    // The pairing stream is the only one this connection may open.
    services.spawn(crate::streams::refuse_further(
        services.metrics.clone(),
        conn.clone(),
    ));
    let (mut tx, mut rx) = framed::<BootstrapResponse, BootstrapRequest>(send, recv);
    let outcome = match admitted {
        // Refused: told at once, without reading what the node sent.
        Err(fail) => Err(fail),
        Ok(()) => match step(&mut rx).await {
            Ok(BootstrapRequest::Hello(hello)) => {
                fresh(&services, &conn, &mut tx, &mut rx, &mut attempt, hello).await
            }
            Ok(BootstrapRequest::Resume(resume)) => {
                resume_pairing(&services, &conn, &mut tx, &mut rx, &mut attempt, resume).await
            }
            Ok(_) => Err(Fail::new(
                PairFailure::ProtocolViolation,
                "the first message must be Hello or Resume",
            )),
            Err(f) => Err(f),
        },
    };
    attempt.finish(outcome.as_ref().err());
    match outcome {
        Ok(()) => fr::close(&conn, ErrorCode::NoError, "paired"),
        Err(fail) => {
            services.metrics.pairing_outcome(fail.outcome());
            debug!(reason = %fail.reason, message = %fail.message, "pairing failed");
            let close_code = fail.close_code();
            match fail.kind {
                FailKind::Close(_) | FailKind::Gone => {}
                FailKind::Told => {
                    let _ = tx
                        .send(&BootstrapResponse::Failed(PairFailed {
                            reason: fail.reason,
                            message: fail.message.clone(),
                        }))
                        .await;
                    let _ = tx.finish();
                    // Let the node read the reason: until it acknowledged the stream or
                    // closed, bounded.
                    tokio::select! {
                        _ = tokio::time::timeout(FAREWELL_TIMEOUT, tx.stopped()) => {}
                        _ = conn.closed() => {}
                    }
                }
            }
            let phrase = format!("{}: {}", close_code.name(), fail.reason.name());
            fr::close(&conn, close_code, &phrase);
        }
    }
}

/// One admitted attempt from one source, as the limiter sees it.
struct Attempt<'a> {
    services: &'a Services,
    source: Source,
    admitted: bool,
    /// The code id the attempt named, once it named one.
    code_id: Option<String>,
    /// Whether the attempt reached an operator (a request was recorded or resumed).
    reached_operator: bool,
}

impl<'a> Attempt<'a> {
    fn new(services: &'a Services, conn: &quinn::Connection) -> Attempt<'a> {
        Attempt {
            services,
            source: Source::from(conn.remote_address().ip()),
            admitted: false,
            code_id: None,
            reached_operator: false,
        }
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, crate::admission::Limiter> {
        self.services
            .pairing_limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn admit(&mut self) -> Result<(), Fail> {
        let now = self.services.clock.now_ms();
        self.limiter()
            .admit(self.source, now)
            .map_err(Fail::refused)?;
        self.admitted = true;
        Ok(())
    }

    /// Whether this source may try `code_id`; names the id for the failure count.
    fn may_try(&mut self, code_id: &str) -> Result<(), Fail> {
        self.code_id = Some(code_id.to_string());
        let now = self.services.clock.now_ms();
        self.limiter()
            .may_try(self.source, code_id, now)
            .map_err(Fail::refused)
    }

    fn finish(&mut self, failure: Option<&Fail>) {
        if !self.admitted {
            return;
        }
        let now = self.services.clock.now_ms();
        let mut limiter = self.limiter();
        // Refusals by the limiter itself are not charged again; an operator's decision
        // (rejected, expired) is not the source's failure.
        let charged =
            failure.is_some_and(|f| f.reason != PairFailure::Overloaded) && !self.reached_operator;
        if charged {
            limiter.failed(self.source, self.code_id.as_deref(), now);
        }
        limiter.finish(self.source, now);
        drop(limiter);
        self.admitted = false;
    }
}

/// How a failure ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailKind {
    /// The node is told with `Failed`, then the connection is closed.
    Told,
    /// Nothing more can be said on the stream (a bad frame put it out of sync, or the node
    /// stopped talking): close with this code at once.
    Close(ErrorCode),
    /// The node went away; nothing to tell it.
    Gone,
}

/// A pairing failure to report to the node.
#[derive(Debug)]
struct Fail {
    reason: PairFailure,
    message: String,
    kind: FailKind,
}

impl Fail {
    fn new(reason: PairFailure, message: impl Into<String>) -> Fail {
        Fail {
            reason,
            message: message.into(),
            kind: FailKind::Told,
        }
    }

    fn internal(e: impl std::fmt::Display) -> Fail {
        warn!(error = %e, "pairing failed internally");
        Fail::new(PairFailure::Internal, "internal error")
    }

    /// The node went away; nothing to tell it.
    fn gone() -> Fail {
        Fail {
            kind: FailKind::Gone,
            ..Fail::new(PairFailure::Internal, "")
        }
    }

    /// The node's bytes did not decode: `BAD_FRAME` (1) or `FRAME_TOO_LARGE` (9).
    fn frame(e: &StreamError) -> Fail {
        Fail {
            kind: FailKind::Close(e.code()),
            ..Fail::new(PairFailure::ProtocolViolation, "")
        }
    }

    /// The node did not send the next message in time: `TIMEOUT` (14).
    fn timed_out() -> Fail {
        Fail {
            kind: FailKind::Close(ErrorCode::Timeout),
            ..Fail::new(PairFailure::ProtocolViolation, "")
        }
    }

    /// What an unknown id, an unusable code and a wrong secret all get.
    fn wrong_secret() -> Fail {
        Fail::new(
            PairFailure::WrongSecret,
            "wrong pairing code, or a code that is unknown, expired, used or burned",
        )
    }

    fn refused(r: Refused) -> Fail {
        let message = match r {
            Refused::Source { retry_after } => format!(
                "too many failed pairing attempts from this address; try again in {} s",
                retry_after.as_secs().max(1)
            ),
            Refused::CodeLocked { retry_after } => format!(
                "too many wrong attempts at this code from this address; try again in {} s",
                retry_after.as_secs().max(1)
            ),
            Refused::Busy => "the anchor is busy pairing; try again shortly".to_string(),
        };
        Fail::new(PairFailure::Overloaded, message)
    }

    /// The application code the connection closes with (docs/protocol.md, §4).
    fn close_code(&self) -> ErrorCode {
        match self.kind {
            FailKind::Close(code) => code,
            FailKind::Gone | FailKind::Told => match self.reason {
                PairFailure::UnsupportedVersion => ErrorCode::UnsupportedVersion,
                PairFailure::ProtocolViolation => ErrorCode::ProtocolViolation,
                PairFailure::Overloaded => ErrorCode::Overloaded,
                PairFailure::Internal => ErrorCode::Internal,
                _ => ErrorCode::PairingFailed,
            },
        }
    }

    /// The `outcome` label of the pairing metric.
    fn outcome(&self) -> &'static str {
        match self.kind {
            FailKind::Close(code) => code.name(),
            FailKind::Gone => "abandoned",
            FailKind::Told => self.reason.name(),
        }
    }
}

impl From<crate::store::StoreError> for Fail {
    fn from(e: crate::store::StoreError) -> Fail {
        Fail::internal(e)
    }
}

/// A refusal for a code whose secret the node proved: only then is its state told.
impl From<AttemptError> for Fail {
    fn from(e: AttemptError) -> Fail {
        match e {
            AttemptError::Unknown | AttemptError::Wrong | AttemptError::Burned => {
                Fail::wrong_secret()
            }
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
        }
    }
}

async fn step(rx: &mut Rx) -> Result<BootstrapRequest, Fail> {
    match tokio::time::timeout(STEP_TIMEOUT, rx.recv()).await {
        Err(_) => Err(Fail::timed_out()),
        Ok(Ok(Some(msg))) => Ok(msg),
        Ok(Ok(None)) => Err(Fail::gone()),
        Ok(Err(e)) if e.is_peer_fault() => Err(Fail::frame(&e)),
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
    attempt: &mut Attempt<'_>,
    hello: PairHello,
) -> Result<(), Fail> {
    if hello.version != PROTOCOL_VERSION {
        return Err(Fail::new(
            PairFailure::UnsupportedVersion,
            format!("protocol version {} is not supported", hello.version),
        ));
    }
    // The id as typed names the attempt for the limiter, whether or not it parses.
    let parsed: Option<CodeId> = hello.code_id.parse().ok();
    let key = parsed
        .as_ref()
        .map_or(hello.code_id.clone(), |id| id.as_str().to_string());
    attempt.may_try(&key)?;
    let code = match &parsed {
        Some(id) => {
            let s = services.clone();
            let id = id.clone();
            blocking(move || s.trust.code_for_pairing(&id).map_err(Fail::from)).await?
        }
        None => None,
    };
    // Without a code the challenge comes from a random secret no node can know. A code that
    // can no longer be used still answers with its own secret, so that the node that proves
    // it learns what became of it; a wrong secret there is not counted.
    let secret = match &code {
        Some(c) => CodeSecret::new(c.secret.clone()),
        None => CodeSecret::random_qr().map_err(|e| Fail::internal(e.to_string()))?,
    };
    let ex = exporter(conn)?;
    let (keys, spake_msg) = anchor_respond(&hello.code_id, &secret, &hello.spake_msg, &ex)
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
    let confirmed_at = Instant::now();
    let correct = keys.verify_node_confirmation(&confirm.mac);
    let counted = match (&code, &parsed) {
        (Some(_), Some(id)) => {
            let s = services.clone();
            let id = id.clone();
            blocking(move || match s.trust.record_attempt(&id, correct) {
                Ok(()) => Ok(()),
                // Its state is told only to a node that proved the secret.
                Err(AttemptFailure::Refused(e)) if correct => Err(Fail::from(e)),
                Err(AttemptFailure::Refused(_)) => Err(Fail::wrong_secret()),
                Err(AttemptFailure::Store(e)) => Err(Fail::internal(e)),
            })
            .await
        }
        _ => Err(Fail::wrong_secret()),
    };
    if let Err(fail) = counted {
        if fail.reason == PairFailure::WrongSecret {
            tokio::time::sleep_until(confirmed_at + WRONG_SECRET_DELAY).await;
        }
        return Err(fail);
    }
    let Some(code) = code else {
        return Err(Fail::internal("a confirmed attempt without its code"));
    };
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
    attempt.reached_operator = true;
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
    attempt: &mut Attempt<'_>,
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
    attempt.reached_operator = true;
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
                        Err(e) if e.is_peer_fault() => break Err(Fail::frame(&e)),
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
