//! Typed, length-prefixed frames over quinn streams.
//!
//! [`FramedRecv::recv`] reads the 4-byte header, checks the announced length against the
//! maximum frame size *before* allocating the body, decodes strictly and validates field
//! limits. Every failure carries the [`ErrorCode`] the stream or connection should be closed
//! with. Reads and writes are not cancel-safe: a frame half read or half written when the
//! future is dropped leaves the stream out of sync, so callers close it.

use std::marker::PhantomData;

use anchorage_wire::frame::{HEADER_LEN, body_len, decode_body, encode_frame};
use anchorage_wire::limits::MAX_FRAME_LEN;
use anchorage_wire::{ErrorCode, FrameError, LimitError, Message};
use quinn::{ReadExactError, RecvStream, SendStream, VarInt};

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer sent a bad frame.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The peer sent a field over the protocol limits.
    #[error("message over the protocol limits: {0}")]
    Limit(#[from] LimitError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended mid-frame")]
    Truncated,
    /// Reading failed (connection lost, stream reset).
    #[error("read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed (connection lost, stream stopped).
    #[error("write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Finishing the stream failed.
    #[error("stream already closed")]
    Closed(#[from] quinn::ClosedStream),
}

impl StreamError {
    /// The application error code to close the stream or connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            StreamError::Frame(e) => e.code(),
            StreamError::Limit(_) | StreamError::Truncated => ErrorCode::BadFrame,
            StreamError::Read(_) | StreamError::Write(_) | StreamError::Closed(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// Whether the error came from the peer's bytes (as opposed to the connection failing).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            StreamError::Frame(_) | StreamError::Limit(_) | StreamError::Truncated
        )
    }
}

/// Receives frames of type `T`.
#[derive(Debug)]
pub struct FramedRecv<T> {
    inner: RecvStream,
    max: usize,
    _msg: PhantomData<fn() -> T>,
}

/// Sends frames of type `T`.
#[derive(Debug)]
pub struct FramedSend<T> {
    inner: SendStream,
    _msg: PhantomData<fn(T)>,
}

impl<T: Message> FramedRecv<T> {
    /// Wraps a receive stream with the default maximum frame size.
    pub fn new(inner: RecvStream) -> Self {
        Self::with_limit(inner, MAX_FRAME_LEN)
    }

    /// Wraps a receive stream refusing frames over `max` bytes.
    pub fn with_limit(inner: RecvStream, max: usize) -> Self {
        Self {
            inner,
            max,
            _msg: PhantomData,
        }
    }

    /// The next message, or `None` when the peer finished the stream cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<T>, StreamError> {
        let mut header = [0u8; HEADER_LEN];
        match self.inner.read_exact(&mut header).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(ReadExactError::FinishedEarly(_)) => return Err(StreamError::Truncated),
            Err(ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let len = body_len(header, self.max)?;
        let mut body = vec![0u8; len];
        match self.inner.read_exact(&mut body).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(_)) => return Err(StreamError::Truncated),
            Err(ReadExactError::ReadError(e)) => return Err(e.into()),
        }
        let msg: T = decode_body(&body)?;
        msg.validate()?;
        Ok(Some(msg))
    }

    /// Like [`recv`](Self::recv), but a clean end of stream is [`StreamError::Truncated`].
    pub async fn recv_required(&mut self) -> Result<T, StreamError> {
        self.recv().await?.ok_or(StreamError::Truncated)
    }

    /// Tells the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: ErrorCode) {
        let _ = self.inner.stop(VarInt::from_u32(code.as_u32()));
    }

    /// The underlying stream.
    pub fn into_inner(self) -> RecvStream {
        self.inner
    }
}

impl<T: Message> FramedSend<T> {
    /// Wraps a send stream.
    pub fn new(inner: SendStream) -> Self {
        Self {
            inner,
            _msg: PhantomData,
        }
    }

    /// Writes one message as a frame.
    pub async fn send(&mut self, msg: &T) -> Result<(), StreamError> {
        let bytes = encode_frame(msg)?;
        self.inner.write_all(&bytes).await?;
        Ok(())
    }

    /// Finishes the stream cleanly after what was written.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        self.inner.finish()?;
        Ok(())
    }

    /// Waits until the peer acknowledged everything written after [`finish`](Self::finish), or
    /// stopped the stream. Use with a timeout.
    pub async fn stopped(&mut self) {
        let _ = self.inner.stopped().await;
    }

    /// Abandons the stream with `code`.
    pub fn reset(&mut self, code: ErrorCode) {
        let _ = self.inner.reset(VarInt::from_u32(code.as_u32()));
    }

    /// The underlying stream.
    pub fn into_inner(self) -> SendStream {
        self.inner
    }
}

/// Wraps both halves of a bidirectional stream: sends `Out`, receives `In`.
pub fn framed<Out: Message, In: Message>(
    send: SendStream,
    recv: RecvStream,
) -> (FramedSend<Out>, FramedRecv<In>) {
    (FramedSend::new(send), FramedRecv::new(recv))
}

/// Closes `conn` with an Anchorage error code and a short reason.
pub fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(VarInt::from_u32(code.as_u32()), reason.as_bytes());
}

/// The Anchorage error code a connection was closed with by the peer, if any.
pub fn close_code(err: &quinn::ConnectionError) -> Option<u32> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            Some(u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX))
        }
        _ => None,
    }
}
