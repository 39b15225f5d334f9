//! The mesh socket's rules, without IO: which made-up address stands for which peer, what is
//! known of each peer's real addresses, which probes are due, what a received probe proves and
//! which path carries a peer's packets now.
//!
//! Every method takes `now` and nothing here reads a clock, spawns a task or touches a socket;
//! [`MeshSocket`](super::MeshSocket) feeds it packets and the clock and sends what it returns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anchorage_wire::DeviceId;
use anchorage_wire::peer::{MAX_CANDIDATES, PathKind, Ping, Pong, Probe};

/// When the pings of a punch go out, counted from its start: a quick burst, so that both
/// sides' packets cross while the anchor's simultaneous [`Punch`](anchorage_wire::peer::Punch)
/// is fresh on both.
pub const PUNCH_BURST: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(700),
];
/// Between punch rounds after the burst, while there is no direct path.
pub const PUNCH_INTERVAL: Duration = Duration::from_secs(1);
/// The longest gap between punch rounds while the peer is reached through the relay: the
/// mesh keeps looking for a direct path in the background for as long as it knows the peer.
pub const MAX_PUNCH_INTERVAL: Duration = Duration::from_secs(5);
/// Between pings on a direct path: keeps both NAT mappings open (home routers forget a UDP
/// flow after 30 s) and notices a dead path.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A direct path without a pong for this long is dead: packets fall back to the relay.
pub const PATH_TIMEOUT: Duration = Duration::from_secs(5);
/// Most peers the socket keeps; beyond it the one unused longest is forgotten.
pub const MAX_PEERS: usize = 4096;
/// Most pings per peer waiting for their pong; the oldest is given up first.
pub const MAX_OUTSTANDING: usize = 4 * MAX_CANDIDATES;
/// The port of every made-up address.
pub const MESH_PORT: u16 = 1;
/// A ping that arrives from an address not yet proven is answered with a ping of our own at
/// most this often per address: that is what opens our side for a peer-reflexive address.
const REPING_INTERVAL: Duration = Duration::from_millis(100);
/// Another live address replaces the chosen one only when its round-trip time is below this
/// fraction (in percent) of the chosen one's, so that jitter does not make the path flap.
const SWITCH_PERCENT: u32 = 66;
/// The first made-up address is 240.0.0.1; the last one 255.255.255.254 (never the broadcast
/// address). After that the counter starts again from the first, which would take 268 million
/// peers.
const MESH_FIRST: u32 = 0xF000_0001;
const MESH_LAST: u32 = 0xFFFF_FFFE;

/// Whether `addr` is a made-up mesh address (in 240.0.0.0/4, also as IPv4-mapped IPv6).
pub fn is_mesh_addr(addr: SocketAddr) -> bool {
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => v4.octets()[0] >= 240,
        IpAddr::V6(_) => false,
    }
}

/// `addr` with an IPv4-mapped IPv6 address turned into the IPv4 one.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A probe to send to a real address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where to, as stored (canonical).
    pub dest: SocketAddr,
    /// What.
    pub probe: Probe,
}

/// Where a packet quinn sends to a made-up address goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight to this real address.
    Direct(SocketAddr),
    /// Through the relay, to this peer.
    Relay(DeviceId),
    /// A made-up address nobody has (any more): the packet is dropped.
    Unknown,
}

/// What a received probe was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// From a stranger, with a wrong token, unasked for, or from ourselves: nothing changes.
    Ignored,
    /// Valid: send these (the pong to a ping, and maybe a ping of our own).
    Accepted(Vec<Outgoing>),
}

/// The path to one peer, as [`Paths::path`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathState {
    /// Direct, relayed or none.
    pub kind: PathKind,
    /// The peer's real address on a direct path.
    pub addr: Option<SocketAddr>,
    /// Smoothed round-trip time of the probes on the direct path.
    pub rtt: Option<Duration>,
    /// Since when `kind` and `addr` have been what they are.
    pub since: Instant,
}

