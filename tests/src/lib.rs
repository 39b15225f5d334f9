//! The harness the end-to-end tests share: an anchor and nodes on a netsim network, on tokio's
//! paused clock, with the real daemon, node and console code.
//!
//! Operators act through the real console backend (the same code the HTTP routes call), so the
//! simulation needs no HTTP server; the HTTP layer has its own tests on real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: failing loudly is the point
#![allow(missing_docs)]

pub mod prom;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{
    MintCodeRequest, PairMethod, PairingRequest, Principal, RequestState,
};
use anchorage_daemon::backend::AnchorBackend;
use anchorage_daemon::{Anchor, AnchorConfig, Clock};
use anchorage_netsim::{Host, LinkConfig, Network};
use anchorage_node::pair::{PairCode, PairError, PairOptions, Paired};
use anchorage_node::state::StateDir;
use std::sync::atomic::Ordering;

use anchorage_node::agent::{self, AgentConfig, AgentError, AgentStats};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The anchor's QUIC port in simulations.
pub const ANCHOR_PORT: u16 = 7444;

/// An anchor on a simulated network.
pub struct Sim {
    pub net: Network,
    pub anchor_host: Host,
    anchor: Option<Anchor>,
    backend: Option<Arc<AnchorBackend>>,
    pub owner: Principal,
    pub config: AnchorConfig,
    pub data_dir: tempfile::TempDir,
    serve: Option<JoinHandle<()>>,
}

impl Sim {
    /// Starts an anchor on a new network with `seed`, every link set to `link`.
    pub async fn start(seed: u64, link: LinkConfig, tweak: impl FnOnce(&mut AnchorConfig)) -> Sim {
        let net = Network::new(seed);
        net.set_default_link(link).expect("valid link");
        let anchor_host = net.add_host("anchor");
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = AnchorConfig::for_tests(data_dir.path());
        tweak(&mut config);
        let (anchor, serve) = Self::open(&anchor_host, &config).await;
        let backend = anchor.backend();
        let owner = backend
            .authenticate(&anchor.owner_token().unwrap())
            .await
            .expect("owner token authenticates");
        Sim {
            net,
            anchor_host,
            anchor: Some(anchor),
            backend: Some(backend),
            owner,
            config,
            data_dir,
            serve: Some(serve),
        }
    }

