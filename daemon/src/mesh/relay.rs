//! The relay stream's driver: one per node connection, the first extra bidirectional stream
//! the node opens, which must start with [`Relay::Hello`].
//!
//! Packets from the node go to [`Mesh::relay`](super::Mesh::relay), which forwards them to the
//! destination's bounded queue or drops them (like UDP would); this driver writes the node's
//! own queue onto its stream. The packets are never parsed: they are the peers' own QUIC.
//! A stream that does not start with `Hello`, or says something else than packets after it,
//! is reset with `PROTOCOL_VIOLATION`; the node's connection and control stream go on.

use std::sync::Arc;

use anchorage_mesh::DeviceId;
use anchorage_mesh::framed::framed;
use anchorage_wire::ErrorCode;
use anchorage_wire::peer::Relay;
use tokio::sync::mpsc;
use tracing::debug;

use super::RELAY_QUEUE;
use crate::nodes::SessionId;
use crate::services::Services;

/// Serves `stream` as `device`'s relay stream until it or the connection ends. Cancel-safe
/// to drop at any point (packets in flight are lost, as on UDP).
pub async fn serve(
    services: Arc<Services>,
    device: DeviceId,
    session: SessionId,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
) {
    let (mut tx, mut rx) = framed::<Relay, Relay>(send, recv);
    let refuse = |tx: &mut anchorage_mesh::framed::FramedSend<Relay>,
                  rx: &mut anchorage_mesh::framed::FramedRecv<Relay>| {
        tx.reset(ErrorCode::ProtocolViolation);
        rx.stop(ErrorCode::ProtocolViolation);
        services.metrics.stream_refused();
    };
    let first = tokio::select! {
        first = tokio::time::timeout(crate::session::REGISTER_TIMEOUT, rx.recv()) => first,
        () = services.cancel.cancelled() => return,
    };
    match first {
        Ok(Ok(Some(Relay::Hello))) => {}
        Ok(Ok(None)) | Ok(Err(_)) | Err(_) | Ok(Ok(Some(Relay::Packet(_)))) => {
            debug!("refused a stream that is no relay stream");
            refuse(&mut tx, &mut rx);
            return;
        }
    }
    let (queue, mut outgoing) = mpsc::channel(RELAY_QUEUE);
    if !services.mesh.relay_up(&device, session, queue) {
        return;
    }
    debug!("relay stream up");
    let reader = async {
        loop {
            match rx.recv().await {
                Ok(Some(Relay::Packet(p))) => {
                    let _ = services.mesh.relay(&services, &device, session, p);
                }
                Ok(Some(Relay::Hello)) => return true,
                Ok(None) => return false,
                Err(e) => return e.is_peer_fault(),
            }
        }
    };
    let writer = async {
        while let Some(p) = outgoing.recv().await {
            if tx.send(&Relay::Packet(p)).await.is_err() {
                break;
            }
        }
    };
    let violated = tokio::select! {
        violated = reader => violated,
        () = writer => false,
        () = services.cancel.cancelled() => false,
    };
    if violated {
        debug!("relay stream violated the protocol");
        tx.reset(ErrorCode::ProtocolViolation);
        rx.stop(ErrorCode::ProtocolViolation);
    }
}
