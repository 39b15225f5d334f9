//! The node's control stream, on [`ALPN_NODE`](crate::ALPN_NODE).
//!
//! Right after the handshake the node opens one bidirectional stream and sends
//! [`ControlUp::Register`]. The anchor answers [`ControlDown::Registered`] (with the heartbeat
//! interval to use) or, for a certificate inside its expiry grace period,
//! [`ControlDown::RenewalOnly`], after which only [`ControlUp::Renew`] is served. The stream then
//! carries node events (stopping, capability availability) up and certificate renewal both ways
//! for the life of the connection, and the anchor tells the node every anchor of its cluster
//! ([`ControlDown::Anchors`]) and the mesh's revocation set ([`ControlDown::Revoked`]). For the
//! peer-to-peer mesh it carries the rendezvous (see [`crate::peer`]): candidates, services and
//! path reports up; the filtered peer directory, punches and unreachable peers down. Closing it
//! closes the connection.

use serde::{Deserialize, Serialize};

use crate::peer::{
    Candidates, Directory, PathReport, Punch, RendezvousRequest, ServiceList, Unreachable,
};
use crate::{LimitError, check_lengths, limits::*};

/// A message from the node on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ControlUp {
    /// First message: who the node is and what it can do.
    Register(Register),
    /// Something changed on the node.
    Event(NodeEvent),
    /// Ask for a new certificate for a new CSR (same key or a new one).
    Renew(RenewRequest),
    /// Where the node's UDP socket can be reached, as it sees it (after `Registered`, and
    /// whenever it changes).
    Candidates(Candidates),
    /// The services the node exposes to peers (after `Registered`, and whenever they change).
    Services(ServiceList),
    /// Introduce this node to a peer: the anchor answers both with a [`ControlDown::Punch`],
    /// or this one with [`ControlDown::Unreachable`].
    Rendezvous(RendezvousRequest),
    /// The node's peer connections, for the operators' view of the mesh.
    Paths(PathReport),
}

/// A message from the anchor on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ControlDown {
    /// Registration accepted.
    Registered(Registered),
    /// The certificate is expired but inside the grace period: only renewal is served.
    RenewalOnly(RenewalOnly),
    /// A renewed certificate.
    Renewed(Renewed),
    /// Renewal refused; the reason is for logs.
    RenewRefused(RenewRefused),
    /// An operator asked for a rotation: send a [`ControlUp::Renew`] now.
    RotateNow,
    /// The anchors of the cluster (after `Registered`, and again whenever the set changes):
    /// where the node may reconnect when it loses this one.
    Anchors(AnchorList),
    /// The mesh's revocation set (after `Registered`, and again whenever it changes), which
    /// the node keeps, so that it refuses revoked peers even while the anchor is away.
    Revoked(RevokedList),
    /// The peers the policy lets this node reach or be reached by (after `Registered`, and
    /// whenever it changes).
    Directory(Directory),
    /// Start probing a peer now (both sides get one at once).
    Punch(Punch),
    /// A [`ControlUp::Rendezvous`] that cannot be served.
    Unreachable(Unreachable),
}

/// Part of the mesh's revocation set. A set is sent as one list with `replace` followed by
/// as many without as it needs (each at most [`MAX_REVOKED`] devices and serials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RevokedList {
    /// This list starts a new set (what the node held before is dropped); else it adds.
    pub replace: bool,
    /// Device ids (display form) all of whose certificates are revoked.
    pub devices: Vec<String>,
    /// Serials of single revoked certificates.
    pub serials: Vec<Vec<u8>>,
}

/// Every live anchor of the cluster, as the node should dial them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AnchorList {
    /// `HOST:PORT` of each anchor's QUIC listener, the sending anchor first.
    pub addrs: Vec<String>,
}

/// Registration of a node session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Register {
    /// The node's protocol version.
    pub version: u16,
    /// Human name of the device.
    pub name: String,
    /// Platform, e.g. `linux-x86_64`.
    pub platform: String,
    /// The node agent's version.
    pub agent_version: String,
    /// Capabilities and their availability.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<CapabilityInfo>(), 0..4)"
        )
    )]
    pub capabilities: Vec<CapabilityInfo>,
}

/// One capability a node offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CapabilityInfo {
    /// Name, e.g. `system.health`.
    pub name: String,
    /// Whether it can run now.
    pub available: bool,
    /// Why it is unavailable, if it is.
    pub reason: Option<String>,
    /// One line for operators.
    pub description: String,
}

