//! The peer-to-peer mesh: what nodes and the anchor say to set up peer connections, what
//! travels on a peer connection ([`ALPN_PEER`](crate::ALPN_PEER)), the relay stream, and the
//! path probes ("disco" packets) that share the node's UDP socket with QUIC.
//!
//! # Rendezvous (on the control stream)
//!
//! A node reports where it listens ([`Candidates`], its local addresses) and what it exposes
//! ([`ServiceList`]). The anchor sends each node the peers the policy lets it reach or be
//! reached by ([`Directory`], filtered per node). When A wants B, A sends
//! [`RendezvousRequest`]; the anchor sends each of the two a [`Punch`] with the other's
//! candidates (its reported ones and the address the anchor observes) and one token for the
//! pair, at once, so that both start probing together and their packets open both NATs. A peer
//! that cannot be reached through the anchor gets [`Unreachable`]. Nodes report the state of
//! their peer paths ([`PathReport`]) for the operators' view of the mesh.
//!
//! # Relay stream (on the node connection)
//!
//! Right after registration the node opens a second bidirectional stream and sends
//! [`Relay::Hello`]. From then on [`Relay::Packet`] frames carry whole UDP payloads of a peer
//! connection: node → anchor with `peer` = the destination, anchor → node with `peer` = the
//! source. The packets are QUIC packets of the peers' own connection, sealed end to end; the
//! anchor forwards them (within its bandwidth bounds) and cannot read or alter them.
//!
//! # Peer connection
//!
//! Mutual TLS with both nodes' CA-issued certificates. Every stream is opened by the caller
//! with one [`PeerOpen`]:
//! - [`PeerOpen::Invoke`]: the invocation protocol of [`crate::invoke`], one request, progress
//!   and one result.
//! - [`PeerOpen::Tunnel`]: the callee answers one [`TunnelReply`]; after an accepted one the
//!   stream carries raw TCP bytes both ways, each side finishing its half when its TCP side
//!   reads end of file.
//!
//! # Probes
//!
//! [`Probe`] packets go straight over UDP between candidate addresses. They start with
//! [`PROBE_MAGIC`], whose first byte has QUIC's fixed bit clear, so no QUIC stack takes one
//! for a packet of its own. A probe proves a path only to the holder of the pair's token.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::invoke::InvokeRequest;
use crate::{DeviceId, LimitError, check_lengths, limits::*};

/// Most peers in one [`Directory`] message (a bigger directory is sent in several).
pub const MAX_DIRECTORY_CHUNK: usize = 8;
/// Most candidate addresses a node reports or a [`Punch`] carries.
pub const MAX_CANDIDATES: usize = 16;
/// Most services a node exposes.
pub const MAX_SERVICES: usize = 64;
/// Most patterns in one [`Grant`] list.
pub const MAX_GRANT_PATTERNS: usize = 32;
/// Most paths in one [`PathReport`].
pub const MAX_PATHS: usize = 1024;
/// Largest UDP payload carried in one [`Relay::Packet`].
pub const MAX_RELAY_PACKET: usize = 2048;
/// Longest service name.
pub const MAX_SERVICE_LEN: usize = 63;
/// Longest label key in a [`PeerEntry`]: a prefix, `/` and a name.
pub const MAX_LABEL_KEY_LEN: usize =
    crate::labels::MAX_PREFIX_LEN + 1 + crate::labels::MAX_NAME_LEN;

/// The first bytes of every probe packet. `0x00` first: no QUIC packet starts so.
pub const PROBE_MAGIC: [u8; 6] = *b"\0ANCHP";

/// The addresses a node can be reached at, as it sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Candidates {
    /// `IP:PORT` of the node's UDP socket on each local address.
    pub addrs: Vec<String>,
}

/// The services a node exposes to its peers (`anchor-node expose`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ServiceList {
    /// Service names.
    pub names: Vec<String>,
}

/// A node asks the anchor to introduce it to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RendezvousRequest {
    /// The peer to reach.
    pub peer: DeviceId,
}

