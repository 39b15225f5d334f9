//! The console backend: the anchor as the console API sees it.

use std::time::Duration;

use anchorage_console::api::*;
use anchorage_console::backend::{ApiResult, Backend};
use anchorage_console::error::ApiError;
use anchorage_mesh::DeviceId;
use tokio::sync::broadcast;
use tracing::warn;

use crate::anchor::Anchor;
use crate::clock::to_odt;
use crate::pairing::{self, code_state, request_state};
use crate::records::{
    CodeMethod, CodeRecord, DeviceRecord, DeviceTrust, RequestRecord, TokenRecord,
};
use crate::store::{Space, StoreError};
use crate::trust::{self, TrustError};

/// Implements [`Backend`] over an [`Anchor`].
#[derive(Debug, Clone)]
pub struct AnchorBackend {
    anchor: Anchor,
}

impl AnchorBackend {
    /// A backend for `anchor`.
    pub fn new(anchor: Anchor) -> AnchorBackend {
        AnchorBackend { anchor }
    }

    /// Runs blocking work (store, signing) off the runtime, mapping errors to API errors.
    async fn blocking<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Anchor) -> Result<T, TrustError> + Send + 'static,
    {
        let anchor = self.anchor.clone();
        match tokio::task::spawn_blocking(move || f(&anchor)).await {
            Ok(r) => r.map_err(api_error),
            Err(e) => {
                warn!(error = %e, "backend task failed");
                Err(ApiError::internal())
            }
        }
    }
}

/// Maps a trust error to the API.
pub(crate) fn api_error(e: TrustError) -> ApiError {
    match e {
        TrustError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
        TrustError::Conflict(m) => ApiError::conflict(m),
        TrustError::Expired(m) => ApiError::gone(m),
        TrustError::BadInput(m) => ApiError::bad_request(m),
        TrustError::Store(e) => {
            warn!(error = %e, "store error");
            ApiError::internal()
        }
        TrustError::Pki(e) => {
            warn!(error = %e, "certificate error");
            ApiError::internal()
        }
    }
}

fn store_err(e: StoreError) -> TrustError {
    TrustError::Store(e)
}

pub(crate) fn device_api(d: &DeviceRecord) -> Device {
    Device {
        device_id: d.device_id,
        name: d.name.clone(),
        trust: match d.trust {
            DeviceTrust::Trusted => TrustState::Trusted,
            DeviceTrust::Revoked => TrustState::Revoked,
        },
        platform: d.platform.clone(),
        cert_serial: Some(anchorage_mesh::pki::hex(&d.cert_serial)),
        cert_not_before: Some(to_odt(d.cert_not_before_ms)),
        cert_expires_at: Some(to_odt(d.cert_not_after_ms)),
        paired_at: to_odt(d.paired_at_ms),
        revoked_at: d.revoked_at_ms.map(to_odt),
        revoked_reason: d.revoked_reason.clone(),
        rotation_pending: d.rotation_pending,
    }
}

pub(crate) fn request_api(r: &RequestRecord, now_ms: u64) -> PairingRequest {
    PairingRequest {
        request_id: r.request_id.clone(),
        device_id: r.device_id,
        device_name: r.device_name.clone(),
        platform: r.platform.clone(),
        state: request_state(r, now_ms),
        sas: r.sas.clone(),
        code_id: r.code_id.clone(),
        requested_at: to_odt(r.requested_at_ms),
        expires_at: to_odt(r.expires_at_ms),
        decided_by: r.decided_by.clone(),
        decided_at: r.decided_at_ms.map(to_odt),
        reason: r.reason.clone(),
    }
}

fn code_api(c: &CodeRecord, now_ms: u64) -> PairingCodeInfo {
    PairingCodeInfo {
        code_id: c.code_id.clone(),
        method: match c.method {
            CodeMethod::Pin => PairMethod::Pin,
            CodeMethod::Qr => PairMethod::Qr,
        },
        state: code_state(c, now_ms),
        failed_attempts: c.failed_attempts,
        created_at: to_odt(c.created_at_ms),
        expires_at: to_odt(c.expires_at_ms),
        created_by: c.created_by.clone(),
    }
}

