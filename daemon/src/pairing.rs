//! Pairing: minting codes, the bootstrap stream, and operator decisions.
//!
//! The bootstrap stream follows `wire::bootstrap`. The anchor never reveals its confirmation
//! before checking the node's, so each wrong guess costs one online attempt; after
//! `pairing_max_attempts` the code is burned. A successful confirmation consumes the code at
//! once (single use), even if the node never sends its CSR.

use std::sync::Arc;
use std::time::Duration;

use anchorage_console::api::Principal;
use anchorage_mesh::framed::{FramedRecv, FramedSend, framed};
use anchorage_mesh::pairing::{
    AfterKeys, CodeId, CodeSecret, EXPORTER_LABEL, EXPORTER_LEN, QrPayload, anchor_respond,
};
use anchorage_mesh::pki::csr_device_id_checked;
use anchorage_mesh::{DeviceId, framed as fr};
use anchorage_wire::bootstrap::*;
use anchorage_wire::{ErrorCode, PROTOCOL_VERSION};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::anchor::Anchor;
use crate::records::*;
use crate::store::{Durability, Space};
use crate::trust::{TrustError, actor, audit, serial_revocation_key};

/// Time the node has for each step of the exchange.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest TTL of a code.
pub const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest TTL of a code.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default TTL of a code.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

type Tx = FramedSend<BootstrapResponse>;
type Rx = FramedRecv<BootstrapRequest>;

/// A minted code with its secret, as returned once to the operator.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The stored record.
    pub record: CodeRecord,
    /// What a person types or scans.
    pub code: String,
    /// QR URI, for QR codes.
    pub uri: Option<String>,
}

/// Effective state of a code at `now_ms`.
pub fn code_state(code: &CodeRecord, now_ms: u64) -> anchorage_console::api::CodeState {
    use anchorage_console::api::CodeState as S;
    match code.state {
        CodeState::Consumed => S::Consumed,
        CodeState::Burned => S::Burned,
        CodeState::Active if now_ms >= code.expires_at_ms => S::Expired,
        CodeState::Active => S::Active,
    }
}

/// Effective state of a request at `now_ms`.
pub fn request_state(req: &RequestRecord, now_ms: u64) -> anchorage_console::api::RequestState {
    use anchorage_console::api::RequestState as S;
    match req.state {
        RequestState::PendingApproval if now_ms >= req.expires_at_ms => S::Expired,
        RequestState::PendingApproval => S::PendingApproval,
        RequestState::Approved => S::Approved,
        RequestState::Completed => S::Completed,
        RequestState::Rejected => S::Rejected,
    }
}

/// Mints a code (blocking: writes the store).
pub fn mint_code(
    anchor: &Anchor,
    who: &Principal,
    method: CodeMethod,
    ttl: Duration,
) -> Result<Minted, TrustError> {
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(TrustError::BadInput(format!(
            "ttl must be between 30s and 24h, got {}s",
            ttl.as_secs()
        )));
    }
    let pki = |e: anchorage_mesh::pairing::PairingCryptoError| TrustError::Pki(e.to_string());
    let mut trust = anchor.trust();
    let store = &anchor.shared.store;
    let mut code_id = CodeId::random().map_err(pki)?;
    for _ in 0..16 {
        if store
            .get::<CodeRecord>(Space::Codes, code_id.as_str().as_bytes())?
            .is_none()
        {
            break;
        }
        code_id = CodeId::random().map_err(pki)?;
    }
    let secret = match method {
        CodeMethod::Pin => CodeSecret::random_pin(),
        CodeMethod::Qr => CodeSecret::random_qr(),
    }
    .map_err(pki)?;
    let now = anchor.now_ms();
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let record = CodeRecord {
        code_id: code_id.to_string(),
        method,
        secret: secret.expose().to_string(),
        state: CodeState::Active,
        failed_attempts: 0,
        created_at_ms: now,
        expires_at_ms: now.saturating_add(ttl_ms),
        ttl_ms,
        created_by: actor(who),
    };
    let mut batch = store.batch();
    batch.put(Space::Codes, code_id.as_str().as_bytes(), &record)?;
    let method_name = match method {
        CodeMethod::Pin => "pin",
        CodeMethod::Qr => "qr",
    };
    audit(
        anchor,
        &mut batch,
        &actor(who),
        "pairing.mint",
        code_id.as_str(),
        method_name,
    )?;
    trust.commit(batch)?;
    trust.release()?;
    let (code, uri) = match method {
        CodeMethod::Pin => (format!("{code_id}-{}", secret.expose()), None),
        CodeMethod::Qr => {
            let uri = QrPayload {
                anchor: public_addr(anchor),
                code_id: code_id.clone(),
                secret,
                ca_fingerprint: anchor.shared.ca.fingerprint(),
            }
            .to_uri();
            (uri.clone(), Some(uri))
        }
    };
    anchor.shared.metrics.pairing_outcome("code_minted");
    Ok(Minted { record, code, uri })
}

