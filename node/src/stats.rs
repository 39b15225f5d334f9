//! The agent's counters and link figures, read by `status.json`, tests and benchmarks, and
//! written by the agent's tasks (heartbeats, invocations and their copies).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use crate::anchors::AnchorAddr;
use crate::revoked::RevokedSet;
use crate::state::LiveStatus;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// Counters of the agent, for status and tests.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Connected now.
    pub connected: AtomicBool,
    /// Successful registrations.
    pub registrations: AtomicU64,
    /// Invocations actually run (not duplicates, not expired, not rejected).
    pub invocations_run: AtomicU64,
    /// Invocation requests refused as already past their deadline.
    pub invocations_expired: AtomicU64,
    /// Duplicates dropped.
    pub duplicates: AtomicU64,
    /// Certificates renewed.
    pub renewals: AtomicU64,
    /// Heartbeats sent (this connection).
    pub heartbeats_sent: AtomicU64,
    /// Heartbeat acks received (this connection): only from anchors of earlier versions, which
    /// acked each heartbeat with a datagram; QUIC's own acks answer them now.
    pub acks_received: AtomicU64,
    /// Smoothed RTT in microseconds, QUIC's estimate (0 = none yet).
    pub rtt_us: AtomicU64,
    /// Packets this connection sent to the anchor, as QUIC counts them.
    pub path_sent: AtomicU64,
    /// Of those, lost (QUIC's loss detection).
    pub path_lost: AtomicU64,
    /// Datagram copies of invocation requests received from the anchor.
    pub invoke_copies: AtomicU64,
    /// Datagram copies of results sent to the anchor.
    pub result_copies: AtomicU64,
    /// Connected since, Unix ms (0 = not connected).
    pub connected_since_ms: AtomicU64,
    /// Heartbeat interval in ms.
    pub heartbeat_interval_ms: AtomicU64,
    /// The last error's message (a [`LinkError`] or [`AgentError`]), for `status.json`.
    pub last_error: Mutex<Option<String>>,
    /// `HOST:PORT` of the anchor registered with now (`None`: not registered).
    pub anchor: Mutex<Option<String>>,
    /// Every anchor known, in the order they are tried.
    pub anchors: Mutex<Vec<String>>,
    /// Devices in the revocation set held.
    pub revoked_devices: AtomicU64,
    /// Serials in it.
    pub revoked_serials: AtomicU64,
}

impl AgentStats {
    /// Loss of this connection's packets to the anchor, 0..1, as QUIC's loss detection counts
    /// it, once a few heartbeats were sent.
    pub fn loss_rate(&self) -> Option<f64> {
        let heartbeats = self.heartbeats_sent.load(Ordering::Relaxed);
        let sent = self.path_sent.load(Ordering::Relaxed);
        let lost = self.path_lost.load(Ordering::Relaxed);
        (heartbeats >= 3 && sent > 0).then(|| lost.min(sent) as f64 / sent as f64)
    }

    /// Takes the connection's round-trip time and loss counts from QUIC.
    pub(crate) fn sample_link(&self, conn: &quinn::Connection) {
        let path = conn.stats().path;
        let rtt = u64::try_from(path.rtt.as_micros()).unwrap_or(u64::MAX);
        self.rtt_us.store(rtt.max(1), Ordering::Relaxed);
        self.path_sent.store(path.sent_packets, Ordering::Relaxed);
        self.path_lost.store(path.lost_packets, Ordering::Relaxed);
    }

    /// Smoothed RTT in ms.
    pub fn rtt_ms(&self) -> Option<f64> {
        let us = self.rtt_us.load(Ordering::Relaxed);
        (us > 0).then(|| us as f64 / 1000.0)
    }

    /// The anchor registered with now.
    pub fn anchor_in_use(&self) -> Option<String> {
        lock(&self.anchor).clone()
    }

    /// Every anchor known, in the order they are tried.
    pub fn known_anchors(&self) -> Vec<String> {
        lock(&self.anchors).clone()
    }

    pub(crate) fn set_error(&self, e: impl Into<String>) {
        *lock(&self.last_error) = Some(e.into());
    }

    pub(crate) fn set_anchors(&self, anchors: &[AnchorAddr]) {
        *lock(&self.anchors) = anchors.iter().map(ToString::to_string).collect();
    }

    /// A status snapshot for `status.json`.
    pub fn snapshot(&self) -> LiveStatus {
        let since = self.connected_since_ms.load(Ordering::Relaxed);
        LiveStatus {
            pid: std::process::id(),
            connected: self.connected.load(Ordering::Relaxed),
            connected_since_ms: (since > 0).then_some(since),
            heartbeat_interval_ms: self.heartbeat_interval_ms.load(Ordering::Relaxed),
            heartbeats_sent: self.heartbeats_sent.load(Ordering::Relaxed),
            acks_received: self.acks_received.load(Ordering::Relaxed),
            loss_rate: self.loss_rate(),
            rtt_ms: self.rtt_ms(),
            updated_at_ms: unix_ms(),
            last_error: lock(&self.last_error).clone(),
            anchor: self.anchor_in_use(),
            anchors: self.known_anchors(),
            revoked_devices: self.revoked_devices.load(Ordering::Relaxed),
            revoked_serials: self.revoked_serials.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_revoked(&self, set: &RevokedSet) {
        self.revoked_devices
            .store(set.devices.len() as u64, Ordering::Relaxed);
        self.revoked_serials
            .store(set.serials.len() as u64, Ordering::Relaxed);
    }
}