/// Everything the socket knows of its peers.
#[derive(Debug)]
pub struct Paths {
    me: DeviceId,
    /// A BTreeMap, so that probes go out in the same order on every run of a seed.
    peers: BTreeMap<DeviceId, Peer>,
    by_mesh_addr: HashMap<SocketAddr, DeviceId>,
    /// Which peer a datagram from a real address is from: the last one a probe proved the
    /// address for, or else the first that had it as a candidate.
    by_real_addr: HashMap<SocketAddr, DeviceId>,
    next_mesh: u32,
    next_tx: u64,
    relay: bool,
    generation: u64,
    /// When `relay` last changed: the `since` of peers without a direct path.
    relay_since: Instant,
}

#[derive(Debug)]
struct Peer {
    mesh_addr: SocketAddr,
    /// `None` until the anchor introduced us (no probing without a token).
    token: Option<[u8; 16]>,
    candidates: Vec<Candidate>,
    /// The chosen direct address; always one of `candidates`, alive.
    best: Option<SocketAddr>,
    outstanding: VecDeque<Outstanding>,
    punch: Option<Punch>,
    next_heartbeat: Option<Instant>,
    since: Instant,
    /// Last use through the API or by a valid probe: decides which peer goes when full.
    touched: Instant,
}

#[derive(Debug, Clone)]
struct Candidate {
    addr: SocketAddr,
    /// Learned from the source of a valid ping rather than told by the anchor.
    reflexive: bool,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
    last_ping: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    tx: [u8; 12],
    addr: SocketAddr,
    sent: Instant,
}

/// Rounds of pings to every candidate.
#[derive(Debug, Clone, Copy)]
struct Punch {
    started: Instant,
    round: usize,
    next: Instant,
}

impl Paths {
    /// No peers yet; `me` goes into every probe.
    pub fn new(me: DeviceId, now: Instant) -> Self {
        Self {
            me,
            peers: BTreeMap::new(),
            by_mesh_addr: HashMap::new(),
            by_real_addr: HashMap::new(),
            next_mesh: MESH_FIRST,
            next_tx: 0,
            relay: false,
            generation: 0,
            relay_since: now,
        }
    }

    /// Bumped whenever a peer's path changes kind or address.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The made-up address of `peer`, allocated on first use.
    pub fn peer_addr(&mut self, now: Instant, peer: DeviceId) -> SocketAddr {
        self.peer_mut(now, peer).mesh_addr
    }

    /// Which peer a made-up address stands for.
    pub fn peer_of(&self, addr: SocketAddr) -> Option<DeviceId> {
        self.by_mesh_addr.get(&canonical(addr)).copied()
    }

    /// Where a packet to the made-up address `dest` goes.
    pub fn route(&self, dest: SocketAddr) -> Route {
        let Some(id) = self.peer_of(dest) else {
            return Route::Unknown;
        };
        match self.peers.get(&id).and_then(|p| p.best) {
            Some(addr) => Route::Direct(addr),
            None => Route::Relay(id),
        }
    }

    /// The made-up address to report as the source of a datagram from the real address
    /// `src`, if it is a known address of a peer.
    pub fn mesh_source(&self, src: SocketAddr) -> Option<SocketAddr> {
        let id = self.by_real_addr.get(&canonical(src))?;
        self.peers.get(id).map(|p| p.mesh_addr)
    }

