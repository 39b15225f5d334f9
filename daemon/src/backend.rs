//! The console backend (IO driver): the anchor as the console API sees it.
//!
//! Each method parses its input, calls the services (off the async runtime where they block)
//! and shapes the answer; the side effects of a decision on other services (closing a
//! session, publishing an event, dispatching work) are done here, in one place per operation.

use std::sync::Arc;
use std::time::Duration;

use anchorage_console::api::*;
use anchorage_console::backend::{ApiResult, Backend};
use anchorage_console::error::ApiError;
use anchorage_mesh::DeviceId;
use anchorage_wire::ErrorCode;
use anchorage_wire::invoke::InvocationId;
use tokio::sync::broadcast;
use tracing::warn;

use crate::clock::to_odt;
use crate::events::AnchorEvent;
use crate::inventory::{code_api, device_api, request_api, token_api};
use crate::invocations::invoke_timeout;
use crate::records::{
    BatchMember, BatchRecord, CodeMethod, CodeRecord, DeviceTrust, InvocationRecord, RequestRecord,
};
use crate::services::Services;
use crate::store::{RuntimeWrite, StoreError};
use crate::trust::{self, TrustError};

/// Implements [`Backend`] over the anchor's services.
#[derive(Debug, Clone)]
pub struct AnchorBackend {
    services: Arc<Services>,
}

impl AnchorBackend {
    /// A backend over `services`.
    pub fn new(services: Arc<Services>) -> AnchorBackend {
        AnchorBackend { services }
    }

    /// Runs blocking work (store, signing) off the runtime, mapping errors to API errors.
    async fn blocking<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Services) -> Result<T, TrustError> + Send + 'static,
    {
        let services = self.services.clone();
        match tokio::task::spawn_blocking(move || f(&services)).await {
            Ok(r) => r.map_err(api_error),
            Err(e) => {
                warn!(error = %e, "backend task failed");
                Err(ApiError::internal())
            }
        }
    }
}

impl AnchorBackend {
    /// A device record as the API shows it, with its labels.
    async fn device_view(&self, record: crate::records::DeviceRecord) -> ApiResult<Device> {
        self.blocking(move |s| {
            let labels = s.trust.labels_of(&record.device_id)?;
            let version = crate::inventory::agent_version(s, &record.device_id);
            Ok(device_api(&record, Some(&labels), version.as_deref()))
        })
        .await
    }

    /// The inventory, whole or in outline, from the trust directory (in memory; on the
    /// blocking pool, as a whole fleet's entries take a while to build).
    async fn inventory_as(&self, detail: crate::inventory::Detail) -> ApiResult<Inventory> {
        self.blocking(move |s| Ok(crate::inventory::inventory(s, &s.trust.directory(), detail)))
            .await
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

/// Maps a trust error to the API.
pub fn api_error(e: TrustError) -> ApiError {
    match e {
        TrustError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
        TrustError::Conflict(m) => ApiError::conflict(m),
        TrustError::Expired(m) => ApiError::gone(m),
        TrustError::BadInput(m) => ApiError::bad_request(m),
        TrustError::Store(StoreError::Unavailable(m)) => {
            warn!(error = %m, "store unreachable");
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the anchor's store cannot be reached now; nothing was changed, try again",
            )
        }
        TrustError::Store(e) => {
            warn!(error = %e, "store error");
            ApiError::internal()
        }
        TrustError::Pki(e) => {
            warn!(error = %e, "certificate error");
            ApiError::internal()
        }
        TrustError::InvalidPolicy(errors) => ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            anchorage_console::api::INVALID_POLICY,
            format!(
                "the policy has {} error(s); nothing was changed",
                errors.len()
            ),
        ),
    }
}

// The console refuses a larger body before the anchor parses it; both say the same limit.
const _: () = assert!(MAX_POLICY_BYTES == crate::policy::MAX_POLICY_LEN);

