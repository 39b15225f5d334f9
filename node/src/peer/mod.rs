//! The node's peer connections: other nodes of the mesh, reached directly through NATs or
//! relayed by the anchor, under the operator's policy.
//!
//! [`Peers`] owns them. It shares the node's one QUIC endpoint (and so its UDP socket, a
//! [`MeshSocket`]) with the connection to the anchor, so the NAT mapping the anchor observes is
//! the one a peer reaches. What it holds:
//!
//! - **The directory** ([`directory`]): the peers the policy lets this node reach or be reached
//!   by, with what each side may do ([`PeerEntry::outbound`], [`PeerEntry::inbound`]), as the
//!   anchor last sent it, saved in `peers.json` with each peer's last addresses and pair token.
//! - **Connections**, at most one per peer. Dialing a peer asks the anchor for a rendezvous
//!   (both sides get each other's candidates and start probing at once) and connects to the
//!   peer's stable socket address at once: the first packets go through the anchor's relay, and
//!   the socket moves the connection to a direct path as soon as a probe gets through, and back
//!   when it dies, under the same QUIC connection. When both sides dial at once, the
//!   connection dialed by the smaller device id is kept.
//! - **Checks.** The TLS handshake checks the CA, the device id and the revocation set the
//!   node holds ([`anchorage_mesh::peer_tls`]). After it, a caller the directory does not list
//!   is closed with `not_allowed`. Every call and every tunnel is checked against the caller's
//!   inbound grant; a policy change or revocation closes what is no longer allowed, at once.
//! - **Without the anchor** the directory, revocation set, addresses and tokens held are
//!   enough: established connections carry on, and a peer whose addresses are known is dialed
//!   directly.

pub mod directory;
pub mod tunnel;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anchorage_mesh::framed::{FramedRecv, FramedSend, close};
use anchorage_mesh::peer_tls::{
    PEER_HANDSHAKE_TIMEOUT, PeerTls, peer_client_config, peer_device, peer_server_config,
};
use anchorage_mesh::tls::peer_cert_info;
use anchorage_wire::control::ControlUp;
use anchorage_wire::invoke::{InvocationId, InvokeReply, InvokeRequest, InvokeResult, Outcome};
use anchorage_wire::peer::{
    Candidates, Directory as DirectoryMsg, PathKind, PathReport, PeerEntry, PeerOpen, PeerPath,
    Punch, RendezvousRequest, ServiceList, TunnelOpen, TunnelReply, Unreachable,
};
use anchorage_wire::{DeviceId, ErrorCode, PEER_SERVER_NAME, PROTOCOL_VERSION};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::capability::Registry;
use crate::invoke::{Counters, Seen, handle_invocation};
use crate::mesh::socket::MeshSocket;
use crate::state::StateDir;
use directory::{Applied, Directory, SavedPeer, SavedPeers, token_from_hex, token_hex};

/// How long a dial waits for the anchor's punch before it connects anyway.
pub const PUNCH_WAIT: Duration = Duration::from_secs(3);
/// How long a callee waits for the first frame of a stream.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Path reports to the anchor are sent at most this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Messages to the anchor queued while its session is busy (or away); more are dropped.
pub const UPLINK_QUEUE: usize = 256;
/// Largest output a peer call asks for.
pub const CALL_OUTPUT_LIMIT: u32 = anchorage_wire::limits::MAX_INVOKE_OUTPUT as u32;

/// Why a peer could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The name does not name one peer of the directory.
    #[error(transparent)]
    Resolve(#[from] directory::ResolveError),
    /// The policy does not let this node do that.
    #[error("not allowed by policy: {0}")]
    NotAllowed(String),
    /// The peer cannot be reached now.
    #[error("{0}")]
    Unreachable(String),
    /// The connection failed or was closed.
    #[error("the connection to the peer failed: {0}")]
    Connection(String),
    /// The peer did not answer in time.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The peer broke the protocol.
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
}

