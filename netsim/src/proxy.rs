//! A UDP relay between real sockets that impairs traffic with the same link engine as the
//! virtual network, so real binaries can be run over a bad link on loopback.
//!
//! Clients send to the proxy's listen address; for each client address the proxy opens its own
//! socket towards the upstream (as a NAT would), so replies find their way back. Both
//! directions get the same [`LinkConfig`], each with its own queue, loss state and random
//! stream. Time is tokio's, normally the real clock.

use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::counters::{Counters, DropCause};
use crate::link::{
    IPV4_UDP_HEADER, IPV6_UDP_HEADER, LinkConfig, LinkConfigError, LinkEngine, Verdict,
};
use crate::rng::derive_seed;

/// Most client addresses the proxy relays for at once; datagrams from further clients are
/// dropped ([`Drops::no_route`](crate::Drops::no_route)).
pub const MAX_CLIENTS: usize = 1024;
/// Datagrams read from upstream sockets and waiting for the relay loop.
pub const UPSTREAM_CHANNEL_DATAGRAMS: usize = 1024;
/// Payload bytes scheduled for later delivery (both directions) before new datagrams are
/// dropped as [`Drops::queue_full`](crate::Drops::queue_full).
pub const MAX_SCHEDULED_BYTES: usize = 32 * 1024 * 1024;

const MAX_DATAGRAM: usize = 65_535;

/// What the proxy relays and how it impairs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Address clients send to.
    pub listen: SocketAddr,
    /// Address datagrams are relayed to.
    pub upstream: SocketAddr,
    /// Conditions applied to each direction.
    pub link: LinkConfig,
    /// Seed of every random decision.
    pub seed: u64,
}

/// The proxy's counters, one set per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    /// Datagrams from clients towards the upstream.
    pub to_upstream: Counters,
    /// Datagrams from the upstream back to clients.
    pub to_client: Counters,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The link conditions cannot be simulated.
    #[error("invalid link conditions")]
    Link(#[from] LinkConfigError),
    /// The listen socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
}

/// A proxy bound to its listen address, ready to [`run`](Self::run).
#[derive(Debug)]
pub struct Proxy {
    config: ProxyConfig,
    listen: Arc<UdpSocket>,
}

