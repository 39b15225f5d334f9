//! An in-memory [`Backend`] for testing the HTTP layer (routing, authentication, permissions,
//! encoding). It is scaffolding, not a model of the anchor: the daemon's backend has its own
//! end-to-end tests.
//!
//! Tokens: `owner` (all permissions), `none` (no permission), `only:<perm>` and
//! `all-but:<perm>` for every permission. Fixtures: device and node [`DEVICE`], pairing request
//! `REQ-1`, token `TOK-1`, invocation [`INVOCATION`]. Invoke capabilities: `echo` (succeeds with its
//! input), `fail` (fails), `slow` (still dispatched at the timeout), `missing` (rejected).

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anchorage_console::api::*;
use anchorage_console::backend::{ApiResult, Backend};
use anchorage_console::error::ApiError;
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// The fixture device's id, as it is shown (grouped base32 of bytes 0..20).
pub const DEVICE: &str = "aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt";
pub const REQUEST: &str = "REQ-1";
pub const TOKEN: &str = "TOK-1";
/// The fixture invocation's id.
pub const INVOCATION: &str = "0123456789abcdef0123456789abcdef";
/// A well-formed device id the backend does not know.
pub const OTHER_DEVICE: &str = "7777-7777-7777-7777-7777-7777-7777-7777";

pub fn device_id() -> DeviceId {
    DEVICE.parse().unwrap()
}

pub fn invocation_id() -> InvocationId {
    INVOCATION.parse().unwrap()
}

pub struct TestBackend {
    pub events: broadcast::Sender<Event>,
    pub ready: AtomicBool,
    /// Names of the backend methods called (not `authenticate`), in order.
    pub calls: Mutex<Vec<&'static str>>,
    /// The last reason passed to `reject` or `revoke`.
    pub last_reason: Mutex<Option<Option<String>>>,
    /// The fixture device's presence in the inventory (tests change it).
    pub presence: Mutex<Presence>,
    /// Devices listed after the fixture one (tests add them).
    pub more_devices: Mutex<Vec<Device>>,
    /// Inventory entries listed after the fixture one (tests add them, in name order).
    pub more_entries: Mutex<Vec<InventoryDevice>>,
}

impl TestBackend {
    pub fn new() -> Self {
        Self::with_event_capacity(64)
    }

    pub fn with_event_capacity(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity);
        TestBackend {
            events,
            ready: AtomicBool::new(true),
            calls: Mutex::new(Vec::new()),
            last_reason: Mutex::new(None),
            presence: Mutex::new(Presence::Online),
            more_devices: Mutex::new(Vec::new()),
            more_entries: Mutex::new(Vec::new()),
        }
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }

    fn call(&self, name: &'static str) {
        self.calls.lock().unwrap().push(name);
    }
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_750_000_000).unwrap()
}

pub fn event(seq: u64, kind: &str) -> Event {
    Event {
        seq,
        at: now(),
        kind: kind.into(),
        device_id: Some(device_id()),
        data: serde_json::json!({ "seq": seq }),
    }
}

pub fn principal_for(token: &str) -> Option<Principal> {
    // `scoped:SELECTOR`: every permission but tokens.manage, on the devices SELECTOR matches.
    if let Some(selector) = token.strip_prefix("scoped:") {
        return Some(Principal {
            token_id: format!("id-{token}"),
            name: token.into(),
            permissions: Permission::ALL
                .into_iter()
                .filter(|p| *p != Permission::TokensManage)
                .collect(),
            scope: Scope {
                selector: selector.parse().ok()?,
                capabilities: vec!["ec*".into()],
            },
        });
    }
    let permissions = match token {
        "owner" => Permission::ALL.to_vec(),
        "none" => Vec::new(),
        _ => {
            if let Some(p) = token.strip_prefix("only:") {
                vec![p.parse().ok()?]
            } else if let Some(p) = token.strip_prefix("all-but:") {
                let p: Permission = p.parse().ok()?;
                Permission::ALL.into_iter().filter(|q| *q != p).collect()
            } else {
                return None;
            }
        }
    };
    Some(Principal {
        token_id: format!("id-{token}"),
        name: token.into(),
        permissions,
        scope: Scope::default(),
    })
}

