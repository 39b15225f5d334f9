//! Records kept in the store. Every value is postcard with a schema-version byte in front
//! (see [`crate::store`]). Fields are appended only at the end of a schema version bump.
//!
//! Times are Unix milliseconds.

use anchorage_mesh::DeviceId;
use anchorage_mesh::pairing::AfterKeys;
use serde::{Deserialize, Serialize};

/// How a code is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeMethod {
    /// Typed PIN.
    Pin,
    /// Scanned QR URI.
    Qr,
}

/// Lifecycle of a pairing code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeState {
    /// Usable.
    Active,
    /// Used.
    Consumed,
    /// Burned after too many wrong secrets.
    Burned,
}

/// A pairing code. The secret is kept (SPAKE2 needs it) until the code ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    /// Public id.
    pub code_id: String,
    /// PIN or QR.
    pub method: CodeMethod,
    /// The secret; cleared once the code is consumed or burned.
    pub secret: String,
    /// State (expiry is derived from `expires_at_ms`).
    pub state: CodeState,
    /// Wrong secrets so far.
    pub failed_attempts: u32,
    /// Minted.
    pub created_at_ms: u64,
    /// Expires.
    pub expires_at_ms: u64,
    /// TTL it was minted with (pending requests expire after the same).
    pub ttl_ms: u64,
    /// Who minted it.
    pub created_by: String,
}

/// Lifecycle of a pairing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestState {
    /// Waiting for an operator.
    PendingApproval,
    /// Approved, certificate issued, not yet delivered.
    Approved,
    /// Delivered.
    Completed,
    /// Rejected.
    Rejected,
}

/// A pairing request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Id.
    pub request_id: String,
    /// Code used.
    pub code_id: String,
    /// Device id of the CSR's key.
    pub device_id: DeviceId,
    /// Name asked for.
    pub device_name: String,
    /// Platform.
    pub platform: String,
    /// The CSR, DER.
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
    /// SAS.
    pub sas: String,
    /// Keys for the result MAC and resume proofs.
    pub keys: AfterKeys,
    /// State (expiry is derived from `expires_at_ms`).
    pub state: RequestState,
    /// Requested.
    pub requested_at_ms: u64,
    /// Expires if undecided.
    pub expires_at_ms: u64,
    /// Issued certificate, once approved.
    #[serde(with = "serde_bytes")]
    pub cert_der: Option<Vec<u8>>,
    /// Who decided.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at_ms: Option<u64>,
    /// Why (rejections).
    pub reason: Option<String>,
}

/// Trust of a device in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceTrust {
    /// Has a valid certificate.
    Trusted,
    /// Revoked.
    Revoked,
}

/// A device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Id.
    pub device_id: DeviceId,
    /// Name.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Trust.
    pub trust: DeviceTrust,
    /// Current certificate serial.
    #[serde(with = "serde_bytes")]
    pub cert_serial: Vec<u8>,
    /// Current certificate, DER.
    #[serde(with = "serde_bytes")]
    pub cert_der: Vec<u8>,
    /// Current certificate's start.
    pub cert_not_before_ms: u64,
    /// Current certificate's expiry.
    pub cert_not_after_ms: u64,
    /// First paired.
    pub paired_at_ms: u64,
    /// Revoked.
    pub revoked_at_ms: Option<u64>,
    /// Why.
    pub revoked_reason: Option<String>,
    /// An operator asked for a rotation not yet done.
    pub rotation_pending: bool,
}

/// Labels an operator set on a device (`key` → `value`, validated by `wire::labels`).
pub type Labels = std::collections::BTreeMap<String, String>;

/// A revocation: of a whole device (`d/` keys) or of one certificate serial (`s/` keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// When.
    pub at_ms: u64,
    /// Why.
    pub reason: String,
}

