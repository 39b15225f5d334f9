//! The pairing (bootstrap) stream, on [`ALPN_BOOTSTRAP`](crate::ALPN_BOOTSTRAP).
//!
//! The node opens exactly one bidirectional stream and drives it with [`BootstrapRequest`]s; the
//! anchor answers each with a [`BootstrapResponse`]. A fresh pairing runs:
//!
//! ```text
//! node                                   anchor
//!  Hello { code_id, spake_msg }  ───────▶
//!                                ◀─────── Challenge { spake_msg }
//!  Confirm { mac }               ───────▶   (wrong secret: Failed, attempt counted)
//!                                ◀─────── Confirm { mac }
//!  Csr { csr_der, name, .. }     ───────▶
//!                                ◀─────── Pending { request_id, sas, expires_at_ms }
//!                 ... operator approves or rejects ...
//!                                ◀─────── Approved { cert_der, ca_der, mac } | Failed
//! ```
//!
//! A node whose stream dropped while pending opens a new connection and sends
//! [`BootstrapRequest::Resume`] with the request id and a proof derived from the PAKE key and
//! bound to the new TLS session; the anchor answers `Pending`, `Approved` or `Failed` as above.

use serde::{Deserialize, Serialize};

use crate::{LimitError, check_lengths, limits::*};

/// Bytes of every MAC and proof on this stream (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Largest SPAKE2 message accepted (an Ed25519 point plus the side byte is 33).
pub const MAX_SPAKE_LEN: usize = 64;
/// Longest pairing code id.
pub const MAX_CODE_ID_LEN: usize = 32;

/// A message from the node on the bootstrap stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum BootstrapRequest {
    /// Start a pairing: the code to use and the node's SPAKE2 message.
    Hello(PairHello),
    /// The node's key confirmation.
    Confirm(KeyConfirm),
    /// The node's certificate signing request, once both sides confirmed the key.
    Csr(CsrSubmit),
    /// Reattach to a pending request after the stream dropped.
    Resume(PairResume),
}

/// A message from the anchor on the bootstrap stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum BootstrapResponse {
    /// The anchor's SPAKE2 message.
    Challenge(PairChallenge),
    /// The anchor's key confirmation, sent only after the node's verified.
    Confirm(KeyConfirm),
    /// The request waits for an operator.
    Pending(PairPending),
    /// The operator approved: the node's certificate and the CA.
    Approved(PairApproved),
    /// Pairing ended without a certificate.
    Failed(PairFailed),
}

/// First message of a pairing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PairHello {
    /// The node's protocol version ([`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION)).
    pub version: u16,
    /// Public id of the pairing code (the part before the dash of a PIN).
    pub code_id: String,
    /// The node's SPAKE2 message (side A).
    pub spake_msg: Vec<u8>,
}

/// The anchor's answer to [`PairHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PairChallenge {
    /// The anchor's protocol version.
    pub version: u16,
    /// The anchor's SPAKE2 message (side B).
    pub spake_msg: Vec<u8>,
}

/// Key confirmation: an HMAC over the pairing transcript with a key derived from the PAKE key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KeyConfirm {
    /// The MAC.
    pub mac: [u8; MAC_LEN],
}

/// The node's certificate signing request and how it wants to be known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CsrSubmit {
    /// PKCS#10 CSR, DER, signed by the node's own key.
    pub csr_der: Vec<u8>,
    /// Human name for the device.
    pub device_name: String,
    /// Platform string, e.g. `linux-x86_64`.
    pub platform: String,
    /// MAC over the CSR and names with the PAKE-derived key.
    pub mac: [u8; MAC_LEN],
}

/// Reattach to a pending request on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PairResume {
    /// The node's protocol version.
    pub version: u16,
    /// The request id the anchor gave in [`PairPending`].
    pub request_id: String,
    /// HMAC, with the PAKE-derived resume key, over the request id and this connection's
    /// TLS exporter, so a recorded proof cannot be replayed on another connection.
    pub proof: [u8; MAC_LEN],
}

/// The request is recorded and waits for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PairPending {
    /// Id of the pairing request, for the operator and for resuming.
    pub request_id: String,
    /// Short authentication string, shown on both sides for the operator to compare.
    pub sas: String,
    /// When the request expires, Unix milliseconds.
    pub expires_at_ms: u64,
}