/// The anchor tells a node to start probing a peer now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Punch {
    /// The peer.
    pub peer: DeviceId,
    /// The peer's candidates: the address the anchor observes first, then those it reported.
    pub addrs: Vec<String>,
    /// The pair's token, the same for both sides; probes carry it.
    pub token: [u8; 16],
}

/// The anchor cannot introduce a node to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Unreachable {
    /// The peer asked for.
    pub peer: DeviceId,
    /// Why, for the user: not connected to any anchor, not allowed by policy, unknown.
    pub reason: String,
}

/// What one side may do to the other, as the policy grants it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Grant {
    /// Capability patterns (`*` matches any run of characters).
    #[cfg_attr(test, proptest(strategy = "small::<String>()"))]
    pub capabilities: Vec<String>,
    /// Service patterns.
    #[cfg_attr(test, proptest(strategy = "small::<String>()"))]
    pub services: Vec<String>,
}

impl Grant {
    /// Whether nothing at all is granted.
    pub fn is_empty(&self) -> bool {
        self.capabilities.is_empty() && self.services.is_empty()
    }

    /// Whether the grant lets `capability` be invoked.
    pub fn allows_capability(&self, capability: &str) -> bool {
        self.capabilities
            .iter()
            .any(|p| wildcard_match(p, capability))
    }

    /// Whether the grant lets `service` be opened.
    pub fn allows_service(&self, service: &str) -> bool {
        self.services.iter().any(|p| wildcard_match(p, service))
    }
}

/// One peer in a node's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PeerEntry {
    /// The peer's device id.
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
    /// Its labels (`key`, `value`).
    #[cfg_attr(test, proptest(strategy = "small::<(String, String)>()"))]
    pub labels: Vec<(String, String)>,
    /// The services it exposes now.
    #[cfg_attr(test, proptest(strategy = "small::<String>()"))]
    pub services: Vec<String>,
    /// What this node may do to the peer.
    pub outbound: Grant,
    /// What the peer may do to this node: the callee checks every call against it.
    pub inbound: Grant,
}

/// The peers the policy lets a node reach or be reached by. Sent after registration and
/// whenever the policy, a label, a device or a peer's services change: one message with
/// `replace` and as many more without as the directory needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Directory {
    /// This message starts a new directory (the node drops what it held); else it adds.
    pub replace: bool,
    /// The policy version the directory was computed from.
    pub policy_version: u64,
    /// Peers in the whole directory, over all its messages: a node takes a new directory in
    /// force once it holds this many (never a half-sent one).
    pub total: u32,
    /// Peers.
    #[cfg_attr(test, proptest(strategy = "small::<PeerEntry>()"))]
    pub peers: Vec<PeerEntry>,
}

/// How a node reaches a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Straight over UDP.
    Direct,
    /// Through the anchor.
    Relayed,
    /// Not at all.
    None,
}

impl PathKind {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relayed => "relayed",
            PathKind::None => "none",
        }
    }
}

/// The state of one peer connection, as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PeerPath {
    /// The peer.
    pub peer: DeviceId,
    /// How it is reached.
    pub path: PathKind,
    /// The peer's address in use on a direct path.
    pub addr: Option<String>,
    /// Round-trip time of the connection, microseconds.
    pub rtt_us: Option<u32>,
    /// Unix milliseconds since when the path has been what it is.
    pub since_ms: u64,
}

/// The node's peer connections (sent when they change, at most about once a second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PathReport {
    /// Every peer connection the node has.
    #[cfg_attr(test, proptest(strategy = "small::<PeerPath>()"))]
    pub paths: Vec<PeerPath>,
}

/// A frame of the relay stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Relay {
    /// First frame from the node: this stream is its relay stream.
    Hello,
    /// One UDP payload of a peer connection.
    Packet(RelayPacket),
}

/// One relayed UDP payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RelayPacket {
    /// Node → anchor: the destination; anchor → node: the source.
    pub peer: DeviceId,
    /// The packet, as the peer's QUIC stack wrote it.
    pub packet: Vec<u8>,
}

