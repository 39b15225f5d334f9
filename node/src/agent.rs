//! The node agent: keeps the membership alive.
//!
//! [`run`] connects to an anchor on `anchorage/node/1` with the node's certificate, registers
//! on the control stream, sends heartbeats as datagrams (jittered, at the interval the anchor
//! gave) and reads the acks for loss and RTT, serves invocations (each on its own stream,
//! concurrently up to a limit, duplicates dropped, expired ones never run), renews the
//! certificate when a third of its validity is left or when the anchor asks, and reports
//! capability availability changes. A revoked or removed device stops with an error.
//!
//! # Failover
//!
//! The agent knows a set of anchors ([`AnchorSet`]): those it was given, and those the anchor
//! lists in [`ControlDown::Anchors`] (right after `Registered` and whenever the cluster
//! changes; the list is also saved in the state directory). Names are resolved at each
//! attempt; one that does not resolve is skipped.
//!
//! - **Lost.** When an established connection is lost (not revoked or removed: those stay
//!   fatal), the next attempt goes to the next anchor after a random pause of up to
//!   [`FAILOVER_SPREAD`], so a thousand nodes of a failed anchor do not arrive at the next
//!   one in the same millisecond. A renewal (`Reconnect`) goes back to the same anchor at once.
//! - **Failed.** An attempt that fails (the name does not resolve, no handshake, no
//!   registration) moves on to the next anchor at once; only when every anchor failed in one
//!   round does the capped exponential backoff ([`Backoff`], up to `reconnect_max`) pause
//!   before the next round. A connection that did not last [`STABLE_CONNECTION`] counts as a
//!   failed attempt of its round, so anchors that accept and drop a node end in backoff too.
//! - **Restarting.** An anchor that closes the connection because it is shutting down, or
//!   refuses a handshake because it has too many in progress, is expected to take the node
//!   within seconds: for [`RESTART_PATIENCE`] after that, a failed round pauses
//!   [`RESTART_RETRY`] ±50 % instead of the backoff, doubling with each failed round up to
//!   [`RESTART_RETRY_MAX`] ([`RoundPause`]), so the nodes of a restarted anchor come back
//!   within about a second of it, spread over that second, and those it refuses spread
//!   further instead of refused again together; a handshake that does not finish within
//!   [`FIRST_HANDSHAKE_LIMIT`] is dialled again rather than waited on through QUIC's doubling
//!   probe timeout, each further one given twice as long up to [`RESTART_HANDSHAKE_LIMIT`].
//! - **Silent.** With at least two anchors known, an anchor from which nothing at all was
//!   received for [`ANCHOR_SILENCE`] is lost (checked every [`SILENCE_POLL`]), and a
//!   handshake that does not finish within it fails. While it knows another anchor the node
//!   sends something ack-eliciting at least every 5 s
//!   (`anchorage_mesh::transport::KEEP_ALIVE_INTERVAL`: QUIC's keep-alive on a connection
//!   made then, a `Probe` on one made while it knew one anchor), so a live anchor always
//!   answers well within that. With one anchor, the heartbeats alone go out (the QUIC
//!   keep-alive is `NODE_KEEP_ALIVE_INTERVAL`, 25 s, above the default heartbeat interval).
//!   A killed anchor (whose host stays up, so nothing closes the connection) is noticed in
//!   about 6 s instead of the 40 s QUIC idle timeout. With one anchor there is nowhere to
//!   go, and only the idle timeout applies.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anchorage_mesh::conn_error::{ConnFailure, NodeAction};
use anchorage_mesh::framed::{FramedRecv, FramedSend, StreamError, close, framed};
use anchorage_mesh::peer_tls::PeerTls;
use anchorage_mesh::{tls, transport};
use anchorage_wire::control::*;
use anchorage_wire::datagram::{Datagram, Heartbeat};
use anchorage_wire::invoke::{InvokeReply, InvokeRequest};
use anchorage_wire::peer::{Relay, RelayPacket};
use anchorage_wire::{ANCHOR_SERVER_NAME, ErrorCode, PROTOCOL_VERSION};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::anchors::ResolveError;
use crate::anchors::{AnchorAddr, AnchorSet, Pause, SilenceWatch};
use crate::capability::Registry;
use crate::copies::CopyServer;
use crate::invoke::{Counters, Seen, handle_invocation};
use crate::mesh::socket::MeshSocket;
use crate::peer::Peers;
use crate::revoked::{RevokedSet, SharedRevoked};
use crate::state::{StateDir, StateError};
pub use crate::stats::AgentStats;
use crate::stats::unix_ms;

/// Agent version reported at registration.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Default invocations at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
pub use crate::invoke::SEEN_INVOCATIONS;
/// First reconnect delay.
pub const RECONNECT_BASE: Duration = Duration::from_millis(500);
/// A connection that lived this long resets the backoff.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(60);
/// How often certificate expiry and capability availability are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(30);
pub use crate::anchors::ANCHOR_SILENCE;
/// How often the received-datagram count is looked at for [`ANCHOR_SILENCE`].
pub const SILENCE_POLL: Duration = Duration::from_millis(500);
/// Longest random pause before dialing the next anchor after a connection was lost.
pub const FAILOVER_SPREAD: Duration = Duration::from_millis(1500);
/// After an anchor closed the connection because it is shutting down (a restart, as a
/// rule), how long rounds that fail are paced by [`RESTART_RETRY`] instead of the growing
/// [`Backoff`]: the anchor is expected back within seconds, and a node that backed off to
/// 8 or 16 s would come back long after it.
pub const RESTART_PATIENCE: Duration = Duration::from_secs(60);
/// QUIC's `CONNECTION_REFUSED` transport error: an anchor with too many handshakes in
/// progress refuses new ones with it.
const CONNECTION_REFUSED: u64 = 0x2;
/// The first pause between failed rounds while an anchor restarts: this, ±50 % (random), so
/// the nodes of a restarting anchor arrive spread over a second, not at once and not late.
/// It doubles with each further failed round, up to [`RESTART_RETRY_MAX`].
pub const RESTART_RETRY: Duration = Duration::from_secs(1);
/// The longest pause between failed rounds while an anchor restarts (±50 %). Ten thousand
/// nodes refused once a second would send the anchor ten thousand Initials a second while it
/// takes a few hundred: the refusals, and the nodes' fresh attempts, then cost more than the
/// handshakes, and the restart stalls. Doubling up to this keeps the attempts near what the
/// anchor takes, and a node that waits longest still tries every few seconds.
pub const RESTART_RETRY_MAX: Duration = Duration::from_secs(4);
/// The longest handshake while an anchor restarts ([`HandshakeLimit`] doubles up to it from
/// [`FIRST_HANDSHAKE_LIMIT`]): an anchor taking back thousands of nodes may need several
/// seconds for each handshake, and a node that gave up on it at 2 s would only come back to
/// the end of the queue, its half-done handshake wasted work for the anchor.
pub const RESTART_HANDSHAKE_LIMIT: Duration = Duration::from_secs(8);
/// Longest handshake with the only known anchor.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// The first handshake's limit, and the first after a failed one ([`HandshakeLimit`]).
pub const FIRST_HANDSHAKE_LIMIT: Duration = Duration::from_secs(2);
/// Longest wait for the anchor's answer to the registration.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(15);