pub fn device(trust: TrustState) -> Device {
    Device {
        device_id: device_id(),
        name: "kitchen-pi".into(),
        trust,
        platform: "linux-aarch64".into(),
        cert_serial: Some("0a1b".into()),
        cert_not_before: Some(now()),
        cert_expires_at: Some(now() + time::Duration::days(30)),
        paired_at: now(),
        revoked_at: None,
        revoked_reason: None,
        rotation_pending: false,
        labels: [("site", "lab"), ("node.anchorage/os", "linux")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

pub fn request(state: RequestState) -> PairingRequest {
    PairingRequest {
        request_id: REQUEST.into(),
        device_id: device_id(),
        device_name: "kitchen-pi".into(),
        platform: "linux-aarch64".into(),
        state,
        sas: "714 052".into(),
        code_id: "K7QF".into(),
        requested_at: now(),
        expires_at: now() + time::Duration::minutes(10),
        decided_by: None,
        decided_at: None,
        reason: None,
    }
}

/// The one batch: the one device, queued, created by the owner.
pub fn batch() -> Batch {
    let mut info = BatchInfo {
        batch_id: invocation_id(),
        selector: "site=lab".into(),
        capability: "echo".into(),
        requested_by: "owner (id-owner)".into(),
        created_at: now(),
        deadline_at: now() + time::Duration::seconds(30),
        ..Default::default()
    };
    let invocations = vec![BatchInvocation {
        device_id: device_id(),
        name: "kitchen-pi".into(),
        invocation_id: invocation_id(),
        state: InvocationState::Queued,
        output: None,
        error: None,
    }];
    info.tally(invocations.iter().map(|i| i.state));
    Batch { info, invocations }
}

pub fn token_info() -> TokenInfo {
    TokenInfo {
        id: TOKEN.into(),
        name: "ci".into(),
        permissions: vec![Permission::ObservabilityRead],
        created_at: now(),
        created_by: "owner".into(),
        revoked_at: None,
        scope: Scope::default(),
        expires_at: None,
        last_used_at: None,
    }
}

pub fn node() -> Node {
    Node {
        device_id: device_id(),
        name: "kitchen-pi".into(),
        platform: "linux-aarch64".into(),
        agent_version: "0.1.0".into(),
        presence: Presence::Online,
        connected: true,
        connected_since: Some(now()),
        last_seen_at: Some(now()),
        heartbeat_age_ms: Some(1200),
        loss_rate: Some(0.01),
        rtt_ms: Some(23.5),
        remote_addr: Some("192.0.2.7:50000".into()),
        anchor: None,
        capabilities: vec![Capability {
            name: "echo".into(),
            available: true,
            reason: None,
            description: "returns its input".into(),
        }],
    }
}

pub fn inventory_device() -> InventoryDevice {
    InventoryDevice {
        device_id: device_id(),
        name: "kitchen-pi".into(),
        labels: device(TrustState::Trusted).labels,
        trust: TrustState::Trusted,
        presence: Presence::Online,
        heartbeat_age_ms: Some(1200),
        loss_rate: Some(0.01),
        rtt_ms: Some(23.5),
        capabilities: CapabilitySummary {
            total: 1,
            available: 1,
            unavailable: 0,
        },
        warnings: vec!["certificate_near_expiry".into()],
        actions: vec!["invoke".into(), "rotate".into()],
        connected: true,
        connected_since: Some(now()),
        last_seen_at: Some(now()),
        cert_expires_at: Some(now() + time::Duration::days(30)),
        device: Some(Box::new(device(TrustState::Trusted))),
        node: Some(Box::new(node())),
        pending_pairings: Vec::new(),
        peers: Vec::new(),
    }
}

/// The `i`th device of a made-up fleet: `node-{i:05}`, its own device id, `site=lab` or
/// `site=depot` by parity, and every seventh one offline.
pub fn fleet_entry(i: usize) -> InventoryDevice {
    let mut id = [0u8; anchorage_wire::device::DEVICE_ID_LEN];
    id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    let offline = i % 7 == 3;
    InventoryDevice {
        device_id: DeviceId::from_bytes(id),
        name: format!("node-{i:05}"),
        labels: [(
            "site".to_string(),
            if i.is_multiple_of(2) { "lab" } else { "depot" }.to_string(),
        )]
        .into(),
        presence: if offline {
            Presence::Offline
        } else {
            Presence::Online
        },
        warnings: if offline {
            vec!["offline".into()]
        } else {
            Vec::new()
        },
        connected: !offline,
        heartbeat_age_ms: Some(i as u64),
        ..inventory_device()
    }
}

pub fn invocation(state: InvocationState) -> Invocation {
    Invocation {
        invocation_id: invocation_id(),
        device_id: device_id(),
        capability: "echo".into(),
        state,
        output: None,
        truncated: false,
        error: None,
        requested_by: "owner".into(),
        created_at: now(),
        deadline_at: now() + time::Duration::seconds(30),
        dispatched_at: None,
        finished_at: None,
        duration_ms: None,
    }
}

fn found<T, I: PartialEq + std::fmt::Display>(
    id: I,
    want: I,
    value: impl FnOnce() -> T,
) -> ApiResult<T> {
    if id == want {
        Ok(value())
    } else {
        Err(ApiError::not_found(format!("no such thing: {id}")))
    }
}

impl Backend for TestBackend {
    async fn authenticate(&self, token: &str) -> Option<Principal> {
        principal_for(token)
    }

    async fn mint_code(&self, _who: &Principal, req: MintCodeRequest) -> ApiResult<MintedCode> {
        self.call("mint_code");
        let ttl = req.ttl_secs.unwrap_or(600);
        if !(30..=86_400).contains(&ttl) {
            return Err(ApiError::bad_request("ttl_secs must be 30..=86400"));
        }
        let (code, uri, qr_text) = match req.method {
            PairMethod::Pin => ("K7QF-482913".to_string(), None, None),
            PairMethod::Qr => {
                let uri = "anchorage://pair?a=192.0.2.1:7444&c=K7QF&s=secret".to_string();
                (uri.clone(), Some(uri), Some("▀▄▀\n▄▀▄\n".to_string()))
            }
        };
        Ok(MintedCode {
            code_id: "K7QF".into(),
            labels: req.labels.clone(),
            code,
            method: req.method,
            expires_at: now() + time::Duration::seconds(ttl as i64),
            uri,
            qr_text,
        })
    }

    async fn list_codes(&self) -> ApiResult<Vec<PairingCodeInfo>> {
        self.call("list_codes");
        Ok(vec![PairingCodeInfo {
            labels: [("site".to_string(), "lab".to_string())].into(),
            code_id: "K7QF".into(),
            method: PairMethod::Pin,
            state: CodeState::Active,
            failed_attempts: 0,
            created_at: now(),
            expires_at: now() + time::Duration::minutes(10),
            created_by: "owner".into(),
        }])
    }

    async fn list_requests(&self, state: Option<RequestState>) -> ApiResult<Vec<PairingRequest>> {
        self.call("list_requests");
        let all = vec![request(RequestState::PendingApproval)];
        Ok(all
            .into_iter()
            .filter(|r| state.is_none_or(|s| s == r.state))
            .collect())
    }

    async fn request(&self, id: &str) -> ApiResult<PairingRequest> {
        self.call("request");
        found(id, REQUEST, || request(RequestState::PendingApproval))
    }

    async fn approve_labelled(
        &self,
        who: &Principal,
        id: &str,
        _labels: std::collections::BTreeMap<String, String>,
    ) -> ApiResult<PairingRequest> {
        self.call("approve");
        found(id, REQUEST, || {
            let mut r = request(RequestState::Approved);
            r.decided_by = Some(who.name.clone());
            r.decided_at = Some(now());
            r
        })
    }

    async fn reject(
        &self,
        who: &Principal,
        id: &str,
        reason: Option<String>,
    ) -> ApiResult<PairingRequest> {
        self.call("reject");
        *self.last_reason.lock().unwrap() = Some(reason.clone());
        found(id, REQUEST, || {
            let mut r = request(RequestState::Rejected);
            r.decided_by = Some(who.name.clone());
            r.decided_at = Some(now());
            r.reason = reason;
            r
        })
    }

    async fn list_devices(&self) -> ApiResult<Vec<Device>> {
        self.call("list_devices");
        let mut list = vec![device(TrustState::Trusted)];
        list.extend(self.more_devices.lock().unwrap().iter().cloned());
        Ok(list)
    }

    async fn device(&self, id: DeviceId) -> ApiResult<Device> {
        self.call("device");
        found(id, device_id(), || device(TrustState::Trusted))
    }

    async fn revoke(
        &self,
        _who: &Principal,
        id: DeviceId,
        reason: Option<String>,
    ) -> ApiResult<Device> {
        self.call("revoke");
        *self.last_reason.lock().unwrap() = Some(reason.clone());
        found(id, device_id(), || {
            let mut d = device(TrustState::Revoked);
            d.revoked_at = Some(now());
            d.revoked_reason = reason;
            d
        })
    }

    async fn rotate(&self, _who: &Principal, id: DeviceId) -> ApiResult<Device> {
        self.call("rotate");
        found(id, device_id(), || {
            let mut d = device(TrustState::Trusted);
            d.rotation_pending = true;
            d
        })
    }

    async fn label(
        &self,
        _who: &Principal,
        id: DeviceId,
        changes: Vec<anchorage_wire::labels::LabelChange>,
    ) -> ApiResult<Device> {
        self.call("label");
        found(id, device_id(), || {
            let mut d = device(TrustState::Trusted);
            for c in changes {
                match c {
                    anchorage_wire::labels::LabelChange::Set(k, v) => {
                        d.labels.insert(k, v);
                    }
                    anchorage_wire::labels::LabelChange::Remove(k) => {
                        d.labels.remove(&k);
                    }
                }
            }
            d
        })
    }

    async fn remove(&self, _who: &Principal, id: DeviceId) -> ApiResult<()> {
        self.call("remove");
        found(id, device_id(), || ())
    }

    async fn create_token(
        &self,
        _who: &Principal,
        req: CreateTokenRequest,
    ) -> ApiResult<CreatedToken> {
        self.call("create_token");
        Ok(CreatedToken {
            id: "TOK-2".into(),
            token: "secret-token-value".into(),
            scope: req.scope(),
            name: req.name.unwrap_or_else(|| "unnamed".into()),
            permissions: req.permissions,
            expires_at: req
                .expires_in_secs
                .map(|s| now() + time::Duration::seconds(s as i64)),
        })
    }

    async fn list_tokens(&self) -> ApiResult<Vec<TokenInfo>> {
        self.call("list_tokens");
        Ok(vec![token_info()])
    }

    async fn revoke_token(&self, _who: &Principal, id: &str) -> ApiResult<TokenInfo> {
        self.call("revoke_token");
        found(id, TOKEN, || {
            let mut t = token_info();
            t.revoked_at = Some(now());
            t
        })
    }

    async fn inventory(&self) -> ApiResult<Inventory> {
        self.call("inventory");
        let mut devices = vec![InventoryDevice {
            presence: *self.presence.lock().unwrap(),
            ..inventory_device()
        }];
        devices.extend(self.more_entries.lock().unwrap().iter().cloned());
        Ok(Inventory {
            stale_since: None,
            page: None,
            summary: if devices.len() == 1 {
                InventorySummary {
                    devices: 1,
                    trusted: 1,
                    online: 1,
                    connected: 1,
                    with_warnings: 1,
                    ..Default::default()
                }
            } else {
                InventorySummary::of(&devices)
            },
            devices,
            instances: vec![Instance {
                kind: "anchor".into(),
                version: "0.1.0".into(),
                started_at: now(),
                uptime_secs: 3600,
                connected_nodes: 1,
                store_bytes: 4096,
                listen: "0.0.0.0:7444".into(),
                console: "127.0.0.1:7142".into(),
                ca_fingerprint: "ab".repeat(32),
                ca_expires_at: now() + time::Duration::days(3650),
                warnings: Vec::new(),
                id: "a1b2c3d4e5f6".into(),
                store: "fjall".into(),
                lease: "local".into(),
                node_addr: "127.0.0.1:7444".into(),
            }],
        })
    }

    async fn inventory_device(&self, id: DeviceId) -> ApiResult<InventoryDevice> {
        self.call("inventory_device");
        found(id, device_id(), inventory_device)
    }

    async fn list_nodes(&self) -> ApiResult<Vec<Node>> {
        self.call("list_nodes");
        Ok(vec![node()])
    }

    async fn node(&self, id: DeviceId) -> ApiResult<Node> {
        self.call("node");
        found(id, device_id(), node)
    }

    async fn invoke(
        &self,
        who: &Principal,
        device_id: DeviceId,
        req: InvokeRequest,
    ) -> ApiResult<Invocation> {
        self.call("invoke");
        if device_id != self::device_id() {
            return Err(ApiError::not_found(format!("no device {device_id}")));
        }
        let mut inv = invocation(InvocationState::Queued);
        inv.capability = req.capability.clone();
        inv.requested_by = who.name.clone();
        if req.async_ {
            return Ok(inv);
        }
        match req.capability.as_str() {
            "echo" => {
                inv.state = InvocationState::Succeeded;
                inv.output = Some(req.input);
                inv.duration_ms = Some(3);
            }
            "fail" => {
                inv.state = InvocationState::Failed;
                inv.error = Some("exit status 3".into());
            }
            "slow" => inv.state = InvocationState::Dispatched,
            _ => {
                inv.state = InvocationState::Rejected;
                inv.error = Some(format!("unknown capability {}", req.capability));
            }
        }
        Ok(inv)
    }

    async fn audit(&self, query: AuditQuery) -> ApiResult<Vec<AuditEntry>> {
        self.call("audit");
        let all = vec![AuditEntry {
            at: now(),
            actor: "owner (TOK-1)".into(),
            action: "device.revoke".into(),
            target: DEVICE.into(),
            detail: "lost".into(),
        }];
        Ok(all
            .into_iter()
            .filter(|e| {
                query
                    .target
                    .as_deref()
                    .is_none_or(|t| t == e.target || t == e.detail)
            })
            .take(query.limit.unwrap_or(100))
            .collect())
    }

    async fn list_invocations(&self, query: InvocationQuery) -> ApiResult<Vec<Invocation>> {
        self.call("list_invocations");
        let all = vec![invocation(InvocationState::Succeeded)];
        Ok(all
            .into_iter()
            .filter(|i| query.device_id.is_none_or(|d| d == i.device_id))
            .take(query.limit.unwrap_or(100))
            .collect())
    }

    async fn create_batch(&self, who: &Principal, req: BatchRequest) -> ApiResult<Batch> {
        self.call("create_batch");
        let mut b = batch();
        b.info.capability = req.capability;
        b.info.selector = req.selector.to_string();
        b.info.requested_by = who.actor();
        // The one device is in the batch if both selectors match it.
        let labels = device(TrustState::Trusted).labels;
        if !(req.selector.matches(&labels) && who.scope.covers(&labels)) {
            b.invocations.clear();
        }
        b.info.tally(b.invocations.iter().map(|i| i.state));
        Ok(b)
    }

    async fn list_batches(&self, _limit: usize) -> ApiResult<Vec<BatchInfo>> {
        self.call("list_batches");
        Ok(vec![batch().info])
    }

    async fn batch(&self, id: BatchId) -> ApiResult<Batch> {
        self.call("batch");
        found(id, invocation_id(), batch)
    }

    async fn invocation(&self, id: InvocationId) -> ApiResult<Invocation> {
        self.call("invocation");
        found(id, invocation_id(), || {
            invocation(InvocationState::Succeeded)
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.call("subscribe");
        self.events.subscribe()
    }

    async fn metrics(&self, _format: anchorage_console::MetricsFormat) -> String {
        self.call("metrics");
        "# TYPE anchorage_up gauge\nanchorage_up 1\n".into()
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn qr_svg(&self, text: &str) -> ApiResult<String> {
        self.call("qr_svg");
        Ok(format!("<svg><!-- {} --></svg>", text.len()))
    }
}
