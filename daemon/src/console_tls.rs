//! The console over HTTPS: its settings, its certificate and its rustls configuration.
//!
//! Two ways, chosen in the configuration ([`ConsoleTls`]):
//!
//! - **From the anchor CA** (`console_tls = true`, `--console-tls`): a certificate for the
//!   names of `console_names` (`--console-name`, DNS names or IP addresses; default
//!   [`DEFAULT_CONSOLE_NAMES`]) signed by the anchor's own CA, so that clients verify it with
//!   the data directory's `ca.pem`. It lives [`CONSOLE_CERT_VALIDITY`] with a fresh key each
//!   time and is reissued when a third of that is left, as the QUIC server certificate is
//!   (checked every [`RENEWAL_CHECK_INTERVAL`] by a task of the anchor's).
//! - **The operator's own** (`console_cert` and `console_key`, PEM): read and checked (they must
//!   belong together) when the configuration is validated, served as they are.
//!
//! Nothing here binds a socket: `start` passes [`server_config`] to the console's server loop.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anchorage_mesh::pki::{CertInfo, CertificateAuthority, DEFAULT_SERVER_CERT_VALIDITY, PkiError};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::anchor::StartError;
use crate::services::Services;

// The settings are configuration; they are named here too.
pub use crate::config::console_tls::{
    ConsoleName, ConsoleTls, DEFAULT_CONSOLE_NAMES, MAX_CONSOLE_NAMES, MAX_PEM_FILE, OwnCert,
    settings,
};

/// Validity of an anchor-CA console certificate (that of the QUIC server certificate).
pub const CONSOLE_CERT_VALIDITY: Duration = DEFAULT_SERVER_CERT_VALIDITY;
/// How often the anchor checks whether its console certificate is due for renewal.
pub const RENEWAL_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Issues a console certificate for `names` from `ca`, with a fresh key, valid from `now` for
/// [`CONSOLE_CERT_VALIDITY`]. The chain is the certificate then the CA.
pub fn issue(
    ca: &CertificateAuthority,
    names: &[ConsoleName],
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, CertInfo), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = names
        .iter()
        .map(|n| match n {
            ConsoleName::Dns(name) => Ok(SanType::DnsName(name.clone().try_into()?)),
            ConsoleName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.distinguished_name = DistinguishedName::new();
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.to_string());
    }
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Anchorage console");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial()?);
    params.not_before = time::OffsetDateTime::from(
        now.checked_sub(anchorage_mesh::pki::BACKDATE)
            .unwrap_or(now),
    );
    params.not_after = time::OffsetDateTime::from(now + CONSOLE_CERT_VALIDITY);
    let ca_key = KeyPair::from_pem(&ca.key_pem())?;
    let issuer = Issuer::from_ca_cert_der(ca.cert_der(), ca_key)?;
    let cert = params.signed_by(&key, &issuer)?;
    let der = cert.der().clone();
    let info = anchorage_mesh::pki::parse_cert(&der)?;
    let signing = anchorage_mesh::tls::crypto_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let chain = vec![der, ca.cert_der().clone()];
    Ok((Arc::new(CertifiedKey::new(chain, signing)), info))
}

fn serial() -> Result<rcgen::SerialNumber, PkiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f; // a positive INTEGER
    bytes[0] |= 0x01;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// The console's certificate, swappable while the server runs.
#[derive(Debug)]
pub struct ConsoleCert {
    current: RwLock<Arc<CertifiedKey>>,
    /// Facts of an anchor-CA certificate (the one renewed); `None` for the operator's own.
    info: RwLock<Option<CertInfo>>,
}

impl ConsoleCert {
    fn new(key: Arc<CertifiedKey>, info: Option<CertInfo>) -> ConsoleCert {
        ConsoleCert {
            current: RwLock::new(key),
            info: RwLock::new(info),
        }
    }

    /// Facts of the certificate being served, when it is the anchor CA's.
    pub fn info(&self) -> Option<CertInfo> {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves `key` to every later handshake.
    fn replace(&self, key: Arc<CertifiedKey>, info: CertInfo) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        *self.info.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }
}

impl ResolvesServerCert for ConsoleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// What [`server_config`] builds.
#[derive(Debug)]
pub struct ConsoleServer {
    /// For the console's server loop.
    pub config: Arc<rustls::ServerConfig>,
    /// The certificate it serves (for a look at it; the anchor renews it).
    pub cert: Arc<ConsoleCert>,
}

/// The console's rustls server configuration, or `None` with TLS off. For an anchor-CA
/// certificate this issues the first one and starts the anchor's renewal task (it ends with
/// the anchor). Blocking: signs.
pub fn server_config(services: &Arc<Services>) -> Result<Option<ConsoleServer>, StartError> {
    let cert = match &services.config.console_tls {
        ConsoleTls::Off => return Ok(None),
        ConsoleTls::Own(own) => Arc::new(ConsoleCert::new(own.key.clone(), None)),
        ConsoleTls::AnchorCa { names } => {
            let (key, info) = issue(services.trust.ca(), names, services.clock.now())
                .map_err(|e| StartError::Tls(format!("the console certificate: {e}")))?;
            let cert = Arc::new(ConsoleCert::new(key, Some(info)));
            services.spawn(renewal(services.clone(), names.clone(), cert.clone()));
            cert
        }
    };
    let config =
        rustls::ServerConfig::builder_with_provider(anchorage_mesh::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| StartError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
    Ok(Some(ConsoleServer {
        config: Arc::new(config),
        cert,
    }))
}

/// Reissues the anchor-CA console certificate when a third of its validity is left.
async fn renewal(s: Arc<Services>, names: Vec<ConsoleName>, cert: Arc<ConsoleCert>) {
    let mut tick = tokio::time::interval(RENEWAL_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = s.cancel.cancelled() => return,
        }
        renew_if_due(&s, &names, &cert);
    }
}