    /// The anchor introduced us to `peer` (or we remembered it): merge its addresses, take
    /// its token and start punching now.
    pub fn set_candidates(
        &mut self,
        now: Instant,
        peer: DeviceId,
        addrs: &[SocketAddr],
        token: [u8; 16],
    ) {
        let entry = self.peer_mut(now, peer);
        if entry.token != Some(token) {
            entry.outstanding.clear();
        }
        entry.token = Some(token);
        let old = std::mem::take(&mut entry.candidates);
        let mut merged: Vec<Candidate> = Vec::with_capacity(MAX_CANDIDATES);
        let mut push = |c: Candidate| {
            if merged.len() < MAX_CANDIDATES && merged.iter().all(|m| m.addr != c.addr) {
                merged.push(c);
            }
        };
        // The path in use first, then what the anchor says now, then what we knew before
        // (proven addresses ahead of the rest).
        if let Some(best) = entry.best {
            old.iter()
                .filter(|c| c.addr == best)
                .cloned()
                .for_each(&mut push);
        }
        for addr in addrs.iter().map(|a| canonical(*a)).filter(|a| usable(*a)) {
            let known = old.iter().find(|c| c.addr == addr).cloned();
            push(known.unwrap_or_else(|| Candidate::new(addr, false)));
        }
        old.iter()
            .filter(|c| c.last_pong.is_some())
            .cloned()
            .for_each(&mut push);
        old.iter().cloned().for_each(&mut push);
        entry.candidates = merged;
        entry.punch = Some(Punch::start(now));
        let kept: Vec<SocketAddr> = entry.candidates.iter().map(|c| c.addr).collect();
        for c in old.iter().filter(|c| !kept.contains(&c.addr)) {
            self.unindex(c.addr, peer);
        }
        for addr in kept {
            self.by_real_addr.entry(addr).or_insert(peer);
        }
    }

    /// What is known of `peer`'s addresses and its token, if the anchor introduced it.
    pub fn candidates(&self, peer: DeviceId) -> Option<(Vec<SocketAddr>, [u8; 16])> {
        let p = self.peers.get(&peer)?;
        let token = p.token?;
        Some((p.candidates.iter().map(|c| c.addr).collect(), token))
    }

    /// Whether a relay is there to carry packets without a direct path.
    pub fn set_relay(&mut self, now: Instant, relay: bool) {
        if self.relay == relay {
            return;
        }
        self.relay = relay;
        self.relay_since = now;
        let mut changed = false;
        for p in self.peers.values_mut().filter(|p| p.best.is_none()) {
            p.since = now;
            changed = true;
        }
        if changed {
            self.generation += 1;
        }
    }

    /// Drops everything about `peer`; its made-up address is never given out again.
    pub fn forget(&mut self, peer: DeviceId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        self.by_mesh_addr.remove(&p.mesh_addr);
        for c in &p.candidates {
            self.unindex(c.addr, peer);
        }
        self.generation += 1;
    }

    /// The current path to `peer` (`None` if the socket has never heard of it).
    pub fn path(&self, peer: DeviceId) -> Option<PathState> {
        let p = self.peers.get(&peer)?;
        let best = p
            .best
            .and_then(|b| p.candidates.iter().find(|c| c.addr == b));
        let kind = match (best, self.relay) {
            (Some(_), _) => PathKind::Direct,
            (None, true) => PathKind::Relayed,
            (None, false) => PathKind::None,
        };
        Some(PathState {
            kind,
            addr: best.map(|c| c.addr),
            rtt: best.and_then(|c| c.rtt),
            since: p.since,
        })
    }

    /// Handles a probe that arrived from the real address `src`.
    pub fn handle_probe(&mut self, now: Instant, src: SocketAddr, probe: Probe) -> ProbeOutcome {
        let src = canonical(src);
        match probe {
            Probe::Ping(ping) => self.handle_ping(now, src, ping),
            Probe::Pong(pong) => self.handle_pong(now, src, pong),
        }
    }

