//! What the other anchors of a cluster do, applied here (IO driver; a shared store only).
//!
//! The store reports every change another anchor commits ([`RuntimeStore::follow`] and the
//! trust watch with [`Revision::remote`]); this driver hands each to the service that owns it:
//!
//! - sessions, registrations and last-seen to the node table, so every anchor shows every
//!   node with its holder's presence, and a node that registered elsewhere is no longer
//!   connected here;
//! - invocations to the invocation service: a final record answers whoever waits on this
//!   anchor, an unfinished one for a node connected here is dispatched at once;
//! - a revocation or removal closes the device's session here, a new mesh policy is put in
//!   force here, and every change becomes the same event this anchor would publish had it
//!   made it.
//!
//! [`RuntimeStore::follow`]: crate::store::RuntimeStore::follow
//! [`Revision::remote`]: crate::store::Revision::remote

use std::sync::Arc;

use anchorage_wire::ErrorCode;
use tokio::sync::mpsc;

use crate::events::AnchorEvent;
use crate::records::RequestState;
use crate::services::Services;
use crate::store::{Revoked, RuntimeChange, TrustChange};

/// A change another anchor made.
enum Change {
    Runtime(RuntimeChange),
    Trust(TrustChange),
}

/// Starts applying other anchors' changes (nothing to do on a store of this anchor's own).
///
/// The store's callbacks only queue (they run on its watch thread); one task of the anchor
/// applies them in order. The queue is unbounded: it holds what the watch delivered, which
/// etcd's own throughput bounds, and the task only updates memory and queues writes.
pub fn follow(services: &Arc<Services>) {
    if !services.stores.runtime.shared() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let tx = tx.clone();
        services.stores.runtime.follow(Box::new(move |c| {
            let _ = tx.send(Change::Runtime(c));
        }));
    }
    services.stores.trust.watch(Arc::new(move |rev| {
        if rev.remote {
            let _ = tx.send(Change::Trust(rev.change.clone()));
        }
    }));
    let s = services.clone();
    services.spawn(async move {
        loop {
            let change = tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                _ = s.cancel.cancelled() => return,
            };
            match change {
                Change::Runtime(c) => runtime(&s, c).await,
                Change::Trust(c) => trust(&s, c),
            }
        }
    });
}

async fn runtime(s: &Arc<Services>, change: RuntimeChange) {
    match change {
        RuntimeChange::Invocation(r) => {
            let live = s.nodes.live(&r.device_id).map(|(session, _)| session);
            let next = s.invocations.remote(r, live).await;
            crate::dispatch::spawn(s, next);
        }
        RuntimeChange::Session(device, Some(claim)) if claim.instance != s.instance_id => {
            s.nodes.remote(RuntimeChange::Session(device, Some(claim)));
            s.invocations.hand_over(&device);
        }
        other => s.nodes.remote(other),
    }
}

fn trust(s: &Services, change: TrustChange) {
    match change {
        TrustChange::Revocation(Revoked::Device(device), Some(record)) => {
            s.nodes.close(&device, ErrorCode::Revoked, "device revoked");
            s.events.publish(AnchorEvent::DeviceRevoked {
                device,
                reason: Some(record.reason).filter(|r| !r.is_empty()),
            });
        }
        TrustChange::Device(device, None) => {
            s.nodes
                .forget(&device, ErrorCode::Removed, "device removed");
            s.events.publish(AnchorEvent::DeviceRemoved { device });
        }
        TrustChange::Request(r) => match r.state {
            RequestState::PendingApproval => s.events.publish(AnchorEvent::PairingRequested {
                device: r.device_id,
                request_id: r.request_id,
                device_name: r.device_name,
                sas: r.sas,
            }),
            RequestState::Approved | RequestState::Rejected => {
                s.events.publish(AnchorEvent::PairingDecided {
                    device: r.device_id,
                    request_id: r.request_id,
                    approved: r.state == RequestState::Approved,
                })
            }
            RequestState::Completed => s.events.publish(AnchorEvent::PairingCompleted {
                device: r.device_id,
                request_id: r.request_id,
            }),
        },
        TrustChange::Policy(record) => {
            let next = crate::trust::policy_version(record);
            let event = AnchorEvent::Policy {
                version: next.version,
                updated_by: next.updated_by.clone(),
            };
            if s.policy.replace(next) {
                s.events.publish(event);
            }
        }
        TrustChange::Token(t) => s.events.publish(AnchorEvent::Token {
            id: t.id,
            action: if t.revoked_at_ms.is_some() {
                "revoked"
            } else {
                "created"
            },
        }),
        _ => {}
    }
}
