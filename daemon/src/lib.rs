//! The anchor daemon of Anchorage (`anchord`).
//!
//! [`Anchor`] is the composition root: it builds the services and owns their tasks.
//!
//! - Services, each the one owner of its state: [`trust`] (codes, requests, devices, tokens,
//!   revocations, audit), [`nodes`] (the node table), [`invocations`], [`events`] (the event
//!   bus), [`metrics`]; held together in [`services::Services`].
//! - Their rules, without IO, beside them: [`trust::rules`], [`nodes::table`],
//!   [`invocations::machine`].
//! - IO drivers, thin: [`bootstrap`] (the pairing stream), [`session`] (a node's
//!   connection), [`dispatch`] (invocations on streams), [`backend`] (the console).
//! - [`store`]: the transaction-level store interfaces, fjall behind them, and the
//!   conformance suite; [`records`]: what it holds. [`config`]: TOML and flags, validated.
//! - [`console_tls`]: the console over HTTPS (a certificate from the anchor CA, renewed, or
//!   the operator's own).
//!
//! [`start`] binds the real sockets and returns a handle; [`run`] runs until a shutdown
//! signal; [`reload::run_service`] does too as a service (systemd notifications, SIGHUP
//! reloads). Tests call the same functions in-process on port 0. `docs/architecture.md` follows
//! a heartbeat and an invocation through all of it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tracing::{info, warn};

pub mod admission;
pub mod anchor;
pub mod backend;
pub mod batches;
pub mod bootstrap;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod console_tls;
pub mod dispatch;
pub mod events;
pub mod history;
pub mod inventory;
pub mod invocations;
pub mod mesh;
pub mod metrics;
pub mod nodes;
pub mod peering;
pub mod policy;
pub mod records;
pub mod reload;
pub mod remote;
pub mod sampler;
pub mod services;
pub mod session;
pub mod store;
pub mod streams;
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
    console_tls: bool,
    /// The bound address of the separate metrics listener, when configured.
    pub metrics_addr: Option<SocketAddr>,
    quic: JoinHandle<()>,
    metrics_http: Option<JoinHandle<()>>,
    http: JoinHandle<()>,
    http_stop: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// The console base URL (`https://` when the console speaks TLS).
    pub fn console_url(&self) -> String {
        console_url(self.console_addr, self.console_tls)
    }

    /// Stops cleanly: closes QUIC connections with `ShuttingDown`, stops the console,
    /// persists the store.
    pub async fn shutdown(self) {
        self.anchor.shutdown();
        let _ = self.quic.await;
        let _ = self.http_stop.send(true);
        let _ = self.http.await;
        if let Some(m) = self.metrics_http {
            let _ = m.await;
        }
    }
}

/// Binds the QUIC and console sockets, then opens the data directory.
pub async fn start(config: AnchorConfig) -> Result<Running, StartError> {
    start_with_clock(config, Clock::System).await
}