    /// Gives up dead paths, appends the probes due at `now` to `out`, and says when to call
    /// again (`None`: nothing is scheduled until the next call that changes a peer).
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Outgoing>) -> Option<Instant> {
        let ids: Vec<DeviceId> = self.peers.keys().copied().collect();
        let mut next: Option<Instant> = None;
        for id in ids {
            if let Some(at) = self.poll_peer(now, id, out) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    fn poll_peer(
        &mut self,
        now: Instant,
        id: DeviceId,
        out: &mut Vec<Outgoing>,
    ) -> Option<Instant> {
        let me = self.me;
        let relay = self.relay;
        let peer = self.peers.get_mut(&id)?;
        let token = peer.token?;
        peer.outstanding
            .retain(|o| now.saturating_duration_since(o.sent) < PATH_TIMEOUT);
        if peer.best_expiry().is_some_and(|at| at <= now) {
            peer.lose_path(now);
            self.generation += 1;
        }
        let mut next_tx = || {
            self.next_tx += 1;
            self.next_tx
        };
        if let (Some(best), Some(at)) = (peer.best, peer.next_heartbeat)
            && at <= now
        {
            out.push(peer.ping(me, token, best, next_tx(), now));
            peer.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
        }
        if let Some(punch) = peer.punch
            && punch.next <= now
        {
            let addrs: Vec<SocketAddr> = peer.candidates.iter().map(|c| c.addr).collect();
            for addr in addrs {
                out.push(peer.ping(me, token, addr, next_tx(), now));
            }
            peer.punch = punch.advance(now, peer.best.is_some(), relay);
        }
        [
            peer.punch.map(|p| p.next),
            peer.next_heartbeat,
            peer.best_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn handle_ping(&mut self, now: Instant, src: SocketAddr, ping: Ping) -> ProbeOutcome {
        let me = self.me;
        if ping.from == me || is_mesh_addr(src) {
            return ProbeOutcome::Ignored;
        }
        let Some(peer) = self.peers.get_mut(&ping.from) else {
            return ProbeOutcome::Ignored;
        };
        let Some(token) = peer.token.filter(|t| same_token(t, &ping.token)) else {
            return ProbeOutcome::Ignored;
        };
        peer.touched = now;
        let mut out = vec![Outgoing {
            dest: src,
            probe: Probe::Pong(Pong {
                from: me,
                token,
                tx: ping.tx,
                observed: src,
            }),
        }];
        if peer.learn(src) {
            self.by_real_addr.insert(src, ping.from);
        }
        let reping = peer
            .candidates
            .iter()
            .find(|c| c.addr == src)
            .is_some_and(|c| {
                c.last_pong.is_none()
                    && c.last_ping
                        .is_none_or(|at| now.saturating_duration_since(at) >= REPING_INTERVAL)
            });
        if reping {
            self.next_tx += 1;
            out.push(peer.ping(me, token, src, self.next_tx, now));
        }
        ProbeOutcome::Accepted(out)
    }

    fn handle_pong(&mut self, now: Instant, src: SocketAddr, pong: Pong) -> ProbeOutcome {
        let Some(peer) = self.peers.get_mut(&pong.from) else {
            return ProbeOutcome::Ignored;
        };
        if !peer.token.is_some_and(|t| same_token(&t, &pong.token)) {
            return ProbeOutcome::Ignored;
        }
        let Some(at) = peer
            .outstanding
            .iter()
            .position(|o| o.tx == pong.tx && o.addr == src)
        else {
            return ProbeOutcome::Ignored;
        };
        let Some(sent) = peer.outstanding.remove(at) else {
            return ProbeOutcome::Ignored;
        };
        let Some(candidate) = peer.candidates.iter_mut().find(|c| c.addr == src) else {
            // Evicted while the ping was out: the address is no longer ours to use.
            return ProbeOutcome::Ignored;
        };
        candidate.confirm(now, now.saturating_duration_since(sent.sent));
        peer.touched = now;
        if peer.choose(now) {
            self.generation += 1;
        }
        self.by_real_addr.insert(src, pong.from);
        ProbeOutcome::Accepted(Vec::new())
    }

    /// The entry of `peer`, made (with a new made-up address) if needed.
    fn peer_mut(&mut self, now: Instant, peer: DeviceId) -> &mut Peer {
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= MAX_PEERS {
                self.evict_one();
            }
            let mesh_addr = self.allocate();
            self.by_mesh_addr.insert(mesh_addr, peer);
            self.peers.insert(peer, Peer::new(mesh_addr, now));
        }
        // Inserted just above if it was missing.
        #[allow(clippy::expect_used)]
        let entry = self.peers.get_mut(&peer).expect("peer present");
        entry.touched = now;
        entry
    }

    fn allocate(&mut self) -> SocketAddr {
        let n = self.next_mesh;
        self.next_mesh = if n >= MESH_LAST { MESH_FIRST } else { n + 1 };
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(n)), MESH_PORT)
    }

    fn evict_one(&mut self) {
        let oldest = self
            .peers
            .iter()
            .min_by_key(|(_, p)| p.touched)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.forget(id);
        }
    }

    /// `addr` no longer belongs to `peer`: point it at another peer that has it, if any.
    fn unindex(&mut self, addr: SocketAddr, peer: DeviceId) {
        if self.by_real_addr.get(&addr) != Some(&peer) {
            return;
        }
        self.by_real_addr.remove(&addr);
        let other = self
            .peers
            .iter()
            .find(|(id, p)| **id != peer && p.candidates.iter().any(|c| c.addr == addr));
        if let Some((id, _)) = other {
            self.by_real_addr.insert(addr, *id);
        }
    }
}

