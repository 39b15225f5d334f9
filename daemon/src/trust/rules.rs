//! The lifecycles of pairing codes, pairing requests and devices, without IO.
//!
//! Codes: `active → consumed | burned`, and `expired` derived from the time. Requests:
//! `pending_approval → approved → completed`, `→ rejected`, and `expired` derived. Each rule
//! takes the current record and `now` (Unix ms) and returns the next record, or why the step
//! is refused; the trust service runs it inside a store transaction, so two anchors or two
//! operators can never both take the same step.

use anchorage_console::api;

use crate::records::*;

/// Whether `c` reorders text on screen (bidirectional embedding, override and isolate
/// controls, and the invisible direction marks): a name holding one can show reversed.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// A name as a node asked for it, made safe to show: control and bidirectional characters
/// are dropped, and at most `max` characters kept.
pub fn display_name(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !is_bidi_control(*c))
        .take(max)
        .collect()
}

/// Effective state of a code at `now_ms`.
pub fn code_state(code: &CodeRecord, now_ms: u64) -> api::CodeState {
    match code.state {
        CodeState::Consumed => api::CodeState::Consumed,
        CodeState::Burned => api::CodeState::Burned,
        CodeState::Active if now_ms >= code.expires_at_ms => api::CodeState::Expired,
        CodeState::Active => api::CodeState::Active,
    }
}

/// Effective state of a request at `now_ms`.
pub fn request_state(req: &RequestRecord, now_ms: u64) -> api::RequestState {
    match req.state {
        RequestState::PendingApproval if now_ms >= req.expires_at_ms => api::RequestState::Expired,
        RequestState::PendingApproval => api::RequestState::PendingApproval,
        RequestState::Approved => api::RequestState::Approved,
        RequestState::Completed => api::RequestState::Completed,
        RequestState::Rejected => api::RequestState::Rejected,
    }
}

/// Why a code cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeUnusable {
    /// Its TTL passed.
    Expired,
    /// It was used.
    Consumed,
    /// Too many wrong secrets.
    Burned,
}

/// Whether a code can be used at `now_ms`.
pub fn usable(code: &CodeRecord, now_ms: u64) -> Result<(), CodeUnusable> {
    match code_state(code, now_ms) {
        api::CodeState::Active => Ok(()),
        api::CodeState::Expired => Err(CodeUnusable::Expired),
        api::CodeState::Consumed => Err(CodeUnusable::Consumed),
        api::CodeState::Burned => Err(CodeUnusable::Burned),
    }
}

/// What one attempt at a code did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The secret was right: the code is consumed (single use).
    Consumed,
    /// Wrong, with attempts left.
    Wrong,
    /// Wrong, and that was the last attempt: the code is burned.
    Burned,
}

/// An attempt at `code`: the code as it must be stored next, and what happened.
///
/// The secret outlives the code: a dead code's secret opens nothing, and keeping it lets the
/// anchor tell the one node that proves it what became of the code (expired, used, burned)
/// while everyone else gets the answer an unknown code gets.
pub fn attempt(
    code: &CodeRecord,
    correct: bool,
    max_attempts: u32,
    now_ms: u64,
) -> Result<(CodeRecord, Attempt), CodeUnusable> {
    usable(code, now_ms)?;
    let mut next = code.clone();
    let outcome = if correct {
        next.state = CodeState::Consumed;
        Attempt::Consumed
    } else {
        next.failed_attempts += 1;
        if next.failed_attempts >= max_attempts {
            next.state = CodeState::Burned;
            Attempt::Burned
        } else {
            Attempt::Wrong
        }
    };
    Ok((next, outcome))
}

/// Why a decision on a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionRefused {
    /// It expired undecided.
    Expired,
    /// It was decided already (approved, completed or rejected).
    Decided(api::RequestState),
    /// The device is revoked: it must be removed before it pairs again.
    DeviceRevoked,
}

/// Whether `req` still waits for a decision at `now_ms`.
pub fn pending(req: &RequestRecord, now_ms: u64) -> Result<(), DecisionRefused> {
    match request_state(req, now_ms) {
        api::RequestState::PendingApproval => Ok(()),
        api::RequestState::Expired => Err(DecisionRefused::Expired),
        other => Err(DecisionRefused::Decided(other)),
    }
}

