//! The anchor: the composition root.
//!
//! [`Anchor::open`] builds every service from the data directory (store, CA, owner token)
//! without binding sockets. [`Anchor::serve`] runs the accept loop on any quinn endpoint (a
//! real UDP socket, or a netsim host in tests) and hands each connection to its IO driver.
//! Every task belongs to the services' tracker; [`Anchor::shutdown`] cancels them, and `serve`
//! then stops in order: no new connections, sessions closed with `ShuttingDown`, tasks
//! drained, last-seen times and the store flushed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anchorage_console::api::Permission;
use anchorage_mesh::conn_error::ConnFailure;
use anchorage_mesh::framed;
use anchorage_mesh::pki::{
    CertificateAuthority, DEFAULT_CA_VALIDITY, DEFAULT_SERVER_CERT_VALIDITY,
};
use anchorage_mesh::tls::{self, AnchorTls, PeerKind, ServerCertResolver};
use anchorage_wire::ErrorCode;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::clock::Clock;
use crate::config::{AnchorConfig, StoreChoice};
use crate::events::EventBus;
use crate::invocations::Invocations;
use crate::metrics::Metrics;
use crate::nodes::NodeTable;
use crate::services::Services;
use crate::store::{FjallStore, Lease, StoreError, Stores, Writer};
use crate::trust::{Trust, TrustSettings};

/// How long a handshake may take before the anchor gives up on it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a handshake in progress counts towards `retry_above_handshakes` and
/// `refuse_above_handshakes`. Past it the node has most likely given up on it (a node's first
/// handshake limit is 2 s ±25 %, and the close it sends then can be lost in a storm) or is on
/// a slow link; either way it is not work queued at the anchor, and counting it until
/// [`HANDSHAKE_TIMEOUT`] would refuse nodes while the anchor sits idle.
pub const HANDSHAKE_COUNTED_FOR: Duration = Duration::from_secs(3);
/// Connections handled at once; beyond this, new ones are refused (`Overloaded`).
pub const MAX_CONNECTIONS: usize = 20_000;
/// How often presence is evaluated and deadlines are swept.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// How often buffered last-seen times are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// How often an anchor renews its announcement.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(3);
/// How long an announcement outlives its last renewal.
pub const ANNOUNCE_TTL: Duration = Duration::from_secs(10);
/// How often finished invocations are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Longest wait at shutdown for tasks and close frames.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Errors starting the anchor. Each names the file or address involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file in the data directory could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA files are damaged or do not match.
    #[error("CA in {path}: {message}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why (e.g. address in use).
        source: std::io::Error,
    },
    /// TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The cluster key or the cluster's CA.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// The anchor. Cheap to clone.
#[derive(Clone)]
pub struct Anchor {
    services: Arc<Services>,
    owner_token_path: PathBuf,
}

impl std::fmt::Debug for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anchor")
            .field("data_dir", &self.services.config.data_dir)
            .finish_non_exhaustive()
    }
}

