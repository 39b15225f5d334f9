//! Views for operators: nodes, inventory and invocations as the console API shows them.

use std::time::Duration;

use anchorage_console::api::{
    self, Capability, CapabilitySummary, Instance, Inventory, InventoryDevice, InventorySummary,
    Invocation, Node,
};
use anchorage_mesh::DeviceId;
use anchorage_wire::invoke::InvocationId;

use crate::clock::to_odt;
use crate::nodes::{Node as NodeState, SessionHandle};
use crate::records::{
    CodeMethod, CodeRecord, DeviceRecord, DeviceTrust, InvocationRecord, InvocationState, Labels,
    RequestRecord, RequestState,
};
use crate::services::Services;
use crate::trust::directory::DirectoryView;
use crate::trust::{code_state, request_state};

/// Certificates with less than this left are flagged.
pub const CERT_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// How much of each inventory entry to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// What filters, orders and counts entries: no `device` or `node` part, no `actions`, and
    /// the labels only if asked for (a selector, a token's scope or a search reads them).
    /// [`details`] completes the entries of a page.
    Outline {
        /// Whether to build each entry's labels.
        labels: bool,
    },
    /// Everything.
    Full,
}

fn node_api(
    t: &anchorage_mesh::presence::Thresholds,
    me: &str,
    id: &DeviceId,
    s: &NodeState<SessionHandle>,
    now_ms: u64,
) -> Option<Node> {
    node_view(t, me, id, s, now_ms, Detail::Full).map(|(node, _)| node)
}

/// A node as the API shows it, and the count of its capabilities; in outline without the
/// parts only a full entry shows (the list of capabilities, the platform, the remote address,
/// the anchor holding it): an outline's node is read by its entry and dropped, ten thousand
/// times per inventory page.
fn node_view(
    t: &anchorage_mesh::presence::Thresholds,
    me: &str,
    id: &DeviceId,
    s: &NodeState<SessionHandle>,
    now_ms: u64,
    detail: Detail,
) -> Option<(Node, CapabilitySummary)> {
    let record = s.record.as_ref()?;
    let available = record.capabilities.iter().filter(|c| c.available).count() as u32;
    let total = record.capabilities.len() as u32;
    let caps = CapabilitySummary {
        total,
        available,
        unavailable: total - available,
    };
    let full = detail == Detail::Full;
    let live = s.live.as_ref();
    let remote = s.remote.as_ref().filter(|_| live.is_none());
    let node = Node {
        device_id: *id,
        name: record.name.clone(),
        platform: if full {
            record.platform.clone()
        } else {
            String::new()
        },
        agent_version: record.agent_version.clone(),
        presence: s.presence(now_ms, t),
        connected: s.connected(),
        connected_since: live
            .map(|l| l.since_ms)
            .or(remote.map(|r| r.since_ms))
            .map(to_odt),
        last_seen_at: s.last_seen_ms.map(to_odt),
        heartbeat_age_ms: s.last_seen_ms.map(|t| now_ms.saturating_sub(t)),
        loss_rate: live.and_then(|_| s.window.loss()),
        rtt_ms: live.map(|l| l.handle.conn.rtt().as_secs_f64() * 1000.0),
        remote_addr: live
            .filter(|_| full)
            .map(|l| l.handle.conn.remote_address().to_string()),
        capabilities: match detail {
            Detail::Outline { .. } => Vec::new(),
            Detail::Full => record
                .capabilities
                .iter()
                .map(|c| Capability {
                    name: c.name.clone(),
                    available: c.available,
                    reason: c.reason.clone(),
                    description: c.description.clone(),
                })
                .collect(),
        },
        anchor: match (live, remote) {
            _ if !full => None,
            (Some(_), _) => Some(me.to_string()),
            (None, Some(r)) => Some(r.instance.clone()),
            (None, None) => None,
        },
    };
    Some((node, caps))
}

/// Every registered node.
pub fn nodes(services: &Services) -> Vec<Node> {
    let mut list: Vec<Node> = nodes_unsorted(services, services.clock.now_ms());
    list.sort_by(|a, b| a.name.cmp(&b.name).then(a.device_id.cmp(&b.device_id)));
    list
}

