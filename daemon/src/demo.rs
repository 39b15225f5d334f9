//! `anchord demo`: an anchor with simulated nodes on a simulated lossy network, for a first
//! look at the console.
//!
//! The anchor is real (store, pairing, presence, invocations, console on a real TCP port);
//! its QUIC side and the nodes live on an in-process netsim network with the chosen preset.
//! Every node pairs through the real SPAKE2 exchange and is approved by the demo. One node
//! offers a capability whose program is missing, so it shows `degraded`; every half minute a
//! random node is cut off for a while, so presence goes `stale` and `offline` and comes back.
//! Presence thresholds are shortened so this shows within a minute.

use std::sync::Arc;
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{MintCodeRequest, PairMethod, RequestState};
use anchorage_netsim::{LinkConfig, Network, Preset};
use anchorage_node::agent::{self, AgentConfig, AgentStats};
use anchorage_node::capability::{CommandCap, CommandSpec, NodeFacts, Registry};
use anchorage_node::pair::{self, PairOptions};
use anchorage_node::state::StateDir;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{Anchor, AnchorConfig, Clock, StartError};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated nodes.
    pub nodes: usize,
    /// Network preset.
    pub preset: Preset,
    /// Seed of the simulated network.
    pub seed: u64,
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    mut config: AnchorConfig,
    opts: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    config.presence.heartbeat_interval = Duration::from_secs(2);
    config.presence.stale_after = Duration::from_secs(15);
    config.presence.offline_after = Duration::from_secs(45);
    let port = if config.listen.port() == 0 {
        7444
    } else {
        config.listen.port()
    };

    let cfg = config.clone();
    let anchor = tokio::task::spawn_blocking(move || Anchor::open(cfg, Clock::System))
        .await
        .map_err(|e| StartError::Tls(format!("start-up task failed: {e}")))??;

    let net = Network::new(opts.seed);
    net.set_default_link(LinkConfig::preset(opts.preset))
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let anchor_host = net.add_host("anchor");
    let anchor_addr = std::net::SocketAddr::new(anchor_host.ip(), port);
    let endpoint = anchor_host
        .endpoint(port, Some(anchor.server_config()?))
        .map_err(|source| StartError::Bind {
            addr: anchor_addr,
            source,
        })?;
    let a = anchor.clone();
    let quic = tokio::spawn(async move { a.serve(endpoint).await });

    let (listener, console_addr) = crate::bind_console(config.console).await?;
    anchor.set_bound(None, Some(console_addr));
    let (http, http_stop) = crate::serve_console(&anchor, listener);

    let token = anchor.owner_token()?;
    println!();
    println!(
        "  Anchorage demo: {} simulated nodes on a `{}` network",
        opts.nodes,
        opts.preset.name()
    );
    println!("  Console:     http://{console_addr}/");
    println!("  Owner token: {token}");
    println!("  (also in {})", anchor.owner_token_path().display());
    println!("  Try: anchorctl --url http://{console_addr} --token {token} inventory");
    println!();

    let backend = anchor.backend();
    let owner = backend
        .authenticate(&token)
        .await
        .ok_or_else(|| StartError::Tls("the owner token does not authenticate".into()))?;
    let (agents_stop, agents_rx) = watch::channel(false);
    let mut hosts = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..opts.nodes {
        let name = format!("demo-node-{:02}", i + 1);
        let host = net.add_host(&name);
        let endpoint = host.endpoint(0, None).map_err(|source| StartError::Bind {
            addr: anchor_addr,
            source,
        })?;
        let state = StateDir::new(config.data_dir.join("demo-nodes").join(&name));
        if state.identity().is_err()
            && let Err(e) = pair_node(&backend, &owner, &endpoint, &state, anchor_addr, &name).await
        {
            warn!(node = %name, error = %e, "demo pairing failed");
            continue;
        }
        let identity = match state.identity() {
            Ok(i) => i,
            Err(e) => {
                warn!(node = %name, error = %e, "demo node has no identity");
                continue;
            }
        };
        let mut registry = Registry::builtins(NodeFacts {
            device_id: identity.cert_info.key_id.to_string(),
            name: name.clone(),
            platform: "netsim-demo".into(),
            agent_version: agent::AGENT_VERSION.into(),
            started: std::time::Instant::now(),
        });
        if i == 0 {
            // A capability whose program is missing: this node shows `degraded`.
            let spec = CommandSpec {
                command: vec!["/opt/anchorage-demo/camera-snapshot".into()],
                timeout: Some("10s".into()),
                max_output: None,
                description: Some(
                    "Takes a camera snapshot (missing on purpose in the demo)".into(),
                ),
            };
            if let Ok(cap) = CommandCap::new("camera.snapshot".into(), spec) {
                registry.add(Arc::new(cap));
            }
        }
        let mut cfg = AgentConfig::new(state, name.clone(), registry);
        cfg.status_every = None;
        cfg.reconnect_max = Duration::from_secs(10);
        cfg.seed = opts.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9);
        let stop = agents_rx.clone();
        let stats = Arc::new(AgentStats::default());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent::run(endpoint, anchor_addr, cfg, stats, stop).await {
                warn!(node = %name, error = %e, "demo node stopped");
            }
        }));
        hosts.push(host);
    }
    info!(nodes = hosts.len(), "demo nodes running");

    let chaos_net = net.clone();
    let anchor_id = anchor_host.id();
    let chaos = tokio::spawn(async move {
        let mut rng = agent::Jitter::new(opts.seed ^ 0xc4a05);
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if hosts.is_empty() {
                continue;
            }
            let victim = &hosts[(rng.next_u64() % hosts.len() as u64) as usize];
            let outage = Duration::from_secs(20) + rng.below(Duration::from_secs(40));
            println!(
                "  demo: cutting {} off the network for {} s",
                victim.name(),
                outage.as_secs()
            );
            chaos_net.partition(&[victim.id()], &[anchor_id]);
            tokio::time::sleep(outage).await;
            chaos_net.heal();
            println!("  demo: {} is back", victim.name());
        }
    });

    shutdown.await;
    info!("demo shutting down");
    chaos.abort();
    let _ = agents_stop.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    anchor.shutdown();
    let _ = quic.await;
    let _ = http_stop.send(true);
    let _ = http.await;
    Ok(())
}

async fn pair_node(
    backend: &crate::backend::AnchorBackend,
    owner: &anchorage_console::api::Principal,
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    anchor: std::net::SocketAddr,
    name: &str,
) -> Result<(), String> {
    let minted = backend
        .mint_code(
            owner,
            MintCodeRequest {
                method: PairMethod::Pin,
                ttl_secs: None,
            },
        )
        .await
        .map_err(|e| e.message)?;
    let opts = PairOptions {
        anchor: anchor.to_string(),
        anchor_addr: anchor,
        code: pair::parse_code(Some(&minted.code), None)?,
        device_name: name.to_string(),
        platform: "netsim-demo".into(),
    };
    let approver = async {
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(list) = backend
                .list_requests(Some(RequestState::PendingApproval))
                .await
                && let Some(r) = list.iter().find(|r| r.device_name == name)
            {
                let _ = backend.approve(owner, &r.request_id).await;
                return;
            }
        }
    };
    let (paired, ()) = tokio::join!(pair::pair(endpoint, state, &opts, |_| {}), approver);
    paired.map(|_| ()).map_err(|e| e.to_string())
}