/// A certificate issued for an approval.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Serial.
    pub serial: Vec<u8>,
    /// DER.
    pub der: Vec<u8>,
    /// Validity start, Unix ms.
    pub not_before_ms: u64,
    /// Expiry, Unix ms.
    pub not_after_ms: u64,
}

/// An approval: the request and device as they must be stored, and the serial of the
/// device's previous certificate, which a new pairing replaces (and revokes).
#[derive(Debug, Clone)]
pub struct Approval {
    /// The request, now approved.
    pub request: RequestRecord,
    /// The device, trusted with the new certificate.
    pub device: DeviceRecord,
    /// The replaced certificate's serial.
    pub replaced: Option<Vec<u8>>,
}

/// Approves `req` for `existing` (the device's current record, if it was paired before).
pub fn approve(
    req: &RequestRecord,
    existing: Option<&DeviceRecord>,
    issued: Issued,
    actor: &str,
    now_ms: u64,
) -> Result<Approval, DecisionRefused> {
    pending(req, now_ms)?;
    if existing.is_some_and(|d| d.trust == DeviceTrust::Revoked) {
        return Err(DecisionRefused::DeviceRevoked);
    }
    let mut request = req.clone();
    request.state = RequestState::Approved;
    request.cert_der = Some(issued.der.clone());
    request.decided_by = Some(actor.to_string());
    request.decided_at_ms = Some(now_ms);
    let device = DeviceRecord {
        device_id: req.device_id,
        name: req.device_name.clone(),
        platform: req.platform.clone(),
        trust: DeviceTrust::Trusted,
        cert_serial: issued.serial,
        cert_der: issued.der,
        cert_not_before_ms: issued.not_before_ms,
        cert_not_after_ms: issued.not_after_ms,
        paired_at_ms: existing.map_or(now_ms, |d| d.paired_at_ms),
        revoked_at_ms: None,
        revoked_reason: None,
        rotation_pending: false,
    };
    Ok(Approval {
        request,
        device,
        replaced: existing.map(|d| d.cert_serial.clone()),
    })
}

/// Rejects `req` with `reason` (at most 512 characters are kept).
pub fn reject(
    req: &RequestRecord,
    reason: &str,
    actor: &str,
    now_ms: u64,
) -> Result<RequestRecord, DecisionRefused> {
    pending(req, now_ms)?;
    let mut request = req.clone();
    request.state = RequestState::Rejected;
    request.decided_by = Some(actor.to_string());
    request.decided_at_ms = Some(now_ms);
    request.reason = Some(reason.chars().take(512).collect());
    Ok(request)
}

/// The node received its certificate: an approved request is completed (once).
pub fn complete(req: &RequestRecord) -> Option<RequestRecord> {
    (req.state == RequestState::Approved).then(|| {
        let mut r = req.clone();
        r.state = RequestState::Completed;
        r
    })
}