/// The first frame of every stream on a peer connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum PeerOpen {
    /// Run a capability; answered as on an anchor's invocation stream.
    Invoke(InvokeRequest),
    /// Carry one TCP connection to an exposed service.
    Tunnel(TunnelOpen),
}

/// Open a tunnel to a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TunnelOpen {
    /// The exposed service's name.
    pub service: String,
}

/// The callee's answer to a [`TunnelOpen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum TunnelReply {
    /// Connected to the service: raw bytes follow.
    Accepted,
    /// Refused: not allowed, no such service, or the service did not accept.
    Refused(String),
}

/// A path probe, sent straight over UDP to a candidate address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Probe {
    /// Are you there?
    Ping(Ping),
    /// Yes: an answer to one ping, sent back to where it came from.
    Pong(Pong),
}

/// A probe asking for a [`Pong`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Ping {
    /// The sender.
    pub from: DeviceId,
    /// The pair's token from the rendezvous.
    pub token: [u8; 16],
    /// Transaction id, echoed in the pong.
    pub tx: [u8; 12],
}

/// The answer to a [`Ping`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Pong {
    /// The answering side.
    pub from: DeviceId,
    /// The pair's token.
    pub token: [u8; 16],
    /// The ping's transaction id.
    pub tx: [u8; 12],
    /// The address the ping came from, as the answering side saw it.
    pub observed: SocketAddr,
}

/// Up to three arbitrary items: keeps generated messages inside a frame.
#[cfg(test)]
fn small<T: proptest::arbitrary::Arbitrary>() -> impl proptest::strategy::Strategy<Value = Vec<T>> {
    proptest::collection::vec(proptest::prelude::any::<T>(), 0..4)
}

/// Largest encoded probe.
pub const MAX_PROBE_LEN: usize = 128;

impl Probe {
    /// The UDP payload: [`PROBE_MAGIC`] then the postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = PROBE_MAGIC.to_vec();
        // A probe has no variable-length field but the address: it always encodes.
        if let Ok(body) = postcard::to_stdvec(self) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Whether a UDP payload is a probe (it may still fail to decode).
    pub fn is_probe(payload: &[u8]) -> bool {
        payload.starts_with(&PROBE_MAGIC)
    }

