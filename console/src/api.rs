//! JSON types of the console API (`/console/v1`), shared by the server, the client library and
//! `anchorctl`. Field names are a contract: scripts depend on them. Add fields; never rename.
//!
//! Timestamps are RFC 3339 strings in UTC. Device ids are in their grouped display form,
//! invocation ids 32 hex digits.
//!
//! The ids and state enums are `anchorage-wire`'s, re-exported here: the anchor's rules, its
//! store and this API name them with one type each.
//!
//! Request bodies are strict where answers are lenient: a request body with a field this
//! version does not know is refused (400 naming the field), so a typo is not silently
//! ignored, while answers may gain fields at any time and clients must ignore the ones they
//! do not know. Every request body implements [`Validate`]; free text in it is at most
//! [`MAX_TEXT_CHARS`] characters.

pub use anchorage_wire::{DeviceId, InvocationId, InvocationState, Presence, TrustState};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::ApiError;

/// Longest free text an operator may send in a request body (a reason, a token name, a
/// capability name), in characters. Everything sent is stored or echoed to every reader of
/// the devices, tokens and audit lists, so one limit keeps those answers small.
pub const MAX_TEXT_CHARS: usize = 512;

/// The checks of a request body beyond its JSON shape, run by the router after parsing and
/// before the backend is called.
pub trait Validate {
    /// `Err` with a 400 naming the offending field.
    fn validate(&self) -> Result<(), ApiError>;
}

/// Refuses free text longer than [`MAX_TEXT_CHARS`] characters, naming `field`.
pub fn check_text(field: &str, text: &str) -> Result<(), ApiError> {
    // Counting stops just past the limit: a megabyte of text is not walked to the end.
    let chars = text.chars().take(MAX_TEXT_CHARS + 1).count();
    if chars > MAX_TEXT_CHARS {
        return Err(ApiError::text_too_long(
            field,
            text.chars().count(),
            MAX_TEXT_CHARS,
        ));
    }
    Ok(())
}

/// Permissions a bearer token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Permission {
    /// Read inventory, devices, nodes, pairing requests, invocations, events, metrics.
    #[serde(rename = "observability.read")]
    ObservabilityRead,
    /// Mint codes, approve/reject pairings, revoke/rotate/remove devices.
    #[serde(rename = "trust.operate")]
    TrustOperate,
    /// Invoke capabilities on nodes.
    #[serde(rename = "nodes.invoke")]
    NodesInvoke,
    /// Create, list and revoke tokens.
    #[serde(rename = "tokens.manage")]
    TokensManage,
}

impl Permission {
    /// Every permission (an owner token has them all).
    pub const ALL: [Permission; 4] = [
        Permission::ObservabilityRead,
        Permission::TrustOperate,
        Permission::NodesInvoke,
        Permission::TokensManage,
    ];

    /// The permission's name as written in tokens and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::ObservabilityRead => "observability.read",
            Permission::TrustOperate => "trust.operate",
            Permission::NodesInvoke => "nodes.invoke",
            Permission::TokensManage => "tokens.manage",
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Permission {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown permission {s:?}; expected one of: {}",
                    Permission::ALL.map(|p| p.as_str()).join(", ")
                )
            })
    }
}

/// Which part of the fleet a token may see and touch, beyond its permissions: the devices its
/// selector matches, and the capabilities one of its patterns matches. The default scope
/// limits nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Scope {
    /// Devices whose labels this selector matches (empty: every device).
    #[serde(default, skip_serializing_if = "Selector::is_empty")]
    pub selector: Selector,
    /// Capability patterns, `*` matching any run of characters (`system.*`); empty: every
    /// capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

pub use anchorage_wire::labels::Selector;

impl Scope {
    /// Whether the scope limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.selector.is_empty() && self.capabilities.is_empty()
    }

    /// Whether the scope limits which devices the token sees.
    pub fn limits_devices(&self) -> bool {
        !self.selector.is_empty()
    }

    /// Whether a device with `labels` is in scope.
    pub fn covers(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }

    /// Whether the token may run `capability`.
    pub fn allows_capability(&self, capability: &str) -> bool {
        self.capabilities.is_empty()
            || self
                .capabilities
                .iter()
                .any(|p| wildcard_match(p, capability))
    }
}

pub use anchorage_wire::peer::wildcard_match;

/// Checks a capability pattern given for a token: 1 to 128 bytes of the characters capability
/// names use (letters, digits, `.`, `_`, `-`, `/`, `:`) and `*`.
pub fn check_capability_pattern(pattern: &str) -> Result<(), ApiError> {
    let ok = !pattern.is_empty()
        && pattern.len() <= 128
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:*".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "capability pattern {pattern:?} must be 1-128 characters of letters, digits, \
             . _ - / : and * (any run of characters)"
        )))
    }
}

/// Who is calling: the authenticated token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Token id.
    pub token_id: String,
    /// Token name, for audit records.
    pub name: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
    /// Where it may do it.
    #[serde(default)]
    pub scope: Scope,
}

impl Principal {
    /// Whether the token carries `p`.
    pub fn can(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }

    /// A 403 `out_of_scope` naming the token's selector, then `why`.
    pub fn refused_by_selector(&self, why: impl std::fmt::Display) -> ApiError {
        ApiError::out_of_scope(format!(
            "token {} is limited to devices matching {:?}; {why}",
            self.name,
            self.scope.selector.to_string()
        ))
    }

    /// 403 unless a device with `labels` is in the token's scope; the message names the rule.
    pub fn check_device(
        &self,
        device: &DeviceId,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        if self.scope.covers(labels) {
            Ok(())
        } else {
            Err(self.refused_by_selector(format_args!("device {device} does not match")))
        }
    }

    /// 403 unless the token may run `capability`; the message names the rule.
    pub fn check_capability(&self, capability: &str) -> Result<(), ApiError> {
        if self.scope.allows_capability(capability) {
            Ok(())
        } else {
            Err(ApiError::out_of_scope(format!(
                "token {} may run only capabilities matching {}; {capability:?} does not match",
                self.name,
                self.scope.capabilities.join(", ")
            )))
        }
    }

    /// How the audit log and batches name this token: `name (id)`.
    pub fn actor(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }

