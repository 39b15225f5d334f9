//! The node runtime of the anchor: registrations, heartbeats, presence, invocations.
//!
//! In memory: one [`NodeState`] per device that ever registered (registration, live session,
//! last-seen, heartbeat loss window, last published presence) and the invocations that are not
//! finished yet. On disk (through the store's writer thread, in order): registrations at once,
//! last-seen in batches every [`FLUSH_INTERVAL`] (never a write per heartbeat), every
//! invocation transition.
//!
//! Invocations are pushed, not polled: created `queued`, dispatched at once on a new stream
//! when the node is connected, else when it registers; a queued invocation whose deadline
//! passes becomes `timed_out` and is never dispatched. Nodes drop duplicates by id, so an
//! invocation whose stream broke is simply queued again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_mesh::framed::framed;
use anchorage_mesh::presence::{self, LossWindow, Observation, Presence, Thresholds};
use anchorage_wire::PROTOCOL_VERSION;
use anchorage_wire::control::{CapabilityInfo, Register};
use anchorage_wire::datagram::{Datagram, HeartbeatAck};
use anchorage_wire::invoke::{InvocationId, InvokeReply, InvokeRequest, Outcome};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::anchor::Anchor;
use crate::config::AnchorConfig;
use crate::records::*;
use crate::session::SessionHandle;
use crate::store::{Space, Store, StoreError, Writer};

/// How often presence is evaluated and deadlines are swept.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// How often buffered last-seen times are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// How often finished invocations are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Pause before re-dispatching an invocation the node reported busy or still running.
pub const REDISPATCH_DELAY: Duration = Duration::from_millis(500);
/// Default invocation timeout.
pub const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest invocation timeout.
pub const MAX_INVOKE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Buckets of the invocation latency histogram, seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Runtime state.
#[derive(Debug)]
pub struct Runtime {
    pub(crate) nodes: Mutex<HashMap<DeviceId, NodeState>>,
    active: Mutex<HashMap<[u8; 16], InvocationRecord>>,
    waiters: Mutex<HashMap<[u8; 16], Arc<Notify>>>,
    pub(crate) writer: Writer,
    /// Heartbeats received in total.
    pub heartbeats_received: AtomicU64,
    /// Heartbeats estimated lost (sequence gaps) in total.
    pub heartbeats_lost: AtomicU64,
    pub(crate) invocation_counts: Mutex<BTreeMap<(&'static str, String), u64>>,
    pub(crate) latency: Mutex<Histogram>,
    next_id: std::sync::atomic::AtomicU32,
}

/// A simple cumulative histogram.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    /// Count per bucket of [`LATENCY_BUCKETS`] (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    /// Observations.
    pub count: u64,
    /// Sum of observations, seconds.
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        self.count += 1;
        self.sum += secs;
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i] += 1;
        }
    }
}

/// What the anchor knows of one node.
#[derive(Debug, Default)]
pub(crate) struct NodeState {
    pub record: Option<NodeRecord>,
    pub live: Option<Live>,
    pub last_seen_ms: Option<u64>,
    pub stopped_cleanly: bool,
    pub window: LossWindow,
    pub presence: Option<Presence>,
    pub dirty: bool,
}

/// The live session of a node.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub session: u64,
    pub since_ms: u64,
    pub conn: quinn::Connection,
}

