//! The node host of Anchorage (`anchor-node`).
//!
//! - [`pair`]: the pairing client (code → certificate).
//! - [`agent`]: the connection keeper: registration, heartbeats, invocations, renewal.
//! - [`capability`]: built-in and operator-defined capabilities.
//! - [`state`]: the state directory (key, certificate, CA, pending pairing, live status).
//! - [`config`]: the node's TOML configuration.

pub mod agent;
pub mod capability;
pub mod config;
pub mod pair;
pub mod state;

use std::net::SocketAddr;

/// Resolves `host:port` to one address (the first the system returns).
pub async fn resolve(anchor: &str) -> Result<SocketAddr, String> {
    match tokio::net::lookup_host(anchor).await {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{anchor} resolved to no address")),
        Err(e) => Err(format!("cannot resolve {anchor}: {e} (expected HOST:PORT)")),
    }
}

/// A client endpoint on a real UDP socket of the same family as `anchor`.
pub fn client_endpoint(anchor: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if anchor.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
}

/// Builds the capability registry from the node config.
pub fn registry(
    facts: capability::NodeFacts,
    config: &config::NodeConfig,
) -> Result<capability::Registry, String> {
    let mut registry = capability::Registry::builtins(facts);
    if config.desktop.open_url {
        let opener = if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        registry.add(std::sync::Arc::new(capability::OpenUrl {
            opener: opener.into(),
        }));
    }
    for (name, spec) in &config.capabilities {
        registry.add(std::sync::Arc::new(capability::CommandCap::new(
            name.clone(),
            spec.clone(),
        )?));
    }
    Ok(registry)
}
