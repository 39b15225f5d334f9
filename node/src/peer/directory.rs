//! The peers this node may reach or be reached by, as the anchor last said (pure; kept in
//! `peers.json` with each peer's last addresses and pair token).
//!
//! The anchor sends the directory in chunks ([`anchorage_wire::peer::Directory`]): the first
//! with `replace`, saying how many peers the whole holds. A new directory is taken in force
//! only once all of it arrived, so a policy change never looks, for a moment, like every peer
//! being cut off.

use std::collections::HashMap;
use std::net::SocketAddr;

use anchorage_wire::DeviceId;
use anchorage_wire::peer::{Directory as DirectoryMsg, PeerEntry};
use serde::{Deserialize, Serialize};

use crate::state::{StateDir, StateError};

/// Most peers a node holds; what an anchor sends beyond it is dropped with a warning.
pub const MAX_PEERS: usize = 16 * 1024;

/// The file in the state directory.
pub const PEERS_FILE: &str = "peers.json";

/// The directory in force, and one being received.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    peers: HashMap<DeviceId, PeerEntry>,
    policy_version: u64,
    building: Option<Building>,
}

#[derive(Debug, Clone)]
struct Building {
    total: usize,
    policy_version: u64,
    peers: HashMap<DeviceId, PeerEntry>,
}

/// What [`Directory::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A chunk of a directory still arriving.
    Partial,
    /// A new directory is in force.
    Replaced,
    /// A chunk that does not belong to any directory (no `replace` before it): ignored.
    Ignored,
}

/// Why a peer name given by a user does not name one peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No peer matches.
    #[error("no peer {query:?} in this node's directory{hint}")]
    NotFound {
        /// What was asked.
        query: String,
        /// ", did you mean …?" or empty.
        hint: String,
    },
    /// Several peers match.
    #[error("{query:?} names {} peers: {}; give more of the device id", .matches.len(), .matches.join(", "))]
    Ambiguous {
        /// What was asked.
        query: String,
        /// `name (id)` of each match.
        matches: Vec<String>,
    },
}

impl Directory {
    /// Takes one message from the anchor.
    pub fn apply(&mut self, msg: DirectoryMsg) -> Applied {
        if msg.replace {
            self.building = Some(Building {
                total: (msg.total as usize).min(MAX_PEERS),
                policy_version: msg.policy_version,
                peers: HashMap::new(),
            });
        }
        let Some(building) = self.building.as_mut() else {
            return Applied::Ignored;
        };
        for peer in msg.peers {
            if building.peers.len() >= MAX_PEERS {
                break;
            }
            building.peers.insert(peer.device_id, peer);
        }
        if building.peers.len() >= building.total {
            if let Some(done) = self.building.take() {
                self.peers = done.peers;
                self.policy_version = done.policy_version;
            }
            Applied::Replaced
        } else {
            Applied::Partial
        }
    }

    /// A peer's entry, if the policy relates it to this node.
    pub fn get(&self, peer: &DeviceId) -> Option<&PeerEntry> {
        self.peers.get(peer)
    }

    /// Every peer.
    pub fn peers(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers.values()
    }

    /// Peers held.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is held.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The policy version the directory in force came from.
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    /// The peer a user means: a device id (either form), a unique prefix of one (at least
    /// four characters), or a device name.
    pub fn resolve(&self, query: &str) -> Result<DeviceId, ResolveError> {
        if let Ok(id) = query.parse::<DeviceId>()
            && self.peers.contains_key(&id)
        {
            return Ok(id);
        }
        let compact: String = query
            .chars()
            .filter(|c| *c != '-')
            .collect::<String>()
            .to_ascii_lowercase();
        let by_name: Vec<&PeerEntry> = self.peers.values().filter(|p| p.name == query).collect();
        let by_prefix: Vec<&PeerEntry> = if compact.len() >= 4 {
            self.peers
                .values()
                .filter(|p| p.device_id.compact().starts_with(&compact))
                .collect()
        } else {
            Vec::new()
        };
        let matches = if by_name.len() == 1 {
            by_name
        } else if !by_prefix.is_empty() {
            by_prefix
        } else {
            by_name
        };
        match matches.as_slice() {
            [one] => Ok(one.device_id),
            [] => Err(ResolveError::NotFound {
                query: query.to_string(),
                hint: self.hint(query),
            }),
            many => {
                let mut matches: Vec<String> = many
                    .iter()
                    .map(|p| format!("{} ({})", p.name, p.device_id))
                    .collect();
                matches.sort();
                Err(ResolveError::Ambiguous {
                    query: query.to_string(),
                    matches,
                })
            }
        }
    }