impl NodeState {
    /// Whether `session` is the live one (events of an older session are ignored).
    fn is_session(&self, session: u64) -> bool {
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

    /// Presence at `now_ms`.
    pub fn presence(&self, now_ms: u64, t: &Thresholds) -> Presence {
        presence::evaluate(&self.observation(now_ms), t)
    }
}

fn cap_record(c: &CapabilityInfo) -> CapabilityRecord {
    CapabilityRecord {
        name: c.name.clone(),
        available: c.available,
        reason: c.reason.clone(),
        description: c.description.clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Thresholds from the configuration.
pub(crate) fn thresholds(config: &AnchorConfig) -> Thresholds {
    Thresholds {
        stale_after: config.presence.stale_after,
        offline_after: config.presence.offline_after,
        degraded_loss: config.presence.degraded_loss,
    }
}

impl Runtime {
    /// Loads registrations, last-seen times and unfinished invocations.
    pub fn new(store: &Store, _config: &AnchorConfig) -> Result<Runtime, StoreError> {
        let mut nodes: HashMap<DeviceId, NodeState> = HashMap::new();
        for (_, rec) in store.scan::<NodeRecord>(Space::Nodes)? {
            let id = rec.device_id;
            nodes.entry(id).or_default().record = Some(rec);
        }
        for (key, p) in store.scan::<PresenceRecord>(Space::Presence)? {
            if let Ok(bytes) =
                <[u8; anchorage_mesh::identity::DEVICE_ID_LEN]>::try_from(key.as_slice())
            {
                let state = nodes.entry(DeviceId::from_bytes(bytes)).or_default();
                state.last_seen_ms = Some(p.last_seen_ms);
                state.stopped_cleanly = p.stopped_cleanly;
            }
        }
        let mut active = HashMap::new();
        for (_, mut rec) in store.scan::<InvocationRecord>(Space::Invocations)? {
            if !rec.state.is_final() {
                // Whatever was in flight is offered again; the node drops duplicates.
                rec.state = InvocationState::Queued;
                active.insert(rec.id, rec);
            }
        }
        Ok(Runtime {
            nodes: Mutex::new(nodes),
            active: Mutex::new(active),
            waiters: Mutex::new(HashMap::new()),
            writer: store.writer(),
            heartbeats_received: AtomicU64::new(0),
            heartbeats_lost: AtomicU64::new(0),
            invocation_counts: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(Histogram::default()),
            next_id: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// A node registered on a new session.
    pub(crate) fn registered(
        &self,
        anchor: &Anchor,
        device: &DeviceId,
        handle: &SessionHandle,
        r: &Register,
    ) {
        let now = anchor.now_ms();
        let record = {
            let mut nodes = lock(&self.nodes);
            let state = nodes.entry(*device).or_default();
            let first = state
                .record
                .as_ref()
                .map_or(now, |old| old.first_registered_at_ms);
            let record = NodeRecord {
                device_id: *device,
                name: r.name.clone(),
                platform: r.platform.clone(),
                agent_version: r.agent_version.clone(),
                capabilities: r.capabilities.iter().map(cap_record).collect(),
                first_registered_at_ms: first,
                registered_at_ms: now,
            };
            state.record = Some(record.clone());
            state.live = Some(Live {
                session: handle.id,
                since_ms: now,
                conn: handle.conn.clone(),
            });
            state.last_seen_ms = Some(now);
            state.stopped_cleanly = false;
            state.window = LossWindow::default();
            state.dirty = true;
            record
        };
        let writer = self.writer.clone();
        let key = device.as_bytes().to_vec();
        tokio::spawn(async move {
            writer.put(Space::Nodes, &key, &record).await;
            writer
                .put(
                    Space::Presence,
                    &key,
                    &PresenceRecord {
                        last_seen_ms: now,
                        stopped_cleanly: false,
                    },
                )
                .await;
        });
        anchor.publish(
            "node.registered",
            Some(device),
            serde_json::json!({"name": r.name, "platform": r.platform, "agent_version": r.agent_version}),
        );
        self.update_presence(anchor, device);
        self.dispatch_queued(anchor, device);
    }

    /// The node said it is stopping: offline at once.
    pub(crate) fn stopping(&self, anchor: &Anchor, device: &DeviceId, session: u64) {
        let now = anchor.now_ms();
        {
            let mut nodes = lock(&self.nodes);
            if let Some(state) = nodes.get_mut(device)
                && state.is_session(session)
            {
                state.stopped_cleanly = true;
                state.live = None;
                state.last_seen_ms = Some(now);
            }
        }
        let _ = self.writer.try_put(
            Space::Presence,
            device.as_bytes(),
            &PresenceRecord {
                last_seen_ms: now,
                stopped_cleanly: true,
            },
        );
        self.update_presence(anchor, device);
    }

    /// A capability changed availability.
    pub(crate) fn capability_changed(
        &self,
        anchor: &Anchor,
        device: &DeviceId,
        session: u64,
        c: CapabilityInfo,
    ) {
        let record = {
            let mut nodes = lock(&self.nodes);
            let Some(state) = nodes.get_mut(device) else {
                return;
            };
            if !state.is_session(session) {
                return;
            }
            let Some(record) = state.record.as_mut() else {
                return;
            };
            match record.capabilities.iter_mut().find(|x| x.name == c.name) {
                Some(existing) => *existing = cap_record(&c),
                None => record.capabilities.push(cap_record(&c)),
            }
            record.clone()
        };
        let _ = self
            .writer
            .try_put(Space::Nodes, device.as_bytes(), &record);
        anchor.publish(
            "node.capability",
            Some(device),
            serde_json::json!({"name": c.name, "available": c.available, "reason": c.reason}),
        );
        self.update_presence(anchor, device);
    }

    /// A datagram arrived on a node session: a heartbeat is recorded and acked.
    pub(crate) fn datagram(
        &self,
        anchor: &Anchor,
        device: &DeviceId,
        session: u64,
        conn: &quinn::Connection,
        bytes: &[u8],
    ) {
        let Ok(Datagram::Heartbeat(hb)) = Datagram::decode(bytes) else {
            debug!(device_id = %device, "ignored a datagram that is not a heartbeat");
            return;
        };
        let now = anchor.now_ms();
        let received = {
            let mut nodes = lock(&self.nodes);
            let Some(state) = nodes.get_mut(device) else {
                return;
            };
            if !state.is_session(session) {
                return;
            }
            let lost_before = state.window.lost;
            if !state.window.record(hb.seq) {
                return; // duplicate
            }
            let lost_now = state.window.lost;
            if lost_now > lost_before {
                self.heartbeats_lost
                    .fetch_add(lost_now - lost_before, Ordering::Relaxed);
            } else if lost_now < lost_before {
                let _ =
                    self.heartbeats_lost
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                            Some(v.saturating_sub(lost_before - lost_now))
                        });
            }
            state.last_seen_ms = Some(now);
            state.dirty = true;
            state.window.received
        };
        self.heartbeats_received.fetch_add(1, Ordering::Relaxed);
        let ack = Datagram::HeartbeatAck(HeartbeatAck {
            seq: hb.seq,
            echo_node_time_ms: hb.node_time_ms,
            received,
        });
        if let Ok(bytes) = ack.encode() {
            let _ = conn.send_datagram(bytes.into());
        }
    }

    /// A session ended.
    pub(crate) fn disconnected(&self, anchor: &Anchor, device: &DeviceId, session: u64) {
        let snapshot = {
            let mut nodes = lock(&self.nodes);
            let Some(state) = nodes.get_mut(device) else {
                return;
            };
            if !state.is_session(session) {
                return;
            }
            state.live = None;
            state.last_seen_ms.map(|t| PresenceRecord {
                last_seen_ms: t,
                stopped_cleanly: state.stopped_cleanly,
            })
        };
        if let Some(p) = snapshot {
            let _ = self.writer.try_put(Space::Presence, device.as_bytes(), &p);
        }
        anchor.publish("node.disconnected", Some(device), serde_json::json!({}));
        self.update_presence(anchor, device);
    }

    /// A device was removed: forget its node and drop its queued work.
    pub(crate) fn forget(&self, device: &DeviceId) {
        lock(&self.nodes).remove(device);
    }

    /// Writes buffered last-seen times and waits until they are on disk (flushed to the OS).
    pub(crate) async fn flush(&self, _store: &Store) {
        self.flush_presence().await;
        let _ = self.writer.barrier().await;
    }

    async fn flush_presence(&self) {
        let dirty: Vec<(DeviceId, PresenceRecord)> = {
            let mut nodes = lock(&self.nodes);
            nodes
                .iter_mut()
                .filter(|(_, s)| s.dirty)
                .filter_map(|(id, s)| {
                    s.dirty = false;
                    s.last_seen_ms.map(|t| {
                        (
                            *id,
                            PresenceRecord {
                                last_seen_ms: t,
                                stopped_cleanly: s.stopped_cleanly,
                            },
                        )
                    })
                })
                .collect()
        };
        for (id, p) in dirty {
            self.writer.put(Space::Presence, id.as_bytes(), &p).await;
        }
    }

    /// Re-evaluates one device's presence and publishes a transition.
    fn update_presence(&self, anchor: &Anchor, device: &DeviceId) {
        let t = thresholds(&anchor.shared.config);
        let now = anchor.now_ms();
        let change = {
            let mut nodes = lock(&self.nodes);
            let Some(state) = nodes.get_mut(device) else {
                return;
            };
            let p = state.presence(now, &t);
            let old = state.presence.replace(p);
            (old != Some(p)).then_some((old, p))
        };
        if let Some((old, new)) = change {
            anchor.publish(
                "presence",
                Some(device),
                serde_json::json!({"from": old.map(Presence::as_str), "to": new.as_str()}),
            );
        }
    }

    /// Re-evaluates every device's presence and publishes transitions.
    fn update_all_presence(&self, anchor: &Anchor) {
        let t = thresholds(&anchor.shared.config);
        let now = anchor.now_ms();
        let changes: Vec<(DeviceId, Option<Presence>, Presence)> = {
            let mut nodes = lock(&self.nodes);
            nodes
                .iter_mut()
                .filter_map(|(id, state)| {
                    let p = state.presence(now, &t);
                    let old = state.presence.replace(p);
                    (old != Some(p)).then_some((*id, old, p))
                })
                .collect()
        };
        for (id, old, new) in changes {
            anchor.publish(
                "presence",
                Some(&id),
                serde_json::json!({"from": old.map(Presence::as_str), "to": new.as_str()}),
            );
        }
    }

    /// Whether the device has a registered, live session now.
    pub(crate) fn is_live(&self, device: &DeviceId) -> bool {
        lock(&self.nodes)
            .get(device)
            .is_some_and(|s| s.live.is_some())
    }

    /// Live connections.
    pub fn connected(&self) -> usize {
        lock(&self.nodes)
            .values()
            .filter(|s| s.live.is_some())
            .count()
    }

    // ---------------------------------------------------------------------------------------
    // Invocations

    /// Creates an invocation (rejected at once for an unknown or unavailable capability) and
    /// dispatches it if the node is connected. The record is on disk when this returns.
    pub(crate) async fn create_invocation(
        &self,
        anchor: &Anchor,
        device: DeviceId,
        capability: String,
        input: Vec<u8>,
        timeout: Duration,
        requested_by: String,
    ) -> Result<InvocationRecord, StoreError> {
        let now = anchor.now_ms();
        // Creation time, then a counter (ids made in the same millisecond keep their order),
        // then randomness (ids stay unguessable and unique across restarts).
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&now.to_be_bytes());
        let seq = self.next_id.fetch_add(1, Ordering::Relaxed);
        id[8..12].copy_from_slice(&seq.to_be_bytes());
        let random = anchorage_mesh::pairing::random_id::<4>()
            .map_err(|e| StoreError::Task(e.to_string()))?;
        id[12..].copy_from_slice(&random);
        let rejection = {
            let nodes = lock(&self.nodes);
            nodes
                .get(&device)
                .and_then(|s| s.record.as_ref())
                .and_then(
                    |r| match r.capabilities.iter().find(|c| c.name == capability) {
                        None => Some(format!("the node has no capability {capability}")),
                        Some(c) if !c.available => Some(format!(
                            "{capability} is unavailable on the node: {}",
                            c.reason.clone().unwrap_or_else(|| "no reason given".into())
                        )),
                        Some(_) => None,
                    },
                )
        };
        let mut record = InvocationRecord {
            id,
            device_id: device,
            capability,
            input,
            state: InvocationState::Queued,
            requested_by,
            created_at_ms: now,
            deadline_ms: now.saturating_add(timeout.as_millis() as u64),
            dispatched_at_ms: None,
            finished_at_ms: None,
            output: Vec::new(),
            truncated: false,
            error: None,
            duration_ms: None,
        };
        if let Some(error) = rejection {
            record.state = InvocationState::Rejected;
            record.finished_at_ms = Some(now);
            record.error = Some(error);
            self.count(record.state, &record.capability);
        } else {
            lock(&self.active).insert(id, record.clone());
            self.count(record.state, &record.capability);
        }
        self.writer.put(Space::Invocations, &id, &record).await;
        self.publish_invocation(anchor, &record);
        // Dispatch while the record is being committed: the writer is ordered, so every later
        // state of this invocation lands after it, and the caller still learns the id only
        // once it is on disk.
        if record.state == InvocationState::Queued {
            self.dispatch_queued(anchor, &device);
        }
        self.writer.barrier().await?;
        Ok(record)
    }

    /// The current record of an invocation (memory for unfinished ones, else the store).
    pub(crate) fn invocation(
        &self,
        store: &Store,
        id: &[u8; 16],
    ) -> Result<Option<InvocationRecord>, StoreError> {
        if let Some(r) = lock(&self.active).get(id) {
            return Ok(Some(r.clone()));
        }
        store.get(Space::Invocations, id)
    }

    /// Waits until the invocation ends or `limit` passes.
    pub(crate) async fn wait_final(
        &self,
        anchor: &Anchor,
        id: [u8; 16],
        limit: Duration,
    ) -> Result<Option<InvocationRecord>, StoreError> {
        let notify = lock(&self.waiters).entry(id).or_default().clone();
        let deadline = tokio::time::Instant::now() + limit;
        let result = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !lock(&self.active).contains_key(&id) {
                break self.invocation(&anchor.shared.store, &id);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break self.invocation(&anchor.shared.store, &id);
            }
        };
        lock(&self.waiters).remove(&id);
        result
    }

    /// Dispatches every queued invocation of `device` if it is connected.
    fn dispatch_queued(&self, anchor: &Anchor, device: &DeviceId) {
        let connected = lock(&self.nodes)
            .get(device)
            .is_some_and(|s| s.live.is_some());
        if !connected {
            return;
        }
        let ids: Vec<[u8; 16]> = lock(&self.active)
            .values()
            .filter(|r| r.device_id == *device && r.state == InvocationState::Queued)
            .map(|r| r.id)
            .collect();
        for id in ids {
            let a = anchor.clone();
            tokio::spawn(async move { dispatch(a, id).await });
        }
    }

    /// Claims a queued invocation for dispatch: only if still queued, not past its deadline,
    /// and the node is connected.
    fn claim(
        &self,
        anchor: &Anchor,
        id: &[u8; 16],
    ) -> Option<(InvocationRecord, quinn::Connection)> {
        let now = anchor.now_ms();
        let mut active = lock(&self.active);
        let rec = active.get_mut(id)?;
        if rec.state != InvocationState::Queued || now >= rec.deadline_ms {
            return None;
        }
        let conn = lock(&self.nodes)
            .get(&rec.device_id)
            .and_then(|s| s.live.as_ref().map(|l| l.conn.clone()))?;
        rec.state = InvocationState::Dispatched;
        rec.dispatched_at_ms = Some(now);
        Some((rec.clone(), conn))
    }

    /// Puts a dispatched invocation back in the queue (its stream broke).
    async fn requeue(&self, anchor: &Anchor, id: &[u8; 16]) {
        let rec = {
            let mut active = lock(&self.active);
            let Some(rec) = active.get_mut(id) else {
                return;
            };
            if rec.state.is_final() {
                return; // ending; see `finish`
            }
            rec.state = InvocationState::Queued;
            rec.clone()
        };
        self.writer.put(Space::Invocations, id, &rec).await;
        self.publish_invocation(anchor, &rec);
    }

    /// Ends an invocation.
    async fn finish(&self, anchor: &Anchor, id: &[u8; 16], end: Ending) {
        let Ending {
            state,
            output,
            truncated,
            error,
            duration_ms,
        } = end;
        let now = anchor.now_ms();
        // The final record stays in memory until it is on disk: readers (`invocation`,
        // `wait_final`) fall back to the store once it leaves `active`, and would otherwise
        // read the older record there in between.
        let rec = {
            let mut active = lock(&self.active);
            let Some(rec) = active.get_mut(id) else {
                return;
            };
            if rec.state.is_final() {
                return; // already ending
            }
            rec.state = state;
            rec.finished_at_ms = Some(now);
            let limit = anchor.shared.config.invocation_output_limit as usize;
            rec.truncated = truncated || output.len() > limit;
            rec.output = output;
            rec.output.truncate(limit);
            rec.error = error;
            rec.duration_ms = duration_ms;
            rec.clone()
        };
        self.count(state, &rec.capability);
        if state == InvocationState::Succeeded || state == InvocationState::Failed {
            lock(&self.latency).observe(now.saturating_sub(rec.created_at_ms) as f64 / 1000.0);
        }
        self.writer.put(Space::Invocations, id, &rec).await;
        let _ = self.writer.barrier().await;
        lock(&self.active).remove(id);
        self.publish_invocation(anchor, &rec);
        if let Some(n) = lock(&self.waiters).get(id) {
            n.notify_waiters();
        }
    }

    fn count(&self, state: InvocationState, capability: &str) {
        *lock(&self.invocation_counts)
            .entry((state_name(state), capability.to_string()))
            .or_default() += 1;
    }

    fn publish_invocation(&self, anchor: &Anchor, rec: &InvocationRecord) {
        anchor.publish(
            "invocation",
            Some(&rec.device_id),
            serde_json::json!({
                "invocation_id": InvocationId(rec.id).to_string(),
                "capability": rec.capability,
                "state": state_name(rec.state),
            }),
        );
    }

    /// Queued invocations whose deadline passed become `timed_out`.
    async fn sweep_deadlines(&self, anchor: &Anchor) {
        let now = anchor.now_ms();
        let expired: Vec<[u8; 16]> = lock(&self.active)
            .values()
            .filter(|r| r.state == InvocationState::Queued && now >= r.deadline_ms)
            .map(|r| r.id)
            .collect();
        for id in expired {
            self.finish(
                anchor,
                &id,
                Ending::because(
                    InvocationState::TimedOut,
                    "the deadline passed before the node could take it",
                ),
            )
            .await;
        }
    }

    /// Deletes finished invocations older than the retention or beyond the count limit.
    fn prune(&self, anchor: &Anchor) -> Result<usize, StoreError> {
        let store = &anchor.shared.store;
        let config = &anchor.shared.config;
        let now = anchor.now_ms();
        let retention = config.invocation_retention.as_millis() as u64;
        let all: Vec<(Vec<u8>, InvocationRecord)> = store.scan(Space::Invocations)?;
        let finished: Vec<&(Vec<u8>, InvocationRecord)> =
            all.iter().filter(|(_, r)| r.state.is_final()).collect();
        let over = finished.len().saturating_sub(config.invocation_max_records);
        let mut batch = store.batch();
        let mut n = 0;
        // Keys sort by creation time: the first `over` are the oldest.
        for (i, (key, rec)) in finished.iter().enumerate() {
            let old = rec.finished_at_ms.unwrap_or(rec.created_at_ms) + retention < now;
            if i < over || old {
                batch.remove(Space::Invocations, key);
                n += 1;
            }
        }
        batch.commit(crate::store::Durability::Flush)?;
        Ok(n)
    }
}

/// How an invocation ended.
struct Ending {
    state: InvocationState,
    output: Vec<u8>,
    truncated: bool,
    error: Option<String>,
    duration_ms: Option<u64>,
}

impl Ending {
    /// Ended without output, for a reason.
    fn because(state: InvocationState, error: &str) -> Ending {
        Ending {
            state,
            output: Vec::new(),
            truncated: false,
            error: Some(error.to_string()),
            duration_ms: None,
        }
    }
}

/// The stable name of an invocation state.
pub fn state_name(s: InvocationState) -> &'static str {
    match s {
        InvocationState::Queued => "queued",
        InvocationState::Dispatched => "dispatched",
        InvocationState::Succeeded => "succeeded",
        InvocationState::Failed => "failed",
        InvocationState::TimedOut => "timed_out",
        InvocationState::Rejected => "rejected",
    }
}

/// Runs one invocation on its own stream until it ends, is re-queued, or the deadline passes.
async fn dispatch(anchor: Anchor, id: [u8; 16]) {
    let rt = &anchor.shared.runtime;
    loop {
        let Some((rec, conn)) = rt.claim(&anchor, &id) else {
            return;
        };
        rt.writer.put(Space::Invocations, &id, &rec).await;
        rt.publish_invocation(&anchor, &rec);
        let now = anchor.now_ms();
        let remaining = rec.deadline_ms.saturating_sub(now);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(remaining);
        let outcome =
            tokio::time::timeout_at(deadline, run_on_stream(&anchor, &conn, &rec, remaining)).await;
        match outcome {
            Err(_) => {
                rt.finish(
                    &anchor,
                    &id,
                    Ending::because(
                        InvocationState::TimedOut,
                        "the deadline passed before the node answered",
                    ),
                )
                .await;
                return;
            }
            Ok(Err(reason)) => {
                debug!(invocation = %InvocationId(id), %reason, "invocation stream broke; re-queued");
                rt.requeue(&anchor, &id).await;
                // Dispatched again when the node registers (or now, if it still is).
                if conn.close_reason().is_some() {
                    return;
                }
                tokio::time::sleep(REDISPATCH_DELAY).await;
            }
            Ok(Ok(result)) => {
                let state = match result.outcome {
                    Outcome::Succeeded => InvocationState::Succeeded,
                    Outcome::Failed => InvocationState::Failed,
                    Outcome::TimedOut | Outcome::Expired => InvocationState::TimedOut,
                    Outcome::Rejected => InvocationState::Rejected,
                    Outcome::Duplicate | Outcome::Busy => {
                        rt.requeue(&anchor, &id).await;
                        tokio::time::sleep(REDISPATCH_DELAY).await;
                        continue;
                    }
                    _ => InvocationState::Failed,
                };
                rt.finish(
                    &anchor,
                    &id,
                    Ending {
                        state,
                        output: result.output,
                        truncated: result.truncated,
                        error: result.error,
                        duration_ms: Some(u64::from(result.duration_ms)),
                    },
                )
                .await;
                return;
            }
        }
    }
}

async fn run_on_stream(
    anchor: &Anchor,
    conn: &quinn::Connection,
    rec: &InvocationRecord,
    remaining_ms: u64,
) -> Result<anchorage_wire::invoke::InvokeResult, String> {
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = framed::<InvokeRequest, InvokeReply>(send, recv);
    tx.send(&InvokeRequest {
        version: PROTOCOL_VERSION,
        id: InvocationId(rec.id),
        capability: rec.capability.clone(),
        input: rec.input.clone(),
        remaining_ms: u32::try_from(remaining_ms).unwrap_or(u32::MAX),
        output_limit: anchor.shared.config.invocation_output_limit,
    })
    .await
    .map_err(|e| e.to_string())?;
    tx.finish().map_err(|e| e.to_string())?;
    loop {
        match rx.recv().await {
            Ok(Some(InvokeReply::Progress(_))) => continue,
            Ok(Some(InvokeReply::Result(r))) => return Ok(r),
            Ok(None) => return Err("stream ended without a result".into()),
            Err(e) => {
                if e.is_peer_fault() {
                    warn!(error = %e, "bad invocation reply");
                }
                return Err(e.to_string());
            }
        }
    }
}

/// Background housekeeping: presence, deadlines, last-seen flushes, pruning, server
/// certificate renewal.
pub(crate) async fn background(anchor: Anchor) {
    let rt = &anchor.shared.runtime;
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = tokio::time::Instant::now();
    let mut last_prune = tokio::time::Instant::now();
    // Work left over from before a restart.
    let devices: Vec<DeviceId> = lock(&rt.active).values().map(|r| r.device_id).collect();
    for d in devices {
        rt.dispatch_queued(&anchor, &d);
    }
    loop {
        tick.tick().await;
        rt.update_all_presence(&anchor);
        rt.sweep_deadlines(&anchor).await;
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            last_flush = tokio::time::Instant::now();
            rt.flush_presence().await;
        }
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = tokio::time::Instant::now();
            let a = anchor.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = a.shared.runtime.prune(&a) {
                    warn!(error = %e, "pruning invocations failed");
                }
            })
            .await;
        }
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
                    warn!(error = %e, "server certificate renewal failed");
                }
            }
            Err(e) => warn!(error = %e, "server certificate renewal failed"),
        }
    }
}

/// Parses a user-given invocation timeout, clamped to the allowed range.
pub fn invoke_timeout(ms: Option<u64>) -> Duration {
    ms.map_or(DEFAULT_INVOKE_TIMEOUT, Duration::from_millis)
        .clamp(Duration::from_millis(1), MAX_INVOKE_TIMEOUT)
}
