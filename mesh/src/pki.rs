//! The anchor's certificate authority and the certificates it issues.
//!
//! - The CA is created once ([`CertificateAuthority::generate`]), saved as PEM and loaded on
//!   every start ([`CertificateAuthority::from_pem`]). Its lifetime is long (default ten years)
//!   and shown, so operators can plan its rotation well ahead.
//! - The anchor's own server certificate ([`CertificateAuthority::issue_server`]) names the fixed
//!   server name [`ANCHOR_SERVER_NAME`](anchorage_wire::ANCHOR_SERVER_NAME), so nodes never
//!   depend on the anchor's IP; it is short-lived and reissued before expiry.
//! - A node sends a CSR made from its own key; [`CertificateAuthority::sign_csr`] keeps only the
//!   public key from it (after checking the CSR's signature) and issues a client certificate
//!   with EKU clientAuth and the device id in a SAN URI. The private key never leaves the node.
//!
//! Time is always passed in (`now`), never read here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::digest;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::identity::{DeviceId, sanitize_common_name};

/// Default validity of the CA.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of a node's client certificate.
pub const DEFAULT_CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default validity of the anchor's server certificate.
pub const DEFAULT_SERVER_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Certificates start this far in the past, to tolerate clocks that run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Warn about the CA's expiry once less than this is left.
pub const CA_EXPIRY_WARNING: Duration = Duration::from_secs(180 * 24 * 3600);

/// Errors of certificate operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The CSR is not well-formed DER or its signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// A PEM file could not be read as the expected object.
    #[error("invalid PEM: {0}")]
    BadPem(String),
    /// The CA certificate and key do not belong together.
    #[error("the CA certificate does not match its key")]
    KeyMismatch,
    /// The system's secure random source failed.
    #[error("system random source failed")]
    Random,
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The anchor's certificate authority.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    info: CertInfo,
}

/// A certificate the CA issued, with what the anchor needs to know about it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// The certificate, PEM.
    pub pem: String,
    /// Parsed facts about it.
    pub info: CertInfo,
}

/// The anchor's server certificate and its key.
pub struct ServerIdentity {
    /// Certificate chain to present: the server certificate, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The server certificate's key.
    pub key: KeyPair,
    /// Facts about the server certificate.
    pub info: CertInfo,
}

/// Facts read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Id derived from the certificate's public key (the only id that counts).
    pub key_id: DeviceId,
    /// Id written in the SAN URI, if any (must equal `key_id` for a valid client certificate).
    pub san_device_id: Option<DeviceId>,
    /// Serial number bytes.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Subject common name, if any.
    pub common_name: Option<String>,
}

impl CertInfo {
    /// Serial as lowercase hex, for display and store keys.
    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }

    /// Whether less than `fraction` of the validity period is left at `now`.
    pub fn renewal_due(&self, now: SystemTime, fraction: f64) -> bool {
        let total = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let left = self.not_after.duration_since(now).unwrap_or_default();
        left.as_secs_f64() < total.as_secs_f64() * fraction
    }
}

