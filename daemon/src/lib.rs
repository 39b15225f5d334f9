//! The anchor daemon of Anchorage (`anchord`).
//!
//! - [`anchor`]: shared state, start-up from the data directory, the QUIC accept loop.
//! - [`pairing`]: codes, the SPAKE2 bootstrap stream, approvals.
//! - [`session`]: an enrolled node's connection (registration, renewal, rotation).
//! - [`trust`]: tokens, audit, revoke / rotate / remove.
//! - [`runtime`]: registrations, heartbeats, presence, invocations.
//! - [`backend`]: the console backend.
//! - [`store`], [`records`]: the fjall store and what it holds.
//! - [`config`]: TOML and flags, validated.
//!
//! [`start`] binds the real sockets and returns a handle; [`run`] runs until a shutdown
//! signal. Tests call the same functions in-process on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::{info, warn};

pub mod anchor;
pub mod backend;
pub mod clock;
pub mod config;
pub mod inventory;
pub mod metrics;
pub mod pairing;
pub mod records;
pub mod runtime;
pub mod session;
pub mod store;
pub mod trust;

pub use anchor::{Anchor, StartError};
pub use clock::Clock;
pub use config::{AnchorConfig, FileConfig};

/// A running anchor with real sockets.
#[derive(Debug)]
pub struct Running {
    /// The anchor.
    pub anchor: Anchor,
    /// The bound QUIC address.
    pub quic_addr: SocketAddr,
    /// The bound console address.
    pub console_addr: SocketAddr,
    quic: JoinHandle<()>,
    http: JoinHandle<()>,
    http_stop: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// The console base URL.
    pub fn console_url(&self) -> String {
        format!("http://{}", self.console_addr)
    }

    /// Stops cleanly: closes QUIC connections with `ShuttingDown`, stops the console,
    /// persists the store.
    pub async fn shutdown(self) {
        self.anchor.shutdown();
        let _ = self.quic.await;
        let _ = self.http_stop.send(true);
        let _ = self.http.await;
    }
}

/// Opens the data directory and binds the QUIC and console sockets.
pub async fn start(config: AnchorConfig) -> Result<Running, StartError> {
    start_with_clock(config, Clock::System).await
}

/// Like [`start`], with a given clock.
pub async fn start_with_clock(config: AnchorConfig, clock: Clock) -> Result<Running, StartError> {
    let cfg = config.clone();
    let anchor = tokio::task::spawn_blocking(move || Anchor::open(cfg, clock))
        .await
        .map_err(|e| StartError::Tls(format!("start-up task failed: {e}")))??;
    let server_config = anchor.server_config()?;
    let socket = bind_udp(config.listen)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let (listener, console_addr) = bind_console(config.console).await?;
    anchor.set_bound(Some(quic_addr), Some(console_addr));
    info!(
        quic = %quic_addr,
        console = %format!("http://{console_addr}"),
        owner_token = %anchor.owner_token_path().display(),
        ca_fingerprint = %anchor.shared.ca.fingerprint(),
        "anchor ready"
    );
    let (http, http_stop) = serve_console(&anchor, listener);
    let a = anchor.clone();
    let quic = tokio::spawn(async move { a.serve(endpoint).await });
    Ok(Running {
        anchor,
        quic_addr,
        console_addr,
        quic,
        http,
        http_stop,
    })
}

/// Serves the console (API, events, web page) on `listener` until the returned sender is set
/// to `true`; open event streams end then, so the graceful stop does not wait for them.
pub fn serve_console(
    anchor: &Anchor,
    listener: tokio::net::TcpListener,
) -> (JoinHandle<()>, tokio::sync::watch::Sender<bool>) {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let app = anchorage_console::routes::router_with_options(
        anchor.backend(),
        anchorage_console::routes::RouterOptions {
            shutdown: Some(stop_rx.clone()),
            ..Default::default()
        },
    );
    let mut stop_rx = stop_rx;
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            warn!(error = %e, "console server failed");
        }
    });
    (task, stop)
}

