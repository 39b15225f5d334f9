//! The node's mesh socket: one UDP socket, one quinn endpoint, for the anchor and for peers.
//!
//! # Design
//!
//! A node talks to its anchor and to its peers from the same UDP port, so the NAT mapping
//! the anchor observes is the one peers punch to. Like iroh's magicsock, [`MeshSocket`] sits
//! between quinn and the real socket and gives quinn one stable, made-up address per peer
//! ([`MeshSocket::peer_addr`]); quinn connects to that address and never learns which real
//! path carries a packet, so a switch between paths is invisible to the connection: no QUIC
//! migration, no lost stream.
//!
//! - **Made-up addresses** are IPv4 from 240.0.0.0/4 (reserved, never routed) with port 1,
//!   given out from a counter and never reused. IPv4 because quinn refuses IPv6 destinations
//!   on an IPv4 socket; on a dual-stack socket they are reported IPv4-mapped, as quinn
//!   reports every IPv4 address there, and accepted in either form.
//! - **Sending**: a destination that is not made-up (the anchor) goes to the real socket
//!   unchanged. A made-up one goes to the peer's direct address if a direct path is alive
//!   (the whole transmit, GSO segments kept), else through the relay
//!   ([`MeshSocket::set_relay`]), one [`RelayPacket`](anchorage_wire::peer::RelayPacket) per
//!   segment, else nowhere. Sending never blocks on the relay: a full channel drops the
//!   packet, as a full UDP queue would, and quinn's loss recovery resends.
//! - **Receiving**: relayed packets ([`MeshSocket::relay_received`]) wait in a bounded inbox
//!   and reach quinn as from the sender's made-up address. Datagrams from the real socket are
//!   looked at one by one (each GRO segment): probes are consumed here and never reach quinn;
//!   a datagram from a known address of a peer gets the peer's made-up address as its source;
//!   anything else (the anchor, strangers) passes unchanged.
//! - **Probes** ([`Probe`](anchorage_wire::peer::Probe)) carry the pair's token from the
//!   anchor's rendezvous. A ping from a known peer with its token is answered with a pong to
//!   where it came from, and that source becomes a candidate of the peer (peer-reflexive:
//!   how the fresh port of a symmetric NAT is learned), pinged back at once. A pong that
//!   answers one of our pings proves a direct path to that address, with its round-trip time.
//!   Anything else is ignored and counted.
//! - **Schedule** ([`paths`], on tokio's clock): after [`MeshSocket::set_candidates`] every
//!   candidate is pinged at 0, 100, 300 and 700 ms, then every second while there is no
//!   direct path, backing off to every 5 s while the relay carries the peer; the mesh keeps
//!   looking for a direct path for as long as it knows the peer. A direct path is pinged every
//!   2 s (which also keeps both NAT mappings open) and dies after 5 s without a pong
//!   ([`paths::PATH_TIMEOUT`]): packets fall back to the relay and punching starts again.
//!   Among live addresses the lowest round-trip time wins, but the chosen one stays until
//!   another is clearly faster, so the path does not flap.
//! - **Bounds**: [`paths::MAX_PEERS`] peers (the one unused longest goes),
//!   [`MAX_CANDIDATES`](anchorage_wire::peer::MAX_CANDIDATES) addresses per peer, learned ones
//!   included, [`paths::MAX_OUTSTANDING`] pings per peer awaiting a pong, [`RELAY_INBOX`]
//!   relayed packets waiting for quinn.
//!
//! The rules live in [`paths`], without IO (`now` passed in, tested beside them);
//! [`socket`] is the IO around them and one probing task ([`MeshSocket::start`]).
//!
//! A peer connection's server config should disable QUIC migration: the made-up address of a
//! peer never changes, and a datagram from an address the socket does not know as the peer's
//! must not move a connection to it.
//!
//! # What the NAT cases give
//!
//! Over netsim (`node/tests/mesh_socket.rs`), with both sides told each other's address as
//! an anchor observes it and punching at once:
//!
//! - No NAT (same network): direct within the first round trip of pings; the first QUIC
//!   packets may go through the relay, the rest go direct.
//! - Port-restricted cone × full cone, restricted cone × restricted cone, and
//!   port-restricted × port-restricted: direct within the burst (under 3 s), to the address
//!   the anchor observed. The first pings of one side are filtered by the other's NAT, which has not sent
//!   to it yet; its own pings open it, and the next round passes.
//! - Symmetric × symmetric: never direct (each side's NAT gives a fresh port towards the
//!   other, which the other cannot know, and filters the ports the other guesses). The
//!   connection runs relayed; probing goes on in the background every 5 s.
//! - A direct path that stops carrying packets (partition) falls back to the relay about
//!   [`paths::PATH_TIMEOUT`] later, and a relayed pair whose direct path opens goes direct at
//!   the next punch round (at most 5 s): both without failing a stream in flight.

pub mod paths;
pub mod socket;

pub use paths::{HEARTBEAT_INTERVAL, PATH_TIMEOUT, is_mesh_addr};
pub use socket::{MeshSocket, MeshSocketStats, PathInfo, RELAY_INBOX};
