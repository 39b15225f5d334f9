//! The node's one entry point: [`run`] a paired node from its configuration until shutdown.
//!
//! `anchor-node run`, the simulated fleet (its demo, tests and benchmarks) all go through
//! here, so the capability registry, the facts the built-ins report and the agent's settings
//! are assembled in one place. The binary passes a real UDP socket or none; a simulation
//! passes a netsim endpoint and the anchors' simulated addresses.
//!
//! Which anchors are dialed, first found first: [`RunConfig::anchor_addr`] and
//! [`RunConfig::anchor_addrs`] (fixed addresses); else the configuration's `anchor` and
//! `anchors` (which `anchor-node run --anchor` replaces); else the cluster's anchors saved in
//! the state directory (`anchors.json`) and the anchor the node paired with. Given addresses
//! stay in the rotation as seeds whatever an anchor lists; see [`crate::anchors`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::agent::{self, AgentConfig, AgentError, AgentStats, Mesh};
use crate::anchors::{AnchorAddr, AnchorSet, ResolveError, resolve_first};
use crate::capability::{self, Capability, CommandCap, NodeFacts, Registry};
use crate::config::{ConfigError, NodeConfig};
use crate::mesh::socket::MeshSocket;
use crate::peer::Peers;
use crate::revoked::SharedRevoked;
use crate::state::{StateDir, StateError};

