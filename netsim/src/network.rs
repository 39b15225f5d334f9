//! The virtual network: hosts, their addresses and sockets, links, faults, counters, and the
//! router task that delivers datagrams when tokio's clock reaches their arrival time.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use quinn::udp::{EcnCodepoint, RecvMeta};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::counters::{Counters, DropCause, HostCounters};
use crate::link::{
    IPV4_UDP_HEADER, IPV6_UDP_HEADER, LinkConfig, LinkConfigError, LinkEngine, Verdict,
};
use crate::nat::{NatConfig, NatCounters, NatTable};
use crate::rng::{Rng, derive_seed};
use crate::socket::SimSocket;

/// Bytes a socket's receive buffer holds before further datagrams are dropped
/// ([`Drops::recv_buffer`](crate::Drops::recv_buffer)).
pub const RECV_BUFFER_BYTES: usize = 2 * 1024 * 1024;
/// First port handed out when a socket binds port 0.
pub const EPHEMERAL_PORTS_START: u16 = 49152;
/// First address handed out to hosts (10.0.0.1, then 10.0.0.2, ...).
pub const FIRST_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// First address handed out when an IPv6 host rebinds (fd00::1:0:0:1, then ...:2, ...).
pub const FIRST_HOST_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 1, 0, 0, 1);
/// Payload bytes one link direction may have in flight (scheduled but not arrived); beyond
/// that, datagrams are dropped as [`Drops::queue_full`](crate::Drops::queue_full). Only a
/// sender that ignores congestion on a fast, long link gets near it.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// Inside subnet of the first NAT (192.168.1.0/24); the n-th NAT gets 192.168.n.0/24, and
/// from the 256th on, /24s from 172.16.0.0 up. Its hosts get .2, .3, ...
pub const FIRST_NAT_SUBNET: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 0);

/// A virtual UDP network on tokio's clock.
///
/// A cheap handle: clones share the same network. Every random decision comes from `seed`, so
/// the same seed and the same sequence of sends give the same drops, delays and duplicates.
/// A network lives on the tokio runtime on which its first socket was bound: a router task
/// spawned there delivers datagrams at their arrival time, and exits once the network and all
/// its sockets are dropped. Deliveries happen on tokio's timer, whose resolution is 1 ms.
#[derive(Clone)]
pub struct Network {
    pub(crate) inner: Arc<Inner>,
}

/// Identifies a host within its [`Network`]. Ids are given out in order, from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(u32);

/// A simulated host: one IP address, any number of sockets.
///
/// A cheap handle; clones refer to the same host.
#[derive(Clone)]
pub struct Host {
    net: Network,
    id: HostId,
    name: Arc<str>,
}

/// A NAT box (or firewall) on the network: a public address on the outside, private hosts
/// (and perhaps other NATs) on the inside. See [`NatConfig`] for its behaviours.
///
/// A cheap handle; clones refer to the same NAT. It has a [`HostId`] of its own, so links
/// ([`Network::set_link_both`]), partitions and host counters apply to it as to a host: the
/// link between the NAT and the outside is its uplink, and cutting the NAT off cuts off
/// everything behind it.
#[derive(Clone)]
pub struct Nat {
    net: Network,
    id: HostId,
    name: Arc<str>,
}

/// An address that cannot be given to a host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// Another host already has this address.
    #[error("address {0} is already used by another host")]
    InUse(IpAddr),
    /// Unspecified, broadcast or multicast addresses cannot name a host.
    #[error("address {0} cannot be given to a host")]
    Unusable(IpAddr),
}

pub(crate) type SocketId = u64;

pub(crate) struct Inner {
    seed: u64,
    state: Mutex<State>,
    wake_router: Arc<Notify>,
}

pub(crate) struct State {
    seed: u64,
    default_link: LinkConfig,
    /// Used between two sockets of the same host unless a link (h, h) was set.
    loopback: LinkConfig,
    hosts: Vec<HostState>,
    by_ip: HashMap<IpAddr, HostId>,
    sockets: HashMap<SocketId, SocketState>,
    bound: HashMap<SocketAddr, SocketId>,
    next_socket: SocketId,
    next_ip: u32,
    next_ip6: u128,
    /// NATs created so far; numbers their inside subnets.
    nats: u32,
    links: HashMap<(HostId, HostId), Link>,
    partitions: Vec<(Vec<HostId>, Vec<HostId>)>,
    in_flight: BinaryHeap<InFlight>,
    next_seq: u64,
    router_spawned: bool,
    /// When the router wakes on its own; `None` while it waits for a notification only.
    router_deadline: Option<Instant>,
}

