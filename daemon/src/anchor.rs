//! The anchor: state shared by the QUIC side and the console, start-up, and the accept loop.
//!
//! [`Anchor::open`] prepares everything from the data directory (store, CA, owner token,
//! revocations) without binding sockets. [`Anchor::serve`] runs the accept loop on any quinn
//! endpoint (a real UDP socket, or a netsim host in tests). [`crate::run`] binds the real
//! sockets and the console and runs until shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anchorage_console::api::{Event, Permission};
use anchorage_mesh::pki::{
    CertificateAuthority, DEFAULT_CA_VALIDITY, DEFAULT_SERVER_CERT_VALIDITY,
};
use anchorage_mesh::tls::{self, AnchorTls, PeerKind, RevocationSet, ServerCertResolver};
use anchorage_mesh::{DeviceId, framed};
use anchorage_wire::ErrorCode;
use tokio::sync::{Notify, broadcast, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::clock::Clock;
use crate::config::AnchorConfig;
use crate::metrics::Metrics;
use crate::records::{DeviceRecord, RevocationRecord};
use crate::store::{Space, Store, StoreError};
use crate::{runtime, session};

/// How long a handshake may take before the anchor gives up on it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Events buffered per subscriber before it lags.
pub const EVENT_BUFFER: usize = 1024;
/// Connections handled at once; beyond this, new ones are refused (`Overloaded`).
pub const MAX_CONNECTIONS: usize = 20_000;

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
        addr: SocketAddr,
        /// Why (e.g. address in use).
        source: std::io::Error,
    },
    /// TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The anchor. Cheap to clone.
#[derive(Clone)]
pub struct Anchor {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anchor")
            .field("data_dir", &self.shared.config.data_dir)
            .finish_non_exhaustive()
    }
}

/// State shared by every task of the anchor.
pub(crate) struct Shared {
    pub config: AnchorConfig,
    pub clock: Clock,
    pub store: Store,
    pub ca: CertificateAuthority,
    pub revocation: Arc<RevocationSet>,
    pub server_cert: Arc<ServerCertResolver>,
    pub events: broadcast::Sender<Event>,
    event_seq: AtomicU64,
    /// Live node sessions by device.
    pub sessions: Mutex<HashMap<DeviceId, session::SessionHandle>>,
    pub next_session: AtomicU64,
    /// Tie-breaker of audit keys written in the same millisecond.
    pub audit_seq: AtomicU64,
    /// Serializes read-modify-write of codes, requests, devices and tokens.
    pub trust_lock: Mutex<()>,
    /// Bootstrap streams waiting for a decision on their request.
    pub request_waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// Token records by id, mirrored from the store for fast authentication.
    pub tokens: Mutex<HashMap<String, crate::records::TokenRecord>>,
    pub started_at_ms: u64,
    pub owner_token_path: PathBuf,
    pub metrics: Metrics,
    pub runtime: runtime::Runtime,
    /// Addresses actually bound (filled by `run`).
    pub bound: Mutex<(Option<SocketAddr>, Option<SocketAddr>)>,
    pub shutdown: watch::Sender<bool>,
}

impl Anchor {
    /// Opens the data directory: store, CA (created on first start), owner token, revocations.
    pub fn open(config: AnchorConfig, clock: Clock) -> Result<Anchor, StartError> {
        let dir = config.data_dir.clone();
        create_private_dir(&dir)?;
        let store = Store::open(&dir.join("store"))?;
        let now = clock.now();
        let ca = load_or_create_ca(&dir, now)?;
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

        let revocation = Arc::new(RevocationSet::new());
        for (key, _) in store.scan::<RevocationRecord>(Space::Revocations)? {
            match key.split_first() {
                Some((b'd', rest)) => {
                    if let Ok(id) = <[u8; anchorage_mesh::identity::DEVICE_ID_LEN]>::try_from(rest)
                    {
                        revocation.revoke_device(DeviceId::from_bytes(id));
                    }
                }
                Some((b's', rest)) => revocation.revoke_serial(rest.to_vec()),
                _ => {}
            }
        }
        let tokens = store
            .scan::<crate::records::TokenRecord>(Space::Tokens)?
            .into_iter()
            .map(|(_, t)| (t.id.clone(), t))
            .collect();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (shutdown, _) = watch::channel(false);
        let runtime = runtime::Runtime::new(&store, &config)?;
        let shared = Arc::new(Shared {
            owner_token_path: dir.join("owner.token"),
            started_at_ms: clock.now_ms(),
            config,
            clock,
            store,
            ca,
            revocation,
            server_cert,
            events,
            event_seq: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            audit_seq: AtomicU64::new(0),
            trust_lock: Mutex::new(()),
            request_waiters: Mutex::new(HashMap::new()),
            tokens: Mutex::new(tokens),
            metrics: Metrics::default(),
            runtime,
            bound: Mutex::new((None, None)),
            shutdown,
        });
        let anchor = Anchor { shared };
        anchor.ensure_owner_token()?;
        Ok(anchor)
    }

