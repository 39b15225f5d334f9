//! Views for operators: nodes, inventory and invocations as the console API shows them.

use std::time::Duration;

use anchorage_console::api::{
    self, Capability, CapabilitySummary, Instance, Inventory, InventoryDevice, InventorySummary,
    Invocation, Node,
};
use anchorage_mesh::DeviceId;
use anchorage_wire::invoke::InvocationId;

use crate::anchor::Anchor;
use crate::backend::{device_api, request_api};
use crate::clock::to_odt;
use crate::records::{
    DeviceRecord, DeviceTrust, InvocationRecord, InvocationState, RequestRecord, RequestState,
};
use crate::runtime::{NodeState, thresholds};

/// Certificates with less than this left are flagged.
pub const CERT_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

fn node_api(anchor: &Anchor, id: &DeviceId, s: &NodeState, now_ms: u64) -> Option<Node> {
    let record = s.record.as_ref()?;
    let t = thresholds(&anchor.shared.config);
    let live = s.live.as_ref();
    Some(Node {
        device_id: *id,
        name: record.name.clone(),
        platform: record.platform.clone(),
        agent_version: record.agent_version.clone(),
        presence: s.presence(now_ms, &t),
        connected: live.is_some(),
        connected_since: live.map(|l| to_odt(l.since_ms)),
        last_seen_at: s.last_seen_ms.map(to_odt),
        heartbeat_age_ms: s.last_seen_ms.map(|t| now_ms.saturating_sub(t)),
        loss_rate: live.and_then(|_| s.window.loss()),
        rtt_ms: live.map(|l| l.conn.rtt().as_secs_f64() * 1000.0),
        remote_addr: live.map(|l| l.conn.remote_address().to_string()),
        capabilities: record
            .capabilities
            .iter()
            .map(|c| Capability {
                name: c.name.clone(),
                available: c.available,
                reason: c.reason.clone(),
                description: c.description.clone(),
            })
            .collect(),
    })
}

/// Every registered node.
pub fn nodes(anchor: &Anchor) -> Vec<Node> {
    let now = anchor.now_ms();
    let nodes = anchor
        .shared
        .runtime
        .nodes
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut list: Vec<Node> = nodes
        .iter()
        .filter_map(|(id, s)| node_api(anchor, id, s, now))
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name).then(a.device_id.cmp(&b.device_id)));
    list
}

/// One node.
pub fn node(anchor: &Anchor, id: &DeviceId) -> Option<Node> {
    let now = anchor.now_ms();
    let nodes = anchor
        .shared
        .runtime
        .nodes
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    nodes.get(id).and_then(|s| node_api(anchor, id, s, now))
}

fn entry(
    anchor: &Anchor,
    device_id: DeviceId,
    device: Option<&DeviceRecord>,
    pending: Vec<&RequestRecord>,
    now_ms: u64,
) -> InventoryDevice {
    let node = node(anchor, &device_id);
    let trust = match device {
        Some(d) if d.trust == DeviceTrust::Trusted => api::TrustState::Trusted,
        Some(_) => api::TrustState::Revoked,
        None if !pending.is_empty() => api::TrustState::Pending,
        None => api::TrustState::Unknown,
    };
    let presence = node.as_ref().map_or(api::Presence::Unknown, |n| n.presence);
    let caps = node.as_ref().map(|n| {
        let available = n.capabilities.iter().filter(|c| c.available).count() as u32;
        CapabilitySummary {
            total: n.capabilities.len() as u32,
            available,
            unavailable: n.capabilities.len() as u32 - available,
        }
    });
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
        .is_some_and(|l| l > anchor.shared.config.presence.degraded_loss)
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
    let mut actions = Vec::new();
    match trust {
        api::TrustState::Trusted => {
            actions.extend(["invoke", "rotate", "revoke"].map(String::from))
        }
        api::TrustState::Revoked => actions.push("remove".into()),
        _ => {}
    }
    if !pending.is_empty() {
        actions.extend(["approve", "reject"].map(String::from));
    }
    let name = device
        .map(|d| d.name.clone())
        .or_else(|| node.as_ref().map(|n| n.name.clone()))
        .or_else(|| pending.first().map(|r| r.device_name.clone()))
        .unwrap_or_default();
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
        device: device.map(device_api),
        pending_pairings: pending.iter().map(|r| request_api(r, now_ms)).collect(),
        node,
    }
}

fn pending_of<'a>(
    requests: &'a [RequestRecord],
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
        .collect()
}

/// The whole inventory (blocking: reads the store).
pub fn inventory(
    anchor: &Anchor,
    devices: Vec<DeviceRecord>,
    requests: Vec<RequestRecord>,
) -> Inventory {
    let now = anchor.now_ms();
    let mut ids: Vec<DeviceId> = devices.iter().map(|d| d.device_id).collect();
    for r in &requests {
        if r.state == RequestState::PendingApproval
            && r.expires_at_ms > now
            && !ids.contains(&r.device_id)
        {
            ids.push(r.device_id);
        }
    }
    {
        let nodes = anchor
            .shared
            .runtime
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for id in nodes.keys() {
            if !ids.contains(id) && devices.iter().any(|d| d.device_id == *id) {
                ids.push(*id);
            }
        }
    }
    let list: Vec<InventoryDevice> = ids
        .iter()
        .map(|id| {
            let device = devices.iter().find(|d| d.device_id == *id);
            entry(anchor, *id, device, pending_of(&requests, id, now), now)
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
    summary.pending_pairings = requests
        .iter()
        .filter(|r| r.state == RequestState::PendingApproval && r.expires_at_ms > now)
        .count() as u64;
    let mut sorted = list;
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.device_id.cmp(&b.device_id)));
    Inventory {
        summary,
        devices: sorted,
        instances: vec![instance(anchor)],
    }
}

/// One device's inventory entry.
pub fn inventory_device(
    anchor: &Anchor,
    id: DeviceId,
    device: Option<DeviceRecord>,
    requests: Vec<RequestRecord>,
) -> Option<InventoryDevice> {
    let now = anchor.now_ms();
    let pending = pending_of(&requests, &id, now);
    let known = device.is_some() || !pending.is_empty();
    known.then(|| entry(anchor, id, device.as_ref(), pending, now))
}

/// The anchor instance record.
pub fn instance(anchor: &Anchor) -> Instance {
    let now = anchor.now_ms();
    let (quic, console) = *anchor
        .shared
        .bound
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let ca = anchor.shared.ca.info();
    let mut warnings = Vec::new();
    if anchor.shared.ca.expiry_warning(anchor.now()).is_some() {
        warnings.push("ca_near_expiry".to_string());
    }
    Instance {
        kind: "anchor".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: to_odt(anchor.shared.started_at_ms),
        uptime_secs: now.saturating_sub(anchor.shared.started_at_ms) / 1000,
        connected_nodes: anchor.shared.runtime.connected() as u64,
        store_bytes: anchor.shared.store.disk_space(),
        listen: quic.map_or_else(
            || anchor.shared.config.listen.to_string(),
            |a| a.to_string(),
        ),
        console: console.map_or_else(
            || anchor.shared.config.console.to_string(),
            |a| a.to_string(),
        ),
        ca_fingerprint: anchor.shared.ca.fingerprint().to_string(),
        ca_expires_at: to_odt(crate::clock::to_ms(ca.not_after)),
        warnings,
    }
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