struct HostState {
    ip: IpAddr,
    up: bool,
    next_port: u16,
    /// Datagrams sent to addresses no host has; they belong to no link.
    unrouted: Counters,
    /// The NAT this host (or NAT) sits directly behind; `None` on the public network.
    behind: Option<HostId>,
    /// Set if this is a NAT box rather than a host with sockets.
    nat: Option<Box<NatBox>>,
}

struct NatBox {
    table: NatTable,
    /// The next inside address to try for a new host.
    next_inside: u32,
}

struct SocketState {
    host: HostId,
    port: u16,
    inbox: VecDeque<Received>,
    inbox_bytes: usize,
    waker: Option<Waker>,
}

struct Link {
    config: Option<LinkConfig>,
    engine: LinkEngine,
    counters: Counters,
    in_flight_bytes: usize,
}

struct Received {
    link: (HostId, HostId),
    src: SocketAddr,
    dst: SocketAddr,
    ecn: Option<EcnCodepoint>,
    data: Bytes,
}

struct InFlight {
    at: Instant,
    seq: u64,
    packet: Received,
}

impl Network {
    /// Creates an empty network whose random decisions all derive from `seed`.
    ///
    /// The default link is ideal ([`LinkConfig::default`]); set another with
    /// [`set_default_link`](Self::set_default_link).
    pub fn new(seed: u64) -> Self {
        let state = State {
            seed,
            default_link: LinkConfig::default(),
            loopback: LinkConfig::default(),
            hosts: Vec::new(),
            by_ip: HashMap::new(),
            sockets: HashMap::new(),
            bound: HashMap::new(),
            next_socket: 0,
            next_ip: u32::from(FIRST_HOST_IP),
            next_ip6: u128::from(FIRST_HOST_IPV6),
            nats: 0,
            links: HashMap::new(),
            partitions: Vec::new(),
            in_flight: BinaryHeap::new(),
            next_seq: 0,
            router_spawned: false,
            router_deadline: None,
        };
        Self {
            inner: Arc::new(Inner {
                seed,
                state: Mutex::new(state),
                wake_router: Arc::new(Notify::new()),
            }),
        }
    }

    /// The seed this network was created with; print it in test failures to replay them.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// Adds a host with the next free address (10.0.0.1, 10.0.0.2, ...). `name` is a label
    /// for logs and `Debug` output.
    pub fn add_host(&self, name: &str) -> Host {
        let mut state = self.inner.lock();
        let ip = state.allocate_ip(false);
        let id = state.insert_host(ip);
        drop(state);
        self.host_handle(id, name)
    }

    /// Adds a NAT on the public network, at the next free public address (as [`add_host`]
    /// gives out). Put hosts behind it with [`Nat::add_host`].
    ///
    /// [`add_host`]: Self::add_host
    pub fn add_nat(&self, name: &str, config: NatConfig) -> Nat {
        let mut state = self.inner.lock();
        let ip = state.allocate_ip(false);
        let id = state.insert_nat(ip, None, config);
        drop(state);
        self.nat_handle(id, name)
    }

    /// Adds a host with a chosen address (IPv4 or IPv6).
    pub fn add_host_with_ip(&self, name: &str, ip: IpAddr) -> Result<Host, AddressError> {
        let mut state = self.inner.lock();
        state.check_ip(ip)?;
        let id = state.insert_host(ip);
        drop(state);
        Ok(self.host_handle(id, name))
    }

    /// Sets the conditions of every link that has none of its own, including links already
    /// carrying traffic. Takes effect for datagrams sent from now on.
    pub fn set_default_link(&self, config: LinkConfig) -> Result<(), LinkConfigError> {
        config.validate()?;
        self.inner.lock().default_link = config;
        Ok(())
    }

    /// Sets the conditions of the link from `from` to `to` (one direction). Takes effect for
    /// datagrams sent from now on; datagrams in flight keep their schedule. The link keeps its
    /// queue and loss state across changes.
    pub fn set_link(
        &self,
        from: HostId,
        to: HostId,
        config: LinkConfig,
    ) -> Result<(), LinkConfigError> {
        config.validate()?;
        self.inner.lock().link_mut(from, to).config = Some(config);
        Ok(())
    }

