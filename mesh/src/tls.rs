//! rustls and quinn configurations for the anchor and for nodes.
//!
//! One UDP port serves two ALPNs ([`ALPN_NODE`] and [`ALPN_BOOTSTRAP`]). rustls picks its
//! client-certificate verifier before it knows the ALPN, so the anchor *offers* client
//! authentication to everyone and [`NodeClientVerifier`] checks any certificate presented:
//! issued by our CA, EKU clientAuth, device id in the SAN equal to the key's digest, not
//! revoked (asked of a live [`RevocationCheck`] at every handshake) and not expired, except
//! inside the renewal grace period. A connection on the node ALPN *without* a certificate is
//! closed right after the handshake with [`ErrorCode::Unauthenticated`] by
//! [`classify_connection`], before any stream is served.
//!
//! Nodes pin the anchor CA ([`node_client_config`]). During pairing with a PIN the node has no
//! CA yet: [`bootstrap_client_config`] then accepts the anchor's certificate unverified and the
//! SPAKE2 exchange, bound to this TLS session by the exporter, authenticates the channel; with a
//! QR code it also pins the CA fingerprint.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anchorage_wire::{ALPN_BOOTSTRAP, ALPN_NODE, ANCHOR_SERVER_NAME, ErrorCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::identity::DeviceId;
use crate::pki::{CertInfo, Fingerprint, ServerIdentity, parse_cert};
use crate::transport;

/// Default time an expired client certificate may still be used to renew.
pub const DEFAULT_RENEWAL_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate could not be used as a trust anchor.
    #[error("CA certificate is not a usable trust anchor: {0}")]
    TrustAnchor(String),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
}

/// The one crypto provider of Anchorage: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Answers, at every handshake, whether a client certificate has been revoked.
///
/// Implementations must be cheap and must reflect changes immediately: revocation is live.
pub trait RevocationCheck: Send + Sync + fmt::Debug + 'static {
    /// Whether the device, or this particular certificate serial, is revoked.
    fn is_revoked(&self, device: &DeviceId, serial: &[u8]) -> bool;
}