/// How long a node that opened its own socket waits for its connection to close cleanly.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Everything a node runs with besides its state directory.
#[derive(Clone)]
#[non_exhaustive]
pub struct RunConfig {
    /// The node's configuration file (name, anchor override, limits, command capabilities).
    pub node: NodeConfig,
    /// Where to dial: one fixed address, never resolved. `None` (and no `anchor_addrs`):
    /// `node.anchor` and `node.anchors`, else the anchors saved in the state directory.
    pub anchor_addr: Option<SocketAddr>,
    /// More fixed addresses to dial, after `anchor_addr`.
    pub anchor_addrs: Vec<SocketAddr>,
    /// The UDP socket to run on (a simulation's). The node builds its one endpoint on it,
    /// for the anchor and for peers. `None` (and no `endpoint`): a new UDP socket of the
    /// anchor's family.
    pub socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    /// A QUIC endpoint to dial the anchor from, without the peer mesh (tests of the anchor
    /// link alone). Ignored when `socket` is given.
    pub endpoint: Option<quinn::Endpoint>,
    /// Serve the local API (`api.sock` in the state directory) that `anchor-node call`,
    /// `expose`, `connect` and `peers` use.
    pub local_api: bool,
    /// Filled with the node's peers once it runs them; clone the `Arc` before `run`.
    pub peers: Arc<OnceLock<Arc<Peers>>>,
    /// Platform reported at registration and by `system.identity` (default: `os-arch`).
    pub platform: String,
    /// Write `status.json` (for `anchor-node status`) this often; `None`: never.
    pub status_every: Option<Duration>,
    /// Seed of the agent's jitter (backoff, heartbeat phase). `None`: from the time and pid.
    pub seed: Option<u64>,
    /// Capabilities offered besides the built-ins and the configured commands.
    pub extra_capabilities: Vec<Arc<dyn Capability>>,
    /// Where the agent counts what it does; clone the `Arc` before `run` to read it.
    pub stats: Arc<AgentStats>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("node", &self.node)
            .field("anchor_addr", &self.anchor_addr)
            .field("anchor_addrs", &self.anchor_addrs)
            .field("platform", &self.platform)
            .field("status_every", &self.status_every)
            .field("seed", &self.seed)
            .field(
                "extra_capabilities",
                &self
                    .extra_capabilities
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RunConfig {
    /// The defaults of `anchor-node run` for a node configuration.
    pub fn new(node: NodeConfig) -> RunConfig {
        RunConfig {
            node,
            anchor_addr: None,
            anchor_addrs: Vec::new(),
            socket: None,
            endpoint: None,
            local_api: true,
            peers: Arc::new(OnceLock::new()),
            platform: crate::capability::platform(),
            status_every: Some(Duration::from_secs(2)),
            seed: None,
            extra_capabilities: Vec::new(),
            stats: Arc::new(AgentStats::default()),
        }
    }
}

/// Why a node did not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration is invalid (`anchor-node run` exits 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory is unusable or the node is not paired.
    #[error(transparent)]
    State(#[from] StateError),
    /// The anchor's address does not resolve (`anchor-node run` exits 69).
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// No UDP socket could be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The agent stopped: the device was revoked, removed or expired.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Runs a paired node until `shutdown` resolves (then it says `stopping` to the anchor and
/// closes) or the anchor refuses the device for good. Returns `Ok` after a clean stop.
pub async fn run(
    config: RunConfig,
    state: StateDir,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    config.node.check()?;
    let identity = state.identity()?;
    let anchors = anchor_set(&config, &state, &identity.anchor)?;
    let name = config
        .node
        .name
        .clone()
        .or_else(|| identity.cert_info.common_name.clone())
        .unwrap_or_else(capability::hostname);
    let facts = NodeFacts {
        device_id: identity.cert_info.key_id.to_string(),
        name: name.clone(),
        platform: config.platform.clone(),
        agent_version: agent::AGENT_VERSION.to_string(),
        started: std::time::Instant::now(),
    };
    let mut registry = registry(facts, &config.node)?;
    for cap in config.extra_capabilities {
        registry.add(cap);
    }
    let direct = config.node.mesh.direct;
    let max_concurrent = config
        .node
        .max_concurrent_invocations
        .unwrap_or(agent::DEFAULT_MAX_CONCURRENT);
    let (endpoint, own_socket, mesh) = match (config.socket, config.endpoint) {
        (Some(socket), _) => {
            let (e, m) =
                mesh_endpoint(socket, &identity, &state, &registry, max_concurrent, direct)?;
            (e, false, Some(m))
        }
        (None, Some(e)) => (e, false, None),
        (None, None) => {
            let first = resolve_first(anchors.addrs()).await?;
            let socket = udp_socket(first).map_err(RunError::Socket)?;
            let (e, m) =
                mesh_endpoint(socket, &identity, &state, &registry, max_concurrent, direct)?;
            (e, true, Some(m))
        }
    };
    let mesh_socket = mesh.as_ref().map(|m| m.socket.clone());
    let api = match &mesh {
        Some(m) => {
            let _ = config.peers.set(m.peers.clone());
            if config.local_api {
                Some(crate::api::serve(&state, m.peers.clone()).map_err(RunError::Socket)?)
            } else {
                None
            }
        }
        None => None,
    };
    let mut cfg = AgentConfig::new(state, name, registry);
    cfg.platform = config.platform;
    cfg.reconnect_max = config.node.reconnect_max()?;
    if let Some(n) = config.node.max_concurrent_invocations {
        cfg.max_concurrent = n;
    }
    cfg.status_every = config.status_every;
    if let Some(seed) = config.seed {
        cfg.seed = seed;
    }
    info!(anchors = ?anchors.addrs(), device_id = %identity.cert_info.key_id, "starting the node agent");
    let (stop, stop_rx) = watch::channel(false);
    let agent = agent::run(endpoint.clone(), anchors, cfg, config.stats, stop_rx, mesh);
    tokio::pin!(agent);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut agent => r,
        () = &mut shutdown => {
            let _ = stop.send(true);
            agent.await
        }
    };
    if let Some(api) = api {
        api.stop();
    }
    if let Some(socket) = &mesh_socket {
        // The endpoint on the mesh socket is the node's own, whoever gave the socket: close
        // the peers' connections too (they see the node go at once, not after an idle
        // timeout) and stop probing.
        endpoint.close(quinn::VarInt::from_u32(0), b"node stopping");
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        socket.shutdown();
    } else if own_socket {
        // A caller's endpoint is the caller's to drain.
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }
    result.map_err(RunError::from)
}

/// The anchors to dial, as the module docs say. A damaged `anchors.json` is logged and left
/// out; a pairing anchor that is not `HOST:PORT` is a damaged state directory.
fn anchor_set(
    config: &RunConfig,
    state: &StateDir,
    paired_with: &str,
) -> Result<AnchorSet, RunError> {
    let fixed: Vec<AnchorAddr> = config
        .anchor_addr
        .iter()
        .chain(config.anchor_addrs.iter())
        .map(|a| AnchorAddr::from(*a))
        .collect();
    let configured = config.node.anchor_addrs()?;
    let (seeds, told) = if !fixed.is_empty() {
        (fixed, Vec::new())
    } else if !configured.is_empty() {
        (configured, Vec::new())
    } else {
        let told = match state.anchors() {
            Ok(list) => list.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "ignoring the saved anchors; dialing the anchor paired with");
                Vec::new()
            }
        };
        let paired: AnchorAddr = paired_with.parse().map_err(|e| StateError::Corrupt {
            path: state.path().join("anchor"),
            message: format!("{e}"),
        })?;
        (vec![paired], told)
    };
    // Not reached: every branch has at least one seed.
    AnchorSet::new(seeds, told)
        .ok_or_else(|| RunError::State(StateError::NotPaired(state.path().to_path_buf())))
}

/// A real UDP socket of the same family as `anchor`, for quinn.
fn udp_socket(anchor: SocketAddr) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    let bind: SocketAddr = if anchor.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    runtime()?.wrap_udp_socket(socket)
}

fn runtime() -> std::io::Result<Arc<dyn quinn::Runtime>> {
    quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("the node must run inside a tokio runtime"))
}