    /// Sets the same conditions on both directions between `a` and `b`; each direction keeps
    /// its own queue, loss state and random stream.
    pub fn set_link_both(
        &self,
        a: HostId,
        b: HostId,
        config: LinkConfig,
    ) -> Result<(), LinkConfigError> {
        config.validate()?;
        let mut state = self.inner.lock();
        state.link_mut(a, b).config = Some(config.clone());
        state.link_mut(b, a).config = Some(config);
        Ok(())
    }

    /// Makes the link from `from` to `to` follow the default link again.
    pub fn clear_link(&self, from: HostId, to: HostId) {
        if let Some(link) = self.inner.lock().links.get_mut(&(from, to)) {
            link.config = None;
        }
    }

    /// Cuts every host in `side_a` off from every host in `side_b`, both ways, until
    /// [`heal`](Self::heal). Datagrams already in flight between them are dropped on arrival.
    /// Partitions accumulate.
    pub fn partition(&self, side_a: &[HostId], side_b: &[HostId]) {
        self.inner
            .lock()
            .partitions
            .push((side_a.to_vec(), side_b.to_vec()));
    }

    /// Removes every partition.
    pub fn heal(&self) {
        self.inner.lock().partitions.clear();
    }

    /// Counters summed over the whole network.
    pub fn counters(&self) -> Counters {
        let now = Instant::now();
        let state = self.inner.lock();
        let mut total = Counters::default();
        for link in state.links.values() {
            total += link.snapshot(now);
        }
        for host in &state.hosts {
            total += host.unrouted;
        }
        total
    }

    /// Counters of the link from `from` to `to` (zero if it never carried traffic).
    pub fn link_counters(&self, from: HostId, to: HostId) -> Counters {
        let now = Instant::now();
        self.inner
            .lock()
            .links
            .get(&(from, to))
            .map(|l| l.snapshot(now))
            .unwrap_or_default()
    }

    /// Counters of one host: what it sent and what was sent to it.
    pub fn host_counters(&self, host: HostId) -> HostCounters {
        let now = Instant::now();
        let state = self.inner.lock();
        let mut counters = HostCounters::default();
        for (&(from, to), link) in &state.links {
            if from == host {
                counters.tx += link.snapshot(now);
            }
            if to == host {
                counters.rx += link.snapshot(now);
            }
        }
        if let Some(h) = state.hosts.get(host.index()) {
            counters.tx += h.unrouted;
        }
        counters
    }

    /// Datagrams scheduled for delivery that have not arrived yet.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight.len()
    }

    /// Counters of every NAT, summed.
    pub fn nat_counters(&self) -> NatCounters {
        let state = self.inner.lock();
        let mut total = NatCounters::default();
        for nat in state.hosts.iter().filter_map(|h| h.nat.as_ref()) {
            total += nat.table.counters();
        }
        total
    }

    fn nat_handle(&self, id: HostId, name: &str) -> Nat {
        Nat {
            net: self.clone(),
            id,
            name: Arc::from(name),
        }
    }

    fn host_handle(&self, id: HostId, name: &str) -> Host {
        Host {
            net: self.clone(),
            id,
            name: Arc::from(name),
        }
    }
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("Network")
            .field("seed", &self.inner.seed)
            .field("hosts", &state.hosts.len())
            .field("sockets", &state.sockets.len())
            .field("in_flight", &state.in_flight.len())
            .finish()
    }
}

impl HostId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host#{}", self.0)
    }
}

impl Host {
    /// This host's id, for [`Network`] methods that take hosts.
    pub fn id(&self) -> HostId {
        self.id
    }

    /// The label given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network this host belongs to.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The host's current address (it changes on [`rebind`](Self::rebind)).
    pub fn ip(&self) -> IpAddr {
        self.net.inner.lock().hosts[self.id.index()].ip
    }