    /// Whether the event stream may send `event` to this token: whether it holds every
    /// permission of [`event_permissions`] for the event's kind and, for a token limited to a
    /// selector, whether the event is about a device `in_scope` says is its own (or is the
    /// progress of a batch it created). The one place that decides what a subscriber sees.
    pub fn may_see(&self, event: &Event, in_scope: &dyn Fn(&DeviceId) -> bool) -> bool {
        if !event_permissions(&event.kind).iter().all(|p| self.can(*p)) {
            return false;
        }
        if !self.scope.limits_devices() {
            return true;
        }
        match &event.device_id {
            Some(device) => in_scope(device),
            None => {
                event.kind == "batch"
                    && event.data.get("requested_by").and_then(|v| v.as_str())
                        == Some(self.actor().as_str())
            }
        }
    }
}

/// The permissions a token needs to receive events of `kind` on `GET /console/v1/events`:
/// those of the REST route that reads the same data, so the stream never tells a token more
/// than it could ask for.
///
/// A kind not listed here needs every permission (only owner-like tokens see it) until its
/// route is stated, so a new kind cannot leak.
pub fn event_permissions(kind: &str) -> &'static [Permission] {
    match kind {
        // GET /tokens.
        "token" => &[Permission::TokensManage],
        // GET /pairing/codes and GET /pairing/requests (which carry the SAS).
        "pairing.code" | "pairing.requested" | "pairing.decided" | "pairing.completed" => {
            &[Permission::ObservabilityRead]
        }
        // GET /devices.
        "device.revoked" | "device.removed" | "device.rotated" | "device.labels" => {
            &[Permission::ObservabilityRead]
        }
        // GET /nodes and GET /inventory.
        "node.registered" | "node.capability" | "node.disconnected" | "presence" => {
            &[Permission::ObservabilityRead]
        }
        // GET /invocations.
        "invocation" => &[Permission::ObservabilityRead],
        // GET /batches.
        "batch" => &[Permission::ObservabilityRead],
        // GET /policy.
        "policy" => &[Permission::ObservabilityRead],
        _ => &Permission::ALL,
    }
}

pub use crate::error::ErrorBody;

// ---------------------------------------------------------------------------------------------
// Pairing

/// How a pairing code is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PairMethod {
    /// A short code a person types: `K7QF-482913`.
    #[default]
    Pin,
    /// An `anchorage://pair?...` URI, shown as a QR code.
    Qr,
}

/// `POST /console/v1/pairing/codes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MintCodeRequest {
    /// PIN or QR.
    #[serde(default)]
    pub method: PairMethod,
    /// Time to live in seconds (default 600, allowed 30..=86400).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Labels the device gets when its pairing is approved (like a tagged auth key).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Validate for MintCodeRequest {
    fn validate(&self) -> Result<(), ApiError> {
        // No free text; the TTL's range is the anchor's rule.
        validate_labels(&self.labels)
    }
}

/// Checks labels an operator sets: valid keys and values, none reserved, not too many.
pub fn validate_labels(
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    use anchorage_wire::labels::{MAX_LABELS, validate_operator_label};
    if labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (k, v) in labels {
        validate_operator_label(k, v).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    Ok(())
}

/// `POST /console/v1/pairing/requests/{id}/approve` (optional body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    /// Labels the device gets, besides its code's.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Validate for ApproveRequest {
    fn validate(&self) -> Result<(), ApiError> {
        validate_labels(&self.labels)
    }
}

/// A freshly minted pairing code. The secret is only ever shown here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintedCode {
    /// Public code id.
    pub code_id: String,
    /// Labels the device will get.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// What a person types (PIN) or scans (the QR URI).
    pub code: String,
    /// PIN or QR.
    pub method: PairMethod,
    /// When the code stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The `anchorage://pair?...` URI for QR codes; `null` for PINs.
    pub uri: Option<String>,
    /// The QR code as terminal text (Unicode half blocks), for QR codes.
    pub qr_text: Option<String>,
}

/// State of a pairing code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeState {
    /// Can be used.
    Active,
    /// Used by a pairing.
    Consumed,
    /// TTL passed.
    Expired,
    /// Too many wrong secrets.
    Burned,
}

/// A pairing code as listed (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingCodeInfo {
    /// Public code id.
    pub code_id: String,
    /// PIN or QR.
    pub method: PairMethod,
    /// State.
    pub state: CodeState,
    /// Wrong secrets so far.
    pub failed_attempts: u32,
    /// Minted at.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Expires at.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Who minted it.
    pub created_by: String,
    /// Labels the device it pairs will get.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// State of a pairing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for an operator.
    PendingApproval,
    /// Approved; the certificate is on its way to the node.
    Approved,
    /// The node has its certificate.
    Completed,
    /// An operator rejected it.
    Rejected,
    /// Nobody decided in time.
    Expired,
}

impl RequestState {
    /// The state's name as used in URLs and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestState::PendingApproval => "pending_approval",
            RequestState::Approved => "approved",
            RequestState::Completed => "completed",
            RequestState::Rejected => "rejected",
            RequestState::Expired => "expired",
        }
    }
}

impl std::str::FromStr for RequestState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            RequestState::PendingApproval,
            RequestState::Approved,
            RequestState::Completed,
            RequestState::Rejected,
            RequestState::Expired,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| format!("unknown request state {s:?}"))
    }
}

/// A pairing request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingRequest {
    /// Request id.
    pub request_id: String,
    /// The device id its CSR's key gives.
    pub device_id: DeviceId,
    /// The name the device asked for.
    pub device_name: String,
    /// Its platform.
    pub platform: String,
    /// State.
    pub state: RequestState,
    /// Short authentication string; compare with what the node shows.
    pub sas: String,
    /// The code it used.
    pub code_id: String,
    /// When the node asked.
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// When it expires if nobody decides.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Who decided, if anyone has.
    pub decided_by: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
    /// Rejection reason.
    pub reason: Option<String>,
}

/// `PATCH /console/v1/devices/{id}/labels`: labels to set, then keys to remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    /// `key` → `value` to set (keys and values as Kubernetes labels; not `node.anchorage/`).
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// Keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

impl LabelRequest {
    /// The changes, validated, sets first.
    pub fn changes(&self) -> Result<Vec<anchorage_wire::labels::LabelChange>, ApiError> {
        use anchorage_wire::labels::{
            LabelChange, is_reserved, validate_key, validate_operator_label,
        };
        let bad = |e: anchorage_wire::labels::LabelError| ApiError::bad_request(e.to_string());
        let mut out = Vec::with_capacity(self.set.len() + self.remove.len());
        for (k, v) in &self.set {
            validate_operator_label(k, v).map_err(bad)?;
            out.push(LabelChange::Set(k.clone(), v.clone()));
        }
        for k in &self.remove {
            validate_key(k).map_err(bad)?;
            if is_reserved(k) {
                return Err(bad(anchorage_wire::labels::LabelError::Reserved(k.clone())));
            }
            out.push(LabelChange::Remove(k.clone()));
        }
        if out.is_empty() {
            return Err(ApiError::bad_request(
                "nothing to change: give labels to set and/or keys to remove",
            ));
        }
        Ok(out)
    }
}

