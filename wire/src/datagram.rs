//! Heartbeats, and copies of small invocations, sent as QUIC datagrams on a node connection.
//!
//! A datagram is one postcard-encoded [`Datagram`] with no length prefix (QUIC keeps datagram
//! boundaries). Datagrams are unreliable: the node numbers heartbeats so the anchor can count
//! gaps as loss. The anchor no longer acks each heartbeat with a datagram (QUIC's own ACK does,
//! and the node's round-trip time and loss come from its QUIC connection): an ack-eliciting
//! datagram back made the node's stack answer with an ACK-only packet, two received packets
//! per heartbeat. [`HeartbeatAck`] stays decodable for anchors that still send it.
//!
//! A small invocation is also sent as an [`InvokeCopy`](Datagram::InvokeCopy) beside its
//! stream, and its result comes back as a [`ResultCopy`](Datagram::ResultCopy): whichever
//! copy arrives first counts, the node's duplicate-id check makes a second copy harmless, and
//! a lost single-packet request or result no longer waits for QUIC's probe timeout.

use serde::{Deserialize, Serialize};

use crate::{
    LimitError,
    frame::{FrameError, decode_exact},
    invoke::{InvocationId, InvokeReply, InvokeRequest, InvokeResult},
    limits::MAX_DATAGRAM_LEN,
};

/// One QUIC datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Datagram {
    /// Node → anchor: I am alive.
    Heartbeat(Heartbeat),
    /// Anchor → node: I heard you (sent by earlier anchors; nodes still read it).
    HeartbeatAck(HeartbeatAck),
    /// Anchor → node: a copy of an invocation request also sent on its stream (only when it
    /// fits a datagram). Also asks for a [`Datagram::ResultCopy`] of its result.
    InvokeCopy(InvokeRequest),
    /// Node → anchor: a copy of an invocation's result, answering an
    /// [`Datagram::InvokeCopy`] (only when it fits a datagram).
    ResultCopy(ResultCopy),
}

/// The result of invocation `id`, as a datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ResultCopy {
    /// The invocation.
    pub id: InvocationId,
    /// Its result, as on the stream.
    pub result: InvokeResult,
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

    /// Checks every field against the protocol's limits (the invocation copies).
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Datagram::Heartbeat(_) | Datagram::HeartbeatAck(_) => Ok(()),
            Datagram::InvokeCopy(r) => r.validate(),
            Datagram::ResultCopy(c) => InvokeReply::Result(c.result.clone()).validate(),
        }
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