impl PeerError {
    /// A short stable code for JSON answers.
    pub fn code(&self) -> &'static str {
        match self {
            PeerError::Resolve(directory::ResolveError::NotFound { .. }) => "not_found",
            PeerError::Resolve(directory::ResolveError::Ambiguous { .. }) => "ambiguous",
            PeerError::NotAllowed(_) => "not_allowed",
            PeerError::Unreachable(_) => "unreachable",
            PeerError::Connection(_) => "connection_failed",
            PeerError::TimedOut(_) => "timed_out",
            PeerError::Protocol(_) => "protocol",
        }
    }
}

/// What the node counts about its peers.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Peer connections established (dialed or accepted).
    pub connections: AtomicU64,
    /// Connections refused or closed because the policy does not allow them.
    pub refused: AtomicU64,
    /// Calls served.
    pub calls_served: AtomicU64,
    /// Calls refused by policy.
    pub calls_refused: AtomicU64,
    /// Tunnels served.
    pub tunnels_served: AtomicU64,
    /// Duplicate call ids.
    pub duplicates: AtomicU64,
    /// Calls whose deadline passed.
    pub expired: AtomicU64,
    /// Calls run.
    pub run: AtomicU64,
}

/// One peer as `anchor-node peers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Device id.
    pub device_id: DeviceId,
    /// Name.
    pub name: String,
    /// `direct`, `relayed` or `none`.
    pub path: &'static str,
    /// The peer's address on a direct path.
    pub addr: Option<String>,
    /// Round-trip time of the connection, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Share of packets lost on the connection (0 to 1).
    pub loss: Option<f64>,
    /// Since when the path has been what it is (RFC 3339).
    pub since: Option<String>,
    /// Whether a connection is up.
    pub connected: bool,
    /// Services it exposes.
    pub services: Vec<String>,
    /// Capability patterns this node may call there.
    pub may_call: Vec<String>,
    /// Service patterns this node may open there.
    pub may_open: Vec<String>,
    /// Capability patterns it may call here.
    pub may_call_here: Vec<String>,
}

/// A service this node exposes to its peers.
#[derive(Debug, Clone)]
struct Exposed {
    target: SocketAddr,
    /// Which `expose` it came from (a guard only removes its own).
    id: u64,
}

/// A tunnel being served, for cutting it off when the policy stops allowing it.
#[derive(Debug)]
struct Served {
    peer: DeviceId,
    service: String,
    abort: tokio::task::AbortHandle,
}

#[derive(Debug)]
struct Link {
    conn: quinn::Connection,
    dialer: DeviceId,
    since: SystemTime,
}

#[derive(Debug, Default)]
struct Inner {
    directory: Directory,
    links: HashMap<DeviceId, Link>,
    punch_waiters: HashMap<DeviceId, Vec<oneshot::Sender<Result<(), String>>>>,
    exposed: BTreeMap<String, Exposed>,
    served: HashMap<u64, Served>,
    next_id: u64,
}

