//! TLS between two nodes, on [`ALPN_PEER`]: both sides present their CA-issued node
//! certificates, and neither needs the anchor to check the other.
//!
//! A node certificate is a client certificate (EKU clientAuth, the device id in a SAN URI).
//! Each side checks the other's the same way the anchor checks a node's: issued by the mesh
//! CA, device id equal to the digest of the key, not expired (no grace: a peer with an
//! expired certificate renews with the anchor first), and not in the revocation set the node
//! holds ([`RevocationCheck`], asked at every handshake, so a revocation the anchor pushed
//! refuses the peer at once, also while the anchor is away). The dialing side also checks
//! that the certificate carries the device id it meant to reach ([`peer_client_config`]);
//! the accepting side learns who called from the certificate ([`peer_device`]) and decides
//! with its policy whether it expected to hear from that device.

use std::sync::Arc;
use std::time::Duration;

use anchorage_wire::ALPN_PEER;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::identity::DeviceId;
use crate::pki::parse_cert;
use crate::tls::{RevocationCheck, TlsError, crypto_provider};
use crate::transport;

/// The certificate and key a node presents to its peers, and what it trusts.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// The mesh CA.
    pub ca: CertificateDer<'static>,
    /// The node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// The revocation set the node holds.
    pub revocation: Arc<dyn RevocationCheck>,
}

/// Checks a peer's node certificate, on either side of the handshake.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocation: Arc<dyn RevocationCheck>,
    provider: Arc<CryptoProvider>,
    /// On the dialing side: the device meant.
    expected: Option<DeviceId>,
}

impl PeerVerifier {
    fn new(tls: &PeerTls, expected: Option<DeviceId>) -> Result<PeerVerifier, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(tls.ca.clone())
            .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
            .build()
            .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
        Ok(PeerVerifier {
            inner,
            revocation: tls.revocation.clone(),
            provider: crypto_provider(),
            expected,
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let info = parse_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        // Chain to the mesh CA, validity and EKU clientAuth: every node certificate is one.
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if info.san_device_id != Some(info.key_id) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        if self.expected.is_some_and(|e| e != info.key_id) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        if self.revocation.is_revoked(&info.key_id, &info.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(())
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn tls13(
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
}

/// QUIC is TLS 1.3 only.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

impl ClientCertVerifier for PeerVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
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
        self.check(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is always PEER_SERVER_NAME; the device id is what identifies the peer.
        self.check(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// The server side of a node's endpoint: accepts peers on [`ALPN_PEER`] only.
pub fn peer_server_config(tls: &PeerTls) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = PeerVerifier::new(tls, None)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PEER.to_vec()];
    // No 0-RTT: invocations must never be replayable.
    config.max_early_data_size = 0;
    crate::tls::no_resumption(&mut config);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport::peer_transport()));
    // The node's socket gives each peer one stable address whatever path carries it, and a
    // real move (a NAT rebinding) is the socket's to absorb. A packet from an address the
    // socket does not map must never move the connection off the peer's stable address.
    config.migration(false);
    Ok(config)
}

/// The dialing side's configuration for reaching `expected` (and only it).
pub fn peer_client_config(
    tls: &PeerTls,
    expected: DeviceId,
) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = PeerVerifier::new(tls, Some(expected))?;
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_PEER.to_vec()];
    config.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport::peer_transport()));
    Ok(config)
}

/// The device on the other end of an established peer connection (from its certificate).
pub fn peer_device(conn: &quinn::Connection) -> Option<DeviceId> {
    crate::tls::peer_cert_info(conn).map(|i| i.key_id)
}

/// How long a peer handshake may take before the dialer gives up.
pub const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