impl Anchor {
    /// Opens the data directory and builds the services: store, CA (created on first start),
    /// owner token. Call it within a tokio runtime (the store's writer is a task); it blocks.
    pub fn open(config: AnchorConfig, clock: Clock) -> Result<Anchor, StartError> {
        let dir = config.data_dir.clone();
        create_private_dir(&dir)?;
        let now = clock.now();
        let (stores, ca) = match &config.store {
            StoreChoice::Fjall => (
                Stores::from_backend(FjallStore::open(&dir.join("store"))?),
                load_or_create_ca(&dir, now)?,
            ),
            StoreChoice::Etcd(settings) => open_cluster(settings, &dir, now)?,
        };
        if let Some(left) = ca.expiry_warning(now) {
            warn!(
                days_left = left.as_secs() / 86400,
                "the anchor CA expires soon; plan a CA rotation"
            );
        }
        let server = ca
            .issue_server(DEFAULT_SERVER_CERT_VALIDITY, now)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let server_cert =
            Arc::new(ServerCertResolver::new(server).map_err(|e| StartError::Tls(e.to_string()))?);

        let events = Arc::new(EventBus::new(clock));
        let metrics = Arc::new(Metrics::new());
        let trust = Trust::new(
            stores.trust.clone(),
            ca,
            clock,
            TrustSettings {
                cert_validity: config.cert_validity,
                pairing_max_attempts: config.pairing_max_attempts,
            },
            metrics.clone(),
        )?;
        let mut snapshot = stores.runtime.load()?;
        trust.restore_token_use(std::mem::take(&mut snapshot.token_use));
        let unfinished_batches = std::mem::take(&mut snapshot.batches);
        let writer = Writer::start(stores.runtime.clone())?;
        let instance_id = uuid::Uuid::now_v7().simple().to_string()[20..].to_string();
        if stores.runtime.shared() {
            // What another anchor holds the session of is that anchor's to dispatch.
            let held: std::collections::HashSet<_> =
                snapshot.sessions.iter().map(|(d, _)| *d).collect();
            snapshot.unfinished.retain(|r| !held.contains(&r.device_id));
        }
        let nodes = NodeTable::new(
            &config,
            stores.runtime.shared().then(|| instance_id.clone()),
            &mut snapshot,
            clock,
            events.clone(),
            metrics.clone(),
            writer.clone(),
        );
        let invocations = Invocations::new(
            std::mem::take(&mut snapshot.unfinished),
            config.invocation_output_limit as usize,
            stores.runtime.clone(),
            writer.clone(),
            clock,
            events.clone(),
            metrics.clone(),
        );
        let known: std::collections::HashSet<_> = stores
            .trust
            .devices()?
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        let history = crate::history::History::new(
            config.history,
            std::mem::take(&mut snapshot.history),
            |d| known.contains(d),
            writer.clone(),
        );
        let services = Arc::new(Services::new(
            config,
            clock,
            stores,
            trust,
            nodes,
            invocations,
            events,
            metrics,
            server_cert,
            writer,
            unfinished_batches,
            instance_id,
            history,
        ));
        crate::remote::follow(&services);
        // Loaded after following the other anchors, so a change made meanwhile is either read
        // here or heard there; the feed keeps the newer.
        services.policy.replace(services.trust.policy()?);
        let anchor = Anchor {
            services,
            owner_token_path: dir.join("owner.token"),
        };
        anchor.ensure_owner_token()?;
        Ok(anchor)
    }

    /// The services, for IO drivers and tests.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// The quinn server configuration (both ALPNs, live revocation).
    pub fn server_config(&self) -> Result<quinn::ServerConfig, StartError> {
        let s = &self.services;
        let tls = AnchorTls {
            ca: s.trust.ca().cert_der().clone(),
            server_cert: s.server_cert.clone(),
            revocation: s.trust.revocation().clone(),
            renewal_grace: s.config.renewal_grace,
        };
        tls::anchor_server_config(&tls).map_err(|e| StartError::Tls(e.to_string()))
    }

    /// The CA certificate PEM.
    pub fn ca_pem(&self) -> &str {
        self.services.trust.ca().cert_pem()
    }

