//! The anchor's metrics, exposed at `/metrics` (prometheus-client), in the Prometheus text
//! format 0.0.4 or, when a scraper asks for it, OpenMetrics 1.0.
//!
//! Counters and the latency histograms are updated where things happen (they are atomics; the
//! heartbeat path pays one atomic add). Gauges that describe the whole state (nodes by presence,
//! devices by trust, store size, certificate expiry, per-node round trip) are read from the
//! services when scraped and set just before encoding ([`Metrics::encode`]), as are the
//! process metrics (read from the OS through `sysinfo`) and the QUIC counters, which sum
//! `quinn::Connection::stats()` over the live node connections and add the final statistics
//! of every connection that closed ([`Metrics::track_connection`]), so they never go down.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use anchorage_console::MetricsFormat;
use anchorage_console::metrics_layer::HttpObservation;
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

/// Buckets of the console's request latency histogram, seconds.
pub const HTTP_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Presence names, in the order the gauges are reported.
pub const PRESENCES: [&str; 5] = ["online", "degraded", "stale", "offline", "unknown"];

/// The git commit the binary was built from, when the build set `ANCHORAGE_GIT_COMMIT`.
pub const GIT_COMMIT: &str = match option_env!("ANCHORAGE_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

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
struct CapabilityLabel {
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
    os: &'static str,
    arch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    device_id: String,
    name: String,
}

/// A gauge of one value with no labels that may also be absent (no samples at all).
type OptionalGauge = Family<Vec<(&'static str, &'static str)>, Gauge>;
type FloatGauge = Gauge<f64, AtomicU64>;
type RouteHistograms = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// One live node, for the per-node gauges (`--metrics-per-node`).
#[derive(Debug, Clone)]
pub struct NodeSample {
    /// Its device id.
    pub device_id: String,
    /// The name it registered with.
    pub name: String,
    /// QUIC's smoothed round-trip time on its connection, seconds.
    pub rtt_secs: f64,
    /// Heartbeats lost over the recent window, 0 to 1 (`None` until the window holds a few).
    pub heartbeat_loss: Option<f64>,
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
    /// When the CA certificate expires, Unix seconds.
    pub ca_cert_expiry_secs: u64,
    /// When the anchor's server certificate expires, Unix seconds.
    pub server_cert_expiry_secs: u64,
    /// When the first trusted device's certificate expires, Unix seconds (`None`: no device).
    pub node_cert_expiry_earliest_secs: Option<u64>,
    /// Live nodes for the per-node gauges; empty unless they are enabled.
    pub per_node: Vec<NodeSample>,
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
    invocations_started: Family<CapabilityLabel, Counter>,
    invocation_duration: Histogram,
    half_open_closed: Counter,
    streams_refused: Counter,
    handshake_retries: Counter,
    datagrams_dropped: Family<Reason, Counter>,
    invocation_copies_sent: Counter,
    invocation_copy_bytes: Counter,
    invocation_copies_won: Counter,
    up: Family<Version, Gauge>,
    build_info: Family<BuildLabels, Gauge>,
    nodes: Family<PresenceLabel, Gauge>,
    connected: Gauge,
    devices: Family<TrustLabel, Gauge>,
    store_bytes: Gauge,
    ca_expiry: Gauge,
    server_expiry: Gauge,
    node_expiry_earliest: OptionalGauge,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: RouteHistograms,
    node_rtt: Family<NodeLabels, FloatGauge>,
    node_loss: Family<NodeLabels, FloatGauge>,
    process: ProcessMetrics,
    quic: QuicMetrics,
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
            invocations_started: Family::default(),
            invocation_duration: Histogram::new(LATENCY_BUCKETS),
            half_open_closed: Counter::default(),
            streams_refused: Counter::default(),
            handshake_retries: Counter::default(),
            datagrams_dropped: Family::default(),
            invocation_copies_sent: Counter::default(),
            invocation_copy_bytes: Counter::default(),
            invocation_copies_won: Counter::default(),
            up: Family::default(),
            build_info: Family::default(),
            nodes: Family::default(),
            connected: Gauge::default(),
            devices: Family::default(),
            store_bytes: Gauge::default(),
            ca_expiry: Gauge::default(),
            server_expiry: Gauge::default(),
            node_expiry_earliest: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(|| Histogram::new(HTTP_BUCKETS)),
            node_rtt: Family::default(),
            node_loss: Family::default(),
            process: ProcessMetrics::new(),
            quic: QuicMetrics::default(),
            known_capabilities: RwLock::new(HashSet::new()),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register("anchorage_up", "1 while the anchor runs.", m.up.clone());
            r.register(
                "anchorage_build_info",
                "Always 1; the labels say which build runs (commit: ANCHORAGE_GIT_COMMIT at build time).",
                m.build_info.clone(),
            );
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
                "Datagrams from nodes dropped: malformed (did not decode or beyond the limits) or unexpected (neither a heartbeat nor a result copy).",
                m.datagrams_dropped.clone(),
            );
            r.register(
                "anchorage_invocation_copies_sent",
                "Datagram copies of small invocation requests sent beside their streams (docs/protocol.md).",
                m.invocation_copies_sent.clone(),
            );
            r.register(
                "anchorage_invocation_copy_bytes",
                "Payload bytes of those copies.",
                m.invocation_copy_bytes.clone(),
            );
            r.register(
                "anchorage_invocation_copies_won",
                "Invocations whose result arrived first as a datagram copy rather than on the stream.",
                m.invocation_copies_won.clone(),
            );
            r.register(
                "anchorage_invocations",
                "Invocations that ended, once each, by final state and capability.",
                m.invocations.clone(),
            );
            r.register(
                "anchorage_invocations_started",
                "Invocations queued (not rejected at once), by capability.",
                m.invocations_started.clone(),
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
                "anchorage_store_size_bytes",
                "Bytes on disk of the store (fjall's data directory, or etcd's database).",
                m.store_bytes.clone(),
            );
            r.register(
                "anchorage_ca_cert_expiry_timestamp_seconds",
                "When the anchor's CA certificate expires, Unix seconds.",
                m.ca_expiry.clone(),
            );
            r.register(
                "anchorage_server_cert_expiry_timestamp_seconds",
                "When the anchor's QUIC server certificate expires, Unix seconds (renewed before).",
                m.server_expiry.clone(),
            );
            r.register(
                "anchorage_node_cert_expiry_earliest_timestamp_seconds",
                "When the first certificate of a trusted device expires, Unix seconds (absent without devices).",
                m.node_expiry_earliest.clone(),
            );
            r.register(
                "anchorage_http_requests",
                "Console requests answered, by route template, method and status.",
                m.http_requests.clone(),
            );
            r.register(
                "anchorage_http_request_duration_seconds",
                "Time from a console request to its answer's head, by route template.",
                m.http_duration.clone(),
            );
            r.register(
                "anchorage_node_rtt_seconds",
                "QUIC round-trip time to each live node (only with metrics_per_node).",
                m.node_rtt.clone(),
            );
            r.register(
                "anchorage_node_heartbeat_loss_ratio",
                "Heartbeats lost over the recent window of each live node, 0 to 1 (only with metrics_per_node).",
                m.node_loss.clone(),
            );
            m.process.register(&mut r);
            m.quic.register(&mut r);
        }
        m.up.get_or_create(&Version {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: GIT_COMMIT,
                os: std::env::consts::OS,
                arch: std::env::consts::ARCH,
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

    /// Counts a datagram copy of an invocation request, `bytes` long.
    pub fn invocation_copy_sent(&self, bytes: usize) {
        self.invocation_copies_sent.inc();
        self.invocation_copy_bytes.inc_by(bytes as u64);
    }

    /// Counts an invocation whose result copy arrived before its stream's result.
    pub fn invocation_copy_won(&self) {
        self.invocation_copies_won.inc();
    }

    fn is_known(&self, capability: &str) -> bool {
        self.known_capabilities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(capability)
    }

    fn capability_label(&self, capability: &str) -> String {
        if self.is_known(capability) {
            capability.to_string()
        } else {
            UNKNOWN_CAPABILITY.to_string()
        }
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

    /// Counts an invocation that ended in the final `state` (call it once per invocation),
    /// labelled with its capability if some node reported it, else [`UNKNOWN_CAPABILITY`].
    pub fn invocation(&self, state: &'static str, capability: &str) {
        let capability = self.capability_label(capability);
        self.invocations
            .get_or_create(&StateCapability { state, capability })
            .inc();
    }

    /// Counts an invocation queued, labelled like [`Metrics::invocation`].
    pub fn invocation_started(&self, capability: &str) {
        let capability = self.capability_label(capability);
        self.invocations_started
            .get_or_create(&CapabilityLabel { capability })
            .inc();
    }

    /// Records how long an invocation that ran took, request to result.
    pub fn invocation_duration(&self, secs: f64) {
        self.invocation_duration.observe(secs);
    }

    /// Counts one answered console request and its latency.
    pub fn http_request(&self, r: &HttpObservation<'_>) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: r.route.to_string(),
                method: r.method,
                status: r.status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabel {
                route: r.route.to_string(),
            })
            .observe(r.seconds);
    }

    /// Counts `conn` in the QUIC counters while the returned guard lives; dropping it (when
    /// the session ends) adds the connection's final statistics to the closed connections'
    /// totals.
    pub fn track_connection(self: &Arc<Self>, conn: &quinn::Connection) -> TrackedConnection {
        let id = conn.stable_id();
        self.quic.lock().live.insert(id, conn.clone());
        TrackedConnection {
            metrics: self.clone(),
            id,
        }
    }

    /// The exposition in `format`, with the state gauges set from `snapshot` and the process
    /// and QUIC metrics read now.
    pub fn encode(&self, snapshot: &Snapshot, format: MetricsFormat) -> String {
        // Held while the scrape-time values are brought up to date, so that two scrapes at
        // once do not both add the same increase to a counter.
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        self.set_state(snapshot);
        self.process.refresh();
        self.quic.refresh();
        let mut out = String::new();
        let encoded = match format {
            MetricsFormat::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            MetricsFormat::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &registry)
            }
        };
        if let Err(e) = encoded {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    fn set_state(&self, snapshot: &Snapshot) {
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
        self.ca_expiry.set(gauge(snapshot.ca_cert_expiry_secs));
        self.server_expiry
            .set(gauge(snapshot.server_cert_expiry_secs));
        self.node_expiry_earliest.clear();
        if let Some(t) = snapshot.node_cert_expiry_earliest_secs {
            self.node_expiry_earliest
                .get_or_create(&Vec::new())
                .set(gauge(t));
        }
        // Nodes that went away since the last scrape leave the per-node series.
        self.node_rtt.clear();
        self.node_loss.clear();
        for n in &snapshot.per_node {
            let labels = NodeLabels {
                device_id: n.device_id.clone(),
                name: n.name.clone(),
            };
            self.node_rtt.get_or_create(&labels).set(n.rtt_secs);
            if let Some(loss) = n.heartbeat_loss {
                self.node_loss.get_or_create(&labels).set(loss);
            }
        }
    }
}

/// Keeps a node connection in the QUIC counters; see [`Metrics::track_connection`].
#[derive(Debug)]
pub struct TrackedConnection {
    metrics: Arc<Metrics>,
    id: usize,
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        let mut quic = self.metrics.quic.lock();
        if let Some(conn) = quic.live.remove(&self.id) {
            let stats = conn.stats();
            quic.closed.add(&stats);
        }
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Raises `counter` to `total` (totals read at a scrape only grow).
fn raise(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// Sums of `quinn::ConnectionStats` fields the counters report.
#[derive(Debug, Default, Clone, Copy)]
struct QuicTotals {
    sent_packets: u64,
    lost_packets: u64,
    lost_bytes: u64,
    congestion_events: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
    sent_bytes: u64,
    received_bytes: u64,
}

impl QuicTotals {
    fn add(&mut self, s: &quinn::ConnectionStats) {
        self.sent_packets += s.path.sent_packets;
        self.lost_packets += s.path.lost_packets;
        self.lost_bytes += s.path.lost_bytes;
        self.congestion_events += s.path.congestion_events;
        self.datagrams_sent += s.frame_tx.datagram;
        self.datagrams_received += s.frame_rx.datagram;
        self.sent_bytes += s.udp_tx.bytes;
        self.received_bytes += s.udp_rx.bytes;
    }
}

#[derive(Debug, Default)]
struct QuicConnections {
    live: HashMap<usize, quinn::Connection>,
    closed: QuicTotals,
}

/// The QUIC counters over node connections, live and closed.
#[derive(Debug, Default)]
struct QuicMetrics {
    connections: Mutex<QuicConnections>,
    tracked: Gauge,
    sent_packets: Counter,
    lost_packets: Counter,
    lost_bytes: Counter,
    congestion_events: Counter,
    datagrams_sent: Counter,
    datagrams_received: Counter,
    sent_bytes: Counter,
    received_bytes: Counter,
}

impl QuicMetrics {
    fn lock(&self) -> MutexGuard<'_, QuicConnections> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, r: &mut Registry) {
        let counters: [(&str, &str, &Counter); 8] = [
            (
                "anchorage_quic_sent_packets",
                "QUIC packets sent on node connections (live and closed).",
                &self.sent_packets,
            ),
            (
                "anchorage_quic_lost_packets",
                "QUIC packets on node connections declared lost by loss detection.",
                &self.lost_packets,
            ),
            (
                "anchorage_quic_lost_bytes",
                "Bytes of the QUIC packets on node connections declared lost.",
                &self.lost_bytes,
            ),
            (
                "anchorage_quic_congestion_events",
                "Congestion events (the congestion window shrank) on node connections.",
                &self.congestion_events,
            ),
            (
                "anchorage_quic_datagrams_sent",
                "QUIC DATAGRAM frames sent to nodes (heartbeat acks).",
                &self.datagrams_sent,
            ),
            (
                "anchorage_quic_datagrams_received",
                "QUIC DATAGRAM frames received from nodes (heartbeats).",
                &self.datagrams_received,
            ),
            (
                "anchorage_quic_sent_bytes",
                "UDP payload bytes sent on node connections.",
                &self.sent_bytes,
            ),
            (
                "anchorage_quic_received_bytes",
                "UDP payload bytes received on node connections.",
                &self.received_bytes,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register(
            "anchorage_quic_connections",
            "Node connections counted in the QUIC counters now (after the handshake, until the session ends).",
            self.tracked.clone(),
        );
    }

    fn refresh(&self) {
        let (total, live) = {
            let quic = self.lock();
            let mut total = quic.closed;
            for conn in quic.live.values() {
                total.add(&conn.stats());
            }
            (total, quic.live.len())
        };
        self.tracked.set(gauge(live as u64));
        raise(&self.sent_packets, total.sent_packets);
        raise(&self.lost_packets, total.lost_packets);
        raise(&self.lost_bytes, total.lost_bytes);
        raise(&self.congestion_events, total.congestion_events);
        raise(&self.datagrams_sent, total.datagrams_sent);
        raise(&self.datagrams_received, total.datagrams_received);
        raise(&self.sent_bytes, total.sent_bytes);
        raise(&self.received_bytes, total.received_bytes);
    }
}

/// The conventional `process_*` metrics, read from the OS at each scrape.
#[derive(Debug)]
struct ProcessMetrics {
    system: Mutex<sysinfo::System>,
    pid: Option<sysinfo::Pid>,
    cpu_seconds: Counter<f64, AtomicU64>,
    resident: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
}

impl ProcessMetrics {
    fn new() -> ProcessMetrics {
        ProcessMetrics {
            system: Mutex::new(sysinfo::System::new()),
            pid: sysinfo::get_current_pid().ok(),
            cpu_seconds: Counter::default(),
            resident: Gauge::default(),
            virtual_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time: Gauge::default(),
            threads: Gauge::default(),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.clone(),
        );
        for (name, help, g) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                &self.resident,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                &self.virtual_memory,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                &self.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                &self.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                &self.start_time,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                &self.threads,
            ),
        ] {
            r.register(name, help, g.clone());
        }
    }

    fn refresh(&self) {
        let Some(pid) = self.pid else { return };
        let mut system = self.system.lock().unwrap_or_else(|e| e.into_inner());
        system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            false,
            sysinfo::ProcessRefreshKind::nothing()
                .with_cpu()
                .with_memory()
                .with_tasks(),
        );
        let Some(p) = system.process(pid) else { return };
        let cpu = p.accumulated_cpu_time() as f64 / 1000.0;
        let counted = self.cpu_seconds.get();
        if cpu > counted {
            self.cpu_seconds.inc_by(cpu - counted);
        }
        self.resident.set(gauge(p.memory()));
        self.virtual_memory.set(gauge(p.virtual_memory()));
        self.start_time.set(gauge(p.start_time()));
        let count = |n: Option<usize>| gauge(n.unwrap_or(0) as u64);
        self.open_fds.set(count(p.open_files()));
        self.max_fds.set(count(p.open_files_limit()));
        // Tasks are listed on Linux only; elsewhere the gauge stays 0.
        self.threads.set(count(p.tasks().map(|t| t.len())));
    }
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
        let text = m.encode(
            &Snapshot {
                nodes_by_presence: [2, 0, 1, 0, 0],
                connected: 2,
                trusted: 3,
                ..Default::default()
            },
            MetricsFormat::OpenMetrics,
        );
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
        // Prometheus text names counter families with their `_total`, and has no `# EOF`.
        let text = m.encode(&Snapshot::default(), MetricsFormat::Prometheus);
        assert!(
            text.lines()
                .any(|l| l == "# TYPE anchorage_heartbeats_received_total counter"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "anchorage_heartbeats_received_total 5")
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn an_invocation_counts_once_whatever_its_path() {
        let m = Metrics::new();
        m.capability_reported("echo");
        m.invocation_started("echo");
        m.invocation("succeeded", "echo");
        m.invocation("rejected", "nope");
        let text = m.encode(&Snapshot::default(), MetricsFormat::Prometheus);
        let total = |prefix: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(total("anchorage_invocations_total{"), 2.0);
        assert_eq!(total("anchorage_invocations_started_total{"), 1.0);
    }

    #[test]
    fn per_node_series_follow_the_live_nodes_and_the_earliest_expiry_may_be_absent() {
        let m = Metrics::new();
        let node = |id: &str| NodeSample {
            device_id: id.into(),
            name: format!("n-{id}"),
            rtt_secs: 0.02,
            heartbeat_loss: Some(0.5),
        };
        let text = m.encode(
            &Snapshot {
                per_node: vec![node("a"), node("b")],
                node_cert_expiry_earliest_secs: Some(1_900_000_000),
                ..Default::default()
            },
            MetricsFormat::Prometheus,
        );
        assert!(
            text.lines()
                .any(|l| l
                    == "anchorage_node_heartbeat_loss_ratio{device_id=\"b\",name=\"n-b\"} 0.5"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "anchorage_node_cert_expiry_earliest_timestamp_seconds 1900000000"),
            "{text}"
        );
        let text = m.encode(
            &Snapshot {
                per_node: vec![node("a")],
                ..Default::default()
            },
            MetricsFormat::Prometheus,
        );
        assert!(!text.contains("device_id=\"b\""), "{text}");
        assert!(text.contains("device_id=\"a\""), "{text}");
        assert!(
            !text.contains("anchorage_node_cert_expiry_earliest_timestamp_seconds "),
            "{text}"
        );
    }

    #[test]
    fn made_up_capability_names_do_not_grow_the_exposition() {
        let m = Metrics::new();
        m.capability_reported("echo");
        for i in 0..1000 {
            m.invocation("rejected", &format!("made-up-{i}"));
        }
        m.invocation("succeeded", "echo");
        let text = m.encode(&Snapshot::default(), MetricsFormat::OpenMetrics);
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