impl Validate for LabelRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if self.set.len() + self.remove.len() > anchorage_wire::labels::MAX_LABELS {
            return Err(ApiError::bad_request(format!(
                "at most {} label changes at once",
                anchorage_wire::labels::MAX_LABELS
            )));
        }
        self.changes().map(drop)
    }
}

/// Which devices a listing shows (`GET /devices`, `GET /inventory`): all of these that are
/// given must hold. Query parameters `selector`, `presence` (inventory only) and `trust`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceFilter {
    /// A label selector (Kubernetes grammar).
    pub selector: Option<String>,
    /// Only devices with this presence.
    pub presence: Option<Presence>,
    /// Only devices with this trust state.
    pub trust: Option<TrustState>,
}

impl DeviceFilter {
    /// The query parameters, for a client.
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = &self.selector {
            q.push(("selector", s.clone()));
        }
        if let Some(p) = self.presence {
            q.push(("presence", p.to_string()));
        }
        if let Some(t) = self.trust {
            q.push(("trust", t.to_string()));
        }
        q
    }
}

impl InventorySummary {
    /// The summary of `devices` (for a filtered inventory).
    pub fn of(devices: &[InventoryDevice]) -> InventorySummary {
        let mut s = InventorySummary {
            devices: devices.len() as u64,
            ..Default::default()
        };
        for d in devices {
            match d.trust {
                TrustState::Trusted => s.trusted += 1,
                TrustState::Revoked => s.revoked += 1,
                _ => {}
            }
            match d.presence {
                Presence::Online => s.online += 1,
                Presence::Degraded => s.degraded += 1,
                Presence::Stale => s.stale += 1,
                Presence::Offline => s.offline += 1,
                Presence::Unknown => {}
            }
            s.connected += u64::from(d.connected);
            s.with_warnings += u64::from(!d.warnings.is_empty());
            s.pending_pairings += d.pending_pairings.len() as u64;
        }
        s
    }
}

/// `POST /console/v1/pairing/requests/{id}/reject`, `POST /console/v1/devices/{id}/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Why, for the audit log (and, for rejections, the node); at most [`MAX_TEXT_CHARS`]
    /// characters.
    #[serde(default)]
    pub reason: Option<String>,
}

impl Validate for ReasonBody {
    fn validate(&self) -> Result<(), ApiError> {
        self.reason
            .as_deref()
            .map_or(Ok(()), |r| check_text("reason", r))
    }
}

// ---------------------------------------------------------------------------------------------
// Devices

/// A device as the trust registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Device id.
    pub device_id: DeviceId,
    /// Name.
    pub name: String,
    /// Trust state.
    pub trust: TrustState,
    /// Platform reported at pairing.
    pub platform: String,
    /// Current certificate serial (hex).
    pub cert_serial: Option<String>,
    /// Current certificate's start.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cert_not_before: Option<OffsetDateTime>,
    /// Current certificate's expiry.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cert_expires_at: Option<OffsetDateTime>,
    /// First paired.
    #[serde(with = "time::serde::rfc3339")]
    pub paired_at: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Why.
    pub revoked_reason: Option<String>,
    /// Whether an operator asked for a certificate rotation the node has not done yet.
    pub rotation_pending: bool,
    /// Labels: the operator's, and the facts the device reported under
    /// `node.anchorage/` (platform, os, arch).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// `POST /console/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A name for people; at most [`MAX_TEXT_CHARS`] characters here, and the anchor holds
    /// names to its own, shorter rule (printable, no direction controls).
    #[serde(default)]
    pub name: Option<String>,
    /// Permissions (at least one).
    pub permissions: Vec<Permission>,
    /// Only devices this label selector matches (default: every device).
    #[serde(default)]
    pub selector: Selector,
    /// Only capabilities matching one of these patterns, `*` matching any run of characters
    /// (default: every capability).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The token stops working this many seconds after it is created (default: never).
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Longest lifetime a token can be given: ten years.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

impl CreateTokenRequest {
    /// The scope the token would have.
    pub fn scope(&self) -> Scope {
        Scope {
            selector: self.selector.clone(),
            capabilities: self.capabilities.clone(),
        }
    }
}

impl Validate for CreateTokenRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(name) = &self.name {
            check_text("name", name)?;
        }
        if self.permissions.is_empty() {
            return Err(ApiError::bad_request(
                "a token needs at least one permission",
            ));
        }
        if self.capabilities.len() > 32 {
            return Err(ApiError::bad_request("at most 32 capability patterns"));
        }
        for p in &self.capabilities {
            check_capability_pattern(p)?;
        }
        if !self.scope().is_unlimited() && self.permissions.contains(&Permission::TokensManage) {
            return Err(ApiError::bad_request(
                "a token limited by --selector or --capability cannot carry tokens.manage \
                 (it could make tokens without its limits)",
            ));
        }
        match self.expires_in_secs {
            Some(0) => Err(ApiError::bad_request("expires_in_secs must be at least 1")),
            Some(s) if s > MAX_TOKEN_LIFETIME_SECS => Err(ApiError::bad_request(format!(
                "expires_in_secs is at most {MAX_TOKEN_LIFETIME_SECS} (ten years)"
            ))),
            _ => Ok(()),
        }
    }
}

/// A created token; the secret is shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// Token id.
    pub id: String,
    /// The bearer secret.
    pub token: String,
    /// Its name.
    pub name: String,
    /// Its permissions.
    pub permissions: Vec<Permission>,
    /// Where it may use them.
    #[serde(default)]
    pub scope: Scope,
    /// When it stops working, if ever.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// A token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Token id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Permissions.
    pub permissions: Vec<Permission>,
    /// Where it may use them.
    #[serde(default)]
    pub scope: Scope,
    /// When it stops working, if ever.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// When it last authenticated a request (to the minute), if ever.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// By whom.
    pub created_by: String,
    /// Revoked, if so.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

// ---------------------------------------------------------------------------------------------
// Presence, nodes, inventory

/// A capability a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// Name.
    pub name: String,
    /// Whether it can run now.
    pub available: bool,
    /// Why not, if not.
    pub reason: Option<String>,
    /// One line for operators.
    pub description: String,
}

