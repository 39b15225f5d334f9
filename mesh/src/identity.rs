//! Device identity: a key pair generated on the device and the [`DeviceId`] derived from it.
//!
//! A device id is the first 20 bytes of the SHA-256 digest of the device's DER
//! SubjectPublicKeyInfo, written in lowercase RFC 4648 base32 without padding (32 characters)
//! and shown to people in eight groups of four (`abcd-efgh-…`). Parsing accepts either form, in
//! either case. Because the id is a digest of the public key, a certificate proves its id:
//! whoever holds the matching private key *is* that device, whatever the certificate bytes.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ring::digest;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Bytes of digest kept in a [`DeviceId`].
pub const DEVICE_ID_LEN: usize = 20;

/// Identifies a device: a digest of its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId([u8; DEVICE_ID_LEN]);

impl DeviceId {
    /// The id of the device whose DER SubjectPublicKeyInfo is `spki_der`.
    pub fn from_spki(spki_der: &[u8]) -> DeviceId {
        let d = digest::digest(&digest::SHA256, spki_der);
        let mut id = [0u8; DEVICE_ID_LEN];
        id.copy_from_slice(&d.as_ref()[..DEVICE_ID_LEN]);
        DeviceId(id)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.0
    }

    /// Builds an id from raw digest bytes (as stored).
    pub fn from_bytes(bytes: [u8; DEVICE_ID_LEN]) -> DeviceId {
        DeviceId(bytes)
    }

    /// The ungrouped 32-character form, used in certificate URIs and store keys.
    pub fn compact(&self) -> String {
        BASE32_NOPAD.encode(&self.0).to_ascii_lowercase()
    }

    /// The first group, for narrow tables.
    pub fn short(&self) -> String {
        self.compact()[..8].to_string()
    }

    /// The SAN URI carried in this device's client certificates.
    pub fn uri(&self) -> String {
        format!("{DEVICE_URI_PREFIX}{}", self.compact())
    }

    /// The id in a SAN URI, if `uri` is one of ours.
    pub fn from_uri(uri: &str) -> Option<DeviceId> {
        uri.strip_prefix(DEVICE_URI_PREFIX)?.parse().ok()
    }
}

/// Prefix of the SAN URI that names a device in its certificate.
pub const DEVICE_URI_PREFIX: &str = "urn:anchorage:device:";

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let compact = self.compact();
        for (i, group) in compact.as_bytes().chunks(4).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // base32 output is ASCII, so every chunk is valid UTF-8.
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

/// A string that is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device id {input:?}: expected 32 base32 characters, optionally grouped with dashes"
)]
pub struct ParseDeviceIdError {
    input: String,
}

impl FromStr for DeviceId {
    type Err = ParseDeviceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDeviceIdError {
            input: s.chars().take(80).collect(),
        };
        let cleaned: String = s
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != ' ')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if cleaned.len() != 32 {
            return Err(err());
        }
        let bytes = BASE32_NOPAD.decode(cleaned.as_bytes()).map_err(|_| err())?;
        let id: [u8; DEVICE_ID_LEN] = bytes.try_into().map_err(|_| err())?;
        Ok(DeviceId(id))
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; DEVICE_ID_LEN]>::deserialize(d).map(DeviceId)
        }
    }
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
        DeviceId::from_spki(&self.key.subject_public_key_info())
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