    /// The CA certificate DER.
    pub fn ca_der(&self) -> &rustls::pki_types::CertificateDer<'static> {
        self.services.trust.ca().cert_der()
    }

    /// SHA-256 fingerprint of the CA (pinned by QR codes).
    pub fn ca_fingerprint(&self) -> anchorage_mesh::Fingerprint {
        self.services.trust.ca().fingerprint()
    }

    /// Heartbeats received and counted lost so far.
    pub fn shared_metrics(&self) -> (u64, u64) {
        self.services.metrics.heartbeat_totals()
    }

    /// Path of the owner token file.
    pub fn owner_token_path(&self) -> &Path {
        &self.owner_token_path
    }

    /// The owner token's secret (read from its file).
    pub fn owner_token(&self) -> Result<String, StartError> {
        std::fs::read_to_string(&self.owner_token_path)
            .map(|s| s.trim().to_string())
            .map_err(|source| StartError::File {
                path: self.owner_token_path.clone(),
                source,
            })
    }

    /// The console backend over this anchor.
    pub fn backend(&self) -> Arc<crate::backend::AnchorBackend> {
        Arc::new(crate::backend::AnchorBackend::new(self.services.clone()))
    }

    /// Records the addresses the anchor is reachable at (for QR codes and the inventory).
    pub fn set_bound(
        &self,
        quic: Option<std::net::SocketAddr>,
        console: Option<std::net::SocketAddr>,
    ) {
        self.services.set_bound(quic, console);
    }

    /// Runs the accept loop on `endpoint` until shutdown, then stops in order: closes every
    /// connection with `ShuttingDown`, waits for the anchor's tasks (bounded), flushes
    /// last-seen times and persists the store.
    pub async fn serve(&self, endpoint: quinn::Endpoint) {
        let s = &self.services;
        if let Ok(addr) = endpoint.local_addr() {
            s.set_bound(Some(addr), None);
        }
        s.spawn(housekeeping(s.clone()));
        s.spawn(crate::sampler::run(s.clone()));
        s.spawn(crate::peering::follow(s.clone()));
        crate::batches::resume(s);
        let active = Arc::new(AtomicUsize::new(0));
        let handshaking = Arc::new(AtomicUsize::new(0));
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = s.cancel.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                s.metrics.handshake_failure("overloaded");
                incoming.refuse();
                continue;
            }
            let in_progress = handshaking.load(Ordering::Relaxed);
            if in_progress >= s.config.refuse_above_handshakes {
                // Cheaper than a handshake that would finish after the node gave up on it,
                // and than an Initial dropped in a full socket (which the node would only
                // send again after QUIC's probe timeout).
                s.metrics.handshake_failure("busy");
                incoming.refuse();
                continue;
            }
            if in_progress >= s.config.retry_above_handshakes
                && !incoming.remote_address_validated()
            {
                match incoming.retry() {
                    Ok(()) => {
                        s.metrics.handshake_retry();
                        continue;
                    }
                    Err(e) => {
                        // Retry is not possible for this one (already validated): go on.
                        let incoming = e.into_incoming();
                        spawn_incoming(s, &active, &handshaking, incoming);
                        continue;
                    }
                }
            }
            spawn_incoming(s, &active, &handshaking, incoming);
        }
        s.nodes
            .close_all(ErrorCode::ShuttingDown, "anchor shutting down");
        endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::ShuttingDown.as_u32()),
            b"anchor shutting down",
        );
        s.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, s.tasks.wait())
            .await
            .is_err()
        {
            debug!("some tasks were still running at shutdown");
        }
        s.nodes.flush().await;
        if let Err(e) = s.invocations.barrier().await {
            warn!(error = %e, "store flush at shutdown failed");
        }
        // Give the close frames a moment to leave; bounded so shutdown never hangs.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, endpoint.wait_idle()).await;
        let runtime = s.stores.runtime.clone();
        let persisted = tokio::task::spawn_blocking(move || runtime.persist()).await;
        if !matches!(persisted, Ok(Ok(()))) {
            warn!("store persist at shutdown failed");
        }
    }

    /// Asks every task to stop.
    pub fn shutdown(&self) {
        self.services.cancel.cancel();
    }

    fn ensure_owner_token(&self) -> Result<(), StartError> {
        let path = self.owner_token_path.clone();
        let trust = &self.services.trust;
        if let Ok(existing) = std::fs::read_to_string(&path)
            && trust.authenticate(existing.trim()).is_some()
        {
            return Ok(());
        }
        // A shared store has one owner token for the cluster: the first anchor's.
        let shared = self.services.config.store != StoreChoice::Fjall;
        if shared
            && trust.tokens().iter().any(|t| {
                t.record.name == "owner"
                    && t.record.created_by == "anchor"
                    && t.record.revoked_at_ms.is_none()
            })
        {
            info!(
                "the cluster's owner token was created by its first anchor and is in that \
                 anchor's data directory (owner.token)"
            );
            return Ok(());
        }
        let created = trust
            .create_token(
                "anchor",
                "owner".to_string(),
                Permission::ALL.to_vec(),
                Default::default(),
                None,
            )
            .map_err(|e| StartError::Tls(format!("creating the owner token: {e:?}")))?;
        write_private_file(&path, format!("{}\n", created.token).as_bytes())?;
        info!(path = %path.display(), "created owner token");
        Ok(())
    }
}