/// Every registered node, under one hold of the node table.
fn nodes_unsorted(services: &Services, now_ms: u64) -> Vec<Node> {
    let nodes = services.nodes.lock();
    let t = nodes.settings().thresholds;
    nodes
        .iter()
        .filter_map(|(id, s)| node_api(&t, &services.instance_id, id, s, now_ms))
        .collect()
}

/// Every registered node with its capability count, by device, under one hold of the table.
fn node_views(
    services: &Services,
    now_ms: u64,
    detail: Detail,
) -> std::collections::HashMap<DeviceId, (Node, CapabilitySummary)> {
    let nodes = services.nodes.lock();
    let t = nodes.settings().thresholds;
    nodes
        .iter()
        .filter_map(|(id, s)| {
            node_view(&t, &services.instance_id, id, s, now_ms, detail).map(|v| (*id, v))
        })
        .collect()
}

/// One node.
pub fn node(services: &Services, id: &DeviceId) -> Option<Node> {
    full_node(services, id).map(|(node, _)| node)
}

/// What every entry of one inventory reads alike.
struct EntryContext {
    now_ms: u64,
    detail: Detail,
    /// Heartbeat loss above which a node is flagged `high_loss`.
    degraded_loss: f64,
}

fn entry(
    cx: &EntryContext,
    device_id: DeviceId,
    device: Option<&DeviceRecord>,
    labels: Option<&Labels>,
    pending: Vec<&RequestRecord>,
    node: Option<(Node, CapabilitySummary)>,
) -> InventoryDevice {
    let now_ms = cx.now_ms;
    let (node, caps) = node.unzip();
    let trust = match device {
        Some(d) if d.trust == DeviceTrust::Trusted => api::TrustState::Trusted,
        Some(_) => api::TrustState::Revoked,
        None if !pending.is_empty() => api::TrustState::Pending,
        None => api::TrustState::Unknown,
    };
    let presence = node.as_ref().map_or(api::Presence::Unknown, |n| n.presence);
    let mut warnings = Vec::new();
    match presence {
        api::Presence::Stale => warnings.push("stale".to_string()),
        api::Presence::Offline => warnings.push("offline".to_string()),
        api::Presence::Unknown if trust == api::TrustState::Trusted => {
            warnings.push("not_registered".to_string())
        }
        _ => {}
    }
    if caps.is_some_and(|c| c.unavailable > 0) {
        warnings.push("capabilities_unavailable".into());
    }
    if node
        .as_ref()
        .and_then(|n| n.loss_rate)
        .is_some_and(|l| l > cx.degraded_loss)
    {
        warnings.push("high_loss".into());
    }
    if let Some(d) = device {
        let left = d.cert_not_after_ms.saturating_sub(now_ms);
        if d.trust == DeviceTrust::Trusted && Duration::from_millis(left) < CERT_WARNING {
            warnings.push("certificate_near_expiry".into());
        }
        if d.rotation_pending {
            warnings.push("rotation_pending".into());
        }
    }
    let name = device
        .map(|d| d.name.clone())
        .or_else(|| node.as_ref().map(|n| n.name.clone()))
        .or_else(|| pending.first().map(|r| r.device_name.clone()))
        .unwrap_or_default();
    let version = node.as_ref().map(|n| n.agent_version.as_str());
    let full = cx.detail == Detail::Full;
    let labels = device
        .filter(|_| cx.detail != Detail::Outline { labels: false })
        .map(|d| labels_api(d, labels, version))
        .unwrap_or_default();
    let actions = if full {
        actions(trust, !pending.is_empty())
    } else {
        Vec::new()
    };
    InventoryDevice {
        device_id,
        name,
        trust,
        presence,
        heartbeat_age_ms: node.as_ref().and_then(|n| n.heartbeat_age_ms),
        loss_rate: node.as_ref().and_then(|n| n.loss_rate),
        rtt_ms: node.as_ref().and_then(|n| n.rtt_ms),
        capabilities: caps.unwrap_or_default(),
        warnings,
        actions,
        connected: node.as_ref().is_some_and(|n| n.connected),
        connected_since: node.as_ref().and_then(|n| n.connected_since),
        last_seen_at: node.as_ref().and_then(|n| n.last_seen_at),
        cert_expires_at: device.map(|d| to_odt(d.cert_not_after_ms)),
        device: device
            .filter(|_| full)
            .map(|d| Box::new(device_with(d, labels.clone()))),
        labels,
        pending_pairings: pending.iter().map(|r| request_api(r, now_ms)).collect(),
        node: node.filter(|_| full).map(Box::new),
        peers: Vec::new(),
    }
}

