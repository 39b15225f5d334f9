//! The node host of Anchorage (`anchor-node`).
//!
//! - [`run`](mod@run): the one entry point, [`run()`]: a paired node from its configuration
//!   until shutdown. `anchor-node run` and the simulated fleet both call it.
//! - [`pair`]: the pairing client (code → certificate).
//! - [`agent`]: the connection keeper: registration, heartbeats, invocations, renewal,
//!   failover between anchors.
//! - [`anchors`]: the anchors a node knows and the order it tries them in (pure rules).
//! - [`mesh`]: the mesh socket: one UDP socket for the anchor and for peers, direct through
//!   NATs when it can be, relayed through the anchor when not.
//! - [`revoked`]: the mesh's revocation set as the node holds it (peers it refuses).
//! - [`capability`]: built-in and operator-defined capabilities, host facts.
//! - [`state`]: the state directory (key, certificate, CA, pending pairing, live status).
//! - [`config`]: the node's TOML configuration.

pub mod agent;
pub mod anchors;
pub mod api;
pub mod capability;
pub mod config;
mod copies;
pub mod invoke;
pub mod mesh;
pub mod pair;
pub mod peer;
pub mod revoked;
pub mod run;
pub mod state;
mod stats;

pub use anchors::{ResolveError, resolve, resolve_anchor, resolve_first};
pub use run::{RunConfig, RunError, client_endpoint, registry, run};
