//! The history's driver: every [`HistoryLimits::interval`](crate::history::HistoryLimits)
//! it samples each node with a live session on this anchor from the node table, and it hands
//! every event of the bus to the history service, which keeps what it needs (presence changes,
//! removed devices). The rules and the state are `crate::history`'s.

use std::sync::Arc;

use anchorage_mesh::DeviceId;
use tokio::sync::broadcast::error::RecvError;

use crate::records::HistorySample;
use crate::services::Services;

/// Samples every node with a live session on this anchor now.
pub fn take_samples(s: &Services) -> Vec<(DeviceId, HistorySample)> {
    let now = s.clock.now_ms();
    let nodes = s.nodes.lock();
    let t = nodes.settings().thresholds;
    nodes
        .iter()
        .filter_map(|(id, n)| {
            let live = n.live.as_ref()?;
            n.record.as_ref()?;
            Some((
                *id,
                HistorySample {
                    at_ms: now,
                    rtt_ms: Some(live.handle.conn.rtt().as_secs_f64() * 1000.0),
                    loss: n.window.loss(),
                    heartbeat_age_ms: n.last_seen_ms.map(|at| now.saturating_sub(at)),
                    presence: n.presence(now, &t),
                },
            ))
        })
        .collect()
}

/// The driver: samples every interval and records presence changes until shutdown.
pub async fn run(s: Arc<Services>) {
    let mut events = s.events.subscribe_fleet();
    let mut tick = tokio::time::interval(s.history.limits().interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: a sample at start-up says little about the link.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => s.history.sample(take_samples(&s)),
            event = events.recv() => match event {
                Ok(e) => s.history.on_event(&e),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "history missed events; some presence changes are not recorded");
                }
                Err(RecvError::Closed) => return,
            },
            _ = s.cancel.cancelled() => return,
        }
    }
}
