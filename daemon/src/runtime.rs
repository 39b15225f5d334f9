//! The node runtime of the anchor: registrations, heartbeats, presence, invocations.
//!
//! TODO(issue 5): registry, heartbeat ingest, presence, invocations. This module currently
//! only provides the hooks the session calls and the background housekeeping.

use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_wire::control::{CapabilityInfo, Register};

use crate::anchor::Anchor;
use crate::config::AnchorConfig;
use crate::session::SessionHandle;
use crate::store::{Store, StoreError};

/// How often background housekeeping runs.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Runtime state.
#[derive(Debug, Default)]
pub struct Runtime {}

impl Runtime {
    /// Loads persisted runtime state.
    pub fn new(_store: &Store, _config: &AnchorConfig) -> Result<Runtime, StoreError> {
        Ok(Runtime {})
    }

    /// A node registered on a new session.
    pub(crate) fn registered(&self, _a: &Anchor, _d: &DeviceId, _h: &SessionHandle, _r: &Register) {}

    /// The node said it is stopping.
    pub(crate) fn stopping(&self, _a: &Anchor, _d: &DeviceId, _session: u64) {}

    /// A capability changed availability.
    pub(crate) fn capability_changed(&self, _a: &Anchor, _d: &DeviceId, _session: u64, _c: CapabilityInfo) {}

    /// A datagram arrived.
    pub(crate) fn datagram(&self, _a: &Anchor, _d: &DeviceId, _session: u64, _conn: &quinn::Connection, _bytes: &[u8]) {}

    /// A session ended.
    pub(crate) fn disconnected(&self, _a: &Anchor, _d: &DeviceId, _session: u64) {}

    /// A device was removed.
    pub(crate) fn forget(&self, _d: &DeviceId) {}

    /// Writes buffered state (last-seen) to the store.
    pub(crate) async fn flush(&self, _store: &Store) {}
}

/// Background housekeeping: server certificate renewal.
pub(crate) async fn background(anchor: Anchor) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        renew_server_cert(&anchor);
    }
}

fn renew_server_cert(anchor: &Anchor) {
    let info = anchor.shared.server_cert.info();
    let now = anchor.now();
    if info.renewal_due(now, 1.0 / 3.0) {
        match anchor
            .shared
            .ca
            .issue_server(anchorage_mesh::pki::DEFAULT_SERVER_CERT_VALIDITY, now)
        {
            Ok(identity) => {
                if let Err(e) = anchor.shared.server_cert.replace(identity) {
                    tracing::warn!(error = %e, "server certificate renewal failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "server certificate renewal failed"),
        }
    }
}