/// What an operator may do with a device of `trust`, with or without a pairing request pending.
fn actions(trust: api::TrustState, pending: bool) -> Vec<String> {
    let mut actions = Vec::new();
    match trust {
        api::TrustState::Trusted => {
            actions.extend(["invoke", "rotate", "revoke"].map(String::from))
        }
        api::TrustState::Revoked => actions.push("remove".into()),
        _ => {}
    }
    if pending {
        actions.extend(["approve", "reject"].map(String::from));
    }
    actions
}

fn pending_of<'a>(
    requests: &'a [std::sync::Arc<RequestRecord>],
    id: &DeviceId,
    now_ms: u64,
) -> Vec<&'a RequestRecord> {
    requests
        .iter()
        .filter(|r| {
            r.device_id == *id
                && r.state == RequestState::PendingApproval
                && r.expires_at_ms > now_ms
        })
        .map(|r| &**r)
        .collect()
}

/// The whole inventory, or its outline (see [`Detail`]), of the devices and pending requests
/// in `dir`.
pub fn inventory(services: &Services, dir: &DirectoryView, detail: Detail) -> Inventory {
    let now = services.clock.now_ms();
    // Every device, and every device with a pending request; each looked up once.
    let mut pending: std::collections::HashMap<DeviceId, Vec<&RequestRecord>> =
        std::collections::HashMap::new();
    // The directory holds only requests pending approval and not expired.
    for r in &dir.pending {
        pending.entry(r.device_id).or_default().push(r);
    }
    let by_id: std::collections::HashMap<DeviceId, &DeviceRecord> =
        dir.devices.iter().map(|d| (d.device_id, &**d)).collect();
    let mut ids: Vec<DeviceId> = dir.devices.iter().map(|d| d.device_id).collect();
    ids.extend(pending.keys().filter(|id| !by_id.contains_key(id)));
    // The node table held once for the whole fleet, not once per device.
    let mut nodes = node_views(services, now, detail);
    let cx = EntryContext {
        now_ms: now,
        detail,
        degraded_loss: services.nodes.thresholds().degraded_loss,
    };
    let list: Vec<InventoryDevice> = ids
        .iter()
        .map(|id| {
            let device = by_id.get(id).copied();
            let p = pending.get(id).cloned().unwrap_or_default();
            let labels = dir.labels.get(id).map(|l| &**l);
            entry(&cx, *id, device, labels, p, nodes.remove(id))
        })
        .collect();
    let mut summary = InventorySummary {
        devices: list.len() as u64,
        ..Default::default()
    };
    for d in &list {
        match d.trust {
            api::TrustState::Trusted => summary.trusted += 1,
            api::TrustState::Revoked => summary.revoked += 1,
            _ => {}
        }
        match d.presence {
            api::Presence::Online => summary.online += 1,
            api::Presence::Degraded => summary.degraded += 1,
            api::Presence::Stale => summary.stale += 1,
            api::Presence::Offline => summary.offline += 1,
            api::Presence::Unknown => {}
        }
        summary.connected += u64::from(d.connected);
        summary.with_warnings += u64::from(!d.warnings.is_empty());
    }
    summary.pending_pairings = dir.pending.len() as u64;
    let mut sorted = list;
    api::InventorySort::default().sort(&mut sorted);
    Inventory {
        summary,
        devices: sorted,
        instances: instances(services),
        stale_since: services.stores.runtime.stale_since().map(to_odt),
        page: None,
    }
}

/// One device's inventory entry.
pub fn inventory_device(
    services: &Services,
    id: DeviceId,
    device: Option<DeviceRecord>,
    labels: &Labels,
    requests: &[std::sync::Arc<RequestRecord>],
) -> Option<InventoryDevice> {
    let now = services.clock.now_ms();
    let pending = pending_of(requests, &id, now);
    let known = device.is_some() || !pending.is_empty();
    let cx = EntryContext {
        now_ms: now,
        detail: Detail::Full,
        degraded_loss: services.nodes.thresholds().degraded_loss,
    };
    known.then(|| {
        let node = full_node(services, &id);
        entry(&cx, id, device.as_ref(), Some(labels), pending, node)
    })
}

