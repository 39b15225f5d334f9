//! quinn transport settings for lossy links, as named constants.
//!
//! Nodes live behind NATs that forget idle UDP mappings (the shortest common timeouts are about
//! 30 s; RFC 4787 asks for at least two minutes), on links that lose packets in bursts. A
//! node's heartbeats (every 15 s by default) keep its mapping to the anchor; its QUIC
//! keep-alive is a safety net under 30 s for longer heartbeat intervals, and the short
//! [`KEEP_ALIVE_INTERVAL`] only serves where something must answer often: between nodes (a
//! punched path), and towards an anchor when the node knows another to fail over to (it gives
//! up on an anchor silent for 6 s). Both sides allow a long idle timeout so a few seconds of
//! total loss does not drop the connection; a half-open path is still detected within
//! [`IDLE_TIMEOUT`].

use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

/// A keep-alive this often when nothing was received: between nodes, and from a node to an
/// anchor when it knows another anchor (its silence watch needs an answer every few seconds).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A node's keep-alive towards its only anchor: under the 30 s of the shortest NAT timeouts,
/// above the default heartbeat interval (15 s, ±10 %), so with the defaults it never fires and
/// a heartbeat is the only packet a node sends (and QUIC's ACK the only one it receives).
pub const NODE_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(25);
/// A connection with no packet from the peer for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Bytes of received datagrams buffered before the oldest are dropped.
pub const DATAGRAM_RECEIVE_BUFFER: usize = 64 * 1024;
/// Bytes of outgoing datagrams buffered before the oldest are dropped.
pub const DATAGRAM_SEND_BUFFER: usize = 64 * 1024;
/// Bidirectional streams a node accepts at once from the anchor (invocations).
pub const NODE_MAX_INCOMING_STREAMS: u32 = 128;
/// Bidirectional streams the anchor accepts at once from a node (control, spare).
pub const ANCHOR_MAX_INCOMING_STREAMS: u32 = 4;
/// Per-stream receive window: invocation payloads are at most a few hundred KiB.
pub const STREAM_RECEIVE_WINDOW: u32 = 512 * 1024;
/// Connection-wide receive window.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Transport settings for the anchor's side of every connection.
pub fn anchor_transport() -> TransportConfig {
    let mut t = common();
    t.max_concurrent_bidi_streams(VarInt::from_u32(ANCHOR_MAX_INCOMING_STREAMS));
    // The anchor relies on the nodes' keep-alives; a thousand nodes need no pings from it.
    t.keep_alive_interval(None);
    // No segmentation offload: quinn keeps each connection's transmit buffer at the largest
    // batch it ever sent, up to 10 datagrams (about 14 KiB, a third of what a connected node
    // cost the anchor at 10,000, left by the handshake's flight). What the anchor sends a node
    // is a packet or two at a time (ACKs, invocations), which gain nothing from a batch.
    t.enable_segmentation_offload(false);
    // No path MTU discovery from the anchor's side: its probes (up to 1,452 bytes) grow each
    // connection's transmit buffer from 1,200 bytes to 2,400 (a `Vec` doubling), 1.2 KB per
    // node held for the connection's life, and repeat every ten minutes per node. The anchor
    // sends nodes ACKs, invocations and directories, a packet or two at a time; relayed
    // traffic is held to `node_bytes_per_sec` per node before packet size matters. Each node
    // still discovers its own path MTU for what it sends (results, relayed data).
    t.mtu_discovery_config(None);
    t
}

/// Transport settings for a node's (client's) side, with [`NODE_KEEP_ALIVE_INTERVAL`].
pub fn node_transport() -> TransportConfig {
    node_transport_with(NODE_KEEP_ALIVE_INTERVAL)
}

/// Transport settings for a node's side with a keep-alive of `keep_alive`.
pub fn node_transport_with(keep_alive: Duration) -> TransportConfig {
    let mut t = common();
    t.max_concurrent_bidi_streams(VarInt::from_u32(NODE_MAX_INCOMING_STREAMS));
    t.keep_alive_interval(Some(keep_alive));
    t
}

/// Bidirectional streams a node accepts at once from one peer (calls and tunnels).
pub const PEER_MAX_INCOMING_STREAMS: u32 = 256;

/// Transport settings for both sides of a connection between two nodes: each keeps it alive
/// (either may be behind a NAT), and each accepts calls and tunnels.
pub fn peer_transport() -> TransportConfig {
    let mut t = common();
    t.max_concurrent_bidi_streams(VarInt::from_u32(PEER_MAX_INCOMING_STREAMS));
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t
}

fn common() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(idle_timeout()));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t.send_window(u64::from(CONNECTION_RECEIVE_WINDOW));
    t
}

fn idle_timeout() -> IdleTimeout {
    // 40 s in milliseconds fits a VarInt by a wide margin.
    IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT.as_millis() as u32))
}
