//! What the anchors of a cluster share besides the store: the cluster key, and the CA sealed
//! with it.
//!
//! The cluster key is 32 random bytes, kept as 64 hex digits in a file (mode 0600) that every
//! anchor of the cluster is given; the first anchor creates it. The CA's private key is stored
//! in the shared store sealed with it (ChaCha20-Poly1305, a fresh random nonce, the CA
//! certificate as associated data), so a dump of etcd alone does not give the CA key, and a
//! sealed key cannot be moved under another certificate.

use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Length of the cluster key.
pub const CLUSTER_KEY_LEN: usize = 32;

/// Errors of the cluster key and the sealed CA.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The key file cannot be read or written.
    #[error("cluster key file {path}: {message}")]
    KeyFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },
    /// The sealed CA key does not open with this cluster key.
    #[error(
        "the CA key in the store does not open with this cluster key: every anchor of a \
         cluster must be given the same cluster key file"
    )]
    WrongKey,
    /// No randomness.
    #[error("no random numbers: {0}")]
    Random(String),
}

/// The cluster key.
pub struct ClusterKey([u8; CLUSTER_KEY_LEN]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Reads the key from `path`, or creates the file (mode 0600) with a new key if it does
    /// not exist. Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(ClusterKey, bool), ClusterError> {
        let err = |message: String| ClusterError::KeyFile {
            path: path.to_path_buf(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(text.trim().as_bytes())
                    .map_err(|_| err("not a cluster key (64 hex digits expected)".into()))?;
                let key = <[u8; CLUSTER_KEY_LEN]>::try_from(bytes.as_slice())
                    .map_err(|_| err("not a cluster key (64 hex digits expected)".into()))?;
                Ok((ClusterKey(key), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; CLUSTER_KEY_LEN];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| ClusterError::Random("cluster key".into()))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let text = format!("{}\n", data_encoding::HEXLOWER.encode(&key));
                anchorage_mesh::os::write_private(path, text.as_bytes())
                    .map_err(|e| err(e.to_string()))?;
                Ok((ClusterKey(key), true))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    fn aead(&self) -> LessSafeKey {
        // The key is exactly CHACHA20_POLY1305's length, so this cannot fail.
        LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &self.0)
                .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key")),
        )
    }

    /// Seals the CA key PEM, bound to the CA certificate PEM.
    pub fn seal(&self, cert_pem: &str, key_pem: &str) -> Result<SealedCa, ClusterError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ClusterError::Random("nonce".into()))?;
        let mut sealed = key_pem.as_bytes().to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(cert_pem.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| ClusterError::WrongKey)?;
        Ok(SealedCa {
            cert_pem: cert_pem.to_string(),
            nonce: nonce.to_vec(),
            sealed_key: sealed,
        })
    }

    /// Opens a sealed CA: the key PEM.
    pub fn open(&self, ca: &SealedCa) -> Result<String, ClusterError> {
        let nonce =
            <[u8; NONCE_LEN]>::try_from(ca.nonce.as_slice()).map_err(|_| ClusterError::WrongKey)?;
        let mut buf = ca.sealed_key.clone();
        let plain = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ca.cert_pem.as_bytes()),
                &mut buf,
            )
            .map_err(|_| ClusterError::WrongKey)?;
        String::from_utf8(plain.to_vec()).map_err(|_| ClusterError::WrongKey)
    }
}

/// The cluster's CA as stored: the certificate, and its key sealed with the cluster key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCa {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The nonce of the seal.
    pub nonce: Vec<u8>,
    /// The key PEM, sealed.
    pub sealed_key: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster.key");
        let (a, created) = ClusterKey::load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = ClusterKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.0, b.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").unwrap();
        let err = ClusterKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }

    #[test]
    fn a_sealed_ca_opens_only_with_its_key_and_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = ClusterKey::load_or_create(&dir.path().join("a")).unwrap();
        let (other, _) = ClusterKey::load_or_create(&dir.path().join("b")).unwrap();
        let sealed = key.seal("CERT", "KEY PEM").unwrap();
        assert!(!sealed.sealed_key.windows(7).any(|w| w == b"KEY PEM"));
        assert_eq!(key.open(&sealed).unwrap(), "KEY PEM");
        assert!(matches!(other.open(&sealed), Err(ClusterError::WrongKey)));
        let moved = SealedCa {
            cert_pem: "OTHER CERT".into(),
            ..sealed
        };
        assert!(matches!(key.open(&moved), Err(ClusterError::WrongKey)));
    }
}