/// The operator approved; here is the node's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PairApproved {
    /// The device id the anchor derived from the CSR's public key (display form).
    pub device_id: String,
    /// The node's client certificate, DER.
    pub cert_der: Vec<u8>,
    /// The anchor CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// HMAC with the PAKE-derived key over request id, certificate and CA.
    pub mac: [u8; MAC_LEN],
}

/// Pairing ended without a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PairFailed {
    /// Why, as a stable reason.
    pub reason: PairFailure,
    /// Human-readable detail (never secrets or internals).
    pub message: String,
}

/// Stable reasons a pairing fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum PairFailure {
    /// No such code.
    UnknownCode,
    /// The code's TTL passed.
    CodeExpired,
    /// The code was already used.
    CodeConsumed,
    /// Too many wrong secrets; the code is burned.
    CodeBurned,
    /// The secret did not match (key confirmation failed).
    WrongSecret,
    /// An operator rejected the request.
    Rejected,
    /// The request expired before an operator decided.
    RequestExpired,
    /// No such request, or the resume proof did not verify.
    UnknownRequest,
    /// The device is revoked and must be removed by an operator before pairing again.
    DeviceRevoked,
    /// The CSR was malformed or its signature did not verify.
    BadCsr,
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// A message arrived out of order.
    ProtocolViolation,
    /// Too many pairings in progress; try again later.
    Overloaded,
    /// The anchor failed internally.
    Internal,
}

impl PairFailure {
    /// A short, stable, snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            PairFailure::UnknownCode => "unknown_code",
            PairFailure::CodeExpired => "code_expired",
            PairFailure::CodeConsumed => "code_consumed",
            PairFailure::CodeBurned => "code_burned",
            PairFailure::WrongSecret => "wrong_secret",
            PairFailure::Rejected => "rejected",
            PairFailure::RequestExpired => "request_expired",
            PairFailure::UnknownRequest => "unknown_request",
            PairFailure::DeviceRevoked => "device_revoked",
            PairFailure::BadCsr => "bad_csr",
            PairFailure::UnsupportedVersion => "unsupported_version",
            PairFailure::ProtocolViolation => "protocol_violation",
            PairFailure::Overloaded => "overloaded",
            PairFailure::Internal => "internal",
        }
    }
}

impl std::fmt::Display for PairFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl BootstrapRequest {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            BootstrapRequest::Hello(h) => check_lengths(&[
                ("code_id", h.code_id.len(), MAX_CODE_ID_LEN),
                ("spake_msg", h.spake_msg.len(), MAX_SPAKE_LEN),
            ]),
            BootstrapRequest::Confirm(_) => Ok(()),
            BootstrapRequest::Csr(c) => check_lengths(&[
                ("csr_der", c.csr_der.len(), MAX_CERT_LEN),
                ("device_name", c.device_name.len(), MAX_NAME_LEN),
                ("platform", c.platform.len(), MAX_NAME_LEN),
            ]),
            BootstrapRequest::Resume(r) => {
                check_lengths(&[("request_id", r.request_id.len(), MAX_NAME_LEN)])
            }
        }
    }
}

impl BootstrapResponse {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            BootstrapResponse::Challenge(c) => {
                check_lengths(&[("spake_msg", c.spake_msg.len(), MAX_SPAKE_LEN)])
            }
            BootstrapResponse::Confirm(_) => Ok(()),
            BootstrapResponse::Pending(p) => check_lengths(&[
                ("request_id", p.request_id.len(), MAX_NAME_LEN),
                ("sas", p.sas.len(), MAX_NAME_LEN),
            ]),
            BootstrapResponse::Approved(a) => check_lengths(&[
                ("device_id", a.device_id.len(), MAX_NAME_LEN),
                ("cert_der", a.cert_der.len(), MAX_CERT_LEN),
                ("ca_der", a.ca_der.len(), MAX_CERT_LEN),
            ]),
            BootstrapResponse::Failed(f) => {
                check_lengths(&[("message", f.message.len(), MAX_TEXT_LEN)])
            }
        }
    }
}
