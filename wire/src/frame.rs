//! Length-prefixed postcard frames.
//!
//! A frame is a 4-byte big-endian body length followed by the postcard encoding of one message.
//! The length is checked against a maximum before any buffer is sized for the body, so a peer
//! cannot make us allocate by announcing a huge frame. Decoding is strict: the body must decode
//! to exactly one message with no bytes left over.
//!
//! [`decode_frame`] works on a byte slice and tells "need more bytes" ([`Decoded::NeedMore`])
//! apart from "this is wrong" ([`FrameError`]). [`FrameDecoder`] keeps a buffer for callers that
//! receive bytes in arbitrary chunks.

use serde::{Serialize, de::DeserializeOwned};

use crate::{ErrorCode, limits::MAX_FRAME_LEN};

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the maximum frame size.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced (or, when encoding, actual) body length.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The body is not a valid postcard encoding of the expected message.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The body decoded to a message but bytes were left over.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The message could not be serialized (only on encode; a bug in the caller).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

impl FrameError {
    /// The application error code a connection or stream is closed with for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) | FrameError::TrailingBytes(_) => ErrorCode::BadFrame,
            FrameError::Encode(_) => ErrorCode::Internal,
        }
    }
}

/// The outcome of trying to decode a frame from the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole frame was decoded.
    Frame {
        /// The message.
        msg: T,
        /// Bytes of the buffer the frame used (header and body).
        consumed: usize,
    },
    /// The buffer holds only part of a frame; at least this many bytes in total are needed.
    NeedMore {
        /// Total buffer length required before decoding can progress.
        at_least: usize,
    },
}

/// Encodes `msg` as one frame: length prefix then postcard body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    encode_frame_with_limit(msg, MAX_FRAME_LEN)
}

/// Encodes `msg` as one frame, refusing bodies longer than `max`.
pub fn encode_frame_with_limit<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER_LEN])
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // `len <= max <= u32::MAX` for every limit in this crate; the conversion cannot truncate.
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..HEADER_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Reads the body length from a frame header, checking it against `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes exactly one message from a complete frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    decode_exact(body)
}

/// Decodes exactly one postcard message from `bytes` (a frame body or a datagram).
pub fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Decodes one frame from the front of `buf`, with the default maximum frame size.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Decoded<T>, FrameError> {
    decode_frame_with_limit(buf, MAX_FRAME_LEN)
}

/// Decodes one frame from the front of `buf`, refusing bodies longer than `max`.
pub fn decode_frame_with_limit<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Decoded<T>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::NeedMore {
            at_least: HEADER_LEN,
        });
    };
    let len = body_len(*header, max)?;
    // Saturating: with a caller-chosen `max` near `usize::MAX` (32-bit targets) the sum could
    // wrap; a saturated total simply never arrives.
    let total = HEADER_LEN.saturating_add(len);
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(Decoded::NeedMore { at_least: total });
    };
    let msg = decode_body(body)?;
    Ok(Decoded::Frame {
        msg,
        consumed: total,
    })
}

/// An incremental decoder for a byte stream of frames.
///
/// Feed it bytes as they arrive with [`push`](Self::push); take messages with
/// [`next`](Self::next). A header announcing a frame over the limit is refused as soon as it
/// arrives, before the body is buffered.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    failed: bool,
    /// Offset in `buf` of the first header not yet known to be complete and within `max`.
    /// Every frame before it is whole in `buf`, so `next` never sees an unchecked header.
    checked: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder refusing bodies longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            failed: false,
            checked: 0,
        }
    }

    /// Appends received bytes. Returns an error, and keeps failing, once the buffered bytes
    /// announce a frame over the limit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Malformed("decoder already failed".into()));
        }
        self.buf.extend_from_slice(bytes);
        // Check every header that has arrived, not only the first: a caller that pushes several
        // chunks before draining must not buffer an oversize frame's body behind whole frames.
        while let Some(header) = self.buf.get(self.checked..).and_then(<[u8]>::first_chunk) {
            match body_len(*header, self.max) {
                Ok(len) => {
                    let end = self.checked.saturating_add(HEADER_LEN).saturating_add(len);
                    if end > self.buf.len() {
                        break;
                    }
                    self.checked = end;
                }
                Err(e) => {
                    self.fail();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes the next whole message, `Ok(None)` if more bytes are needed.
    ///
    /// After an error the stream is out of sync; the caller must close it.
    #[allow(
        clippy::should_implement_trait,
        reason = "generic over the message type per call, so it cannot be an Iterator"
    )]
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.failed {
            return Err(FrameError::Malformed("decoder already failed".into()));
        }
        match decode_frame_with_limit(&self.buf, self.max) {
            Ok(Decoded::Frame { msg, consumed }) => {
                self.buf.drain(..consumed);
                self.checked = self.checked.saturating_sub(consumed);
                Ok(Some(msg))
            }
            Ok(Decoded::NeedMore { .. }) => Ok(None),
            Err(e) => {
                self.fail();
                Err(e)
            }
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The stream is out of sync for good: drop what is buffered and refuse everything.
    fn fail(&mut self) {
        self.failed = true;
        self.buf = Vec::new();
        self.checked = 0;
    }
}
