//! Short tails on lossy links and one packet per heartbeat (issue 16), over netsim in
//! simulated time: small invocations also travel as datagram copies and still run once; the
//! anchor answers heartbeats with QUIC's ACK alone.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use anchorage_console::api::{InvocationState, InvokeRequest};
use anchorage_console::{Backend, MetricsFormat};
use anchorage_sim::{Sim, lossy, prom};

const SEED: u64 = 0xc0_91e5;

async fn counter(sim: &Sim, name: &str) -> f64 {
    let text = sim.backend().metrics(MetricsFormat::Prometheus).await;
    let e = prom::parse(&text).unwrap();
    e.value(name, &[]).unwrap_or(0.0)
}

fn health() -> InvokeRequest {
    InvokeRequest {
        capability: "system.health".into(),
        input: serde_json::Value::Null,
        timeout_ms: Some(30_000),
        async_: false,
    }
}

/// 20 % loss both ways at 100 ms RTT: every call succeeds, each runs exactly once on the node
/// however many copies reached it, and some results arrived as copies (a lost result packet
/// did not wait for QUIC's probe timeout).
#[tokio::test(start_paused = true)]
async fn under_heavy_loss_calls_run_once_and_copies_carry_the_lost_ones() {
    let mut link = lossy(0.20);
    link.latency = Duration::from_millis(50);
    let sim = Sim::start(SEED, link, |_| {}).await;
    let node = sim.add_node("lossy");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(120)).await);
    let calls = 60;
    for i in 0..calls {
        let inv = sim
            .backend()
            .invoke(&sim.owner, id, health())
            .await
            .unwrap();
        assert_eq!(inv.state, InvocationState::Succeeded, "call {i}: {inv:?}");
    }
    assert_eq!(
        agent.stats.invocations_run.load(Ordering::Relaxed),
        calls,
        "each invocation ran once on the node"
    );
    assert!(
        agent.stats.invoke_copies.load(Ordering::Relaxed) > 0,
        "request copies reached the node"
    );
    assert!(
        counter(&sim, "anchorage_invocation_copies_sent_total").await >= calls as f64,
        "on a 100 ms link every call sends a copy before its result is due"
    );
    assert!(
        counter(&sim, "anchorage_invocation_copies_won_total").await > 0.0,
        "some results came first as copies"
    );
    assert_eq!(agent.stats.registrations.load(Ordering::Relaxed), 1);
}

/// Copies turned off (`invocation_copies = false`): none is sent, calls still succeed over
/// QUIC's own recovery.
#[tokio::test(start_paused = true)]
async fn with_copies_off_nothing_is_copied() {
    let mut link = lossy(0.05);
    link.latency = Duration::from_millis(25);
    let sim = Sim::start(SEED, link, |c| c.invocation_copies = false).await;
    let node = sim.add_node("plain");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(60)).await);
    for _ in 0..10 {
        let inv = sim
            .backend()
            .invoke(&sim.owner, id, health())
            .await
            .unwrap();
        assert_eq!(inv.state, InvocationState::Succeeded, "{inv:?}");
    }
    assert_eq!(
        counter(&sim, "anchorage_invocation_copies_sent_total").await,
        0.0
    );
    assert_eq!(agent.stats.invoke_copies.load(Ordering::Relaxed), 0);
}

/// A heartbeat costs the anchor one received packet: the anchor sends no ack datagram, so the
/// node's QUIC stack has nothing to answer with an ACK-only packet.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_is_one_packet_to_the_anchor() {
    let sim = Sim::start(SEED, lossy(0.0), |c| {
        // Under the node's 5 s keep-alive, so the window holds heartbeats only.
        c.presence.heartbeat_interval = Duration::from_secs(1);
    })
    .await;
    let node = sim.add_node("steady");
    sim.pair(&node).await;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(60)).await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (to_anchor, from_anchor) = (
        sim.net.link_counters(node.host.id(), sim.anchor_host.id()),
        sim.net.link_counters(sim.anchor_host.id(), node.host.id()),
    );
    let sent = agent.stats.heartbeats_sent.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let heartbeats = agent.stats.heartbeats_sent.load(Ordering::Relaxed) - sent;
    let packets = sim
        .net
        .link_counters(node.host.id(), sim.anchor_host.id())
        .sent
        - to_anchor.sent;
    let back = sim
        .net
        .link_counters(sim.anchor_host.id(), node.host.id())
        .sent
        - from_anchor.sent;
    assert!(heartbeats >= 100, "{heartbeats} heartbeats in 120 s");
    // A keep-alive or a late ACK now and then, never one per heartbeat.
    assert!(
        packets <= heartbeats + heartbeats / 20,
        "{packets} packets to the anchor for {heartbeats} heartbeats"
    );
    assert!(
        back <= heartbeats + heartbeats / 20,
        "{back} packets back for {heartbeats} heartbeats (the anchor's ACKs)"
    );
    assert!(counter(&sim, "anchorage_heartbeats_received_total").await as u64 >= heartbeats);
    // The node's own view of the link now comes from QUIC.
    assert!(agent.stats.rtt_ms().is_some());
    assert_eq!(agent.stats.loss_rate(), Some(0.0));
}