/// Counts of capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CapabilitySummary {
    /// All.
    pub total: u32,
    /// Available.
    pub available: u32,
    /// Unavailable.
    pub unavailable: u32,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Device id.
    pub device_id: DeviceId,
    /// Name it registered with.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Agent version.
    pub agent_version: String,
    /// Presence now.
    pub presence: Presence,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Since when the current connection is open.
    #[serde(with = "time::serde::rfc3339::option")]
    pub connected_since: Option<OffsetDateTime>,
    /// Last heartbeat or registration.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen_at: Option<OffsetDateTime>,
    /// Milliseconds since the last heartbeat.
    pub heartbeat_age_ms: Option<u64>,
    /// Heartbeat loss over the recent window, 0..1.
    pub loss_rate: Option<f64>,
    /// Round-trip time, milliseconds (to 3 decimals).
    #[serde(serialize_with = "ms3")]
    pub rtt_ms: Option<f64>,
    /// Remote address of the current connection.
    pub remote_addr: Option<String>,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// The id of the anchor instance that holds the node's session (this anchor's own, or
    /// another's of its cluster), while connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
}

/// One device in the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InventoryDevice {
    /// Device id.
    pub device_id: DeviceId,
    /// Name.
    pub name: String,
    /// Labels (as on [`Device`]; empty for a device that is only pending).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Trust state.
    pub trust: TrustState,
    /// Presence.
    pub presence: Presence,
    /// Milliseconds since the last heartbeat.
    pub heartbeat_age_ms: Option<u64>,
    /// Heartbeat loss, 0..1.
    pub loss_rate: Option<f64>,
    /// Round-trip time, milliseconds (to 3 decimals).
    #[serde(serialize_with = "ms3")]
    pub rtt_ms: Option<f64>,
    /// Capability counts.
    pub capabilities: CapabilitySummary,
    /// Warnings: `stale`, `offline`, `not_registered`, `capabilities_unavailable`,
    /// `certificate_near_expiry`, `high_loss`, `rotation_pending`.
    pub warnings: Vec<String>,
    /// What an operator can do now: `invoke`, `rotate`, `revoke`, `remove`, `approve`, `reject`.
    pub actions: Vec<String>,
    /// Whether a connection is open now.
    pub connected: bool,
    /// Since when.
    #[serde(with = "time::serde::rfc3339::option")]
    pub connected_since: Option<OffsetDateTime>,
    /// Last heartbeat or registration.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen_at: Option<OffsetDateTime>,
    /// Certificate expiry.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cert_expires_at: Option<OffsetDateTime>,
    /// The trust record, if the device paired.
    pub device: Option<Box<Device>>,
    /// The node registration, if it ever registered.
    pub node: Option<Box<Node>>,
    /// Pairing requests of this device still waiting.
    pub pending_pairings: Vec<PairingRequest>,
    /// Its peer connections (filled in by `GET /console/v1/inventory/{id}`; empty in the
    /// list).
    #[serde(default)]
    pub peers: Vec<MeshLink>,
}

/// `GET /console/v1/mesh`: the peer connections the nodes connected to this anchor report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshView {
    /// One entry per pair, merged from both sides' reports.
    pub links: Vec<MeshLink>,
}

/// One peer connection of the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshLink {
    /// One side (the smaller device id).
    pub a: DeviceId,
    /// Its name.
    pub a_name: String,
    /// The other side.
    pub b: DeviceId,
    /// Its name.
    pub b_name: String,
    /// `direct` (straight over UDP), `relayed` (through the anchor) or `none`; `direct` if
    /// either side says so.
    pub path: String,
    /// The peer address in use on a direct path.
    pub addr: Option<String>,
    /// Round-trip time of the peer connection, milliseconds (the smaller of the two
    /// reports; to 3 decimals).
    #[serde(serialize_with = "ms3")]
    pub rtt_ms: Option<f64>,
    /// Since when the path has been what it is.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// The anchor itself, as an inventory instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// `anchor`.
    pub kind: String,
    /// Version.
    pub version: String,
    /// Started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Node connections open now.
    pub connected_nodes: u64,
    /// Bytes on disk of the store.
    pub store_bytes: u64,
    /// QUIC address.
    pub listen: String,
    /// Console address.
    pub console: String,
    /// CA fingerprint (SHA-256 hex).
    pub ca_fingerprint: String,
    /// CA expiry.
    #[serde(with = "time::serde::rfc3339")]
    pub ca_expires_at: OffsetDateTime,
    /// Warnings, e.g. `ca_near_expiry`.
    pub warnings: Vec<String>,
    /// This anchor's id (new at every start).
    #[serde(default)]
    pub id: String,
    /// Where its state lives: `fjall` or `etcd`.
    #[serde(default)]
    pub store: String,
    /// Its announcement in a shared store: `held` (renewed within its TTL; an anchor that dies
    /// drops out of the list within it), or `local` (an anchor on its own store).
    #[serde(default)]
    pub lease: String,
    /// Where nodes dial it (`HOST:PORT`: the public address, else the bound one).
    #[serde(default)]
    pub node_addr: String,
}

/// Summary counters of the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct InventorySummary {
    /// Devices known (not removed).
    pub devices: u64,
    /// Trusted devices.
    pub trusted: u64,
    /// Revoked devices.
    pub revoked: u64,
    /// Pairing requests waiting.
    pub pending_pairings: u64,
    /// Nodes online.
    pub online: u64,
    /// Nodes degraded.
    pub degraded: u64,
    /// Nodes stale.
    pub stale: u64,
    /// Nodes offline.
    pub offline: u64,
    /// Connections open.
    pub connected: u64,
    /// Devices with at least one warning.
    pub with_warnings: u64,
}

/// `GET /console/v1/inventory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Counters.
    pub summary: InventorySummary,
    /// Devices.
    pub devices: Vec<InventoryDevice>,
    /// Anchor instances.
    pub instances: Vec<Instance>,
    /// Set while the anchor cannot reach its shared store: this is its last view, from then.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub stale_since: Option<OffsetDateTime>,
    /// Which part of the matching devices `devices` holds (`GET /inventory?limit=&offset=`);
    /// absent from an anchor that does not page. `summary` always counts every match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<InventoryPage>,
}

/// Most devices one page of `GET /console/v1/inventory?limit=` holds.
pub const INVENTORY_MAX_PAGE: usize = 1000;

/// The page of the inventory an answer holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryPage {
    /// Devices that match the filters, on every page.
    pub total: u64,
    /// Matches skipped before the first device of this page.
    pub offset: u64,
    /// Most devices asked for (`None`: no limit, every match from `offset` on).
    pub limit: Option<u64>,
    /// The order of the matches, as given (`name` when none was).
    pub sort: String,
}

