//! [`DeviceId`]: who a device is, as every crate names it.
//!
//! A device id is the first 20 bytes of the SHA-256 digest of the device's DER
//! SubjectPublicKeyInfo (derived from a key in `anchorage-mesh`, which has the crypto), written
//! in lowercase RFC 4648 base32 without padding (32 characters) and shown to people in eight
//! groups of four (`abcd-efgh-…`). Parsing accepts either form, in either case.
//!
//! Serde: human-readable formats (JSON, query strings) carry the grouped text form; binary ones
//! (postcard, in the store and on the wire) carry the 20 bare bytes.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

/// Bytes of digest kept in a [`DeviceId`].
pub const DEVICE_ID_LEN: usize = 20;

/// Prefix of the SAN URI that names a device in its certificate.
pub const DEVICE_URI_PREFIX: &str = "urn:anchorage:device:";

/// Identifies a device: a digest of its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeviceId([u8; DEVICE_ID_LEN]);

impl DeviceId {
    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.0
    }

    /// Builds an id from raw digest bytes (as stored, or as a key's digest).
    pub const fn from_bytes(bytes: [u8; DEVICE_ID_LEN]) -> DeviceId {
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
