//! What the console needs from the anchor. The daemon implements [`Backend`]; the console
//! never depends on the daemon.
//!
//! Every method that changes state takes the calling [`Principal`] for the audit log. The
//! router checks permissions before calling; backends need not check them again. The router
//! also parses device and invocation ids (a malformed one is a 404 before the backend is
//! called), so backends get typed ids.

use std::future::Future;

use tokio::sync::broadcast;

use crate::api::*;
use crate::error::ApiError;

/// Result of a backend call.
pub type ApiResult<T> = Result<T, ApiError>;

/// The anchor, as the console sees it.
pub trait Backend: Send + Sync + 'static {
    /// The principal a bearer secret belongs to, if it is a live token.
    fn authenticate(&self, token: &str) -> impl Future<Output = Option<Principal>> + Send;

    // Pairing
    /// Mints a pairing code.
    fn mint_code(
        &self,
        who: &Principal,
        req: MintCodeRequest,
    ) -> impl Future<Output = ApiResult<MintedCode>> + Send;
    /// Lists pairing codes (no secrets), newest first.
    fn list_codes(&self) -> impl Future<Output = ApiResult<Vec<PairingCodeInfo>>> + Send;
    /// Lists pairing requests, optionally in one state, newest first.
    fn list_requests(
        &self,
        state: Option<RequestState>,
    ) -> impl Future<Output = ApiResult<Vec<PairingRequest>>> + Send;
    /// One pairing request.
    fn request(&self, id: &str) -> impl Future<Output = ApiResult<PairingRequest>> + Send;
    /// Approves a pending request.
    fn approve(
        &self,
        who: &Principal,
        id: &str,
    ) -> impl Future<Output = ApiResult<PairingRequest>> + Send {
        self.approve_labelled(who, id, std::collections::BTreeMap::new())
    }
    /// Approves a pending request; the device gets the code's labels and `labels` (validated).
    fn approve_labelled(
        &self,
        who: &Principal,
        id: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> impl Future<Output = ApiResult<PairingRequest>> + Send;
    /// Rejects a pending request.
    fn reject(
        &self,
        who: &Principal,
        id: &str,
        reason: Option<String>,
    ) -> impl Future<Output = ApiResult<PairingRequest>> + Send;

    // Devices
    /// Lists devices (not removed).
    fn list_devices(&self) -> impl Future<Output = ApiResult<Vec<Device>>> + Send;
    /// One device.
    fn device(&self, id: DeviceId) -> impl Future<Output = ApiResult<Device>> + Send;
    /// Revokes a device: closes its connection and refuses its next handshake.
    fn revoke(
        &self,
        who: &Principal,
        id: DeviceId,
        reason: Option<String>,
    ) -> impl Future<Output = ApiResult<Device>> + Send;
    /// Asks the node to rotate its certificate now.
    fn rotate(
        &self,
        who: &Principal,
        id: DeviceId,
    ) -> impl Future<Output = ApiResult<Device>> + Send;
    /// Removes a device (a revoked device can then pair again).
    fn remove(&self, who: &Principal, id: DeviceId) -> impl Future<Output = ApiResult<()>> + Send;
    /// Sets and removes a device's labels, in order (each change already validated).
    fn label(
        &self,
        who: &Principal,
        id: DeviceId,
        changes: Vec<anchorage_wire::labels::LabelChange>,
    ) -> impl Future<Output = ApiResult<Device>> + Send;

    // Tokens
    /// Creates a token.
    fn create_token(
        &self,
        who: &Principal,
        req: CreateTokenRequest,
    ) -> impl Future<Output = ApiResult<CreatedToken>> + Send;
    /// Lists tokens.
    fn list_tokens(&self) -> impl Future<Output = ApiResult<Vec<TokenInfo>>> + Send;
    /// Revokes a token.
    fn revoke_token(
        &self,
        who: &Principal,
        id: &str,
    ) -> impl Future<Output = ApiResult<TokenInfo>> + Send;

    // Runtime (inventory, nodes, invocations, events)
    /// Since when reads have answered from the anchor's last view of a shared store it
    /// cannot reach (`None`: they answer from the store). Marks every answer while set.
    fn stale_since(&self) -> Option<time::OffsetDateTime> {
        None
    }
    /// The whole inventory.
    fn inventory(&self) -> impl Future<Output = ApiResult<Inventory>> + Send;
    /// The inventory in outline: every entry with what filters, orders and counts it (name,
    /// trust, presence, heartbeat, warnings, pending pairings, and the labels when `labels`),
    /// its `device` and `node` parts, its `actions` and, without `labels`, its labels possibly
    /// left out until [`Backend::inventory_details`] fills them in for the entries of one page.
    /// The default is the whole inventory.
    fn inventory_outline(&self, labels: bool) -> impl Future<Output = ApiResult<Inventory>> + Send {
        let _ = labels;
        self.inventory()
    }
    /// Completes entries from [`Backend::inventory_outline`]: their `device` and `node` parts,
    /// labels and actions (a no-op when the outline is already whole, as by default).
    fn inventory_details(
        &self,
        devices: Vec<InventoryDevice>,
    ) -> impl Future<Output = ApiResult<Vec<InventoryDevice>>> + Send {
        async move { Ok(devices) }
    }
    /// One device's inventory entry.
    fn inventory_device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = ApiResult<InventoryDevice>> + Send;
    /// Registered nodes.
    fn list_nodes(&self) -> impl Future<Output = ApiResult<Vec<Node>>> + Send;
    /// One node.
    fn node(&self, id: DeviceId) -> impl Future<Output = ApiResult<Node>> + Send;
    /// Creates an invocation; waits for its end unless `req.async_`, up to its deadline.
    fn invoke(
        &self,
        who: &Principal,
        device_id: DeviceId,
        req: InvokeRequest,
    ) -> impl Future<Output = ApiResult<Invocation>> + Send;
    /// Invocations, newest first.
    fn list_invocations(
        &self,
        query: InvocationQuery,
    ) -> impl Future<Output = ApiResult<Vec<Invocation>>> + Send;
    /// One invocation.
    fn invocation(&self, id: InvocationId) -> impl Future<Output = ApiResult<Invocation>> + Send;
    /// Creates a batch: one invocation of `req.capability` on every trusted device that
    /// `req.selector` and the caller's scope selector both match now (offline ones included:
    /// theirs wait for them until the deadline). Returns once the batch is on disk, with
    /// every invocation `queued`.
    fn create_batch(
        &self,
        who: &Principal,
        req: BatchRequest,
    ) -> impl Future<Output = ApiResult<Batch>> + Send;
    /// Batches, newest first.
    fn list_batches(&self, limit: usize) -> impl Future<Output = ApiResult<Vec<BatchInfo>>> + Send;
    /// One batch with its invocations.
    fn batch(&self, id: BatchId) -> impl Future<Output = ApiResult<Batch>> + Send;
    /// A device's history since `hours` ago (already bounded by the route). The default keeps
    /// none.
    fn history(
        &self,
        id: DeviceId,
        hours: u32,
    ) -> impl Future<Output = ApiResult<crate::api::History>> + Send {
        let _ = hours;
        async move { Err(ApiError::not_found(format!("no history of device {id}"))) }
    }
    /// The audit log, newest first.
    fn audit(&self, query: AuditQuery) -> impl Future<Output = ApiResult<Vec<AuditEntry>>> + Send;
    /// The peer connections of the mesh (`GET /mesh`). The default knows none.
    fn mesh(&self) -> impl Future<Output = ApiResult<Vec<crate::api::MeshLink>>> + Send {
        async { Ok(Vec::new()) }
    }
    /// A receiver of every event published from now on.
    fn subscribe(&self) -> broadcast::Receiver<Event>;

    // Mesh policy (a backend without one answers 404 to all of it)
    /// The policy in force.
    fn policy(&self) -> impl Future<Output = ApiResult<PolicyInfo>> + Send {
        async { Err(no_policy()) }
    }
    /// The newest `limit` versions, newest first.
    fn policy_history(
        &self,
        limit: usize,
    ) -> impl Future<Output = ApiResult<Vec<PolicyVersionInfo>>> + Send {
        let _ = limit;
        async { Err(no_policy()) }
    }
    /// Sets the policy from the TOML file `text` (audited, announced, in force at once).
    fn set_policy(
        &self,
        who: &Principal,
        text: String,
    ) -> impl Future<Output = Result<PolicyInfo, crate::error::SetPolicyError>> + Send {
        let _ = (who, text);
        async { Err(no_policy().into()) }
    }
    /// Whether the policy in force lets `from` do `action` on `to`.
    fn policy_test(
        &self,
        from: DeviceId,
        to: DeviceId,
        action: PolicyAction,
    ) -> impl Future<Output = ApiResult<PolicyTestResult>> + Send {
        let _ = (from, to, action);
        async { Err(no_policy()) }
    }

    // Operations
    /// The exposition of the anchor's metrics in `format`.
    fn metrics(&self, format: MetricsFormat) -> impl Future<Output = String> + Send;
    /// Counts one answered console request (the router's metrics middleware calls it for
    /// every request; it must be cheap and must not block). Default: not counted.
    fn http_request(&self, request: &HttpObservation<'_>) {
        let _ = request;
    }
    /// Whether the anchor is ready to serve (store open, endpoint bound).
    fn ready(&self) -> bool;
    /// Renders `text` as a QR code SVG (for the web page's pairing view).
    fn qr_svg(&self, text: &str) -> ApiResult<String>;
}

fn no_policy() -> ApiError {
    ApiError::not_found("this anchor serves no mesh policy")
}

/// The exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsFormat {
    /// The Prometheus text format, version 0.0.4: what is served unless OpenMetrics is asked
    /// for. Counters are declared with their `_total` suffix.
    #[default]
    Prometheus,
    /// OpenMetrics 1.0.0 text, ending in `# EOF`: served when the `Accept` header prefers
    /// `application/openmetrics-text` (`MetricsFormat::negotiate`).
    OpenMetrics,
}

/// One answered console request, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct HttpObservation<'a> {
    /// The route template that matched, or [`UNMATCHED_ROUTE`](crate::metrics_layer::UNMATCHED_ROUTE).
    pub route: &'a str,
    /// The method, one of the standard ones or `other`.
    pub method: &'static str,
    /// The status code of the answer.
    pub status: u16,
    /// Seconds from the request's arrival to its answer's head (an event stream's duration is
    /// the time to its first byte, not how long it stays open).
    pub seconds: f64,
}