/// The order of `GET /console/v1/inventory?sort=`: a key, reversed by a leading `-`. Devices
/// equal by the key stay in name, then device id, order; a device without the value (no
/// heartbeat yet, no RTT) comes last either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventorySort {
    /// What to compare.
    pub key: InventorySortKey,
    /// Largest (or last) first.
    pub descending: bool,
}

/// What [`InventorySort`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InventorySortKey {
    /// Name, then device id: the default (the order the anchor lists devices in).
    Name,
    /// Offline, stale, degraded, then with a warning, then the rest (the web page's default).
    Problems,
    /// Online, degraded, stale, offline, unknown.
    Presence,
    /// Heartbeat age.
    Heartbeat,
    /// Heartbeat loss.
    Loss,
    /// Round-trip time.
    Rtt,
    /// Revoked, pending, unknown, removed, trusted.
    Trust,
}

impl InventorySortKey {
    const ALL: [(InventorySortKey, &'static str); 7] = [
        (InventorySortKey::Name, "name"),
        (InventorySortKey::Problems, "problems"),
        (InventorySortKey::Presence, "presence"),
        (InventorySortKey::Heartbeat, "heartbeat"),
        (InventorySortKey::Loss, "loss"),
        (InventorySortKey::Rtt, "rtt"),
        (InventorySortKey::Trust, "trust"),
    ];
}

impl Default for InventorySort {
    fn default() -> InventorySort {
        InventorySort {
            key: InventorySortKey::Name,
            descending: false,
        }
    }
}

impl std::fmt::Display for InventorySort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = InventorySortKey::ALL
            .iter()
            .find(|(k, _)| *k == self.key)
            .map_or("name", |(_, n)| n);
        write!(f, "{}{name}", if self.descending { "-" } else { "" })
    }
}

impl std::str::FromStr for InventorySort {
    type Err = String;

    fn from_str(s: &str) -> Result<InventorySort, String> {
        let (descending, name) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        InventorySortKey::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(key, _)| InventorySort {
                key: *key,
                descending,
            })
            .ok_or_else(|| {
                format!(
                    "unknown sort {:?}: expected one of {}, optionally after a -",
                    s.chars().take(40).collect::<String>(),
                    InventorySortKey::ALL.map(|(_, n)| n).join(", ")
                )
            })
    }
}

impl InventorySort {
    /// Compares two inventory entries in this order.
    pub fn compare(&self, a: &InventoryDevice, b: &InventoryDevice) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let by_name = || {
            a.name
                .cmp(&b.name)
                .then_with(|| a.device_id.cmp(&b.device_id))
        };
        let dir = |o: Ordering| if self.descending { o.reverse() } else { o };
        // Values that may be missing sort last whichever the direction.
        let optional = |va: Option<f64>, vb: Option<f64>| match (va, vb) {
            (Some(x), Some(y)) => dir(x.total_cmp(&y)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        let key = match self.key {
            InventorySortKey::Name => dir(by_name()),
            InventorySortKey::Problems => dir(problem_rank(a).cmp(&problem_rank(b))),
            InventorySortKey::Presence => {
                dir(presence_rank(a.presence).cmp(&presence_rank(b.presence)))
            }
            InventorySortKey::Heartbeat => optional(
                a.heartbeat_age_ms.map(|v| v as f64),
                b.heartbeat_age_ms.map(|v| v as f64),
            ),
            InventorySortKey::Loss => optional(a.loss_rate, b.loss_rate),
            InventorySortKey::Rtt => optional(a.rtt_ms, b.rtt_ms),
            InventorySortKey::Trust => dir(trust_rank(a.trust).cmp(&trust_rank(b.trust))),
        };
        key.then_with(by_name)
    }

    /// Puts `devices` in this order. An entry is several hundred bytes, and sorting the entries
    /// themselves moves each about log2(n) times (most of a 10,000-device inventory page's
    /// cost); this sorts their positions and moves each entry once.
    pub fn sort(&self, devices: &mut Vec<InventoryDevice>) {
        let mut order: Vec<usize> = (0..devices.len()).collect();
        // The order is total (it ends with the device id), so an unstable sort gives the same.
        order.sort_unstable_by(|&a, &b| self.compare(&devices[a], &devices[b]));
        let mut slots: Vec<Option<InventoryDevice>> = devices.drain(..).map(Some).collect();
        devices.extend(order.into_iter().filter_map(|i| slots[i].take()));
    }
}

fn problem_rank(d: &InventoryDevice) -> u8 {
    match d.presence {
        Presence::Offline => 0,
        Presence::Stale => 1,
        Presence::Degraded => 2,
        _ if !d.warnings.is_empty() => 3,
        _ => 4,
    }
}

fn presence_rank(p: Presence) -> u8 {
    match p {
        Presence::Online => 0,
        Presence::Degraded => 1,
        Presence::Stale => 2,
        Presence::Offline => 3,
        Presence::Unknown => 4,
    }
}

fn trust_rank(t: TrustState) -> u8 {
    match t {
        TrustState::Revoked => 0,
        TrustState::Pending => 1,
        TrustState::Unknown => 2,
        TrustState::Removed => 3,
        TrustState::Trusted => 4,
    }
}

impl InventoryDevice {
    /// Whether `needle` (already lowercased, not empty) is part of the name, the device id or
    /// a label `key=value`, ignoring case: the inventory's `?q=` search.
    pub fn mentions(&self, needle: &str) -> bool {
        self.name.to_lowercase().contains(needle)
            || self.device_id.to_string().contains(needle)
            || self
                .labels
                .iter()
                .any(|(k, v)| format!("{k}={v}").to_lowercase().contains(needle))
    }
}

// ---------------------------------------------------------------------------------------------
// Invocations

/// `POST /console/v1/nodes/{id}/invoke`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// Capability name (not empty, at most [`MAX_TEXT_CHARS`] characters).
    pub capability: String,
    /// JSON input (default `null`).
    #[serde(default)]
    pub input: serde_json::Value,
    /// Deadline from now, milliseconds (default 30000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Return at once instead of waiting for the result.
    #[serde(default, rename = "async")]
    pub async_: bool,
}

impl Validate for InvokeRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if self.capability.is_empty() {
            return Err(ApiError::bad_request("capability must not be empty"));
        }
        check_text("capability", &self.capability)
    }
}