impl Peer {
    fn new(mesh_addr: SocketAddr, now: Instant) -> Self {
        Self {
            mesh_addr,
            token: None,
            candidates: Vec::new(),
            best: None,
            outstanding: VecDeque::new(),
            punch: None,
            next_heartbeat: None,
            since: now,
            touched: now,
        }
    }

    /// A ping to `addr`, remembered until its pong comes back.
    fn ping(
        &mut self,
        me: DeviceId,
        token: [u8; 16],
        addr: SocketAddr,
        n: u64,
        now: Instant,
    ) -> Outgoing {
        let mut tx = [0u8; 12];
        tx[..8].copy_from_slice(&n.to_le_bytes());
        if self.outstanding.len() >= MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(Outstanding {
            tx,
            addr,
            sent: now,
        });
        if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == addr) {
            c.last_ping = Some(now);
        }
        Outgoing {
            dest: addr,
            probe: Probe::Ping(Ping {
                from: me,
                token,
                tx,
            }),
        }
    }

    /// Adds the source of a valid ping as a peer-reflexive candidate; whether the address is
    /// (now) one of this peer's.
    fn learn(&mut self, addr: SocketAddr) -> bool {
        if self.candidates.iter().any(|c| c.addr == addr) {
            return true;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            // Make room from addresses never proven, reflexive ones (stale mappings) first.
            let best = self.best;
            let victim = [true, false].into_iter().find_map(|reflexive| {
                self.candidates.iter().position(|c| {
                    c.reflexive == reflexive && c.last_pong.is_none() && Some(c.addr) != best
                })
            });
            match victim {
                Some(at) => {
                    self.candidates.remove(at);
                }
                None => return false,
            }
        }
        self.candidates.push(Candidate::new(addr, true));
        true
    }

    /// When the chosen path dies without a pong.
    fn best_expiry(&self) -> Option<Instant> {
        let best = self.best?;
        let c = self.candidates.iter().find(|c| c.addr == best)?;
        c.last_pong.map(|at| at + PATH_TIMEOUT)
    }

    fn lose_path(&mut self, now: Instant) {
        for c in &mut self.candidates {
            if c.last_pong.is_some_and(|at| at + PATH_TIMEOUT <= now) {
                c.last_pong = None;
                c.rtt = None;
            }
        }
        self.best = None;
        self.next_heartbeat = None;
        self.since = now;
        self.punch = Some(Punch::start(now));
        // Another address may still be alive (a pong within the timeout).
        self.choose(now);
    }

    /// Picks the direct address: the live one with the lowest round-trip time, keeping the
    /// current one unless another is clearly faster. Whether the path changed.
    fn choose(&mut self, now: Instant) -> bool {
        let live = |c: &&Candidate| c.last_pong.is_some_and(|at| at + PATH_TIMEOUT > now);
        let fastest = self
            .candidates
            .iter()
            .filter(live)
            .min_by_key(|c| c.rtt.unwrap_or(Duration::MAX));
        let current = self
            .best
            .and_then(|b| self.candidates.iter().filter(live).find(|c| c.addr == b));
        let pick = match (current, fastest) {
            (Some(cur), Some(fast)) if clearly_faster(fast.rtt, cur.rtt) => Some(fast.addr),
            (Some(cur), _) => Some(cur.addr),
            (None, fast) => fast.map(|c| c.addr),
        };
        if pick == self.best {
            return false;
        }
        if self.best.is_none() {
            self.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
        }
        self.best = pick;
        self.since = now;
        if pick.is_none() {
            self.next_heartbeat = None;
        }
        true
    }
}

