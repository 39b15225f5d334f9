//! The anchor's metrics, exposed at `/metrics` in the OpenMetrics text format
//! (prometheus-client).
//!
//! Counters and the latency histogram are updated where things happen (they are atomics; the
//! heartbeat path pays one atomic add). Gauges that describe the whole state (nodes by presence,
//! devices by trust, store size) are read from the services when scraped, by the console
//! backend, and set just before encoding ([`Metrics::encode`]).

use std::collections::HashSet;
use std::sync::{Mutex, RwLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of the invocation latency histogram, seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Presence names, in the order the gauges are reported.
pub const PRESENCES: [&str; 5] = ["online", "degraded", "stale", "offline", "unknown"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateCapability {
    state: &'static str,
    capability: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PresenceLabel {
    presence: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are written as the variants are named
enum TrustValue {
    trusted,
    revoked,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrustLabel {
    trust: TrustValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

/// What the whole state looks like at a scrape.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Registered nodes by presence, in the order of [`PRESENCES`].
    pub nodes_by_presence: [u64; 5],
    /// Node connections open now.
    pub connected: u64,
    /// Trusted devices.
    pub trusted: u64,
    /// Revoked devices.
    pub revoked: u64,
    /// Bytes on disk of the store.
    pub store_bytes: u64,
    /// Seconds since the anchor started.
    pub uptime_secs: u64,
}

/// The anchor's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    handshake_failures: Family<Reason, Counter>,
    pairing_outcomes: Family<Outcome, Counter>,
    heartbeats_received: Counter,
    heartbeats_lost: Counter,
    invocations: Family<StateCapability, Counter>,
    invocation_duration: Histogram,
    half_open_closed: Counter,
    streams_refused: Counter,
    handshake_retries: Counter,
    datagrams_dropped: Family<Reason, Counter>,
    up: Family<Version, Gauge>,
    nodes: Family<PresenceLabel, Gauge>,
    connected: Gauge,
    devices: Family<TrustLabel, Gauge>,
    store_bytes: Gauge,
    uptime: Gauge,
    /// Capability names some node reported: the only values the `capability` label takes
    /// (anything else is `unknown`), so made-up names in requests cannot grow the exposition.
    known_capabilities: RwLock<HashSet<String>>,
}

/// Most distinct capability names the `capability` label takes.
pub const MAX_CAPABILITY_LABELS: usize = 1024;

/// The `capability` label of invocations of a capability no node reported.
pub const UNKNOWN_CAPABILITY: &str = "unknown";

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered, at zero.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            handshake_failures: Family::default(),
            pairing_outcomes: Family::default(),
            heartbeats_received: Counter::default(),
            heartbeats_lost: Counter::default(),
            invocations: Family::default(),
            invocation_duration: Histogram::new(LATENCY_BUCKETS),
            half_open_closed: Counter::default(),
            streams_refused: Counter::default(),
            handshake_retries: Counter::default(),
            datagrams_dropped: Family::default(),
            up: Family::default(),
            nodes: Family::default(),
            connected: Gauge::default(),
            devices: Family::default(),
            store_bytes: Gauge::default(),
            uptime: Gauge::default(),
            known_capabilities: RwLock::new(HashSet::new()),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register("anchorage_up", "1 while the anchor runs.", m.up.clone());
            r.register(
                "anchorage_nodes",
                "Registered nodes by presence.",
                m.nodes.clone(),
            );
            r.register(
                "anchorage_connected_nodes",
                "Node connections open now.",
                m.connected.clone(),
            );
            r.register("anchorage_devices", "Devices by trust.", m.devices.clone());
            r.register(
                "anchorage_heartbeats_received",
                "Heartbeat datagrams received.",
                m.heartbeats_received.clone(),
            );
            r.register(
                "anchorage_heartbeats_lost",
                "Heartbeats counted lost: sequence numbers that never arrived within the loss window.",
                m.heartbeats_lost.clone(),
            );
            r.register(
                "anchorage_half_open_closed",
                "Node connections the anchor closed because heartbeats stopped while they looked open.",
                m.half_open_closed.clone(),
            );
            r.register(
                "anchorage_streams_refused",
                "Streams peers opened that the protocol does not allow, refused with protocol_violation.",
                m.streams_refused.clone(),
            );
            r.register(
                "anchorage_handshake_retries",
                "QUIC Retry packets sent to make clients prove their address while many handshakes were in progress.",
                m.handshake_retries.clone(),
            );
            r.register(
                "anchorage_datagrams_dropped",
                "Datagrams from nodes dropped: malformed (did not decode) or unexpected (not a heartbeat).",
                m.datagrams_dropped.clone(),
            );
            r.register(
                "anchorage_invocations",
                "Invocation state transitions by state and capability.",
                m.invocations.clone(),
            );
            r.register(
                "anchorage_invocation_duration_seconds",
                "Time from request to result of invocations that ran.",
                m.invocation_duration.clone(),
            );
            r.register(
                "anchorage_pairing_outcomes",
                "Pairing outcomes.",
                m.pairing_outcomes.clone(),
            );
            r.register(
                "anchorage_handshake_failures",
                "Failed or refused handshakes by reason.",
                m.handshake_failures.clone(),
            );
            r.register(
                "anchorage_store_bytes",
                "Bytes on disk of the store.",
                m.store_bytes.clone(),
            );
            r.register(
                "anchorage_uptime_seconds",
                "Seconds since the anchor started.",
                m.uptime.clone(),
            );
        }
        m.up.get_or_create(&Version {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        m
    }

    /// Registers a metric another service owns (the mesh's relay and rendezvous counters).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// Counts a failed or refused handshake by reason.
    pub fn handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Counts a pairing outcome.
    pub fn pairing_outcome(&self, outcome: &'static str) {
        self.pairing_outcomes
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    /// Counts received heartbeats.
    pub fn heartbeats_received(&self, n: u64) {
        self.heartbeats_received.inc_by(n);
    }

    /// Counts heartbeats given up as lost.
    pub fn heartbeats_lost(&self, n: u64) {
        if n > 0 {
            self.heartbeats_lost.inc_by(n);
        }
    }

    /// Heartbeats received and counted lost so far.
    pub fn heartbeat_totals(&self) -> (u64, u64) {
        (self.heartbeats_received.get(), self.heartbeats_lost.get())
    }

    /// Counts a half-open connection closed by the anchor.
    pub fn half_open_closed(&self) {
        self.half_open_closed.inc();
    }

    /// Counts a Retry sent.
    pub fn handshake_retry(&self) {
        self.handshake_retries.inc();
    }

    /// Counts a refused stream.
    pub fn stream_refused(&self) {
        self.streams_refused.inc();
    }

    /// Counts a dropped datagram: `malformed` or `unexpected`.
    pub fn datagram_dropped(&self, reason: &'static str) {
        self.datagrams_dropped
            .get_or_create(&Reason { reason })
            .inc();
    }

    fn is_known(&self, capability: &str) -> bool {
        self.known_capabilities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(capability)
    }

    /// A node reported `capability`: invocations of it are labelled with its name.
    ///
    /// At most [`MAX_CAPABILITY_LABELS`] names are kept, so nodes reporting ever new names
    /// cannot grow the exposition either; later names are `unknown`.
    pub fn capability_reported(&self, capability: &str) {
        if !self.is_known(capability) {
            let mut known = self
                .known_capabilities
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if known.len() < MAX_CAPABILITY_LABELS {
                known.insert(capability.to_string());
            }
        }
    }

    /// Counts an invocation reaching `state`, labelled with its capability if some node
    /// reported it, else [`UNKNOWN_CAPABILITY`].
    pub fn invocation(&self, state: &'static str, capability: &str) {
        let capability = if self.is_known(capability) {
            capability.to_string()
        } else {
            UNKNOWN_CAPABILITY.to_string()
        };
        self.invocations
            .get_or_create(&StateCapability { state, capability })
            .inc();
    }

    /// Records how long an invocation that ran took, request to result.
    pub fn invocation_duration(&self, secs: f64) {
        self.invocation_duration.observe(secs);
    }

    /// The exposition, with the state gauges set from `snapshot`.
    pub fn encode(&self, snapshot: &Snapshot) -> String {
        for (name, n) in PRESENCES.iter().zip(snapshot.nodes_by_presence) {
            self.nodes
                .get_or_create(&PresenceLabel { presence: name })
                .set(gauge(n));
        }
        self.connected.set(gauge(snapshot.connected));
        self.devices
            .get_or_create(&TrustLabel {
                trust: TrustValue::trusted,
            })
            .set(gauge(snapshot.trusted));
        self.devices
            .get_or_create(&TrustLabel {
                trust: TrustValue::revoked,
            })
            .set(gauge(snapshot.revoked));
        self.store_bytes.set(gauge(snapshot.store_bytes));
        self.uptime.set(gauge(snapshot.uptime_secs));
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_with_its_labels() {
        let m = Metrics::new();
        m.handshake_failure("unknown_ca");
        m.capability_reported("echo");
        m.invocation("succeeded", "echo");
        m.invocation_duration(0.003);
        m.heartbeats_received(5);
        let text = m.encode(&Snapshot {
            nodes_by_presence: [2, 0, 1, 0, 0],
            connected: 2,
            trusted: 3,
            ..Default::default()
        });
        for line in [
            "anchorage_nodes{presence=\"online\"} 2",
            "anchorage_nodes{presence=\"stale\"} 1",
            "anchorage_connected_nodes 2",
            "anchorage_devices{trust=\"trusted\"} 3",
            "anchorage_heartbeats_received_total 5",
            "anchorage_handshake_failures_total{reason=\"unknown_ca\"} 1",
            "anchorage_invocations_total{state=\"succeeded\",capability=\"echo\"} 1",
            "anchorage_invocation_duration_seconds_count 1",
            "anchorage_invocation_duration_seconds_bucket{le=\"0.005\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.contains("anchorage_up{version=\""));
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn made_up_capability_names_do_not_grow_the_exposition() {
        let m = Metrics::new();
        m.capability_reported("echo");
        for i in 0..1000 {
            m.invocation("rejected", &format!("made-up-{i}"));
        }
        m.invocation("succeeded", "echo");
        let text = m.encode(&Snapshot::default());
        let mut series = text
            .lines()
            .filter(|l| l.starts_with("anchorage_invocations_total"))
            .collect::<Vec<_>>();
        series.sort_unstable();
        assert_eq!(
            series,
            vec![
                "anchorage_invocations_total{state=\"rejected\",capability=\"unknown\"} 1000",
                "anchorage_invocations_total{state=\"succeeded\",capability=\"echo\"} 1",
            ]
        );
    }
}