/// An invocation record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// Id (32 hex digits).
    pub invocation_id: InvocationId,
    /// Target device.
    pub device_id: DeviceId,
    /// Capability.
    pub capability: String,
    /// State.
    pub state: InvocationState,
    /// Output (JSON if the node returned JSON, else a string), once finished.
    pub output: Option<serde_json::Value>,
    /// Whether the stored output was truncated.
    pub truncated: bool,
    /// Error detail when it did not succeed.
    pub error: Option<String>,
    /// Who asked.
    pub requested_by: String,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Deadline.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline_at: OffsetDateTime,
    /// Dispatched to the node.
    #[serde(with = "time::serde::rfc3339::option")]
    pub dispatched_at: Option<OffsetDateTime>,
    /// Finished.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Time the node spent, milliseconds.
    pub duration_ms: Option<u64>,
}

/// Query of `GET /console/v1/invocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct InvocationQuery {
    /// Only this device's.
    #[serde(default)]
    pub device_id: Option<DeviceId>,
    /// At most this many, newest first (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One entry of the audit log (`GET /console/v1/audit`): a trust decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who: `name (token id)`, or `anchor` for the anchor's own decisions.
    pub actor: String,
    /// What: `pairing.mint`, `pairing.approve`, `device.revoke`, `token.create`, ...
    pub action: String,
    /// What it was done to: a device id, a request id, a code id, a token id.
    pub target: String,
    /// Details (a reason, a permission list), possibly empty.
    pub detail: String,
}

/// Query of `GET /console/v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuditQuery {
    /// Only entries about this id: its target, or its whole detail (an approval's target is
    /// the request and its detail the device, so a device id finds its approvals too).
    #[serde(default)]
    pub target: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only entries whose actor contains this text (case-insensitive): a token's name or id.
    #[serde(default)]
    pub actor: Option<String>,
    /// Only this action (`device.revoke`), or every action under a prefix (`device`,
    /// `device.`: `device.revoke`, `device.remove`, ...).
    #[serde(default)]
    pub action: Option<String>,
    /// Only entries at or after this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// Only entries before this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
}

impl AuditQuery {
    /// Whether `action` is what [`AuditQuery::action`] asks for (everything without it).
    pub fn keeps_action(&self, action: &str) -> bool {
        match self.action.as_deref() {
            None | Some("") => true,
            Some(want) => {
                let prefix = want.trim_end_matches('.');
                action == want
                    || action
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('.'))
            }
        }
    }

    /// Whether `actor` contains [`AuditQuery::actor`], ignoring case (everything without it).
    pub fn keeps_actor(&self, actor: &str) -> bool {
        match self.actor.as_deref() {
            None | Some("") => true,
            Some(want) => actor.to_lowercase().contains(&want.to_lowercase()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// History

/// Most hours of history `GET /console/v1/inventory/{id}/history` returns (`?hours=`).
pub const HISTORY_MAX_HOURS: u32 = 48;
/// Hours of history returned without `?hours=`.
pub const HISTORY_DEFAULT_HOURS: u32 = 6;

/// Query of `GET /console/v1/inventory/{id}/history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HistoryQuery {
    /// How many hours back, 1 to [`HISTORY_MAX_HOURS`] (default [`HISTORY_DEFAULT_HOURS`]).
    #[serde(default)]
    pub hours: Option<u32>,
}

/// `GET /console/v1/inventory/{id}/history`: a device's link and presence over the last hours,
/// sampled by the anchor its node is connected to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The device.
    pub device_id: DeviceId,
    /// Start of the window.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// End of the window (now).
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    /// Seconds between two samples while the node is connected.
    pub interval_s: f64,
    /// Samples, oldest first (none while the node was not connected).
    pub samples: Vec<HistorySample>,
    /// Presence changes, oldest first; the first may be before `from` (the presence the
    /// window starts in).
    pub presence: Vec<PresenceChange>,
}

/// One sample of a device's link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistorySample {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// QUIC's smoothed round-trip time, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Heartbeat loss over the recent window, 0 to 1.
    pub loss: Option<f64>,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_s: Option<f64>,
    /// Presence then.
    pub presence: Presence,
}

/// A change of a device's presence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceChange {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The presence from then on.
    pub presence: Presence,
}

// ---------------------------------------------------------------------------------------------
// Batches

/// A batch's id: 32 hex digits, like an invocation's.
pub type BatchId = InvocationId;

/// Most device ids a [`BatchRequest::devices`] may name.
pub const BATCH_MAX_DEVICE_IDS: usize = 1000;

/// `POST /console/v1/batches`: run one capability on every trusted device a selector matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Label selector of the devices (matched once, when the batch is created).
    pub selector: Selector,
    /// Only these devices (of those `selector` matches): the page's "Invoke on selected"
    /// sends its selection here with an empty selector. At most 1000 ids.
    #[serde(default)]
    pub devices: Option<Vec<DeviceId>>,
    /// Capability name.
    pub capability: String,
    /// JSON input for every invocation (default `null`).
    #[serde(default)]
    pub input: serde_json::Value,
    /// Deadline of the whole batch from now, milliseconds (default 30000): an invocation not
    /// finished by then times out, also one never started.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// At most this many invocations unfinished at once (default: all at once).
    #[serde(default)]
    pub max_concurrency: Option<u32>,
}