/// One node in full, with its capability count.
fn full_node(services: &Services, id: &DeviceId) -> Option<(Node, CapabilitySummary)> {
    let now = services.clock.now_ms();
    let nodes = services.nodes.lock();
    let t = nodes.settings().thresholds;
    nodes
        .node(id)
        .and_then(|s| node_view(&t, &services.instance_id, id, s, now, Detail::Full))
}

/// Completes outline entries: their `device` and `node` parts, labels and actions (from the
/// trust directory and the node table). The labels are built again even when the outline had
/// them: a page is at most a thousand entries, and one path is simpler than two.
pub fn details(services: &Services, mut entries: Vec<InventoryDevice>) -> Vec<InventoryDevice> {
    for e in &mut entries {
        if e.node.is_none() {
            e.node = node(services, &e.device_id).map(Box::new);
        }
        let record = services.trust.directory_device(&e.device_id);
        if let Some(d) = &record {
            let own = services.trust.directory_labels(&e.device_id);
            let version = e.node.as_ref().map(|n| n.agent_version.as_str());
            e.labels = labels_api(d, Some(&own), version);
        }
        e.actions = actions(e.trust, !e.pending_pairings.is_empty());
        if e.device.is_none() {
            e.device = record.map(|d| Box::new(device_with(&d, e.labels.clone())));
        }
    }
    entries
}

/// The anchor instance record.
pub fn instance(services: &Services) -> Instance {
    let now = services.clock.now_ms();
    let (quic, console) = services.bound();
    let ca_authority = services.trust.ca();
    let ca = ca_authority.info();
    let mut warnings = Vec::new();
    if ca_authority.expiry_warning(services.clock.now()).is_some() {
        warnings.push("ca_near_expiry".to_string());
    }
    Instance {
        kind: "anchor".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: to_odt(services.started_at_ms),
        uptime_secs: now.saturating_sub(services.started_at_ms) / 1000,
        connected_nodes: services.nodes.counts().1,
        store_bytes: services.stores.runtime.disk_space(),
        listen: quic.map_or_else(|| services.config.listen.to_string(), |a| a.to_string()),
        console: console.map_or_else(|| services.config.console.to_string(), |a| a.to_string()),
        ca_fingerprint: ca_authority.fingerprint().to_string(),
        ca_expires_at: to_odt(crate::clock::to_ms(ca.not_after)),
        warnings,
        id: services.instance_id.clone(),
        store: match services.config.store {
            crate::config::StoreChoice::Fjall => "fjall".into(),
            crate::config::StoreChoice::Etcd(_) => "etcd".into(),
        },
        lease: (*services.lease.lock().unwrap_or_else(|e| e.into_inner())).to_string(),
        node_addr: services.public_addr(),
    }
}

/// Every live anchor of the mesh (blocking): those announced in the store, this one as it is
/// now, oldest first.
pub fn instances(services: &Services) -> Vec<Instance> {
    let me = instance(services);
    let mut all: Vec<Instance> = services
        .stores
        .runtime
        .announced()
        .unwrap_or_default()
        .iter()
        .filter_map(|bytes| serde_json::from_slice::<Instance>(bytes).ok())
        .filter(|i| i.id != me.id)
        // Listed at all, an announcement is under a live lease.
        .map(|i| Instance {
            lease: "held".into(),
            ..i
        })
        .collect();
    all.push(me);
    all.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
    all
}

/// An invocation as the API shows it.
pub fn invocation_api(r: &InvocationRecord) -> Invocation {
    let output = (r.state.is_final()
        && (!r.output.is_empty() || r.state == InvocationState::Succeeded))
        .then(|| {
            serde_json::from_slice(&r.output).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&r.output).into_owned())
            })
        });
    Invocation {
        invocation_id: InvocationId(r.id),
        device_id: r.device_id,
        capability: r.capability.clone(),
        state: r.state,
        output,
        truncated: r.truncated,
        error: r.error.clone(),
        requested_by: r.requested_by.clone(),
        created_at: to_odt(r.created_at_ms),
        deadline_at: to_odt(r.deadline_ms),
        dispatched_at: r.dispatched_at_ms.map(to_odt),
        finished_at: r.finished_at_ms.map(to_odt),
        duration_ms: r.duration_ms,
    }
}