/// The policy in force as the API shows it.
pub fn policy_api(p: &crate::policy::PolicyVersion) -> PolicyInfo {
    PolicyInfo {
        version: p.version,
        text: p.text.clone(),
        updated_at: (p.version > 0).then(|| to_odt(p.updated_ms)),
        updated_by: p.updated_by.clone(),
        rules: p
            .policy
            .rules()
            .iter()
            .enumerate()
            .map(|(i, r)| PolicyRuleInfo {
                index: i + 1,
                line: r.line,
                name: r.name.clone(),
                from: r.from.to_string(),
                to: r.to.to_string(),
                capabilities: r.capabilities.clone(),
                services: r.services.clone(),
            })
            .collect(),
    }
}

/// All pairing requests, newest first.
pub fn all_requests(s: &Services) -> Result<Vec<RequestRecord>, TrustError> {
    let mut reqs = s.trust.requests()?;
    reqs.sort_by_key(|r| std::cmp::Reverse(r.requested_at_ms));
    Ok(reqs)
}

impl Backend for AnchorBackend {
    async fn authenticate(&self, token: &str) -> Option<Principal> {
        let principal = self.services.trust.authenticate(token)?;
        if let Some(at) = self.services.trust.note_use(&principal.token_id) {
            // Best effort: a full write queue skips one note of a token's last use.
            self.services
                .writer
                .try_put(RuntimeWrite::TokenUsed(principal.token_id.clone(), at));
        }
        Some(principal)
    }

    async fn mint_code(&self, who: &Principal, req: MintCodeRequest) -> ApiResult<MintedCode> {
        let method = match req.method {
            PairMethod::Pin => CodeMethod::Pin,
            PairMethod::Qr => CodeMethod::Qr,
        };
        let ttl = Duration::from_secs(req.ttl_secs.unwrap_or(trust::DEFAULT_TTL.as_secs()));
        let who = who.clone();
        let labels = req.labels.clone();
        let minted = self
            .blocking(move |s| {
                s.trust
                    .mint_code(&who, method, ttl, s.public_addr(), &labels)
            })
            .await?;
        self.services.events.publish(AnchorEvent::CodeMinted {
            code_id: minted.record.code_id.clone(),
        });
        Ok(MintedCode {
            code_id: minted.record.code_id.clone(),
            labels: req.labels,
            qr_text: minted.uri.as_deref().and_then(qr_text),
            code: minted.code,
            method: req.method,
            expires_at: to_odt(minted.record.expires_at_ms),
            uri: minted.uri,
        })
    }

    async fn list_codes(&self) -> ApiResult<Vec<PairingCodeInfo>> {
        self.blocking(|s| {
            let now = s.clock.now_ms();
            let mut codes: Vec<CodeRecord> = s.trust.codes()?;
            let labels = s.trust.code_labels()?;
            codes.sort_by_key(|c| std::cmp::Reverse(c.created_at_ms));
            Ok(codes
                .iter()
                .map(|c| code_api(c, labels.get(&c.code_id), now))
                .collect())
        })
        .await
    }

    async fn list_requests(&self, state: Option<RequestState>) -> ApiResult<Vec<PairingRequest>> {
        self.blocking(move |s| {
            let now = s.clock.now_ms();
            Ok(all_requests(s)?
                .iter()
                .map(|r| request_api(r, now))
                .filter(|r| state.is_none_or(|st| r.state == st))
                .collect())
        })
        .await
    }

    async fn request(&self, id: &str) -> ApiResult<PairingRequest> {
        let id = id.to_string();
        self.blocking(move |s| {
            let r = s
                .trust
                .request(&id)?
                .ok_or_else(|| TrustError::NotFound(format!("pairing request {id}")))?;
            Ok(request_api(&r, s.clock.now_ms()))
        })
        .await
    }

