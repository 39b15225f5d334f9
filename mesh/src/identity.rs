//! Device identity: a key pair generated on the device and the [`DeviceId`] derived from it.
//!
//! The [`DeviceId`] type itself lives in `anchorage-wire` (so the console can name devices
//! without this crate's crypto) and is re-exported here; its derivation from a key is here.
//!
//! A device id is the first 20 bytes of the SHA-256 digest of the device's DER
//! SubjectPublicKeyInfo, written in lowercase RFC 4648 base32 without padding (32 characters)
//! and shown to people in eight groups of four (`abcd-efgh-…`). Parsing accepts either form, in
//! either case. Because the id is a digest of the public key, a certificate proves its id:
//! whoever holds the matching private key *is* that device, whatever the certificate bytes.

use std::fmt;

use ring::digest;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

pub use anchorage_wire::device::{DEVICE_ID_LEN, DEVICE_URI_PREFIX, DeviceId, ParseDeviceIdError};

/// The id of the device whose DER SubjectPublicKeyInfo is `spki_der`: the first
/// [`DEVICE_ID_LEN`] bytes of its SHA-256 digest.
pub fn device_id_from_spki(spki_der: &[u8]) -> DeviceId {
    let d = digest::digest(&digest::SHA256, spki_der);
    let mut id = [0u8; DEVICE_ID_LEN];
    id.copy_from_slice(&d.as_ref()[..DEVICE_ID_LEN]);
    DeviceId::from_bytes(id)
}

/// A device's key pair (ECDSA P-256), generated on the device. Never printed.
pub struct DeviceKey {
    key: rcgen::KeyPair,
}

impl DeviceKey {
    /// Generates a new key pair from the system's secure random source.
    pub fn generate() -> Result<DeviceKey, rcgen::Error> {
        Ok(DeviceKey {
            key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// Loads a key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<DeviceKey, rcgen::Error> {
        Ok(DeviceKey {
            key: rcgen::KeyPair::from_pem(pem)?,
        })
    }

    /// The key as PKCS#8 PEM, for a 0600 file. Handle with care.
    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The id of this device.
    pub fn device_id(&self) -> DeviceId {
        use rcgen::PublicKeyData;
        device_id_from_spki(&self.key.subject_public_key_info())
    }

    /// The rcgen key pair, for signing CSRs and certificates.
    pub fn key_pair(&self) -> &rcgen::KeyPair {
        &self.key
    }

    /// The private key in the form rustls wants.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// A PKCS#10 certificate signing request for this key, naming `device_name`.
    ///
    /// The anchor ignores everything in it but the public key and the signature: names,
    /// usages and validity of the certificate are the anchor's decision.
    pub fn csr_der(&self, device_name: &str) -> Result<Vec<u8>, rcgen::Error> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, sanitize_common_name(device_name));
        let csr = params.serialize_request(&self.key)?;
        Ok(csr.der().to_vec())
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("device_id", &self.device_id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A common name safe for a certificate: printable, at most 64 characters.
pub(crate) fn sanitize_common_name(name: &str) -> String {
    let cleaned: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    if cleaned.trim().is_empty() {
        "anchorage-device".to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_display_parse_round_trip() {
        let key = DeviceKey::generate().unwrap();
        let id = key.device_id();
        let shown = id.to_string();
        assert_eq!(shown.len(), 32 + 7, "eight groups of four: {shown}");
        assert_eq!(shown.matches('-').count(), 7);
        assert_eq!(shown.parse::<DeviceId>().unwrap(), id);
        assert_eq!(id.compact().parse::<DeviceId>().unwrap(), id);
        assert_eq!(shown.to_uppercase().parse::<DeviceId>().unwrap(), id);
        assert_eq!(DeviceId::from_uri(&id.uri()), Some(id));
    }

    #[test]
    fn device_id_rejects_garbage() {
        for bad in [
            "",
            "abc",
            "0000-0000-0000-0000-0000-0000-0000-0000",
            &"a".repeat(33),
        ] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(DeviceId::from_uri("https://example.com/"), None);
    }

    #[test]
    fn device_id_is_stable_for_a_key() {
        let key = DeviceKey::generate().unwrap();
        let again = DeviceKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(key.device_id(), again.device_id());
        let other = DeviceKey::generate().unwrap();
        assert_ne!(key.device_id(), other.device_id());
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let key = DeviceKey::generate().unwrap();
        let pem = key.to_pem();
        let debug = format!("{key:?}");
        assert!(debug.contains("redacted"));
        let body_line = pem.lines().nth(1).unwrap();
        assert!(!debug.contains(body_line));
    }

    #[test]
    fn json_uses_display_form_postcard_uses_bytes() {
        let id = DeviceKey::generate().unwrap().device_id();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<DeviceId>(&json).unwrap(), id);
        let bytes = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bytes.len(), DEVICE_ID_LEN);
        assert_eq!(postcard::from_bytes::<DeviceId>(&bytes).unwrap(), id);
    }
}
