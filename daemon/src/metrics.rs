//! Counters of the anchor, exposed at `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Labelled counters. Cheap enough for events that happen per connection or per pairing;
/// per-heartbeat counters live in atomics elsewhere.
#[derive(Debug, Default)]
pub struct Metrics {
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    pairing_outcomes: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts a failed or refused handshake by reason.
    pub fn handshake_failure(&self, reason: &'static str) {
        *self
            .handshake_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts a pairing outcome.
    pub fn pairing_outcome(&self, outcome: &'static str) {
        *self
            .pairing_outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

    /// Handshake failures by reason.
    pub fn handshake_failures(&self) -> BTreeMap<&'static str, u64> {
        self.handshake_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pairing outcomes.
    pub fn pairing_outcomes(&self) -> BTreeMap<&'static str, u64> {
        self.pairing_outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