/// Why `capability` cannot run on `device` now, if it cannot: the node registered without it,
/// or reports it unavailable. (A node never seen registering gets the work queued.)
pub fn rejection(services: &Services, device: &DeviceId, capability: &str) -> Option<String> {
    let nodes = services.nodes.lock();
    let record = nodes.node(device)?.record.as_ref()?;
    match record.capabilities.iter().find(|c| c.name == capability) {
        None => Some(format!(
            "the node has no capability {capability}; it has: {}",
            match record.capabilities.len() {
                0 => "none".to_string(),
                _ => record
                    .capabilities
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        )),
        Some(c) if !c.available => Some(format!(
            "{capability} is unavailable on the node: {}",
            c.reason.clone().unwrap_or_else(|| "no reason given".into())
        )),
        Some(_) => None,
    }
}

/// A device's labels as the API shows them: the operator's, and the facts the device
/// reported under the reserved prefix (`node.anchorage/platform`, `/os`, `/arch` from its
/// pairing, `/agent-version` from its last registration).
pub fn labels_api(
    d: &DeviceRecord,
    labels: Option<&Labels>,
    agent_version: Option<&str>,
) -> Labels {
    use anchorage_wire::labels::{RESERVED_PREFIX, fact_value};
    let mut out = labels.cloned().unwrap_or_default();
    let mut fact = |name: &str, value: &str| {
        let value = fact_value(value);
        if !value.is_empty() {
            out.insert(format!("{RESERVED_PREFIX}/{name}"), value);
        }
    };
    fact("platform", &d.platform);
    if let Some((os, arch)) = d.platform.split_once('-') {
        fact("os", os);
        fact("arch", arch);
    }
    if let Some(v) = agent_version {
        fact("agent-version", v);
    }
    out
}

/// The agent version a device's node last registered with, if it ever did.
pub fn agent_version(s: &Services, device: &DeviceId) -> Option<String> {
    let nodes = s.nodes.lock();
    Some(nodes.node(device)?.record.as_ref()?.agent_version.clone())
}

/// A device as the API shows it, with its labels.
pub fn device_api(
    d: &DeviceRecord,
    labels: Option<&Labels>,
    agent_version: Option<&str>,
) -> api::Device {
    device_with(d, labels_api(d, labels, agent_version))
}

/// A device as the API shows it, with the labels [`labels_api`] made for it.
fn device_with(d: &DeviceRecord, labels: Labels) -> api::Device {
    api::Device {
        labels,
        device_id: d.device_id,
        name: d.name.clone(),
        trust: match d.trust {
            DeviceTrust::Trusted => api::TrustState::Trusted,
            DeviceTrust::Revoked => api::TrustState::Revoked,
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

/// A pairing request as the API shows it at `now_ms`.
pub fn request_api(r: &RequestRecord, now_ms: u64) -> api::PairingRequest {
    api::PairingRequest {
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

/// A pairing code as the API shows it at `now_ms`.
pub fn code_api(c: &CodeRecord, labels: Option<&Labels>, now_ms: u64) -> api::PairingCodeInfo {
    api::PairingCodeInfo {
        labels: labels.cloned().unwrap_or_default(),
        code_id: c.code_id.clone(),
        method: match c.method {
            CodeMethod::Pin => api::PairMethod::Pin,
            CodeMethod::Qr => api::PairMethod::Qr,
        },
        state: code_state(c, now_ms),
        failed_attempts: c.failed_attempts,
        created_at: to_odt(c.created_at_ms),
        expires_at: to_odt(c.expires_at_ms),
        created_by: c.created_by.clone(),
    }
}

/// A token as the API shows it (never its secret).
pub fn token_api(t: &crate::trust::TokenEntry) -> api::TokenInfo {
    let r = &t.record;
    api::TokenInfo {
        id: r.id.clone(),
        name: r.name.clone(),
        permissions: r
            .permissions
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        scope: api::Scope {
            selector: t.limits.selector.parse().unwrap_or_default(),
            capabilities: t.limits.capabilities.clone(),
        },
        expires_at: t.limits.expires_at_ms.map(to_odt),
        last_used_at: t.last_used_ms.map(to_odt),
        created_at: to_odt(r.created_at_ms),
        created_by: r.created_by.clone(),
        revoked_at: r.revoked_at_ms.map(to_odt),
    }
}
