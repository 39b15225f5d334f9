//! The mesh service: the anchor as rendezvous and relay of the peer mesh, and the one owner
//! of what it knows about it.
//!
//! [`Mesh`] holds, per connected node, what the node reported on its control stream (its
//! candidate addresses, the services it exposes, its latest path report), its relay queue,
//! and its rate limits; and, for the whole mesh, the roster of approved devices with their
//! labels that the directories are computed from. All of it is forgotten when the node's
//! session ends. The pure rules (buckets, directories, links) are in [`rules`]; the relay
//! stream's driver is in [`relay`].
//!
//! A session learns that its node's directory may have changed from a generation watch
//! ([`Mesh::generation`]) that [`follow`] bumps when the policy feed, a device, its labels
//! or the revocation set change, and that the mesh bumps itself when a node's services
//! change. The session then computes its node's directory and sends it only if it differs
//! from the last one sent.
//!
//! Rendezvous and relay serve nodes connected to this anchor. A peer whose session another
//! anchor of the cluster holds is answered `Unreachable` (cross-anchor rendezvous and relay
//! are not done).

pub mod rules;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anchorage_mesh::DeviceId;
use anchorage_wire::control::ControlDown;
use anchorage_wire::peer::{
    MAX_CANDIDATES, MAX_SERVICES, PeerEntry, PeerPath, Punch, RelayPacket, Unreachable,
    valid_service_name,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use ring::rand::SecureRandom;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::clock::Clock;
use crate::config::RelayLimits;
pub use crate::config::{DEFAULT_RELAY_NODE_BYTES_PER_SEC, DEFAULT_RELAY_TOTAL_BYTES_PER_SEC};
use crate::metrics::Metrics;
use crate::nodes::SessionId;
use crate::policy::PolicyVersion;

pub use rules::{Link, Member};

/// Messages for one node's control stream queued by the mesh (punches, and what other parts
/// of the anchor [`Mesh::tell`] it) before more are dropped. They are boxed: the channel
/// allocates a block of 32 slots for every node at once, and a slot of a whole `ControlDown`
/// made that 2 KiB per connected node.
pub const DOWN_BUFFER: usize = 32;
/// Relay packets queued for one node's relay stream before more are dropped.
pub const RELAY_QUEUE: usize = 256;
/// Rendezvous requests one node may make in a burst.
pub const RENDEZVOUS_BURST: u64 = 16;
/// Rendezvous requests one node may make a second, after its burst.
pub const RENDEZVOUS_PER_SEC: u64 = 4;

/// Why a relay packet was dropped (the `reason` label of `anchorage_relay_dropped`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Over the node's or the anchor's bandwidth bound.
    Rate,
    /// The policy does not relate the two nodes.
    Policy,
    /// The destination has no relay stream on this anchor.
    NoPeer,
    /// The destination's queue is full.
    QueueFull,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::Rate => "rate",
            Dropped::Policy => "policy",
            Dropped::NoPeer => "no_peer",
            Dropped::QueueFull => "queue_full",
        }
    }
}

/// What the mesh hands a session when it joins.
#[derive(Debug)]
pub struct Joined {
    /// Messages for the node's control stream (the other side's punches).
    pub down: mpsc::Receiver<Box<ControlDown>>,
    /// Bumped whenever the node's directory may have changed; marked changed at first.
    pub generation: watch::Receiver<u64>,
}

/// The mesh service.
#[derive(Debug)]
pub struct Mesh {
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    /// Asks [`follow`] to read the roster again.
    refresh: tokio::sync::Notify,
    clock: Clock,
    limits: RelayLimits,
    metrics: MeshMetrics,
    rng: ring::rand::SystemRandom,
}

#[derive(Debug, Default)]
struct State {
    /// Boxed, as in the node table: a growing map's empty slots hold a pointer each, not a
    /// 200-byte node.
    nodes: HashMap<DeviceId, Box<Node>>,
    roster: Arc<BTreeMap<DeviceId, Member>>,
    /// Whether the roster was read for the policy in force (skipped while it is empty).
    roster_fresh: bool,
    /// Relations by ordered pair, computed at first use since the last roster or policy
    /// change.
    related: HashMap<(DeviceId, DeviceId), bool>,
    related_version: u64,
    total: Option<rules::Bucket>,
}

#[derive(Debug)]
struct Node {
    session: SessionId,
    name: String,
    conn: quinn::Connection,
    down: mpsc::Sender<Box<ControlDown>>,
    candidates: Vec<String>,
    services: Vec<String>,
    paths: Vec<PeerPath>,
    relay: Option<mpsc::Sender<RelayPacket>>,
    relay_bucket: rules::Bucket,
    rendezvous: rules::Bucket,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Debug, Default)]