fn token_api(t: &TokenRecord) -> TokenInfo {
    TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        permissions: t
            .permissions
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        created_at: to_odt(t.created_at_ms),
        created_by: t.created_by.clone(),
        revoked_at: t.revoked_at_ms.map(to_odt),
    }
}

/// All pairing requests, newest first.
pub(crate) fn all_requests(anchor: &Anchor) -> Result<Vec<RequestRecord>, TrustError> {
    let mut reqs: Vec<RequestRecord> = anchor
        .shared
        .store
        .scan::<RequestRecord>(Space::Requests)
        .map_err(store_err)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    reqs.sort_by_key(|r| std::cmp::Reverse(r.requested_at_ms));
    Ok(reqs)
}

/// All devices.
pub(crate) fn all_devices(anchor: &Anchor) -> Result<Vec<DeviceRecord>, TrustError> {
    Ok(anchor
        .shared
        .store
        .scan::<DeviceRecord>(Space::Devices)
        .map_err(store_err)?
        .into_iter()
        .map(|(_, d)| d)
        .collect())
}

impl Backend for AnchorBackend {
    async fn authenticate(&self, token: &str) -> Option<Principal> {
        trust::authenticate(&self.anchor, token)
    }

    async fn mint_code(&self, who: &Principal, req: MintCodeRequest) -> ApiResult<MintedCode> {
        let method = match req.method {
            PairMethod::Pin => CodeMethod::Pin,
            PairMethod::Qr => CodeMethod::Qr,
        };
        let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(pairing::DEFAULT_TTL.as_secs()));
        let who = who.clone();
        let minted = self
            .blocking(move |a| pairing::mint_code(a, &who, method, ttl))
            .await?;
        self.anchor.publish(
            "pairing.code",
            None,
            serde_json::json!({"code_id": minted.record.code_id}),
        );
        Ok(MintedCode {
            code_id: minted.record.code_id.clone(),
            qr_text: minted.uri.as_deref().and_then(pairing::qr_text),
            code: minted.code,
            method: req.method,
            expires_at: to_odt(minted.record.expires_at_ms),
            uri: minted.uri,
        })
    }

    async fn list_codes(&self) -> ApiResult<Vec<PairingCodeInfo>> {
        self.blocking(|a| {
            let now = a.now_ms();
            let mut codes: Vec<CodeRecord> = a
                .shared
                .store
                .scan::<CodeRecord>(Space::Codes)
                .map_err(store_err)?
                .into_iter()
                .map(|(_, c)| c)
                .collect();
            codes.sort_by_key(|c| std::cmp::Reverse(c.created_at_ms));
            Ok(codes.iter().map(|c| code_api(c, now)).collect())
        })
        .await
    }

    async fn list_requests(&self, state: Option<RequestState>) -> ApiResult<Vec<PairingRequest>> {
        self.blocking(move |a| {
            let now = a.now_ms();
            Ok(all_requests(a)?
                .iter()
                .map(|r| request_api(r, now))
                .filter(|r| state.is_none_or(|s| r.state == s))
                .collect())
        })
        .await
    }

    async fn request(&self, id: &str) -> ApiResult<PairingRequest> {
        let id = id.to_string();
        self.blocking(move |a| {
            let r: RequestRecord = a
                .shared
                .store
                .get(Space::Requests, id.as_bytes())
                .map_err(store_err)?
                .ok_or_else(|| TrustError::NotFound(format!("pairing request {id}")))?;
            Ok(request_api(&r, a.now_ms()))
        })
        .await
    }

    async fn approve(&self, who: &Principal, id: &str) -> ApiResult<PairingRequest> {
        let (who, id) = (who.clone(), id.to_string());
        self.blocking(move |a| {
            let r = pairing::approve(a, &who, &id)?;
            Ok(request_api(&r, a.now_ms()))
        })
        .await
    }

    async fn reject(
        &self,
        who: &Principal,
        id: &str,
        reason: Option<String>,
    ) -> ApiResult<PairingRequest> {
        let (who, id) = (who.clone(), id.to_string());
        self.blocking(move |a| {
            let r = pairing::reject(a, &who, &id, reason)?;
            Ok(request_api(&r, a.now_ms()))
        })
        .await
    }

    async fn list_devices(&self) -> ApiResult<Vec<Device>> {
        self.blocking(|a| Ok(all_devices(a)?.iter().map(device_api).collect()))
            .await
    }

    async fn device(&self, device: DeviceId) -> ApiResult<Device> {
        self.blocking(move |a| {
            let d = a
                .device_record(&device)
                .map_err(store_err)?
                .ok_or_else(|| TrustError::NotFound(format!("device {device}")))?;
            Ok(device_api(&d))
        })
        .await
    }

    async fn revoke(
        &self,
        who: &Principal,
        device: DeviceId,
        reason: Option<String>,
    ) -> ApiResult<Device> {
        let who = who.clone();
        self.blocking(move |a| Ok(device_api(&trust::revoke_device(a, &who, &device, reason)?)))
            .await
    }

    async fn rotate(&self, who: &Principal, device: DeviceId) -> ApiResult<Device> {
        let who = who.clone();
        self.blocking(move |a| Ok(device_api(&trust::rotate_device(a, &who, &device)?)))
            .await
    }

    async fn remove(&self, who: &Principal, device: DeviceId) -> ApiResult<()> {
        let who = who.clone();
        self.blocking(move |a| trust::remove_device(a, &who, &device))
            .await
    }

    async fn create_token(
        &self,
        who: &Principal,
        req: CreateTokenRequest,
    ) -> ApiResult<CreatedToken> {
        let actor = trust::actor(who);
        self.blocking(move |a| {
            let name = req.name.unwrap_or_else(|| "unnamed".into());
            let created = trust::create_token_internal(a, &actor, name, req.permissions)?;
            a.publish(
                "token",
                None,
                serde_json::json!({"id": created.id, "action": "created"}),
            );
            Ok(created)
        })
        .await
    }

    async fn list_tokens(&self) -> ApiResult<Vec<TokenInfo>> {
        self.blocking(|a| {
            let tokens = a.shared.tokens.lock().unwrap_or_else(|e| e.into_inner());
            let mut list: Vec<TokenInfo> = tokens.values().map(token_api).collect();
            list.sort_by_key(|t| t.created_at);
            Ok(list)
        })
        .await
    }

    async fn revoke_token(&self, who: &Principal, id: &str) -> ApiResult<TokenInfo> {
        let (who, id) = (who.clone(), id.to_string());
        self.blocking(move |a| {
            let t = trust::revoke_token(a, &who, &id)?;
            a.publish(
                "token",
                None,
                serde_json::json!({"id": t.id, "action": "revoked"}),
            );
            Ok(token_api(&t))
        })
        .await
    }

    async fn inventory(&self) -> ApiResult<Inventory> {
        self.blocking(|a| {
            Ok(crate::inventory::inventory(
                a,
                all_devices(a)?,
                all_requests(a)?,
            ))
        })
        .await
    }

    async fn inventory_device(&self, device: DeviceId) -> ApiResult<InventoryDevice> {
        self.blocking(move |a| {
            let record = a.device_record(&device).map_err(store_err)?;
            crate::inventory::inventory_device(a, device, record, all_requests(a)?)
                .ok_or_else(|| TrustError::NotFound(format!("device {device}")))
        })
        .await
    }

    async fn list_nodes(&self) -> ApiResult<Vec<Node>> {
        Ok(crate::inventory::nodes(&self.anchor))
    }

    async fn node(&self, device: DeviceId) -> ApiResult<Node> {
        crate::inventory::node(&self.anchor, &device)
            .ok_or_else(|| ApiError::not_found(format!("node {device} not found")))
    }

    async fn invoke(
        &self,
        who: &Principal,
        device: DeviceId,
        req: InvokeRequest,
    ) -> ApiResult<Invocation> {
        if req.capability.is_empty() || req.capability.len() > anchorage_wire::limits::MAX_NAME_LEN
        {
            return Err(ApiError::bad_request("capability must be 1-128 bytes"));
        }
        let input = serde_json::to_vec(&req.input)
            .map_err(|_| ApiError::bad_request("input is not JSON"))?;
        if input.len() > anchorage_wire::limits::MAX_INVOKE_INPUT {
            return Err(ApiError::bad_request(format!(
                "input is {} bytes; the limit is {}",
                input.len(),
                anchorage_wire::limits::MAX_INVOKE_INPUT
            )));
        }
        let timeout = crate::runtime::invoke_timeout(req.timeout_ms);
        let anchor = self.anchor.clone();
        let d = device;
        // A live session proves trust without a store read: its certificate passed the live
        // revocation check at the handshake, and revoking or removing a device updates the
        // in-memory set (or forgets the session) before the operator hears back.
        let live = anchor.shared.runtime.is_live(&device)
            && !anchor.shared.revocation.is_device_revoked(&device);
        let trusted = if live {
            Ok(true)
        } else {
            self.blocking(move |a| {
                Ok(matches!(
                    a.device_record(&d).map_err(store_err)?,
                    Some(DeviceRecord {
                        trust: DeviceTrust::Trusted,
                        ..
                    })
                ))
            })
            .await
        };
        match trusted {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::not_found(format!("no trusted device {device}")));
            }
            Err(e) => return Err(e),
        }
        let rt = &anchor.shared.runtime;
        let record = rt
            .create_invocation(
                &anchor,
                device,
                req.capability,
                input,
                timeout,
                trust::actor(who),
            )
            .await
            .map_err(|e| api_error(TrustError::Store(e)))?;
        if req.async_ || record.state.is_final() {
            return Ok(crate::inventory::invocation_api(&record));
        }
        // Wait for the end, up to the deadline and a little more for the answer to land.
        let waited = rt
            .wait_final(&anchor, record.id, timeout + Duration::from_secs(2))
            .await
            .map_err(|e| api_error(TrustError::Store(e)))?;
        Ok(crate::inventory::invocation_api(
            waited.as_ref().unwrap_or(&record),
        ))
    }

    async fn list_invocations(&self, query: InvocationQuery) -> ApiResult<Vec<Invocation>> {
        let device = query.device_id;
        let limit = query.limit.unwrap_or(100).clamp(1, 1000);
        self.blocking(move |a| {
            let rt = &a.shared.runtime;
            let mut out = Vec::new();
            // Newest first: keys start with the creation time.
            for (_, r) in a
                .shared
                .store
                .scan::<crate::records::InvocationRecord>(Space::Invocations)
                .map_err(store_err)?
                .into_iter()
                .rev()
            {
                if device.is_some_and(|d| d != r.device_id) {
                    continue;
                }
                let current = rt
                    .invocation(&a.shared.store, &r.id)
                    .map_err(store_err)?
                    .unwrap_or(r);
                out.push(crate::inventory::invocation_api(&current));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn audit(&self, query: AuditQuery) -> ApiResult<Vec<AuditEntry>> {
        let limit = query.limit.unwrap_or(100).clamp(1, 1000);
        self.blocking(move |a| {
            let entries = a
                .shared
                .store
                .scan_rev_matching(Space::Audit, limit, |r: &crate::records::AuditRecord| {
                    query
                        .target
                        .as_deref()
                        .is_none_or(|t| t == r.target || t == r.detail)
                })
                .map_err(store_err)?;
            Ok(entries
                .into_iter()
                .map(|(_, r)| AuditEntry {
                    at: crate::clock::to_odt(r.at_ms),
                    actor: r.actor,
                    action: r.action,
                    target: r.target,
                    detail: r.detail,
                })
                .collect())
        })
        .await
    }

    async fn invocation(&self, id: InvocationId) -> ApiResult<Invocation> {
        self.blocking(move |a| {
            a.shared
                .runtime
                .invocation(&a.shared.store, &id.0)
                .map_err(store_err)?
                .map(|r| crate::inventory::invocation_api(&r))
                .ok_or_else(|| TrustError::NotFound(format!("invocation {id}")))
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.anchor.shared.events.subscribe()
    }

    async fn metrics(&self) -> String {
        let anchor = self.anchor.clone();
        tokio::task::spawn_blocking(move || crate::metrics_text(&anchor))
            .await
            .unwrap_or_default()
    }

    fn ready(&self) -> bool {
        true
    }

    fn qr_svg(&self, text: &str) -> ApiResult<String> {
        pairing::qr_svg(text).ok_or_else(|| ApiError::bad_request("text too long for a QR code"))
    }
}
