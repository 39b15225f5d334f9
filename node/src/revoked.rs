//! The mesh's revocation set as this node holds it (pure; kept in `revoked.json`).
//!
//! The anchor sends the whole set on the control stream after registration and again on
//! every change ([`RevokedList`]: one list that replaces what the node held, then lists that
//! add). The node keeps the last set it was told in its state directory, so it can refuse a
//! revoked peer while the anchor is away and after a restart (the peer connections of
//! issue 14 check it).

use std::collections::BTreeSet;

use anchorage_wire::control::RevokedList;
use serde::{Deserialize, Serialize};

/// Most devices plus serials a node holds; what an anchor sends beyond it is dropped with a
/// warning (a mesh with more revocations than this needs a new CA).
pub const MAX_HELD: usize = 256 * 1024;

/// The file in the state directory.
pub const REVOKED_FILE: &str = "revoked.json";

/// Revoked devices (display ids) and certificate serials (hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSet {
    /// Devices all of whose certificates are revoked.
    pub devices: BTreeSet<String>,
    /// Serials of single revoked certificates, lower-case hex.
    pub serials: BTreeSet<String>,
}

impl RevokedSet {
    /// Applies one list from the anchor; whether the set changed, and whether entries were
    /// dropped for [`MAX_HELD`].
    pub fn apply(&mut self, list: &RevokedList) -> (bool, bool) {
        let before = self.clone();
        if list.replace {
            self.devices.clear();
            self.serials.clear();
        }
        let mut dropped = false;
        for d in &list.devices {
            if self.len() >= MAX_HELD {
                dropped = true;
                break;
            }
            self.devices.insert(d.clone());
        }
        for s in &list.serials {
            if self.len() >= MAX_HELD {
                dropped = true;
                break;
            }
            self.serials.insert(hex(s));
        }
        (*self != before, dropped)
    }

    /// Devices plus serials held.
    pub fn len(&self) -> usize {
        self.devices.len() + self.serials.len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `device` (display id) or the certificate `serial` is revoked.
    pub fn is_revoked(&self, device: &str, serial: &[u8]) -> bool {
        self.devices.contains(device) || self.serials.contains(&hex(serial))
    }
}

/// The held set as peer handshakes ask it: one copy, replaced whenever the anchor's set
/// changes, read at every handshake.
#[derive(Debug, Default)]
pub struct SharedRevoked(std::sync::RwLock<RevokedSet>);

impl SharedRevoked {
    /// Holds `set`.
    pub fn new(set: RevokedSet) -> SharedRevoked {
        SharedRevoked(std::sync::RwLock::new(set))
    }

    /// Puts `set` in force.
    pub fn replace(&self, set: RevokedSet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = set;
    }
}

impl anchorage_mesh::tls::RevocationCheck for SharedRevoked {
    fn is_revoked(&self, device: &anchorage_mesh::DeviceId, serial: &[u8]) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_revoked(&device.to_string(), serial)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(replace: bool, devices: &[&str], serials: &[&[u8]]) -> RevokedList {
        RevokedList {
            replace,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            serials: serials.iter().map(|s| s.to_vec()).collect(),
        }
    }

    #[test]
    fn a_set_is_replaced_then_added_to() {
        let mut set = RevokedSet::default();
        assert_eq!(set.apply(&list(true, &["a"], &[&[1, 2]])), (true, false));
        assert_eq!(set.apply(&list(false, &["b"], &[])), (true, false));
        assert!(set.is_revoked("a", &[]) && set.is_revoked("b", &[]));
        assert!(set.is_revoked("z", &[1, 2]));
        // The same set again changes nothing (and writes nothing).
        assert_eq!(set.apply(&list(false, &["b"], &[])), (false, false));
        // A new set drops what is no longer revoked.
        assert_eq!(set.apply(&list(true, &["b"], &[])), (true, false));
        assert!(!set.is_revoked("a", &[]) && !set.is_revoked("z", &[1, 2]));
    }

    #[test]
    fn the_held_set_is_bounded() {
        let mut set = RevokedSet::default();
        let many: Vec<String> = (0..MAX_HELD + 5).map(|i| format!("d{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let (changed, dropped) = set.apply(&list(true, &refs, &[]));
        assert!(changed && dropped);
        assert_eq!(set.len(), MAX_HELD);
    }
}