struct MeshMetrics {
    relayed_bytes: Counter,
    relayed_packets: Counter,
    dropped: Family<Reason, Counter>,
    rendezvous: Family<Outcome, Counter>,
}

impl MeshMetrics {
    fn register(metrics: &Metrics) -> MeshMetrics {
        let m = MeshMetrics::default();
        metrics.register(
            "anchorage_relay_bytes",
            "Bytes of peer packets the anchor relayed (forwarded to the destination's queue).",
            m.relayed_bytes.clone(),
        );
        metrics.register(
            "anchorage_relay_packets",
            "Peer packets the anchor relayed.",
            m.relayed_packets.clone(),
        );
        metrics.register(
            "anchorage_relay_dropped",
            "Relay packets dropped: rate (over a bandwidth bound), policy (the nodes are not related), no_peer (no relay stream), queue_full.",
            m.dropped.clone(),
        );
        metrics.register(
            "anchorage_rendezvous",
            "Rendezvous requests by outcome: punched, not_allowed, not_connected, elsewhere, unknown, rate_limited.",
            m.rendezvous.clone(),
        );
        m
    }

    fn rendezvous(&self, outcome: &'static str) {
        self.rendezvous.get_or_create(&Outcome { outcome }).inc();
    }
}

impl Mesh {
    /// Resolves when a session asked for the roster to be read again.
    pub async fn refreshed(&self) {
        self.refresh.notified().await;
    }