/// Binds and runs a proxy until `shutdown` completes; returns its counters.
pub async fn run(
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ProxyCounters, ProxyError> {
    Ok(Proxy::bind(config).await?.run(shutdown).await)
}

impl Proxy {
    /// Validates the link conditions and binds the listen socket (port 0 picks a free port).
    pub async fn bind(config: ProxyConfig) -> Result<Self, ProxyError> {
        config.link.validate()?;
        let listen = UdpSocket::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(Self {
            config,
            listen: Arc::new(listen),
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    /// Relays until `shutdown` completes, then returns the counters. Datagrams still
    /// scheduled at shutdown are discarded.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> ProxyCounters {
        let mut relay = Relay::new(self.config, self.listen);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        tokio::pin!(shutdown);
        loop {
            let next = relay.schedule.peek().map(|s| s.at);
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = sleep_until(next) => relay.send_due(Instant::now()),
                received = relay.listen.recv_from(&mut buf) => match received {
                    Ok((len, client)) => relay.relay_to_upstream(client, &buf[..len]).await,
                    Err(error) => tracing::debug!(%error, "proxy: receive on the listen socket failed"),
                },
                Some((client, data)) = relay.upstream_rx.recv() => relay.relay_to_client(client, data),
            }
        }
        relay.counters()
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToUpstream,
    ToClient,
}

struct Scheduled {
    at: Instant,
    seq: u64,
    direction: Direction,
    client: SocketAddr,
    data: Bytes,
}

struct Relay {
    config: ProxyConfig,
    listen: Arc<UdpSocket>,
    to_upstream: LinkEngine,
    to_client: LinkEngine,
    counters: ProxyCounters,
    clients: HashMap<SocketAddr, Arc<UdpSocket>>,
    readers: JoinSet<()>,
    upstream_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    upstream_rx: mpsc::Receiver<(SocketAddr, Bytes)>,
    schedule: BinaryHeap<Scheduled>,
    scheduled_bytes: usize,
    next_seq: u64,
}

impl Relay {
    fn new(config: ProxyConfig, listen: Arc<UdpSocket>) -> Self {
        let (upstream_tx, upstream_rx) = mpsc::channel(UPSTREAM_CHANNEL_DATAGRAMS);
        Self {
            to_upstream: LinkEngine::new(derive_seed(config.seed, 0)),
            to_client: LinkEngine::new(derive_seed(config.seed, 1)),
            config,
            listen,
            counters: ProxyCounters::default(),
            clients: HashMap::new(),
            readers: JoinSet::new(),
            upstream_tx,
            upstream_rx,
            schedule: BinaryHeap::new(),
            scheduled_bytes: 0,
            next_seq: 0,
        }
    }

    async fn relay_to_upstream(&mut self, client: SocketAddr, data: &[u8]) {
        if !self.clients.contains_key(&client) {
            if self.clients.len() >= MAX_CLIENTS {
                record_drop(
                    &mut self.counters.to_upstream,
                    data.len(),
                    DropCause::NoRoute,
                );
                return;
            }
            match self.open_upstream(client).await {
                Ok(socket) => {
                    self.clients.insert(client, socket);
                }
                Err(error) => {
                    tracing::warn!(%client, %error, "proxy: cannot open a socket towards the upstream");
                    record_drop(
                        &mut self.counters.to_upstream,
                        data.len(),
                        DropCause::NoRoute,
                    );
                    return;
                }
            }
        }
        self.impair(Direction::ToUpstream, client, data);
    }

    fn relay_to_client(&mut self, client: SocketAddr, data: Bytes) {
        self.impair(Direction::ToClient, client, &data);
    }

    /// A socket per client towards the upstream, and a task that feeds its replies back.
    async fn open_upstream(&mut self, client: SocketAddr) -> io::Result<Arc<UdpSocket>> {
        let local: SocketAddr = if self.config.upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(self.config.upstream).await?;
        let socket = Arc::new(socket);
        let reader = socket.clone();
        let tx = self.upstream_tx.clone();
        self.readers.spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match reader.recv(&mut buf).await {
                    Ok(len) => {
                        let data = Bytes::copy_from_slice(&buf[..len]);
                        if tx.send((client, data)).await.is_err() {
                            return;
                        }
                    }
                    // An ICMP error from an earlier send (upstream not listening): keep going.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                        ) => {}
                    Err(error) => {
                        tracing::warn!(%client, %error, "proxy: upstream socket failed");
                        return;
                    }
                }
            }
        });
        Ok(socket)
    }

    fn impair(&mut self, direction: Direction, client: SocketAddr, data: &[u8]) {
        let (engine, counters, dest) = match direction {
            Direction::ToUpstream => (
                &mut self.to_upstream,
                &mut self.counters.to_upstream,
                self.config.upstream,
            ),
            Direction::ToClient => (&mut self.to_client, &mut self.counters.to_client, client),
        };
        counters.sent += 1;
        counters.sent_bytes += data.len() as u64;
        if self.scheduled_bytes + data.len() > MAX_SCHEDULED_BYTES {
            counters.dropped.record(DropCause::QueueFull);
            return;
        }
        let header = if dest.is_ipv4() {
            IPV4_UDP_HEADER
        } else {
            IPV6_UDP_HEADER
        };
        let (at, copy) =
            match engine.transmit(&self.config.link, Instant::now(), data.len(), header) {
                Verdict::Drop(cause) => {
                    counters.dropped.record(cause);
                    return;
                }
                Verdict::Deliver { at, copy } => (at, copy),
            };
        let data = Bytes::copy_from_slice(data);
        let copies = if copy.is_some() {
            counters.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.scheduled_bytes += data.len();
            self.schedule.push(Scheduled {
                at,
                seq: self.next_seq,
                direction,
                client,
                data: data.clone(),
            });
            self.next_seq += 1;
        }
    }

    fn send_due(&mut self, now: Instant) {
        while self.schedule.peek().is_some_and(|s| s.at <= now) {
            let Some(s) = self.schedule.pop() else {
                break;
            };
            self.scheduled_bytes -= s.data.len();
            let (result, counters) = match s.direction {
                Direction::ToUpstream => match self.clients.get(&s.client) {
                    Some(socket) => (socket.try_send(&s.data), &mut self.counters.to_upstream),
                    None => (
                        Err(io::ErrorKind::NotFound.into()),
                        &mut self.counters.to_upstream,
                    ),
                },
                Direction::ToClient => (
                    self.listen.try_send_to(&s.data, s.client),
                    &mut self.counters.to_client,
                ),
            };
            match result {
                Ok(_) => {
                    counters.delivered += 1;
                    counters.delivered_bytes += s.data.len() as u64;
                }
                Err(error) => {
                    tracing::debug!(client = %s.client, %error, "proxy: send failed");
                    let cause = if error.kind() == io::ErrorKind::WouldBlock {
                        DropCause::QueueFull
                    } else {
                        DropCause::NoRoute
                    };
                    counters.dropped.record(cause);
                }
            }
        }
    }

    fn counters(&self) -> ProxyCounters {
        let now = Instant::now();
        let mut counters = self.counters;
        counters.to_upstream.queued_bytes = self.to_upstream.queued_bytes(now) as u64;
        counters.to_client.queued_bytes = self.to_client.queued_bytes(now) as u64;
        counters
    }
}

fn record_drop(counters: &mut Counters, len: usize, cause: DropCause) {
    counters.sent += 1;
    counters.sent_bytes += len as u64;
    counters.dropped.record(cause);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed, so that the max-heap pops the earliest departure.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl fmt::Display for ProxyCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "client -> upstream: {}", self.to_upstream)?;
        write!(f, "upstream -> client: {}", self.to_client)
    }
}
