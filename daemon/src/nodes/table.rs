//! The node table's rules, without IO: registration, heartbeats, presence, half-open sessions.
//!
//! [`Table`] is the one record of every node the anchor knows: its registration, its live
//! session (if any), its heartbeat window and its last published presence. It takes `now`
//! (Unix milliseconds) and inputs, and returns [`Effect`]s for its driver to carry out:
//! persist this record, publish this event, close this connection. It is generic over the
//! session handle `S` (a connection in the anchor, a plain value in tests).
//!
//! Session ids increase; every input about a session names it, and an input about a session
//! that is no longer the live one is ignored, so a stale session can never mark a node online
//! or offline.
//!
//! Time alone changes a node's presence only at a few instants: its last heartbeat plus the
//! stale, offline and half-open thresholds. The table keeps each node's next such instant in a
//! queue, and [`Table::tick`] looks only at the nodes whose instant has come, not at every node
//! every second (at 10,000 nodes the full walk was the anchor's largest cost between
//! heartbeats). Every other input reevaluates its node at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_mesh::presence::{self, LossWindow, Observation, Presence, Thresholds};
use anchorage_wire::ErrorCode;

use crate::events::AnchorEvent;
use crate::records::{CapabilityRecord, NodeRecord, PresenceRecord, SessionRecord};
use crate::store::RuntimeWrite;

/// Identifies one session (connection) of a node; increases across the anchor's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// What the table's driver must do.
#[derive(Debug)]
pub enum Effect<S> {
    /// Write this record (through the ordered writer).
    Persist(RuntimeWrite),
    /// Publish this event.
    Publish(AnchorEvent),
    /// Close this session's connection with `code`.
    Close {
        /// The session's handle.
        handle: S,
        /// Why, as a wire error code.
        code: ErrorCode,
        /// Why, for the node's logs.
        reason: &'static str,
    },
}

/// A node's registration as it arrived on its control stream.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Name it registered with.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Agent version.
    pub agent_version: String,
    /// Capabilities with availability.
    pub capabilities: Vec<CapabilityRecord>,
}

/// What the anchor knows of one node.
#[derive(Debug)]
pub struct Node<S> {
    /// Last registration (none: known only from a last-seen record).
    pub record: Option<NodeRecord>,
    /// The live session.
    pub live: Option<Live<S>>,
    /// Last heartbeat or registration, Unix ms.
    pub last_seen_ms: Option<u64>,
    /// The last session ended with a clean `stopping`.
    pub stopped_cleanly: bool,
    /// Heartbeat sequence numbers of the live session.
    pub window: LossWindow,
    /// Highest `window.lost` already counted in the metrics (counters never go down).
    lost_reported: u64,
    /// Presence last published.
    presence: Option<Presence>,
    /// Last-seen changed since the last flush.
    dirty: bool,
    /// The session another anchor of the cluster holds (never with `live`).
    pub remote: Option<SessionRecord>,
    /// The presence last written in this anchor's claim on the live session (a shared store).
    claimed: Option<Presence>,
    /// The node's entry in the table's queue of deadlines, if it has one.
    due_at: Option<u64>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node {
            record: None,
            live: None,
            last_seen_ms: None,
            stopped_cleanly: false,
            window: LossWindow::default(),
            lost_reported: 0,
            presence: None,
            dirty: false,
            remote: None,
            claimed: None,
            due_at: None,
        }
    }
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Live<S> {
    /// Its id.
    pub session: SessionId,
    /// When it registered, Unix ms.
    pub since_ms: u64,
    /// The driver's handle on it.
    pub handle: S,
}

impl<S> Node<S> {
    fn is_session(&self, session: SessionId) -> bool {
        self.live.as_ref().is_some_and(|l| l.session == session)
    }

    fn observation(&self, now_ms: u64) -> Observation {
        Observation {
            registered: self.record.is_some(),
            silent_for: self
                .last_seen_ms
                .map(|t| Duration::from_millis(now_ms.saturating_sub(t))),
            stopped_cleanly: self.stopped_cleanly && self.live.is_none(),
            capability_unavailable: self
                .record
                .as_ref()
                .is_some_and(|r| r.capabilities.iter().any(|c| !c.available)),
            loss: if self.live.is_some() {
                self.window.loss()
            } else {
                None
            },
        }
    }

    /// Presence at `now_ms`: this anchor's evaluation, or the holder's for a session another
    /// anchor holds.
    pub fn presence(&self, now_ms: u64, t: &Thresholds) -> Presence {
        match (&self.live, &self.remote) {
            (None, Some(remote)) if self.record.is_some() => remote.presence,
            _ => presence::evaluate(&self.observation(now_ms), t),
        }
    }

