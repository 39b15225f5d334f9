//! Presence over a simulated day on a bad link (issue 16): at 20 % loss and 100 ms RTT, with
//! the default heartbeat interval (15 s) and the default stale and offline thresholds (5 and
//! 30 minutes), a node that stays up must never be shown `stale` or `offline`, must keep its
//! one connection, and its heartbeats must all be accounted for (received, or counted lost).
//! Paused clock: the day takes a few seconds of real time.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{Event, Presence};
use anchorage_netsim::{LinkConfig, Loss};
use anchorage_sim::Sim;
use tokio::sync::broadcast::error::TryRecvError;

const SEED: u64 = 0xda7_1055;
const DAY: Duration = Duration::from_secs(24 * 3600);
/// How often the operator's view is looked at.
const LOOK_EVERY: Duration = Duration::from_secs(60);

/// 20 % independent loss each way, 50 ms each way (100 ms RTT), as in issue 16.
fn twenty_percent_loss() -> LinkConfig {
    LinkConfig {
        loss: Loss::Independent(0.20),
        latency: Duration::from_millis(50),
        jitter: Duration::ZERO,
        ..LinkConfig::ideal()
    }
}

/// The presence a `presence` event moved to, if it is one.
fn presence_to(e: &Event) -> Option<&str> {
    (e.kind == "presence")
        .then(|| e.data["to"].as_str())
        .flatten()
}

#[tokio::test(start_paused = true)]
async fn a_node_that_is_up_never_goes_stale_over_a_day_at_twenty_percent_loss() {
    let sim = Sim::start(SEED, twenty_percent_loss(), |_| {}).await;
    assert_eq!(
        sim.config.presence.heartbeat_interval,
        Duration::from_secs(15),
        "the default heartbeat interval"
    );
    let node = sim.add_node("lossy-day");
    let id = sim.pair(&node).await.device_id;
    let mut events = sim.backend().subscribe();
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(120)).await,
        "seed {SEED:#x}: the node registers"
    );
    let anchor_metrics = sim.anchor().services().metrics.clone();
    let (received_before, lost_before) = anchor_metrics.heartbeat_totals();

    let mut transitions: Vec<(Duration, String)> = Vec::new();
    let mut not_up = Vec::new();
    let mut worst_age_ms = 0;
    let mut degraded_minutes = 0;
    let start = tokio::time::Instant::now();
    while start.elapsed() < DAY {
        tokio::time::sleep(LOOK_EVERY).await;
        let at = start.elapsed();
        loop {
            match events.try_recv() {
                Ok(e) if e.device_id == Some(id) => {
                    if let Some(to) = presence_to(&e) {
                        transitions.push((at, to.to_string()));
                    }
                }
                Ok(_) => {}
                Err(TryRecvError::Empty) => break,
                Err(e) => panic!("seed {SEED:#x}: the event stream failed at {at:?}: {e}"),
            }
        }
        let entry = sim.backend().inventory_device(id).await.unwrap();
        worst_age_ms = worst_age_ms.max(entry.heartbeat_age_ms.unwrap_or(u64::MAX));
        match entry.presence {
            Presence::Online => {}
            Presence::Degraded => degraded_minutes += 1,
            p => not_up.push((at, p)),
        }
    }

    let sent = agent.stats.heartbeats_sent.load(Ordering::Relaxed);
    let registrations = agent.stats.registrations.load(Ordering::Relaxed);
    let (received, lost) = anchor_metrics.heartbeat_totals();
    let (received, lost) = (received - received_before, lost - lost_before);
    let quic = sim
        .anchor()
        .services()
        .nodes
        .live(&id)
        .map(|(_, conn)| conn.stats());
    let degraded_entries = transitions
        .iter()
        .filter(|(_, to)| to == "degraded")
        .count();
    println!(
        "seed {SEED:#x}, one simulated day at 20 % loss / 100 ms RTT: heartbeats sent {sent}, \
         received {received}, counted lost {lost} ({:.1} %), unaccounted {}; registrations \
         {registrations}; oldest heartbeat seen {:.1} s; presence changes {} ({degraded_entries} \
         into degraded, {degraded_minutes} of 1440 minutes degraded); anchor's QUIC path: {:?}",
        100.0 * lost as f64 / sent.max(1) as f64,
        sent.saturating_sub(received + lost),
        worst_age_ms as f64 / 1000.0,
        transitions.len(),
        quic.map(|s| s.path),
    );

    // What an operator would notice: the node never shown stale or offline, not in the
    // inventory, not on the event stream.
    assert!(
        not_up.is_empty(),
        "seed {SEED:#x}: shown not up: {not_up:?}"
    );
    let down: Vec<_> = transitions
        .iter()
        .filter(|(_, to)| to == "stale" || to == "offline")
        .collect();
    assert!(down.is_empty(), "seed {SEED:#x}: went {down:?}");
    assert!(
        worst_age_ms < sim.config.presence.stale_after.as_millis() as u64,
        "seed {SEED:#x}: a heartbeat gap of {worst_age_ms} ms"
    );
    // One connection all day, still up.
    assert_eq!(registrations, 1, "seed {SEED:#x}: the node reconnected");
    assert!(agent.connected(), "seed {SEED:#x}: the node is connected");
    assert!(
        quic.is_some(),
        "seed {SEED:#x}: the anchor holds the session"
    );
    // Every heartbeat accounted for: received or counted lost, but for the last few (a run of
    // losses at the end is only counted when the next one arrives).
    assert!(
        received + lost <= sent && sent - (received + lost) <= 4,
        "seed {SEED:#x}: sent {sent}, received {received}, lost {lost}"
    );
    // A day of 15 s heartbeats, and the loss the anchor reports is the link's.
    let expected = DAY.as_secs() / 15;
    assert!(
        sent.abs_diff(expected) <= expected / 50,
        "seed {SEED:#x}: {sent} heartbeats sent in a day, about {expected} expected"
    );
    let loss = lost as f64 / (received + lost) as f64;
    assert!(
        (0.15..0.25).contains(&loss),
        "seed {SEED:#x}: heartbeat loss {loss:.3} on a 20 % link"
    );
    agent.stop().await.unwrap();
}