fn spawn_incoming(
    s: &Arc<Services>,
    active: &Arc<AtomicUsize>,
    handshaking: &Arc<AtomicUsize>,
    incoming: quinn::Incoming,
) {
    let services = s.clone();
    let active = active.clone();
    let handshaking = handshaking.clone();
    active.fetch_add(1, Ordering::Relaxed);
    handshaking.fetch_add(1, Ordering::Relaxed);
    let remote = incoming.remote_address();
    // The task lives as long as the connection and keeps what it captured until it ends: the
    // `Incoming` (about 400 bytes, needed only until the handshake starts) goes in a box that
    // is freed then.
    let incoming = Box::new(incoming);
    s.spawn(
        async move {
            if let Some(conn) = handshake(&services, incoming, &handshaking).await {
                serve_connection(services, conn).await;
            }
            active.fetch_sub(1, Ordering::Relaxed);
        }
        // One span per connection: a node's session records its device in it (a span of its
        // own cost every connected node about 300 bytes in the log subscriber).
        .instrument(info_span!("conn", %remote, device_id = tracing::field::Empty)),
    );
}

/// The QUIC handshake of `incoming`, counted in `handshaking` for at most
/// [`HANDSHAKE_COUNTED_FOR`]. `None`: it failed (counted in the metrics).
async fn handshake(
    services: &Services,
    incoming: Box<quinn::Incoming>,
    handshaking: &AtomicUsize,
) -> Option<quinn::Connection> {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            handshaking.fetch_sub(1, Ordering::Relaxed);
            debug!(error = %e, "incoming refused");
            return None;
        }
    };
    let mut connecting = std::pin::pin!(connecting);
    let counted = tokio::time::timeout(HANDSHAKE_COUNTED_FOR, &mut connecting).await;
    handshaking.fetch_sub(1, Ordering::Relaxed);
    let handshake = match counted {
        Ok(done) => Ok(done),
        Err(_) => {
            let rest = HANDSHAKE_TIMEOUT.saturating_sub(HANDSHAKE_COUNTED_FOR);
            tokio::time::timeout(rest, connecting).await
        }
    };
    match handshake {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            let reason = ConnFailure::classify(&e).name();
            services.metrics.handshake_failure(reason);
            debug!(error = %e, reason, "handshake failed");
            None
        }
        Err(_) => {
            services.metrics.handshake_failure("timeout");
            None
        }
    }
}

/// Serves a connection after its handshake, by what its certificate and ALPN say it is.
async fn serve_connection(services: Arc<Services>, conn: quinn::Connection) {
    // The classification is over before any await: a node's session future holds nothing of
    // it for as long as the node stays connected.
    let (info, renewal_only) = match tls::classify_connection(&conn, services.clock.now()) {
        Ok(PeerKind::Node(info)) => (info, false),
        Ok(PeerKind::NodeRenewalOnly(info)) => (info, true),
        Ok(PeerKind::Bootstrap) => {
            // Boxed: a pairing's future is the largest and the rarest, and held inline it
            // would size every node connection's task.
            let pairing = Box::pin(crate::bootstrap::serve(services, conn));
            return pairing.await;
        }
        Err(code) => {
            services.metrics.handshake_failure(code.name());
            framed::close(&conn, code, "client certificate required on this ALPN");
            return;
        }
    };
    crate::session::serve(services, conn, info, renewal_only).await
}

