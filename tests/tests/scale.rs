//! A fleet at scale over netsim (issue 16): one anchor and 1,000 real node agents, each paired
//! through the real flow, on a network with 5 % loss, for a simulated hour on tokio's paused
//! clock. What an operator would notice is asserted: every node online at the end, none
//! shown stale or offline during the hour, no node reconnected, every heartbeat accounted
//! for (received, or counted lost), and a batch of `system.health` over the whole fleet
//! succeeding on every node.
//!
//! Behind the `scale` feature (it takes about a minute of real time in the release profile):
//!
//! ```sh
//! cargo test -p anchorage-tests --release --features scale --test scale -- --nocapture
//! ```
//!
//! It prints its figures (real time of each phase, simulated time, heartbeats, presence
//! changes, memory). `ANCHORAGE_SCALE_NODES`, `ANCHORAGE_SCALE_MINUTES` and
//! `ANCHORAGE_SCALE_SEED` change the fleet's size, the simulated time and the seed, to measure
//! other sizes with the same assertions (docs/netsim.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anchorage_console::Backend;
use anchorage_console::api::{BatchRequest, DeviceId, Event, InvocationState, Presence};
use anchorage_sim::{RunningAgent, Sim, SimNode, eventually, lossy};
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::TryRecvError;

/// Nodes, unless `ANCHORAGE_SCALE_NODES` says otherwise.
const NODES: usize = 1000;
/// Simulated minutes, unless `ANCHORAGE_SCALE_MINUTES` says otherwise.
const MINUTES: u64 = 60;
/// The network's seed, unless `ANCHORAGE_SCALE_SEED` says otherwise.
const SEED: u64 = 0x5ca1_e016;
/// Loss on every link, each way.
const LOSS: f64 = 0.05;
/// Pairings in flight at once (as many operators approving at once would).
const PAIR_CONCURRENCY: usize = 64;
/// How often (simulated) the event stream is drained and the inventory looked at.
const LOOK_EVERY: Duration = Duration::from_secs(20);

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Resident memory of this process now and at its peak, KiB (Linux; zeros elsewhere).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time of this process so far (user and system, every thread), from `/proc/self/stat`
/// (Linux, 100 ticks a second; zero elsewhere). The machine may be shared: this is the
/// simulation's own cost, where the real time also counts waiting for a core.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// What the event stream said during the hour.
#[derive(Debug, Default)]
struct Seen {
    /// Presence changes to stale or offline: (simulated time, device, to).
    down: Vec<(Duration, DeviceId, String)>,
    /// Presence changes into degraded.
    degraded: u64,
    /// Every presence change.
    presence_changes: u64,
    /// `node.registered` events (a node reconnecting).
    registrations: u64,
}

