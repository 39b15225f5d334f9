//! The history service: each device's link over the last hours and its presence changes.
//!
//! Every [`HistoryLimits::interval`] the driver (`crate::sampler`) samples each node with a live
//! session on this anchor (QUIC round-trip time, heartbeat loss, heartbeat age, presence) and
//! hears every presence change on the event bus. The rules live in [`Book`] (sans-IO: entries
//! in, store writes out): at most [`HistoryLimits::samples`] samples and
//! [`HistoryLimits::transitions`] presence changes per device, so memory is bounded by the
//! devices times those two. Each entry is written to the runtime store as it is taken, and
//! the one it pushes out is removed there, so the history survives a restart as it was; a
//! removed device's history is forgotten in memory and in the store.
//!
//! The console reads it through [`History::view`] (`GET /console/v1/inventory/{id}/history`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use anchorage_console::api::Event;
use anchorage_mesh::DeviceId;
use anchorage_wire::Presence;

use crate::records::{HistoryEntry, HistorySample};
use crate::store::{RuntimeWrite, Writer};

// The limits are configuration (`config`), named here too.
pub use crate::config::{
    DEFAULT_HISTORY_INTERVAL as DEFAULT_INTERVAL, DEFAULT_HISTORY_SAMPLES as DEFAULT_SAMPLES,
    DEFAULT_HISTORY_TRANSITIONS as DEFAULT_TRANSITIONS, HistoryLimits,
};

/// One device's history, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceHistory {
    /// Samples of the link.
    pub samples: VecDeque<HistorySample>,
    /// Presence changes: when, and the presence from then on.
    pub presence: VecDeque<(u64, Presence)>,
}

/// The rules of the history: what is kept, and what to write and remove in the store.
#[derive(Debug, Default)]
pub struct Book {
    limits: HistoryLimits,
    devices: HashMap<DeviceId, DeviceHistory>,
}

impl Book {
    /// An empty book.
    pub fn new(limits: HistoryLimits) -> Book {
        Book {
            limits,
            devices: HashMap::new(),
        }
    }

    /// Takes in the entries read from the store (by device, oldest first). Entries of devices
    /// `known` rejects (removed while the anchor was down) and entries beyond the limits (which
    /// may have been lowered) are dropped; the writes returned remove them from the store.
    pub fn load(
        &mut self,
        entries: impl IntoIterator<Item = (DeviceId, HistoryEntry)>,
        known: impl Fn(&DeviceId) -> bool,
    ) -> Vec<RuntimeWrite> {
        let mut out = Vec::new();
        let mut forgotten = std::collections::HashSet::new();
        for (device, entry) in entries {
            if !known(&device) {
                if forgotten.insert(device) {
                    out.push(RuntimeWrite::HistoryForget(device));
                }
                continue;
            }
            out.extend(self.insert(device, entry));
        }
        out
    }

    /// Adds a sample of `device`; returns the writes that keep the store in step.
    pub fn sample(&mut self, device: DeviceId, sample: HistorySample) -> Vec<RuntimeWrite> {
        let entry = HistoryEntry::Sample(sample);
        let mut out = vec![RuntimeWrite::History(device, entry)];
        out.extend(self.insert(device, entry));
        out
    }

    /// Records that `device`'s presence became `presence` at `at_ms` (nothing when it already
    /// was); returns the writes that keep the store in step.
    pub fn presence(
        &mut self,
        device: DeviceId,
        at_ms: u64,
        presence: Presence,
    ) -> Vec<RuntimeWrite> {
        let last = self
            .devices
            .get(&device)
            .and_then(|h| h.presence.back())
            .map(|(_, p)| *p);
        if last == Some(presence) {
            return Vec::new();
        }
        let entry = HistoryEntry::Presence { at_ms, presence };
        let mut out = vec![RuntimeWrite::History(device, entry)];
        out.extend(self.insert(device, entry));
        out
    }

    /// Forgets `device`'s history; returns the write that removes it from the store.
    pub fn forget(&mut self, device: &DeviceId) -> Vec<RuntimeWrite> {
        self.devices.remove(device);
        vec![RuntimeWrite::HistoryForget(*device)]
    }