    /// The quinn server configuration (both ALPNs, live revocation).
    pub fn server_config(&self) -> Result<quinn::ServerConfig, StartError> {
        let tls = AnchorTls {
            ca: self.shared.ca.cert_der().clone(),
            server_cert: self.shared.server_cert.clone(),
            revocation: self.shared.revocation.clone(),
            renewal_grace: self.shared.config.renewal_grace,
        };
        tls::anchor_server_config(&tls).map_err(|e| StartError::Tls(e.to_string()))
    }

    /// The CA certificate PEM.
    pub fn ca_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    /// The CA certificate DER.
    pub fn ca_der(&self) -> &rustls::pki_types::CertificateDer<'static> {
        self.shared.ca.cert_der()
    }

    /// SHA-256 fingerprint of the CA (pinned by QR codes).
    pub fn ca_fingerprint(&self) -> anchorage_mesh::Fingerprint {
        self.shared.ca.fingerprint()
    }

    /// Heartbeats received and estimated lost so far.
    pub fn shared_metrics(&self) -> (u64, u64) {
        let rt = &self.shared.runtime;
        (
            rt.heartbeats_received.load(Ordering::Relaxed),
            rt.heartbeats_lost.load(Ordering::Relaxed),
        )
    }

    /// Path of the owner token file.
    pub fn owner_token_path(&self) -> &Path {
        &self.shared.owner_token_path
    }

    /// The owner token's secret (read from its file).
    pub fn owner_token(&self) -> Result<String, StartError> {
        std::fs::read_to_string(&self.shared.owner_token_path)
            .map(|s| s.trim().to_string())
            .map_err(|source| StartError::File {
                path: self.shared.owner_token_path.clone(),
                source,
            })
    }

    /// The console backend over this anchor.
    pub fn backend(&self) -> Arc<crate::backend::AnchorBackend> {
        Arc::new(crate::backend::AnchorBackend::new(self.clone()))
    }

    /// Records the addresses the anchor is reachable at (for QR codes and the inventory).
    pub fn set_bound(&self, quic: Option<SocketAddr>, console: Option<SocketAddr>) {
        let mut b = self.shared.bound.lock().unwrap_or_else(|e| e.into_inner());
        if quic.is_some() {
            b.0 = quic;
        }
        if console.is_some() {
            b.1 = console;
        }
    }

    /// Runs the accept loop on `endpoint` until shutdown, then closes every connection with
    /// `ShuttingDown` and waits for the closes to be sent.
    pub async fn serve(&self, endpoint: quinn::Endpoint) {
        if let Ok(addr) = endpoint.local_addr() {
            self.set_bound(Some(addr), None);
        }
        let background = tokio::spawn(runtime::background(self.clone()));
        let mut shutdown = self.shared.shutdown.subscribe();
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let Some(incoming) = incoming else { break };
            if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                self.shared.metrics.handshake_failure("overloaded");
                incoming.refuse();
                continue;
            }
            let anchor = self.clone();
            let active = active.clone();
            active.fetch_add(1, Ordering::Relaxed);
            let remote = incoming.remote_address();
            tokio::spawn(
                async move {
                    anchor.handle_incoming(incoming).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                }
                .instrument(info_span!("conn", %remote)),
            );
        }
        background.abort();
        endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::ShuttingDown.as_u32()),
            b"anchor shutting down",
        );
        self.shared.runtime.flush(&self.shared.store).await;
        // Give the close frames a moment to leave; bounded so shutdown never hangs.
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        if let Err(e) = self.shared.store.persist() {
            warn!(error = %e, "store persist at shutdown failed");
        }
    }

    /// Asks every task to stop.
    pub fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
    }

    async fn handle_incoming(&self, incoming: quinn::Incoming) {
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "incoming refused");
                return;
            }
        };
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                let reason = handshake_failure_reason(&e);
                self.shared.metrics.handshake_failure(reason);
                debug!(error = %e, reason, "handshake failed");
                return;
            }
            Err(_) => {
                self.shared.metrics.handshake_failure("timeout");
                return;
            }
        };
        match tls::classify_connection(&conn, self.shared.clock.now()) {
            Ok(PeerKind::Bootstrap) => crate::pairing::serve_bootstrap(self.clone(), conn).await,
            Ok(PeerKind::Node(info)) => session::serve_node(self.clone(), conn, info, false).await,
            Ok(PeerKind::NodeRenewalOnly(info)) => {
                session::serve_node(self.clone(), conn, info, true).await
            }
            Err(code) => {
                self.shared.metrics.handshake_failure(code.name());
                framed::close(&conn, code, "client certificate required on this ALPN");
            }
        }
    }

    /// Publishes an event to every subscriber.
    pub(crate) fn publish(&self, kind: &str, device: Option<&DeviceId>, data: serde_json::Value) {
        let seq = self.shared.event_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let event = Event {
            seq,
            at: crate::clock::to_odt(self.shared.clock.now_ms()),
            kind: kind.to_string(),
            device_id: device.copied(),
            data,
        };
        // No subscribers is fine.
        let _ = self.shared.events.send(event);
    }

    /// Takes the trust lock (see [`TrustGuard`]).
    pub(crate) fn trust(&self) -> TrustGuard<'_> {
        TrustGuard {
            guard: Some(
                self.shared
                    .trust_lock
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            ),
            store: &self.shared.store,
            dirty: false,
        }
    }

    /// Current time.
    pub(crate) fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// Now as SystemTime.
    pub(crate) fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    /// The trust record of a device.
    pub(crate) fn device_record(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.shared.store.get(Space::Devices, id.as_bytes())
    }

    fn ensure_owner_token(&self) -> Result<(), StartError> {
        let path = self.shared.owner_token_path.clone();
        if let Ok(existing) = std::fs::read_to_string(&path)
            && crate::trust::authenticate(self, existing.trim()).is_some()
        {
            return Ok(());
        }
        let created = crate::trust::create_token_internal(
            self,
            "anchor",
            "owner".to_string(),
            Permission::ALL.to_vec(),
        )
        .map_err(|e| StartError::Tls(format!("creating the owner token: {e:?}")))?;
        write_private_file(&path, format!("{}\n", created.token).as_bytes())?;
        info!(path = %path.display(), "created owner token");
        Ok(())
    }
}