    async fn open(host: &Host, config: &AnchorConfig) -> (Anchor, JoinHandle<()>) {
        // A restart may find the previous store still closing; retry briefly.
        let mut last = None;
        for _ in 0..100 {
            match Anchor::open(config.clone(), Clock::tokio()) {
                Ok(anchor) => {
                    let endpoint = loop {
                        match host.endpoint(ANCHOR_PORT, Some(anchor.server_config().unwrap())) {
                            Ok(e) => break e,
                            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    };
                    let a = anchor.clone();
                    let serve = tokio::spawn(async move { a.serve(endpoint).await });
                    return (anchor, serve);
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        panic!("anchor did not open: {last:?}");
    }

    /// The anchor (panics between `stop` and `restart`).
    pub fn anchor(&self) -> &Anchor {
        self.anchor.as_ref().expect("anchor running")
    }

    /// The console backend of the anchor.
    pub fn backend(&self) -> &AnchorBackend {
        self.backend.as_ref().expect("anchor running")
    }

    /// The anchor's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.anchor_host.ip(), ANCHOR_PORT)
    }

    /// Stops the anchor cleanly (as on SIGTERM).
    pub async fn stop(&mut self) {
        if let Some(anchor) = self.anchor.take() {
            anchor.shutdown();
        }
        self.backend = None;
        if let Some(serve) = self.serve.take() {
            serve.await.unwrap();
        }
    }

    /// Stops and starts the anchor on the same data directory and address.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (anchor, serve) = Self::open(&self.anchor_host, &self.config).await;
        self.backend = Some(anchor.backend());
        self.anchor = Some(anchor);
        self.serve = Some(serve);
    }

    /// A node host with its own state directory.
    pub fn add_node(&self, name: &str) -> SimNode {
        let host = self.net.add_host(name);
        let endpoint = host.endpoint(0, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        SimNode {
            name: name.to_string(),
            host,
            endpoint,
            state: StateDir::new(dir.path().join("state")),
            dir,
        }
    }

    /// Mints a code as the owner.
    pub async fn mint(&self, method: PairMethod, ttl_secs: Option<u64>) -> String {
        self.backend()
            .mint_code(&self.owner, MintCodeRequest { method, ttl_secs })
            .await
            .unwrap()
            .code
    }

    /// Waits (in simulated time) for a pending request of `device_name`.
    pub async fn wait_pending(&self, device_name: &str) -> PairingRequest {
        eventually(Duration::from_secs(120), || async {
            self.backend()
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.device_name == device_name)
        })
        .await
        .unwrap_or_else(|| panic!("no pending request from {device_name}"))
    }

    /// Pairs `node` end to end: mint a PIN, pair, approve.
    pub async fn pair(&self, node: &SimNode) -> Paired {
        let code = self.mint(PairMethod::Pin, None).await;
        let task = node.spawn_pair(self.addr(), &code);
        let req = self.wait_pending(&node.name).await;
        self.backend()
            .approve(&self.owner, &req.request_id)
            .await
            .unwrap();
        task.await.unwrap().expect("pairing succeeds")
    }
}

/// A node on the simulated network.
pub struct SimNode {
    pub name: String,
    pub host: Host,
    pub endpoint: quinn::Endpoint,
    pub state: StateDir,
    pub dir: tempfile::TempDir,
}

impl SimNode {
    /// Pairing options for `code` (a PIN or a QR URI).
    pub fn opts(&self, anchor: SocketAddr, code: &str) -> PairOptions {
        PairOptions {
            anchor: anchor.to_string(),
            anchor_addr: anchor,
            code: anchorage_node::pair::parse_code(Some(code), None).expect("valid code"),
            device_name: self.name.clone(),
            platform: "sim-test".into(),
        }
    }

    /// Starts pairing in a task.
    pub fn spawn_pair(
        &self,
        anchor: SocketAddr,
        code: &str,
    ) -> JoinHandle<Result<Paired, PairError>> {
        let (endpoint, state, opts) = (
            self.endpoint.clone(),
            self.state.clone(),
            self.opts(anchor, code),
        );
        tokio::spawn(async move {
            anchorage_node::pair::pair(&endpoint, &state, &opts, |p| {
                if std::env::var_os("SIM_DEBUG").is_some() {
                    eprintln!("progress: {p:?}")
                }
            })
            .await
        })
    }

    /// Starts the node agent with the built-in capabilities plus `extra`.
    pub fn start_agent(
        &self,
        anchor: SocketAddr,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> RunningAgent {
        let identity = self.state.identity().expect("paired");
        let facts = anchorage_node::capability::NodeFacts {
            device_id: identity.cert_info.key_id.to_string(),
            name: self.name.clone(),
            platform: "sim-test".into(),
            agent_version: "test".into(),
            started: std::time::Instant::now(),
        };
        let registry = anchorage_node::capability::Registry::builtins(facts);
        let mut config = AgentConfig::new(self.state.clone(), self.name.clone(), registry);
        config.status_every = None;
        // Each node its own jitter, repeatable with the network: derived from its address.
        config.seed = match self.host.ip() {
            std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
            std::net::IpAddr::V6(v6) => u128::from(v6) as u64,
        } ^ self.host.network().seed().rotate_left(29);
        tweak(&mut config);
        let stats = Arc::new(AgentStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let endpoint = self.endpoint.clone();
        let s = stats.clone();
        let task =
            tokio::spawn(async move { agent::run(endpoint, anchor, config, s, stop_rx).await });
        RunningAgent { task, stats, stop }
    }

    /// Pairs with `code` and waits for the result.
    pub async fn pair_with(&self, anchor: SocketAddr, code: PairCode) -> Result<Paired, PairError> {
        let mut opts = self.opts(anchor, "AAAA-000000");
        opts.code = code;
        anchorage_node::pair::pair(&self.endpoint, &self.state, &opts, |_| {}).await
    }
}

/// A node agent running in a task.
pub struct RunningAgent {
    pub task: JoinHandle<Result<(), AgentError>>,
    pub stats: Arc<AgentStats>,
    pub stop: watch::Sender<bool>,
}

impl RunningAgent {
    /// Waits until the agent has registered `n` times in total.
    pub async fn registered(&self, n: u64, limit: Duration) -> bool {
        eventually(limit, || async {
            (self.stats.registrations.load(Ordering::Relaxed) >= n
                && self.stats.connected.load(Ordering::Relaxed))
            .then_some(())
        })
        .await
        .is_some()
    }

    /// Stops the agent cleanly and waits for it.
    pub async fn stop(self) -> Result<(), AgentError> {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
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

/// A link with independent `loss` and otherwise LAN-like.
pub fn lossy(loss: f64) -> LinkConfig {
    LinkConfig {
        loss: anchorage_netsim::Loss::Independent(loss),
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        ..LinkConfig::ideal()
    }
}