/// Background housekeeping: presence and half-open sessions, deadlines, last-seen flushes,
/// pruning, server certificate renewal, and work left over from before a restart.
async fn housekeeping(s: Arc<Services>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = tokio::time::Instant::now();
    let mut last_prune = tokio::time::Instant::now();
    announce(&s).await;
    let mut last_announce = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = s.cancel.cancelled() => return,
        }
        s.nodes.tick();
        s.invocations.sweep().await;
        if last_announce.elapsed() >= ANNOUNCE_INTERVAL {
            last_announce = tokio::time::Instant::now();
            announce(&s).await;
        }
        if last_flush.elapsed() >= FLUSH_INTERVAL {
            last_flush = tokio::time::Instant::now();
            s.nodes.flush().await;
        }
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = tokio::time::Instant::now();
            let p = s.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let retention = p.live.retention();
                if let Err(e) = p
                    .invocations
                    .prune(retention.max_age, retention.max_records)
                {
                    warn!(error = %e, "pruning invocations failed");
                }
                if let Err(e) = crate::batches::prune(&p) {
                    warn!(error = %e, "pruning batches failed");
                }
            })
            .await;
        }
        renew_server_cert(&s);
    }
}

/// Announces this anchor as an inventory instance (in a shared store, with a lease of
/// [`ANNOUNCE_TTL`]: an anchor that dies drops out of every anchor's list within it).
async fn announce(s: &Arc<Services>) {
    let Ok(value) = serde_json::to_vec(&crate::inventory::instance(s)) else {
        return;
    };
    let p = s.clone();
    let state = match tokio::task::spawn_blocking(move || {
        p.stores
            .runtime
            .announce(&p.instance_id, value, ANNOUNCE_TTL)
    })
    .await
    {
        Ok(Ok(Lease::Held)) => "held",
        Ok(Ok(Lease::New)) => {
            // The sessions under a lapsed lease are gone from the store: claim them again.
            s.nodes.reclaim().await;
            "held"
        }
        Ok(Ok(Lease::Local)) => "local",
        Ok(Err(e)) => {
            warn!(error = %e, "cannot renew this anchor's announcement");
            "lost"
        }
        Err(_) => "lost",
    };
    *s.lease.lock().unwrap_or_else(|e| e.into_inner()) = state;
    let p = s.clone();
    let Ok(instances) = tokio::task::spawn_blocking(move || crate::inventory::instances(&p)).await
    else {
        return;
    };
    let own = s.public_addr();
    let mut addrs = vec![own.clone()];
    addrs.extend(
        instances
            .into_iter()
            .map(|i| i.node_addr)
            .filter(|a| !a.is_empty() && *a != own),
    );
    s.anchors.send_if_modified(|current| {
        let changed = *current != addrs;
        if changed {
            *current = addrs;
        }
        changed
    });
}