/// Configuration of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// State directory (key, certificate, CA).
    pub state: StateDir,
    /// Name to register with.
    pub name: String,
    /// Platform to register with, e.g. `linux-x86_64`.
    pub platform: String,
    /// Capabilities.
    pub capabilities: Registry,
    /// Invocations at once.
    pub max_concurrent: usize,
    /// Longest pause between reconnection attempts.
    pub reconnect_max: Duration,
    /// Renew when less than this fraction of the certificate's validity is left.
    pub renew_fraction: f64,
    /// How often to check certificate expiry and capability availability.
    pub check_interval: Duration,
    /// Write `status.json` this often (`None`: never).
    pub status_every: Option<Duration>,
    /// Seed of the jitter generator (backoff and heartbeat phase).
    pub seed: u64,
}

impl AgentConfig {
    /// Defaults for a state directory and registry.
    pub fn new(state: StateDir, name: String, capabilities: Registry) -> AgentConfig {
        AgentConfig {
            state,
            name,
            platform: crate::capability::platform(),
            capabilities,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            reconnect_max: Duration::from_secs(30),
            renew_fraction: 1.0 / 3.0,
            check_interval: CHECK_INTERVAL,
            status_every: Some(Duration::from_secs(2)),
            seed: seed_from_time(),
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The state directory is unusable or the node is not paired.
    #[error(transparent)]
    State(#[from] StateError),
    /// An operator revoked this device.
    #[error("this device was revoked by an operator; it must be removed and paired again")]
    Revoked,
    /// An operator removed this device.
    #[error("this device was removed by an operator; pair it again")]
    Removed,
    /// The certificate expired beyond the renewal grace period.
    #[error("the certificate expired beyond the renewal grace period; pair again")]
    Expired,
    /// The anchor does not know this device.
    #[error("the anchor does not know this device; pair it again")]
    Unknown,
}

impl AgentError {
    /// The error for a fatal [`NodeAction`]; `None` for one the agent recovers from.
    pub fn from_action(action: NodeAction) -> Option<AgentError> {
        match action {
            NodeAction::Revoked => Some(AgentError::Revoked),
            NodeAction::Removed => Some(AgentError::Removed),
            NodeAction::Expired => Some(AgentError::Expired),
            NodeAction::Unknown => Some(AgentError::Unknown),
            NodeAction::Retry | NodeAction::Renew => None,
        }
    }
}

/// Why a connection to an anchor ended while the agent keeps going: it tries the next anchor.
/// The text is what `anchor-node status` shows as the last error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The anchor's name does not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The endpoint refused to start a connection (bad address, endpoint closed).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake did not finish within its [`HandshakeLimit`] (at most
    /// [`HANDSHAKE_TIMEOUT`], or [`ANCHOR_SILENCE`] when another anchor is known).
    #[error("handshake timed out")]
    HandshakeTimedOut,
    /// Nothing was received from the anchor for [`ANCHOR_SILENCE`].
    #[error("the anchor fell silent (nothing received for {} s)", ANCHOR_SILENCE.as_secs())]
    Silent,
    /// The connection failed or was closed, classified.
    #[error("{error}")]
    Connection {
        /// What the classifier made of it.
        failure: ConnFailure,
        /// quinn's error, for its message.
        error: quinn::ConnectionError,
    },
    /// The anchor did not answer the registration within [`REGISTRATION_TIMEOUT`].
    #[error("registration timed out")]
    RegistrationTimedOut,
    /// The anchor's first message was neither a registration nor renewal-only answer.
    #[error("unexpected first message")]
    UnexpectedMessage,
    /// The control stream ended while the connection looked open.
    #[error("control stream ended")]
    ControlStreamEnded,
    /// Writing to the control stream failed.
    #[error("control stream: {0}")]
    Control(#[from] StreamError),
    /// Renewing the certificate failed.
    #[error(transparent)]
    Renew(#[from] RenewError),
}

impl LinkError {
    /// A classified connection error.
    pub fn connection(error: quinn::ConnectionError) -> LinkError {
        LinkError::Connection {
            failure: ConnFailure::classify(&error),
            error,
        }
    }
}

/// Why a certificate renewal failed (the agent keeps the old certificate and reconnects).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewError {
    /// The state directory could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The state directory holds no key.
    #[error("no key in the state directory")]
    NoKey,
    /// The certificate request could not be built (rcgen's message).
    #[error("cannot build the certificate request: {0}")]
    Csr(String),
    /// Sending the request failed.
    #[error("cannot send the renewal request: {0}")]
    Send(#[from] StreamError),
    /// The anchor refused, with its message.
    #[error("renewal refused: {0}")]
    Refused(String),
    /// No answer within 30 s.
    #[error("no answer to the renewal")]
    NoAnswer,
}

/// What the agent keeps across sessions besides the anchors.
struct Held {
    /// Invocations seen, with their results: one sent again is answered, never run twice.
    seen: Arc<Mutex<Seen>>,
    /// The mesh's revocation set as last told (and saved).
    revoked: RevokedSet,
    /// The peer mesh, when the node runs one.
    mesh: Option<Mesh>,
}

/// The node's side of the peer mesh, which the agent connects to each anchor session: the
/// relay stream, the rendezvous messages, the directory and the revocation set.
#[derive(Debug)]
pub struct Mesh {
    /// The peers.
    pub peers: Arc<Peers>,
    /// The node's socket.
    pub socket: Arc<MeshSocket>,
    /// What the peers send the anchor.
    pub uplink: mpsc::Receiver<ControlUp>,
    /// The revocation set peer handshakes check.
    pub revoked: Arc<SharedRevoked>,
}

/// Packets waiting for the relay stream; more are dropped, as a full UDP queue would.
pub const RELAY_QUEUE: usize = 1024;

/// Locks `m`; a panic elsewhere while it was held leaves plain data that is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A small deterministic generator for jitter (SplitMix64).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded.
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max)`.
    pub fn below(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().min(u128::from(u64::MAX)) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % nanos)
    }
}

/// How long the next handshake may take: [`FIRST_HANDSHAKE_LIMIT`] (±25 %, random), doubled
/// after each handshake that timed out, up to a cap; back to the first after one that
/// finished.
///
/// A QUIC client whose Initial is lost (the anchor restarting, or its socket buffer overflowing
/// when ten thousand nodes arrive at once) resends it on a probe timeout that doubles (1 s,
/// 2 s, 4 s ...), so a node that dialed while the anchor was down would come back up to 8 s
/// after it; a fresh attempt after 2 s keeps the gap near 1 s. The limit doubles so that a
/// slow link, or an anchor busy with a storm of handshakes, still gets the time it needs.
#[derive(Debug, Clone)]
pub struct HandshakeLimit {
    next: Duration,
    jitter: Jitter,
}

impl HandshakeLimit {
    /// At the first limit.
    pub fn new(seed: u64) -> HandshakeLimit {
        HandshakeLimit {
            next: FIRST_HANDSHAKE_LIMIT,
            jitter: Jitter::new(seed),
        }
    }

    /// The limit of the next handshake, at most `cap`.
    pub fn get(&mut self, cap: Duration) -> Duration {
        let base = self.next.min(cap);
        (base * 3 / 4 + self.jitter.below(base / 2)).min(cap)
    }

    /// A handshake timed out: the next may take twice as long.
    pub fn timed_out(&mut self) {
        self.next = (self.next * 2).min(HANDSHAKE_TIMEOUT);
    }

    /// A handshake finished.
    pub fn finished(&mut self) {
        self.next = FIRST_HANDSHAKE_LIMIT;
    }
}

/// The pause after a failed round: the [`Backoff`], or while an anchor restarts (it said it
/// was shutting down, or refused a handshake, less than [`RESTART_PATIENCE`] ago)
/// [`RESTART_RETRY`] ±50 %, doubling with each failed round up to [`RESTART_RETRY_MAX`].
#[derive(Debug, Clone)]
pub struct RoundPause {
    backoff: Backoff,
    jitter: Jitter,
    restart_until: Option<Instant>,
    /// Rounds failed since the anchor was expected soon.
    restart_rounds: u32,
}

impl RoundPause {
    /// The backoff capped at `cap`, nothing restarting.
    pub fn new(cap: Duration, seed: u64) -> RoundPause {
        RoundPause {
            backoff: Backoff::new(cap, seed),
            jitter: Jitter::new(seed.rotate_left(7) ^ 0x7e7e),
            restart_until: None,
            restart_rounds: 0,
        }
    }

    /// The anchor said it is shutting down, or refused a handshake because it had too many
    /// in progress, at `now`: it is expected to take the node within seconds.
    pub fn expect_anchor_soon(&mut self, now: Instant) {
        self.restart_until = Some(now + RESTART_PATIENCE);
    }

    /// A handshake finished: whatever restarted is back.
    pub fn anchor_back(&mut self) {
        self.restart_until = None;
        self.restart_rounds = 0;
    }

    /// Whether an anchor is expected soon (the steady pace is on) at `now`.
    pub fn steady(&self, now: Instant) -> bool {
        self.restart_until.is_some_and(|until| now < until)
    }

    /// The pause after a round in which every anchor failed, at `now`.
    pub fn delay(&mut self, now: Instant) -> Duration {
        if self.steady(now) {
            let base = RESTART_RETRY
                .saturating_mul(1 << self.restart_rounds.min(8))
                .min(RESTART_RETRY_MAX);
            self.restart_rounds = self.restart_rounds.saturating_add(1);
            base / 2 + self.jitter.below(base)
        } else {
            self.backoff.delay()
        }
    }

    /// Back to the first backoff delay.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }
}

/// The node's TLS client configuration from its state directory, with the keep-alive the
/// connection needs (short when another anchor is known).
fn node_client(
    config: &AgentConfig,
    short_keep_alive: bool,
) -> Result<quinn::ClientConfig, AgentError> {
    let identity = config.state.identity()?;
    let mut client = tls::node_client_config(
        &identity.ca,
        vec![identity.cert.clone()],
        identity.key.private_key_der(),
    )
    .map_err(|e| {
        AgentError::State(StateError::Corrupt {
            path: config.state.path().join("cert.pem"),
            message: e.to_string(),
        })
    })?;
    client.transport_config(Arc::new(transport::node_transport_with(
        if short_keep_alive {
            transport::KEEP_ALIVE_INTERVAL
        } else {
            transport::NODE_KEEP_ALIVE_INTERVAL
        },
    )));
    Ok(client)
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Starting at [`RECONNECT_BASE`], capped at `cap`.
    pub fn new(cap: Duration, seed: u64) -> Backoff {
        Backoff {
            next: RECONNECT_BASE,
            cap,
            jitter: Jitter::new(seed),
        }
    }

    /// The next delay: half fixed, half random, so attempts spread but keep growing.
    pub fn delay(&mut self) -> Duration {
        let base = self.next.min(self.cap);
        self.next = (self.next * 2).min(self.cap);
        base / 2 + self.jitter.below(base / 2 + Duration::from_millis(1))
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = RECONNECT_BASE;
    }
}

fn seed_from_time() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
        ^ u64::from(std::process::id()).rotate_left(32)
}

/// Resolves once `shutdown` is true (or its sender is gone), without holding the watch lock.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

enum SessionEnd {
    Shutdown,
    /// Before the node registered: the next anchor at once (backoff after a failed round).
    Failed(LinkError),
    /// After it registered: the next anchor after a spread pause.
    Lost(LinkError),
    Reconnect,
    Fatal(AgentError),
}

impl SessionEnd {
    /// What a connection error means for the session: stop, renew at once, or retry.
    fn from_conn_error(error: quinn::ConnectionError) -> SessionEnd {
        let failure = ConnFailure::classify(&error);
        match failure.node_action() {
            NodeAction::Renew => SessionEnd::Reconnect,
            action => match AgentError::from_action(action) {
                Some(fatal) => SessionEnd::Fatal(fatal),
                None => SessionEnd::Lost(LinkError::Connection { failure, error }),
            },
        }
    }

    /// The same end, for a connection on which the node never registered.
    fn unregistered(self) -> SessionEnd {
        match self {
            SessionEnd::Lost(e) => SessionEnd::Failed(e),
            other => other,
        }
    }
}

/// Runs the agent until `shutdown` becomes true or the device is revoked/removed, dialing
/// `anchors` (each resolved at each attempt) and failing over between them as the module docs
/// say. The anchors an anchor lists replace those of the set and are saved in the state
/// directory.
pub async fn run(
    endpoint: quinn::Endpoint,
    mut anchors: AnchorSet,
    config: AgentConfig,
    stats: Arc<AgentStats>,
    mut shutdown: watch::Receiver<bool>,
    mesh: Option<Mesh>,
) -> Result<(), AgentError> {
    let mut backoff = RoundPause::new(config.reconnect_max, config.seed);
    let mut jitter = Jitter::new(config.seed.rotate_left(17) ^ 0xa5a5);
    let mut spread = Jitter::new(config.seed.rotate_left(41) ^ 0x5a5a);
    let mut limit = HandshakeLimit::new(config.seed.rotate_left(29) ^ 0x3c3c);
    // Across sessions: an invocation sent again after the node moved to another anchor (or
    // reconnected) is answered from here, never run twice; the revocation set outlives
    // every connection (and, in its file, the process).
    let revoked = match config.state.revoked() {
        Ok(set) => set.unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "cannot read the revocation set; waiting for the anchor's");
            RevokedSet::default()
        }
    };
    stats.set_revoked(&revoked);
    if let Some(m) = &mesh {
        m.revoked.replace(revoked.clone());
    }
    let mut held = Held {
        seen: Arc::new(Mutex::new(Seen::default())),
        revoked,
        mesh,
    };
    stats.set_anchors(anchors.addrs());
    let status_task = config.status_every.map(|every| {
        let stats = stats.clone();
        let state = config.state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = state.save_status(&stats.snapshot());
            }
        })
    });
    // The TLS client configuration, with the keep-alive and the count of certificate renewals
    // it was built for (a renewal saves a new certificate: built again for the next attempt).
    let mut tls_client: Option<((bool, u64), quinn::ClientConfig)> = None;
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        // The keep-alive is the connection's for its life: short when the silence watch may
        // need it (another anchor is known), else above the heartbeat interval (see
        // `Probe` for an anchor list that grows during the session).
        let short_keep_alive = anchors.several();
        // Built once per certificate and keep-alive, not per attempt: reading the key and
        // building the verifier again costs more than the attempt itself when the anchor
        // refuses or restarts and the node tries every second.
        let built_for = (short_keep_alive, stats.renewals.load(Ordering::Relaxed));
        let client = match &tls_client {
            Some((key, c)) if *key == built_for => c.clone(),
            _ => match node_client(&config, short_keep_alive) {
                Ok(c) => {
                    tls_client = Some((built_for, c.clone()));
                    c
                }
                Err(e) => break Err(e),
            },
        };
        let target = anchors.current().clone();
        // With another anchor to go to, one that does not answer is not waited on for long.
        // While an anchor is expected soon, a handshake that does not finish within the first
        // limit is dialled again after the steady pause (a fresh Initial) rather than waited
        // on through QUIC's doubling probe timeout; each that times out gets twice as long,
        // up to `RESTART_HANDSHAKE_LIMIT`, as an anchor taking back a fleet answers late.
        let handshake_limit = limit.get(if backoff.steady(Instant::now()) {
            RESTART_HANDSHAKE_LIMIT
        } else if anchors.several() {
            ANCHOR_SILENCE
        } else {
            HANDSHAKE_TIMEOUT
        });
        let attempt = async {
            let addr = crate::anchors::resolve_anchor(&target).await.map_err(|e| {
                debug!(anchor = %target, error = %e, "skipping an anchor whose name does not resolve");
                SessionEnd::Failed(LinkError::Resolve(e))
            })?;
            let connecting = endpoint
                .connect_with(client, addr, ANCHOR_SERVER_NAME)
                .map_err(|e| SessionEnd::Failed(e.into()))?;
            match tokio::time::timeout(handshake_limit, connecting).await {
                Ok(Ok(c)) => Ok(c),
                // A failed handshake is fatal or retried; "renew" only means something on an
                // established (renewal-only) connection.
                Ok(Err(error)) => {
                    let failure = ConnFailure::classify(&error);
                    Err(match AgentError::from_action(failure.node_action()) {
                        Some(fatal) => SessionEnd::Fatal(fatal),
                        None => SessionEnd::Failed(LinkError::Connection { failure, error }),
                    })
                }
                Err(_) => Err(SessionEnd::Failed(LinkError::HandshakeTimedOut)),
            }
        };
        let attempt = tokio::select! {
            a = attempt => a,
            _ = stopped(&mut shutdown) => break Ok(()),
        };
        let mut stable = false;
        match &attempt {
            Err(SessionEnd::Failed(LinkError::HandshakeTimedOut)) => limit.timed_out(),
            // Refused at once: the anchor had too many handshakes in progress (a restart, a
            // storm of reconnections); it takes the node in a second or so.
            Err(SessionEnd::Failed(LinkError::Connection {
                failure: ConnFailure::ClosedByPeer(CONNECTION_REFUSED),
                ..
            })) => backoff.expect_anchor_soon(Instant::now()),
            Err(_) => {}
            Ok(_) => limit.finished(),
        }
        let end = match attempt {
            Ok(conn) => {
                backoff.anchor_back();
                let started = Instant::now();
                let end = session(
                    &conn,
                    &target,
                    &config,
                    &stats,
                    &mut shutdown,
                    &mut jitter,
                    &mut anchors,
                    &mut held,
                    short_keep_alive,
                )
                .await;
                stats.connected.store(false, Ordering::Relaxed);
                stats.connected_since_ms.store(0, Ordering::Relaxed);
                *lock(&stats.anchor) = None;
                if started.elapsed() >= STABLE_CONNECTION {
                    backoff.reset();
                    stable = true;
                }
                let shutting_down = ConnFailure::Closed(ErrorCode::ShuttingDown);
                if conn
                    .close_reason()
                    .is_some_and(|e| ConnFailure::classify(&e) == shutting_down)
                {
                    debug!(anchor = %target, "the anchor is shutting down; retrying at a steady pace");
                    backoff.expect_anchor_soon(Instant::now());
                }
                end
            }
            Err(end) => end,
        };
        let pause = match end {
            SessionEnd::Shutdown => break Ok(()),
            SessionEnd::Fatal(e) => break Err(e),
            SessionEnd::Reconnect => {
                backoff.reset();
                continue;
            }
            SessionEnd::Failed(reason) => {
                let pause = anchors.failed();
                debug!(anchor = %target, %reason, next = %anchors.current(), ?pause, "attempt failed");
                stats.set_error(reason.to_string());
                pause
            }
            SessionEnd::Lost(reason) => {
                let pause = anchors.lost(stable);
                if anchors.several() {
                    info!(anchor = %target, %reason, next = %anchors.current(), "lost the anchor; moving to the next");
                } else {
                    info!(anchor = %target, %reason, "lost the anchor; reconnecting");
                }
                stats.set_error(reason.to_string());
                pause
            }
        };
        let delay = match pause {
            Pause::None => Duration::ZERO,
            Pause::Spread => spread.below(FAILOVER_SPREAD),
            Pause::Backoff => backoff.delay(Instant::now()),
        };
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut shutdown) => break Ok(()),
            }
        }
    };
    if let Some(t) = status_task {
        t.abort();
        let _ = config.state.save_status(&stats.snapshot());
    }
    if let Err(e) = &result {
        stats.set_error(e.to_string());
    }
    result
}

type Tx = FramedSend<ControlUp>;
type Rx = FramedRecv<ControlDown>;

/// Datagrams received on `conn` so far (anything at all: packets, acks, keep-alives).
fn received(conn: &quinn::Connection) -> u64 {
    conn.stats().udp_rx.datagrams
}

fn now() -> std::time::Instant {
    // tokio's clock, so that a simulation's paused time counts.
    Instant::now().into_std()
}

/// Runs `fut`, unless `watch` and the connection falls silent first (then `None`).
async fn unless_silent<F: Future>(
    conn: &quinn::Connection,
    silence: &mut SilenceWatch,
    watch: bool,
    fut: F,
) -> Option<F::Output> {
    if !watch {
        return Some(fut.await);
    }
    tokio::pin!(fut);
    let mut poll = tokio::time::interval(SILENCE_POLL);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            _ = poll.tick() => if silence.is_silent(received(conn), now()) {
                return None;
            }
        }
    }
}

/// The control stream of a registered session, and what the node registered with.
struct Registration {
    tx: Tx,
    rx: Rx,
    registered: Registered,
    caps: Vec<CapabilityInfo>,
}

/// Opens the control stream and registers (or renews an expired certificate and asks for a
/// reconnection). Every end before `Registered` is a failed attempt.
async fn register(
    conn: &quinn::Connection,
    config: &AgentConfig,
    stats: &AgentStats,
    silence: &mut SilenceWatch,
    watch: bool,
) -> Result<Registration, SessionEnd> {
    let silent = || {
        close(conn, ErrorCode::NoError, "anchor silent");
        SessionEnd::Failed(LinkError::Silent)
    };
    let (send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Err(SessionEnd::from_conn_error(e).unregistered()),
    };
    let (mut tx, mut rx) = framed::<ControlUp, ControlDown>(send, recv);
    let caps = config.capabilities.infos();
    let register = ControlUp::Register(Register {
        version: PROTOCOL_VERSION,
        name: config.name.clone(),
        platform: config.platform.clone(),
        agent_version: AGENT_VERSION.to_string(),
        capabilities: caps.clone(),
    });
    if let Err(e) = tx.send(&register).await {
        return Err(SessionEnd::Failed(e.into()));
    }
    let first = tokio::time::timeout(REGISTRATION_TIMEOUT, rx.recv());
    let Some(first) = unless_silent(conn, silence, watch, first).await else {
        return Err(silent());
    };
    match first {
        Ok(Ok(Some(ControlDown::Registered(registered)))) => Ok(Registration {
            tx,
            rx,
            registered,
            caps,
        }),
        Ok(Ok(Some(ControlDown::RenewalOnly(_)))) => {
            info!("certificate expired; renewing inside the grace period");
            let renewed = renew(config, stats, &mut tx, &mut rx);
            match unless_silent(conn, silence, watch, renewed).await {
                None => Err(silent()),
                Some(Ok(())) => {
                    close(conn, ErrorCode::NoError, "renewed");
                    Err(SessionEnd::Reconnect)
                }
                Some(Err(e)) => Err(SessionEnd::Failed(e.into())),
            }
        }
        Ok(Ok(Some(_))) => Err(SessionEnd::Failed(LinkError::UnexpectedMessage)),
        Ok(Ok(None)) | Ok(Err(_)) => Err(ended(conn).unregistered()),
        Err(_) => Err(SessionEnd::Failed(LinkError::RegistrationTimedOut)),
    }
}

// One caller (`run`), which owns what lives across sessions and lends it piece by piece.
#[allow(clippy::too_many_arguments)]
async fn session(
    conn: &quinn::Connection,
    anchor: &AnchorAddr,
    config: &AgentConfig,
    stats: &Arc<AgentStats>,
    shutdown: &mut watch::Receiver<bool>,
    jitter: &mut Jitter,
    anchors: &mut AnchorSet,
    held: &mut Held,
    short_keep_alive: bool,
) -> SessionEnd {
    let mut silence = SilenceWatch::new(ANCHOR_SILENCE, received(conn), now());
    let Registration {
        mut tx,
        mut rx,
        registered,
        mut caps,
    } = match register(conn, config, stats, &mut silence, anchors.several()).await {
        Ok(r) => r,
        Err(end) => return end,
    };
    let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
    stats.registrations.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(true, Ordering::Relaxed);
    stats.connected_since_ms.store(unix_ms(), Ordering::Relaxed);
    stats
        .heartbeat_interval_ms
        .store(interval.as_millis() as u64, Ordering::Relaxed);
    stats.heartbeats_sent.store(0, Ordering::Relaxed);
    stats.acks_received.store(0, Ordering::Relaxed);
    stats.path_sent.store(0, Ordering::Relaxed);
    stats.path_lost.store(0, Ordering::Relaxed);
    *lock(&stats.anchor) = Some(anchor.to_string());
    info!(%anchor, device_id = %registered.device_id, interval_ms = interval.as_millis() as u64, "registered with the anchor");

    let mut tasks = JoinSet::new();
    let phase = jitter.below(interval);
    let hb_seed = jitter.next_u64();
    let origin = Instant::now();
    let probe = Probe::new(short_keep_alive);
    probe.set(anchors.several());
    tasks.spawn(heartbeats(
        conn.clone(),
        origin,
        interval,
        phase,
        hb_seed,
        stats.clone(),
        probe.clone(),
    ));
    let copies = CopyServer {
        conn: conn.clone(),
        registry: config.capabilities.clone(),
        permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
        stats: stats.clone(),
        seen: held.seen.clone(),
        running: Arc::default(),
    };
    tasks.spawn(datagrams(copies.clone()));
    tasks.spawn(invocations(copies));
    if let Some(mesh) = &held.mesh {
        start_relay(conn, mesh, &mut tasks).await;
        mesh.peers
            .anchor(Some(local_candidates(conn, &mesh.socket)));
    }
    let mut check = tokio::time::interval(config.check_interval);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut poll = tokio::time::interval(SILENCE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewing = false;
    let end = loop {
        tokio::select! {
            _ = stopped(shutdown) => {
                let _ = tx.send(&ControlUp::Event(NodeEvent::Stopping { reason: "agent stopping".into() })).await;
                let _ = tx.finish();
                // Give the anchor a moment to read it before the close frame.
                let _ = tokio::time::timeout(Duration::from_secs(2), tx.stopped()).await;
                close(conn, ErrorCode::NoError, "node stopping");
                break SessionEnd::Shutdown;
            }
            msg = rx.recv() => match msg {
                Ok(Some(ControlDown::RotateNow)) => {
                    info!("the anchor asked for a certificate rotation");
                    if let Err(e) = send_renew(config, &mut tx).await {
                        break SessionEnd::Lost(e.into());
                    }
                    renewing = true;
                }
                Ok(Some(ControlDown::Renewed(r))) => {
                    renewing = false;
                    if let Err(e) = config.state.save_certificate(&r.cert_der, &r.ca_der) {
                        warn!(error = %e, "cannot save the renewed certificate");
                    } else {
                        stats.renewals.fetch_add(1, Ordering::Relaxed);
                        info!("certificate renewed");
                        if let Some(mesh) = &held.mesh
                            && let Ok(identity) = config.state.identity()
                        {
                            mesh.peers.set_tls(peer_tls(&identity, mesh.revoked.clone()));
                        }
                    }
                }
                Ok(Some(ControlDown::RenewRefused(r))) => {
                    renewing = false;
                    warn!(message = %r.message, "the anchor refused to renew the certificate");
                }
                Ok(Some(ControlDown::Anchors(list))) => {
                    learn_anchors(list, anchors, config, stats).await;
                    probe.set(anchors.several());
                }
                Ok(Some(ControlDown::Revoked(list))) => {
                    if learn_revoked(&list, &mut held.revoked, config, stats).await
                        && let Some(mesh) = &held.mesh
                    {
                        mesh.revoked.replace(held.revoked.clone());
                        mesh.peers.on_revoked(&*mesh.revoked);
                    }
                }
                Ok(Some(ControlDown::Directory(d))) => {
                    if let Some(mesh) = &held.mesh {
                        mesh.peers.on_directory(d);
                    }
                }
                Ok(Some(ControlDown::Punch(p))) => {
                    if let Some(mesh) = &held.mesh {
                        mesh.peers.on_punch(p);
                    }
                }
                Ok(Some(ControlDown::Unreachable(u))) => {
                    if let Some(mesh) = &held.mesh {
                        mesh.peers.on_unreachable(u);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break ended(conn),
            },
            _ = poll.tick(), if anchors.several() => {
                if silence.is_silent(received(conn), now()) {
                    info!(%anchor, silent_for = ?ANCHOR_SILENCE, "the anchor fell silent");
                    close(conn, ErrorCode::NoError, "anchor silent");
                    break SessionEnd::Lost(LinkError::Silent);
                }
            }
            _ = check.tick() => {
                if !renewing
                    && let Ok(Some(info)) = config.state.cert_info()
                    && info.renewal_due(SystemTime::now(), config.renew_fraction)
                {
                    if let Err(e) = send_renew(config, &mut tx).await {
                        break SessionEnd::Lost(e.into());
                    }
                    renewing = true;
                }
                let now = config.capabilities.infos();
                for cap in &now {
                    if !caps.iter().any(|c| c == cap) {
                        let event = ControlUp::Event(NodeEvent::CapabilityChanged(cap.clone()));
                        if let Err(e) = tx.send(&event).await {
                            return SessionEnd::Lost(e.into());
                        }
                    }
                }
                caps = now;
            }
            up = next_up(&mut held.mesh) => {
                if let Err(e) = tx.send(&up).await {
                    break SessionEnd::Lost(e.into());
                }
            }
            reason = conn.closed() => break SessionEnd::from_conn_error(reason),
        }
    };
    tasks.abort_all();
    if let Some(mesh) = &held.mesh {
        mesh.socket.set_relay(None);
        mesh.peers.anchor(None);
    }
    end
}

/// The next message the peers have for the anchor (never, without a mesh).
async fn next_up(mesh: &mut Option<Mesh>) -> ControlUp {
    match mesh {
        Some(m) => match m.uplink.recv().await {
            Some(up) => up,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The certificate and key a node presents to peers.
pub fn peer_tls(identity: &crate::state::Identity, revoked: Arc<SharedRevoked>) -> PeerTls {
    PeerTls {
        ca: identity.ca.clone(),
        chain: vec![identity.cert.clone()],
        key: Arc::new(identity.key.private_key_der()),
        revocation: revoked,
    }
}

/// Opens the relay stream of this session: packets for peers without a direct path go up it,
/// packets the anchor relays from peers come down it.
async fn start_relay(conn: &quinn::Connection, mesh: &Mesh, tasks: &mut JoinSet<()>) {
    let (send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot open the relay stream");
            return;
        }
    };
    let (mut tx, mut rx) = framed::<Relay, Relay>(send, recv);
    if tx.send(&Relay::Hello).await.is_err() {
        return;
    }
    let (queue, mut packets) = mpsc::channel::<RelayPacket>(RELAY_QUEUE);
    mesh.socket.set_relay(Some(queue));
    tasks.spawn(async move {
        while let Some(p) = packets.recv().await {
            if tx.send(&Relay::Packet(p)).await.is_err() {
                return;
            }
        }
    });
    let socket = mesh.socket.clone();
    tasks.spawn(async move {
        loop {
            match rx.recv().await {
                Ok(Some(Relay::Packet(p))) => socket.relay_received(p.peer, p.packet),
                Ok(Some(Relay::Hello)) => {}
                Ok(None) | Err(_) => {
                    socket.set_relay(None);
                    return;
                }
            }
        }
    });
}

/// Where this node's socket can be reached, as the node sees it: its bound address, or, bound
/// to every interface, the address its traffic to the anchor leaves from.
fn local_candidates(conn: &quinn::Connection, socket: &MeshSocket) -> Vec<std::net::SocketAddr> {
    use quinn::AsyncUdpSocket;
    let Ok(bound) = socket.local_addr() else {
        return Vec::new();
    };
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let ip = conn.local_ip().or_else(|| {
        // The kernel's choice of source address toward the anchor (no packet is sent).
        let unspecified: std::net::SocketAddr = if conn.remote_address().is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let probe = std::net::UdpSocket::bind(unspecified).ok()?;
        probe.connect(conn.remote_address()).ok()?;
        probe.local_addr().ok().map(|a| a.ip())
    });
    ip.map(|ip| vec![std::net::SocketAddr::new(ip, bound.port())])
        .unwrap_or_default()
}

/// Takes a part of the mesh's revocation set: into the held set, the status and (when it
/// changed) `revoked.json`. Whether it changed.
async fn learn_revoked(
    list: &RevokedList,
    held: &mut RevokedSet,
    config: &AgentConfig,
    stats: &AgentStats,
) -> bool {
    let (changed, dropped) = held.apply(list);
    if dropped {
        warn!(
            max = crate::revoked::MAX_HELD,
            "the revocation set is larger than a node holds; entries were dropped"
        );
    }
    if !changed {
        return false;
    }
    stats.set_revoked(held);
    debug!(
        devices = held.devices.len(),
        serials = held.serials.len(),
        "the revocation set changed"
    );
    let (state, set) = (config.state.clone(), held.clone());
    match tokio::task::spawn_blocking(move || state.save_revoked(&set)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot save the revocation set"),
        Err(e) => warn!(error = %e, "cannot save the revocation set"),
    }
    true
}

/// Takes the cluster's anchors as an anchor listed them: into the rotation, the status, and
/// (when they changed) the state directory. Addresses that are not `HOST:PORT` are skipped;
/// a list with none left changes nothing.
async fn learn_anchors(
    list: AnchorList,
    anchors: &mut AnchorSet,
    config: &AgentConfig,
    stats: &AgentStats,
) {
    let told: Vec<AnchorAddr> = list
        .addrs
        .iter()
        .filter_map(|a| match a.parse::<AnchorAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                debug!(error = %e, "skipping an anchor address the anchor sent");
                None
            }
        })
        .collect();
    if told.is_empty() {
        debug!("the anchor listed no usable anchor address");
        return;
    }
    let changed = anchors.update(told);
    stats.set_anchors(anchors.addrs());
    if !changed {
        return;
    }
    info!(anchors = ?anchors.told(), "the cluster's anchors changed");
    let (state, told) = (config.state.clone(), anchors.told().to_vec());
    match tokio::task::spawn_blocking(move || state.save_anchors(&told)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot save the cluster's anchors"),
        Err(e) => warn!(error = %e, "cannot save the cluster's anchors"),
    }
}

/// How a session ends when its control stream did: by the connection's close reason.
fn ended(conn: &quinn::Connection) -> SessionEnd {
    match conn.close_reason() {
        Some(reason) => SessionEnd::from_conn_error(reason),
        None => SessionEnd::Lost(LinkError::ControlStreamEnded),
    }
}

async fn send_renew(config: &AgentConfig, tx: &mut Tx) -> Result<(), RenewError> {
    let key = config.state.key()?.ok_or(RenewError::NoKey)?;
    let csr_der = key
        .csr_der(&config.name)
        .map_err(|e| RenewError::Csr(e.to_string()))?;
    tx.send(&ControlUp::Renew(RenewRequest { csr_der })).await?;
    Ok(())
}

async fn renew(
    config: &AgentConfig,
    stats: &AgentStats,
    tx: &mut Tx,
    rx: &mut Rx,
) -> Result<(), RenewError> {
    send_renew(config, tx).await?;
    match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
        Ok(Ok(Some(ControlDown::Renewed(r)))) => {
            config.state.save_certificate(&r.cert_der, &r.ca_der)?;
            stats.renewals.fetch_add(1, Ordering::Relaxed);
            info!("certificate renewed");
            Ok(())
        }
        Ok(Ok(Some(ControlDown::RenewRefused(r)))) => Err(RenewError::Refused(r.message)),
        _ => Err(RenewError::NoAnswer),
    }
}

/// Whether the heartbeat task sends probes between heartbeats: on a connection made with the
/// long keep-alive ([`transport::NODE_KEEP_ALIVE_INTERVAL`], one anchor known at the time) once
/// the node knows another anchor, so the silence watch gets an answer every
/// [`transport::KEEP_ALIVE_INTERVAL`] as on a connection made with the short one.
///
/// A probe is the last heartbeat sent again, with its sequence number: the anchor drops it as
/// a duplicate (anchors of every version do), and its QUIC stack acknowledges it like a PING.
/// quinn sets the keep-alive once per connection, hence this.
#[derive(Debug, Clone)]
struct Probe {
    /// The connection already has the short keep-alive: never probe.
    short_keep_alive: bool,
    several: Arc<std::sync::atomic::AtomicBool>,
}

impl Probe {
    fn new(short_keep_alive: bool) -> Probe {
        Probe {
            short_keep_alive,
            several: Arc::default(),
        }
    }

    /// The node knows `several` anchors now.
    fn set(&self, several: bool) {
        self.several.store(several, Ordering::Relaxed);
    }

    fn wanted(&self) -> bool {
        !self.short_keep_alive && self.several.load(Ordering::Relaxed)
    }
}

async fn heartbeats(
    conn: quinn::Connection,
    origin: Instant,
    interval: Duration,
    phase: Duration,
    seed: u64,
    stats: Arc<AgentStats>,
    probe: Probe,
) {
    let mut jitter = Jitter::new(seed);
    tokio::time::sleep(phase).await;
    let mut seq = 0u64;
    loop {
        let hb = Datagram::Heartbeat(Heartbeat {
            seq,
            node_time_ms: origin.elapsed().as_millis() as u64,
            load_centi: crate::capability::load_average().map(|l| (l[0] * 100.0) as u32),
            running: 0,
        });
        let mut last = None;
        if let Ok(bytes) = hb.encode() {
            let bytes = bytes::Bytes::from(bytes);
            match conn.send_datagram(bytes.clone()) {
                Ok(()) => {
                    stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                    stats.sample_link(&conn);
                    last = Some(bytes);
                }
                Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
                Err(e) => debug!(error = %e, "heartbeat not sent"),
            }
        }
        seq += 1;
        // ±10 % so a fleet that started together drifts apart.
        let spread = interval / 5;
        let next = interval - interval / 10 + jitter.below(spread + Duration::from_millis(1));
        let due = Instant::now() + next;
        loop {
            let left = due.saturating_duration_since(Instant::now());
            if left <= transport::KEEP_ALIVE_INTERVAL {
                tokio::time::sleep(left).await;
                break;
            }
            tokio::time::sleep(transport::KEEP_ALIVE_INTERVAL).await;
            if probe.wanted()
                && let Some(bytes) = &last
                && let Err(quinn::SendDatagramError::ConnectionLost(_)) =
                    conn.send_datagram(bytes.clone())
            {
                return;
            }
        }
    }
}

/// Datagrams from the anchor: invocation copies (see [`crate::copies`]), and the heartbeat
/// acks of anchors of earlier versions (counted).
async fn datagrams(copies: CopyServer) {
    loop {
        let bytes = match copies.conn.read_datagram().await {
            Ok(b) => b,
            Err(_) => return,
        };
        match Datagram::decode(&bytes) {
            Ok(Datagram::InvokeCopy(req)) if req.validate().is_ok() => copies.serve(req),
            Ok(Datagram::HeartbeatAck(_)) => {
                copies.stats.acks_received.fetch_add(1, Ordering::Relaxed);
            }
            _ => debug!("dropped a datagram that is not one the anchor sends"),
        }
    }
}

/// Serves invocation streams opened by the anchor.
async fn invocations(copies: CopyServer) {
    loop {
        let (send, recv) = match copies.conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let copies = copies.clone();
        tokio::spawn(async move {
            let (mut tx, mut rx) = framed::<InvokeReply, InvokeRequest>(send, recv);
            let req = match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
                Ok(Ok(Some(r))) => r,
                Ok(Err(e)) if e.is_peer_fault() => {
                    tx.reset(e.code());
                    return;
                }
                _ => return,
            };
            let stats = &copies.stats;
            let counters = Counters {
                duplicates: &stats.duplicates,
                expired: &stats.invocations_expired,
                run: &stats.invocations_run,
            };
            let id = req.id;
            let result = handle_invocation(
                req,
                &copies.registry,
                &copies.permits,
                counters,
                &copies.seen,
            )
            .await;
            let _ = tx.send(&InvokeReply::Result(result.clone())).await;
            let _ = tx.finish();
            copies.finished(id, &result);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_rounds_retry_at_a_steady_pace_while_an_anchor_restarts() {
        let t0 = Instant::now();
        let mut p = RoundPause::new(Duration::from_secs(30), 11);
        // Backing off already (the anchor was unreachable for a while) ...
        for _ in 0..6 {
            p.delay(t0);
        }
        assert!(p.delay(t0) >= Duration::from_secs(15), "the backoff grew");
        // ... then the anchor said it was shutting down: a second or so, doubling with each
        // round that fails, to a few seconds however many fail.
        p.expect_anchor_soon(t0);
        let first = p.delay(t0);
        assert!(
            first >= RESTART_RETRY / 2 && first <= RESTART_RETRY * 3 / 2,
            "{first:?}"
        );
        let second = p.delay(t0 + Duration::from_secs(1));
        assert!(
            second >= RESTART_RETRY && second <= RESTART_RETRY * 3,
            "{second:?}"
        );
        for i in 2..50 {
            let d = p.delay(t0 + Duration::from_secs(i));
            assert!(d <= RESTART_RETRY_MAX * 3 / 2, "{d:?} at {i} s");
            if i >= 3 {
                assert!(d >= RESTART_RETRY_MAX / 2, "{d:?} at {i} s");
            }
        }
        assert!(p.steady(t0 + RESTART_PATIENCE / 2));
        // Past the patience, the backoff takes over again where it was.
        assert!(!p.steady(t0 + RESTART_PATIENCE));
        assert!(p.delay(t0 + RESTART_PATIENCE) >= Duration::from_secs(15));
        // Once a handshake finished, the next restart starts the pace again.
        p.expect_anchor_soon(t0);
        p.anchor_back();
        p.reset();
        assert!(p.delay(t0) <= RECONNECT_BASE);
        p.expect_anchor_soon(t0);
        assert!(p.delay(t0) <= RESTART_RETRY * 3 / 2);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(30), 7);
        let delays: Vec<Duration> = (0..12).map(|_| b.delay()).collect();
        assert!(delays[0] <= RECONNECT_BASE && delays[0] >= RECONNECT_BASE / 2);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(delays[11] >= Duration::from_secs(15), "{delays:?}");
        b.reset();
        assert!(b.delay() <= RECONNECT_BASE);
        let mut other = Backoff::new(Duration::from_secs(30), 8);
        let others: Vec<Duration> = (0..12).map(|_| other.delay()).collect();
        assert_ne!(delays, others, "different seeds spread reconnects");
    }

    #[test]
    fn handshake_limit_starts_short_doubles_on_timeouts_and_resets() {
        let mut l = HandshakeLimit::new(3);
        let first = l.get(HANDSHAKE_TIMEOUT);
        let quarter = FIRST_HANDSHAKE_LIMIT / 4;
        assert!(
            first >= FIRST_HANDSHAKE_LIMIT - quarter && first <= FIRST_HANDSHAKE_LIMIT + quarter
        );
        let mut limits = Vec::new();
        for _ in 0..6 {
            l.timed_out();
            limits.push(l.get(HANDSHAKE_TIMEOUT));
        }
        assert!(limits[0] >= FIRST_HANDSHAKE_LIMIT * 3 / 2, "{limits:?}");
        assert!(limits.iter().all(|d| *d <= HANDSHAKE_TIMEOUT), "{limits:?}");
        assert!(limits[5] >= HANDSHAKE_TIMEOUT * 3 / 4, "{limits:?}");
        // Never above the cap asked for (another anchor known).
        assert!(l.get(ANCHOR_SILENCE) <= ANCHOR_SILENCE);
        l.finished();
        assert!(l.get(HANDSHAKE_TIMEOUT) <= FIRST_HANDSHAKE_LIMIT + quarter);
        let mut other = HandshakeLimit::new(4);
        assert_ne!(
            (0..8).map(|_| l.get(HANDSHAKE_TIMEOUT)).collect::<Vec<_>>(),
            (0..8)
                .map(|_| other.get(HANDSHAKE_TIMEOUT))
                .collect::<Vec<_>>(),
            "different seeds spread attempts"
        );
    }
}
