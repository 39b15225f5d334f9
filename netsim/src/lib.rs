//! netsim: an in-process lossy UDP network for quinn, on tokio's clock.
//!
//! Every later test of Anchorage's pairing, presence and invocation runs on this crate. Real
//! quinn, real rustls and real protocol code run unchanged; only the wire between hosts is
//! simulated. Under `#[tokio::test(start_paused = true)]` the clock only moves when every task
//! is idle, so an hour of simulated traffic runs in seconds.
//!
//! ```no_run
//! # async fn demo(server_config: quinn::ServerConfig) -> std::io::Result<()> {
//! use anchorage_netsim::{LinkConfig, Network, Preset};
//!
//! let net = Network::new(7); // print the seed in failures; the same seed replays the run
//! let anchor = net.add_host("anchor"); // 10.0.0.1
//! let node = net.add_host("node"); // 10.0.0.2
//! net.set_link_both(anchor.id(), node.id(), LinkConfig::preset(Preset::Lte))
//!     .expect("presets are valid");
//! let server = anchor.endpoint(7444, Some(server_config))?;
//! let client = node.endpoint(0, None)?;
//! // client.connect(...) as with any quinn endpoint; then, mid-run:
//! net.partition(&[node.id()], &[anchor.id()]);
//! net.heal();
//! node.rebind(); // the node's NAT mapping changes
//! println!("{}", net.counters());
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`network`]: [`Network`], [`Host`] and the router task that delivers datagrams at their
//!   arrival time; faults (partitions, hosts down, rebinding) and counters.
//! - [`socket`]: [`SimSocket`], a host's socket, implementing quinn's `AsyncUdpSocket`.
//! - [`link`]: [`LinkConfig`], [`Loss`], [`Preset`] and the pure engine that decides the fate
//!   of each datagram (loss, queue, delay, reordering, duplication) from a seeded generator,
//!   given `now`. Shared by the network and the proxy.
//! - [`nat`]: [`NatConfig`] and its behaviours, [`NatCounters`], and the pure translation
//!   table behind [`Nat`] boxes ([`Network::add_nat`]).
//! - [`counters`]: [`Counters`], [`Drops`], [`HostCounters`].
//! - [`proxy`]: the same link conditions between real UDP sockets (`anchorage-netsim proxy`).
//! - `rng`: the seeded xoshiro256** generator; nothing in netsim uses another source of
//!   randomness.
//!
//! `docs/netsim.md` describes scenarios, presets, faults, seeds and the benchmark.

#![forbid(unsafe_code)]

pub mod counters;
pub mod link;
pub mod nat;
pub mod network;
pub mod proxy;
mod rng;
pub mod socket;

pub use counters::{Counters, Drops, HostCounters};
pub use link::{GilbertElliott, LinkConfig, LinkConfigError, Loss, Preset, PresetParseError};
pub use nat::{FilteringBehavior, MappingBehavior, NatConfig, NatCounters, NatDrops};
pub use network::{AddressError, Host, HostId, Nat, Network};
pub use proxy::{Proxy, ProxyConfig, ProxyCounters, ProxyError};
pub use socket::SimSocket;