/// The address put into QR codes: configured, else the bound QUIC address (with this host's
/// name when bound to all interfaces).
pub fn public_addr(anchor: &Anchor) -> String {
    if let Some(a) = &anchor.shared.config.public_addr {
        return a.clone();
    }
    let bound = anchor
        .shared
        .bound
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .unwrap_or(anchor.shared.config.listen);
    if bound.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    }
}

/// Renders text as a terminal QR code (Unicode half blocks).
pub fn qr_text(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// Renders text as an SVG QR code.
pub fn qr_svg(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(256, 256)
            .quiet_zone(true)
            .build(),
    )
}

/// The request `request_id` if it still waits for a decision at `now_ms`.
fn pending_request(
    store: &crate::store::Store,
    request_id: &str,
    now_ms: u64,
) -> Result<RequestRecord, TrustError> {
    let req: RequestRecord = store
        .get(Space::Requests, request_id.as_bytes())?
        .ok_or_else(|| TrustError::NotFound(format!("pairing request {request_id}")))?;
    match request_state(&req, now_ms) {
        anchorage_console::api::RequestState::PendingApproval => Ok(req),
        anchorage_console::api::RequestState::Expired => Err(TrustError::Expired(format!(
            "pairing request {request_id} expired"
        ))),
        other => Err(TrustError::Conflict(format!(
            "pairing request {request_id} is already {}",
            other.as_str()
        ))),
    }
}

/// Approves a pending request: signs the CSR, records the device, wakes the node's stream.
pub fn approve(
    anchor: &Anchor,
    who: &Principal,
    request_id: &str,
) -> Result<RequestRecord, TrustError> {
    let (record, replaced) = {
        let mut trust = anchor.trust();
        let store = &anchor.shared.store;
        let now_ms = anchor.now_ms();
        let mut req = pending_request(store, request_id, now_ms)?;
        let existing: Option<DeviceRecord> = store.get(Space::Devices, req.device_id.as_bytes())?;
        if matches!(&existing, Some(d) if d.trust == DeviceTrust::Revoked) {
            return Err(TrustError::Conflict(format!(
                "device {} is revoked; remove it before pairing it again",
                req.device_id
            )));
        }
        let issued = anchor
            .shared
            .ca
            .sign_csr(
                &req.csr_der,
                &req.device_name,
                anchor.shared.config.cert_validity,
                anchor.now(),
            )
            .map_err(|e| TrustError::Pki(e.to_string()))?;
        let device = DeviceRecord {
            device_id: req.device_id,
            name: req.device_name.clone(),
            platform: req.platform.clone(),
            trust: DeviceTrust::Trusted,
            cert_serial: issued.info.serial.clone(),
            cert_der: issued.der.to_vec(),
            cert_not_before_ms: crate::clock::to_ms(issued.info.not_before),
            cert_not_after_ms: crate::clock::to_ms(issued.info.not_after),
            paired_at_ms: existing.as_ref().map_or(now_ms, |d| d.paired_at_ms),
            revoked_at_ms: None,
            revoked_reason: None,
            rotation_pending: false,
        };
        req.state = RequestState::Approved;
        req.cert_der = Some(issued.der.to_vec());
        req.decided_by = Some(actor(who));
        req.decided_at_ms = Some(now_ms);
        let mut batch = store.batch();
        batch.put(Space::Requests, request_id.as_bytes(), &req)?;
        batch.put(Space::Devices, req.device_id.as_bytes(), &device)?;
        let replaced = existing.map(|old| old.cert_serial);
        if let Some(old) = &replaced {
            batch.put(
                Space::Revocations,
                &serial_revocation_key(old),
                &RevocationRecord {
                    at_ms: now_ms,
                    reason: "replaced by a new pairing".into(),
                },
            )?;
        }
        audit(
            anchor,
            &mut batch,
            &actor(who),
            "pairing.approve",
            request_id,
            &req.device_id.to_string(),
        )?;
        trust.commit(batch)?;
        if let Some(old) = &replaced {
            anchor.shared.revocation.revoke_serial(old.clone());
        }
        trust.release()?;
        (req, replaced)
    };
    if replaced.is_some() {
        crate::session::close_session(
            anchor,
            &record.device_id,
            ErrorCode::Replaced,
            "device paired again",
        );
    }
    wake(anchor, request_id);
    anchor.shared.metrics.pairing_outcome("approved");
    anchor.publish(
        "pairing.decided",
        Some(&record.device_id),
        serde_json::json!({"request_id": request_id, "state": "approved"}),
    );
    Ok(record)
}

