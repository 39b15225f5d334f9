//! The event bus: every change the anchor announces, as one typed enum.
//!
//! Services publish [`AnchorEvent`]s; the bus numbers them, stamps them and turns each into
//! the console's wire form ([`anchorage_console::api::Event`]: a `kind` string and JSON data)
//! once, at publish time, for every subscriber. The kinds and fields are a contract with
//! scripts reading `GET /console/v1/events`.

use std::sync::atomic::{AtomicU64, Ordering};

use anchorage_console::api::Event;
use anchorage_mesh::DeviceId;
use anchorage_mesh::presence::Presence;
use anchorage_wire::invoke::InvocationId;
use serde_json::json;
use tokio::sync::broadcast;

use crate::clock::{Clock, to_odt};
use crate::records::InvocationState;

/// Events buffered per subscriber before it lags.
pub const EVENT_BUFFER: usize = 1024;

/// A change the anchor announces.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AnchorEvent {
    /// `pairing.code`: an operator minted a code.
    CodeMinted {
        /// The code's public id.
        code_id: String,
    },
    /// `pairing.requested`: a node proved a code and waits for approval.
    PairingRequested {
        /// The device asking.
        device: DeviceId,
        /// The request.
        request_id: String,
        /// Name the node asked for.
        device_name: String,
        /// Short authentication string to compare.
        sas: String,
    },
    /// `pairing.decided`: approved (`approved: true`) or rejected.
    PairingDecided {
        /// The device concerned.
        device: DeviceId,
        /// The request.
        request_id: String,
        /// Whether it was approved.
        approved: bool,
    },
    /// `pairing.completed`: the node received its certificate.
    PairingCompleted {
        /// The device.
        device: DeviceId,
        /// The request.
        request_id: String,
    },
    /// `device.revoked`.
    DeviceRevoked {
        /// The device.
        device: DeviceId,
        /// Why, as the operator said.
        reason: Option<String>,
    },
    /// `device.removed`.
    DeviceRemoved {
        /// The device.
        device: DeviceId,
    },
    /// `device.rotated`: the node renewed its certificate.
    DeviceRotated {
        /// The device.
        device: DeviceId,
    },
    /// `device.labels`: an operator changed the device's labels.
    DeviceLabelled {
        /// The device.
        device: DeviceId,
        /// Its labels after the change (the operator's and the reported facts).
        labels: std::collections::BTreeMap<String, String>,
    },
    /// `token`: a token was created or revoked.
    Token {
        /// The token's id.
        id: String,
        /// `created` or `revoked`.
        action: &'static str,
    },
    /// `node.registered`: a node registered on a new session.
    NodeRegistered {
        /// The device.
        device: DeviceId,
        /// Name it registered with.
        name: String,
        /// Platform it reported.
        platform: String,
        /// Its agent's version.
        agent_version: String,
    },
    /// `node.capability`: a capability changed availability.
    CapabilityChanged {
        /// The device.
        device: DeviceId,
        /// The capability.
        name: String,
        /// Available now.
        available: bool,
        /// Why not, if not.
        reason: Option<String>,
    },
    /// `node.disconnected`: a node's session ended.
    NodeDisconnected {
        /// The device.
        device: DeviceId,
    },
    /// `presence`: a node's presence changed.
    Presence {
        /// The device.
        device: DeviceId,
        /// The presence before (none at the first evaluation).
        from: Option<Presence>,
        /// The presence now.
        to: Presence,
    },
    /// `invocation`: an invocation changed state.
    Invocation {
        /// The target device.
        device: DeviceId,
        /// The invocation.
        id: InvocationId,
        /// Its capability.
        capability: String,
        /// Its new state.
        state: InvocationState,
    },
    /// `batch`: a batch was created, made progress, or ended (its counts now).
    Batch(anchorage_console::api::BatchInfo),
    /// `policy`: a new version of the mesh policy is in force.
    Policy {
        /// Its version.
        version: u64,
        /// Who set it (audit actor).
        updated_by: String,
    },
}

impl AnchorEvent {
    /// `invocation`: the state `r` is in now.
    pub fn invocation(r: &crate::records::InvocationRecord) -> AnchorEvent {
        AnchorEvent::Invocation {
            device: r.device_id,
            id: InvocationId(r.id),
            capability: r.capability.clone(),
            state: r.state,
        }
    }