/// Holds the trust lock for a read-modify-write of trust records.
///
/// Writes commit under the lock with a flush to the OS; the `fdatasync` that makes them
/// survive a power loss happens after the lock is released ([`TrustGuard::release`]), so
/// concurrent operations share disk syncs instead of queueing behind each other's (a group
/// commit). Callers acknowledge only after `release` returns.
pub(crate) struct TrustGuard<'a> {
    guard: Option<std::sync::MutexGuard<'a, ()>>,
    store: &'a Store,
    dirty: bool,
}

impl TrustGuard<'_> {
    /// Commits `batch` (flushed; synced at release).
    pub fn commit(&mut self, batch: crate::store::Batch<'_>) -> Result<(), StoreError> {
        batch.commit(crate::store::Durability::Flush)?;
        self.dirty = true;
        Ok(())
    }

    /// Releases the lock, then syncs what was committed under it.
    pub fn release(mut self) -> Result<(), StoreError> {
        self.guard.take();
        if std::mem::take(&mut self.dirty) {
            self.store.sync()?;
        }
        Ok(())
    }
}

impl Drop for TrustGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        if self.dirty
            && let Err(e) = self.store.sync()
        {
            warn!(error = %e, "syncing trust records failed");
        }
    }
}

fn handshake_failure_reason(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            match code {
                // TLS alerts travel as 0x100 + alert.
                0x12a => "bad_certificate",
                0x12c => "certificate_revoked",
                0x12d => "certificate_expired",
                0x130 => "unknown_ca",
                0x178 => "no_application_protocol",
                0x100..=0x1ff => "tls_alert",
                _ => "transport_error",
            }
        }
        quinn::ConnectionError::ConnectionClosed(c) => match u64::from(c.error_code) {
            0x12a => "bad_certificate",
            0x12c => "certificate_revoked",
            0x12d => "certificate_expired",
            0x130 => "unknown_ca",
            0x178 => "no_application_protocol",
            _ => "closed_by_peer",
        },
        quinn::ConnectionError::TimedOut => "timeout",
        _ => "other",
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
