//! The node's state directory: its key, certificate, the pinned anchor CA, the address of the
//! anchor it paired with, the cluster's anchors as last told (`anchors.json`), a pending
//! pairing, and the live status the running agent writes.
//!
//! Every file is written atomically (temporary file, fsync, rename) with mode 0600, so a crash
//! never leaves half a key or a certificate without its key.

use std::path::{Path, PathBuf};

use anchorage_mesh::pairing::AfterKeys;
use anchorage_mesh::pki::{CertInfo, parse_cert, pem_to_der};
use anchorage_mesh::{DeviceKey, Fingerprint};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::anchors::{AnchorAddr, MAX_ADDR_LEN, MAX_KNOWN};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "./anchorage-node";
/// The file of the cluster's anchors, a JSON array of `HOST:PORT` strings.
pub const ANCHORS_FILE: &str = "anchors.json";
/// Largest `anchors.json` read: [`MAX_KNOWN`] addresses of [`MAX_ADDR_LEN`] bytes, quoted,
/// with room for indentation.
const MAX_ANCHORS_FILE: u64 = (MAX_KNOWN * (MAX_ADDR_LEN + 16) + 16) as u64;

/// Errors reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is damaged.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The node is not paired yet.
    #[error("not paired: no certificate in {0}; run `anchor-node pair` first")]
    NotPaired(PathBuf),
}

/// A pairing waiting for approval, kept so it can resume after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingPairing {
    /// Anchor address as given (the first, when several were).
    pub anchor: String,
    /// Every anchor address given, in order (empty in files written before there were several;
    /// then `anchor` alone).
    #[serde(default)]
    pub anchors: Vec<String>,
    /// Request id.
    pub request_id: String,
    /// SAS.
    pub sas: String,
    /// Expiry, Unix ms.
    pub expires_at_ms: u64,
    /// CA fingerprint pinned by a QR code, if any (hex).
    pub pinned_ca: Option<String>,
    /// Keys for the result MAC and the resume proof.
    pub keys: AfterKeys,
}

/// What the running agent reports for `anchor-node status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LiveStatus {
    /// Agent process id.
    pub pid: u32,
    /// Whether connected now.
    pub connected: bool,
    /// Since when (Unix ms).
    pub connected_since_ms: Option<u64>,
    /// Heartbeat interval in use.
    pub heartbeat_interval_ms: u64,
    /// Heartbeats sent on this connection.
    pub heartbeats_sent: u64,
    /// Heartbeat acks received (only anchors before issue 16 send them).
    pub acks_received: u64,
    /// Loss of packets to the anchor, 0..1, as the QUIC connection counts it.
    pub loss_rate: Option<f64>,
    /// Smoothed RTT, the QUIC connection's estimate, ms.
    pub rtt_ms: Option<f64>,
    /// When this was written (Unix ms).
    pub updated_at_ms: u64,
    /// Last connection error, if any.
    pub last_error: Option<String>,
    /// `HOST:PORT` of the anchor the agent is registered with now.
    #[serde(default)]
    pub anchor: Option<String>,
    /// Every anchor the agent knows, in the order it tries them.
    #[serde(default)]
    pub anchors: Vec<String>,
    /// Devices in the revocation set the node holds (peers it refuses).
    #[serde(default)]
    pub revoked_devices: u64,
    /// Certificate serials in it.
    #[serde(default)]
    pub revoked_serials: u64,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// A paired node's identity loaded from disk.
#[derive(Debug)]
pub struct Identity {
    /// The key.
    pub key: DeviceKey,
    /// Certificate, DER.
    pub cert: CertificateDer<'static>,
    /// Facts about it.
    pub cert_info: CertInfo,
    /// The anchor CA, DER.
    pub ca: CertificateDer<'static>,
    /// The anchor address.
    pub anchor: String,
}

impl StateDir {
    /// The directory at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Result<Option<String>, StateError> {
        let path = self.file(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes a file atomically with mode 0600 (the directory is created 0700).
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<(), StateError> {
        anchorage_mesh::os::create_private_dir(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.file(name);
        anchorage_mesh::os::write_private(&path, contents)
            .map_err(|source| StateError::Io { path, source })
    }

    fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.file(name));
    }

    /// The device key, generated and saved on first use. An existing key is never replaced,
    /// so pairing again keeps the device id.
    pub fn key_or_generate(&self) -> Result<DeviceKey, StateError> {
        if let Some(key) = self.key()? {
            return Ok(key);
        }
        let key = DeviceKey::generate().map_err(|e| StateError::Corrupt {
            path: self.file("key.pem"),
            message: format!("cannot generate a key: {e}"),
        })?;
        self.write("key.pem", key.to_pem().as_bytes())?;
        Ok(key)
    }