    /// The next instant after `now_ms` at which time alone may change this node's presence or
    /// make its session half-open (`None`: nothing changes until an input arrives).
    fn next_deadline(&self, now_ms: u64, s: &Settings) -> Option<u64> {
        let seen = self.last_seen_ms?;
        let held_elsewhere = self.live.is_none() && self.remote.is_some();
        let stopped = self.stopped_cleanly && self.live.is_none();
        if self.record.is_none() || held_elsewhere || stopped {
            return None;
        }
        let at =
            |d: Duration| seen.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let half_open = self.live.as_ref().map(|_| at(s.half_open_after));
        [
            Some(at(s.thresholds.stale_after)),
            Some(at(s.thresholds.offline_after)),
            half_open,
        ]
        .into_iter()
        .flatten()
        .filter(|&t| t > now_ms)
        .min()
    }

    /// Connected to this anchor or another of the cluster.
    pub fn connected(&self) -> bool {
        self.live.is_some() || self.remote.is_some()
    }

    /// Evaluates presence and, if it changed since last published, the event to publish.
    fn reevaluate<S2>(&mut self, id: &DeviceId, now_ms: u64, t: &Thresholds) -> Option<Effect<S2>> {
        let p = self.presence(now_ms, t);
        let old = self.presence.replace(p);
        (old != Some(p)).then(|| {
            Effect::Publish(AnchorEvent::Presence {
                device: *id,
                from: old,
                to: p,
            })
        })
    }

    /// The claim on a live session to write, when it is new or the presence in it changed.
    fn claim<S2>(&mut self, id: &DeviceId, instance: &str) -> Option<Effect<S2>> {
        let live = self.live.as_ref()?;
        let presence = self.presence?;
        if self.claimed == Some(presence) {
            return None;
        }
        self.claimed = Some(presence);
        Some(Effect::Persist(RuntimeWrite::Session(
            *id,
            Some(SessionRecord {
                instance: instance.to_string(),
                since_ms: live.since_ms,
                presence,
            }),
        )))
    }

    fn presence_record(&self) -> Option<PresenceRecord> {
        self.last_seen_ms.map(|t| PresenceRecord {
            last_seen_ms: t,
            stopped_cleanly: self.stopped_cleanly,
        })
    }
}

/// A heartbeat taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Heartbeats received on this session so far (echoed in the ack).
    pub received: u64,
    /// Heartbeats newly counted lost (for the metrics).
    pub newly_lost: u64,
}

/// The rules' settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Presence thresholds.
    pub thresholds: Thresholds,
    /// A live session with no heartbeat for this long is half-open and is closed.
    pub half_open_after: Duration,
}

/// Every node the anchor knows.
#[derive(Debug)]
pub struct Table<S> {
    /// Boxed: the map keeps a third or more of its slots empty as it grows, and a slot holds
    /// a pointer instead of a 300-byte node (at 10,000 nodes, about 200 bytes a node).
    nodes: HashMap<DeviceId, Box<Node<S>>>,
    /// When each node must be looked at again, soonest first. An entry that no longer matches
    /// its node's `due_at` was superseded by an earlier one and is skipped.
    due: BinaryHeap<Reverse<(u64, DeviceId)>>,
    settings: Settings,
    next_session: u64,
    /// This anchor's instance id when it shares its store: live sessions are then claimed
    /// in the store ([`RuntimeWrite::Session`]) and other anchors' claims are applied.
    instance: Option<String>,
}

impl<S: Clone> Table<S> {
    /// An empty table.
    pub fn new(settings: Settings) -> Table<S> {
        Table {
            nodes: HashMap::new(),
            due: BinaryHeap::new(),
            settings,
            next_session: 1,
            instance: None,
        }
    }

    /// Claims this anchor's sessions in a shared store as instance `id`.
    pub fn set_instance(&mut self, id: String) {
        self.instance = Some(id);
    }

    /// Loads what the store kept: registrations and last-seen times.
    pub fn load(
        &mut self,
        records: impl IntoIterator<Item = NodeRecord>,
        presence: impl IntoIterator<Item = (DeviceId, PresenceRecord)>,
    ) {
        for rec in records {
            let id = rec.device_id;
            self.nodes.entry(id).or_default().record = Some(rec);
        }
        for (id, p) in presence {
            let node = self.nodes.entry(id).or_default();
            node.last_seen_ms = Some(p.last_seen_ms);
            node.stopped_cleanly = p.stopped_cleanly;
        }
        self.reevaluate_all();
    }