impl Candidate {
    fn new(addr: SocketAddr, reflexive: bool) -> Self {
        Self {
            addr,
            reflexive,
            last_pong: None,
            rtt: None,
            last_ping: None,
        }
    }

    fn confirm(&mut self, now: Instant, sample: Duration) {
        self.last_pong = Some(now);
        self.rtt = Some(match self.rtt {
            None => sample,
            Some(rtt) => (rtt * 7 + sample) / 8,
        });
    }
}

impl Punch {
    fn start(now: Instant) -> Self {
        Self {
            started: now,
            round: 0,
            next: now,
        }
    }

    /// The punch after the round just sent, or `None` when it is over: after the burst once a
    /// direct path is up; never while there is none.
    fn advance(self, now: Instant, direct: bool, relay: bool) -> Option<Punch> {
        let round = self.round + 1;
        let next = if let Some(offset) = PUNCH_BURST.get(round) {
            self.started + *offset
        } else if direct {
            return None;
        } else if relay {
            let doublings = u32::try_from(round - PUNCH_BURST.len()).unwrap_or(u32::MAX);
            let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
            now + PUNCH_INTERVAL
                .saturating_mul(factor)
                .min(MAX_PUNCH_INTERVAL)
        } else {
            now + PUNCH_INTERVAL
        };
        Some(Punch {
            round,
            next,
            ..self
        })
    }
}

/// An address worth probing: a real unicast address with a port.
fn usable(addr: SocketAddr) -> bool {
    addr.port() != 0
        && !addr.ip().is_unspecified()
        && !addr.ip().is_multicast()
        && !is_mesh_addr(addr)
}

fn clearly_faster(fast: Option<Duration>, current: Option<Duration>) -> bool {
    match (fast, current) {
        (Some(fast), Some(current)) => fast * 100 < current * SWITCH_PERCENT,
        _ => false,
    }
}