/// One renewal check (see [`renewal`]); whether a new certificate is now served.
pub fn renew_if_due(s: &Services, names: &[ConsoleName], cert: &ConsoleCert) -> bool {
    let now = s.clock.now();
    if !cert
        .info()
        .is_some_and(|info| info.renewal_due(now, 1.0 / 3.0))
    {
        return false;
    }
    match issue(s.trust.ca(), names, now) {
        Ok((key, info)) => {
            info!(serial = %info.serial_hex(), "renewed the console's TLS certificate");
            cert.replace(key, info);
            true
        }
        Err(e) => {
            warn!(error = %e, "console certificate renewal failed; the current one is served");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn names_are_dns_names_or_ip_addresses() {
        assert_eq!(
            "Anchor.Example".parse::<ConsoleName>().unwrap(),
            ConsoleName::Dns("anchor.example".into())
        );
        assert_eq!(
            "::1".parse::<ConsoleName>().unwrap(),
            ConsoleName::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            "[::1]".parse::<ConsoleName>().unwrap(),
            ConsoleName::Ip("::1".parse().unwrap())
        );
        for bad in ["", "a b", "anchor_.example/x", "http://x"] {
            assert!(bad.parse::<ConsoleName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_pair_up_and_default_the_names() {
        assert!(!settings(None, None, None, None).unwrap().is_on());
        let ConsoleTls::AnchorCa { names } = settings(Some(true), None, None, None).unwrap() else {
            panic!("anchor CA expected");
        };
        let shown: Vec<String> = names.iter().map(ToString::to_string).collect();
        assert_eq!(shown, DEFAULT_CONSOLE_NAMES);
        let names = vec!["x.example".to_string()];
        let err = settings(None, Some(&names), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("console_tls = true"), "{err}");
        let err = settings(None, None, Some(Path::new("/c")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("console_key"), "{err}");
        let err = settings(Some(true), Some(&["a b".to_string()]), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("console_names"), "{err}");
    }

    #[test]
    fn the_toml_keys_and_the_flags_pair_up() {
        use crate::config::{AnchorFlags, FileConfig};
        let file: FileConfig =
            toml::from_str("console_tls = true\nconsole_names = [\"a.example\", \"10.0.0.5\"]")
                .unwrap();
        let ConsoleTls::AnchorCa { names } = file.clone().validate().unwrap().console_tls else {
            panic!("anchor CA expected");
        };
        assert_eq!(names.len(), 2);
        // A flag's names replace the file's.
        let flags = AnchorFlags {
            console_name: vec!["b.example".into()],
            ..Default::default()
        };
        let ConsoleTls::AnchorCa { names } = flags.over(file).validate().unwrap().console_tls
        else {
            panic!("anchor CA expected");
        };
        assert_eq!(names, [ConsoleName::Dns("b.example".into())]);
        let flags = AnchorFlags {
            console_tls: true,
            ..Default::default()
        };
        assert!(
            flags
                .over(FileConfig::default())
                .validate()
                .unwrap()
                .console_tls
                .is_on()
        );
        let err = toml::from_str::<FileConfig>("console_cert = \"/c\"\nconsole_tls = false")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("console_key"), "{err}");
    }

    #[test]
    fn an_own_certificate_is_read_and_its_key_checked() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["own.example".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let (c, k) = (
                dir.path().join(format!("{name}.crt")),
                dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let (cert_a, key_a) = make("a");
        let (_, key_b) = make("b");
        let own = settings(None, None, Some(&cert_a), Some(&key_a)).unwrap();
        assert!(matches!(own, ConsoleTls::Own(_)));
        let err = settings(None, None, Some(&cert_a), Some(&key_b))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not the key of the certificate"), "{err}");
        let err = settings(None, None, Some(&dir.path().join("none.crt")), Some(&key_a))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("console_cert") && err.contains("cannot read"),
            "{err}"
        );
        let err = settings(None, None, Some(&key_a), Some(&key_a))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn an_issued_certificate_names_every_name_and_chains_to_the_ca() {
        let now = SystemTime::now();
        let ca =
            CertificateAuthority::generate("t", Duration::from_secs(86400 * 365), now).unwrap();
        let names: Vec<ConsoleName> = ["console.example", "10.1.2.3"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let (key, info) = issue(&ca, &names, now).unwrap();
        assert_eq!(key.cert.len(), 2);
        assert_eq!(&key.cert[1], ca.cert_der());
        assert!(!info.renewal_due(now, 1.0 / 3.0));
        assert!(info.renewal_due(now + CONSOLE_CERT_VALIDITY * 3 / 4, 1.0 / 3.0));
        // A client pinning the CA accepts it for both names and refuses another name.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            anchorage_mesh::tls::crypto_provider(),
        )
        .build()
        .unwrap();
        let when = rustls::pki_types::UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
        );
        use rustls::client::danger::ServerCertVerifier;
        for (name, ok) in [
            ("console.example", true),
            ("10.1.2.3", true),
            ("other.example", false),
        ] {
            let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
            let verified =
                verifier.verify_server_cert(&key.cert[0], &key.cert[1..], &server_name, &[], when);
            assert_eq!(verified.is_ok(), ok, "{name}: {verified:?}");
        }
    }
}