    /// Has the next tick look at every node.
    fn reevaluate_all(&mut self) {
        self.due.clear();
        for (id, node) in self.nodes.iter_mut() {
            node.due_at = Some(0);
            self.due.push(Reverse((0, *id)));
        }
    }

    /// Has the next tick at or after `at` look at `device`, unless one before it already will.
    fn schedule(&mut self, device: &DeviceId, at: u64) {
        if let Some(node) = self.nodes.get_mut(device)
            && node.due_at.is_none_or(|t| t > at)
        {
            node.due_at = Some(at);
            self.due.push(Reverse((at, *device)));
        }
    }

    /// Loads the sessions other anchors hold (a shared store, at start-up).
    pub fn load_sessions(&mut self, sessions: impl IntoIterator<Item = (DeviceId, SessionRecord)>) {
        for (id, s) in sessions {
            if self.instance.as_ref() != Some(&s.instance) {
                self.nodes.entry(id).or_default().remote = Some(s);
            }
        }
        self.reevaluate_all();
    }

    /// The rules' settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Changes the settings (presence thresholds) from the next evaluation on.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
        self.reevaluate_all();
    }

    /// A node registered on a new session `handle`. A previous live session is closed
    /// (`Replaced`): a device never has two.
    pub fn register(
        &mut self,
        device: DeviceId,
        handle: S,
        reg: Registration,
        now_ms: u64,
    ) -> (SessionId, Vec<Effect<S>>) {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        let mut effects = Vec::with_capacity(5);
        let node = self.nodes.entry(device).or_default();
        let first = node
            .record
            .as_ref()
            .map_or(now_ms, |old| old.first_registered_at_ms);
        let record = NodeRecord {
            device_id: device,
            name: reg.name.clone(),
            platform: reg.platform.clone(),
            agent_version: reg.agent_version.clone(),
            capabilities: reg.capabilities,
            first_registered_at_ms: first,
            registered_at_ms: now_ms,
        };
        if let Some(old) = node.live.replace(Live {
            session,
            since_ms: now_ms,
            handle,
        }) {
            effects.push(Effect::Close {
                handle: old.handle,
                code: ErrorCode::Replaced,
                reason: "a newer connection replaced this one",
            });
        }
        node.record = Some(record.clone());
        node.last_seen_ms = Some(now_ms);
        node.stopped_cleanly = false;
        node.window = LossWindow::default();
        node.lost_reported = 0;
        node.dirty = false;
        node.remote = None;
        node.claimed = None;
        effects.push(Effect::Persist(RuntimeWrite::Node(record)));
        effects.push(Effect::Persist(RuntimeWrite::Presence(
            device,
            PresenceRecord {
                last_seen_ms: now_ms,
                stopped_cleanly: false,
            },
        )));
        effects.push(Effect::Publish(AnchorEvent::NodeRegistered {
            device,
            name: reg.name,
            platform: reg.platform,
            agent_version: reg.agent_version,
        }));
        self.update_presence(&device, now_ms, &mut effects);
        (session, effects)
    }

    /// The node of `device` if `session` is its live session.
    fn session_node(&mut self, device: &DeviceId, session: SessionId) -> Option<&mut Node<S>> {
        self.nodes
            .get_mut(device)
            .map(|n| &mut **n)
            .filter(|n| n.is_session(session))
    }

    /// The node said it is stopping: offline at once.
    pub fn stopping(
        &mut self,
        device: &DeviceId,
        session: SessionId,
        now_ms: u64,
    ) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let Some(node) = self.session_node(device, session) else {
            return effects;
        };
        node.stopped_cleanly = true;
        node.live = None;
        node.last_seen_ms = Some(now_ms);
        node.dirty = false;
        effects.push(Effect::Persist(RuntimeWrite::Presence(
            *device,
            PresenceRecord {
                last_seen_ms: now_ms,
                stopped_cleanly: true,
            },
        )));
        self.release(device, &mut effects);
        self.update_presence(device, now_ms, &mut effects);
        effects
    }

    /// This anchor no longer holds the session of `device`: its claim goes.
    fn release(&mut self, device: &DeviceId, effects: &mut Vec<Effect<S>>) {
        if let Some(node) = self.nodes.get_mut(device)
            && node.claimed.take().is_some()
        {
            effects.push(Effect::Persist(RuntimeWrite::Session(*device, None)));
        }
    }

    /// A capability changed availability.
    pub fn capability_changed(
        &mut self,
        device: &DeviceId,
        session: SessionId,
        cap: CapabilityRecord,
        now_ms: u64,
    ) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let Some(node) = self.session_node(device, session) else {
            return effects;
        };
        let Some(record) = node.record.as_mut() else {
            return effects;
        };
        match record.capabilities.iter_mut().find(|x| x.name == cap.name) {
            Some(existing) => *existing = cap.clone(),
            None => record.capabilities.push(cap.clone()),
        }
        effects.push(Effect::Persist(RuntimeWrite::Node(record.clone())));
        effects.push(Effect::Publish(AnchorEvent::CapabilityChanged {
            device: *device,
            name: cap.name,
            available: cap.available,
            reason: cap.reason,
        }));
        self.update_presence(device, now_ms, &mut effects);
        effects
    }

    /// Heartbeat `seq` arrived on `session`. `None`: not the live session, or a duplicate
    /// (no ack is sent). The hot path: no allocation, no effect.
    pub fn heartbeat(
        &mut self,
        device: &DeviceId,
        session: SessionId,
        seq: u64,
        now_ms: u64,
    ) -> Option<Ingested> {
        let degraded_loss = self.settings.thresholds.degraded_loss;
        let node = self.session_node(device, session)?;
        if !node.window.record(seq) {
            return None;
        }
        node.last_seen_ms = Some(now_ms);
        node.dirty = true;
        let newly_lost = node.window.lost.saturating_sub(node.lost_reported);
        node.lost_reported = node.lost_reported.max(node.window.lost);
        let ingested = Ingested {
            received: node.window.received,
            newly_lost,
        };
        // A node showing online with little loss stays online: its deadlines only moved later.
        // Anything else (stale, degraded, loss crossing the bound) is looked at on the next tick.
        let unchanged = node.presence == Some(Presence::Online)
            && node.window.loss().is_none_or(|l| l <= degraded_loss);
        if !unchanged {
            self.schedule(device, now_ms);
        }
        Some(ingested)
    }

    /// A session's connection ended.
    pub fn disconnected(
        &mut self,
        device: &DeviceId,
        session: SessionId,
        now_ms: u64,
    ) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let Some(node) = self.session_node(device, session) else {
            return effects;
        };
        node.live = None;
        self.ended(device, now_ms, &mut effects);
        effects
    }

    /// Ends the live session of `device` from the anchor's side (revoked, removed, paired
    /// again): it is closed with `code` and the node is no longer connected.
    pub fn close(
        &mut self,
        device: &DeviceId,
        code: ErrorCode,
        reason: &'static str,
        now_ms: u64,
    ) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let Some(live) = self.nodes.get_mut(device).and_then(|n| n.live.take()) else {
            return effects;
        };
        effects.push(Effect::Close {
            handle: live.handle,
            code,
            reason,
        });
        self.ended(device, now_ms, &mut effects);
        effects
    }

    fn ended(&mut self, device: &DeviceId, now_ms: u64, effects: &mut Vec<Effect<S>>) {
        if let Some(p) = self.nodes.get_mut(device).and_then(|n| {
            n.dirty = false;
            n.presence_record()
        }) {
            effects.push(Effect::Persist(RuntimeWrite::Presence(*device, p)));
        }
        self.release(device, effects);
        effects.push(Effect::Publish(AnchorEvent::NodeDisconnected {
            device: *device,
        }));
        self.update_presence(device, now_ms, effects);
    }

    /// The periodic evaluation: presence transitions are published, and live sessions that
    /// sent no heartbeat for [`Settings::half_open_after`] are closed as half-open (the node
    /// may be gone without having closed its connection; work must not be dispatched into it).
    /// Only nodes whose deadline has come are looked at.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let half_open =
            u64::try_from(self.settings.half_open_after.as_millis()).unwrap_or(u64::MAX);
        while let Some(&Reverse((at, id))) = self.due.peek()
            && at <= now_ms
        {
            self.due.pop();
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            if node.due_at != Some(at) {
                continue;
            }
            node.due_at = None;
            let silent = node.live.is_some()
                && node
                    .last_seen_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) >= half_open);
            if silent {
                effects.extend(self.close(
                    &id,
                    ErrorCode::Timeout,
                    "no heartbeat: the connection is half-open",
                    now_ms,
                ));
            } else {
                self.update_presence(&id, now_ms, &mut effects);
            }
        }
        effects
    }

    /// Claims every live session again (after this anchor's lease lapsed in the store).
    pub fn reclaim(&mut self) -> Vec<RuntimeWrite> {
        let Some(instance) = self.instance.clone() else {
            return Vec::new();
        };
        self.nodes
            .iter_mut()
            .filter_map(|(id, n)| {
                n.claimed = None;
                match n.claim::<S>(id, &instance) {
                    Some(Effect::Persist(w)) => Some(w),
                    _ => None,
                }
            })
            .collect()
    }

    /// Another anchor claimed the session of `device` (`Some`) or its claim went (`None`).
    /// A claim by another anchor ends this anchor's session of the node: the node moved.
    pub fn remote_session(
        &mut self,
        device: &DeviceId,
        session: Option<SessionRecord>,
        now_ms: u64,
    ) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        if let Some(s) = &session
            && self.instance.as_ref() == Some(&s.instance)
        {
            return effects;
        }
        let node = self.nodes.entry(*device).or_default();
        if session.is_some()
            && let Some(live) = node.live.take()
        {
            node.claimed = None;
            effects.push(Effect::Close {
                handle: live.handle,
                code: ErrorCode::Replaced,
                reason: "the node registered with another anchor",
            });
            effects.push(Effect::Publish(AnchorEvent::NodeDisconnected {
                device: *device,
            }));
        }
        let was_connected = node.remote.is_some();
        node.remote = session;
        if was_connected && node.remote.is_none() && node.live.is_none() {
            effects.push(Effect::Publish(AnchorEvent::NodeDisconnected {
                device: *device,
            }));
        }
        self.update_presence(device, now_ms, &mut effects);
        effects
    }

    /// Another anchor registered the node: its record, and an event if it is a new
    /// registration.
    pub fn remote_node(&mut self, record: NodeRecord, now_ms: u64) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let device = record.device_id;
        let node = self.nodes.entry(device).or_default();
        if node.live.is_some() {
            return effects;
        }
        let newer = node
            .record
            .as_ref()
            .is_none_or(|r| r.registered_at_ms < record.registered_at_ms);
        if newer {
            effects.push(Effect::Publish(AnchorEvent::NodeRegistered {
                device,
                name: record.name.clone(),
                platform: record.platform.clone(),
                agent_version: record.agent_version.clone(),
            }));
            node.last_seen_ms = node.last_seen_ms.max(Some(record.registered_at_ms));
            node.stopped_cleanly = false;
        }
        node.record = Some(record);
        self.update_presence(&device, now_ms, &mut effects);
        effects
    }

    /// Another anchor's last-seen of the node.
    pub fn remote_presence(
        &mut self,
        device: &DeviceId,
        p: PresenceRecord,
        now_ms: u64,
    ) -> Vec<Effect<S>> {
        let mut effects = Vec::new();
        let node = self.nodes.entry(*device).or_default();
        if node.live.is_some() || node.last_seen_ms.is_some_and(|t| t > p.last_seen_ms) {
            return effects;
        }
        node.last_seen_ms = Some(p.last_seen_ms);
        node.stopped_cleanly = p.stopped_cleanly;
        self.update_presence(device, now_ms, &mut effects);
        effects
    }

    /// Last-seen times changed since the last flush, to be written in one batch.
    pub fn flush(&mut self) -> Vec<RuntimeWrite> {
        self.nodes
            .iter_mut()
            .filter(|(_, n)| n.dirty)
            .filter_map(|(id, n)| {
                n.dirty = false;
                n.presence_record().map(|p| RuntimeWrite::Presence(*id, p))
            })
            .collect()
    }

    /// Forgets a removed device.
    pub fn forget(&mut self, device: &DeviceId) -> Option<Node<S>> {
        self.nodes.remove(device).map(|n| *n)
    }

    /// The live session of `device`.
    pub fn live(&self, device: &DeviceId) -> Option<&Live<S>> {
        self.nodes.get(device)?.live.as_ref()
    }

    /// One node.
    pub fn node(&self, device: &DeviceId) -> Option<&Node<S>> {
        self.nodes.get(device).map(|n| &**n)
    }

    /// Every node.
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &Node<S>)> {
        self.nodes.iter().map(|(d, n)| (d, &**n))
    }

    /// Reevaluates the presence of `device` now (publishing and claiming a change) and queues
    /// its next deadline.
    fn update_presence(&mut self, device: &DeviceId, now_ms: u64, effects: &mut Vec<Effect<S>>) {
        let t = self.settings.thresholds;
        let Some(node) = self.nodes.get_mut(device) else {
            return;
        };
        effects.extend(node.reevaluate(device, now_ms, &t));
        if let Some(instance) = &self.instance {
            effects.extend(node.claim(device, instance));
        }
        if let Some(next) = node.next_deadline(now_ms, &self.settings) {
            self.schedule(device, next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        thresholds: Thresholds {
            stale_after: Duration::from_secs(3),
            offline_after: Duration::from_secs(6),
            degraded_loss: 0.25,
        },
        half_open_after: Duration::from_secs(3),
    };

    fn device(n: u8) -> DeviceId {
        DeviceId::from_bytes([n; anchorage_mesh::identity::DEVICE_ID_LEN])
    }

    fn reg() -> Registration {
        Registration {
            name: "n".into(),
            platform: "linux".into(),
            agent_version: "0.1".into(),
            capabilities: vec![CapabilityRecord {
                name: "echo".into(),
                available: true,
                reason: None,
                description: String::new(),
            }],
        }
    }

    fn presences(effects: &[Effect<u32>]) -> Vec<Presence> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish(AnchorEvent::Presence { to, .. }) => Some(*to),
                _ => None,
            })
            .collect()
    }

    fn closed(effects: &[Effect<u32>]) -> Vec<(u32, ErrorCode)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Close { handle, code, .. } => Some((*handle, *code)),
                _ => None,
            })
            .collect()
    }

    fn claims(effects: &[Effect<u32>]) -> Vec<Option<(String, Presence)>> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Persist(RuntimeWrite::Session(_, s)) => {
                    Some(s.as_ref().map(|s| (s.instance.clone(), s.presence)))
                }
                _ => None,
            })
            .collect()
    }

    fn held_by(instance: &str, presence: Presence) -> SessionRecord {
        SessionRecord {
            instance: instance.into(),
            since_ms: 0,
            presence,
        }
    }

    #[test]
    fn in_a_cluster_a_session_is_claimed_when_its_presence_changes_and_released_at_its_end() {
        let mut t = Table::new(SETTINGS);
        t.set_instance("me".into());
        let (s, fx) = t.register(device(1), 10u32, reg(), 0);
        assert_eq!(claims(&fx), vec![Some(("me".into(), Presence::Online))]);
        // Heartbeats and ticks that change nothing write nothing.
        t.heartbeat(&device(1), s, 1, 1_000);
        assert!(claims(&t.tick(1_500)).is_empty());
        // A capability went away: degraded, and the claim says so, once.
        let gone = CapabilityRecord {
            name: "echo".into(),
            available: false,
            reason: Some("disk full".into()),
            description: String::new(),
        };
        assert_eq!(
            claims(&t.capability_changed(&device(1), s, gone, 1_200)),
            vec![Some(("me".into(), Presence::Degraded))]
        );
        assert!(claims(&t.tick(1_300)).is_empty());
        let fx = t.disconnected(&device(1), s, 1_400);
        assert_eq!(claims(&fx), vec![None], "released");
        // Alone on its store, an anchor claims nothing.
        let mut alone = Table::new(SETTINGS);
        let (_, fx) = alone.register(device(1), 10u32, reg(), 0);
        assert!(claims(&fx).is_empty());
    }

    #[test]
    fn a_node_held_by_another_anchor_shows_its_presence_and_leaves_this_one() {
        let mut t = Table::new(SETTINGS);
        t.set_instance("me".into());
        let (_, _) = t.register(device(1), 10u32, reg(), 0);
        // Registered elsewhere: this session is closed as replaced, nothing is released
        // (the key is the other anchor's now), and the node shows as connected there.
        let fx = t.remote_session(&device(1), Some(held_by("b", Presence::Online)), 100);
        assert_eq!(closed(&fx), vec![(10, ErrorCode::Replaced)]);
        assert!(claims(&fx).is_empty());
        let node = t.node(&device(1)).unwrap();
        assert!(node.live.is_none() && node.connected());
        assert_eq!(node.presence(100, &SETTINGS.thresholds), Presence::Online);
        // Its holder says degraded: so does this anchor, with an event.
        let fx = t.remote_session(&device(1), Some(held_by("b", Presence::Degraded)), 200);
        assert_eq!(presences(&fx), vec![Presence::Degraded]);
        // The holder's lease lapsed: not connected, and presence decays by last-seen.
        let fx = t.remote_presence(
            &device(1),
            PresenceRecord {
                last_seen_ms: 1_000,
                stopped_cleanly: false,
            },
            1_000,
        );
        assert!(fx.is_empty() || presences(&fx).is_empty());
        let fx = t.remote_session(&device(1), None, 1_100);
        assert!(!t.node(&device(1)).unwrap().connected());
        assert_eq!(presences(&fx), vec![Presence::Online]);
        assert_eq!(presences(&t.tick(4_100)), vec![Presence::Stale]);
        // This anchor's own claim coming back through the store changes nothing.
        assert!(
            t.remote_session(&device(1), Some(held_by("me", Presence::Online)), 4_200)
                .is_empty()
        );
    }

    #[test]
    fn a_registration_elsewhere_is_taken_unless_the_node_is_live_here() {
        let mut t: Table<u32> = Table::new(SETTINGS);
        t.set_instance("me".into());
        let record = |at: u64, name: &str| NodeRecord {
            device_id: device(2),
            name: name.into(),
            platform: "linux".into(),
            agent_version: "0.1".into(),
            capabilities: Vec::new(),
            first_registered_at_ms: 0,
            registered_at_ms: at,
        };
        let fx = t.remote_node(record(500, "elsewhere"), 500);
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Publish(AnchorEvent::NodeRegistered { .. })))
        );
        assert_eq!(t.node(&device(2)).unwrap().last_seen_ms, Some(500));
        // An older record (a late echo) does not announce a registration again.
        let fx = t.remote_node(record(400, "older"), 600);
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::Publish(AnchorEvent::NodeRegistered { .. })))
        );
        let (_, _) = t.register(device(2), 7, reg(), 700);
        assert!(t.remote_node(record(800, "late"), 800).is_empty());
        assert_eq!(
            t.node(&device(2)).unwrap().record.as_ref().unwrap().name,
            "n"
        );
    }

    #[test]
    fn a_lapsed_lease_claims_every_live_session_again() {
        let mut t = Table::new(SETTINGS);
        t.set_instance("me".into());
        t.register(device(1), 1u32, reg(), 0);
        t.register(device(2), 2u32, reg(), 0);
        let writes = t.reclaim();
        assert_eq!(writes.len(), 2);
        assert!(writes.iter().all(|w| matches!(
            w,
            RuntimeWrite::Session(_, Some(SessionRecord { instance, .. })) if instance == "me"
        )));
    }

    #[test]
    fn a_new_session_replaces_the_old_and_old_inputs_are_ignored() {
        let mut t = Table::new(SETTINGS);
        let (first, fx) = t.register(device(1), 10u32, reg(), 0);
        assert_eq!(presences(&fx), vec![Presence::Online]);
        let (second, fx) = t.register(device(1), 11, reg(), 100);
        assert!(second > first);
        assert_eq!(closed(&fx), vec![(10, ErrorCode::Replaced)]);
        // The old session's heartbeats, stop and disconnect change nothing.
        assert_eq!(t.heartbeat(&device(1), first, 1, 200), None);
        assert!(t.stopping(&device(1), first, 300).is_empty());
        assert!(t.disconnected(&device(1), first, 300).is_empty());
        assert_eq!(t.live(&device(1)).map(|l| l.handle), Some(11));
        assert!(t.heartbeat(&device(1), second, 1, 400).is_some());
    }

    #[test]
    fn presence_follows_heartbeats_and_a_clean_stop_is_offline_at_once() {
        let mut t = Table::new(Settings {
            half_open_after: Duration::from_secs(3600),
            ..SETTINGS
        });
        let (s, _) = t.register(device(1), 1u32, reg(), 0);
        assert!(presences(&t.tick(2_999)).is_empty());
        assert_eq!(presences(&t.tick(3_000)), vec![Presence::Stale]);
        t.heartbeat(&device(1), s, 1, 3_500);
        assert_eq!(presences(&t.tick(3_600)), vec![Presence::Online]);
        assert_eq!(presences(&t.tick(9_500)), vec![Presence::Offline]);
        let (s, _) = t.register(device(1), 2, reg(), 10_000);
        let fx = t.stopping(&device(1), s, 10_100);
        assert_eq!(presences(&fx), vec![Presence::Offline]);
        assert!(t.live(&device(1)).is_none());
    }

    #[test]
    fn a_silent_session_is_closed_as_half_open_once() {
        let mut t = Table::new(SETTINGS);
        let (s, _) = t.register(device(1), 7u32, reg(), 0);
        t.heartbeat(&device(1), s, 1, 1_000);
        assert!(closed(&t.tick(3_999)).is_empty());
        let fx = t.tick(4_000);
        assert_eq!(closed(&fx), vec![(7, ErrorCode::Timeout)]);
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Publish(AnchorEvent::NodeDisconnected { .. })))
        );
        assert!(
            t.live(&device(1)).is_none(),
            "nothing is dispatched into it"
        );
        assert!(closed(&t.tick(5_000)).is_empty());
        // The session's own end, when quinn notices, changes nothing more.
        assert!(t.disconnected(&device(1), s, 6_000).is_empty());
    }

    #[test]
    fn heartbeats_count_loss_once_and_never_go_back() {
        let mut t = Table::new(SETTINGS);
        let (s, _) = t.register(device(1), 1u32, reg(), 0);
        let a = t.heartbeat(&device(1), s, 1, 10).unwrap();
        assert_eq!(a.received, 1);
        // 2 and 3 skipped.
        let b = t.heartbeat(&device(1), s, 4, 20).unwrap();
        assert_eq!((b.received, b.newly_lost), (2, 2));
        // 3 was only late: received, and the loss already counted is not counted again.
        let c = t.heartbeat(&device(1), s, 3, 30).unwrap();
        assert_eq!((c.received, c.newly_lost), (3, 0));
        let d = t.heartbeat(&device(1), s, 6, 40).unwrap();
        assert_eq!(d.newly_lost, 0, "the late 3 made room for the skipped 5");
        assert_eq!(t.heartbeat(&device(1), s, 6, 50), None, "duplicate");
    }

    #[test]
    fn last_seen_is_flushed_in_batches_only_when_it_changed() {
        let mut t = Table::new(SETTINGS);
        let (s, _) = t.register(device(1), 1u32, reg(), 0);
        t.register(device(2), 2u32, reg(), 0);
        assert!(t.flush().is_empty());
        t.heartbeat(&device(1), s, 1, 500);
        t.heartbeat(&device(1), s, 2, 600);
        let writes = t.flush();
        assert_eq!(writes.len(), 1);
        assert!(matches!(
            &writes[0],
            RuntimeWrite::Presence(id, p) if *id == device(1) && p.last_seen_ms == 600
        ));
        assert!(t.flush().is_empty());
    }

    /// After every tick, each node shows the presence a walk over every node would give it,
    /// and no live session is past the half-open bound: looking only at due nodes misses none.
    #[test]
    fn a_tick_of_due_nodes_agrees_with_evaluating_every_node() {
        let mut t = Table::new(SETTINGS);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut sessions: HashMap<u8, (SessionId, u64)> = HashMap::new();
        let mut now = 0;
        let mut handle = 0u32;
        for step in 0..20_000 {
            now += next(700);
            let d = u8::try_from(next(12)).unwrap();
            match next(100) {
                0..=59 => {
                    if let Some((s, seq)) = sessions.get_mut(&d) {
                        // Sometimes a gap: loss that may degrade the node.
                        *seq += 1 + next(4) / 3;
                        t.heartbeat(&device(d), *s, *seq, now);
                    }
                }
                60..=64 => {
                    handle += 1;
                    let mut r = reg();
                    r.capabilities[0].available = next(4) != 0;
                    let (s, _) = t.register(device(d), handle, r, now);
                    sessions.insert(d, (s, 0));
                }
                65..=66 => {
                    if let Some((s, _)) = sessions.remove(&d) {
                        t.disconnected(&device(d), s, now);
                    }
                }
                67 => {
                    if let Some((s, _)) = sessions.remove(&d) {
                        t.stopping(&device(d), s, now);
                    }
                }
                68 => {
                    let stale = Duration::from_millis(1_000 + next(4_000));
                    t.set_settings(Settings {
                        thresholds: Thresholds {
                            stale_after: stale,
                            offline_after: stale * 2,
                            ..SETTINGS.thresholds
                        },
                        half_open_after: stale,
                    });
                }
                _ => {
                    t.tick(now);
                    let settings = *t.settings();
                    for (id, n) in t.iter() {
                        assert_eq!(
                            n.presence,
                            Some(n.presence(now, &settings.thresholds)),
                            "step {step}: node {id} at {now} ms"
                        );
                        let silent = n.last_seen_ms.map(|s| now - s);
                        assert!(
                            n.live.is_none()
                                || silent.is_some_and(
                                    |s| s < settings.half_open_after.as_millis() as u64
                                ),
                            "step {step}: node {id} is half-open and still live"
                        );
                    }
                    sessions
                        .retain(|d, (s, _)| t.live(&device(*d)).is_some_and(|l| l.session == *s));
                }
            }
        }
        assert!(
            t.due.len() <= 3 * t.nodes.len() + 1,
            "the queue stays bounded: {}",
            t.due.len()
        );
    }

    #[test]
    fn closing_from_the_anchor_ends_the_session() {
        let mut t = Table::new(SETTINGS);
        t.register(device(1), 5u32, reg(), 0);
        let fx = t.close(&device(1), ErrorCode::Revoked, "device revoked", 10);
        assert_eq!(closed(&fx), vec![(5, ErrorCode::Revoked)]);
        assert!(t.live(&device(1)).is_none());
        assert!(
            t.close(&device(1), ErrorCode::Revoked, "again", 20)
                .is_empty()
        );
    }
}