/// The anchor accepted the registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Registered {
    /// The anchor's protocol version.
    pub version: u16,
    /// Send a heartbeat datagram this often, milliseconds.
    pub heartbeat_interval_ms: u32,
    /// The anchor's clock at registration, Unix milliseconds (for display of skew only).
    pub anchor_time_ms: u64,
    /// The device id the anchor read from the certificate (display form).
    pub device_id: String,
}

/// The connection may only renew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RenewalOnly {
    /// The end of the grace period, Unix milliseconds.
    pub grace_ends_ms: u64,
}

/// Events a node reports on its control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum NodeEvent {
    /// The node is stopping cleanly; mark it offline at once.
    Stopping {
        /// Why, for the operator.
        reason: String,
    },
    /// A capability became available or unavailable.
    CapabilityChanged(CapabilityInfo),
}

/// A certificate renewal request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RenewRequest {
    /// PKCS#10 CSR, DER.
    pub csr_der: Vec<u8>,
}

/// A renewed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Renewed {
    /// The new client certificate, DER.
    pub cert_der: Vec<u8>,
    /// The CA certificate, DER.
    pub ca_der: Vec<u8>,
}

/// Renewal refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RenewRefused {
    /// Why.
    pub message: String,
}

impl CapabilityInfo {
    fn limits(&self) -> [(&'static str, usize, usize); 3] {
        [
            ("capability.name", self.name.len(), MAX_NAME_LEN),
            (
                "capability.reason",
                self.reason.as_ref().map_or(0, String::len),
                MAX_TEXT_LEN,
            ),
            (
                "capability.description",
                self.description.len(),
                MAX_TEXT_LEN,
            ),
        ]
    }
}

impl ControlUp {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            ControlUp::Register(r) => {
                check_lengths(&[
                    ("name", r.name.len(), MAX_NAME_LEN),
                    ("platform", r.platform.len(), MAX_NAME_LEN),
                    ("agent_version", r.agent_version.len(), MAX_NAME_LEN),
                    ("capabilities", r.capabilities.len(), MAX_CAPABILITIES),
                ])?;
                r.capabilities
                    .iter()
                    .try_for_each(|c| check_lengths(&c.limits()))
            }
            ControlUp::Event(NodeEvent::Stopping { reason }) => {
                check_lengths(&[("reason", reason.len(), MAX_TEXT_LEN)])
            }
            ControlUp::Event(NodeEvent::CapabilityChanged(c)) => check_lengths(&c.limits()),
            ControlUp::Renew(r) => check_lengths(&[("csr_der", r.csr_der.len(), MAX_CERT_LEN)]),
            ControlUp::Candidates(c) => c.validate(),
            ControlUp::Services(s) => s.validate(),
            ControlUp::Rendezvous(_) => Ok(()),
            ControlUp::Paths(p) => p.validate(),
        }
    }
}

impl ControlDown {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            ControlDown::Registered(r) => {
                check_lengths(&[("device_id", r.device_id.len(), MAX_NAME_LEN)])
            }
            ControlDown::RenewalOnly(_) | ControlDown::RotateNow => Ok(()),
            ControlDown::Renewed(r) => check_lengths(&[
                ("cert_der", r.cert_der.len(), MAX_CERT_LEN),
                ("ca_der", r.ca_der.len(), MAX_CERT_LEN),
            ]),
            ControlDown::RenewRefused(r) => {
                check_lengths(&[("message", r.message.len(), MAX_TEXT_LEN)])
            }
            ControlDown::Revoked(list) => {
                check_lengths(&[
                    ("revoked.devices", list.devices.len(), MAX_REVOKED),
                    ("revoked.serials", list.serials.len(), MAX_REVOKED),
                ])?;
                list.devices.iter().try_for_each(|d| {
                    check_lengths(&[("revoked.device", d.len(), MAX_NAME_LEN)])
                })?;
                list.serials
                    .iter()
                    .try_for_each(|s| check_lengths(&[("revoked.serial", s.len(), MAX_SERIAL_LEN)]))
            }
            ControlDown::Anchors(list) => {
                check_lengths(&[("anchors", list.addrs.len(), MAX_ANCHORS)])?;
                list.addrs
                    .iter()
                    .try_for_each(|a| check_lengths(&[("anchor", a.len(), MAX_NAME_LEN)]))
            }
            ControlDown::Directory(d) => d.validate(),
            ControlDown::Punch(p) => p.validate(),
            ControlDown::Unreachable(u) => u.validate(),
        }
    }
}
