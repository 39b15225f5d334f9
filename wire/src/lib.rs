//! The Anchorage wire protocol, with no IO.
//!
//! Everything that crosses the network between an anchor and a node is defined here, like
//! `quinn-proto` beside `quinn`: plain message types, the framing that carries them on QUIC
//! streams, hard size limits, the ALPN identifiers and the application error codes used to close
//! streams and connections. Nothing in this crate reads a clock, spawns a task or touches a
//! socket, so it can be fuzzed and property-tested in isolation.
//!
//! Layout:
//! - [`error`]: [`ErrorCode`], the stable `u32` application error codes.
//! - [`frame`]: length-prefixed postcard frames and the incremental [`frame::FrameDecoder`].
//! - [`bootstrap`]: the one-shot pairing stream on [`ALPN_BOOTSTRAP`].
//! - [`control`]: the node's control stream on [`ALPN_NODE`] (register, events, renewal).
//! - [`invoke`]: one bidirectional stream per capability invocation, opened by the anchor.
//! - [`datagram`]: heartbeats and their acks, sent as QUIC datagrams.
//! - [`peer`]: the peer-to-peer mesh: rendezvous messages, the relay stream, peer streams on
//!   [`ALPN_PEER`] and path probes.
//!
//! Beside the protocol, the vocabulary every crate shares without any IO (the console's JSON
//! API uses these types too, and reaches them without quinn or rustls):
//! - [`device`]: [`DeviceId`] (its derivation from a public key is in `anchorage-mesh`).
//! - [`state`]: [`Presence`], [`TrustState`], [`InvocationState`].
//! - [`invoke::InvocationId`], re-exported here.
//! - [`duration`]: the one duration grammar of flags and configuration files (`1h30m`).
//!
//! Compatibility rules (see `docs/protocol.md`): enum variants are only ever appended, never
//! reordered; postcard is not self-describing, so a new field in an existing struct breaks old
//! peers and needs a new variant or a new version; a change that breaks an old peer bumps
//! [`PROTOCOL_VERSION`] and the ALPN suffix.
//! Golden byte fixtures in the tests pin the encoding.

pub mod bootstrap;
pub mod control;
pub mod datagram;
pub mod device;
pub mod duration;
pub mod error;
pub mod frame;
pub mod invoke;
pub mod labels;
pub mod peer;
pub mod state;

pub use device::DeviceId;
pub use error::ErrorCode;
pub use frame::{Decoded, FrameDecoder, FrameError, decode_frame, encode_frame};
pub use invoke::InvocationId;
pub use state::{InvocationState, Presence, TrustState};

/// The protocol version carried in the first message of every stream.
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN of the pairing (bootstrap) connection: no client certificate, one pairing stream.
pub const ALPN_BOOTSTRAP: &[u8] = b"anchorage/bootstrap/1";

/// ALPN of an enrolled node's connection: client certificate required.
pub const ALPN_NODE: &[u8] = b"anchorage/node/1";

/// ALPN of a connection between two nodes: both present their certificates.
pub const ALPN_PEER: &[u8] = b"anchorage/peer/1";

/// The TLS server name nodes use to reach each other (each checks the device id in the
/// certificate instead of a name).
pub const PEER_SERVER_NAME: &str = "anchorage-peer";

/// The fixed TLS server name of every anchor, so nodes never depend on the anchor's IP address.
pub const ANCHOR_SERVER_NAME: &str = "anchorage-anchor";

/// Hard limits shared by both peers. A frame or field beyond these is a protocol error.
pub mod limits {
    /// Largest frame body accepted on any stream, checked before allocating.
    pub const MAX_FRAME_LEN: usize = 512 * 1024;
    /// Largest datagram payload the anchor or a node will send (fits a 1200-byte QUIC packet).
    pub const MAX_DATAGRAM_LEN: usize = 1024;
    /// Longest device or capability name, in bytes.
    pub const MAX_NAME_LEN: usize = 128;
    /// Longest free-text field (reasons, messages, platform strings), in bytes.
    pub const MAX_TEXT_LEN: usize = 1024;
    /// Most capabilities one node may register. With every capability field at its limit a
    /// `Register` is about 2.2 KiB per capability, so this keeps the largest valid one well
    /// inside [`MAX_FRAME_LEN`].
    pub const MAX_CAPABILITIES: usize = 128;
    /// Largest invocation input, in bytes.
    pub const MAX_INVOKE_INPUT: usize = 256 * 1024;
    /// Largest invocation output a node may return, in bytes (the anchor may ask for less).
    pub const MAX_INVOKE_OUTPUT: usize = 256 * 1024;
    /// Largest certificate or CSR, DER bytes.
    pub const MAX_CERT_LEN: usize = 16 * 1024;
    /// Most anchor addresses in one [`AnchorList`](crate::control::AnchorList).
    pub const MAX_ANCHORS: usize = 64;
    /// Most devices, and most serials, in one [`RevokedList`](crate::control::RevokedList)
    /// (a bigger set is sent in several).
    pub const MAX_REVOKED: usize = 2048;
    /// Longest certificate serial in a [`RevokedList`](crate::control::RevokedList).
    pub const MAX_SERIAL_LEN: usize = 64;
}

/// A top-level message of one stream or of the datagram channel.
///
/// Implemented by the enums and structs that are sent as whole frames. Receivers call
/// [`validate`](Message::validate) after decoding, so an over-long field is refused the same way
/// everywhere.
pub trait Message: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {
    /// Checks every field against the protocol's limits.
    fn validate(&self) -> Result<(), LimitError>;
}

macro_rules! impl_message {
    ($($ty:ty),* $(,)?) => {
        $(impl Message for $ty {
            fn validate(&self) -> Result<(), LimitError> {
                <$ty>::validate(self)
            }
        })*
    };
}

impl_message!(
    bootstrap::BootstrapRequest,
    bootstrap::BootstrapResponse,
    control::ControlUp,
    control::ControlDown,
    invoke::InvokeRequest,
    invoke::InvokeReply,
    peer::Relay,
    peer::PeerOpen,
    peer::TunnelReply,
);

/// Returns the first of `checks` that fails: each is `(field name, actual length, limit)`.
///
/// Message types use this in their `validate` methods so every limit is reported the same way.
fn check_lengths(checks: &[(&'static str, usize, usize)]) -> Result<(), LimitError> {
    for &(field, len, max) in checks {
        if len > max {
            return Err(LimitError { field, len, max });
        }
    }
    Ok(())
}

/// A decoded message carried a field longer than the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` is {len} bytes, the limit is {max}")]
pub struct LimitError {
    /// The offending field.
    pub field: &'static str,
    /// Its length in bytes (or items, for lists).
    pub len: usize,
    /// The protocol's limit.
    pub max: usize,
}

#[cfg(test)]
mod tests;