    /// Binds a socket on `port` of this host; port 0 picks a free port from 49152 up.
    ///
    /// Fails with `AddrInUse` if the port is taken, or if called outside a tokio runtime
    /// the first time (the network's router task is spawned on it). The port is released when
    /// the last `Arc` of the socket is dropped.
    pub fn bind(&self, port: u16) -> io::Result<Arc<SimSocket>> {
        let id = {
            let mut state = self.net.inner.lock();
            if !state.router_spawned {
                let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                    io::Error::other(
                        "netsim: the first socket must be bound inside a tokio runtime",
                    )
                })?;
                handle.spawn(route(
                    Arc::downgrade(&self.net.inner),
                    self.net.inner.wake_router.clone(),
                ));
                state.router_spawned = true;
            }
            state.bind(self.id, port)?
        };
        Ok(Arc::new(SimSocket::new(
            self.net.inner.clone(),
            id,
            self.id,
        )))
    }

    /// Builds a quinn endpoint on a new socket bound to `port` (0 for any), on quinn's tokio
    /// runtime, so quinn's timers follow tokio's (pausable) clock.
    ///
    /// Quinn's random generator is seeded from the network seed, the host and the port, so
    /// connection ids, packet-number skips and greasing repeat with the seed. Pass a
    /// `server_config` to accept connections.
    pub fn endpoint(
        &self,
        port: u16,
        server_config: Option<quinn::ServerConfig>,
    ) -> io::Result<quinn::Endpoint> {
        let socket = self.bind(port)?;
        let mut config = quinn::EndpointConfig::default();
        let key = (u64::from(self.id.0) << 16) | u64::from(socket.addr().port());
        config.rng_seed(Some(
            Rng::new(derive_seed(self.net.inner.seed, key)).seed_bytes(),
        ));
        quinn::Endpoint::new_with_abstract_socket(
            config,
            server_config,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
    }

    /// Like [`endpoint`](Self::endpoint) with an explicit endpoint configuration, used as is.
    pub fn endpoint_with_config(
        &self,
        port: u16,
        config: quinn::EndpointConfig,
        server_config: Option<quinn::ServerConfig>,
    ) -> io::Result<quinn::Endpoint> {
        let socket = self.bind(port)?;
        quinn::Endpoint::new_with_abstract_socket(
            config,
            server_config,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
    }

    /// Takes the host off the network (`false`) or puts it back (`true`). While down, every
    /// datagram it sends or that arrives for it is dropped ([`Drops::host_down`]); its sockets
    /// stay bound, as when a cable is pulled.
    ///
    /// [`Drops::host_down`]: crate::Drops::host_down
    pub fn set_up(&self, up: bool) {
        self.net.inner.lock().hosts[self.id.index()].up = up;
    }

    /// Whether the host is up.
    pub fn is_up(&self) -> bool {
        self.net.inner.lock().hosts[self.id.index()].up
    }

    /// Gives the host the next free address, as a NAT rebinding or a roaming device would.
    /// Its sockets keep their ports and send from the new address from now on; datagrams to
    /// the old address, including those in flight, are dropped ([`Drops::no_route`]).
    ///
    /// [`Drops::no_route`]: crate::Drops::no_route
    pub fn rebind(&self) -> IpAddr {
        let mut state = self.net.inner.lock();
        let host = &state.hosts[self.id.index()];
        let (v6, behind) = (host.ip.is_ipv6(), host.behind);
        let ip = match behind {
            Some(nat) => state.allocate_inside(nat),
            None => state.allocate_ip(v6),
        };
        state.move_host(self.id, ip);
        ip
    }

    /// Like [`rebind`](Self::rebind) to a chosen address.
    pub fn rebind_to(&self, ip: IpAddr) -> Result<(), AddressError> {
        let mut state = self.net.inner.lock();
        state.check_ip(ip)?;
        state.move_host(self.id, ip);
        Ok(())
    }

    /// This host's counters (see [`Network::host_counters`]).
    pub fn counters(&self) -> HostCounters {
        self.net.host_counters(self.id)
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("ip", &self.ip())
            .finish()
    }
}

impl Nat {
    /// This NAT's id, for [`Network`] methods that take hosts (links, partitions, counters).
    pub fn id(&self) -> HostId {
        self.id
    }

    /// The label given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network this NAT belongs to.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The address the outside sees: mapped datagrams leave from it. For a NAT behind another
    /// NAT, an address inside the outer one.
    pub fn public_ip(&self) -> IpAddr {
        self.net.inner.lock().hosts[self.id.index()].ip
    }

    /// How this NAT behaves.
    pub fn config(&self) -> NatConfig {
        self.with_table(|t| t.config().clone())
    }

    /// Adds a host behind this NAT at the next free address of its subnet (192.168.n.2, ...).
    pub fn add_host(&self, name: &str) -> Host {
        let mut state = self.net.inner.lock();
        let ip = state.allocate_inside(self.id);
        let id = state.insert_host(ip);
        state.hosts[id.index()].behind = Some(self.id);
        drop(state);
        self.net.host_handle(id, name)
    }

    /// Adds a host behind this NAT at a chosen address. Which side of a NAT a host is on
    /// depends on how it was added, not on its address; choose a private one.
    pub fn add_host_with_ip(&self, name: &str, ip: IpAddr) -> Result<Host, AddressError> {
        let mut state = self.net.inner.lock();
        state.check_ip(ip)?;
        let id = state.insert_host(ip);
        state.hosts[id.index()].behind = Some(self.id);
        drop(state);
        Ok(self.net.host_handle(id, name))
    }

    /// Adds a NAT behind this one (carrier-grade NAT: this is the carrier's, the new one the
    /// home router); its public address is a private address of this NAT's subnet.
    pub fn add_nat(&self, name: &str, config: NatConfig) -> Nat {
        let mut state = self.net.inner.lock();
        let ip = state.allocate_inside(self.id);
        let id = state.insert_nat(ip, Some(self.id), config);
        drop(state);
        self.net.nat_handle(id, name)
    }

    /// What this NAT translated and dropped.
    pub fn counters(&self) -> NatCounters {
        self.with_table(|t| t.counters())
    }

    /// Mappings alive now.
    pub fn mappings(&self) -> usize {
        let now = Instant::now();
        self.with_table(|t| t.live_mappings(now))
    }

    /// Forgets every mapping, as a reboot of the box does: flows from the inside get new
    /// public ports, and peers that knew the old ones can no longer reach in.
    pub fn flush(&self) {
        self.with_table(NatTable::flush);
    }

    fn with_table<T>(&self, f: impl FnOnce(&mut NatTable) -> T) -> T {
        let mut state = self.net.inner.lock();
        match state.hosts[self.id.index()].nat.as_mut() {
            Some(nat) => f(&mut nat.table),
            // A `Nat` handle is only made for a host created as a NAT.
            None => unreachable!("netsim: {} is not a NAT", self.id),
        }
    }
}

impl fmt::Debug for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nat")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("public_ip", &self.public_ip())
            .finish()
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every critical section
        // either completes its update or makes none.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn wake_router(&self) {
        self.wake_router.notify_one();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the router notice that the network is gone and exit.
        self.wake_router.notify_one();
    }
}

