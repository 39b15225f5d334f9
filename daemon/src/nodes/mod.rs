//! The node table service: the one record of each node, and the driver of its rules.
//!
//! [`NodeTable`] wraps the sans-IO [`table::Table`] behind a mutex held only for the rule
//! itself, and carries out its effects: records go to the ordered [`Writer`], events to the
//! [`EventBus`], closes to the connection. Nothing else in the anchor keeps a copy of who is
//! connected.

pub mod table;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_mesh::framed;
use anchorage_mesh::presence::{Presence, Thresholds};
use anchorage_wire::ErrorCode;

use crate::clock::Clock;
use crate::config::AnchorConfig;
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::records::CapabilityRecord;
use crate::store::{RuntimeSnapshot, Writer};

pub use table::{Effect, Ingested, Live, Node, Registration, SessionId, Settings};

/// How many heartbeat intervals of silence make a live session half-open (at least the stale
/// threshold).
pub const HALF_OPEN_INTERVALS: u32 = 3;

/// The anchor's handle on a live session. What other parts of the anchor tell a node goes
/// through its queue in the mesh ([`crate::mesh::Mesh::tell`]); the table only closes it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The connection.
    pub conn: quinn::Connection,
}

/// The rules' settings from the configuration.
pub fn settings(config: &AnchorConfig) -> Settings {
    let p = &config.presence;
    Settings {
        thresholds: Thresholds {
            stale_after: p.stale_after,
            offline_after: p.offline_after,
            degraded_loss: p.degraded_loss,
        },
        half_open_after: half_open_after(p.heartbeat_interval, p.stale_after),
    }
}

/// When a live session without heartbeats counts as half-open: [`HALF_OPEN_INTERVALS`]
/// heartbeat intervals, or the stale threshold if that is longer (so loss alone never closes
/// a session that still shows online).
pub fn half_open_after(heartbeat_interval: Duration, stale_after: Duration) -> Duration {
    (heartbeat_interval * HALF_OPEN_INTERVALS).max(stale_after)
}

/// The node table service.
#[derive(Debug)]
pub struct NodeTable {
    table: Mutex<table::Table<SessionHandle>>,
    clock: Clock,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    writer: Writer,
}

impl NodeTable {
    /// A table loaded from the store's snapshot; `instance`: this anchor's id when its store
    /// is shared with other anchors (its sessions are then claimed there).
    pub fn new(
        config: &AnchorConfig,
        instance: Option<String>,
        snapshot: &mut RuntimeSnapshot,
        clock: Clock,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
        writer: Writer,
    ) -> NodeTable {
        let mut table = table::Table::new(settings(config));
        for cap in snapshot.nodes.iter().flat_map(|n| &n.capabilities) {
            metrics.capability_reported(&cap.name);
        }
        if let Some(id) = instance {
            table.set_instance(id);
        }
        table.load(
            std::mem::take(&mut snapshot.nodes),
            std::mem::take(&mut snapshot.presence),
        );
        table.load_sessions(std::mem::take(&mut snapshot.sessions));
        NodeTable {
            table: Mutex::new(table),
            clock,
            events,
            metrics,
            writer,
        }
    }

