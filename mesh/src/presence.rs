//! Presence rules and heartbeat loss accounting. Pure: the time is passed in.
//!
//! - `unknown`: never registered.
//! - `offline`: stopped cleanly, or no heartbeat for `offline_after`.
//! - `stale`: no heartbeat for `stale_after`.
//! - `degraded`: fresh, but a capability is unavailable or heartbeat loss over the recent
//!   window is above the threshold.
//! - `online`: fresh and healthy.

use std::time::Duration;

/// Presence of a node: defined once in `anchorage-wire` (the console's JSON uses it too).
pub use anchorage_wire::Presence;

/// Thresholds of the rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Silent this long: stale.
    pub stale_after: Duration,
    /// Silent this long: offline.
    pub offline_after: Duration,
    /// Loss above this fraction: degraded.
    pub degraded_loss: f64,
}

/// What the rules look at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Whether the node ever registered.
    pub registered: bool,
    /// Time since the last heartbeat or registration (`None`: never seen).
    pub silent_for: Option<Duration>,
    /// The last session ended with a clean `stopping` and no session followed.
    pub stopped_cleanly: bool,
    /// Some capability is unavailable.
    pub capability_unavailable: bool,
    /// Heartbeat loss over the recent window.
    pub loss: Option<f64>,
}

/// Applies the rules.
pub fn evaluate(o: &Observation, t: &Thresholds) -> Presence {
    if !o.registered {
        return Presence::Unknown;
    }
    if o.stopped_cleanly {
        return Presence::Offline;
    }
    let Some(silent) = o.silent_for else {
        return Presence::Offline;
    };
    if silent >= t.offline_after {
        Presence::Offline
    } else if silent >= t.stale_after {
        Presence::Stale
    } else if o.capability_unavailable || o.loss.is_some_and(|l| l > t.degraded_loss) {
        Presence::Degraded
    } else {
        Presence::Online
    }
}

/// Heartbeat sequence numbers seen over a sliding window, for loss by sequence gaps.
///
/// Tracks the last [`LossWindow::SPAN`] sequence numbers ending at the highest seen.
/// Reordered heartbeats inside the window are counted as received; older ones are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LossWindow {
    highest: Option<u64>,
    /// Bit i set: heartbeat `highest - i` arrived.
    bits: u64,
    /// Heartbeats received in total.
    pub received: u64,
    /// Sequence numbers skipped in total (may later turn out reordered, then corrected).
    pub lost: u64,
}

impl LossWindow {
    /// Sequence numbers covered.
    pub const SPAN: u64 = 64;

    /// Records heartbeat `seq`. Returns `false` for a duplicate.
    pub fn record(&mut self, seq: u64) -> bool {
        match self.highest {
            None => {
                self.highest = Some(seq);
                self.bits = 1;
                // Heartbeats before the first one we saw were lost.
                self.lost = self.lost.saturating_add(seq.min(Self::SPAN));
            }
            Some(h) if seq > h => {
                let shift = seq - h;
                // A jump longer than the window counts as one window lost, whatever the
                // sequence numbers claim: a peer cannot inflate the loss counters.
                self.lost = self.lost.saturating_add((shift - 1).min(Self::SPAN));
                self.bits = if shift >= Self::SPAN {
                    0
                } else {
                    self.bits << shift
                };
                self.bits |= 1;
                self.highest = Some(seq);
            }
            Some(h) => {
                let back = h - seq;
                if back >= Self::SPAN {
                    return false;
                }
                if self.bits & (1 << back) != 0 {
                    return false;
                }
                self.bits |= 1 << back;
                // It was counted lost when skipped; it was only late.
                self.lost = self.lost.saturating_sub(1);
            }
        }
        self.received += 1;
        true
    }