impl Validate for BatchRequest {
    fn validate(&self) -> Result<(), ApiError> {
        if self.capability.is_empty() {
            return Err(ApiError::bad_request("capability must not be empty"));
        }
        check_text("capability", &self.capability)?;
        if self.max_concurrency == Some(0) {
            return Err(ApiError::bad_request("max_concurrency must be at least 1"));
        }
        match &self.devices {
            Some(d) if d.is_empty() => {
                return Err(ApiError::bad_request(
                    "devices must name at least one device (or leave it out)",
                ));
            }
            Some(d) if d.len() > BATCH_MAX_DEVICE_IDS => {
                return Err(ApiError::bad_request(format!(
                    "devices names {} devices; at most {BATCH_MAX_DEVICE_IDS}",
                    d.len()
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

/// One device's invocation in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchInvocation {
    /// Device.
    pub device_id: DeviceId,
    /// Its name when the batch was created.
    pub name: String,
    /// The invocation (`GET /console/v1/invocations/{id}` once it started).
    pub invocation_id: InvocationId,
    /// Its state (`queued` also while the batch has not started it).
    pub state: InvocationState,
    /// Output, once finished.
    pub output: Option<serde_json::Value>,
    /// Error detail when it did not succeed.
    pub error: Option<String>,
}

/// A batch without its invocations (`GET /console/v1/batches`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchInfo {
    /// Id.
    pub batch_id: BatchId,
    /// The selector it was created with.
    pub selector: String,
    /// Capability.
    pub capability: String,
    /// Devices it covers.
    pub total: u32,
    /// Invocations that succeeded.
    pub succeeded: u32,
    /// That failed.
    pub failed: u32,
    /// That timed out (also those never started before the deadline).
    pub timed_out: u32,
    /// That the node or the anchor refused (unknown or unavailable capability).
    pub rejected: u32,
    /// Not finished yet.
    pub pending: u32,
    /// Whether every invocation has finished.
    pub done: bool,
    /// Who created it.
    pub requested_by: String,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Deadline.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline_at: OffsetDateTime,
    /// Limit of invocations unfinished at once, if any.
    pub max_concurrency: Option<u32>,
}

impl Default for BatchInfo {
    /// No invocations yet, made at the Unix epoch: a base for `..Default::default()`.
    fn default() -> Self {
        BatchInfo {
            batch_id: InvocationId([0; 16]),
            selector: String::new(),
            capability: String::new(),
            total: 0,
            succeeded: 0,
            failed: 0,
            timed_out: 0,
            rejected: 0,
            pending: 0,
            done: true,
            requested_by: String::new(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            deadline_at: OffsetDateTime::UNIX_EPOCH,
            max_concurrency: None,
        }
    }
}

impl BatchInfo {
    /// Recounts `succeeded` .. `pending` and `done` from the invocations' states.
    pub fn tally(&mut self, states: impl IntoIterator<Item = InvocationState>) {
        let (mut total, mut ok, mut failed, mut timed_out, mut rejected) = (0, 0, 0, 0, 0);
        for s in states {
            total += 1;
            match s {
                InvocationState::Succeeded => ok += 1,
                InvocationState::Failed => failed += 1,
                InvocationState::TimedOut => timed_out += 1,
                InvocationState::Rejected => rejected += 1,
                _ => {}
            }
        }
        self.total = total;
        self.succeeded = ok;
        self.failed = failed;
        self.timed_out = timed_out;
        self.rejected = rejected;
        self.pending = total - ok - failed - timed_out - rejected;
        self.done = self.pending == 0;
    }
}

/// A batch with every device's invocation (`POST /console/v1/batches`,
/// `GET /console/v1/batches/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Id, counts and when.
    #[serde(flatten)]
    pub info: BatchInfo,
    /// One per device, in device id order.
    pub invocations: Vec<BatchInvocation>,
}

// ---------------------------------------------------------------------------------------------
// Events

/// A change published on `GET /console/v1/events` (server-sent events; the SSE `event:` field
/// is `kind`, `data:` is this JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing sequence number.
    pub seq: u64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Kind: `presence`, `node.registered`, `pairing.requested`, `pairing.decided`,
    /// `pairing.completed`, `device.revoked`, `device.removed`, `device.rotated`,
    /// `invocation`, `token`.
    pub kind: String,
    /// The device concerned, if any.
    pub device_id: Option<DeviceId>,
    /// Details.
    pub data: serde_json::Value,
}

// ---------------------------------------------------------------------------------------------
// Mesh policy

/// Largest policy file `PUT /console/v1/policy` accepts, bytes.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// Versions `GET /console/v1/policy/history` returns unless `?limit=` says otherwise.
pub const DEFAULT_POLICY_HISTORY: usize = 20;

/// The mesh policy in force (`GET /console/v1/policy`, and the answer of a `PUT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// 0 for the empty default (nobody reaches anybody), then one more with every change.
    pub version: u64,
    /// The file as the operator wrote it.
    pub text: String,
    /// When it was set (`null` for the default).
    #[serde(with = "time::serde::rfc3339::option")]
    pub updated_at: Option<OffsetDateTime>,
    /// Who set it, `name (token id)` (empty for the default).
    pub updated_by: String,
    /// Its rules in file order.
    pub rules: Vec<PolicyRuleInfo>,
}

/// One `[[allow]]` rule as parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRuleInfo {
    /// Its number: 1 for the first rule of the file (what `policy test` names).
    pub index: usize,
    /// The line of its `[[allow]]` header.
    pub line: usize,
    /// Its `name`, if it has one.
    pub name: Option<String>,
    /// Selector of the devices that may call.
    pub from: String,
    /// Selector of the devices they may call.
    pub to: String,
    /// Capability patterns.
    pub capabilities: Vec<String>,
    /// Service patterns.
    pub services: Vec<String>,
}

/// One version of the policy (`GET /console/v1/policy/history`, newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersionInfo {
    /// Its version.
    pub version: u64,
    /// The file as set.
    pub text: String,
    /// When it was set.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Who set it.
    pub updated_by: String,
}

pub use crate::error::{INVALID_POLICY, InvalidPolicyBody, PolicyProblem};

/// What `GET /console/v1/policy/test` asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyAction {
    /// Invoking a capability on the peer.
    Capability(String),
    /// Opening a tunnel to a service the peer exposes.
    Service(String),
}

/// A device as the policy test names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPeer {
    /// Its id.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
}

/// The answer of `GET /console/v1/policy/test`: whether the policy in force lets `from` do it
/// on `to`, and which rule says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTestResult {
    /// Whether it is allowed.
    pub allowed: bool,
    /// The number of the allowing rule (as [`PolicyRuleInfo::index`]), if one allows it.
    pub rule: Option<usize>,
    /// That rule's line.
    pub line: Option<usize>,
    /// That rule's name.
    pub name: Option<String>,
    /// One sentence: `allowed by rule 1 ("name", line 2)` or `refused: no rule allows ...`.
    pub reason: String,
    /// The caller.
    pub from: PolicyPeer,
    /// The callee.
    pub to: PolicyPeer,
    /// The capability asked about, if it was one.
    pub capability: Option<String>,
    /// The service asked about, if it was one.
    pub service: Option<String>,
    /// The policy version that answered.
    pub version: u64,
}