    fn hint(&self, query: &str) -> String {
        let lower = query.to_ascii_lowercase();
        let mut close: Vec<&str> = self
            .peers
            .values()
            .map(|p| p.name.as_str())
            .filter(|n| {
                let n = n.to_ascii_lowercase();
                n.contains(&lower) || lower.contains(&n) || edit_distance(&n, &lower) <= 2
            })
            .collect();
        close.sort();
        close.dedup();
        match close.as_slice() {
            [] if self.peers.is_empty() => {
                " (the directory is empty: the policy lets this node reach no peer)".into()
            }
            [] => String::new(),
            names => format!("; did you mean {}?", names.join(" or ")),
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// One peer as saved: its entry, where it was last reached and the pair's token, so that
/// the node can reach it again while the anchor is away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPeer {
    /// The directory entry.
    pub entry: PeerEntry,
    /// Addresses last known.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// The pair's token, hex.
    #[serde(default)]
    pub token: Option<String>,
}

/// `peers.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPeers {
    /// The policy version of the directory.
    pub policy_version: u64,
    /// Every peer.
    pub peers: Vec<SavedPeer>,
}

impl SavedPeers {
    /// The directory the file held.
    pub fn directory(&self) -> Directory {
        Directory {
            peers: self
                .peers
                .iter()
                .take(MAX_PEERS)
                .map(|p| (p.entry.device_id, p.entry.clone()))
                .collect(),
            policy_version: self.policy_version,
            building: None,
        }
    }
}

/// Saves `peers` in the state directory (`peers.json`, 0600, atomically).
pub fn save(state: &StateDir, peers: &SavedPeers) -> Result<(), StateError> {
    let json = serde_json::to_vec(peers).map_err(|e| StateError::Corrupt {
        path: state.path().join(PEERS_FILE),
        message: e.to_string(),
    })?;
    state.write(PEERS_FILE, &json)
}

/// The peers as last saved; `None` if there is no file. A file that is too large or not a
/// directory is [`StateError::Corrupt`].
pub fn load(state: &StateDir) -> Result<Option<SavedPeers>, StateError> {
    let path = state.path().join(PEERS_FILE);
    let corrupt = |message: String| StateError::Corrupt {
        path: path.clone(),
        message,
    };
    // An entry at its limits is a few tens of KiB; a typical one a few hundred bytes.
    let max = (MAX_PEERS * 64 * 1024) as u64;
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
        Ok(m) if m.len() > max => return Err(corrupt(format!("larger than {max} bytes"))),
        Ok(_) => {}
    }
    let text = std::fs::read_to_string(&path).map_err(|source| StateError::Io {
        path: path.clone(),
        source,
    })?;
    let saved: SavedPeers = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    if saved.peers.len() > MAX_PEERS {
        return Err(corrupt(format!("more than {MAX_PEERS} peers")));
    }
    Ok(Some(saved))
}

/// Hex of a token.
pub fn token_hex(token: &[u8; 16]) -> String {
    data_encoding::HEXLOWER.encode(token)
}

/// A token from its hex.
pub fn token_from_hex(hex: &str) -> Option<[u8; 16]> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(hex.as_bytes())
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anchorage_wire::peer::Grant;

    fn entry(byte: u8, name: &str) -> PeerEntry {
        PeerEntry {
            device_id: DeviceId::from_bytes([byte; 20]),
            name: name.into(),
            labels: vec![],
            services: vec![],
            outbound: Grant {
                capabilities: vec!["echo".into()],
                services: vec![],
            },
            inbound: Grant::default(),
        }
    }

    fn msg(replace: bool, total: u32, peers: Vec<PeerEntry>) -> DirectoryMsg {
        DirectoryMsg {
            replace,
            policy_version: 3,
            total,
            peers,
        }
    }

    #[test]
    fn a_new_directory_takes_force_only_when_whole() {
        let mut d = Directory::default();
        assert_eq!(
            d.apply(msg(false, 1, vec![entry(1, "a")])),
            Applied::Ignored
        );
        assert_eq!(
            d.apply(msg(true, 1, vec![entry(1, "a")])),
            Applied::Replaced
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d.policy_version(), 3);
        // A second directory in two chunks: the first one stays until the second is whole.
        assert_eq!(d.apply(msg(true, 2, vec![entry(2, "b")])), Applied::Partial);
        assert!(d.get(&DeviceId::from_bytes([1; 20])).is_some());
        assert_eq!(
            d.apply(msg(false, 0, vec![entry(3, "c")])),
            Applied::Replaced
        );
        assert!(d.get(&DeviceId::from_bytes([1; 20])).is_none());
        assert_eq!(d.len(), 2);
        // An empty directory empties it.
        assert_eq!(d.apply(msg(true, 0, vec![])), Applied::Replaced);
        assert!(d.is_empty());
    }

    #[test]
    fn peers_are_named_by_id_prefix_or_name() {
        let mut d = Directory::default();
        d.apply(msg(
            true,
            3,
            vec![entry(1, "camera"), entry(2, "display"), entry(3, "display")],
        ));
        let camera = DeviceId::from_bytes([1; 20]);
        assert_eq!(d.resolve("camera"), Ok(camera));
        assert_eq!(d.resolve(&camera.to_string()), Ok(camera));
        assert_eq!(d.resolve(&camera.compact()[..6]), Ok(camera));
        match d.resolve("display") {
            Err(ResolveError::Ambiguous { matches, .. }) => assert_eq!(matches.len(), 2),
            other => panic!("{other:?}"),
        }
        let err = d.resolve("camra").expect_err("typo");
        assert!(err.to_string().contains("did you mean camera"), "{err}");
        let empty = Directory::default();
        assert!(
            empty
                .resolve("x")
                .expect_err("none")
                .to_string()
                .contains("reach no peer")
        );
    }

    #[test]
    fn tokens_and_saved_peers_round_trip() {
        let t = [7u8; 16];
        assert_eq!(token_from_hex(&token_hex(&t)), Some(t));
        assert_eq!(token_from_hex("zz"), None);
        let saved = SavedPeers {
            policy_version: 9,
            peers: vec![SavedPeer {
                entry: entry(1, "a"),
                addrs: vec!["10.0.0.1:5".parse().unwrap()],
                token: Some(token_hex(&t)),
            }],
        };
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedPeers = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        assert_eq!(back.directory().len(), 1);
    }
}