impl State {
    /// The next free address of the family asked for.
    fn allocate_ip(&mut self, v6: bool) -> IpAddr {
        if v6 {
            loop {
                let ip = IpAddr::V6(Ipv6Addr::from(self.next_ip6));
                self.next_ip6 = self.next_ip6.wrapping_add(1);
                if self.check_ip(ip).is_ok() {
                    return ip;
                }
            }
        }
        loop {
            let candidate = Ipv4Addr::from(self.next_ip);
            self.next_ip = self.next_ip.wrapping_add(1);
            let last = candidate.octets()[3];
            let ip = IpAddr::V4(candidate);
            if last != 0 && last != 255 && self.check_ip(ip).is_ok() {
                return ip;
            }
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), AddressError> {
        let unusable = ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if unusable {
            return Err(AddressError::Unusable(ip));
        }
        if self.by_ip.contains_key(&ip) {
            return Err(AddressError::InUse(ip));
        }
        Ok(())
    }

    fn insert_host(&mut self, ip: IpAddr) -> HostId {
        let id = HostId(u32::try_from(self.hosts.len()).unwrap_or(u32::MAX));
        self.hosts.push(HostState {
            ip,
            up: true,
            next_port: EPHEMERAL_PORTS_START,
            unrouted: Counters::default(),
            behind: None,
            nat: None,
        });
        self.by_ip.insert(ip, id);
        id
    }

    fn insert_nat(&mut self, ip: IpAddr, behind: Option<HostId>, config: NatConfig) -> HostId {
        self.nats += 1;
        let n = self.nats;
        let subnet = if n < 256 {
            u32::from(FIRST_NAT_SUBNET) + ((n - 1) << 8)
        } else {
            u32::from(Ipv4Addr::new(172, 16, 0, 0)).wrapping_add((n - 256) << 8)
        };
        let id = self.insert_host(ip);
        let key = 0x4e41_5400_0000_0000 | u64::from(id.0);
        let host = &mut self.hosts[id.index()];
        host.behind = behind;
        host.nat = Some(Box::new(NatBox {
            table: NatTable::new(config, ip, derive_seed(self.seed, key)),
            next_inside: subnet + 2,
        }));
        id
    }

    /// The next free address inside `nat`'s subnet.
    fn allocate_inside(&mut self, nat: HostId) -> IpAddr {
        loop {
            let Some(next) = self.hosts[nat.index()]
                .nat
                .as_mut()
                .map(|n| &mut n.next_inside)
            else {
                // Only called with NAT ids; fall back to a public address.
                return self.allocate_ip(false);
            };
            let candidate = Ipv4Addr::from(*next);
            *next = next.wrapping_add(1);
            let last = candidate.octets()[3];
            let ip = IpAddr::V4(candidate);
            if last > 1 && last != 255 && self.check_ip(ip).is_ok() {
                return ip;
            }
        }
    }

    fn move_host(&mut self, host: HostId, ip: IpAddr) {
        let old = std::mem::replace(&mut self.hosts[host.index()].ip, ip);
        self.by_ip.remove(&old);
        self.by_ip.insert(ip, host);
        for (&id, socket) in &self.sockets {
            if socket.host == host {
                self.bound.remove(&SocketAddr::new(old, socket.port));
                self.bound.insert(SocketAddr::new(ip, socket.port), id);
            }
        }
    }

    fn bind(&mut self, host: HostId, port: u16) -> io::Result<SocketId> {
        let ip = self.hosts[host.index()].ip;
        let port = if port != 0 {
            if self.bound.contains_key(&SocketAddr::new(ip, port)) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("netsim: {ip}:{port} is already bound"),
                ));
            }
            port
        } else {
            let h = &mut self.hosts[host.index()];
            let span = u16::MAX - EPHEMERAL_PORTS_START + 1;
            let mut found = None;
            for _ in 0..span {
                let candidate = h.next_port;
                h.next_port = if candidate == u16::MAX {
                    EPHEMERAL_PORTS_START
                } else {
                    candidate + 1
                };
                if !self.bound.contains_key(&SocketAddr::new(ip, candidate)) {
                    found = Some(candidate);
                    break;
                }
            }
            found.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("netsim: no free ephemeral port on {ip}"),
                )
            })?
        };
        let id = self.next_socket;
        self.next_socket += 1;
        self.sockets.insert(
            id,
            SocketState {
                host,
                port,
                inbox: VecDeque::new(),
                inbox_bytes: 0,
                waker: None,
            },
        );
        self.bound.insert(SocketAddr::new(ip, port), id);
        Ok(id)
    }

    pub(crate) fn unbind(&mut self, id: SocketId) {
        let Some(socket) = self.sockets.remove(&id) else {
            return;
        };
        let addr = SocketAddr::new(self.hosts[socket.host.index()].ip, socket.port);
        if self.bound.get(&addr) == Some(&id) {
            self.bound.remove(&addr);
        }
        // What the socket had received but nobody read is lost with it.
        for packet in socket.inbox {
            if let Some(link) = self.links.get_mut(&packet.link) {
                link.counters.dropped.record(DropCause::NoRoute);
            }
        }
    }

    pub(crate) fn socket_addr(&self, id: SocketId) -> Option<SocketAddr> {
        let socket = self.sockets.get(&id)?;
        Some(SocketAddr::new(
            self.hosts[socket.host.index()].ip,
            socket.port,
        ))
    }

    fn link_mut(&mut self, from: HostId, to: HostId) -> &mut Link {
        let seed = self.seed;
        self.links
            .entry((from, to))
            .or_insert_with(|| Link::new(seed, from, to))
    }

    /// Offers one datagram to the network. Returns true if the router must wake up earlier
    /// than it planned to.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        socket: SocketId,
        dest: SocketAddr,
        ecn: Option<EcnCodepoint>,
        payload: &[u8],
    ) -> bool {
        let Some(src) = self.socket_addr(socket) else {
            return false;
        };
        let Some(src_host) = self.sockets.get(&socket).map(|s| s.host) else {
            return false;
        };
        let behind = self.hosts[src_host.index()].behind;
        self.forward(now, src_host, behind, src, dest, ecn, payload)
    }

    /// Sends a datagram from `from`, which sits in the realm behind NAT `realm` (`None`: the
    /// public network), towards `dest`: straight to a host or NAT of the same realm, else up
    /// through the realm's NAT. Returns true if the router must wake up earlier.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        now: Instant,
        from: HostId,
        realm: Option<HostId>,
        src: SocketAddr,
        dest: SocketAddr,
        ecn: Option<EcnCodepoint>,
        payload: &[u8],
    ) -> bool {
        let next = self.by_ip.get(&dest.ip()).copied().and_then(|target| {
            if self.hosts[target.index()].behind == realm {
                Some(target)
            } else {
                // A NAT forwarding inwards has nowhere further up to send.
                realm.filter(|&gateway| gateway != from)
            }
        });
        let Some(next) = next else {
            let host = &mut self.hosts[from.index()];
            host.unrouted.sent += 1;
            host.unrouted.sent_bytes += payload.len() as u64;
            host.unrouted.dropped.record(if host.up {
                DropCause::NoRoute
            } else {
                DropCause::HostDown
            });
            tracing::trace!(%src, %dest, "netsim: no route to destination");
            return false;
        };
        self.transmit(now, (from, next), src, dest, ecn, payload)
    }

    /// Offers a datagram to the link `from -> to`.
    fn transmit(
        &mut self,
        now: Instant,
        (src_host, dst_host): (HostId, HostId),
        src: SocketAddr,
        dest: SocketAddr,
        ecn: Option<EcnCodepoint>,
        payload: &[u8],
    ) -> bool {
        let len = payload.len() as u64;
        // A NAT and what sits directly behind it share a box or a LAN: ideal unless set.
        let lan = src_host == dst_host
            || self.hosts[src_host.index()].behind == Some(dst_host)
            || self.hosts[dst_host.index()].behind == Some(src_host);
        let hosts_up = self.hosts[src_host.index()].up && self.hosts[dst_host.index()].up;
        let partitioned = self.partitioned(src_host, dst_host);
        let seed = self.seed;
        let State {
            links,
            default_link,
            loopback,
            in_flight,
            next_seq,
            router_deadline,
            ..
        } = self;
        let link = links
            .entry((src_host, dst_host))
            .or_insert_with(|| Link::new(seed, src_host, dst_host));
        link.counters.sent += 1;
        link.counters.sent_bytes += len;
        if !hosts_up {
            link.counters.dropped.record(DropCause::HostDown);
            return false;
        }
        if partitioned {
            link.counters.dropped.record(DropCause::Partition);
            return false;
        }
        let config = match &link.config {
            Some(config) => config,
            None if lan => loopback,
            None => default_link,
        };
        let header = if dest.is_ipv4() {
            IPV4_UDP_HEADER
        } else {
            IPV6_UDP_HEADER
        };
        let copies = 1 + usize::from(config.duplicate > 0.0);
        if link.in_flight_bytes + copies * payload.len() > MAX_IN_FLIGHT_BYTES {
            link.counters.dropped.record(DropCause::QueueFull);
            return false;
        }
        let (at, copy) = match link.engine.transmit(config, now, payload.len(), header) {
            Verdict::Drop(cause) => {
                tracing::trace!(%src, %dest, ?cause, "netsim: dropped");
                link.counters.dropped.record(cause);
                return false;
            }
            Verdict::Deliver { at, copy } => (at, copy),
        };
        let data = Bytes::copy_from_slice(payload);
        let mut schedule = |at: Instant, data: Bytes| {
            link.in_flight_bytes += data.len();
            in_flight.push(InFlight {
                at,
                seq: *next_seq,
                packet: Received {
                    link: (src_host, dst_host),
                    src,
                    dst: dest,
                    ecn,
                    data,
                },
            });
            *next_seq += 1;
        };
        if let Some(copy_at) = copy {
            schedule(at, data.clone());
            schedule(copy_at, data);
            link.counters.duplicated += 1;
        } else {
            schedule(at, data);
        }
        if router_deadline.is_none_or(|deadline| at < deadline) {
            *router_deadline = Some(at);
            true
        } else {
            false
        }
    }

    fn partitioned(&self, a: HostId, b: HostId) -> bool {
        self.partitions
            .iter()
            .any(|(x, y)| (x.contains(&a) && y.contains(&b)) || (x.contains(&b) && y.contains(&a)))
    }

    /// Moves every datagram due at `now` to its socket; returns the readers to wake.
    fn deliver_due(&mut self, now: Instant, wake: &mut Vec<Waker>) {
        while self.in_flight.peek().is_some_and(|p| p.at <= now) {
            let Some(InFlight { packet, .. }) = self.in_flight.pop() else {
                break;
            };
            let (_, dst_host) = packet.link;
            if let Some(link) = self.links.get_mut(&packet.link) {
                link.in_flight_bytes -= packet.data.len();
            }
            let cause = if !self.hosts[dst_host.index()].up {
                Some(DropCause::HostDown)
            } else if self.partitioned(packet.link.0, dst_host) {
                Some(DropCause::Partition)
            } else if self.hosts[dst_host.index()].nat.is_some() {
                self.arrive_at_nat(now, packet);
                continue;
            } else {
                match self
                    .bound
                    .get(&packet.dst)
                    .and_then(|id| self.sockets.get_mut(id))
                {
                    None => Some(DropCause::NoRoute),
                    Some(socket) if socket.inbox_bytes + packet.data.len() > RECV_BUFFER_BYTES => {
                        Some(DropCause::RecvBuffer)
                    }
                    Some(socket) => {
                        socket.inbox_bytes += packet.data.len();
                        socket.inbox.push_back(packet);
                        if let Some(waker) = socket.waker.take() {
                            wake.push(waker);
                        }
                        continue;
                    }
                }
            };
            if let Some(cause) = cause {
                tracing::trace!(src = %packet.src, dst = %packet.dst, ?cause, "netsim: dropped on arrival");
                if let Some(link) = self.links.get_mut(&packet.link) {
                    link.counters.dropped.record(cause);
                }
            }
        }
        self.router_deadline = self.in_flight.peek().map(|p| p.at);
    }

    /// A datagram reached a NAT: translate it and send it on from the NAT, at once. What the
    /// NAT forwards over an ideal link is due now, so `deliver_due` moves it on in the same
    /// pass.
    fn arrive_at_nat(&mut self, now: Instant, packet: Received) {
        let (from, nat_id) = packet.link;
        if let Some(link) = self.links.get_mut(&packet.link) {
            link.counters.delivered += 1;
            link.counters.delivered_bytes += packet.data.len() as u64;
        }
        let from_inside = self.hosts[from.index()].behind == Some(nat_id);
        let outer = self.hosts[nat_id.index()].behind;
        let Some(nat) = self.hosts[nat_id.index()].nat.as_mut() else {
            return;
        };
        match nat
            .table
            .translate(now, from_inside, packet.src, packet.dst)
        {
            Ok(t) => {
                let realm = if t.inward { Some(nat_id) } else { outer };
                self.forward(now, nat_id, realm, t.src, t.dst, packet.ecn, &packet.data);
            }
            Err(cause) => {
                tracing::trace!(src = %packet.src, dst = %packet.dst, ?cause, "netsim: dropped by NAT");
            }
        }
    }

    /// Fills `bufs`/`meta` from the socket's receive buffer, or registers `cx` to be woken.
    pub(crate) fn recv(
        &mut self,
        id: SocketId,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let Some(socket) = self.sockets.get_mut(&id) else {
            return Poll::Pending;
        };
        let mut filled = 0;
        let slots = bufs.len().min(meta.len());
        while filled < slots {
            let Some(packet) = socket.inbox.pop_front() else {
                break;
            };
            let len = packet.data.len();
            socket.inbox_bytes -= len;
            let Some(link) = self.links.get_mut(&packet.link) else {
                continue;
            };
            let Some(buf) = bufs[filled].get_mut(..len) else {
                link.counters.dropped.record(DropCause::Truncated);
                continue;
            };
            buf.copy_from_slice(&packet.data);
            meta[filled] = RecvMeta {
                addr: packet.src,
                len,
                stride: len,
                ecn: packet.ecn,
                dst_ip: Some(packet.dst.ip()),
            };
            link.counters.delivered += 1;
            link.counters.delivered_bytes += len as u64;
            filled += 1;
        }
        if filled > 0 {
            Poll::Ready(filled)
        } else {
            match &mut socket.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }
}

impl Link {
    fn new(seed: u64, from: HostId, to: HostId) -> Self {
        let key = (u64::from(from.0) << 32) | u64::from(to.0);
        Self {
            config: None,
            engine: LinkEngine::new(derive_seed(seed, key)),
            counters: Counters::default(),
            in_flight_bytes: 0,
        }
    }

    fn snapshot(&self, now: Instant) -> Counters {
        Counters {
            queued_bytes: self.engine.queued_bytes(now) as u64,
            ..self.counters
        }
    }
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    /// Reversed, so that the max-heap pops the earliest arrival (then the earliest sent).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The router: sleeps until the earliest arrival (or until a sender schedules an earlier
/// one), moves due datagrams into their sockets and wakes the readers. Holds the network only
/// weakly, so it exits once the network is dropped.
async fn route(network: Weak<Inner>, wake: Arc<Notify>) {
    let mut readers = Vec::new();
    loop {
        let deadline = {
            let Some(inner) = network.upgrade() else {
                return;
            };
            let mut state = inner.lock();
            state.deliver_due(Instant::now(), &mut readers);
            state.router_deadline
        };
        for reader in readers.drain(..) {
            reader.wake();
        }
        match deadline {
            Some(deadline) => {
                tokio::select! {
                    biased;
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