    /// Decodes a UDP payload strictly; `None` for anything that is not a whole probe.
    pub fn decode(payload: &[u8]) -> Option<Probe> {
        if payload.len() > MAX_PROBE_LEN {
            return None;
        }
        let body = payload.strip_prefix(&PROBE_MAGIC)?;
        crate::frame::decode_exact(body).ok()
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (also none)
/// and every other character matches itself. The pattern language of token scopes and
/// policy capabilities and services.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    // `split` yields at least one part; the first is anchored at the start.
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*` at all: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whether `name` is a valid service name: 1 to 63 bytes of lowercase letters, digits, `-`,
/// `_` and `.`, starting with a letter or digit.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

fn grant_limits(g: &Grant) -> Result<(), LimitError> {
    check_lengths(&[
        (
            "grant.capabilities",
            g.capabilities.len(),
            MAX_GRANT_PATTERNS,
        ),
        ("grant.services", g.services.len(), MAX_GRANT_PATTERNS),
    ])?;
    g.capabilities
        .iter()
        .chain(&g.services)
        .try_for_each(|p| check_lengths(&[("grant.pattern", p.len(), MAX_NAME_LEN)]))
}

fn addr_limits(field: &'static str, addrs: &[String]) -> Result<(), LimitError> {
    check_lengths(&[(field, addrs.len(), MAX_CANDIDATES)])?;
    addrs
        .iter()
        .try_for_each(|a| check_lengths(&[("addr", a.len(), MAX_NAME_LEN)]))
}

impl Candidates {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        addr_limits("candidates", &self.addrs)
    }
}

impl ServiceList {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        check_lengths(&[("services", self.names.len(), MAX_SERVICES)])?;
        self.names
            .iter()
            .try_for_each(|n| check_lengths(&[("service", n.len(), MAX_SERVICE_LEN)]))
    }
}

impl Punch {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        addr_limits("punch.addrs", &self.addrs)
    }
}

impl Unreachable {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        check_lengths(&[("reason", self.reason.len(), MAX_TEXT_LEN)])
    }
}

impl Directory {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        check_lengths(&[("directory.peers", self.peers.len(), MAX_DIRECTORY_CHUNK)])?;
        self.peers.iter().try_for_each(|p| {
            check_lengths(&[
                ("peer.name", p.name.len(), MAX_NAME_LEN),
                ("peer.labels", p.labels.len(), crate::labels::MAX_LABELS),
                ("peer.services", p.services.len(), MAX_SERVICES),
            ])?;
            p.labels.iter().try_for_each(|(k, v)| {
                check_lengths(&[
                    ("peer.label.key", k.len(), MAX_LABEL_KEY_LEN),
                    ("peer.label.value", v.len(), MAX_NAME_LEN),
                ])
            })?;
            p.services
                .iter()
                .try_for_each(|s| check_lengths(&[("peer.service", s.len(), MAX_SERVICE_LEN)]))?;
            grant_limits(&p.outbound)?;
            grant_limits(&p.inbound)
        })
    }
}

impl PathReport {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        check_lengths(&[("paths", self.paths.len(), MAX_PATHS)])?;
        self.paths.iter().try_for_each(|p| {
            check_lengths(&[(
                "path.addr",
                p.addr.as_ref().map_or(0, String::len),
                MAX_NAME_LEN,
            )])
        })
    }
}

impl Relay {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Relay::Hello => Ok(()),
            Relay::Packet(p) => check_lengths(&[("packet", p.packet.len(), MAX_RELAY_PACKET)]),
        }
    }
}

impl PeerOpen {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            PeerOpen::Invoke(r) => r.validate(),
            PeerOpen::Tunnel(t) => check_lengths(&[("service", t.service.len(), MAX_SERVICE_LEN)]),
        }
    }
}

impl TunnelReply {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            TunnelReply::Accepted => Ok(()),
            TunnelReply::Refused(m) => check_lengths(&[("message", m.len(), MAX_TEXT_LEN)]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_and_nothing_else_decodes_as_one() {
        let ping = Probe::Ping(Ping {
            from: DeviceId::from_bytes([7; 20]),
            token: [1; 16],
            tx: [2; 12],
        });
        let bytes = ping.encode();
        assert!(Probe::is_probe(&bytes));
        assert_eq!(Probe::decode(&bytes), Some(ping));
        let pong = Probe::Pong(Pong {
            from: DeviceId::from_bytes([8; 20]),
            token: [1; 16],
            tx: [2; 12],
            observed: "[2001:db8::1]:7444".parse().unwrap(),
        });
        assert!(pong.encode().len() <= MAX_PROBE_LEN);
        assert_eq!(Probe::decode(&pong.encode()), Some(pong));
        // A QUIC packet always has its fixed bit (0x40) set.
        assert_eq!(Probe::decode(&[0xc0, 0, 0, 0, 1]), None);
        assert_eq!(Probe::decode(&bytes[..bytes.len() - 1]), None);
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Probe::decode(&long), None);
    }

    #[test]
    fn wildcards_match_as_token_scopes_do() {
        assert!(wildcard_match("camera.*", "camera.snapshot"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("echo", "echo"));
        assert!(!wildcard_match("echo", "echo2"));
        assert!(wildcard_match("a*c*e", "abcde"));
        assert!(!wildcard_match("a*c*e", "abcd"));
        let g = Grant {
            capabilities: vec!["system.*".into()],
            services: vec!["web".into()],
        };
        assert!(g.allows_capability("system.health"));
        assert!(!g.allows_capability("echo"));
        assert!(g.allows_service("web") && !g.allows_service("ssh"));
        assert!(Grant::default().is_empty());
    }

    #[test]
    fn service_names() {
        assert!(valid_service_name("ssh"));
        assert!(valid_service_name("web-ui.8080"));
        assert!(!valid_service_name(""));
        assert!(!valid_service_name("-x"));
        assert!(!valid_service_name("Web"));
        assert!(!valid_service_name(&"a".repeat(64)));
    }
}
