//! The console's TLS settings (`console_tls`, `console_names`, `console_cert`,
//! `console_key`), validated: the operator's certificate and key are read and checked here.
//! Issuing and serving the certificate is `crate::console_tls`'s.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::ConfigError;

/// The names of an anchor-CA console certificate when none are configured.
pub const DEFAULT_CONSOLE_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Largest certificate or key file read, in bytes.
pub const MAX_PEM_FILE: u64 = 1024 * 1024;
/// Most names one console certificate is issued for.
pub const MAX_CONSOLE_NAMES: usize = 64;

/// How the console is served.
#[derive(Debug, Clone, Default)]
pub enum ConsoleTls {
    /// Plain HTTP.
    #[default]
    Off,
    /// HTTPS with a certificate from the anchor CA for these names, renewed before expiry.
    AnchorCa {
        /// The certificate's subject alternative names (the first is also its common name).
        names: Vec<ConsoleName>,
    },
    /// HTTPS with the operator's certificate and key.
    Own(OwnCert),
}

impl ConsoleTls {
    /// Whether the console speaks HTTPS.
    pub fn is_on(&self) -> bool {
        !matches!(self, ConsoleTls::Off)
    }
}

/// A name of the console's certificate: what clients put in the URL's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleName {
    /// A DNS name, e.g. `anchor.example` or `localhost`.
    Dns(String),
    /// An IP address, e.g. `10.0.0.5` or `::1`.
    Ip(IpAddr),
}

impl FromStr for ConsoleName {
    type Err = String;

    fn from_str(s: &str) -> Result<ConsoleName, String> {
        let s = s.trim();
        // `[::1]` as in a URL.
        let bare = s
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(ConsoleName::Ip(ip));
        }
        match rustls::pki_types::DnsName::try_from(s) {
            Ok(name) if !s.is_empty() => Ok(ConsoleName::Dns(name.as_ref().to_ascii_lowercase())),
            _ => Err(format!(
                "{s:?} is neither a DNS name (like anchor.example) nor an IP address"
            )),
        }
    }
}

impl fmt::Display for ConsoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleName::Dns(name) => f.write_str(name),
            ConsoleName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The operator's certificate chain and key, read and checked.
#[derive(Clone)]
pub struct OwnCert {
    /// The certificate file (PEM: the certificate, then any intermediates).
    pub cert_file: PathBuf,
    /// The key file (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    pub(crate) key: Arc<CertifiedKey>,
}

impl fmt::Debug for OwnCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// The `console_tls`, `console_names`, `console_cert` and `console_key` keys, validated (the
/// certificate and key files are read here, so that a bad one stops the start with exit 64).
pub fn settings(
    tls: Option<bool>,
    names: Option<&[String]>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ConsoleTls, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            if tls == Some(false) {
                return Err(ConfigError::invalid(
                    "console_tls",
                    "console_cert and console_key serve the console over TLS; drop \
                     console_tls = false",
                ));
            }
            if names.is_some() {
                return Err(ConfigError::invalid(
                    "console_names",
                    "the names come from console_cert; console_names is for a certificate \
                     from the anchor CA",
                ));
            }
            let key_data = load_own(cert, key).map_err(|(k, m)| ConfigError::invalid(k, m))?;
            Ok(ConsoleTls::Own(OwnCert {
                cert_file: cert.to_path_buf(),
                key_file: key.to_path_buf(),
                key: key_data,
            }))
        }
        (Some(_), None) => Err(ConfigError::invalid(
            "console_key",
            "console_cert needs console_key, the certificate's private key (PEM)",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "console_cert",
            "console_key needs console_cert, the certificate (PEM)",
        )),
        (None, None) if tls == Some(true) => {
            let given: Vec<String> = match names {
                Some(names) => names.to_vec(),
                None => DEFAULT_CONSOLE_NAMES
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
            };
            if given.is_empty() || given.len() > MAX_CONSOLE_NAMES {
                return Err(ConfigError::invalid(
                    "console_names",
                    format!("give 1 to {MAX_CONSOLE_NAMES} names"),
                ));
            }
            let mut names = Vec::new();
            for n in &given {
                let name = n
                    .parse::<ConsoleName>()
                    .map_err(|m| ConfigError::invalid("console_names", m))?;
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            Ok(ConsoleTls::AnchorCa { names })
        }
        (None, None) => match names {
            Some(_) => Err(ConfigError::invalid(
                "console_names",
                "the names are for the console's TLS certificate: add console_tls = true \
                 (--console-tls)",
            )),
            None => Ok(ConsoleTls::Off),
        },
    }
}

/// Reads and checks an operator's certificate and key; an error names the key and the file.
fn load_own(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    let cert_pem = read_pem_file(cert).map_err(|m| ("console_cert", m))?;
    let key_pem = read_pem_file(key).map_err(|m| ("console_key", m))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ("console_cert", format!("{}: not PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err((
            "console_cert",
            format!(
                "{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
                cert.display()
            ),
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "console_key",
            format!(
                "{}: no private key in it (PEM: PKCS#8, RSA or EC): {e}",
                key.display()
            ),
        )
    })?;
    let provider = anchorage_mesh::tls::crypto_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => (
            "console_key",
            format!(
                "{} is not the key of the certificate in {}",
                key.display(),
                cert.display()
            ),
        ),
        other => (
            "console_key",
            format!("{}: cannot be used: {other}", key.display()),
        ),
    })?;
    Ok(Arc::new(certified))
}

fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if data.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "{} is larger than {MAX_PEM_FILE} bytes; is it a PEM file?",
            path.display()
        ));
    }
    Ok(data)
}