/// A console token. Only a SHA-256 of its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Id (public part of the token).
    pub id: String,
    /// Name.
    pub name: String,
    /// SHA-256 of the secret part.
    pub secret_hash: [u8; 32],
    /// Permission names.
    pub permissions: Vec<String>,
    /// Created.
    pub created_at_ms: u64,
    /// By whom.
    pub created_by: String,
    /// Revoked.
    pub revoked_at_ms: Option<u64>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When.
    pub at_ms: u64,
    /// Who (token name and id, or `anchor`).
    pub actor: String,
    /// What, e.g. `pairing.mint`, `pairing.approve`, `device.revoke`.
    pub action: String,
    /// The thing acted on.
    pub target: String,
    /// Details.
    pub detail: String,
}

/// A capability as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityRecord {
    /// Name.
    pub name: String,
    /// Available at last report.
    pub available: bool,
    /// Why not.
    pub reason: Option<String>,
    /// One line.
    pub description: String,
}

/// A node's last registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Device.
    pub device_id: DeviceId,
    /// Name it registered with.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Agent version.
    pub agent_version: String,
    /// Capabilities.
    pub capabilities: Vec<CapabilityRecord>,
    /// First registration.
    pub first_registered_at_ms: u64,
    /// Latest registration.
    pub registered_at_ms: u64,
}

/// Who holds a node's session in a cluster of anchors: written by the holder under its
/// lease (so it lapses when that anchor dies), rewritten when the node's presence changes
/// there, removed when the session ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The holding anchor's instance id.
    pub instance: String,
    /// When the session registered, Unix ms.
    pub since_ms: u64,
    /// The node's presence as its holder evaluates it.
    pub presence: anchorage_wire::Presence,
}

/// One sample of a connected node's link, taken by the history service every interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistorySample {
    /// When, Unix ms.
    pub at_ms: u64,
    /// QUIC's smoothed round-trip time, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Heartbeat loss over the recent window, 0 to 1 (none before enough heartbeats).
    pub loss: Option<f64>,
    /// Milliseconds since the last heartbeat or registration.
    pub heartbeat_age_ms: Option<u64>,
    /// Presence at the sample.
    pub presence: anchorage_wire::Presence,
}

/// One entry of a device's history, stored under the device id, its time and its kind (so a
/// device's entries are one key range, oldest first).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum HistoryEntry {
    /// A sample of the live session.
    Sample(HistorySample),
    /// The device's presence changed to `presence` at `at_ms` (Unix ms).
    Presence {
        /// When.
        at_ms: u64,
        /// The presence from then on.
        presence: anchorage_wire::Presence,
    },
}

impl HistoryEntry {
    /// When it happened, Unix ms.
    pub fn at_ms(&self) -> u64 {
        match self {
            HistoryEntry::Sample(s) => s.at_ms,
            HistoryEntry::Presence { at_ms, .. } => *at_ms,
        }
    }

    /// Its kind as stored in its key: 0 a sample, 1 a presence change.
    pub fn kind(&self) -> u8 {
        match self {
            HistoryEntry::Sample(_) => 0,
            HistoryEntry::Presence { .. } => 1,
        }
    }
}

/// Last-seen of a node, written in batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// Last heartbeat or registration.
    pub last_seen_ms: u64,
    /// The last session ended with a clean `stopping`.
    pub stopped_cleanly: bool,
}

/// State of an invocation: the one definition in `anchorage-wire` (stored as its postcard
/// variant index, which the wire crate's golden tests pin).
pub use anchorage_wire::InvocationState;

/// An invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Id: a UUID v7, whose first 48 bits are the creation time in ms, so keys sort by age (ids
    /// written before the UUIDs carried the time in their first 8 bytes, and sort first).
    pub id: [u8; 16],
    /// Target.
    pub device_id: DeviceId,
    /// Capability.
    pub capability: String,
    /// Input JSON.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// State.
    pub state: InvocationState,
    /// Who asked.
    pub requested_by: String,
    /// Created.
    pub created_at_ms: u64,
    /// Deadline.
    pub deadline_ms: u64,
    /// Dispatched (last time).
    pub dispatched_at_ms: Option<u64>,
    /// Finished.
    pub finished_at_ms: Option<u64>,
    /// Output (up to the limit).
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
    /// Output was truncated.
    pub truncated: bool,
    /// Error detail.
    pub error: Option<String>,
    /// Time on the node.
    pub duration_ms: Option<u64>,
}

