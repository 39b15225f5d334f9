//! The drivers of the mesh service ([`crate::mesh::Mesh`]): what reads the anchor's other
//! services on its behalf and what serves a node's relay stream. The mesh itself holds state
//! and decides; these move data in and out of it.
//!
//! - [`follow`] keeps the mesh's roster (approved, unrevoked devices with their labels) and
//!   its directory generation up to date: on a policy change, a device or label change, a
//!   revocation, and when a session asks.
//! - [`serve_relay`]: one per node connection, the first extra bidirectional stream the node
//!   opens, which must start with [`Relay::Hello`]. Packets from the node go to
//!   [`Mesh::relay`](crate::mesh::Mesh::relay), which forwards them to the destination's
//!   bounded queue or drops them (as UDP would); this driver writes the node's own queue onto
//!   its stream. The packets are never parsed: they are the peers' own QUIC. A stream that does
//!   not start with `Hello`, or says something else than packets after it, is reset with
//!   `PROTOCOL_VIOLATION`; the node's connection and control stream go on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_mesh::framed::framed;
use anchorage_wire::ErrorCode;
use anchorage_wire::peer::Relay;
use tokio::sync::mpsc;
use tracing::debug;

use crate::mesh::{Member, RELAY_QUEUE};
use crate::nodes::SessionId;
use crate::records::DeviceTrust;
use crate::services::Services;

/// How long a node has to say `Hello` on a relay stream it opened.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// The approved, unrevoked devices with their labels (from the trust directory, in memory).
fn read_roster(services: &Services) -> BTreeMap<DeviceId, Member> {
    let dir = services.trust.directory();
    let revocation = services.trust.revocation();
    dir.devices
        .iter()
        .filter(|d| d.trust == DeviceTrust::Trusted && !revocation.is_device_revoked(&d.device_id))
        .map(|d| {
            let labels = dir.labels.get(&d.device_id);
            (
                d.device_id,
                Member {
                    name: d.name.clone(),
                    labels: labels.map(|l| (**l).clone()).unwrap_or_default(),
                },
            )
        })
        .collect()
}

/// Keeps the roster and the generation up to date until the anchor shuts down: on a policy
/// change, a device or label change, a revocation, and when a session asks. While the policy
/// is empty the roster is not read (nobody is related to anybody).
pub async fn follow(services: Arc<Services>) {
    let mut policy = services.policy.subscribe();
    let mut revoked = services.trust.revocation().subscribe();
    let mut events = services.events.subscribe_fleet();
    let mut stale = true;
    loop {
        if stale {
            let empty = services.policy.current().policy.is_empty();
            let roster = (!empty).then(|| read_roster(&services));
            services.mesh.set_roster(roster);
            services.mesh.bump();
        }
        stale = tokio::select! {
            changed = policy.changed() => {
                if changed.is_err() { return; }
                policy.borrow_and_update();
                true
            }
            changed = revoked.changed() => {
                if changed.is_err() { return; }
                revoked.borrow_and_update();
                true
            }
            event = events.recv() => match event {
                Ok(e) => matters(&e.kind),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            // Nothing to do while the policy is empty: the roster is read when it fills.
            () = services.mesh.refreshed() => !services.policy.current().policy.is_empty(),
            () = services.cancel.cancelled() => return,
        };
        if stale {
            debug!("mesh directories may have changed");
        }
    }
}

/// Whether an event's kind may change a directory (a device added, revoked, removed or
/// relabelled).
fn matters(kind: &str) -> bool {
    matches!(
        kind,
        "device.removed"
            | "device.revoked"
            | "device.labels"
            | "pairing.completed"
            | "pairing.decided"
    )
}

/// Serves `stream` as `device`'s relay stream until it or the connection ends. Cancel-safe
/// to drop at any point (packets in flight are lost, as on UDP).
pub async fn serve_relay(
    services: Arc<Services>,
    device: DeviceId,
    session: SessionId,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
) {
    let (mut tx, mut rx) = framed::<Relay, Relay>(send, recv);
    let refuse = |tx: &mut anchorage_mesh::framed::FramedSend<Relay>,
                  rx: &mut anchorage_mesh::framed::FramedRecv<Relay>| {
        tx.reset(ErrorCode::ProtocolViolation);
        rx.stop(ErrorCode::ProtocolViolation);
        services.metrics.stream_refused();
    };
    let first = tokio::select! {
        first = tokio::time::timeout(HELLO_TIMEOUT, rx.recv()) => first,
        () = services.cancel.cancelled() => return,
    };
    match first {
        Ok(Ok(Some(Relay::Hello))) => {}
        Ok(Ok(None)) | Ok(Err(_)) | Err(_) | Ok(Ok(Some(Relay::Packet(_)))) => {
            debug!("refused a stream that is no relay stream");
            refuse(&mut tx, &mut rx);
            return;
        }
    }
    let (queue, mut outgoing) = mpsc::channel(RELAY_QUEUE);
    if !services.mesh.relay_up(&device, session, queue) {
        return;
    }
    debug!("relay stream up");
    let reader = async {
        loop {
            match rx.recv().await {
                Ok(Some(Relay::Packet(p))) => {
                    let _ = services
                        .mesh
                        .relay(&services.policy.current(), &device, session, p);
                }
                Ok(Some(Relay::Hello)) => return true,
                Ok(None) => return false,
                Err(e) => return e.is_peer_fault(),
            }
        }
    };
    let writer = async {
        while let Some(p) = outgoing.recv().await {
            if tx.send(&Relay::Packet(p)).await.is_err() {
                break;
            }
        }
    };
    let violated = tokio::select! {
        violated = reader => violated,
        () = writer => false,
        () = services.cancel.cancelled() => false,
    };
    if violated {
        debug!("relay stream violated the protocol");
        tx.reset(ErrorCode::ProtocolViolation);
        rx.stop(ErrorCode::ProtocolViolation);
    }
}