/// Rejects a pending request.
pub fn reject(
    anchor: &Anchor,
    who: &Principal,
    request_id: &str,
    reason: Option<String>,
) -> Result<RequestRecord, TrustError> {
    let record = {
        let mut trust = anchor.trust();
        let store = &anchor.shared.store;
        let mut req = pending_request(store, request_id, anchor.now_ms())?;
        let reason: String = reason
            .unwrap_or_else(|| "rejected by operator".into())
            .chars()
            .take(512)
            .collect();
        req.state = RequestState::Rejected;
        req.decided_by = Some(actor(who));
        req.decided_at_ms = Some(anchor.now_ms());
        req.reason = Some(reason.clone());
        let mut batch = store.batch();
        batch.put(Space::Requests, request_id.as_bytes(), &req)?;
        audit(
            anchor,
            &mut batch,
            &actor(who),
            "pairing.reject",
            request_id,
            &reason,
        )?;
        trust.commit(batch)?;
        trust.release()?;
        req
    };
    wake(anchor, request_id);
    anchor.shared.metrics.pairing_outcome("rejected");
    anchor.publish(
        "pairing.decided",
        Some(&record.device_id),
        serde_json::json!({"request_id": request_id, "state": "rejected"}),
    );
    Ok(record)
}

fn waiter(anchor: &Anchor, request_id: &str) -> Arc<Notify> {
    anchor
        .shared
        .request_waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(request_id.to_string())
        .or_default()
        .clone()
}

fn wake(anchor: &Anchor, request_id: &str) {
    let notify = anchor
        .shared
        .request_waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(request_id)
        .cloned();
    if let Some(n) = notify {
        n.notify_waiters();
    }
}

fn forget_waiter(anchor: &Anchor, request_id: &str) {
    anchor
        .shared
        .request_waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(request_id);
}