impl CertificateAuthority {
    /// Creates a new CA valid from `now` for `validity`.
    pub fn generate(
        name: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<CertificateAuthority, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, sanitize_common_name(name));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Anchorage");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, now, validity);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let info = parse_cert(&cert_der)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der,
            key,
            info,
        })
    }

    /// Loads a CA from its certificate and key PEM, checking that they belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, PkiError> {
        let cert_der = pem_to_der(cert_pem, "CERTIFICATE")?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadPem(e.to_string()))?;
        let info = parse_cert(&cert_der)?;
        use rcgen::PublicKeyData;
        if crate::identity::device_id_from_spki(&key.subject_public_key_info()) != info.key_id {
            return Err(PkiError::KeyMismatch);
        }
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
            info,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM (public; also written to `<data-dir>/ca.pem`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Handle with care.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Facts about the CA certificate (expiry, serial).
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// SHA-256 fingerprint of the CA certificate, as pinned by QR pairing codes.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    /// Whether the CA expires within [`CA_EXPIRY_WARNING`] of `now`.
    pub fn expiry_warning(&self, now: SystemTime) -> Option<Duration> {
        let left = self.info.not_after.duration_since(now).unwrap_or_default();
        (left < CA_EXPIRY_WARNING).then_some(left)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issues the anchor's server certificate for the fixed server name, with a fresh key.
    pub fn issue_server(
        &self,
        validity: Duration,
        now: SystemTime,
    ) -> Result<ServerIdentity, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(vec![anchorage_wire::ANCHOR_SERVER_NAME.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, anchorage_wire::ANCHOR_SERVER_NAME);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, now, validity);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let der = cert.der().clone();
        let info = parse_cert(&der)?;
        Ok(ServerIdentity {
            chain: vec![der, self.cert_der.clone()],
            key,
            info,
        })
    }

    /// Signs a node's CSR into a client certificate valid from `now` for `validity`.
    ///
    /// Only the CSR's public key is used (after its signature is verified); the subject
    /// alternative names, usages and validity are set here. `device_name` becomes the common
    /// name.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        device_name: &str,
        validity: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let device_id = csr_device_id(&csr);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, sanitize_common_name(device_name));
        let uri = device_id
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| PkiError::Generate(e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, now, validity);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer()?)?;
        let der = signed.der().clone();
        let info = parse_cert(&der)?;
        Ok(IssuedCert {
            pem: signed.pem(),
            der,
            info,
        })
    }
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .field("not_after", &self.info.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The device id a CSR's public key gives, without checking the signature (the caller has).
fn csr_device_id(csr: &CertificateSigningRequestParams) -> DeviceId {
    use rcgen::PublicKeyData;
    crate::identity::device_id_from_spki(&csr.public_key.subject_public_key_info())
}

/// Checks a CSR's signature and returns the device id of its key.
pub fn csr_device_id_checked(csr_der: &[u8]) -> Result<DeviceId, PkiError> {
    let csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    Ok(csr_device_id(&csr))
}

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = digest::digest(&digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .map_err(|_| PkiError::BadCertificate("fingerprint is not hex".into()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PkiError::BadCertificate("fingerprint is not 32 bytes".into()))?;
        Ok(Fingerprint(arr))
    }
}

/// Reads the facts of a DER certificate.
pub fn parse_cert(der: &[u8]) -> Result<CertInfo, PkiError> {
    use x509_parser::prelude::*;
    let (rest, cert) =
        parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate("trailing bytes".into()));
    }
    let key_id = crate::identity::device_id_from_spki(cert.public_key().raw);
    let mut san_device_id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(id) = DeviceId::from_uri(uri)
            {
                san_device_id = Some(id);
            }
        }
    }
    let validity = cert.validity();
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Ok(CertInfo {
        key_id,
        san_device_id,
        serial: cert.tbs_certificate.raw_serial().to_vec(),
        not_before: asn1_to_system(validity.not_before.timestamp()),
        not_after: asn1_to_system(validity.not_after.timestamp()),
        common_name,
    })
}

fn asn1_to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Decodes the first PEM block with `label` into DER.
pub fn pem_to_der(pem: &str, label: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    if label != "CERTIFICATE" {
        return Err(PkiError::BadPem(format!("unsupported PEM label {label}")));
    }
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem(e.to_string()))
}

/// Encodes a DER certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn set_validity(params: &mut CertificateParams, now: SystemTime, validity: Duration) {
    let start = now.checked_sub(BACKDATE).unwrap_or(now);
    params.not_before = time::OffsetDateTime::from(start);
    params.not_after = time::OffsetDateTime::from(now + validity);
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f; // a positive INTEGER
    bytes[0] |= 0x01; // with no leading zero byte, so every serial is 16 bytes
    Ok(SerialNumber::from_slice(&bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}