impl Seen {
    fn drain(&mut self, events: &mut broadcast::Receiver<Event>, at: Duration, seed: u64) {
        loop {
            match events.try_recv() {
                Ok(e) if e.kind == "presence" => {
                    self.presence_changes += 1;
                    let to = e.data["to"].as_str().unwrap_or_default().to_string();
                    if to == "degraded" {
                        self.degraded += 1;
                    }
                    if to == "stale" || to == "offline" {
                        self.down.push((at, e.device_id.unwrap(), to));
                    }
                }
                Ok(e) if e.kind == "node.registered" => self.registrations += 1,
                Ok(_) => {}
                Err(TryRecvError::Empty) => return,
                Err(e) => panic!("seed {seed:#x}: the event stream failed at {at:?}: {e}"),
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_nodes_stay_online_for_an_hour_at_five_percent_loss() {
    let nodes_wanted = knob("ANCHORAGE_SCALE_NODES", NODES as u64) as usize;
    let minutes = knob("ANCHORAGE_SCALE_MINUTES", MINUTES);
    let seed = knob("ANCHORAGE_SCALE_SEED", SEED);
    let real = Instant::now();
    let setup_cpu = cpu_time();
    let sim = Sim::start(seed, lossy(LOSS), |_| {}).await;
    let sim_start = tokio::time::Instant::now();

    // Pair every node through the real flow (PIN, SPAKE2, CSR, approval), many at once.
    let nodes: Vec<SimNode> = (0..nodes_wanted)
        .map(|i| sim.add_node(&format!("scale-{i:04}")))
        .collect();
    let ids: Vec<DeviceId> = futures_util::stream::iter(&nodes)
        .map(|node| async { sim.pair(node).await.device_id })
        .buffered(PAIR_CONCURRENCY)
        .collect()
        .await;
    let paired_real = real.elapsed();
    let paired_cpu = cpu_time().saturating_sub(setup_cpu);
    let agents: Vec<RunningAgent> = nodes
        .iter()
        .map(|n| n.start_agent(sim.addr(), |_| {}))
        .collect();
    let all_registered = eventually(Duration::from_secs(300), || async {
        agents
            .iter()
            .all(|a| a.stats.registrations.load(Ordering::Relaxed) >= 1 && a.connected())
            .then_some(())
    })
    .await;
    assert!(
        all_registered.is_some(),
        "seed {seed:#x}: {} of {nodes_wanted} nodes registered",
        agents.iter().filter(|a| a.connected()).count()
    );
    let setup_real = real.elapsed();
    let setup_sim = sim_start.elapsed();
    println!(
        "seed {seed:#x}: {nodes_wanted} nodes paired in {:.1} s real ({:.1} s of CPU), all registered after \
         {:.1} s real ({:.0} s simulated); memory {:?} KiB (rss, peak)",
        paired_real.as_secs_f64(),
        paired_cpu.as_secs_f64(),
        setup_real.as_secs_f64(),
        setup_sim.as_secs_f64(),
        memory_kib(),
    );

    // The hour (or the minutes asked for).
    let metrics = sim.anchor().services().metrics.clone();
    let (received_before, lost_before) = metrics.heartbeat_totals();
    let sent_before: u64 = agents
        .iter()
        .map(|a| a.stats.heartbeats_sent.load(Ordering::Relaxed))
        .sum();
    let net_before = sim.net.counters();
    let mut events = sim.backend().subscribe();
    let mut seen = Seen::default();
    // Most nodes at one look: not online, stale or offline, not connected.
    let mut worst = (0u64, 0u64, 0u64);
    let hour_real = Instant::now();
    let hour_cpu = cpu_time();
    let hour_start = tokio::time::Instant::now();
    let span = Duration::from_secs(minutes * 60);
    while hour_start.elapsed() < span {
        tokio::time::sleep(LOOK_EVERY).await;
        let at = hour_start.elapsed();
        seen.drain(&mut events, at, seed);
        // The presence counts of the anchor's `/metrics` gauges (the node table, in memory):
        // the full inventory reads every device from the store, and 180 of them over an hour
        // cost more than the fleet itself (it is read once, at the end).
        let ([online, _degraded, stale, offline, _unknown], connected) =
            sim.anchor().services().nodes.counts();
        worst.0 = worst.0.max(nodes_wanted as u64 - online);
        worst.1 = worst.1.max(stale + offline);
        worst.2 = worst.2.max(nodes_wanted as u64 - connected);
    }
    let hour_real = hour_real.elapsed();
    let hour_cpu = cpu_time().saturating_sub(hour_cpu);
    seen.drain(&mut events, hour_start.elapsed(), seed);
    // The batch below publishes two events per node: the hour's stream ends here.
    drop(events);
    let sent: u64 = agents
        .iter()
        .map(|a| a.stats.heartbeats_sent.load(Ordering::Relaxed))
        .sum::<u64>()
        - sent_before;
    let (received, lost) = metrics.heartbeat_totals();
    let (received, lost) = (received - received_before, lost - lost_before);
    let net = sim.net.counters();
    let (rss, peak) = memory_kib();
    println!(
        "seed {seed:#x}: {minutes} simulated minutes at {:.0} % loss in {:.1} s real, \
         {:.1} s of CPU ({:.0}x real time); heartbeats sent {sent}, received {received}, counted lost {lost} \
         ({:.2} %), unaccounted {}; presence changes {} ({} into degraded, {} to stale or \
         offline); registrations {}; most at one look not online {}, stale or offline {}, not connected {}; \
         datagrams {} sent, {} delivered, {} lost; memory {rss} KiB rss, {peak} KiB peak \
         ({:.0} KiB per node)",
        LOSS * 100.0,
        hour_real.as_secs_f64(),
        hour_cpu.as_secs_f64(),
        span.as_secs_f64() / hour_real.as_secs_f64().max(1e-9),
        100.0 * lost as f64 / (received + lost).max(1) as f64,
        sent.saturating_sub(received + lost),
        seen.presence_changes,
        seen.degraded,
        seen.down.len(),
        seen.registrations,
        worst.0,
        worst.1,
        worst.2,
        net.sent - net_before.sent,
        net.delivered - net_before.delivered,
        net.dropped.loss - net_before.dropped.loss,
        peak as f64 / nodes_wanted as f64,
    );

    // A batch of `system.health` over the whole fleet.
    let batch_real = Instant::now();
    let batch_sim = tokio::time::Instant::now();
    let created = sim
        .backend()
        .create_batch(
            &sim.owner,
            BatchRequest {
                selector: Default::default(),
                capability: "system.health".into(),
                input: serde_json::Value::Null,
                timeout_ms: Some(60_000),
                max_concurrency: None,
                devices: None,
            },
        )
        .await
        .unwrap();
    let batch_id = created.info.batch_id;
    let done = eventually(Duration::from_secs(90), || async {
        let b = sim.backend().batch(batch_id).await.unwrap();
        b.info.done.then_some(b)
    })
    .await
    .unwrap_or_else(|| panic!("seed {seed:#x}: the batch did not finish"));
    println!(
        "seed {seed:#x}: batch of system.health over {} nodes: {} succeeded in {:.2} s \
         simulated, {:.2} s real",
        done.info.total,
        done.info.succeeded,
        batch_sim.elapsed().as_secs_f64(),
        batch_real.elapsed().as_secs_f64(),
    );

    // What an operator would notice.
    assert!(
        seen.down.is_empty(),
        "seed {seed:#x}: nodes went stale or offline: {:?}",
        &seen.down[..seen.down.len().min(10)]
    );
    assert_eq!(worst.1, 0, "seed {seed:#x}: nodes shown stale or offline");
    assert_eq!(worst.2, 0, "seed {seed:#x}: nodes disconnected");
    let inventory = sim.backend().inventory().await.unwrap();
    let not_online: Vec<_> = inventory
        .devices
        .iter()
        .filter(|d| d.presence != Presence::Online)
        .map(|d| (&d.name, d.presence))
        .collect();
    assert!(
        not_online.is_empty(),
        "seed {seed:#x}: not online at the end: {not_online:?}"
    );
    assert_eq!(inventory.summary.online, nodes_wanted as u64);
    assert_eq!(inventory.summary.connected, nodes_wanted as u64);
    let reconnected: Vec<_> = agents
        .iter()
        .zip(&nodes)
        .filter(|(a, _)| a.stats.registrations.load(Ordering::Relaxed) != 1 || !a.connected())
        .map(|(_, n)| &n.name)
        .collect();
    assert!(
        reconnected.is_empty(),
        "seed {seed:#x}: reconnected or disconnected: {reconnected:?}"
    );
    assert_eq!(
        seen.registrations, 0,
        "seed {seed:#x}: nodes registered again"
    );
    // Every heartbeat received or counted lost, but for each node's last few (a run of
    // losses at the end is counted when the next heartbeat arrives); and the loss the anchor
    // counts is the link's.
    assert!(
        received + lost <= sent && sent - (received + lost) <= 2 * nodes_wanted as u64,
        "seed {seed:#x}: sent {sent}, received {received}, lost {lost}"
    );
    let expected = minutes * 60 / 15 * nodes_wanted as u64;
    assert!(
        sent.abs_diff(expected) <= expected / 20 + nodes_wanted as u64,
        "seed {seed:#x}: {sent} heartbeats sent, about {expected} expected"
    );
    let loss = lost as f64 / (received + lost).max(1) as f64;
    assert!(
        (0.03..0.07).contains(&loss),
        "seed {seed:#x}: heartbeat loss {loss:.4} on a 5 % link"
    );
    // The batch: one invocation per node, every one answered.
    let i = &done.info;
    assert_eq!(
        (i.total, i.succeeded, i.pending),
        (nodes_wanted as u32, nodes_wanted as u32, 0),
        "seed {seed:#x}: {i:?}"
    );
    let mut batch_devices: Vec<DeviceId> = done.invocations.iter().map(|i| i.device_id).collect();
    batch_devices.sort();
    let mut all = ids.clone();
    all.sort();
    assert_eq!(
        batch_devices, all,
        "seed {seed:#x}: one invocation per node"
    );
    assert!(
        done.invocations
            .iter()
            .all(|i| i.state == InvocationState::Succeeded),
        "seed {seed:#x}: every invocation succeeded"
    );
    println!(
        "seed {seed:#x}: {:.1} s real in all",
        real.elapsed().as_secs_f64()
    );
    for agent in agents {
        let _ = agent.stop.send(true);
        drop(agent);
    }
}