    /// The device key, if one exists.
    pub fn key(&self) -> Result<Option<DeviceKey>, StateError> {
        match self.read("key.pem")? {
            None => Ok(None),
            Some(pem) => DeviceKey::from_pem(&pem)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path: self.file("key.pem"),
                    message: e.to_string(),
                }),
        }
    }

    /// Saves the result of a pairing or renewal.
    pub fn save_certificate(&self, cert_der: &[u8], ca_der: &[u8]) -> Result<(), StateError> {
        // CA first: a certificate is only ever on disk next to the CA that issued it.
        self.write("ca.pem", anchorage_mesh::pki::der_to_pem(ca_der).as_bytes())?;
        self.write(
            "cert.pem",
            anchorage_mesh::pki::der_to_pem(cert_der).as_bytes(),
        )
    }

    /// Records the anchor address.
    pub fn save_anchor(&self, anchor: &str) -> Result<(), StateError> {
        self.write("anchor", format!("{anchor}\n").as_bytes())
    }

    /// The anchor address, if saved.
    pub fn anchor(&self) -> Result<Option<String>, StateError> {
        Ok(self.read("anchor")?.map(|s| s.trim().to_string()))
    }

    /// Records the cluster's anchors (as told by an anchor, or as given at pairing).
    pub fn save_anchors(&self, anchors: &[AnchorAddr]) -> Result<(), StateError> {
        let list: Vec<&str> = anchors
            .iter()
            .take(MAX_KNOWN)
            .map(AnchorAddr::as_str)
            .collect();
        let json = serde_json::to_vec_pretty(&list).map_err(|e| StateError::Corrupt {
            path: self.file(ANCHORS_FILE),
            message: e.to_string(),
        })?;
        self.write(ANCHORS_FILE, &json)
    }

    /// Saves the revocation set the anchor last sent (`revoked.json`).
    pub fn save_revoked(&self, set: &crate::revoked::RevokedSet) -> Result<(), StateError> {
        let json = serde_json::to_vec(set).map_err(|e| StateError::Corrupt {
            path: self.file(crate::revoked::REVOKED_FILE),
            message: e.to_string(),
        })?;
        self.write(crate::revoked::REVOKED_FILE, &json)
    }

    /// The revocation set as last saved; `None` if there is no file. A file too large for
    /// [`crate::revoked::MAX_HELD`] entries, or not a set, is [`StateError::Corrupt`].
    pub fn revoked(&self) -> Result<Option<crate::revoked::RevokedSet>, StateError> {
        use crate::revoked::{MAX_HELD, REVOKED_FILE, RevokedSet};
        let path = self.file(REVOKED_FILE);
        let corrupt = |message: String| StateError::Corrupt {
            path: path.clone(),
            message,
        };
        // A device id or a hex serial is at most a few hundred bytes, quoted.
        let max = (MAX_HELD * 160) as u64;
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
            Ok(m) if m.len() > max => return Err(corrupt(format!("larger than {max} bytes"))),
            Ok(_) => {}
        }
        let Some(text) = self.read(REVOKED_FILE)? else {
            return Ok(None);
        };
        let set: RevokedSet = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if set.len() > MAX_HELD {
            return Err(corrupt(format!("more than {MAX_HELD} entries")));
        }
        Ok(Some(set))
    }

    /// The cluster's anchors as last saved; `None` if there is no file. A file that is too
    /// large, not a JSON array of strings, holds an address that is not `HOST:PORT`, or more
    /// than [`MAX_KNOWN`] of them, is [`StateError::Corrupt`].
    pub fn anchors(&self) -> Result<Option<Vec<AnchorAddr>>, StateError> {
        let path = self.file(ANCHORS_FILE);
        let corrupt = |message: String| StateError::Corrupt {
            path: path.clone(),
            message,
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
            Ok(m) if m.len() > MAX_ANCHORS_FILE => {
                return Err(corrupt(format!("larger than {MAX_ANCHORS_FILE} bytes")));
            }
            Ok(_) => {}
        }
        let Some(text) = self.read(ANCHORS_FILE)? else {
            return Ok(None);
        };
        let list: Vec<String> = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if list.len() > MAX_KNOWN {
            return Err(corrupt(format!(
                "{} anchors; at most {MAX_KNOWN} are kept",
                list.len()
            )));
        }
        list.iter()
            .map(|a| a.parse::<AnchorAddr>().map_err(|e| corrupt(e.to_string())))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Forgets the cluster's anchors.
    pub fn clear_anchors(&self) {
        self.remove(ANCHORS_FILE);
    }

    /// The certificate's facts, if paired.
    pub fn cert_info(&self) -> Result<Option<CertInfo>, StateError> {
        let Some(pem) = self.read("cert.pem")? else {
            return Ok(None);
        };
        let corrupt = |message: String| StateError::Corrupt {
            path: self.file("cert.pem"),
            message,
        };
        let der = pem_to_der(&pem, "CERTIFICATE").map_err(|e| corrupt(e.to_string()))?;
        parse_cert(&der)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Everything a paired node needs to connect.
    pub fn identity(&self) -> Result<Identity, StateError> {
        let not_paired = || StateError::NotPaired(self.dir.clone());
        let key = self.key()?.ok_or_else(not_paired)?;
        let cert_pem = self.read("cert.pem")?.ok_or_else(not_paired)?;
        let ca_pem = self.read("ca.pem")?.ok_or_else(not_paired)?;
        let anchor = self.anchor()?.ok_or_else(not_paired)?;
        let corrupt = |file: &str, message: String| StateError::Corrupt {
            path: self.file(file),
            message,
        };
        let cert =
            pem_to_der(&cert_pem, "CERTIFICATE").map_err(|e| corrupt("cert.pem", e.to_string()))?;
        let ca =
            pem_to_der(&ca_pem, "CERTIFICATE").map_err(|e| corrupt("ca.pem", e.to_string()))?;
        let cert_info = parse_cert(&cert).map_err(|e| corrupt("cert.pem", e.to_string()))?;
        if cert_info.key_id != key.device_id() {
            return Err(corrupt(
                "cert.pem",
                "the certificate does not match key.pem".into(),
            ));
        }
        Ok(Identity {
            key,
            cert,
            cert_info,
            ca,
            anchor,
        })
    }

    /// Saves a pending pairing.
    pub fn save_pending(&self, p: &PendingPairing) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(p).map_err(|e| StateError::Corrupt {
            path: self.file("pending.json"),
            message: e.to_string(),
        })?;
        self.write("pending.json", &json)
    }

    /// The pending pairing, if any.
    pub fn pending(&self) -> Result<Option<PendingPairing>, StateError> {
        match self.read("pending.json")? {
            None => Ok(None),
            Some(s) => serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path: self.file("pending.json"),
                    message: e.to_string(),
                }),
        }
    }

    /// Forgets the pending pairing.
    pub fn clear_pending(&self) {
        self.remove("pending.json");
    }

    /// Writes the agent's live status.
    pub fn save_status(&self, s: &LiveStatus) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(s).map_err(|e| StateError::Corrupt {
            path: self.file("status.json"),
            message: e.to_string(),
        })?;
        self.write("status.json", &json)
    }

    /// The agent's last written live status.
    pub fn status(&self) -> Result<Option<LiveStatus>, StateError> {
        match self.read("status.json")? {
            None => Ok(None),
            Some(s) => Ok(serde_json::from_str(&s).ok()),
        }
    }

    /// The CA fingerprint pinned in `ca.pem`, if paired.
    pub fn ca_fingerprint(&self) -> Result<Option<Fingerprint>, StateError> {
        let Some(pem) = self.read("ca.pem")? else {
            return Ok(None);
        };
        let der = pem_to_der(&pem, "CERTIFICATE").map_err(|e| StateError::Corrupt {
            path: self.file("ca.pem"),
            message: e.to_string(),
        })?;
        Ok(Some(Fingerprint::of(&der)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<AnchorAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_anchors_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert_eq!(state.anchors().unwrap(), None);
        let list = addrs(&["a.example:7444", "10.0.0.2:7444", "[::1]:7444"]);
        state.save_anchors(&list).unwrap();
        let again = StateDir::new(dir.path().join("state"));
        assert_eq!(again.anchors().unwrap(), Some(list));
        let text = std::fs::read_to_string(dir.path().join("state").join(ANCHORS_FILE)).unwrap();
        let json: Vec<String> = serde_json::from_str(&text).unwrap();
        assert_eq!(json, ["a.example:7444", "10.0.0.2:7444", "[::1]:7444"]);
        again.clear_anchors();
        assert_eq!(again.anchors().unwrap(), None);
    }

    #[test]
    fn a_bad_anchors_file_is_corrupt_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let many: Vec<String> = (1..=65).map(|p| format!("\"a:{p}\"")).collect();
        let huge = format!("[\"{}:1\"]", "a".repeat(100_000));
        for bad in [
            "not json".to_string(),
            "{\"anchors\": []}".to_string(),
            "[7444]".to_string(),
            "[\"no-port\"]".to_string(),
            format!("[{}]", many.join(",")),
            huge,
        ] {
            state.write(ANCHORS_FILE, bad.as_bytes()).unwrap();
            let err = state.anchors().unwrap_err();
            assert!(
                matches!(err, StateError::Corrupt { .. }),
                "{bad:.40}: {err}"
            );
            assert!(err.to_string().contains(ANCHORS_FILE), "{err}");
        }
    }

    #[test]
    fn old_status_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let old = r#"{"pid": 7, "connected": true, "connected_since_ms": 1, "heartbeat_interval_ms": 15000,
            "heartbeats_sent": 3, "acks_received": 3, "loss_rate": null, "rtt_ms": 1.5,
            "updated_at_ms": 9, "last_error": null}"#;
        state.write("status.json", old.as_bytes()).unwrap();
        let status = state.status().unwrap().unwrap();
        assert_eq!(
            (status.pid, status.anchor, status.anchors.len()),
            (7, None, 0)
        );
    }
}