/// An in-memory revocation set: revoked devices and revoked certificate serials.
///
/// Every change bumps a generation that [`RevocationSet::subscribe`]rs hear of (the anchor
/// pushes the set to its nodes on each change).
#[derive(Debug)]
pub struct RevocationSet {
    inner: RwLock<RevocationInner>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Default for RevocationSet {
    fn default() -> RevocationSet {
        RevocationSet {
            inner: RwLock::default(),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct RevocationInner {
    devices: HashSet<DeviceId>,
    serials: HashSet<Vec<u8>>,
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> RevocationSet {
        RevocationSet::default()
    }

    /// Revokes every certificate of a device.
    pub fn revoke_device(&self, device: DeviceId) {
        let changed = self.write().devices.insert(device);
        self.bump(changed);
    }

    /// Forgets a device's revocation (after an operator removed it).
    pub fn forget_device(&self, device: &DeviceId) {
        let changed = self.write().devices.remove(device);
        self.bump(changed);
    }

    /// Revokes one certificate by serial (a superseded certificate).
    pub fn revoke_serial(&self, serial: Vec<u8>) {
        let changed = self.write().serials.insert(serial);
        self.bump(changed);
    }

    /// Every revoked device and serial, sorted.
    pub fn snapshot(&self) -> (Vec<DeviceId>, Vec<Vec<u8>>) {
        let inner = self.read();
        let mut devices: Vec<DeviceId> = inner.devices.iter().copied().collect();
        let mut serials: Vec<Vec<u8>> = inner.serials.iter().cloned().collect();
        devices.sort_unstable();
        serials.sort_unstable();
        (devices, serials)
    }

    /// Told of every change (the value is a generation count).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self, changed: bool) {
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Whether every certificate of the device is revoked.
    pub fn is_device_revoked(&self, device: &DeviceId) -> bool {
        self.read().devices.contains(device)
    }

    /// Number of revoked devices and serials.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.devices.len(), inner.serials.len())
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RevocationInner> {
        // A poisoned lock only means a panic elsewhere mid-insert; the sets stay usable.
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RevocationInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl RevocationCheck for RevocationSet {
    fn is_revoked(&self, device: &DeviceId, serial: &[u8]) -> bool {
        let inner = self.read();
        inner.devices.contains(device) || inner.serials.contains(serial)
    }
}

/// Verifies node client certificates: CA, EKU, device id, live revocation, expiry with grace.
#[derive(Debug)]
pub struct NodeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocation: Arc<dyn RevocationCheck>,
    grace: Duration,
}

impl NodeClientVerifier {
    /// A verifier trusting `ca` and asking `revocation` at every handshake.
    pub fn new(
        ca: &CertificateDer<'static>,
        revocation: Arc<dyn RevocationCheck>,
        grace: Duration,
    ) -> Result<NodeClientVerifier, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
        Ok(NodeClientVerifier {
            inner,
            revocation,
            grace,
        })
    }
}

fn app_failure() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // The bootstrap ALPN takes no certificate; the node ALPN's requirement is enforced
        // right after the handshake by `classify_connection`.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let info = parse_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                // Inside the grace period an expired certificate may still renew; check the
                // chain as of its last valid second, then the grace window itself.
                let not_after = unix_secs(info.not_after);
                let grace_end = not_after.saturating_add(self.grace.as_secs());
                if now.as_secs() > grace_end {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
                }
                let last_valid =
                    UnixTime::since_unix_epoch(Duration::from_secs(not_after.saturating_sub(1)));
                self.inner
                    .verify_client_cert(end_entity, intermediates, last_valid)?;
            }
            Err(e) => return Err(e),
        }
        if info.san_device_id != Some(info.key_id) {
            return Err(app_failure());
        }
        if self.revocation.is_revoked(&info.key_id, &info.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The anchor's server certificate, swappable while running (for renewal).
#[derive(Debug)]
pub struct ServerCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
    info: RwLock<CertInfo>,
}

impl ServerCertResolver {
    /// A resolver serving `identity`.
    pub fn new(identity: ServerIdentity) -> Result<ServerCertResolver, TlsError> {
        let (key, info) = certified_key(identity)?;
        Ok(ServerCertResolver {
            current: RwLock::new(key),
            info: RwLock::new(info),
        })
    }

    /// Serves `identity` to every later handshake.
    pub fn replace(&self, identity: ServerIdentity) -> Result<(), TlsError> {
        let (key, info) = certified_key(identity)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        *self.info.write().unwrap_or_else(|e| e.into_inner()) = info;
        Ok(())
    }

    /// Facts about the certificate being served.
    pub fn info(&self) -> CertInfo {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn certified_key(identity: ServerIdentity) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let key_der = PrivateKeyDer::Pkcs8(identity.key.serialize_der().into());
    let signing = crypto_provider().key_provider.load_private_key(key_der)?;
    Ok((
        Arc::new(CertifiedKey::new(identity.chain, signing)),
        identity.info,
    ))
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// What the anchor needs to build its QUIC server configuration.
#[derive(Debug, Clone)]
pub struct AnchorTls {
    /// The CA that issues node certificates.
    pub ca: CertificateDer<'static>,
    /// The server certificate, swappable.
    pub server_cert: Arc<ServerCertResolver>,
    /// The live revocation check.
    pub revocation: Arc<dyn RevocationCheck>,
    /// How long an expired client certificate may still renew.
    pub renewal_grace: Duration,
}

/// The anchor's rustls server configuration (both ALPNs, TLS 1.3 only, no 0-RTT).
pub fn anchor_rustls_config(tls: &AnchorTls) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = NodeClientVerifier::new(&tls.ca, tls.revocation.clone(), tls.renewal_grace)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(tls.server_cert.clone());
    config.alpn_protocols = vec![ALPN_NODE.to_vec(), ALPN_BOOTSTRAP.to_vec()];
    // No 0-RTT: invocations must never be replayable.
    config.max_early_data_size = 0;
    no_resumption(&mut config);
    Ok(config)
}

/// Turns TLS session resumption off on a server configuration. A resumed session skips the
/// client verifier, so a device revoked (or a certificate expired past its grace) since its
/// ticket was issued would get through the handshake: every connection takes the full check
/// instead. At fleet size rustls's default cache (256 sessions, two tickets sent per
/// handshake) held about 1 % of an anchor's nodes anyway, and every handshake paid for the two
/// tickets on both sides.
pub(crate) fn no_resumption(config: &mut rustls::ServerConfig) {
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// The anchor's quinn server configuration.
pub fn anchor_server_config(tls: &AnchorTls) -> Result<quinn::ServerConfig, TlsError> {
    let rustls = anchor_rustls_config(tls)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport::anchor_transport()));
    config.migration(true);
    Ok(config)
}

/// A node's quinn client configuration: pins the anchor CA, presents the node certificate.
pub fn node_client_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_NODE.to_vec()];
    config.enable_early_data = false;
    quic_client(config)
}