fn renew_server_cert(s: &Services) {
    let info = s.server_cert.info();
    let now = s.clock.now();
    if info.renewal_due(now, 1.0 / 3.0) {
        match s.trust.ca().issue_server(DEFAULT_SERVER_CERT_VALIDITY, now) {
            Ok(identity) => {
                if let Err(e) = s.server_cert.replace(identity) {
                    warn!(error = %e, "server certificate renewal failed");
                }
            }
            Err(e) => warn!(error = %e, "server certificate renewal failed"),
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    anchorage_mesh::os::create_private_dir(dir).map_err(|source| StartError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    // Prove we can write here before anything else does.
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|source| StartError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Writes a file readable only by its owner, atomically.
pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), StartError> {
    anchorage_mesh::os::write_private(path, contents).map_err(|source| StartError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The shared store and the cluster's CA: the first anchor creates the CA and stores it sealed
/// with the cluster key; the others open it. The certificate (never the key) is also written
/// to this anchor's data directory as `ca.pem`, for operators.
#[cfg(feature = "etcd")]
fn open_cluster(
    settings: &crate::config::EtcdSettings,
    dir: &Path,
    now: SystemTime,
) -> Result<(Stores, CertificateAuthority), StartError> {
    use crate::cluster::ClusterKey;
    use crate::store::{EtcdStore, transact};

    let (key, created) = ClusterKey::load_or_create(&settings.cluster_key_file)?;
    if created {
        info!(path = %settings.cluster_key_file.display(), "created the cluster key; give every anchor of the cluster this file");
    }
    let stores = Stores::from_backend(EtcdStore::connect(&settings.endpoints, &settings.prefix)?);
    let ca_error = |message: String| StartError::Ca {
        path: settings.cluster_key_file.clone(),
        message,
    };
    let stored = transact(&*stores.trust, |txn| txn.cluster_ca())?;
    let sealed = match stored {
        Some(sealed) => sealed,
        None => {
            let fresh =
                CertificateAuthority::generate("Anchorage anchor CA", DEFAULT_CA_VALIDITY, now)
                    .map_err(|e| ca_error(e.to_string()))?;
            let sealed = key.seal(fresh.cert_pem(), &fresh.key_pem())?;
            // Another anchor may have stored one meanwhile: the stored one wins.
            let kept = transact(&*stores.trust, |txn| match txn.cluster_ca()? {
                Some(theirs) => Ok::<_, StoreError>(theirs),
                None => {
                    txn.put_cluster_ca(&sealed)?;
                    Ok(sealed.clone())
                }
            })?;
            if kept == sealed {
                info!(fingerprint = %fresh.fingerprint(), "created the cluster CA in the store");
            }
            kept
        }
    };
    let key_pem = key.open(&sealed)?;
    let ca = CertificateAuthority::from_pem(&sealed.cert_pem, &key_pem)
        .map_err(|e| ca_error(e.to_string()))?;
    write_private_file(&dir.join("ca.pem"), ca.cert_pem().as_bytes())?;
    Ok((stores, ca))
}

#[cfg(not(feature = "etcd"))]
fn open_cluster(
    _settings: &crate::config::EtcdSettings,
    _dir: &Path,
    _now: SystemTime,
) -> Result<(Stores, CertificateAuthority), StartError> {
    Err(StartError::Store(StoreError::Backend(
        "this anchord was built without the etcd store (feature etcd)".into(),
    )))
}

fn load_or_create_ca(dir: &Path, now: SystemTime) -> Result<CertificateAuthority, StartError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| StartError::File {
            path: p.to_path_buf(),
            source,
        })
    };
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let ca = CertificateAuthority::from_pem(&read(&cert_path)?, &read(&key_path)?)
                .map_err(|e| StartError::Ca {
                    path: cert_path.clone(),
                    message: e.to_string(),
                })?;
            Ok(ca)
        }
        (false, false) => {
            let ca =
                CertificateAuthority::generate("Anchorage anchor CA", DEFAULT_CA_VALIDITY, now)
                    .map_err(|e| StartError::Ca {
                        path: cert_path.clone(),
                        message: e.to_string(),
                    })?;
            write_private_file(&key_path, ca.key_pem().as_bytes())?;
            write_private_file(&cert_path, ca.cert_pem().as_bytes())?;
            info!(path = %cert_path.display(), fingerprint = %ca.fingerprint(), "created the anchor CA");
            Ok(ca)
        }
        (true, false) => Err(StartError::Ca {
            path: key_path,
            message: "ca.pem exists but its key ca.key is missing; restore it from backup".into(),
        }),
        (false, true) => Err(StartError::Ca {
            path: cert_path,
            message: "ca.key exists but ca.pem is missing; restore it from backup".into(),
        }),
    }
}
