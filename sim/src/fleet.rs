//! The simulated fleet: a real anchor and real node agents on a netsim network.
//!
//! The anchor is the production one (store, pairing, presence, invocations); its QUIC side and
//! the nodes live on an in-process [`Network`], so loss, delay, partitions and address changes
//! are the simulation's to choose, with a seed that replays them. Nodes run through
//! [`anchorage_node::run`], the entry point of `anchor-node run`. Operators act through the
//! anchor's console backend (the code the HTTP routes call), so no HTTP server is needed;
//! the demo adds one on a real TCP port.
//!
//! Tests run it on tokio's paused clock ([`Sim::start`]: a temporary data directory, the
//! anchor's test configuration, a clock that follows tokio's); the demo runs it on the real
//! clock with its own configuration ([`Sim::open`]). The `try_` methods return errors; the
//! others are for tests and panic with a message saying what did not happen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{
    MintCodeRequest, PairMethod, PairingRequest, Principal, RequestState,
};
use anchorage_daemon::backend::AnchorBackend;
use anchorage_daemon::{Anchor, AnchorConfig, Clock, StartError};
use anchorage_netsim::{Host, LinkConfig, Network};
use anchorage_node::agent::AgentStats;
use anchorage_node::pair::{PairCode, PairError, PairOptions, Paired};
use anchorage_node::state::StateDir;
use anchorage_node::{RunConfig, RunError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The anchor's QUIC port in simulations.
pub const ANCHOR_PORT: u16 = 7444;

/// How long [`Sim::try_pair`] waits for the node's request to show up as pending.
pub const PENDING_LIMIT: Duration = Duration::from_secs(120);

/// Why a simulated fleet could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The anchor did not start (data directory locked or damaged, TLS).
    #[error(transparent)]
    Anchor(#[from] StartError),
    /// The link configuration is invalid.
    #[error("simulated network: {0}")]
    Link(String),
    /// A simulated or real socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The owner token does not authenticate (a damaged data directory).
    #[error("the owner token does not authenticate")]
    Owner,
    /// A console operation failed (its stable code and message).
    #[error("console: {0}")]
    Console(String),
    /// The node's pairing request never showed up.
    #[error("no pending request from {0}")]
    NoRequest(String),
    /// The node's pairing failed.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The pairing code is malformed.
    #[error(transparent)]
    Code(#[from] anchorage_node::pair::CodeError),
}

/// An anchor on a simulated network.
pub struct Sim {
    /// The network; add hosts, partition, heal.
    pub net: Network,
    /// The anchor's host.
    pub anchor_host: Host,
    /// The owner principal, for console calls.
    pub owner: Principal,
    /// The anchor's configuration (kept for [`Sim::restart`]).
    pub config: AnchorConfig,
    /// The anchor's data directory.
    pub data_dir: PathBuf,
    port: u16,
    clock: Clock,
    anchor: Option<Anchor>,
    backend: Option<Arc<AnchorBackend>>,
    serve: Option<JoinHandle<()>>,
    _scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.net.seed())
            .field("anchor", &self.addr())
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// Starts an anchor on a new network with `seed`, every link set to `link`, in a temporary
    /// data directory with the anchor's test configuration (after `tweak`), on a clock that
    /// follows tokio's. For tests; panics if any of it fails.
    pub async fn start(seed: u64, link: LinkConfig, tweak: impl FnOnce(&mut AnchorConfig)) -> Sim {
        let net = Network::new(seed);
        net.set_default_link(link).expect("valid link");
        let scratch = tempfile::tempdir().expect("a temporary directory");
        let mut config = AnchorConfig::for_tests(scratch.path());
        tweak(&mut config);
        let mut sim = Sim::open(net, config, Clock::tokio(), ANCHOR_PORT)
            .await
            .unwrap_or_else(|e| panic!("the simulated anchor did not start: {e}"));
        sim._scratch = Some(scratch);
        sim
    }

    /// Starts an anchor with `config` (its data directory is used as it is) on `net`, its
    /// QUIC side on a host named `anchor` at `port`.
    pub async fn open(
        net: Network,
        config: AnchorConfig,
        clock: Clock,
        port: u16,
    ) -> Result<Sim, SimError> {
        let anchor_host = net.add_host("anchor");
        let (anchor, serve) = open_anchor(&anchor_host, &config, clock, port, 1).await?;
        let backend = anchor.backend();
        let owner = backend
            .authenticate(&anchor.owner_token()?)
            .await
            .ok_or(SimError::Owner)?;
        Ok(Sim {
            net,
            anchor_host,
            owner,
            data_dir: config.data_dir.clone(),
            config,
            port,
            clock,
            anchor: Some(anchor),
            backend: Some(backend),
            serve: Some(serve),
            _scratch: None,
        })
    }

    /// The anchor (panics between [`Sim::stop`] and [`Sim::restart`]).
    pub fn anchor(&self) -> &Anchor {
        self.anchor.as_ref().expect("anchor running")
    }

    /// The console backend of the anchor (panics while it is stopped).
    pub fn backend(&self) -> &AnchorBackend {
        self.backend.as_ref().expect("anchor running")
    }

    /// `method path` through the anchor's console router (in process, no socket) with
    /// `token` and an optional body of the given content type: the status and the JSON
    /// answer (`Null` when the answer is not JSON). Panics on a transport failure.
    pub async fn console_call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
    ) -> (axum::http::StatusCode, serde_json::Value) {
        use tower::ServiceExt;
        let router = anchorage_console::router(self.anchor().backend());
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        if let Some((content_type, _)) = &body {
            req = req.header("content-type", *content_type);
        }
        let req = req
            .body(body.map_or_else(axum::body::Body::empty, |(_, b)| b.into()))
            .expect("a valid request");
        let resp = router.oneshot(req).await.expect("the router answers");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .expect("a body of at most 4 MiB");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The anchor's address on the simulated network.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.anchor_host.ip(), self.port)
    }

    /// Stops the anchor cleanly (as on SIGTERM) and waits for its QUIC side to close.
    pub async fn stop(&mut self) {
        if let Some(anchor) = self.anchor.take() {
            anchor.shutdown();
        }
        self.backend = None;
        if let Some(serve) = self.serve.take() {
            serve.await.expect("the anchor's QUIC task does not panic");
        }
    }

    /// Stops and starts the anchor on the same data directory and address (panics if it does
    /// not come back within five seconds).
    pub async fn restart(&mut self) {
        self.stop().await;
        // The previous store may still be closing: retry for a while.
        let (anchor, serve) =
            open_anchor(&self.anchor_host, &self.config, self.clock, self.port, 100)
                .await
                .unwrap_or_else(|e| panic!("the anchor did not open again: {e}"));
        self.backend = Some(anchor.backend());
        self.anchor = Some(anchor);
        self.serve = Some(serve);
    }

    /// A node host with its own temporary state directory (panics if the host's socket or the
    /// directory cannot be made).
    pub fn add_node(&self, name: &str) -> SimNode {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut node = self
            .add_node_at(name, dir.path().join("state"))
            .expect("a simulated socket");
        node._dir = Some(dir);
        node
    }

    /// A node host keeping its state in `state_dir` (a node already paired there stays
    /// paired: the demo's nodes survive a restart of the demo).
    pub fn add_node_at(
        &self,
        name: &str,
        state_dir: impl Into<PathBuf>,
    ) -> Result<SimNode, SimError> {
        self.node_on(name, self.net.add_host(name), state_dir)
    }

    /// A node host behind `nat` (a private address; the anchor and peers see the NAT's),
    /// with its own temporary state directory (panics if the socket or directory cannot be
    /// made).
    pub fn add_node_behind(&self, name: &str, nat: &anchorage_netsim::Nat) -> SimNode {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut node = self
            .node_on(name, nat.add_host(name), dir.path().join("state"))
            .expect("a simulated socket");
        node._dir = Some(dir);
        node
    }

    fn node_on(
        &self,
        name: &str,
        host: Host,
        state_dir: impl Into<PathBuf>,
    ) -> Result<SimNode, SimError> {
        let endpoint = host.endpoint(0, None).map_err(|source| SimError::Bind {
            addr: SocketAddr::new(host.ip(), 0),
            source,
        })?;
        Ok(SimNode {
            name: name.to_string(),
            platform: "sim-test".into(),
            host,
            endpoint,
            state: StateDir::new(state_dir),
            _dir: None,
        })
    }

    /// Mints a code as the owner.
    pub async fn try_mint(
        &self,
        method: PairMethod,
        ttl_secs: Option<u64>,
    ) -> Result<String, SimError> {
        let minted = self
            .backend()
            .mint_code(
                &self.owner,
                MintCodeRequest {
                    method,
                    ttl_secs,
                    labels: Default::default(),
                },
            )
            .await
            .map_err(|e| SimError::Console(e.message))?;
        Ok(minted.code)
    }

    /// Mints a code as the owner (panics if the anchor refuses).
    pub async fn mint(&self, method: PairMethod, ttl_secs: Option<u64>) -> String {
        self.try_mint(method, ttl_secs)
            .await
            .unwrap_or_else(|e| panic!("minting a code: {e}"))
    }

    /// Waits up to `limit` (of the sim's clock) for a pending request of `device_name`.
    pub async fn pending(&self, device_name: &str, limit: Duration) -> Option<PairingRequest> {
        eventually(limit, || async {
            self.backend()
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .ok()?
                .into_iter()
                .find(|r| r.device_name == device_name)
        })
        .await
    }

    /// Waits (in simulated time) for a pending request of `device_name`; panics after
    /// [`PENDING_LIMIT`].
    pub async fn wait_pending(&self, device_name: &str) -> PairingRequest {
        self.pending(device_name, PENDING_LIMIT)
            .await
            .unwrap_or_else(|| panic!("no pending request from {device_name}"))
    }

    /// Pairs `node` end to end: mints a PIN, pairs, approves as the owner once the request is
    /// pending.
    pub async fn try_pair(&self, node: &SimNode) -> Result<Paired, SimError> {
        let code = self.try_mint(PairMethod::Pin, None).await?;
        let task = node.try_spawn_pair(self.addr(), &code)?;
        let Some(req) = self.pending(&node.name, PENDING_LIMIT).await else {
            task.abort();
            return Err(SimError::NoRequest(node.name.clone()));
        };
        self.backend()
            .approve(&self.owner, &req.request_id)
            .await
            .map_err(|e| SimError::Console(e.message))?;
        match task.await {
            Ok(result) => Ok(result?),
            Err(e) => Err(SimError::Console(format!("the pairing task failed: {e}"))),
        }
    }

    /// Pairs `node` end to end (panics if pairing fails).
    pub async fn pair(&self, node: &SimNode) -> Paired {
        self.try_pair(node)
            .await
            .unwrap_or_else(|e| panic!("pairing {} failed: {e}", node.name))
    }
}