    /// `device`'s history since `from_ms` (with the presence change in force at `from_ms`, so
    /// a timeline can start with the state it was in).
    pub fn view(&self, device: &DeviceId, from_ms: u64) -> DeviceHistory {
        let Some(h) = self.devices.get(device) else {
            return DeviceHistory::default();
        };
        let samples = h
            .samples
            .iter()
            .filter(|s| s.at_ms >= from_ms)
            .copied()
            .collect();
        let first = h.presence.iter().rposition(|(at, _)| *at < from_ms);
        let presence = h
            .presence
            .iter()
            .enumerate()
            .filter(|(i, (at, _))| *at >= from_ms || Some(*i) == first)
            .map(|(_, p)| *p)
            .collect();
        DeviceHistory { samples, presence }
    }

    /// Devices with a history.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device has a history.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Adds `entry` in time order, then drops what is over the limits; returns the removals.
    fn insert(&mut self, device: DeviceId, entry: HistoryEntry) -> Vec<RuntimeWrite> {
        let limits = self.limits;
        let h = self.devices.entry(device).or_default();
        let mut out = Vec::new();
        match entry {
            HistoryEntry::Sample(s) => {
                let at = h.samples.partition_point(|x| x.at_ms <= s.at_ms);
                h.samples.insert(at, s);
                while h.samples.len() > limits.samples {
                    if let Some(old) = h.samples.pop_front() {
                        out.push(RuntimeWrite::HistoryRemove(
                            device,
                            HistoryEntry::Sample(old),
                        ));
                    }
                }
            }
            HistoryEntry::Presence { at_ms, presence } => {
                let at = h.presence.partition_point(|(t, _)| *t <= at_ms);
                h.presence.insert(at, (at_ms, presence));
                while h.presence.len() > limits.transitions {
                    if let Some((at_ms, presence)) = h.presence.pop_front() {
                        out.push(RuntimeWrite::HistoryRemove(
                            device,
                            HistoryEntry::Presence { at_ms, presence },
                        ));
                    }
                }
            }
        }
        out
    }
}

/// The history service: the [`Book`] behind a mutex held only for a rule, and the writer its
/// writes go to.
#[derive(Debug)]
pub struct History {
    book: Mutex<Book>,
    limits: HistoryLimits,
    writer: Writer,
}

impl History {
    /// The service over the entries loaded from the store (`known`: whether a device still
    /// exists; the history of one that does not is removed).
    pub fn new(
        limits: HistoryLimits,
        entries: Vec<(DeviceId, HistoryEntry)>,
        known: impl Fn(&DeviceId) -> bool,
        writer: Writer,
    ) -> History {
        let mut book = Book::new(limits);
        let writes = book.load(entries, known);
        let history = History {
            book: Mutex::new(book),
            limits,
            writer,
        };
        history.write(writes);
        history
    }

    /// How often devices are sampled and how much is kept.
    pub fn limits(&self) -> HistoryLimits {
        self.limits
    }

    /// `device`'s history since `from_ms`.
    pub fn view(&self, device: &DeviceId, from_ms: u64) -> DeviceHistory {
        self.lock().view(device, from_ms)
    }

    /// Adds samples (one per device).
    pub fn sample(&self, samples: Vec<(DeviceId, HistorySample)>) {
        let writes: Vec<RuntimeWrite> = {
            let mut book = self.lock();
            samples
                .into_iter()
                .flat_map(|(d, s)| book.sample(d, s))
                .collect()
        };
        self.write(writes);
    }