/// Milliseconds to 3 decimals (a microsecond): measurements carry no more, and
/// `1.4232330000000002` only hides the number.
pub fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn ms3<S: serde::Serializer>(ms: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    ms.map(round_ms).serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(permissions: &[Permission]) -> Principal {
        Principal {
            token_id: "t".into(),
            name: "t".into(),
            permissions: permissions.to_vec(),
            scope: Scope::default(),
        }
    }

    fn event(kind: &str) -> Event {
        Event {
            seq: 1,
            at: OffsetDateTime::UNIX_EPOCH,
            kind: kind.into(),
            device_id: None,
            data: serde_json::Value::Null,
        }
    }

    #[test]
    fn events_need_the_permission_of_their_read_route() {
        let reader = principal(&[Permission::ObservabilityRead]);
        let manager = principal(&[Permission::ObservabilityRead, Permission::TokensManage]);
        let owner = principal(&Permission::ALL);
        for kind in [
            "presence",
            "pairing.code",
            "pairing.requested",
            "invocation",
        ] {
            assert!(reader.may_see(&event(kind), &|_| true), "{kind}");
        }
        assert!(!reader.may_see(&event("token"), &|_| true));
        assert!(manager.may_see(&event("token"), &|_| true));
        // A kind nobody listed yet: only a token holding everything sees it.
        assert!(!manager.may_see(&event("fleet.moved"), &|_| true));
        assert!(owner.may_see(&event("fleet.moved"), &|_| true));
        // Operating trust is not reading it.
        assert!(!principal(&[Permission::TrustOperate]).may_see(&event("pairing.code"), &|_| true));
    }

    fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn scoped(selector: &str, capabilities: &[&str]) -> Principal {
        Principal {
            scope: Scope {
                selector: selector.parse().unwrap(),
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            },
            ..principal(&[Permission::ObservabilityRead, Permission::NodesInvoke])
        }
    }

    #[test]
    fn wildcards_match_runs_of_characters() {
        assert!(wildcard_match("system.*", "system.health"));
        assert!(wildcard_match("system.*", "system."));
        assert!(!wildcard_match("system.*", "systemd"));
        assert!(!wildcard_match("system.*", "my.system.health"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("echo", "echo"));
        assert!(!wildcard_match("echo", "echo2"));
        assert!(wildcard_match("*.read", "files.read"));
        assert!(!wildcard_match("*.read", "files.write"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("a*b*c", "aXXcYYb"));
        // The last part must not overlap the one before it.
        assert!(!wildcard_match("ab*ba", "aba"));
    }

    #[test]
    fn a_scope_limits_devices_and_capabilities_and_says_which_rule_refused() {
        let lab = scoped("site=lab", &["system.*"]);
        let id = DeviceId::from_bytes([7; 20]);
        assert!(lab.check_device(&id, &labels(&[("site", "lab")])).is_ok());
        let err = lab
            .check_device(&id, &labels(&[("site", "home")]))
            .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::FORBIDDEN);
        assert_eq!(err.code, "out_of_scope");
        assert!(err.message.contains("site=lab"), "{}", err.message);
        assert!(lab.check_capability("system.health").is_ok());
        let err = lab.check_capability("shell").unwrap_err();
        assert!(err.message.contains("system.*"), "{}", err.message);
        // No scope: everything.
        let owner = principal(&Permission::ALL);
        assert!(owner.check_device(&id, &labels(&[])).is_ok());
        assert!(owner.check_capability("anything").is_ok());
    }

    #[test]
    fn a_scoped_token_sees_only_events_of_its_devices_and_its_own_batches() {
        let lab = scoped("site=lab", &[]);
        let ours = DeviceId::from_bytes([1; 20]);
        let theirs = DeviceId::from_bytes([2; 20]);
        let in_scope = |d: &DeviceId| *d == ours;
        let about = |d: DeviceId| Event {
            device_id: Some(d),
            ..event("presence")
        };
        assert!(lab.may_see(&about(ours), &in_scope));
        assert!(!lab.may_see(&about(theirs), &in_scope));
        // Events about no device: only the progress of its own batches.
        assert!(!lab.may_see(&event("pairing.code"), &in_scope));
        let batch = |by: &str| Event {
            data: serde_json::json!({ "requested_by": by }),
            ..event("batch")
        };
        assert!(lab.may_see(&batch(&lab.actor()), &in_scope));
        assert!(!lab.may_see(&batch("owner (x)"), &in_scope));
    }

    #[test]
    fn token_requests_check_their_limits() {
        let req = |selector: &str, perms: &[Permission], caps: &[&str], secs: Option<u64>| {
            CreateTokenRequest {
                name: None,
                permissions: perms.to_vec(),
                selector: selector.parse().unwrap(),
                capabilities: caps.iter().map(|c| c.to_string()).collect(),
                expires_in_secs: secs,
            }
        };
        let read = [Permission::ObservabilityRead];
        assert!(
            req("site=lab", &read, &["system.*"], Some(60))
                .validate()
                .is_ok()
        );
        assert!(
            req("site=lab", &[Permission::TokensManage], &[], None)
                .validate()
                .is_err()
        );
        assert!(
            req("", &[Permission::TokensManage], &[], None)
                .validate()
                .is_ok()
        );
        assert!(req("", &read, &["bad pattern"], None).validate().is_err());
        assert!(req("", &read, &[], Some(0)).validate().is_err());
        assert!(req("", &read, &[], Some(u64::MAX)).validate().is_err());
    }

    #[test]
    fn batch_counts_come_from_the_states() {
        let mut info: BatchInfo = serde_json::from_value(serde_json::json!({
            "batch_id": "0123456789abcdef0123456789abcdef",
            "selector": "", "capability": "echo", "total": 0, "succeeded": 0, "failed": 0,
            "timed_out": 0, "rejected": 0, "pending": 0, "done": true, "requested_by": "x",
            "created_at": "2026-12-01T00:00:00Z", "deadline_at": "2026-12-01T00:00:30Z",
            "max_concurrency": null
        }))
        .unwrap();
        use InvocationState::*;
        info.tally([
            Succeeded, Succeeded, Failed, TimedOut, Rejected, Queued, Dispatched,
        ]);
        assert_eq!(
            (
                info.total,
                info.succeeded,
                info.failed,
                info.timed_out,
                info.rejected
            ),
            (7, 2, 1, 1, 1)
        );
        assert_eq!(info.pending, 2);
        assert!(!info.done);
        info.tally([Succeeded]);
        assert!(info.done);
    }

    #[test]
    fn text_is_limited_in_characters() {
        assert!(check_text("reason", &"ü".repeat(MAX_TEXT_CHARS)).is_ok());
        let err = check_text("reason", &"a".repeat(1_000_000)).unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(err.message.contains("`reason`"), "{}", err.message);
        assert!(err.message.contains("1000000"), "{}", err.message);
        assert!(err.message.contains("512"), "{}", err.message);
    }

    #[test]
    fn request_bodies_refuse_unknown_fields_and_answers_accept_them() {
        let err = serde_json::from_str::<ReasonBody>(r#"{"reason":"x","reasn":"y"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `reasn`"), "{err}");
        assert!(
            serde_json::from_str::<InvokeRequest>(r#"{"capability":"echo","async":true}"#).is_ok()
        );
        // Answers stay forward-compatible for clients.
        let body: ErrorBody =
            serde_json::from_str(r#"{"code":"c","message":"m","hint":"new"}"#).unwrap();
        assert_eq!(body.code, "c");
    }
}