/// Opens the anchor and serves QUIC on `host:port`, trying `attempts` times 50 ms apart (a
/// restart may find the previous store still closing).
async fn open_anchor(
    host: &Host,
    config: &AnchorConfig,
    clock: Clock,
    port: u16,
    attempts: usize,
) -> Result<(Anchor, JoinHandle<()>), SimError> {
    let mut tries = 0;
    let anchor = loop {
        tries += 1;
        match Anchor::open(config.clone(), clock) {
            Ok(anchor) => break anchor,
            Err(e) if tries >= attempts => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut tries = 0;
    let endpoint = loop {
        tries += 1;
        match host.endpoint(port, Some(anchor.server_config()?)) {
            Ok(e) => break e,
            // The previous anchor's socket may not be released yet.
            Err(source) if tries >= attempts.max(20) => {
                return Err(SimError::Bind {
                    addr: SocketAddr::new(host.ip(), port),
                    source,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let a = anchor.clone();
    let serve = tokio::spawn(async move { a.serve(endpoint).await });
    Ok((anchor, serve))
}

/// A node on the simulated network.
pub struct SimNode {
    /// The name it pairs and registers with.
    pub name: String,
    /// The platform it reports (`sim-test` unless changed).
    pub platform: String,
    /// Its host: partition it, rebind it.
    pub host: Host,
    /// Its QUIC endpoint, shared by pairing and the agent.
    pub endpoint: quinn::Endpoint,
    /// Its state directory.
    pub state: StateDir,
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode")
            .field("name", &self.name)
            .field("ip", &self.host.ip())
            .field("state", &self.state.path())
            .finish_non_exhaustive()
    }
}

impl SimNode {
    /// Pairing options for `code` (a PIN or a QR URI).
    pub fn try_opts(&self, anchor: SocketAddr, code: &str) -> Result<PairOptions, SimError> {
        let code = anchorage_node::pair::parse_code(Some(code), None)?;
        Ok(self.opts_with(anchor, code))
    }

    /// Pairing options for `code` (panics on a malformed code).
    pub fn opts(&self, anchor: SocketAddr, code: &str) -> PairOptions {
        self.try_opts(anchor, code).expect("a valid code")
    }

    fn opts_with(&self, anchor: SocketAddr, code: PairCode) -> PairOptions {
        PairOptions {
            anchor: anchor.to_string(),
            anchor_addr: anchor,
            code,
            device_name: self.name.clone(),
            platform: self.platform.clone(),
        }
    }

    /// Starts pairing with `code` in a task (panics on a malformed code).
    pub fn spawn_pair(
        &self,
        anchor: SocketAddr,
        code: &str,
    ) -> JoinHandle<Result<Paired, PairError>> {
        self.try_spawn_pair(anchor, code).expect("a valid code")
    }

    /// Starts pairing with `code` in a task.
    pub fn try_spawn_pair(
        &self,
        anchor: SocketAddr,
        code: &str,
    ) -> Result<JoinHandle<Result<Paired, PairError>>, SimError> {
        let (endpoint, state, opts) = (
            self.endpoint.clone(),
            self.state.clone(),
            self.try_opts(anchor, code)?,
        );
        Ok(tokio::spawn(async move {
            anchorage_node::pair::pair(&endpoint, &state, &opts, |p| {
                tracing::debug!(progress = ?p, "pairing");
            })
            .await
        }))
    }

    /// Pairs with `code` and waits for the result.
    pub async fn pair_with(&self, anchor: SocketAddr, code: PairCode) -> Result<Paired, PairError> {
        let opts = self.opts_with(anchor, code);
        anchorage_node::pair::pair(&self.endpoint, &self.state, &opts, |_| {}).await
    }

    /// The node's run configuration in a simulation: this host's endpoint, `anchor`, no
    /// `status.json`, and a jitter seed derived from the host's address and the network's
    /// seed, so each node has its own and a run replays.
    pub fn run_config(&self, anchor: SocketAddr) -> RunConfig {
        let mut config = RunConfig::new(anchorage_node::config::NodeConfig::default());
        config.node.name = Some(self.name.clone());
        config.anchor_addr = Some(anchor);
        config.endpoint = Some(self.endpoint.clone());
        config.platform = self.platform.clone();
        config.status_every = None;
        config.seed = Some(
            match self.host.ip() {
                std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
                std::net::IpAddr::V6(v6) => u128::from(v6) as u64,
            } ^ self.host.network().seed().rotate_left(29),
        );
        config
    }

    /// Starts the node with the peer mesh: its one endpoint on a new socket of this host (the
    /// pairing endpoint stays for pairing), no local API. [`RunningAgent::peers`] holds its
    /// peers once it runs.
    pub fn start_mesh_agent(
        &self,
        anchor: SocketAddr,
        tweak: impl FnOnce(&mut RunConfig),
    ) -> RunningAgent {
        let mut config = self.run_config(anchor);
        config.endpoint = None;
        config.local_api = false;
        let socket = self.host.bind(0).expect("a simulated socket");
        config.socket = Some(socket);
        tweak(&mut config);
        start_node(config, self.state.clone())
    }

    /// Starts the node (built-in capabilities, plus what `tweak` adds) against `anchor`.
    pub fn start_agent(
        &self,
        anchor: SocketAddr,
        tweak: impl FnOnce(&mut RunConfig),
    ) -> RunningAgent {
        let mut config = self.run_config(anchor);
        tweak(&mut config);
        start_node(config, self.state.clone())
    }
}

/// Starts a node with `config` in a task: [`anchorage_node::run`] until
/// [`RunningAgent::stop`].
pub fn start_node(config: RunConfig, state: StateDir) -> RunningAgent {
    let stats = config.stats.clone();
    let peers = config.peers.clone();
    let (stop, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(anchorage_node::run(config, state, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    RunningAgent {
        task,
        stats,
        stop,
        peers,
    }
}

/// A node agent running in a task.
#[derive(Debug)]
pub struct RunningAgent {
    /// The task; it ends with the agent's result.
    pub task: JoinHandle<Result<(), RunError>>,
    /// The agent's counters.
    pub stats: Arc<AgentStats>,
    /// Its peers, once it runs them (agents started with the mesh).
    pub peers: Arc<std::sync::OnceLock<Arc<anchorage_node::peer::Peers>>>,
    /// Set to `true` to stop it cleanly.
    pub stop: watch::Sender<bool>,
}

impl RunningAgent {
    /// Waits until the agent has registered `n` times in total and is connected.
    pub async fn registered(&self, n: u64, limit: Duration) -> bool {
        eventually(limit, || async {
            (self.stats.registrations.load(Ordering::Relaxed) >= n
                && self.stats.connected.load(Ordering::Relaxed))
            .then_some(())
        })
        .await
        .is_some()
    }

    /// Whether it is connected now.
    pub fn connected(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed)
    }

    /// Stops the agent cleanly and waits for it (panics if its task panicked).
    pub async fn stop(self) -> Result<(), RunError> {
        let _ = self.stop.send(true);
        self.task.await.expect("the agent task does not panic")
    }
}

/// Polls `f` every 50 ms of (simulated) time until it returns `Some`, up to `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A link with independent `loss` and otherwise LAN-like (20 ms ± 5 ms each way).
pub fn lossy(loss: f64) -> LinkConfig {
    LinkConfig {
        loss: anchorage_netsim::Loss::Independent(loss),
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        ..LinkConfig::ideal()
    }
}
