//! Invocation streams: one bidirectional stream per capability invocation, opened by the anchor.
//!
//! The anchor writes one [`InvokeRequest`] and finishes its side. The node answers with zero or
//! more [`InvokeReply::Progress`] frames and exactly one [`InvokeReply::Result`], then finishes.
//! Each invocation has its own stream, so a slow one never blocks another (no head-of-line
//! blocking). Invocations never travel in 0-RTT data: they could be replayed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{LimitError, check_lengths, limits::*};

/// A 128-bit invocation id, unique per anchor. Shown as 32 lowercase hex digits.
///
/// Serde: human-readable formats (the console's JSON) carry the hex text; postcard carries the
/// 16 bare bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InvocationId(pub [u8; 16]);

/// The anchor asks the node to run a capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InvokeRequest {
    /// The anchor's protocol version.
    pub version: u16,
    /// Id; the node drops a second request with an id it already ran.
    pub id: InvocationId,
    /// Capability name.
    pub capability: String,
    /// Input, JSON bytes.
    pub input: Vec<u8>,
    /// Time left until the deadline when the anchor sent this, milliseconds. Relative, so the
    /// two clocks need not agree; the node refuses to start once it has passed.
    pub remaining_ms: u32,
    /// Most output bytes the anchor will keep; the node truncates beyond it.
    pub output_limit: u32,
}

/// A frame from the node on an invocation stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum InvokeReply {
    /// Work in progress (optional, any number).
    Progress(Progress),
    /// The final outcome (exactly one, last).
    Result(InvokeResult),
}

/// Progress of a running invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Progress {
    /// A short message.
    pub message: String,
    /// Percent done, if known.
    pub percent: Option<u8>,
}

/// The outcome of an invocation on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InvokeResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Output, JSON bytes (possibly truncated to the output limit).
    pub output: Vec<u8>,
    /// Whether the output was truncated.
    pub truncated: bool,
    /// Error detail when it did not succeed (e.g. a command's stderr tail).
    pub error: Option<String>,
    /// Time the node spent running it, milliseconds.
    pub duration_ms: u32,
}

/// How an invocation ended on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[non_exhaustive]
pub enum Outcome {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and failed.
    Failed,
    /// It ran out of time while running.
    TimedOut,
    /// The node does not have this capability, or it is unavailable.
    Rejected,
    /// The deadline had passed before it could start; it did not run.
    Expired,
    /// The node already ran an invocation with this id; it did not run again.
    Duplicate,
    /// The node is at its concurrency limit; it did not run.
    Busy,
}

impl InvokeRequest {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        check_lengths(&[
            ("capability", self.capability.len(), MAX_NAME_LEN),
            ("input", self.input.len(), MAX_INVOKE_INPUT),
        ])
    }
}

impl InvokeReply {
    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            InvokeReply::Progress(p) => {
                check_lengths(&[("message", p.message.len(), MAX_TEXT_LEN)])
            }
            InvokeReply::Result(r) => check_lengths(&[
                ("output", r.output.len(), MAX_INVOKE_OUTPUT),
                (
                    "error",
                    r.error.as_ref().map_or(0, String::len),
                    MAX_TEXT_LEN * 8,
                ),
            ]),
        }
    }
}

impl fmt::Display for InvocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for InvocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InvocationId({self})")
    }
}

/// An invocation id string was not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid invocation id: expected 32 hex digits")]
pub struct ParseInvocationIdError;

impl FromStr for InvocationId {
    type Err = ParseInvocationIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return Err(ParseInvocationIdError);
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(ParseInvocationIdError)?;
            let lo = hex_val(pair[1]).ok_or(ParseInvocationIdError)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(InvocationId(out))
    }
}

impl Serialize for InvocationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for InvocationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(d).map(InvocationId)
        }
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