/// Serves one bootstrap connection: a single pairing stream.
pub async fn serve_bootstrap(anchor: Anchor, conn: quinn::Connection) {
    let Ok(Ok((send, recv))) = tokio::time::timeout(STEP_TIMEOUT, conn.accept_bi()).await else {
        fr::close(&conn, ErrorCode::Timeout, "no pairing stream");
        return;
    };
    let (mut tx, mut rx) = framed::<BootstrapResponse, BootstrapRequest>(send, recv);
    let outcome = match step(&mut rx).await {
        Ok(BootstrapRequest::Hello(hello)) => fresh(&anchor, &conn, &mut tx, &mut rx, hello).await,
        Ok(BootstrapRequest::Resume(resume)) => {
            resume_pairing(&anchor, &conn, &mut tx, &mut rx, resume).await
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
            anchor.shared.metrics.pairing_outcome(fail.reason.name());
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Fail::internal)?
}

async fn fresh(
    anchor: &Anchor,
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
        let a = anchor.clone();
        let id = code_id.clone();
        blocking(move || {
            a.shared
                .store
                .get::<CodeRecord>(Space::Codes, id.as_str().as_bytes())
                .map_err(Fail::internal)
        })
        .await?
    }
    .ok_or_else(|| Fail::new(PairFailure::UnknownCode, "no such pairing code"))?;
    check_code_usable(&code, anchor.now_ms())?;

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
        let a = anchor.clone();
        let id = code_id.clone();
        blocking(move || record_attempt(&a, &id, correct)).await?;
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
        let a = anchor.clone();
        let sas = keys.sas().to_string();
        let after = keys.after().clone();
        let request_id = keys.request_id().to_string();
        let code = code.clone();
        blocking(move || create_request(&a, &code, csr, request_id, sas, after)).await?
    };
    info!(request_id = %request.request_id, device_id = %request.device_id, sas = %request.sas, "pairing request waits for approval");
    anchor.publish(
        "pairing.requested",
        Some(&request.device_id),
        serde_json::json!({
            "request_id": request.request_id,
            "device_name": request.device_name,
            "sas": request.sas,
        }),
    );
    send(
        tx,
        BootstrapResponse::Pending(PairPending {
            request_id: request.request_id.clone(),
            sas: request.sas.clone(),
            expires_at_ms: request.expires_at_ms,
        }),
    )
    .await?;
    wait_decision(anchor, conn, tx, rx, &request.request_id).await
}

fn check_code_usable(code: &CodeRecord, now_ms: u64) -> Result<(), Fail> {
    use anchorage_console::api::CodeState as S;
    match code_state(code, now_ms) {
        S::Active => Ok(()),
        S::Expired => Err(Fail::new(
            PairFailure::CodeExpired,
            "the pairing code has expired",
        )),
        S::Consumed => Err(Fail::new(
            PairFailure::CodeConsumed,
            "the pairing code was already used",
        )),
        S::Burned => Err(Fail::new(
            PairFailure::CodeBurned,
            "the pairing code was burned after too many wrong attempts",
        )),
    }
}

/// Counts a wrong secret (burning the code at the limit), or consumes the code.
fn record_attempt(anchor: &Anchor, code_id: &CodeId, correct: bool) -> Result<(), Fail> {
    let mut trust = anchor.trust();
    let store = &anchor.shared.store;
    let mut code: CodeRecord = store
        .get(Space::Codes, code_id.as_str().as_bytes())
        .map_err(Fail::internal)?
        .ok_or_else(|| Fail::new(PairFailure::UnknownCode, "no such pairing code"))?;
    // Another session may have consumed or burned it meanwhile.
    check_code_usable(&code, anchor.now_ms())?;
    let mut batch = store.batch();
    let result = if correct {
        code.state = CodeState::Consumed;
        code.secret.clear();
        Ok(())
    } else {
        code.failed_attempts += 1;
        if code.failed_attempts >= anchor.shared.config.pairing_max_attempts {
            code.state = CodeState::Burned;
            code.secret.clear();
            audit(
                anchor,
                &mut batch,
                "anchor",
                "pairing.burn",
                code_id.as_str(),
                "too many wrong secrets",
            )
            .map_err(Fail::internal)?;
            Err(Fail::new(
                PairFailure::CodeBurned,
                "wrong code; too many attempts, the code is now burned",
            ))
        } else {
            Err(Fail::new(PairFailure::WrongSecret, "wrong pairing code"))
        }
    };
    batch
        .put(Space::Codes, code_id.as_str().as_bytes(), &code)
        .map_err(Fail::internal)?;
    trust.commit(batch).map_err(Fail::internal)?;
    trust.release().map_err(Fail::internal)?;
    result
}

