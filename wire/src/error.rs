//! Application error codes for closing QUIC streams and connections.
//!
//! Each code is a stable `u32`: numbers are never reused or renumbered, new codes are appended.
//! A peer that receives a code it does not know treats it as [`ErrorCode::Internal`] for display
//! but keeps the number, so logs still show what the other side meant.

use std::fmt;

/// Why a stream or connection was closed by Anchorage (QUIC application error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Normal closure; nothing went wrong.
    NoError = 0,
    /// A frame could not be decoded: bad postcard, unknown variant, trailing bytes.
    BadFrame = 1,
    /// The peer speaks a protocol version this side does not support.
    UnsupportedVersion = 2,
    /// The peer is not authenticated for what it asked (no or unknown client certificate).
    Unauthenticated = 3,
    /// The device's certificate was revoked; the connection is closed and will be refused.
    Revoked = 4,
    /// Pairing failed: wrong code, expired, burned or rejected. The reason travels in-band.
    PairingFailed = 5,
    /// The peer is over a limit (streams, invocations, handshakes); try again later.
    Overloaded = 6,
    /// The peer is shutting down cleanly.
    ShuttingDown = 7,
    /// A well-formed message arrived where the protocol does not allow it.
    ProtocolViolation = 8,
    /// A frame's length prefix exceeds the maximum frame size.
    FrameTooLarge = 9,
    /// The peer failed internally; details are in its logs, not on the wire.
    Internal = 10,
    /// The certificate expired; only renewal is served on this connection.
    CertificateExpired = 11,
    /// A newer connection from the same device replaced this one.
    Replaced = 12,
    /// The device was removed by an operator.
    Removed = 13,
    /// A message a step of the protocol waits for did not arrive in time.
    Timeout = 14,
    /// The mesh policy does not allow this peer (or no longer does).
    NotAllowed = 15,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::NoError,
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthenticated,
        ErrorCode::Revoked,
        ErrorCode::PairingFailed,
        ErrorCode::Overloaded,
        ErrorCode::ShuttingDown,
        ErrorCode::ProtocolViolation,
        ErrorCode::FrameTooLarge,
        ErrorCode::Internal,
        ErrorCode::CertificateExpired,
        ErrorCode::Replaced,
        ErrorCode::Removed,
        ErrorCode::Timeout,
        ErrorCode::NotAllowed,
    ];

    /// The code as sent on the wire.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code for a number received from a peer, if this side knows it.
    pub fn from_u32(code: u32) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.as_u32() == code)
    }

    /// A short, stable, snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::NoError => "no_error",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Revoked => "revoked",
            ErrorCode::PairingFailed => "pairing_failed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::CertificateExpired => "certificate_expired",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Removed => "removed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotAllowed => "not_allowed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u32())
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        code.as_u32()
    }
}