/// Runs the anchor until `shutdown` resolves, then stops cleanly.
pub async fn run(
    config: AnchorConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let running = start(config).await?;
    shutdown.await;
    info!("shutting down");
    running.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Receive buffer asked of the kernel for the QUIC socket: a reconnect storm of a thousand
/// nodes overflows the default.
pub const UDP_RECV_BUFFER: usize = 8 * 1024 * 1024;

/// Binds the console's TCP listener; returns it with the address it got (port 0 resolved).
pub(crate) async fn bind_console(
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_RECV_BUFFER / 4);
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text of the anchor's metrics (blocking: counts devices in the store).
pub fn metrics_text(anchor: &Anchor) -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering;
    let shared = &anchor.shared;
    let rt = &shared.runtime;
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };

    family(
        &mut out,
        "anchorage_up",
        "gauge",
        "1 while the anchor runs.",
    );
    let _ = writeln!(
        out,
        "anchorage_up{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );

    // Nodes by presence, devices by trust.
    let now = anchor.now_ms();
    let t = runtime::thresholds(&shared.config);
    let mut by_presence: std::collections::BTreeMap<&'static str, u64> =
        ["online", "degraded", "stale", "offline", "unknown"]
            .into_iter()
            .map(|p| (p, 0))
            .collect();
    let connected = {
        let nodes = rt.nodes.lock().unwrap_or_else(|e| e.into_inner());
        for state in nodes.values() {
            *by_presence
                .entry(state.presence(now, &t).as_str())
                .or_default() += 1;
        }
        nodes.values().filter(|s| s.live.is_some()).count()
    };
    family(
        &mut out,
        "anchorage_nodes",
        "gauge",
        "Registered nodes by presence.",
    );
    for (p, n) in &by_presence {
        let _ = writeln!(out, "anchorage_nodes{{presence=\"{p}\"}} {n}");
    }
    family(
        &mut out,
        "anchorage_connected_nodes",
        "gauge",
        "Node connections open now.",
    );
    let _ = writeln!(out, "anchorage_connected_nodes {connected}");
    let (mut trusted, mut revoked) = (0u64, 0u64);
    if let Ok(devices) = shared
        .store
        .scan::<records::DeviceRecord>(store::Space::Devices)
    {
        for (_, d) in devices {
            match d.trust {
                records::DeviceTrust::Trusted => trusted += 1,
                records::DeviceTrust::Revoked => revoked += 1,
            }
        }
    }
    family(&mut out, "anchorage_devices", "gauge", "Devices by trust.");
    let _ = writeln!(out, "anchorage_devices{{trust=\"trusted\"}} {trusted}");
    let _ = writeln!(out, "anchorage_devices{{trust=\"revoked\"}} {revoked}");

    family(
        &mut out,
        "anchorage_heartbeats_received_total",
        "counter",
        "Heartbeat datagrams received.",
    );
    let _ = writeln!(
        out,
        "anchorage_heartbeats_received_total {}",
        rt.heartbeats_received.load(Ordering::Relaxed)
    );
    family(
        &mut out,
        "anchorage_heartbeats_lost_total",
        "counter",
        "Heartbeats estimated lost from sequence gaps.",
    );
    let _ = writeln!(
        out,
        "anchorage_heartbeats_lost_total {}",
        rt.heartbeats_lost.load(Ordering::Relaxed)
    );

    family(
        &mut out,
        "anchorage_invocations_total",
        "counter",
        "Invocation state transitions by state and capability.",
    );
    for ((state, cap), n) in rt
        .invocation_counts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "anchorage_invocations_total{{state=\"{state}\",capability=\"{}\"}} {n}",
            label(cap)
        );
    }
    family(
        &mut out,
        "anchorage_invocation_duration_seconds",
        "histogram",
        "Time from request to result of invocations that ran.",
    );
    let h = rt.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut cumulative = 0;
    for (bound, n) in runtime::LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
        cumulative += n;
        let _ = writeln!(
            out,
            "anchorage_invocation_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "anchorage_invocation_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "anchorage_invocation_duration_seconds_sum {}", h.sum);
    let _ = writeln!(
        out,
        "anchorage_invocation_duration_seconds_count {}",
        h.count
    );

    family(
        &mut out,
        "anchorage_pairing_outcomes_total",
        "counter",
        "Pairing outcomes.",
    );
    for (outcome, n) in shared.metrics.pairing_outcomes() {
        let _ = writeln!(
            out,
            "anchorage_pairing_outcomes_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    family(
        &mut out,
        "anchorage_handshake_failures_total",
        "counter",
        "Failed or refused handshakes by reason.",
    );
    for (reason, n) in shared.metrics.handshake_failures() {
        let _ = writeln!(
            out,
            "anchorage_handshake_failures_total{{reason=\"{reason}\"}} {n}"
        );
    }
    family(
        &mut out,
        "anchorage_store_bytes",
        "gauge",
        "Bytes on disk of the store.",
    );
    let _ = writeln!(out, "anchorage_store_bytes {}", shared.store.disk_space());
    family(
        &mut out,
        "anchorage_uptime_seconds",
        "gauge",
        "Seconds since the anchor started.",
    );
    let _ = writeln!(
        out,
        "anchorage_uptime_seconds {}",
        now.saturating_sub(shared.started_at_ms) / 1000
    );
    out
}