fn create_request(
    anchor: &Anchor,
    code: &CodeRecord,
    csr: CsrSubmit,
    request_id: String,
    sas: String,
    keys: AfterKeys,
) -> Result<RequestRecord, Fail> {
    let device_id: DeviceId = csr_device_id_checked(&csr.csr_der)
        .map_err(|e| Fail::new(PairFailure::BadCsr, e.to_string()))?;
    let mut trust = anchor.trust();
    let store = &anchor.shared.store;
    if let Some(d) = store
        .get::<DeviceRecord>(Space::Devices, device_id.as_bytes())
        .map_err(Fail::internal)?
        && d.trust == DeviceTrust::Revoked
    {
        return Err(Fail::new(
            PairFailure::DeviceRevoked,
            "this device is revoked; an operator must remove it before it can pair again",
        ));
    }
    if store
        .get::<RequestRecord>(Space::Requests, request_id.as_bytes())
        .map_err(Fail::internal)?
        .is_some()
    {
        return Err(Fail::new(
            PairFailure::ProtocolViolation,
            "request already exists",
        ));
    }
    let now = anchor.now_ms();
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(64).collect() };
    let request = RequestRecord {
        request_id: request_id.clone(),
        code_id: code.code_id.clone(),
        device_id,
        device_name: clean(&csr.device_name),
        platform: clean(&csr.platform),
        csr_der: csr.csr_der,
        sas,
        keys,
        state: RequestState::PendingApproval,
        requested_at_ms: now,
        expires_at_ms: now.saturating_add(code.ttl_ms),
        cert_der: None,
        decided_by: None,
        decided_at_ms: None,
        reason: None,
    };
    let mut batch = store.batch();
    batch
        .put(Space::Requests, request_id.as_bytes(), &request)
        .map_err(Fail::internal)?;
    audit(
        anchor,
        &mut batch,
        "anchor",
        "pairing.request",
        &request_id,
        &device_id.to_string(),
    )
    .map_err(Fail::internal)?;
    trust.commit(batch).map_err(Fail::internal)?;
    trust.release().map_err(Fail::internal)?;
    Ok(request)
}

async fn resume_pairing(
    anchor: &Anchor,
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
        let a = anchor.clone();
        let id = resume.request_id.clone();
        blocking(move || {
            a.shared
                .store
                .get::<RequestRecord>(Space::Requests, id.as_bytes())
                .map_err(Fail::internal)
        })
        .await?
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
    if request_state(&req, anchor.now_ms()) == anchorage_console::api::RequestState::PendingApproval
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
    wait_decision(anchor, conn, tx, rx, &req.request_id).await
}

async fn wait_decision(
    anchor: &Anchor,
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    request_id: &str,
) -> Result<(), Fail> {
    use anchorage_console::api::RequestState as S;
    let notify = waiter(anchor, request_id);
    let result = loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let req = {
            let a = anchor.clone();
            let id = request_id.to_string();
            blocking(move || {
                a.shared
                    .store
                    .get::<RequestRecord>(Space::Requests, id.as_bytes())
                    .map_err(Fail::internal)
            })
            .await?
        }
        .ok_or_else(|| Fail::new(PairFailure::UnknownRequest, "no such pairing request"))?;
        match request_state(&req, anchor.now_ms()) {
            S::PendingApproval => {
                let left = req.expires_at_ms.saturating_sub(anchor.now_ms());
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
                let ca_der = anchor.shared.ca.cert_der().to_vec();
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
                    let a = anchor.clone();
                    let id = request_id.to_string();
                    blocking(move || mark_completed(&a, &id)).await?;
                    anchor.shared.metrics.pairing_outcome("completed");
                    anchor.publish(
                        "pairing.completed",
                        Some(&req.device_id),
                        serde_json::json!({"request_id": request_id}),
                    );
                }
                break Ok(());
            }
        }
    };
    if !matches!(&result, Err(f) if f.message.is_empty()) {
        forget_waiter(anchor, request_id);
    }
    result
}

fn mark_completed(anchor: &Anchor, request_id: &str) -> Result<(), Fail> {
    let _trust = anchor.trust();
    let store = &anchor.shared.store;
    if let Some(mut req) = store
        .get::<RequestRecord>(Space::Requests, request_id.as_bytes())
        .map_err(Fail::internal)?
        && req.state == RequestState::Approved
    {
        req.state = RequestState::Completed;
        store
            .put(
                Space::Requests,
                request_id.as_bytes(),
                &req,
                Durability::Flush,
            )
            .map_err(Fail::internal)?;
    }
    Ok(())
}