/// A client configuration for the bootstrap (pairing) ALPN.
///
/// With `pinned_ca = None` (PIN pairing) the anchor's certificate is not checked against any
/// authority: the SPAKE2 exchange, bound to this TLS session, is what authenticates the
/// anchor, and the CA arrives MACed with the PAKE key. With a fingerprint (QR pairing) the
/// chain must contain a CA with that fingerprint that signed a valid `anchorage-anchor`
/// certificate.
pub fn bootstrap_client_config(
    pinned_ca: Option<Fingerprint>,
) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = PairingServerVerifier {
        pinned_ca,
        provider: crypto_provider(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_BOOTSTRAP.to_vec()];
    config.enable_early_data = false;
    quic_client(config)
}

/// A raw rustls client configuration for tests that need to misbehave (a different ALPN,
/// no certificate on the node ALPN). Pins `ca`.
pub fn rustls_client_config(
    ca: &CertificateDer<'static>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    quic_client(config)
}

fn quic_client(config: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport::node_transport()));
    Ok(config)
}

#[derive(Debug)]
struct PairingServerVerifier {
    pinned_ca: Option<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PairingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = self.pinned_ca else {
            // PIN pairing: authenticated by the channel-bound PAKE, not by a CA.
            return Ok(ServerCertVerified::assertion());
        };
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of(c) == pin)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What an accepted connection is, decided right after the handshake.
#[derive(Debug, Clone)]
pub enum PeerKind {
    /// A pairing connection (bootstrap ALPN, no certificate needed).
    Bootstrap,
    /// An enrolled node with a valid certificate.
    Node(CertInfo),
    /// An enrolled node whose certificate expired but is inside the grace period: only
    /// renewal may be served.
    NodeRenewalOnly(CertInfo),
}

/// Decides what an established anchor-side connection is, or why it must be closed.
///
/// A node-ALPN connection without a client certificate yields
/// [`ErrorCode::Unauthenticated`]; the caller closes the connection with it before accepting
/// any stream.
pub fn classify_connection(
    conn: &quinn::Connection,
    now: SystemTime,
) -> Result<PeerKind, ErrorCode> {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref() {
        Some(a) if a == ALPN_BOOTSTRAP => Ok(PeerKind::Bootstrap),
        Some(a) if a == ALPN_NODE => {
            let info = peer_cert_info(conn).ok_or(ErrorCode::Unauthenticated)?;
            if info.not_after < now {
                Ok(PeerKind::NodeRenewalOnly(info))
            } else {
                Ok(PeerKind::Node(info))
            }
        }
        _ => Err(ErrorCode::ProtocolViolation),
    }
}

/// Facts about the certificate the peer presented, if any.
pub fn peer_cert_info(conn: &quinn::Connection) -> Option<CertInfo> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    parse_cert(certs.first()?).ok()
}

/// The server name nodes use to reach any anchor.
pub fn anchor_server_name() -> &'static str {
    ANCHOR_SERVER_NAME
}