/// Revokes a device; `None` if it was revoked already (nothing changes).
pub fn revoke(device: &DeviceRecord, reason: &str, now_ms: u64) -> Option<DeviceRecord> {
    (device.trust != DeviceTrust::Revoked).then(|| {
        let mut d = device.clone();
        d.trust = DeviceTrust::Revoked;
        d.revoked_at_ms = Some(now_ms);
        d.revoked_reason = Some(reason.to_string());
        d
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anchorage_mesh::DeviceId;
    use anchorage_mesh::pairing::AfterKeys;

    fn code() -> CodeRecord {
        CodeRecord {
            code_id: "ABCD".into(),
            method: CodeMethod::Pin,
            secret: "123456".into(),
            state: CodeState::Active,
            failed_attempts: 0,
            created_at_ms: 0,
            expires_at_ms: 1_000,
            ttl_ms: 1_000,
            created_by: "op".into(),
        }
    }

    fn request() -> RequestRecord {
        RequestRecord {
            request_id: "req_1".into(),
            code_id: "ABCD".into(),
            device_id: DeviceId::from_bytes([1; anchorage_mesh::identity::DEVICE_ID_LEN]),
            device_name: "n".into(),
            platform: "linux".into(),
            csr_der: vec![],
            sas: "1".into(),
            keys: AfterKeys {
                result: [0; 32],
                resume: [0; 32],
            },
            state: RequestState::PendingApproval,
            requested_at_ms: 0,
            expires_at_ms: 1_000,
            cert_der: None,
            decided_by: None,
            decided_at_ms: None,
            reason: None,
        }
    }

    fn issued() -> Issued {
        Issued {
            serial: vec![9],
            der: vec![1],
            not_before_ms: 0,
            not_after_ms: 10,
        }
    }

    #[test]
    fn wrong_secrets_burn_a_code_at_the_limit() {
        let (c, a) = attempt(&code(), false, 3, 10).unwrap();
        assert_eq!((a, c.failed_attempts), (Attempt::Wrong, 1));
        let (c, a) = attempt(&c, false, 3, 20).unwrap();
        assert_eq!(a, Attempt::Wrong);
        let (c, a) = attempt(&c, false, 3, 30).unwrap();
        assert_eq!(a, Attempt::Burned);
        assert_eq!(c.state, CodeState::Burned);
        // Even the right secret is refused now.
        assert_eq!(attempt(&c, true, 3, 40).unwrap_err(), CodeUnusable::Burned);
    }

    #[test]
    fn a_code_is_consumed_once_and_expires_by_time() {
        let (c, a) = attempt(&code(), true, 3, 10).unwrap();
        assert_eq!(a, Attempt::Consumed);
        assert_eq!(c.state, CodeState::Consumed);
        assert_eq!(
            attempt(&c, true, 3, 20).unwrap_err(),
            CodeUnusable::Consumed
        );
        assert_eq!(
            attempt(&code(), true, 3, 1_000).unwrap_err(),
            CodeUnusable::Expired
        );
        assert_eq!(code_state(&code(), 999), api::CodeState::Active);
    }

    #[test]
    fn a_request_is_decided_once_and_not_after_it_expired() {
        let a = approve(&request(), None, issued(), "op", 10).unwrap();
        assert_eq!(a.request.state, RequestState::Approved);
        assert_eq!(a.device.trust, DeviceTrust::Trusted);
        assert!(a.replaced.is_none());
        assert_eq!(
            approve(&a.request, None, issued(), "op", 20).unwrap_err(),
            DecisionRefused::Decided(api::RequestState::Approved)
        );
        assert_eq!(
            reject(&a.request, "no", "op", 20).unwrap_err(),
            DecisionRefused::Decided(api::RequestState::Approved)
        );
        assert_eq!(
            approve(&request(), None, issued(), "op", 1_000).unwrap_err(),
            DecisionRefused::Expired
        );
        let done = complete(&a.request).unwrap();
        assert_eq!(done.state, RequestState::Completed);
        assert!(complete(&done).is_none());
    }

    #[test]
    fn pairing_again_replaces_the_old_certificate_but_not_for_a_revoked_device() {
        let first = approve(&request(), None, issued(), "op", 10).unwrap();
        let mut old = first.device.clone();
        old.cert_serial = vec![1, 2];
        old.paired_at_ms = 3;
        let again = approve(&request(), Some(&old), issued(), "op", 20).unwrap();
        assert_eq!(again.replaced, Some(vec![1, 2]));
        assert_eq!(again.device.paired_at_ms, 3);
        let revoked = revoke(&old, "lost", 30).unwrap();
        assert!(revoke(&revoked, "again", 40).is_none());
        assert_eq!(
            approve(&request(), Some(&revoked), issued(), "op", 50).unwrap_err(),
            DecisionRefused::DeviceRevoked
        );
    }

    #[test]
    fn rejection_reasons_are_bounded() {
        let r = reject(&request(), &"x".repeat(2_000), "op", 10).unwrap();
        assert_eq!(r.reason.map(|s| s.len()), Some(512));
    }

    #[test]
    fn names_lose_control_and_direction_characters() {
        assert_eq!(display_name("cam\u{202E}gpj.exe", 64), "camgpj.exe");
        assert_eq!(display_name("a\u{2066}b\u{2069}\n\u{7}c", 64), "abc");
        assert_eq!(display_name("ünïcødé ok", 64), "ünïcødé ok");
        assert_eq!(display_name(&"x".repeat(100), 64).len(), 64);
    }
}