/// Compares tokens without stopping at the first difference.
fn same_token(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: DeviceId = DeviceId::from_bytes([1; 20]);
    const B: DeviceId = DeviceId::from_bytes([2; 20]);
    const TOKEN: [u8; 16] = [9; 16];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// The pings `paths` sends at `now`, as (destination, tx).
    fn pings(paths: &mut Paths, now: Instant) -> Vec<(SocketAddr, [u8; 12])> {
        let mut out = Vec::new();
        paths.poll(now, &mut out);
        out.into_iter()
            .filter_map(|o| match o.probe {
                Probe::Ping(p) => Some((o.dest, p.tx)),
                Probe::Pong(_) => None,
            })
            .collect()
    }

    fn pong(tx: [u8; 12], token: [u8; 16]) -> Probe {
        Probe::Pong(Pong {
            from: B,
            token,
            tx,
            observed: addr("10.0.0.1:5000"),
        })
    }

    #[test]
    fn made_up_addresses_are_stable_distinct_and_in_the_reserved_block() {
        let now = Instant::now();
        let mut paths = Paths::new(A, now);
        let b = paths.peer_addr(now, B);
        let c = paths.peer_addr(now, DeviceId::from_bytes([3; 20]));
        assert_ne!(b, c);
        assert_eq!(paths.peer_addr(now, B), b);
        assert!(is_mesh_addr(b) && is_mesh_addr(c));
        let mapped = SocketAddr::new(
            IpAddr::V6(match b.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            }),
            b.port(),
        );
        assert!(is_mesh_addr(mapped));
        assert_eq!(paths.peer_of(mapped), Some(B));
        assert!(!is_mesh_addr(addr("10.0.0.1:1")));
        paths.forget(B);
        assert_eq!(paths.peer_of(b), None);
        assert_ne!(
            paths.peer_addr(now, B),
            b,
            "a forgotten address is not reused"
        );
    }

    #[test]
    fn punch_bursts_then_backs_off_while_relayed() {
        let t0 = Instant::now();
        let mut paths = Paths::new(A, t0);
        paths.set_relay(t0, true);
        paths.set_candidates(t0, B, &[addr("10.0.0.2:1"), addr("10.0.0.3:1")], TOKEN);
        let mut at = t0;
        let mut rounds = Vec::new();
        for _ in 0..12 {
            let mut out = Vec::new();
            let next = paths.poll(at, &mut out).expect("punching never stops");
            if !out.is_empty() {
                assert_eq!(out.len(), 2, "every candidate in each round");
                rounds.push(at.duration_since(t0));
            }
            at = next;
        }
        let ms: Vec<u128> = rounds.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            [
                0, 100, 300, 700, 1700, 3700, 7700, 12700, 17700, 22700, 27700, 32700
            ]
        );
        assert_eq!(paths.path(B).map(|p| p.kind), Some(PathKind::Relayed));
    }

    #[test]
    fn a_pong_makes_the_path_direct_and_silence_kills_it() {
        let t0 = Instant::now();
        let mut paths = Paths::new(A, t0);
        let b_addr = addr("10.0.0.2:7000");
        paths.set_candidates(t0, B, &[b_addr], TOKEN);
        let sent = pings(&mut paths, t0);
        let rtt = Duration::from_millis(20);
        let t1 = t0 + rtt;
        // A pong with the wrong token or from the wrong address proves nothing.
        assert_eq!(
            paths.handle_probe(t1, b_addr, pong(sent[0].1, [0; 16])),
            ProbeOutcome::Ignored
        );
        assert_eq!(
            paths.handle_probe(t1, addr("10.0.0.9:7000"), pong(sent[0].1, TOKEN)),
            ProbeOutcome::Ignored
        );
        assert!(matches!(
            paths.handle_probe(t1, b_addr, pong(sent[0].1, TOKEN)),
            ProbeOutcome::Accepted(_)
        ));
        let path = paths.path(B).expect("known peer");
        assert_eq!(
            (path.kind, path.addr, path.rtt),
            (PathKind::Direct, Some(b_addr), Some(rtt))
        );
        assert_eq!(
            paths.route(paths.peers[&B].mesh_addr),
            Route::Direct(b_addr)
        );
        // The same pong twice is not an answer twice.
        assert_eq!(
            paths.handle_probe(t1, b_addr, pong(sent[0].1, TOKEN)),
            ProbeOutcome::Ignored
        );
        // Heartbeats go to the chosen address only; nobody answers them.
        let mut at = t1;
        let mut heartbeats = 0;
        loop {
            let mut out = Vec::new();
            let next = paths.poll(at, &mut out).expect("scheduled");
            if paths.path(B).map(|p| p.kind) != Some(PathKind::Direct) {
                // And punching starts again at once.
                assert!(out.iter().any(|o| o.dest == b_addr), "{out:?}");
                break;
            }
            heartbeats += out.iter().filter(|o| o.dest == b_addr).count();
            at = next;
        }
        assert_eq!(
            at,
            t1 + PATH_TIMEOUT,
            "dead exactly PATH_TIMEOUT after the last pong"
        );
        assert!(heartbeats >= 2, "{heartbeats}");
        let path = paths.path(B).expect("known peer");
        assert_eq!((path.kind, path.since), (PathKind::None, at));
    }

    #[test]
    fn a_valid_ping_is_answered_and_teaches_a_peer_reflexive_address() {
        let t0 = Instant::now();
        let mut paths = Paths::new(A, t0);
        paths.set_candidates(t0, B, &[addr("10.0.0.2:7000")], TOKEN);
        let fresh = addr("10.0.0.2:40001");
        let ping = |from, token| {
            Probe::Ping(Ping {
                from,
                token,
                tx: [5; 12],
            })
        };
        assert_eq!(
            paths.handle_probe(t0, fresh, ping(B, [1; 16])),
            ProbeOutcome::Ignored
        );
        assert_eq!(
            paths.handle_probe(t0, fresh, ping(DeviceId::from_bytes([3; 20]), TOKEN)),
            ProbeOutcome::Ignored
        );
        assert_eq!(paths.mesh_source(fresh), None);
        let ProbeOutcome::Accepted(out) = paths.handle_probe(t0, fresh, ping(B, TOKEN)) else {
            panic!("a valid ping is accepted");
        };
        assert!(matches!(&out[0].probe, Probe::Pong(p) if p.tx == [5; 12] && p.observed == fresh));
        assert!(
            matches!(&out[1].probe, Probe::Ping(_)) && out[1].dest == fresh,
            "pinged back: that opens our NAT for the new mapping"
        );
        assert_eq!(paths.mesh_source(fresh), Some(paths.peer_addr(t0, B)));
        let (addrs, token) = paths.candidates(B).expect("introduced");
        assert_eq!((addrs.len(), token), (2, TOKEN));
    }

    #[test]
    fn candidates_are_bounded_and_the_path_is_sticky() {
        let t0 = Instant::now();
        let mut paths = Paths::new(A, t0);
        let many: Vec<SocketAddr> = (0..40u16)
            .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)), 1000 + i))
            .collect();
        paths.set_candidates(t0, B, &many, TOKEN);
        assert_eq!(paths.candidates(B).map(|c| c.0.len()), Some(MAX_CANDIDATES));
        let sent = pings(&mut paths, t0);
        assert_eq!(sent.len(), MAX_CANDIDATES);
        // The slower address answers first and is chosen; a slightly faster one does not
        // displace it, a much faster one does.
        let (slow, fast, faster) = (sent[0], sent[1], sent[2]);
        paths.handle_probe(t0 + Duration::from_millis(50), slow.0, pong(slow.1, TOKEN));
        paths.handle_probe(t0 + Duration::from_millis(45), fast.0, pong(fast.1, TOKEN));
        assert_eq!(paths.path(B).and_then(|p| p.addr), Some(slow.0));
        paths.handle_probe(
            t0 + Duration::from_millis(10),
            faster.0,
            pong(faster.1, TOKEN),
        );
        assert_eq!(paths.path(B).and_then(|p| p.addr), Some(faster.0));
        // Pings from ever new addresses never grow the list past its bound.
        for port in 0..100u16 {
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)), 2000 + port);
            let ping = Probe::Ping(Ping {
                from: B,
                token: TOKEN,
                tx: [0; 12],
            });
            paths.handle_probe(t0, src, ping);
        }
        let (addrs, _) = paths.candidates(B).expect("introduced");
        assert_eq!(addrs.len(), MAX_CANDIDATES);
        assert!(
            addrs.contains(&faster.0),
            "the path in use is never evicted"
        );
    }

    #[test]
    fn peers_are_bounded() {
        let t0 = Instant::now();
        let mut paths = Paths::new(A, t0);
        for i in 0..(MAX_PEERS + 10) {
            let mut bytes = [0u8; 20];
            bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            paths.peer_addr(
                t0 + Duration::from_millis(i as u64),
                DeviceId::from_bytes(bytes),
            );
        }
        assert_eq!(paths.peers.len(), MAX_PEERS);
        assert_eq!(paths.by_mesh_addr.len(), MAX_PEERS);
    }
}