/// The node's one endpoint on `socket`: the anchor connection and the peers share it.
fn mesh_endpoint(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    identity: &crate::state::Identity,
    state: &StateDir,
    registry: &Registry,
    max_concurrent: usize,
    direct: bool,
) -> Result<(quinn::Endpoint, Mesh), RunError> {
    let me = identity.cert_info.key_id;
    let socket = MeshSocket::new(socket, me);
    socket.set_direct(direct);
    socket.start();
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket.clone(),
        runtime().map_err(RunError::Socket)?,
    )
    .map_err(RunError::Socket)?;
    let revoked = Arc::new(SharedRevoked::default());
    let (peers, uplink) = Peers::new(
        me,
        socket.clone(),
        endpoint.clone(),
        agent::peer_tls(identity, revoked.clone()),
        state.clone(),
        registry.clone(),
        max_concurrent,
    )
    .map_err(|e| {
        RunError::State(StateError::Corrupt {
            path: state.path().join("cert.pem"),
            message: e.to_string(),
        })
    })?;
    peers.start();
    Ok((
        endpoint,
        Mesh {
            peers,
            socket,
            uplink,
            revoked,
        },
    ))
}

/// A client endpoint on a real UDP socket of the same family as `anchor`.
pub fn client_endpoint(anchor: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if anchor.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
}

/// The capability registry of a node configuration: the built-ins, `desktop.open_url` when
/// enabled, and the configured commands.
pub fn registry(facts: NodeFacts, config: &NodeConfig) -> Result<Registry, ConfigError> {
    let mut registry = Registry::builtins(facts);
    if config.desktop.open_url {
        let opener = if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        registry.add(Arc::new(capability::OpenUrl {
            opener: opener.into(),
        }));
    }
    for (name, spec) in &config.capabilities {
        let cap = CommandCap::new(name.clone(), spec.clone()).map_err(|message| {
            ConfigError::Invalid {
                key: format!("capabilities.{name}"),
                message,
            }
        })?;
        registry.add(Arc::new(cap));
    }
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anchors::resolve;

    #[tokio::test]
    async fn an_unpaired_node_does_not_start() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let err = run(
            RunConfig::new(NodeConfig::default()),
            state,
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, RunError::State(StateError::NotPaired(_))),
            "{err}"
        );
        assert!(err.to_string().contains("anchor-node pair"), "{err}");
    }

    #[tokio::test]
    async fn a_bad_configuration_is_refused_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeConfig {
            reconnect_max: Some("soon".into()),
            ..NodeConfig::default()
        };
        let err = run(
            RunConfig::new(node),
            StateDir::new(dir.path()),
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RunError::Config(_)), "{err}");
        assert!(err.to_string().contains("reconnect_max"), "{err}");
    }

    fn dialed(config: &RunConfig, state: &StateDir) -> Vec<String> {
        anchor_set(config, state, "paired.example:7444")
            .unwrap()
            .addrs()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_anchors_dialed_are_the_given_else_the_configured_else_the_saved() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let mut config = RunConfig::new(NodeConfig::default());
        assert_eq!(dialed(&config, &state), ["paired.example:7444"]);
        let saved = [
            "a.example:7444".parse().unwrap(),
            "paired.example:7444".parse().unwrap(),
        ];
        state.save_anchors(&saved).unwrap();
        assert_eq!(
            dialed(&config, &state),
            ["a.example:7444", "paired.example:7444"],
            "the saved list, then the pairing anchor, once"
        );
        config.node.anchor = Some("c.example:7444,d.example:7444".into());
        assert_eq!(
            dialed(&config, &state),
            ["c.example:7444", "d.example:7444"]
        );
        config.anchor_addr = Some(SocketAddr::from(([10, 0, 0, 1], 7444)));
        config.anchor_addrs = vec![SocketAddr::from(([10, 0, 0, 2], 7444))];
        assert_eq!(dialed(&config, &state), ["10.0.0.1:7444", "10.0.0.2:7444"]);
    }

    #[test]
    fn a_damaged_anchors_file_falls_back_to_the_pairing_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        for bad in ["{oops", "[\"no-port\"]", "[1, 2]"] {
            state
                .write(crate::state::ANCHORS_FILE, bad.as_bytes())
                .unwrap();
            let config = RunConfig::new(NodeConfig::default());
            assert_eq!(dialed(&config, &state), ["paired.example:7444"], "{bad}");
        }
        let err =
            anchor_set(&RunConfig::new(NodeConfig::default()), &state, "garbage").unwrap_err();
        assert!(
            matches!(err, RunError::State(StateError::Corrupt { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn names_that_do_not_resolve_say_what_was_expected() {
        let err = resolve("no-port-here").await.unwrap_err();
        assert!(err.to_string().contains("expected HOST:PORT"), "{err}");
    }

    #[test]
    fn the_registry_holds_builtins_and_configured_commands() {
        let facts = NodeFacts {
            device_id: "d".into(),
            name: "n".into(),
            platform: "p".into(),
            agent_version: "v".into(),
            started: std::time::Instant::now(),
        };
        let config: NodeConfig =
            toml::from_str("[capabilities.backup]\ncommand = [\"/bin/true\"]\n").unwrap();
        let names: Vec<String> = registry(facts, &config)
            .unwrap()
            .infos()
            .into_iter()
            .map(|c| c.name)
            .collect();
        for n in [
            "backup",
            "echo",
            "system.health",
            "system.identity",
            "system.info",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        assert!(
            !names.iter().any(|x| x == "desktop.open_url"),
            "off by default"
        );
    }
}