    /// The table, for a rule or a view. Never held across an await.
    pub fn lock(&self) -> MutexGuard<'_, table::Table<SessionHandle>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, effects: Vec<Effect<SessionHandle>>) {
        for effect in effects {
            match effect {
                Effect::Persist(write) => {
                    if !self.writer.try_put(write) {
                        tracing::warn!("store writer queue full; a node record was not written");
                    }
                }
                Effect::Publish(event) => self.events.publish(event),
                Effect::Close {
                    handle,
                    code,
                    reason,
                } => {
                    if code == ErrorCode::Timeout {
                        self.metrics.half_open_closed();
                    }
                    framed::close(&handle.conn, code, reason);
                }
            }
        }
    }

    /// A node registered on a new session.
    pub fn register(
        &self,
        device: DeviceId,
        handle: SessionHandle,
        reg: Registration,
    ) -> SessionId {
        let now = self.clock.now_ms();
        for cap in &reg.capabilities {
            self.metrics.capability_reported(&cap.name);
        }
        let (session, effects) = self.lock().register(device, handle, reg, now);
        self.apply(effects);
        session
    }

    /// The node said it is stopping.
    pub fn stopping(&self, device: &DeviceId, session: SessionId) {
        let now = self.clock.now_ms();
        let effects = self.lock().stopping(device, session, now);
        self.apply(effects);
    }

    /// A capability changed availability.
    pub fn capability_changed(&self, device: &DeviceId, session: SessionId, cap: CapabilityRecord) {
        let now = self.clock.now_ms();
        self.metrics.capability_reported(&cap.name);
        let effects = self.lock().capability_changed(device, session, cap, now);
        self.apply(effects);
    }

    /// A heartbeat arrived; counted in the metrics. `None`: ignore it (send no ack).
    pub fn heartbeat(&self, device: &DeviceId, session: SessionId, seq: u64) -> Option<Ingested> {
        let now = self.clock.now_ms();
        let ingested = self.lock().heartbeat(device, session, seq, now)?;
        self.metrics.heartbeats_received(1);
        self.metrics.heartbeats_lost(ingested.newly_lost);
        Some(ingested)
    }

    /// A session's connection ended.
    pub fn disconnected(&self, device: &DeviceId, session: SessionId) {
        let now = self.clock.now_ms();
        let effects = self.lock().disconnected(device, session, now);
        self.apply(effects);
    }

    /// Closes the live session of `device`, if any, with `code`.
    pub fn close(&self, device: &DeviceId, code: ErrorCode, reason: &'static str) {
        let now = self.clock.now_ms();
        let effects = self.lock().close(device, code, reason, now);
        if !effects.is_empty() {
            tracing::info!(device_id = %device, %code, "closing node session");
        }
        self.apply(effects);
    }

    /// Forgets a removed device, closing its session.
    pub fn forget(&self, device: &DeviceId, code: ErrorCode, reason: &'static str) {
        self.close(device, code, reason);
        self.lock().forget(device);
    }

    /// The live session of `device`: its id and connection.
    pub fn live(&self, device: &DeviceId) -> Option<(SessionId, quinn::Connection)> {
        self.lock()
            .live(device)
            .map(|l| (l.session, l.handle.conn.clone()))
    }

    /// The connection of `session` if it is still the live one of `device`.
    pub fn session_conn(&self, device: &DeviceId, session: SessionId) -> Option<quinn::Connection> {
        self.lock()
            .live(device)
            .filter(|l| l.session == session)
            .map(|l| l.handle.conn.clone())
    }

    /// The periodic evaluation (presence, half-open sessions).
    pub fn tick(&self) {
        let now = self.clock.now_ms();
        let effects = self.lock().tick(now);
        self.apply(effects);
    }

    /// Claims every live session again (this anchor's lease in the shared store was new).
    pub async fn reclaim(&self) {
        let writes = self.lock().reclaim();
        for w in writes {
            self.writer.put(w).await;
        }
    }

    /// Applies a runtime change another anchor of the cluster committed.
    pub fn remote(&self, change: crate::store::RuntimeChange) {
        use crate::store::RuntimeChange;
        let now = self.clock.now_ms();
        let effects = {
            let mut table = self.lock();
            match change {
                RuntimeChange::Node(record) => table.remote_node(record, now),
                RuntimeChange::Presence(device, p) => table.remote_presence(&device, p, now),
                RuntimeChange::Session(device, s) => table.remote_session(&device, s, now),
                RuntimeChange::Invocation(_) => Vec::new(),
            }
        };
        self.apply(effects);
    }

    /// Whether another anchor of the cluster holds the session of `device`.
    pub fn held_elsewhere(&self, device: &DeviceId) -> bool {
        self.lock()
            .node(device)
            .is_some_and(|n| n.live.is_none() && n.remote.is_some())
    }

    /// Queues last-seen times changed since the last flush.
    pub async fn flush(&self) {
        let writes = self.lock().flush();
        for w in writes {
            self.writer.put(w).await;
        }
    }

    /// Presence of every registered node, and how many are connected.
    pub fn counts(&self) -> ([u64; 5], u64) {
        let now = self.clock.now_ms();
        let table = self.lock();
        let t = table.settings().thresholds;
        let mut by = [0u64; 5];
        let mut connected = 0;
        for (_, n) in table.iter() {
            let i = match n.presence(now, &t) {
                Presence::Online => 0,
                Presence::Degraded => 1,
                Presence::Stale => 2,
                Presence::Offline => 3,
                _ => 4,
            };
            by[i] += 1;
            connected += u64::from(n.live.is_some());
        }
        (by, connected)
    }

    /// Presence thresholds in force.
    pub fn thresholds(&self) -> Thresholds {
        self.lock().settings().thresholds
    }

    /// Closes every live session (at shutdown).
    pub fn close_all(&self, code: ErrorCode, reason: &'static str) {
        let devices: Vec<DeviceId> = self
            .lock()
            .iter()
            .filter(|(_, n)| n.live.is_some())
            .map(|(id, _)| *id)
            .collect();
        for d in devices {
            self.close(&d, code, reason);
        }
    }
}
