//! Anchorage's harness: everything that runs the system for a test, a benchmark or a first look,
//! in one place and outside the production crates.
//!
//! - [`fleet`]: the simulated fleet. A real anchor and real node agents
//!   ([`anchorage_node::run`]) on an in-process netsim network, usually on tokio's paused
//!   clock: [`Sim`], [`SimNode`], [`RunningAgent`].
//! - [`demo`]: `anchord demo`, a fleet on the real clock behind a live console; the
//!   `anchord-demo` binary runs it, and `anchord demo` executes that binary.
//! - [`procs`]: the real binaries as child processes (located and rebuilt, output read,
//!   waited for, stopped), for end-to-end tests and benchmarks.
//! - [`prom`]: a strict parser of the Prometheus text format, to read `/metrics`.
//!
//! The production daemon depends on none of this (nor on the node or netsim crates).

pub mod demo;
pub mod etcd;
pub mod fleet;
pub mod procs;
pub mod prom;

pub use fleet::{RunningAgent, Sim, SimError, SimNode, eventually, lossy};