/// The node's peers. See the module docs.
#[derive(Debug)]
pub struct Peers {
    me: DeviceId,
    socket: Arc<MeshSocket>,
    endpoint: quinn::Endpoint,
    tls: RwLock<PeerTls>,
    state: StateDir,
    registry: Registry,
    permits: Arc<Semaphore>,
    seen: Mutex<Seen>,
    inner: Mutex<Inner>,
    /// Dials in progress, one per peer (concurrent callers share it).
    dialing: Mutex<HashMap<DeviceId, Arc<tokio::sync::Mutex<()>>>>,
    uplink: mpsc::Sender<ControlUp>,
    anchor_up: AtomicBool,
    changed: watch::Sender<u64>,
    /// Counters.
    pub stats: PeerStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(t: SystemTime) -> Option<String> {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

impl Peers {
    /// The peers of a node whose endpoint runs on `socket`, with what it holds from last
    /// time (`peers.json`). The returned receiver carries what must go to the anchor; the agent
    /// forwards it on the control stream of whichever session is up.
    pub fn new(
        me: DeviceId,
        socket: Arc<MeshSocket>,
        endpoint: quinn::Endpoint,
        tls: PeerTls,
        state: StateDir,
        registry: Registry,
        max_concurrent: usize,
    ) -> Result<(Arc<Peers>, mpsc::Receiver<ControlUp>), anchorage_mesh::tls::TlsError> {
        endpoint.set_server_config(Some(peer_server_config(&tls)?));
        let (uplink, uplink_rx) = mpsc::channel(UPLINK_QUEUE);
        let mut inner = Inner::default();
        match directory::load(&state) {
            Ok(Some(saved)) => {
                inner.directory = saved.directory();
                for p in &saved.peers {
                    if let Some(token) = p.token.as_deref().and_then(token_from_hex)
                        && !p.addrs.is_empty()
                    {
                        socket.set_candidates(p.entry.device_id, p.addrs.clone(), token);
                    }
                }
                debug!(peers = saved.peers.len(), "peers from last time");
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the saved peers; waiting for the anchor's directory")
            }
        }
        let peers = Arc::new(Peers {
            me,
            socket,
            endpoint,
            tls: RwLock::new(tls),
            state,
            registry,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            seen: Mutex::new(Seen::default()),
            inner: Mutex::new(inner),
            dialing: Mutex::new(HashMap::new()),
            uplink,
            anchor_up: AtomicBool::new(false),
            changed: watch::Sender::new(0),
            stats: PeerStats::default(),
        });
        Ok((peers, uplink_rx))
    }

    /// Accepts peers and reports paths until the endpoint closes.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.accept_loop().await });
        let me = Arc::downgrade(self);
        let mut paths = self.socket.path_changes();
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = paths.changed() => if r.is_err() { return },
                    r = changed.changed() => if r.is_err() { return },
                }
                let Some(peers) = me.upgrade() else { return };
                peers.report_paths();
                drop(peers);
                tokio::time::sleep(REPORT_EVERY).await;
            }
        });
    }

    /// This node's device id.
    pub fn me(&self) -> DeviceId {
        self.me
    }

    /// The node's certificate changed (renewal): peers see the new one from the next
    /// handshake.
    pub fn set_tls(&self, tls: PeerTls) {
        match peer_server_config(&tls) {
            Ok(c) => self.endpoint.set_server_config(Some(c)),
            Err(e) => warn!(error = %e, "cannot use the renewed certificate for peers"),
        }
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
    }

    /// A session with an anchor began (`Some`: what the node's socket is bound to, to report
    /// as candidates) or ended (`None`).
    pub fn anchor(&self, candidates: Option<Vec<SocketAddr>>) {
        match candidates {
            Some(addrs) => {
                self.anchor_up.store(true, Ordering::Relaxed);
                self.send_up(ControlUp::Candidates(Candidates {
                    addrs: addrs.iter().map(ToString::to_string).collect(),
                }));
                self.send_up(ControlUp::Services(ServiceList {
                    names: lock(&self.inner).exposed.keys().cloned().collect(),
                }));
                self.report_paths();
            }
            None => {
                self.anchor_up.store(false, Ordering::Relaxed);
                // Nobody will answer a rendezvous now.
                let waiters: Vec<_> = lock(&self.inner).punch_waiters.drain().collect();
                for (_, list) in waiters {
                    for w in list {
                        let _ = w.send(Err("the anchor went away".into()));
                    }
                }
            }
        }
    }

    fn send_up(&self, msg: ControlUp) {
        if self.uplink.try_send(msg).is_err() {
            debug!("the anchor's queue is full; a mesh message was dropped");
        }
    }

    /// The anchor's directory arrived (or a chunk of it): once whole, what is no longer
    /// allowed is closed and the directory saved.
    pub fn on_directory(&self, msg: DirectoryMsg) {
        let mut inner = lock(&self.inner);
        if inner.directory.apply(msg) != Applied::Replaced {
            return;
        }
        info!(
            peers = inner.directory.len(),
            policy_version = inner.directory.policy_version(),
            "the peer directory changed"
        );
        let mut cut = Vec::new();
        for (device, link) in &inner.links {
            let allowed = inner
                .directory
                .get(device)
                .is_some_and(|e| !(e.outbound.is_empty() && e.inbound.is_empty()));
            if !allowed {
                cut.push((*device, link.conn.clone()));
            }
        }
        for (device, conn) in cut {
            info!(peer = %device, "the policy no longer allows this peer; closing");
            close(&conn, ErrorCode::NotAllowed, "no longer allowed by policy");
            inner.links.remove(&device);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        let stale: Vec<u64> = inner
            .served
            .iter()
            .filter(|(_, s)| {
                !inner
                    .directory
                    .get(&s.peer)
                    .is_some_and(|e| e.inbound.allows_service(&s.service))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(s) = inner.served.remove(&id) {
                info!(peer = %s.peer, service = %s.service, "the policy no longer allows this tunnel; closing");
                s.abort.abort();
            }
        }
        drop(inner);
        self.save();
        self.changed.send_modify(|g| *g += 1);
    }

    /// The held revocation set changed: connections of revoked peers close at once.
    pub fn on_revoked(&self, revoked: &dyn anchorage_mesh::tls::RevocationCheck) {
        let mut inner = lock(&self.inner);
        let gone: Vec<DeviceId> = inner
            .links
            .iter()
            .filter(|(_, l)| {
                peer_cert_info(&l.conn).is_some_and(|i| revoked.is_revoked(&i.key_id, &i.serial))
            })
            .map(|(d, _)| *d)
            .collect();
        for device in gone {
            if let Some(link) = inner.links.remove(&device) {
                info!(peer = %device, "the peer was revoked; closing");
                close(&link.conn, ErrorCode::Revoked, "revoked");
            }
        }
    }

    /// The anchor's punch: probe the peer's candidates now.
    pub fn on_punch(&self, punch: Punch) {
        let addrs: Vec<SocketAddr> = punch.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if lock(&self.inner).directory.get(&punch.peer).is_none() {
            debug!(peer = %punch.peer, "a punch for a peer outside the directory; ignored");
            return;
        }
        debug!(peer = %punch.peer, ?addrs, "punching");
        self.socket.set_candidates(punch.peer, addrs, punch.token);
        let waiters = lock(&self.inner).punch_waiters.remove(&punch.peer);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(Ok(()));
        }
        self.save();
    }

    /// The anchor cannot introduce this node to a peer.
    pub fn on_unreachable(&self, u: Unreachable) {
        let waiters = lock(&self.inner).punch_waiters.remove(&u.peer);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(Err(u.reason.clone()));
        }
    }

    /// The peer a user means (device id, unique prefix or name).
    pub fn resolve(&self, query: &str) -> Result<DeviceId, PeerError> {
        Ok(lock(&self.inner).directory.resolve(query)?)
    }

    fn entry(&self, peer: &DeviceId) -> Option<PeerEntry> {
        lock(&self.inner).directory.get(peer).cloned()
    }

    /// The live connection to `peer`, dialing it if there is none.
    pub async fn connect(self: &Arc<Self>, peer: DeviceId) -> Result<quinn::Connection, PeerError> {
        if let Some(c) = self.live(&peer) {
            return Ok(c);
        }
        let gate = lock(&self.dialing).entry(peer).or_default().clone();
        let _dialing = gate.lock().await;
        if let Some(c) = self.live(&peer) {
            return Ok(c);
        }
        let Some(entry) = self.entry(&peer) else {
            return Err(PeerError::NotAllowed(format!(
                "{peer} is not in this node's directory"
            )));
        };
        self.rendezvous(peer).await?;
        let config = {
            let tls = self.tls.read().unwrap_or_else(|e| e.into_inner());
            peer_client_config(&tls, peer).map_err(|e| PeerError::Connection(e.to_string()))?
        };
        let addr = self.socket.peer_addr(peer);
        let connecting = self
            .endpoint
            .connect_with(config, addr, PEER_SERVER_NAME)
            .map_err(|e| PeerError::Connection(e.to_string()))?;
        let conn = match tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(PeerError::Connection(e.to_string())),
            Err(_) => {
                return Err(PeerError::Unreachable(format!(
                    "{} ({peer}) did not answer within {PEER_HANDSHAKE_TIMEOUT:?}",
                    entry.name
                )));
            }
        };
        info!(peer = %peer, name = %entry.name, "connected to a peer");
        Ok(self.adopt(conn, peer, self.me))
    }

    /// Asks the anchor to introduce us; without an anchor, saved addresses are enough.
    async fn rendezvous(&self, peer: DeviceId) -> Result<(), PeerError> {
        let known = self.socket.candidates(peer).is_some();
        if !self.anchor_up.load(Ordering::Relaxed) {
            return if known {
                Ok(())
            } else {
                Err(PeerError::Unreachable(format!(
                    "the anchor is away and {peer}'s addresses are not known"
                )))
            };
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.inner)
            .punch_waiters
            .entry(peer)
            .or_default()
            .push(tx);
        self.send_up(ControlUp::Rendezvous(RendezvousRequest { peer }));
        match tokio::time::timeout(PUNCH_WAIT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) if !known => Err(PeerError::Unreachable(reason)),
            // Without an answer (or with a refusal) what this node knows may still work.
            _ => Ok(()),
        }
    }

    fn live(&self, peer: &DeviceId) -> Option<quinn::Connection> {
        let inner = lock(&self.inner);
        let link = inner.links.get(peer)?;
        link.conn
            .close_reason()
            .is_none()
            .then(|| link.conn.clone())
    }

    /// Takes an established connection in, settling a race by the fixed rule (the
    /// connection dialed by the smaller device id wins), and serves its streams.
    fn adopt(
        self: &Arc<Self>,
        conn: quinn::Connection,
        peer: DeviceId,
        dialer: DeviceId,
    ) -> quinn::Connection {
        let keep = {
            let mut inner = lock(&self.inner);
            // Two live connections dialed from both ends at once: the smaller id's dial wins.
            // A second dial from the same end is a redial (that end lost the first one, say in
            // a restart): the newer connection wins.
            let winner = self.me.min(peer);
            match inner.links.get(&peer) {
                Some(l)
                    if l.conn.close_reason().is_none()
                        && l.dialer != dialer
                        && l.dialer == winner =>
                {
                    close(
                        &conn,
                        ErrorCode::Replaced,
                        "a connection to this peer already exists",
                    );
                    return l.conn.clone();
                }
                _ => {}
            }
            if let Some(old) = inner.links.insert(
                peer,
                Link {
                    conn: conn.clone(),
                    dialer,
                    since: SystemTime::now(),
                },
            ) {
                close(
                    &old.conn,
                    ErrorCode::Replaced,
                    "replaced by the connection dialed by the smaller id",
                );
            }
            conn
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.changed.send_modify(|g| *g += 1);
        let me = self.clone();
        let served = keep.clone();
        tokio::spawn(async move {
            me.serve(served.clone(), peer).await;
            let mut inner = lock(&me.inner);
            if inner
                .links
                .get(&peer)
                .is_some_and(|l| l.conn.stable_id() == served.stable_id())
            {
                inner.links.remove(&peer);
            }
            drop(inner);
            me.changed.send_modify(|g| *g += 1);
        });
        keep
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "a peer handshake failed");
                        return;
                    }
                };
                let Some(peer) = peer_device(&conn) else {
                    close(&conn, ErrorCode::Unauthenticated, "no certificate");
                    return;
                };
                let expected = me
                    .entry(&peer)
                    .is_some_and(|e| !(e.outbound.is_empty() && e.inbound.is_empty()));
                if !expected {
                    debug!(%peer, "refused a peer the policy does not relate to this node");
                    me.stats.refused.fetch_add(1, Ordering::Relaxed);
                    close(&conn, ErrorCode::NotAllowed, "not allowed by policy");
                    return;
                }
                debug!(%peer, "a peer connected");
                me.adopt(conn, peer, peer);
            });
        }
    }

    /// Serves the streams a peer opens on `conn` until it closes.
    async fn serve(self: &Arc<Self>, conn: quinn::Connection, peer: DeviceId) {
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "peer connection ended");
                    return;
                }
            };
            let me = self.clone();
            tokio::spawn(async move { me.serve_stream(peer, send, recv).await });
        }
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer: DeviceId,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut rx = FramedRecv::<PeerOpen>::new(recv);
        let open = match tokio::time::timeout(OPEN_TIMEOUT, rx.recv()).await {
            Ok(Ok(Some(o))) => o,
            Ok(Err(e)) if e.is_peer_fault() => {
                rx.stop(e.code());
                return;
            }
            _ => return,
        };
        match open {
            PeerOpen::Invoke(req) => self.serve_call(peer, req, FramedSend::new(send)).await,
            PeerOpen::Tunnel(t) => self.serve_tunnel(peer, t, send, rx.into_inner()).await,
        }
    }

    async fn serve_call(
        &self,
        peer: DeviceId,
        req: InvokeRequest,
        mut tx: FramedSend<InvokeReply>,
    ) {
        let allowed = self
            .entry(&peer)
            .is_some_and(|e| e.inbound.allows_capability(&req.capability));
        let result = if allowed {
            self.stats.calls_served.fetch_add(1, Ordering::Relaxed);
            let counters = Counters {
                duplicates: &self.stats.duplicates,
                expired: &self.stats.expired,
                run: &self.stats.run,
            };
            handle_invocation(req, &self.registry, &self.permits, counters, &self.seen).await
        } else {
            self.stats.calls_refused.fetch_add(1, Ordering::Relaxed);
            info!(%peer, capability = %req.capability, "refused a peer's call the policy does not allow");
            InvokeResult {
                outcome: Outcome::Rejected,
                output: Vec::new(),
                truncated: false,
                error: Some(format!(
                    "not allowed by policy: {peer} may not call {} on this node",
                    req.capability
                )),
                duration_ms: 0,
            }
        };
        let _ = tx.send(&InvokeReply::Result(result)).await;
        let _ = tx.finish();
    }

    async fn serve_tunnel(
        &self,
        peer: DeviceId,
        open: TunnelOpen,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut tx = FramedSend::<TunnelReply>::new(send);
        let allowed = self
            .entry(&peer)
            .is_some_and(|e| e.inbound.allows_service(&open.service));
        let target = lock(&self.inner).exposed.get(&open.service).cloned();
        let refuse = |why: String| TunnelReply::Refused(why);
        let target = match (allowed, target) {
            (false, _) => {
                self.stats.calls_refused.fetch_add(1, Ordering::Relaxed);
                let _ = tx
                    .send(&refuse(format!(
                        "not allowed by policy: {peer} may not open {} on this node",
                        open.service
                    )))
                    .await;
                let _ = tx.finish();
                return;
            }
            (true, None) => {
                let _ = tx
                    .send(&refuse(format!(
                        "no service {:?} is exposed here",
                        open.service
                    )))
                    .await;
                let _ = tx.finish();
                return;
            }
            (true, Some(t)) => t,
        };
        let tcp = match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(target.target),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = tx
                    .send(&refuse(format!("the service did not accept: {e}")))
                    .await;
                let _ = tx.finish();
                return;
            }
            Err(_) => {
                let _ = tx
                    .send(&refuse("the service did not accept in 5 s".into()))
                    .await;
                let _ = tx.finish();
                return;
            }
        };
        if tx.send(&TunnelReply::Accepted).await.is_err() {
            return;
        }
        self.stats.tunnels_served.fetch_add(1, Ordering::Relaxed);
        let send = tx.into_inner();
        let task = tokio::spawn(tunnel::splice(tcp, send, recv));
        let id = {
            let mut inner = lock(&self.inner);
            inner.next_id += 1;
            let id = inner.next_id;
            inner.served.insert(
                id,
                Served {
                    peer,
                    service: open.service.clone(),
                    abort: task.abort_handle(),
                },
            );
            id
        };
        let _ = task.await;
        lock(&self.inner).served.remove(&id);
    }

    /// Invokes `capability` on `peer` through the mesh.
    pub async fn call(
        self: &Arc<Self>,
        peer: DeviceId,
        capability: &str,
        input: Vec<u8>,
        timeout: Duration,
    ) -> Result<(InvocationId, InvokeResult), PeerError> {
        let entry = self.entry(&peer).ok_or_else(|| {
            PeerError::NotAllowed(format!("{peer} is not in this node's directory"))
        })?;
        if !entry.outbound.allows_capability(capability) {
            return Err(PeerError::NotAllowed(format!(
                "this node may not call {capability} on {}",
                entry.name
            )));
        }
        let started = tokio::time::Instant::now();
        let work = async {
            let conn = self.connect(peer).await?;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| PeerError::Connection(e.to_string()))?;
            let id = InvocationId(random16());
            let left = timeout.saturating_sub(started.elapsed());
            let req = InvokeRequest {
                version: PROTOCOL_VERSION,
                id,
                capability: capability.to_string(),
                input,
                remaining_ms: u32::try_from(left.as_millis()).unwrap_or(u32::MAX),
                output_limit: CALL_OUTPUT_LIMIT,
            };
            let mut tx = FramedSend::<PeerOpen>::new(send);
            tx.send(&PeerOpen::Invoke(req))
                .await
                .map_err(|e| PeerError::Connection(e.to_string()))?;
            let _ = tx.finish();
            let mut rx = FramedRecv::<InvokeReply>::new(recv);
            loop {
                match rx.recv().await {
                    Ok(Some(InvokeReply::Result(r))) => return Ok((id, r)),
                    Ok(Some(InvokeReply::Progress(_))) => continue,
                    Ok(None) => {
                        return Err(PeerError::Protocol(
                            "the stream ended without a result".into(),
                        ));
                    }
                    Err(e) => return Err(PeerError::Connection(e.to_string())),
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::TimedOut(timeout)),
        }
    }

    /// Opens a tunnel to `service` on `peer`: the streams carry raw TCP bytes once this
    /// returns.
    pub async fn open_tunnel(
        self: &Arc<Self>,
        peer: DeviceId,
        service: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        let entry = self.entry(&peer).ok_or_else(|| {
            PeerError::NotAllowed(format!("{peer} is not in this node's directory"))
        })?;
        if !entry.outbound.allows_service(service) {
            return Err(PeerError::NotAllowed(format!(
                "this node may not open {service} on {}",
                entry.name
            )));
        }
        let conn = self.connect(peer).await?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PeerError::Connection(e.to_string()))?;
        let mut tx = FramedSend::<PeerOpen>::new(send);
        tx.send(&PeerOpen::Tunnel(TunnelOpen {
            service: service.to_string(),
        }))
        .await
        .map_err(|e| PeerError::Connection(e.to_string()))?;
        let mut rx = FramedRecv::<TunnelReply>::new(recv);
        match tokio::time::timeout(OPEN_TIMEOUT, rx.recv()).await {
            Ok(Ok(Some(TunnelReply::Accepted))) => Ok((tx.into_inner(), rx.into_inner())),
            Ok(Ok(Some(TunnelReply::Refused(why)))) => Err(if why.starts_with("not allowed") {
                PeerError::NotAllowed(why)
            } else {
                PeerError::Unreachable(why)
            }),
            Ok(Ok(None)) => Err(PeerError::Protocol(
                "the stream ended without an answer".into(),
            )),
            Ok(Err(e)) => Err(PeerError::Connection(e.to_string())),
            Err(_) => Err(PeerError::TimedOut(OPEN_TIMEOUT)),
        }
    }

    /// Exposes `name` (forwarding to `target`) until the returned guard is dropped.
    pub fn expose(
        self: &Arc<Self>,
        name: &str,
        target: SocketAddr,
    ) -> Result<ExposeGuard, PeerError> {
        if !anchorage_wire::peer::valid_service_name(name) {
            return Err(PeerError::Protocol(format!(
                "{name:?} is not a service name: 1-63 lowercase letters, digits, - _ ., starting with a letter or digit"
            )));
        }
        let id = {
            let mut inner = lock(&self.inner);
            if inner.exposed.contains_key(name) {
                return Err(PeerError::Protocol(format!("{name} is already exposed")));
            }
            if inner.exposed.len() >= anchorage_wire::peer::MAX_SERVICES {
                return Err(PeerError::Protocol(format!(
                    "at most {} services can be exposed",
                    anchorage_wire::peer::MAX_SERVICES
                )));
            }
            inner.next_id += 1;
            let id = inner.next_id;
            inner
                .exposed
                .insert(name.to_string(), Exposed { target, id });
            id
        };
        info!(service = name, %target, "exposing a service to peers");
        self.services_changed();
        Ok(ExposeGuard {
            peers: Arc::downgrade(self),
            name: name.to_string(),
            id,
        })
    }

    fn services_changed(&self) {
        let names = lock(&self.inner).exposed.keys().cloned().collect();
        self.send_up(ControlUp::Services(ServiceList { names }));
    }

    /// Every peer of the directory, with its connection's state.
    pub fn list(&self) -> Vec<PeerStatus> {
        let inner = lock(&self.inner);
        let mut out: Vec<PeerStatus> = inner
            .directory
            .peers()
            .map(|e| {
                let link = inner
                    .links
                    .get(&e.device_id)
                    .filter(|l| l.conn.close_reason().is_none());
                let path = self.socket.path(e.device_id);
                let (kind, addr) = match link {
                    Some(_) => (path.kind, path.addr.map(|a| a.to_string())),
                    None => (PathKind::None, None),
                };
                let (rtt_ms, loss) = match link {
                    Some(l) => {
                        let s = l.conn.stats();
                        let sent = s.path.sent_packets.max(1) as f64;
                        (
                            Some(l.conn.rtt().as_secs_f64() * 1000.0),
                            Some(s.path.lost_packets as f64 / sent),
                        )
                    }
                    None => (None, None),
                };
                PeerStatus {
                    device_id: e.device_id,
                    name: e.name.clone(),
                    path: kind.as_str(),
                    addr,
                    rtt_ms,
                    loss,
                    since: link.map(|l| l.since.max(path.since)).and_then(rfc3339),
                    connected: link.is_some(),
                    services: e.services.clone(),
                    may_call: e.outbound.capabilities.clone(),
                    may_open: e.outbound.services.clone(),
                    may_call_here: e.inbound.capabilities.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.device_id.cmp(&b.device_id)));
        out
    }

    fn report_paths(&self) {
        if !self.anchor_up.load(Ordering::Relaxed) {
            return;
        }
        let paths: Vec<PeerPath> = {
            let inner = lock(&self.inner);
            inner
                .links
                .iter()
                .filter(|(_, l)| l.conn.close_reason().is_none())
                .take(anchorage_wire::peer::MAX_PATHS)
                .map(|(device, l)| {
                    let p = self.socket.path(*device);
                    PeerPath {
                        peer: *device,
                        path: p.kind,
                        addr: p.addr.map(|a| a.to_string()),
                        rtt_us: u32::try_from(l.conn.rtt().as_micros()).ok(),
                        since_ms: unix_ms(l.since.max(p.since)),
                    }
                })
                .collect()
        };
        self.send_up(ControlUp::Paths(PathReport { paths }));
    }

    /// Saves the directory with each peer's addresses and token.
    fn save(&self) {
        let saved = {
            let inner = lock(&self.inner);
            SavedPeers {
                policy_version: inner.directory.policy_version(),
                peers: inner
                    .directory
                    .peers()
                    .map(|e| {
                        let known = self.socket.candidates(e.device_id);
                        SavedPeer {
                            entry: e.clone(),
                            addrs: known.as_ref().map(|(a, _)| a.clone()).unwrap_or_default(),
                            token: known.map(|(_, t)| token_hex(&t)),
                        }
                    })
                    .collect(),
            }
        };
        let state = self.state.clone();
        // Small and rare (a directory change or a punch): written off the async threads.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = directory::save(&state, &saved) {
                warn!(error = %e, "cannot save the peers");
            }
        });
    }
}

/// Keeps a service exposed; dropping it stops exposing.
#[derive(Debug)]
pub struct ExposeGuard {
    peers: std::sync::Weak<Peers>,
    name: String,
    id: u64,
}

impl Drop for ExposeGuard {
    fn drop(&mut self) {
        let Some(peers) = self.peers.upgrade() else {
            return;
        };
        let removed = {
            let mut inner = lock(&peers.inner);
            if inner
                .exposed
                .get(&self.name)
                .is_some_and(|e| e.id == self.id)
            {
                inner.exposed.remove(&self.name);
                true
            } else {
                false
            }
        };
        if removed {
            info!(service = %self.name, "no longer exposing a service");
            peers.services_changed();
        }
    }
}

fn random16() -> [u8; 16] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // The OS generator failing is not something to serve through; fall back on the clock
        // (an id only needs to be unique per caller).
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = t.to_le_bytes();
    }
    b
}