    /// Loss over the window, once it holds a few heartbeats.
    pub fn loss(&self) -> Option<f64> {
        let h = self.highest?;
        let span = h.saturating_add(1).min(Self::SPAN);
        if span < 4 {
            return None;
        }
        // The newest few may still be in flight only if reordered; count the whole span.
        let mask = if span >= 64 {
            u64::MAX
        } else {
            (1u64 << span) - 1
        };
        let got = u64::from((self.bits & mask).count_ones());
        Some(1.0 - got as f64 / span as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        stale_after: Duration::from_secs(300),
        offline_after: Duration::from_secs(1800),
        degraded_loss: 0.25,
    };

    fn obs(silent: u64) -> Observation {
        Observation {
            registered: true,
            silent_for: Some(Duration::from_secs(silent)),
            stopped_cleanly: false,
            capability_unavailable: false,
            loss: Some(0.0),
        }
    }

    #[test]
    fn thresholds_decide_online_stale_offline() {
        assert_eq!(evaluate(&obs(0), &T), Presence::Online);
        assert_eq!(evaluate(&obs(299), &T), Presence::Online);
        assert_eq!(evaluate(&obs(300), &T), Presence::Stale);
        assert_eq!(evaluate(&obs(1799), &T), Presence::Stale);
        assert_eq!(evaluate(&obs(1800), &T), Presence::Offline);
    }

    #[test]
    fn clean_stop_is_offline_at_once_and_unregistered_is_unknown() {
        let mut o = obs(0);
        o.stopped_cleanly = true;
        assert_eq!(evaluate(&o, &T), Presence::Offline);
        o.registered = false;
        assert_eq!(evaluate(&o, &T), Presence::Unknown);
    }

    #[test]
    fn degraded_when_fresh_but_impaired() {
        let mut o = obs(1);
        o.capability_unavailable = true;
        assert_eq!(evaluate(&o, &T), Presence::Degraded);
        let mut o = obs(1);
        o.loss = Some(0.5);
        assert_eq!(evaluate(&o, &T), Presence::Degraded);
        // Silence wins over impairment.
        let mut o = obs(400);
        o.loss = Some(0.5);
        assert_eq!(evaluate(&o, &T), Presence::Stale);
    }

    #[test]
    fn loss_window_counts_gaps_reordering_and_duplicates() {
        let mut w = LossWindow::default();
        for seq in [0, 1, 2, 4, 5, 3, 6, 7] {
            assert!(w.record(seq));
        }
        assert!(!w.record(5), "duplicate");
        assert_eq!(w.received, 8);
        assert_eq!(w.lost, 0, "3 was late, not lost");
        assert_eq!(w.loss(), Some(0.0));
        let mut w = LossWindow::default();
        for seq in (0..100).filter(|s| s % 10 != 0) {
            w.record(seq);
        }
        let loss = w.loss().unwrap();
        assert!((loss - 0.1).abs() < 0.03, "{loss}");
        assert_eq!(
            w.lost, 10,
            "sequence numbers start at 0: a missing 0 is a loss too"
        );
    }

    #[test]
    fn a_long_gap_clears_the_window_and_counts_one_window_lost() {
        let mut w = LossWindow::default();
        w.record(0);
        w.record(1000);
        // 999 numbers were skipped, but a gap counts at most the window: otherwise a node
        // could send 0, 2^63, 2^64-1 and drive the loss counter to 2^64.
        assert_eq!(w.lost, LossWindow::SPAN);
        assert_eq!(w.loss(), Some(1.0 - 1.0 / 64.0));
        assert!(!w.record(10), "too old to count");
    }

    #[test]
    fn hostile_sequence_numbers_count_a_window_each_at_most() {
        let mut w = LossWindow::default();
        for seq in [0, 1 << 63, u64::MAX] {
            w.record(seq);
        }
        assert_eq!(w.lost, 2 * LossWindow::SPAN);
        assert_eq!(w.received, 3);
        assert!(
            w.loss().is_some(),
            "the loss of a window at the top of u64 is defined"
        );
        assert!(!w.record(u64::MAX), "a duplicate at the top is not counted");
    }
}