    /// The event's `kind` on the console stream.
    pub fn kind(&self) -> &'static str {
        match self {
            AnchorEvent::CodeMinted { .. } => "pairing.code",
            AnchorEvent::PairingRequested { .. } => "pairing.requested",
            AnchorEvent::PairingDecided { .. } => "pairing.decided",
            AnchorEvent::PairingCompleted { .. } => "pairing.completed",
            AnchorEvent::DeviceRevoked { .. } => "device.revoked",
            AnchorEvent::DeviceRemoved { .. } => "device.removed",
            AnchorEvent::DeviceRotated { .. } => "device.rotated",
            AnchorEvent::DeviceLabelled { .. } => "device.labels",
            AnchorEvent::Token { .. } => "token",
            AnchorEvent::NodeRegistered { .. } => "node.registered",
            AnchorEvent::CapabilityChanged { .. } => "node.capability",
            AnchorEvent::NodeDisconnected { .. } => "node.disconnected",
            AnchorEvent::Presence { .. } => "presence",
            AnchorEvent::Invocation { .. } => "invocation",
            AnchorEvent::Batch(_) => "batch",
            AnchorEvent::Policy { .. } => "policy",
        }
    }

    /// The device the event is about, if any.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            AnchorEvent::CodeMinted { .. }
            | AnchorEvent::Token { .. }
            | AnchorEvent::Batch(_)
            | AnchorEvent::Policy { .. } => None,
            AnchorEvent::PairingRequested { device, .. }
            | AnchorEvent::PairingDecided { device, .. }
            | AnchorEvent::PairingCompleted { device, .. }
            | AnchorEvent::DeviceRevoked { device, .. }
            | AnchorEvent::DeviceRemoved { device }
            | AnchorEvent::DeviceRotated { device }
            | AnchorEvent::DeviceLabelled { device, .. }
            | AnchorEvent::NodeRegistered { device, .. }
            | AnchorEvent::CapabilityChanged { device, .. }
            | AnchorEvent::NodeDisconnected { device }
            | AnchorEvent::Presence { device, .. }
            | AnchorEvent::Invocation { device, .. } => Some(device),
        }
    }

    /// The event's `data` on the console stream.
    pub fn data(&self) -> serde_json::Value {
        match self {
            AnchorEvent::CodeMinted { code_id } => json!({ "code_id": code_id }),
            AnchorEvent::PairingRequested {
                request_id,
                device_name,
                sas,
                ..
            } => json!({ "request_id": request_id, "device_name": device_name, "sas": sas }),
            AnchorEvent::PairingDecided {
                request_id,
                approved,
                ..
            } => json!({
                "request_id": request_id,
                "state": if *approved { "approved" } else { "rejected" },
            }),
            AnchorEvent::PairingCompleted { request_id, .. } => {
                json!({ "request_id": request_id })
            }
            AnchorEvent::DeviceRevoked { reason, .. } => json!({ "reason": reason }),
            AnchorEvent::DeviceLabelled { labels, .. } => json!({ "labels": labels }),
            AnchorEvent::DeviceRemoved { .. }
            | AnchorEvent::DeviceRotated { .. }
            | AnchorEvent::NodeDisconnected { .. } => json!({}),
            AnchorEvent::Token { id, action } => json!({ "id": id, "action": action }),
            AnchorEvent::NodeRegistered {
                name,
                platform,
                agent_version,
                ..
            } => json!({ "name": name, "platform": platform, "agent_version": agent_version }),
            AnchorEvent::CapabilityChanged {
                name,
                available,
                reason,
                ..
            } => json!({ "name": name, "available": available, "reason": reason }),
            AnchorEvent::Presence { from, to, .. } => {
                json!({ "from": from.map(Presence::as_str), "to": to.as_str() })
            }
            AnchorEvent::Invocation {
                id,
                capability,
                state,
                ..
            } => json!({
                "invocation_id": id.to_string(),
                "capability": capability,
                "state": state.as_str(),
            }),
            AnchorEvent::Batch(info) => serde_json::to_value(info).unwrap_or_default(),
            AnchorEvent::Policy {
                version,
                updated_by,
            } => json!({ "version": version, "updated_by": updated_by }),
        }
    }
}