impl InvocationRecord {
    /// A new invocation, `queued`, created at `now_ms` and due by `deadline_ms`.
    pub fn queued(
        id: [u8; 16],
        device_id: DeviceId,
        capability: String,
        input: Vec<u8>,
        requested_by: String,
        now_ms: u64,
        deadline_ms: u64,
    ) -> InvocationRecord {
        InvocationRecord {
            id,
            device_id,
            capability,
            input,
            state: InvocationState::Queued,
            requested_by,
            created_at_ms: now_ms,
            deadline_ms,
            dispatched_at_ms: None,
            finished_at_ms: None,
            output: Vec::new(),
            truncated: false,
            error: None,
            duration_ms: None,
        }
    }
}

/// One device of a batch: its invocation id is chosen when the batch is created, so the batch
/// is written once and an invocation started after a restart keeps the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMember {
    /// Device.
    pub device_id: DeviceId,
    /// Its name then.
    pub name: String,
    /// Its invocation.
    pub invocation_id: [u8; 16],
}

/// A batch: one capability on every device a selector matched at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Id (a UUID v7, so keys sort by age).
    pub id: [u8; 16],
    /// Selector, as given.
    pub selector: String,
    /// Capability.
    pub capability: String,
    /// Input JSON of every invocation.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
    /// Who asked (`name (token id)`).
    pub requested_by: String,
    /// Created.
    pub created_at_ms: u64,
    /// Deadline of every invocation.
    pub deadline_ms: u64,
    /// At most this many unfinished at once.
    pub max_concurrency: Option<u32>,
    /// The devices, in device id order.
    pub members: Vec<BatchMember>,
    /// When the last invocation ended (then the batch is not resumed at start-up).
    pub finished_at_ms: Option<u64>,
}

/// What limits a token beyond its permissions, and when it ends. Kept beside the
/// [`TokenRecord`] (tokens written before scopes existed have none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TokenLimits {
    /// Label selector, as given (empty: every device).
    pub selector: String,
    /// Capability patterns (empty: every capability).
    pub capabilities: Vec<String>,
    /// Stops working then.
    pub expires_at_ms: Option<u64>,
}

/// One version of the mesh policy, as an operator set it (the parsed rules are not stored:
/// the text is parsed again when read, so what is in force is always what `policy show`
/// prints). Kept in [`crate::store::kv::Space::Policy`] by version, the newest
/// [`crate::store::POLICY_HISTORY`] of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// 1 for the first policy set, one more for each change (0 is the empty default, never
    /// stored).
    pub version: u64,
    /// The TOML file as written.
    pub text: String,
    /// When it was set.
    pub updated_ms: u64,
    /// Who set it (audit actor).
    pub updated_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fields read as one slice (`serde_bytes`) keep the bytes records were written
    /// with before, a length and the raw bytes: what is on disk still reads.
    #[test]
    fn byte_fields_encode_as_before() {
        #[derive(Serialize)]
        struct Before {
            input: Vec<u8>,
            cert: Option<Vec<u8>>,
        }
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Now {
            #[serde(with = "serde_bytes")]
            input: Vec<u8>,
            #[serde(with = "serde_bytes")]
            cert: Option<Vec<u8>>,
        }
        let input: Vec<u8> = (0..=255).chain(0..40).collect();
        let before = postcard::to_stdvec(&Before {
            input: input.clone(),
            cert: Some(vec![0x30, 0x82, 1, 2]),
        })
        .unwrap();
        let now = Now {
            input,
            cert: Some(vec![0x30, 0x82, 1, 2]),
        };
        assert_eq!(postcard::to_stdvec(&now).unwrap(), before);
        assert_eq!(postcard::from_bytes::<Now>(&before).unwrap(), now);
    }
}
