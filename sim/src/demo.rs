//! The demo (`anchord demo`, run as `anchord-demo`): an anchor with simulated nodes on a
//! simulated lossy network, for a first look at the console.
//!
//! The anchor is real (store, pairing, presence, invocations, console on a real TCP port);
//! its QUIC side and the nodes are a [`Sim`] fleet on the chosen preset, on the real clock.
//! Every node pairs through the real SPAKE2 exchange and is approved by the demo. One node
//! offers a capability whose program is missing, so it shows `degraded`; every half minute a
//! random node is cut off for a while, so presence goes `stale` and `offline` and comes back.
//! Presence thresholds are shortened so this shows within a minute. Nodes keep their state
//! under `<data dir>/demo-nodes/`, so a second run finds them paired.

use std::future::Future;
use std::time::Duration;

use anchorage_daemon::{AnchorConfig, Clock};
use anchorage_netsim::{LinkConfig, Network, Preset};
use anchorage_node::agent::Jitter;
use anchorage_node::capability::CommandSpec;
use tracing::{info, warn};

use crate::fleet::{RunningAgent, Sim, SimError};

/// The demo's QUIC port on the simulated network when the configuration says port 0.
pub const DEFAULT_PORT: u16 = 7444;

/// How long the demo takes at most to stop once asked (SIGINT or SIGTERM).
pub const STOP_WITHIN: Duration = Duration::from_millis(800);

/// The program of the capability that is missing on purpose.
pub const MISSING_PROGRAM: &str = "/opt/anchorage-demo/camera-snapshot";

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated nodes.
    pub nodes: usize,
    /// Network preset.
    pub preset: Preset,
    /// Seed of the simulated network (the same seed replays the same losses).
    pub seed: u64,
}

/// Runs the demo until `shutdown` resolves: prints the console's address and the owner
/// token on stdout, pairs and starts the nodes, then cuts one off now and then.
pub async fn run(
    mut config: AnchorConfig,
    opts: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SimError> {
    config.presence.heartbeat_interval = Duration::from_secs(2);
    config.presence.stale_after = Duration::from_secs(15);
    config.presence.offline_after = Duration::from_secs(45);
    let port = if config.listen.port() == 0 {
        DEFAULT_PORT
    } else {
        config.listen.port()
    };

    let net = Network::new(opts.seed);
    net.set_default_link(LinkConfig::preset(opts.preset))
        .map_err(|e| SimError::Link(e.to_string()))?;
    let sim = Sim::open(net, config.clone(), Clock::System, port).await?;
    let anchor = sim.anchor().clone();

    let bind_err = |source| SimError::Bind {
        addr: config.console,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.console)
        .await
        .map_err(bind_err)?;
    let console_addr = listener.local_addr().map_err(bind_err)?;
    anchor.set_bound(None, Some(console_addr));
    let (http, http_stop) = anchorage_daemon::serve_console(&anchor, listener);

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

    let mut hosts = Vec::new();
    let mut agents: Vec<RunningAgent> = Vec::new();
    for i in 0..opts.nodes {
        let name = format!("demo-node-{:02}", i + 1);
        let state_dir = config.data_dir.join("demo-nodes").join(&name);
        let mut node = match sim.add_node_at(&name, state_dir) {
            Ok(n) => n,
            Err(e) => {
                warn!(node = %name, error = %e, "demo node has no socket");
                continue;
            }
        };
        node.platform = "netsim-demo".into();
        if node.state.identity().is_err()
            && let Err(e) = sim.try_pair(&node).await
        {
            warn!(node = %name, error = %e, "demo pairing failed");
            continue;
        }
        let agent = node.start_agent(sim.addr(), |c| {
            c.node.reconnect_max = Some("10s".into());
            c.seed = Some(opts.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9));
            if i == 0 {
                // A capability whose program is missing: this node shows `degraded`.
                c.node.capabilities.insert(
                    "camera.snapshot".into(),
                    CommandSpec {
                        command: vec![MISSING_PROGRAM.into()],
                        timeout: Some("10s".into()),
                        max_output: None,
                        description: Some(
                            "Takes a camera snapshot (missing on purpose in the demo)".into(),
                        ),
                    },
                );
            }
        });
        agents.push(agent);
        hosts.push(node);
    }
    info!(nodes = hosts.len(), "demo nodes running");

    let chaos_net = sim.net.clone();
    let anchor_id = sim.anchor_host.id();
    let victims: Vec<_> = hosts
        .iter()
        .map(|n| (n.host.id(), n.name.clone()))
        .collect();
    let chaos = tokio::spawn(async move {
        let mut rng = Jitter::new(opts.seed ^ 0xc4a05);
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            if victims.is_empty() {
                continue;
            }
            let (victim, name) = &victims[(rng.next_u64() % victims.len() as u64) as usize];
            let outage = Duration::from_secs(20) + rng.below(Duration::from_secs(40));
            println!(
                "  demo: cutting {name} off the network for {} s",
                outage.as_secs()
            );
            chaos_net.partition(&[*victim], &[anchor_id]);
            tokio::time::sleep(outage).await;
            chaos_net.heal();
            println!("  demo: {name} is back");
        }
    });

    shutdown.await;
    info!("demo shutting down");
    // Stopped within a second of the signal: the nodes and the anchor close together, each
    // given what is left of STOP_WITHIN; whatever still closes then is dropped (the store is
    // journaled, so nothing acknowledged is lost).
    let deadline = tokio::time::Instant::now() + STOP_WITHIN;
    chaos.abort();
    for agent in &agents {
        let _ = agent.stop.send(true);
    }
    let nodes = async {
        for agent in agents {
            if let Ok(Ok(Err(e))) = tokio::time::timeout_at(deadline, agent.task).await {
                warn!(error = %e, "demo node stopped");
            }
        }
    };
    let mut sim = sim;
    let anchor = async {
        sim.stop().await;
        let _ = http_stop.send(true);
        let _ = http.await;
    };
    let (_, stopped) = tokio::join!(nodes, tokio::time::timeout_at(deadline, anchor));
    drop(hosts);
    if stopped.is_err() {
        info!("the anchor was still closing connections at the demo's stop; left to the OS");
    }
    println!("  Anchorage demo stopped.");
    Ok(())
}