    /// Takes in an event from the bus: a presence change (`presence`) is recorded, a removed
    /// device (`device.removed`) is forgotten.
    pub fn on_event(&self, event: &Event) {
        let Some(device) = event.device_id else {
            return;
        };
        let at_ms = u64::try_from(event.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let writes = match event.kind.as_str() {
            "presence" => {
                let Some(to) = event.data["to"]
                    .as_str()
                    .and_then(|p| p.parse::<Presence>().ok())
                else {
                    return;
                };
                self.lock().presence(device, at_ms, to)
            }
            "device.removed" => self.lock().forget(&device),
            _ => return,
        };
        self.write(writes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, writes: Vec<RuntimeWrite>) {
        for w in writes {
            if !self.writer.try_put(w) {
                tracing::warn!("store writer queue full; a history entry was not written");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn device(n: u8) -> DeviceId {
        DeviceId::from_bytes([n; anchorage_mesh::identity::DEVICE_ID_LEN])
    }

    fn sample(at_ms: u64) -> HistorySample {
        HistorySample {
            at_ms,
            rtt_ms: Some(12.5),
            loss: Some(0.0),
            heartbeat_age_ms: Some(800),
            presence: Presence::Online,
        }
    }

    fn limits(samples: usize, transitions: usize) -> HistoryLimits {
        HistoryLimits {
            interval: Duration::from_secs(1),
            samples,
            transitions,
        }
    }

    fn removed(writes: &[RuntimeWrite]) -> Vec<u64> {
        writes
            .iter()
            .filter_map(|w| match w {
                RuntimeWrite::HistoryRemove(_, e) => Some(e.at_ms()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn samples_are_bounded_per_device_and_the_oldest_goes_from_the_store_too() {
        let mut book = Book::new(limits(3, 10));
        for at in 1..=3 {
            let w = book.sample(device(1), sample(at));
            assert!(removed(&w).is_empty());
        }
        let w = book.sample(device(1), sample(4));
        assert!(matches!(w[0], RuntimeWrite::History(_, HistoryEntry::Sample(s)) if s.at_ms == 4));
        assert_eq!(removed(&w), [1]);
        let w = book.sample(device(1), sample(5));
        assert_eq!(removed(&w), [2]);
        let view = book.view(&device(1), 0);
        let kept: Vec<u64> = view.samples.iter().map(|s| s.at_ms).collect();
        assert_eq!(kept, [3, 4, 5]);
        // Another device has its own bound.
        book.sample(device(2), sample(1));
        assert_eq!(book.view(&device(2), 0).samples.len(), 1);
        assert_eq!(book.view(&device(1), 0).samples.len(), 3);
    }

    #[test]
    fn presence_changes_are_bounded_and_repeats_are_not_changes() {
        let mut book = Book::new(limits(10, 2));
        assert_eq!(book.presence(device(1), 1, Presence::Online).len(), 1);
        assert!(book.presence(device(1), 2, Presence::Online).is_empty());
        book.presence(device(1), 3, Presence::Stale);
        let w = book.presence(device(1), 4, Presence::Offline);
        assert_eq!(removed(&w), [1]);
        let view = book.view(&device(1), 0);
        assert_eq!(
            Vec::from(view.presence),
            [(3, Presence::Stale), (4, Presence::Offline)]
        );
    }

    #[test]
    fn a_view_starts_with_the_presence_in_force_and_skips_older_samples() {
        let mut book = Book::new(limits(10, 10));
        book.presence(device(1), 10, Presence::Online);
        book.presence(device(1), 20, Presence::Stale);
        book.presence(device(1), 40, Presence::Online);
        for at in [15, 25, 35, 45] {
            book.sample(device(1), sample(at));
        }
        let view = book.view(&device(1), 30);
        let at: Vec<u64> = view.samples.iter().map(|s| s.at_ms).collect();
        assert_eq!(at, [35, 45]);
        assert_eq!(
            Vec::from(view.presence),
            [(20, Presence::Stale), (40, Presence::Online)]
        );
        assert_eq!(book.view(&device(9), 0), DeviceHistory::default());
    }

    #[test]
    fn loading_drops_unknown_devices_and_what_is_over_the_limits() {
        let mut book = Book::new(limits(2, 1));
        let entries = vec![
            (device(1), HistoryEntry::Sample(sample(1))),
            (device(1), HistoryEntry::Sample(sample(2))),
            (device(1), HistoryEntry::Sample(sample(3))),
            (
                device(1),
                HistoryEntry::Presence {
                    at_ms: 1,
                    presence: Presence::Online,
                },
            ),
            (
                device(1),
                HistoryEntry::Presence {
                    at_ms: 2,
                    presence: Presence::Offline,
                },
            ),
            (device(2), HistoryEntry::Sample(sample(1))),
            (device(2), HistoryEntry::Sample(sample(2))),
        ];
        let w = book.load(entries, |d| *d == device(1));
        assert_eq!(removed(&w), [1, 1]);
        let forgotten: Vec<DeviceId> = w
            .iter()
            .filter_map(|w| match w {
                RuntimeWrite::HistoryForget(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(forgotten, [device(2)]);
        assert_eq!(book.len(), 1);
        let view = book.view(&device(1), 0);
        assert_eq!(view.samples.len(), 2);
        assert_eq!(Vec::from(view.presence), [(2, Presence::Offline)]);
    }

    #[test]
    fn a_forgotten_device_has_no_history_in_memory_or_in_the_store() {
        let mut book = Book::new(limits(10, 10));
        book.sample(device(1), sample(1));
        book.presence(device(1), 1, Presence::Online);
        let w = book.forget(&device(1));
        assert!(matches!(w[..], [RuntimeWrite::HistoryForget(d)] if d == device(1)));
        assert!(book.is_empty());
        assert_eq!(book.view(&device(1), 0), DeviceHistory::default());
    }
}