    /// The service with `limits`, its counters registered in `metrics`.
    pub fn new(limits: RelayLimits, clock: Clock, metrics: &Metrics) -> Mesh {
        Mesh {
            state: Mutex::new(State::default()),
            generation: watch::Sender::new(0),
            refresh: tokio::sync::Notify::new(),
            clock,
            limits,
            metrics: MeshMetrics::register(metrics),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every session its node's directory may have changed.
    pub fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A node's session registered: it replaces any older session of the device.
    pub fn join(
        &self,
        device: DeviceId,
        session: SessionId,
        name: &str,
        conn: quinn::Connection,
    ) -> Joined {
        let (down_tx, down) = mpsc::channel(DOWN_BUFFER);
        let now = self.clock.now_ms();
        let node = Node {
            session,
            name: name.to_string(),
            conn,
            down: down_tx,
            candidates: Vec::new(),
            services: Vec::new(),
            paths: Vec::new(),
            relay: None,
            relay_bucket: rules::Bucket::new(
                self.limits.node_bytes_per_sec,
                self.limits.node_bytes_per_sec,
                now,
            ),
            rendezvous: rules::Bucket::new(RENDEZVOUS_PER_SEC, RENDEZVOUS_BURST, now),
        };
        let (had_services, known) = {
            let mut s = self.lock();
            let old = s.nodes.insert(device, Box::new(node));
            (
                old.is_some_and(|o| !o.services.is_empty()),
                s.roster.contains_key(&device),
            )
        };
        if !known {
            // A device paired since the roster was read.
            self.refresh.notify_one();
        }
        if had_services {
            self.bump();
        }
        let mut generation = self.generation.subscribe();
        generation.mark_changed();
        Joined { down, generation }
    }

    /// A node's session ended: everything it reported is forgotten.
    pub fn leave(&self, device: &DeviceId, session: SessionId) {
        let had_services = {
            let mut s = self.lock();
            match s.nodes.get(device) {
                Some(n) if n.session == session => s
                    .nodes
                    .remove(device)
                    .is_some_and(|n| !n.services.is_empty()),
                _ => false,
            }
        };
        if had_services {
            self.bump();
        }
    }

    /// Queues `message` for the control stream of `device`'s session, if it is connected here;
    /// false when it is not, or its queue is full (the message is dropped).
    pub fn tell(&self, device: &DeviceId, message: ControlDown) -> bool {
        let s = self.lock();
        s.nodes
            .get(device)
            .is_some_and(|n| n.down.try_send(Box::new(message)).is_ok())
    }

    /// Bumped whenever directories may have changed.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Takes a node's candidates: those that do not parse as `IP:PORT` are dropped.
    /// Returns how many were kept.
    pub fn set_candidates(&self, device: &DeviceId, session: SessionId, addrs: &[String]) -> usize {
        let kept: Vec<String> = addrs
            .iter()
            .filter_map(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.to_string())
            .take(MAX_CANDIDATES)
            .collect();
        let n = kept.len();
        if let Some(node) = self.lock().nodes.get_mut(device)
            && node.session == session
        {
            node.candidates = kept;
        }
        n
    }

    /// Takes a node's services: invalid names are dropped, the rest sorted and deduplicated.
    /// Peers' directories change if the list did.
    pub fn set_services(&self, device: &DeviceId, session: SessionId, names: &[String]) {
        let mut kept: Vec<String> = names
            .iter()
            .filter(|n| valid_service_name(n))
            .take(MAX_SERVICES)
            .cloned()
            .collect();
        kept.sort_unstable();
        kept.dedup();
        let changed = match self.lock().nodes.get_mut(device) {
            Some(node) if node.session == session && node.services != kept => {
                node.services = kept;
                true
            }
            _ => false,
        };
        if changed {
            self.bump();
        }
    }

    /// Takes a node's latest path report (bounded by the protocol's [`PathReport`] limit).
    ///
    /// [`PathReport`]: anchorage_wire::peer::PathReport
    pub fn set_paths(&self, device: &DeviceId, session: SessionId, paths: Vec<PeerPath>) {
        if let Some(node) = self.lock().nodes.get_mut(device)
            && node.session == session
        {
            node.paths = paths;
        }
    }

    /// The directory of `device` now, under `policy`.
    pub fn directory(&self, policy: &crate::policy::Policy, device: &DeviceId) -> Vec<PeerEntry> {
        if policy.is_empty() {
            return Vec::new();
        }
        let s = self.lock();
        let services = |id: &DeviceId| {
            s.nodes
                .get(id)
                .map(|n| n.services.clone())
                .unwrap_or_default()
        };
        rules::directory(policy, &s.roster, services, device)
    }

    /// Whether the policy in force relates `a` and `b` (cached until the roster or the
    /// policy changes).
    fn related(
        &self,
        s: &mut State,
        policy: &crate::policy::PolicyVersion,
        a: &DeviceId,
        b: &DeviceId,
    ) -> bool {
        if policy.policy.is_empty() {
            return false;
        }
        if s.related_version != policy.version {
            s.related.clear();
            s.related_version = policy.version;
        }
        let key = if a < b { (*a, *b) } else { (*b, *a) };
        if let Some(r) = s.related.get(&key) {
            return *r;
        }
        let r = match (s.roster.get(a), s.roster.get(b)) {
            (Some(x), Some(y)) => rules::related(&policy.policy, &x.labels, &y.labels),
            _ => false,
        };
        // Bounded: at most one entry per pair of approved devices that talk.
        s.related.insert(key, r);
        r
    }

    /// Serves `from`'s rendezvous request for `peer`: the punch for `from` (the mirror one
    /// is queued for `peer` at the same time), or why not.
    pub fn rendezvous(
        &self,
        policy: &PolicyVersion,
        held_elsewhere: impl FnOnce(&DeviceId) -> bool,
        from: &DeviceId,
        session: SessionId,
        peer: &DeviceId,
    ) -> ControlDown {
        let unreachable = |outcome: &'static str, reason: String| {
            self.metrics.rendezvous(outcome);
            ControlDown::Unreachable(Unreachable {
                peer: *peer,
                reason,
            })
        };
        let now = self.clock.now_ms();
        let mut token = [0u8; 16];
        if self.rng.fill(&mut token).is_err() {
            warn!("the system random generator failed");
            return unreachable("error", "the anchor cannot make a token now".into());
        }
        let mut s = self.lock();
        let Some(me) = s.nodes.get_mut(from).filter(|n| n.session == session) else {
            return unreachable("not_connected", "this session is not registered".into());
        };
        if !me.rendezvous.take(1, now) {
            return unreachable(
                "rate_limited",
                format!(
                    "too many requests: at most {RENDEZVOUS_PER_SEC} rendezvous a second \
                     (bursts of {RENDEZVOUS_BURST})"
                ),
            );
        }
        if peer == from {
            return unreachable("unknown", "that is this device itself".into());
        }
        if policy.policy.is_empty() {
            return unreachable(
                "not_allowed",
                "not allowed by policy: the policy in force allows no peer connections".into(),
            );
        }
        if !s.roster.contains_key(peer) {
            return unreachable(
                "unknown",
                format!("unknown device {peer} (not paired, revoked or removed)"),
            );
        }
        if !self.related(&mut s, policy, from, peer) {
            return unreachable(
                "not_allowed",
                format!("not allowed by policy: no rule relates this device and {peer}"),
            );
        }
        let Some(other) = s.nodes.get(peer) else {
            drop(s);
            return if held_elsewhere(peer) {
                unreachable(
                    "elsewhere",
                    format!(
                        "{peer} is connected to another anchor of the cluster; rendezvous \
                         across anchors is not supported, so connect both to one anchor"
                    ),
                )
            } else {
                unreachable("not_connected", format!("{peer} is not connected"))
            };
        };
        let addrs_of = |n: &Node| {
            let observed = n.conn.remote_address().to_string();
            let mut addrs = vec![observed.clone()];
            addrs.extend(n.candidates.iter().filter(|c| **c != observed).cloned());
            addrs.truncate(MAX_CANDIDATES);
            addrs
        };
        let to_peer = ControlDown::Punch(Punch {
            peer: *from,
            addrs: addrs_of(&s.nodes[from]),
            token,
        });
        let to_me = ControlDown::Punch(Punch {
            peer: *peer,
            addrs: addrs_of(other),
            token,
        });
        if other.down.try_send(Box::new(to_peer)).is_err() {
            return unreachable("not_connected", format!("{peer} is not answering now"));
        }
        self.metrics.rendezvous("punched");
        to_me
    }

    /// Installs `device`'s relay queue; `false` if its session is not this one.
    pub fn relay_up(
        &self,
        device: &DeviceId,
        session: SessionId,
        queue: mpsc::Sender<RelayPacket>,
    ) -> bool {
        match self.lock().nodes.get_mut(device) {
            Some(n) if n.session == session => {
                n.relay = Some(queue);
                true
            }
            _ => false,
        }
    }

    /// Forwards a packet from `from` to `packet.peer`, or drops it and says why.
    pub fn relay(
        &self,
        policy: &PolicyVersion,
        from: &DeviceId,
        session: SessionId,
        packet: RelayPacket,
    ) -> Result<(), Dropped> {
        let result = self.forward(policy, from, session, packet);
        if let Err(why) = result {
            self.metrics
                .dropped
                .get_or_create(&Reason {
                    reason: why.as_str(),
                })
                .inc();
        }
        result
    }

    fn forward(
        &self,
        policy: &PolicyVersion,
        from: &DeviceId,
        session: SessionId,
        packet: RelayPacket,
    ) -> Result<(), Dropped> {
        let now = self.clock.now_ms();
        let len = u64::try_from(packet.packet.len()).unwrap_or(u64::MAX);
        let to = packet.peer;
        let mut s = self.lock();
        if !self.related(&mut s, policy, from, &to) {
            return Err(Dropped::Policy);
        }
        let queue = match s.nodes.get(&to).and_then(|n| n.relay.clone()) {
            Some(q) => q,
            None => return Err(Dropped::NoPeer),
        };
        let total_rate = self.limits.total_bytes_per_sec;
        let s = &mut *s;
        let total = s
            .total
            .get_or_insert_with(|| rules::Bucket::new(total_rate, total_rate, now));
        let Some(me) = s.nodes.get_mut(from).filter(|n| n.session == session) else {
            return Err(Dropped::NoPeer);
        };
        if !me.relay_bucket.take(len, now) {
            return Err(Dropped::Rate);
        }
        if !total.take(len, now) {
            me.relay_bucket.give_back(len);
            return Err(Dropped::Rate);
        }
        let forwarded = RelayPacket {
            peer: *from,
            packet: packet.packet,
        };
        if queue.try_send(forwarded).is_err() {
            return Err(Dropped::QueueFull);
        }
        self.metrics.relayed_bytes.inc_by(len);
        self.metrics.relayed_packets.inc();
        Ok(())
    }

    /// The operators' view: one entry per pair some connected node reports a path for.
    pub fn links(&self) -> Vec<(Link, String, String)> {
        let s = self.lock();
        let reports: Vec<(&DeviceId, &[PeerPath])> = s
            .nodes
            .iter()
            .map(|(id, n)| (id, n.paths.as_slice()))
            .collect();
        let name = |id: &DeviceId| {
            s.nodes
                .get(id)
                .map(|n| n.name.clone())
                .or_else(|| s.roster.get(id).map(|m| m.name.clone()))
                .unwrap_or_default()
        };
        rules::links(reports)
            .into_iter()
            .map(|l| {
                let (a, b) = (name(&l.a), name(&l.b));
                (l, a, b)
            })
            .collect()
    }

    /// [`links`](Mesh::links) in the console's form; with `of`, only the links of that
    /// device.
    pub fn console_links(&self, of: Option<&DeviceId>) -> Vec<anchorage_console::api::MeshLink> {
        self.links()
            .into_iter()
            .filter(|(l, _, _)| of.is_none_or(|d| l.a == *d || l.b == *d))
            .map(|(l, a_name, b_name)| anchorage_console::api::MeshLink {
                a: l.a,
                a_name,
                b: l.b,
                b_name,
                path: l.path.as_str().to_string(),
                addr: l.addr,
                rtt_ms: l.rtt_us.map(|us| f64::from(us) / 1000.0),
                since: crate::clock::to_odt(l.since_ms),
            })
            .collect()
    }

    /// Puts a new roster in force (`None`: not read, as while the policy is empty).
    pub fn set_roster(&self, roster: Option<BTreeMap<DeviceId, Member>>) {
        let mut s = self.lock();
        match roster {
            Some(r) => {
                s.roster = Arc::new(r);
                s.roster_fresh = true;
            }
            None => s.roster_fresh = false,
        }
        s.related.clear();
    }
}
