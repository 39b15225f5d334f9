//! The state names every crate shares: a node's [`Presence`], a device's [`TrustState`] and an
//! [`InvocationState`]. Each is defined once, here, for the anchor's rules, its store and the
//! console's JSON.
//!
//! Serde: JSON carries the snake_case names ([`as_str`](Presence::as_str)); postcard carries the
//! variant index, so variants are only ever appended (the golden tests pin both).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that is not one of an enum's states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {input:?}; expected one of: {expected}")]
pub struct ParseStateError {
    what: &'static str,
    input: String,
    expected: String,
}

macro_rules! named_states {
    ($ty:ident, $what:literal, { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// Every state, in declaration (and postcard index) order.
            pub const ALL: &[$ty] = &[$($ty::$variant),*];

            /// The state's name, as in JSON and on the command line.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),*
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = ParseStateError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::ALL
                    .iter()
                    .copied()
                    .find(|state| state.as_str() == s)
                    .ok_or_else(|| ParseStateError {
                        what: $what,
                        input: s.chars().take(80).collect(),
                        expected: $ty::ALL
                            .iter()
                            .map(|state| state.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
            }
        }
    };
}

/// Presence of a node, as the anchor's presence rules decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Heartbeats arrive, everything available.
    Online,
    /// Fresh, but a capability is unavailable or heartbeat loss is high.
    Degraded,
    /// No heartbeat for the stale threshold.
    Stale,
    /// No heartbeat for the offline threshold, or stopped cleanly.
    Offline,
    /// Never registered.
    Unknown,
}

named_states!(Presence, "presence", {
    Online => "online",
    Degraded => "degraded",
    Stale => "stale",
    Offline => "offline",
    Unknown => "unknown",
});

/// Trust state of a device, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustState {
    /// Has a valid certificate.
    Trusted,
    /// A pairing request waits for approval.
    Pending,
    /// Revoked; must be removed before pairing again.
    Revoked,
    /// Removed by an operator.
    Removed,
    /// Not known.
    Unknown,
}

named_states!(TrustState, "trust state", {
    Trusted => "trusted",
    Pending => "pending",
    Revoked => "revoked",
    Removed => "removed",
    Unknown => "unknown",
});

/// State of an invocation: `queued → dispatched → succeeded | failed | timed_out`, or
/// `rejected` for an unknown or unavailable capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvocationState {
    /// Waiting for the node.
    Queued,
    /// Sent to the node.
    Dispatched,
    /// Ran and succeeded.
    Succeeded,
    /// Ran and failed.
    Failed,
    /// Deadline passed.
    TimedOut,
    /// Unknown or unavailable capability.
    Rejected,
}

named_states!(InvocationState, "invocation state", {
    Queued => "queued",
    Dispatched => "dispatched",
    Succeeded => "succeeded",
    Failed => "failed",
    TimedOut => "timed_out",
    Rejected => "rejected",
});

impl InvocationState {
    /// Whether the invocation has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, InvocationState::Queued | InvocationState::Dispatched)
    }
}