    async fn approve_labelled(
        &self,
        who: &Principal,
        id: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> ApiResult<PairingRequest> {
        let (who, id) = (who.clone(), id.to_string());
        let (r, replaced) = self
            .blocking(move |s| s.trust.approve(&who, &id, &labels))
            .await?;
        if replaced {
            self.services
                .nodes
                .close(&r.device_id, ErrorCode::Replaced, "device paired again");
        }
        self.services.events.publish(AnchorEvent::PairingDecided {
            device: r.device_id,
            request_id: r.request_id.clone(),
            approved: true,
        });
        Ok(request_api(&r, self.services.clock.now_ms()))
    }

    async fn reject(
        &self,
        who: &Principal,
        id: &str,
        reason: Option<String>,
    ) -> ApiResult<PairingRequest> {
        let (who, id) = (who.clone(), id.to_string());
        let r = self
            .blocking(move |s| s.trust.reject(&who, &id, reason))
            .await?;
        self.services.events.publish(AnchorEvent::PairingDecided {
            device: r.device_id,
            request_id: r.request_id.clone(),
            approved: false,
        });
        Ok(request_api(&r, self.services.clock.now_ms()))
    }

    async fn list_devices(&self) -> ApiResult<Vec<Device>> {
        // From the trust directory (in memory, as fresh as the store's watch), in device order.
        self.blocking(|s| {
            let dir = s.trust.directory();
            let mut devices = dir.devices;
            devices.sort_by_key(|d| d.device_id);
            Ok(devices
                .iter()
                .map(|d| {
                    let version = crate::inventory::agent_version(s, &d.device_id);
                    let labels = dir.labels.get(&d.device_id).map(|l| &**l);
                    device_api(d, labels, version.as_deref())
                })
                .collect())
        })
        .await
    }

    async fn device(&self, device: DeviceId) -> ApiResult<Device> {
        self.blocking(move |s| {
            let (d, labels) = s
                .trust
                .device_with_labels(&device)?
                .ok_or_else(|| TrustError::NotFound(format!("device {device}")))?;
            let version = crate::inventory::agent_version(s, &device);
            Ok(device_api(&d, Some(&labels), version.as_deref()))
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
        let record = self
            .blocking(move |s| s.trust.revoke_device(&who, &device, reason))
            .await?;
        self.services
            .nodes
            .close(&device, ErrorCode::Revoked, "device revoked");
        self.services.events.publish(AnchorEvent::DeviceRevoked {
            device,
            reason: record.revoked_reason.clone(),
        });
        self.device_view(record).await
    }

    async fn rotate(&self, who: &Principal, device: DeviceId) -> ApiResult<Device> {
        let who = who.clone();
        let record = self
            .blocking(move |s| s.trust.rotate_device(&who, &device))
            .await?;
        // A connected node is told now; one that is not is told when it registers.
        self.services
            .mesh
            .tell(&device, anchorage_wire::control::ControlDown::RotateNow);
        self.device_view(record).await
    }

    async fn label(
        &self,
        who: &Principal,
        device: DeviceId,
        changes: Vec<anchorage_wire::labels::LabelChange>,
    ) -> ApiResult<Device> {
        let who = who.clone();
        let view = self
            .blocking(move |s| {
                let labels = s.trust.label_device(&who, &device, &changes)?;
                let record = s
                    .trust
                    .device(&device)?
                    .ok_or_else(|| TrustError::NotFound(format!("device {device}")))?;
                let version = crate::inventory::agent_version(s, &device);
                Ok(device_api(&record, Some(&labels), version.as_deref()))
            })
            .await?;
        self.services.events.publish(AnchorEvent::DeviceLabelled {
            device,
            labels: view.labels.clone(),
        });
        Ok(view)
    }

    async fn remove(&self, who: &Principal, device: DeviceId) -> ApiResult<()> {
        let who = who.clone();
        self.blocking(move |s| s.trust.remove_device(&who, &device))
            .await?;
        self.services
            .nodes
            .forget(&device, ErrorCode::Removed, "device removed");
        self.services
            .events
            .publish(AnchorEvent::DeviceRemoved { device });
        Ok(())
    }

    async fn create_token(
        &self,
        who: &Principal,
        req: CreateTokenRequest,
    ) -> ApiResult<CreatedToken> {
        let actor = trust::actor(who);
        let created = self
            .blocking(move |s| {
                let scope = req.scope();
                let lifetime = req.expires_in_secs.map(Duration::from_secs);
                let name = req.name.unwrap_or_else(|| "unnamed".into());
                s.trust
                    .create_token(&actor, name, req.permissions, scope, lifetime)
            })
            .await?;
        self.services.events.publish(AnchorEvent::Token {
            id: created.id.clone(),
            action: "created",
        });
        Ok(created)
    }

    async fn list_tokens(&self) -> ApiResult<Vec<TokenInfo>> {
        Ok(self.services.trust.tokens().iter().map(token_api).collect())
    }

    async fn revoke_token(&self, who: &Principal, id: &str) -> ApiResult<TokenInfo> {
        let (who, id) = (who.clone(), id.to_string());
        let t = self
            .blocking(move |s| s.trust.revoke_token(&who, &id))
            .await?;
        self.services.events.publish(AnchorEvent::Token {
            id: t.record.id.clone(),
            action: "revoked",
        });
        Ok(token_api(&t))
    }

    fn stale_since(&self) -> Option<time::OffsetDateTime> {
        self.services
            .stores
            .runtime
            .stale_since()
            .map(crate::clock::to_odt)
    }

    async fn inventory(&self) -> ApiResult<Inventory> {
        self.inventory_as(crate::inventory::Detail::Full).await
    }

    async fn inventory_outline(&self, labels: bool) -> ApiResult<Inventory> {
        self.inventory_as(crate::inventory::Detail::Outline { labels })
            .await
    }

    async fn inventory_details(
        &self,
        devices: Vec<InventoryDevice>,
    ) -> ApiResult<Vec<InventoryDevice>> {
        Ok(crate::inventory::details(&self.services, devices))
    }

    async fn inventory_device(&self, device: DeviceId) -> ApiResult<InventoryDevice> {
        self.blocking(move |s| {
            let record = s.trust.device(&device)?;
            let labels = s.trust.labels_of(&device)?;
            let pending = s.trust.pending_requests();
            crate::inventory::inventory_device(s, device, record, &labels, &pending)
                .map(|mut entry| {
                    entry.peers = s.mesh.console_links(Some(&device));
                    entry
                })
                .ok_or_else(|| TrustError::NotFound(format!("device {device}")))
        })
        .await
    }

    async fn mesh(&self) -> ApiResult<Vec<anchorage_console::api::MeshLink>> {
        Ok(self.services.mesh.console_links(None))
    }

    async fn list_nodes(&self) -> ApiResult<Vec<Node>> {
        Ok(crate::inventory::nodes(&self.services))
    }

    async fn node(&self, device: DeviceId) -> ApiResult<Node> {
        crate::inventory::node(&self.services, &device)
            .ok_or_else(|| ApiError::not_found(format!("node {device} not found")))
    }

    async fn invoke(
        &self,
        who: &Principal,
        device: DeviceId,
        req: InvokeRequest,
    ) -> ApiResult<Invocation> {
        let input = check_invocation(&req.capability, &req.input)?;
        let timeout = invoke_timeout(req.timeout_ms);
        let s = &self.services;
        // A live session proves trust without a store read (see `dispatch::create`).
        let live = s
            .nodes
            .live(&device)
            .filter(|_| !s.trust.revocation().is_device_revoked(&device));
        if live.is_none() {
            // The directory follows the store's watch: no store read per invocation.
            let trusted = s
                .trust
                .directory_device(&device)
                .is_some_and(|d| d.trust == DeviceTrust::Trusted);
            if !trusted {
                return Err(ApiError::not_found(format!("no trusted device {device}")));
            }
        }
        let now = s.clock.now_ms();
        let id = new_invocation_id(now);
        let record = InvocationRecord::queued(
            id.0,
            device,
            req.capability,
            input,
            trust::actor(who),
            now,
            now.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        );
        // The caller learns the id only once the record is on disk.
        let record = crate::dispatch::create(s, record).await;
        s.invocations
            .barrier()
            .await
            .map_err(|e| api_error(TrustError::Store(e)))?;
        if req.async_ || record.state.is_final() {
            return Ok(crate::inventory::invocation_api(&record));
        }
        // Wait for the end, up to the deadline and a little more for the answer to land.
        let waited = s
            .invocations
            .wait_final(id, timeout + Duration::from_secs(2))
            .await
            .map_err(|e| api_error(TrustError::Store(e)))?;
        Ok(crate::inventory::invocation_api(
            waited.as_ref().unwrap_or(&record),
        ))
    }

    async fn create_batch(&self, who: &Principal, req: BatchRequest) -> ApiResult<Batch> {
        let input = check_invocation(&req.capability, &req.input)?;
        let timeout = invoke_timeout(req.timeout_ms);
        let devices = self.list_devices().await?;
        let s = &self.services;
        let now = s.clock.now_ms();
        let wanted: Option<std::collections::HashSet<DeviceId>> = req
            .devices
            .as_ref()
            .map(|ids| ids.iter().copied().collect());
        let mut members: Vec<BatchMember> = devices
            .into_iter()
            .filter(|d| {
                d.trust == TrustState::Trusted
                    && wanted.as_ref().is_none_or(|ids| ids.contains(&d.device_id))
                    && req.selector.matches(&d.labels)
                    && who.scope.covers(&d.labels)
            })
            .map(|d| BatchMember {
                device_id: d.device_id,
                name: d.name,
                invocation_id: new_invocation_id(now).0,
            })
            .collect();
        if let Some(wanted) = &wanted
            && let Some(missing) = wanted
                .iter()
                .find(|id| !members.iter().any(|m| m.device_id == **id))
        {
            return Err(ApiError::bad_request(format!(
                "device {missing} is not a trusted device that the selector and this token cover"
            )));
        }
        if members.len() > crate::batches::MAX_BATCH_DEVICES {
            return Err(ApiError::bad_request(format!(
                "the selector matches {} devices; a batch covers at most {}",
                members.len(),
                crate::batches::MAX_BATCH_DEVICES
            )));
        }
        // Each invocation keeps its own copy of the input (in memory until it ends, then in
        // the store), so the batch as a whole is bounded, not only each input.
        let copies = input.len().saturating_mul(members.len());
        if copies > crate::batches::MAX_BATCH_INPUT_BYTES {
            return Err(ApiError::bad_request(format!(
                "the input ({} bytes) times the {} devices matched is over {} MiB; send a \
                 smaller input or address fewer devices",
                input.len(),
                members.len(),
                crate::batches::MAX_BATCH_INPUT_BYTES >> 20
            )));
        }
        members.sort_by_key(|m| m.device_id);
        let record = BatchRecord {
            id: new_invocation_id(now).0,
            selector: req.selector.to_string(),
            capability: req.capability,
            input,
            requested_by: trust::actor(who),
            created_at_ms: now,
            deadline_ms: now.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            max_concurrency: req.max_concurrency,
            members,
            finished_at_ms: None,
        };
        crate::batches::create(s, record.clone())
            .await
            .map_err(|e| api_error(TrustError::Store(e)))?;
        Ok(crate::batches::view_new(&record))
    }

    async fn list_batches(&self, limit: usize) -> ApiResult<Vec<BatchInfo>> {
        self.blocking(move |s| {
            let mut out = Vec::new();
            for b in s.stores.runtime.batches_newest(limit)? {
                out.push(crate::batches::view(s, &b)?.info);
            }
            Ok(out)
        })
        .await
    }

    async fn batch(&self, id: BatchId) -> ApiResult<Batch> {
        self.blocking(move |s| {
            let record = s
                .stores
                .runtime
                .batch(&id.0)?
                .ok_or_else(|| TrustError::NotFound(format!("batch {id}")))?;
            Ok(crate::batches::view(s, &record)?)
        })
        .await
    }

    async fn list_invocations(&self, query: InvocationQuery) -> ApiResult<Vec<Invocation>> {
        let device = query.device_id;
        let limit = query.limit.unwrap_or(100).clamp(1, 1000);
        self.blocking(move |s| {
            let list = s
                .invocations
                .newest(limit, &|r| device.is_none_or(|d| d == r.device_id))?;
            Ok(list.iter().map(crate::inventory::invocation_api).collect())
        })
        .await
    }

    async fn history(&self, id: DeviceId, hours: u32) -> ApiResult<History> {
        let s = &self.services;
        let now = s.clock.now_ms();
        let from = now.saturating_sub(u64::from(hours) * 3_600_000);
        let h = s.history.view(&id, from);
        Ok(History {
            device_id: id,
            from: to_odt(from),
            to: to_odt(now),
            interval_s: s.history.limits().interval.as_secs_f64(),
            samples: h
                .samples
                .iter()
                .map(|x| HistorySample {
                    at: to_odt(x.at_ms),
                    rtt_ms: x.rtt_ms,
                    loss: x.loss,
                    heartbeat_age_s: x.heartbeat_age_ms.map(|ms| ms as f64 / 1000.0),
                    presence: x.presence,
                })
                .collect(),
            presence: h
                .presence
                .iter()
                .map(|(at, p)| PresenceChange {
                    at: to_odt(*at),
                    presence: *p,
                })
                .collect(),
        })
    }

    async fn audit(&self, query: AuditQuery) -> ApiResult<Vec<AuditEntry>> {
        let limit = query.limit.unwrap_or(100).clamp(1, 1000);
        let ms = |t: Option<time::OffsetDateTime>| {
            t.map(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
        };
        let (since, until) = (ms(query.since), ms(query.until));
        self.blocking(move |s| {
            let entries = s.trust.audit_log(limit, &|r| {
                query
                    .target
                    .as_deref()
                    .is_none_or(|t| t == r.target || t == r.detail)
                    && query.keeps_actor(&r.actor)
                    && query.keeps_action(&r.action)
                    && since.is_none_or(|t| r.at_ms >= t)
                    && until.is_none_or(|t| r.at_ms < t)
            })?;
            Ok(entries
                .into_iter()
                .map(|r| AuditEntry {
                    at: to_odt(r.at_ms),
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
        self.blocking(move |s| {
            s.invocations
                .get(&id)?
                .map(|r| crate::inventory::invocation_api(&r))
                .ok_or_else(|| TrustError::NotFound(format!("invocation {id}")))
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.services.events.subscribe()
    }

    async fn policy(&self) -> ApiResult<PolicyInfo> {
        Ok(policy_api(&self.services.policy.current()))
    }

    async fn policy_history(&self, limit: usize) -> ApiResult<Vec<PolicyVersionInfo>> {
        self.blocking(move |s| {
            Ok(s.trust
                .policy_history(limit)?
                .into_iter()
                .map(|r| PolicyVersionInfo {
                    version: r.version,
                    text: r.text,
                    updated_at: to_odt(r.updated_ms),
                    updated_by: r.updated_by,
                })
                .collect())
        })
        .await
    }

    async fn set_policy(
        &self,
        who: &Principal,
        text: String,
    ) -> Result<PolicyInfo, anchorage_console::error::SetPolicyError> {
        let who = who.clone();
        let services = self.services.clone();
        let set = tokio::task::spawn_blocking(move || services.trust.set_policy(&who, &text))
            .await
            .map_err(|e| {
                warn!(error = %e, "backend task failed");
                ApiError::internal()
            })?;
        let next = match set {
            Ok(next) => next,
            Err(TrustError::InvalidPolicy(errors)) => {
                return Err(anchorage_console::error::SetPolicyError::Invalid(
                    errors
                        .into_iter()
                        .map(|e| PolicyProblem {
                            line: e.line,
                            column: e.column,
                            message: e.message,
                        })
                        .collect(),
                ));
            }
            Err(e) => return Err(api_error(e).into()),
        };
        let info = policy_api(&next);
        let event = AnchorEvent::Policy {
            version: next.version,
            updated_by: next.updated_by.clone(),
        };
        // In force on this anchor at once; other anchors hear it from the store's watch.
        if self.services.policy.replace(next) {
            self.services.events.publish(event);
        }
        Ok(info)
    }

    async fn policy_test(
        &self,
        from: DeviceId,
        to: DeviceId,
        action: PolicyAction,
    ) -> ApiResult<PolicyTestResult> {
        let (from_view, to_view) = (self.device(from).await?, self.device(to).await?);
        let current = self.services.policy.current();
        let decision = match &action {
            PolicyAction::Capability(c) => current.policy.decide(
                &from_view.labels,
                &to_view.labels,
                crate::policy::Action::Capability(c),
            ),
            PolicyAction::Service(s) => current.policy.decide(
                &from_view.labels,
                &to_view.labels,
                crate::policy::Action::Service(s),
            ),
        };
        let (capability, service) = match action {
            PolicyAction::Capability(c) => (Some(c), None),
            PolicyAction::Service(s) => (None, Some(s)),
        };
        Ok(PolicyTestResult {
            allowed: decision.allowed,
            rule: decision.rule.map(|i| i + 1),
            line: decision.line,
            name: decision.name,
            reason: decision.reason,
            from: PolicyPeer {
                device_id: from,
                name: from_view.name,
            },
            to: PolicyPeer {
                device_id: to,
                name: to_view.name,
            },
            capability,
            service,
            version: current.version,
        })
    }

    async fn metrics(&self, format: anchorage_console::MetricsFormat) -> String {
        let s = self.services.clone();
        tokio::task::spawn_blocking(move || crate::metrics_text(&s, format))
            .await
            .unwrap_or_default()
    }

    fn http_request(&self, request: &anchorage_console::metrics_layer::HttpObservation<'_>) {
        self.services.metrics.http_request(request);
    }

    fn ready(&self) -> bool {
        !self.services.cancel.is_cancelled()
    }

    fn qr_svg(&self, text: &str) -> ApiResult<String> {
        qr_svg(text).ok_or_else(|| ApiError::bad_request("text too long for a QR code"))
    }
}

/// Checks a capability name and input for an invocation; returns the input encoded.
fn check_invocation(capability: &str, input: &serde_json::Value) -> ApiResult<Vec<u8>> {
    if capability.is_empty() || capability.len() > anchorage_wire::limits::MAX_NAME_LEN {
        return Err(ApiError::bad_request("capability must be 1-128 bytes"));
    }
    let input =
        serde_json::to_vec(input).map_err(|_| ApiError::bad_request("input is not JSON"))?;
    if input.len() > anchorage_wire::limits::MAX_INVOKE_INPUT {
        return Err(ApiError::bad_request(format!(
            "input is {} bytes; the limit is {}",
            input.len(),
            anchorage_wire::limits::MAX_INVOKE_INPUT
        )));
    }
    Ok(input)
}

/// A new invocation id: a UUID v7 on the anchor's clock, so ids (and the store's keys) sort by
/// creation time, ids made in the same millisecond keep their order (its counter), and the rest
/// is random (unguessable, unique across restarts).
fn new_invocation_id(now_ms: u64) -> InvocationId {
    static CONTEXT: std::sync::Mutex<uuid::ContextV7> =
        std::sync::Mutex::new(uuid::ContextV7::new());
    let nanos = u32::try_from((now_ms % 1000) * 1_000_000).unwrap_or(0);
    let ts = uuid::Timestamp::from_unix(&CONTEXT, now_ms / 1000, nanos);
    InvocationId(*uuid::Uuid::new_v7(ts).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_ids_sort_by_creation_time_and_differ_within_a_millisecond() {
        let a = new_invocation_id(1_700_000_000_000);
        let b = new_invocation_id(1_700_000_000_000);
        let c = new_invocation_id(1_700_000_000_001);
        assert!(a.0 < b.0 && b.0 < c.0, "{a} {b} {c}");
        // The first 48 bits are the creation time in milliseconds.
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&c.0[..6]);
        assert_eq!(u64::from_be_bytes(ms), 1_700_000_000_001);
    }
}