/// The event bus. Publishing never blocks; a subscriber that falls behind by more than
/// [`EVENT_BUFFER`] events is told it lagged (by the broadcast channel) and goes on.
///
/// Two feeds: every event ([`EventBus::subscribe`], the console's stream), and the changes of
/// the fleet without the invocations and batches ([`EventBus::subscribe_fleet`]), for the
/// anchor's own followers (history, mesh directories), so a busy stream of invocations does
/// not wake them once per state change.
#[derive(Debug)]
pub struct EventBus {
    clock: Clock,
    seq: AtomicU64,
    tx: broadcast::Sender<Event>,
    fleet: broadcast::Sender<Event>,
}

impl EventBus {
    /// A bus stamping events with `clock`.
    pub fn new(clock: Clock) -> EventBus {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        let (fleet, _) = broadcast::channel(EVENT_BUFFER);
        EventBus {
            clock,
            seq: AtomicU64::new(0),
            tx,
            fleet,
        }
    }

    /// Publishes `event` to every subscriber (none is fine).
    pub fn publish(&self, event: AnchorEvent) {
        // Counted even without subscribers, so sequence numbers say how many changes happened.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let to_fleet = !matches!(
            event,
            AnchorEvent::Invocation { .. } | AnchorEvent::Batch(_)
        ) && self.fleet.receiver_count() > 0;
        let to_all = self.tx.receiver_count() > 0;
        if !to_fleet && !to_all {
            return;
        }
        let e = Event {
            seq,
            at: to_odt(self.clock.now_ms()),
            kind: event.kind().to_string(),
            device_id: event.device().copied(),
            data: event.data(),
        };
        match (to_fleet, to_all) {
            (true, true) => {
                let _ = self.fleet.send(e.clone());
                let _ = self.tx.send(e);
            }
            (true, false) => {
                let _ = self.fleet.send(e);
            }
            _ => {
                let _ = self.tx.send(e);
            }
        }
    }

    /// A new subscription to every event, from the next one on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// A new subscription to the fleet's changes (every event but `invocation` and `batch`),
    /// from the next one on.
    pub fn subscribe_fleet(&self) -> broadcast::Receiver<Event> {
        self.fleet.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_console_kinds_and_fields() {
        let bus = EventBus::new(Clock::System);
        let mut rx = bus.subscribe();
        let device = DeviceId::from_bytes([3; anchorage_mesh::identity::DEVICE_ID_LEN]);
        bus.publish(AnchorEvent::Presence {
            device,
            from: Some(Presence::Online),
            to: Presence::Stale,
        });
        bus.publish(AnchorEvent::PairingDecided {
            device,
            request_id: "req_1".into(),
            approved: false,
        });
        let first = rx.try_recv().unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(first.kind, "presence");
        assert_eq!(first.device_id, Some(device));
        assert_eq!(first.data, json!({"from": "online", "to": "stale"}));
        let second = rx.try_recv().unwrap();
        assert_eq!(second.seq, 2);
        assert_eq!(second.kind, "pairing.decided");
        assert_eq!(
            second.data,
            json!({"request_id": "req_1", "state": "rejected"})
        );
    }

    #[test]
    fn the_fleet_feed_skips_invocations_and_batches_but_keeps_the_numbering() {
        let bus = EventBus::new(Clock::System);
        let mut fleet = bus.subscribe_fleet();
        let mut all = bus.subscribe();
        let device = DeviceId::from_bytes([3; anchorage_mesh::identity::DEVICE_ID_LEN]);
        let record = crate::records::InvocationRecord::queued(
            [1; 16],
            device,
            "echo".into(),
            b"{}".to_vec(),
            "owner".into(),
            0,
            1000,
        );
        bus.publish(AnchorEvent::invocation(&record));
        bus.publish(AnchorEvent::DeviceRemoved { device });
        assert_eq!(all.try_recv().unwrap().kind, "invocation");
        assert_eq!(all.try_recv().unwrap().kind, "device.removed");
        let only = fleet.try_recv().unwrap();
        assert_eq!((only.kind.as_str(), only.seq), ("device.removed", 2));
        assert!(fleet.try_recv().is_err());
    }
}