/// Like [`start`], with a given clock.
pub async fn start_with_clock(config: AnchorConfig, clock: Clock) -> Result<Running, StartError> {
    // Both listeners first: a port in use must fail the start before the data directory,
    // the CA or an owner token is created.
    let socket = bind_udp(config.listen)?;
    let (listener, console_addr) = bind_console(config.console).await?;
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(bind_console(addr).await?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
    let cfg = config.clone();
    let anchor = tokio::task::spawn_blocking(move || Anchor::open(cfg, clock))
        .await
        .map_err(|e| StartError::Tls(format!("start-up task failed: {e}")))??;
    let server_config = anchor.server_config()?;
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
    let services = anchor.services().clone();
    let tls = tokio::task::spawn_blocking(move || console_tls::server_config(&services))
        .await
        .map_err(|e| StartError::Tls(format!("start-up task failed: {e}")))??
        .map(|server| server.config);
    if tls.is_none() && !console_addr.ip().is_loopback() {
        warn!(
            console = %console_addr,
            "the console listens beyond this host over plain HTTP: tokens travel in clear text; \
             serve it over HTTPS with --console-tls (a certificate from the anchor CA) or \
             --console-cert FILE --console-key FILE"
        );
    }
    anchor.set_bound(Some(quic_addr), Some(console_addr));
    info!(
        quic = %quic_addr,
        console = %console_url(console_addr, tls.is_some()),
        owner_token = %anchor.owner_token_path().display(),
        ca_fingerprint = %anchor.ca_fingerprint(),
        "anchor ready"
    );
    let console_tls = tls.is_some();
    let (http, http_stop) = serve_console_with(&anchor, listener, tls);
    let metrics_http = metrics_listener.map(|(listener, addr)| {
        info!(metrics = %format!("http://{addr}/metrics"), "metrics listener ready");
        let app = anchorage_console::metrics_layer::public_router(anchor.backend());
        let options = anchor.services().config.console_serve.clone();
        tokio::spawn(anchorage_console::serve(
            listener,
            app,
            options,
            http_stop.subscribe(),
        ))
    });
    let a = anchor.clone();
    let quic = tokio::spawn(async move { a.serve(endpoint).await });
    Ok(Running {
        anchor,
        quic_addr,
        console_addr,
        console_tls,
        metrics_addr,
        quic,
        metrics_http,
        http,
        http_stop,
    })
}

/// Serves the console (API, events, web page) on `listener` with the configured
/// [`ServeOptions`](anchorage_console::ServeOptions) (timeouts, connection caps) until the
/// returned sender is set to `true`: accepting stops, open event streams end, requests in
/// flight finish, and the task ends.
pub fn serve_console(
    anchor: &Anchor,
    listener: tokio::net::TcpListener,
) -> (JoinHandle<()>, tokio::sync::watch::Sender<bool>) {
    serve_console_with(anchor, listener, None)
}

/// Like [`serve_console`], over TLS with `tls` when it is given
/// ([`console_tls::server_config`]).
pub fn serve_console_with(
    anchor: &Anchor,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (JoinHandle<()>, tokio::sync::watch::Sender<bool>) {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let app = anchorage_console::routes::router_with_options(
        anchor.backend(),
        anchorage_console::routes::RouterOptions {
            shutdown: Some(stop_rx.clone()),
            ..Default::default()
        },
    );
    let options = anchor.services().config.console_serve.clone();
    let task = match tls {
        None => tokio::spawn(anchorage_console::serve(listener, app, options, stop_rx)),
        Some(tls) => tokio::spawn(anchorage_console::serve_tls(
            listener, app, options, tls, stop_rx,
        )),
    };
    (task, stop)
}

/// `http://ADDR` or `https://ADDR`.
fn console_url(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
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

/// The metrics exposition in `format`, with the state gauges read from the services
/// (blocking: reads the store's size).
pub fn metrics_text(
    services: &services::Services,
    format: anchorage_console::MetricsFormat,
) -> String {
    services.metrics.encode(&metrics_snapshot(services), format)
}

/// The state gauges' values now, read from the services (blocking: reads the store's size).
fn metrics_snapshot(services: &services::Services) -> metrics::Snapshot {
    let (nodes_by_presence, connected) = services.nodes.counts();
    let secs = |t: std::time::SystemTime| crate::clock::to_ms(t) / 1000;
    let mut snapshot = metrics::Snapshot {
        nodes_by_presence,
        connected,
        store_bytes: services.stores.runtime.disk_space(),
        ca_cert_expiry_secs: secs(services.trust.ca().info().not_after),
        server_cert_expiry_secs: secs(services.server_cert.info().not_after),
        ..metrics::Snapshot::default()
    };
    for d in services.trust.directory().devices {
        match d.trust {
            crate::records::DeviceTrust::Trusted => {
                snapshot.trusted += 1;
                let t = d.cert_not_after_ms / 1000;
                let earliest = snapshot.node_cert_expiry_earliest_secs.get_or_insert(t);
                *earliest = (*earliest).min(t);
            }
            crate::records::DeviceTrust::Revoked => snapshot.revoked += 1,
        }
    }
    if services.config.metrics.per_node {
        let table = services.nodes.lock();
        for (id, node) in table.iter() {
            let Some(live) = &node.live else { continue };
            snapshot.per_node.push(metrics::NodeSample {
                device_id: id.to_string(),
                name: node
                    .record
                    .as_ref()
                    .map(|r| r.name.clone())
                    .unwrap_or_default(),
                rtt_secs: live.handle.conn.rtt().as_secs_f64(),
                heartbeat_loss: node.window.loss(),
            });
        }
    }
    snapshot
}
