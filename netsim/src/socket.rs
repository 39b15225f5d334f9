//! [`SimSocket`]: a socket on a simulated host, implementing quinn's [`AsyncUdpSocket`].

use std::fmt;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::time::Instant;

use crate::network::{HostId, Inner, SocketId};

/// Most segments a single transmit may carry (GSO). Quinn never asks for more than 10.
pub const MAX_GSO_SEGMENTS: usize = 10;

/// A UDP socket on a simulated host.
///
/// Implements quinn's [`AsyncUdpSocket`], so `quinn::Endpoint::new_with_abstract_socket`
/// runs on it (see [`Host::endpoint`](crate::Host::endpoint)); [`send_to`](Self::send_to) and
/// [`recv_from`](Self::recv_from) serve tests that speak raw UDP.
///
/// Sending never blocks and never fails for network reasons: a datagram the network drops is
/// counted, not reported, as with real UDP. Segmented transmits (GSO) of up to
/// [`MAX_GSO_SEGMENTS`] are split into one datagram per `segment_size` bytes, each with its
/// own fate on the link. Each received datagram fills one buffer and one [`RecvMeta`]
/// (no GRO); a datagram larger than the buffer offered for it is dropped and counted as
/// [`Drops::truncated`](crate::Drops::truncated). The socket's port is released on drop.
pub struct SimSocket {
    net: Arc<Inner>,
    id: SocketId,
    host: HostId,
}

impl SimSocket {
    pub(crate) fn new(net: Arc<Inner>, id: SocketId, host: HostId) -> Self {
        Self { net, id, host }
    }

    /// The socket's current address (its host's address changes on rebind).
    pub fn addr(&self) -> SocketAddr {
        self.net
            .lock()
            .socket_addr(self.id)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The host this socket belongs to.
    pub fn host(&self) -> HostId {
        self.host
    }

    /// Sends one datagram to `dest`. Never blocks; the network may drop it.
    pub fn send_to(&self, data: &[u8], dest: SocketAddr) -> io::Result<()> {
        self.try_send(&Transmit {
            destination: dest,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        })
    }

    /// Receives one datagram into `buf`, returning its length and source address.
    ///
    /// Cancel-safe: a datagram is only taken from the socket when this returns. A datagram
    /// longer than `buf` is dropped and counted as truncated.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut meta = [RecvMeta::default()];
        let mut bufs = [IoSliceMut::new(buf)];
        poll_fn(|cx| self.poll_recv(cx, &mut bufs, &mut meta)).await?;
        Ok((meta[0].len, meta[0].addr))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let contents = transmit.contents;
        let segment = match transmit.segment_size {
            None => contents.len().max(1),
            Some(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "netsim: GSO segment size of 0",
                ));
            }
            Some(size) => size,
        };
        if contents.len().div_ceil(segment) > MAX_GSO_SEGMENTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "netsim: transmit of {} bytes in {segment}-byte segments exceeds {MAX_GSO_SEGMENTS} segments",
                    contents.len()
                ),
            ));
        }
        let now = Instant::now();
        let mut wake = false;
        {
            let mut state = self.net.lock();
            if contents.is_empty() {
                wake |= state.send(now, self.id, transmit.destination, transmit.ecn, contents);
            }
            for datagram in contents.chunks(segment) {
                wake |= state.send(now, self.id, transmit.destination, transmit.ecn, datagram);
            }
        }
        if wake {
            self.net.wake_router();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.net.lock().recv(self.id, cx, bufs, meta).map(Ok)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr())
    }

    fn max_transmit_segments(&self) -> usize {
        MAX_GSO_SEGMENTS
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        // Datagrams over the MTU are dropped, never fragmented: quinn may probe the path MTU.
        false
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        self.net.lock().unbind(self.id);
    }
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("addr", &self.addr())
            .field("host", &self.host)
            .finish()
    }
}

/// The simulated network never pushes back on senders: full queues drop instead.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
