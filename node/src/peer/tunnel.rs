//! TCP carried over peer streams: one QUIC stream per TCP connection, with backpressure
//! (each side writes only as fast as the other reads: QUIC flow control on one side, TCP's on
//! the other) and clean half-close (a TCP end of file finishes the QUIC send side, a finished
//! QUIC stream shuts the TCP write side down).

use std::net::SocketAddr;
use std::sync::Arc;

use anchorage_wire::DeviceId;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{PeerError, Peers};

/// Copies both ways between `tcp` and a peer stream until both directions ended.
pub async fn splice(tcp: TcpStream, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = tcp.set_nodelay(true);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let up = async {
        match tokio::io::copy(&mut tcp_read, &mut send).await {
            Ok(_) => {
                let _ = send.finish();
            }
            Err(e) => {
                debug!(error = %e, "tunnel: the TCP side failed");
                let _ = send.reset(quinn::VarInt::from_u32(0));
            }
        }
    };
    let down = async {
        match tokio::io::copy(&mut recv, &mut tcp_write).await {
            Ok(_) => {
                let _ = tcp_write.shutdown().await;
            }
            Err(e) => {
                debug!(error = %e, "tunnel: the peer stream failed");
                let _ = recv.stop(quinn::VarInt::from_u32(0));
            }
        }
    };
    tokio::join!(up, down);
}

/// Listens on `listen` and carries every TCP connection to `service` on `peer`, until the
/// returned task is aborted. Binding happens before this returns, so a busy port is an error
/// the caller sees.
pub async fn connect_listener(
    peers: Arc<Peers>,
    peer: DeviceId,
    service: String,
    listen: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), PeerError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| PeerError::Unreachable(format!("cannot listen on {listen}: {e}")))?;
    let bound = listener.local_addr().unwrap_or(listen);
    info!(%bound, %peer, %service, "carrying TCP connections to a peer's service");
    let task = tokio::spawn(async move {
        loop {
            let (tcp, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "tunnel listener failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (peers, service) = (peers.clone(), service.clone());
            tokio::spawn(async move {
                match peers.open_tunnel(peer, &service).await {
                    Ok((send, recv)) => splice(tcp, send, recv).await,
                    Err(e) => {
                        warn!(%from, %peer, %service, error = %e, "cannot open the tunnel");
                        // Dropping the TCP stream closes it: the client sees the failure.
                    }
                }
            });
        }
    });
    Ok((bound, task))
}
