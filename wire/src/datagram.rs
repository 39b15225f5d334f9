//! Heartbeats and their acks, sent as QUIC datagrams on a node connection.
//!
//! A datagram is one postcard-encoded [`Datagram`] with no length prefix (QUIC keeps datagram
//! boundaries). Datagrams are unreliable: the node numbers heartbeats so the anchor can count
//! gaps as loss, and the anchor acks each one, echoing the node's clock so the node can measure
//! its round-trip time and, from the acked count, its own loss rate.

use serde::{Deserialize, Serialize};

use crate::{
    frame::{FrameError, decode_exact},
    limits::MAX_DATAGRAM_LEN,
};

/// One QUIC datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Datagram {
    /// Node → anchor: I am alive.
    Heartbeat(Heartbeat),
    /// Anchor → node: I heard you.
    HeartbeatAck(HeartbeatAck),
}

/// A node's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Heartbeat {
    /// Sequence number, starting at 0 for each connection, +1 per heartbeat.
    pub seq: u64,
    /// The node's monotonic clock, milliseconds since an arbitrary start (echoed back).
    pub node_time_ms: u64,
    /// One-minute load average × 100, if the platform reports it.
    pub load_centi: Option<u32>,
    /// Invocations running now.
    pub running: u16,
}

/// The anchor's ack of a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HeartbeatAck {
    /// The acked heartbeat's sequence number.
    pub seq: u64,
    /// The heartbeat's `node_time_ms`, echoed for RTT.
    pub echo_node_time_ms: u64,
    /// Heartbeats the anchor has received on this connection so far.
    pub received: u64,
}

impl Datagram {
    /// Encodes the datagram payload.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let bytes = postcard::to_stdvec(self).map_err(|e| FrameError::Encode(e.to_string()))?;
        if bytes.len() > MAX_DATAGRAM_LEN {
            return Err(FrameError::TooLarge {
                len: bytes.len(),
                max: MAX_DATAGRAM_LEN,
            });
        }
        Ok(bytes)
    }

    /// Decodes a datagram payload strictly (no trailing bytes, size-checked).
    pub fn decode(bytes: &[u8]) -> Result<Datagram, FrameError> {
        if bytes.len() > MAX_DATAGRAM_LEN {
            return Err(FrameError::TooLarge {
                len: bytes.len(),
                max: MAX_DATAGRAM_LEN,
            });
        }
        decode_exact(bytes)
    }
}
