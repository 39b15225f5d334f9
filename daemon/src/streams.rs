//! Streams a peer opens that the protocol does not expect.
//!
//! A node opens exactly one bidirectional stream per connection (the bootstrap or the control
//! stream) and no unidirectional ones (the transport allows none). Any further stream is
//! refused at once with `PROTOCOL_VIOLATION` (8), both directions, so whatever it carries is
//! not buffered (docs/protocol.md, §12).

use std::sync::Arc;

use anchorage_wire::ErrorCode;
use quinn::VarInt;

use crate::metrics::Metrics;

/// Refuses one unexpected stream.
pub fn refuse(metrics: &Metrics, (mut send, mut recv): (quinn::SendStream, quinn::RecvStream)) {
    let code = VarInt::from_u32(ErrorCode::ProtocolViolation.as_u32());
    let _ = send.reset(code);
    let _ = recv.stop(code);
    metrics.stream_refused();
}

/// Refuses every further bidirectional stream on `conn` until it closes.
pub async fn refuse_further(metrics: Arc<Metrics>, conn: quinn::Connection) {
    while let Ok(stream) = conn.accept_bi().await {
        tracing::debug!("refused an unexpected stream");
        refuse(&metrics, stream);
    }
}
