//! The anchor's services, built once by [`crate::Anchor`] and passed to every IO driver.
//!
//! Each service owns its state: [`Trust`] (codes, requests, devices, tokens, revocations,
//! audit), [`NodeTable`] (the one record of each node), [`Invocations`], the [`EventBus`],
//! the [`History`] of each device and the [`Metrics`]. `Services` only holds them with what
//! they share (configuration, clock, where the anchor is reachable) and the task tracker that
//! owns every task the drivers spawn.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anchorage_mesh::tls::ServerCertResolver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::admission::Limiter;
use crate::clock::Clock;
use crate::config::AnchorConfig;
use crate::events::EventBus;
use crate::history::History;
use crate::invocations::Invocations;
use crate::metrics::Metrics;
use crate::nodes::NodeTable;
use crate::policy::{PolicyFeed, PolicyVersion};
use crate::records::BatchRecord;
use crate::store::{Stores, Writer};
use crate::trust::Trust;

/// Every service of one anchor.
#[derive(Debug)]
pub struct Services {
    /// The validated configuration.
    pub config: AnchorConfig,
    /// Where "now" comes from.
    pub clock: Clock,
    /// The store backend.
    pub stores: Stores,
    /// Trust state and decisions.
    pub trust: Trust,
    /// Who is registered and connected.
    pub nodes: NodeTable,
    /// Unfinished invocations.
    pub invocations: Invocations,
    /// Announced changes.
    pub events: Arc<EventBus>,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Each device's link and presence over the last hours.
    pub history: History,
    /// The anchor's TLS certificate, renewed in place.
    pub server_cert: Arc<ServerCertResolver>,
    /// Owns every task spawned for the anchor.
    pub tasks: TaskTracker,
    /// Cancelled at shutdown.
    pub cancel: CancellationToken,
    /// Unix ms at start-up.
    pub started_at_ms: u64,
    /// Who may try to pair how often.
    pub pairing_limiter: Mutex<Limiter>,
    /// The ordered writer of runtime state (shared with the node table and invocations).
    pub writer: Writer,
    /// Batches unfinished at the last stop, until the anchor serves and resumes them.
    pub unfinished_batches: Mutex<Vec<BatchRecord>>,
    /// This anchor's id in the inventory's instances (new at every start).
    pub instance_id: String,
    /// The state of its announcement: `local`, `held`, or `lost` (the last renewal failed).
    pub lease: Mutex<&'static str>,
    /// Where nodes dial every live anchor of the cluster (this one's own first), refreshed at
    /// each announcement; sessions tell their node whenever it changes.
    pub anchors: tokio::sync::watch::Sender<Vec<String>>,
    /// The mesh policy in force.
    pub policy: PolicyFeed,
    /// The rendezvous and relay of the peer mesh, and what nodes report about it.
    pub mesh: crate::mesh::Mesh,
    /// Settings a configuration reload changes while running (retention).
    pub live: crate::config::LiveSettings,
    bound: Mutex<(Option<SocketAddr>, Option<SocketAddr>)>,
}

impl Services {
    /// Assembles the services.
    #[allow(clippy::too_many_arguments)] // the composition root's one call
    pub fn new(
        config: AnchorConfig,
        clock: Clock,
        stores: Stores,
        trust: Trust,
        nodes: NodeTable,
        invocations: Invocations,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
        server_cert: Arc<ServerCertResolver>,
        writer: Writer,
        unfinished_batches: Vec<BatchRecord>,
        instance_id: String,
        history: History,
    ) -> Services {
        let mesh = crate::mesh::Mesh::new(config.relay_limits, clock, &metrics);
        Services {
            started_at_ms: clock.now_ms(),
            pairing_limiter: Mutex::new(Limiter::new(config.pairing_limits, clock.now_ms())),
            live: crate::config::LiveSettings::new(&config),
            config,
            clock,
            stores,
            trust,
            nodes,
            invocations,
            events,
            metrics,
            history,
            server_cert,
            writer,
            unfinished_batches: Mutex::new(unfinished_batches),
            instance_id,
            lease: Mutex::new("local"),
            anchors: tokio::sync::watch::Sender::new(Vec::new()),
            policy: PolicyFeed::new(PolicyVersion::default_empty()),
            mesh,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            bound: Mutex::new((None, None)),
        }
    }

    /// Spawns a task owned by the anchor: shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Spawns a task owned by the anchor that is also aborted when the returned handle drops
    /// (a helper of another task that must not outlive it).
    pub fn spawn_scoped<F>(&self, task: F) -> AbortOnDropHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        AbortOnDropHandle::new(self.tasks.spawn(task))
    }

    /// Records the addresses the anchor is reachable at (for QR codes and the inventory).
    pub fn set_bound(&self, quic: Option<SocketAddr>, console: Option<SocketAddr>) {
        let mut b = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        if quic.is_some() {
            b.0 = quic;
        }
        if console.is_some() {
            b.1 = console;
        }
    }

    /// The bound QUIC and console addresses, where bound.
    pub fn bound(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        *self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bound QUIC address, if bound.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The address put into QR codes: configured, else the bound QUIC address (with this
    /// host's name when bound to all interfaces).
    pub fn public_addr(&self) -> String {
        if let Some(a) = &self.config.public_addr {
            return a.clone();
        }
        let bound = self.quic_addr().unwrap_or(self.config.listen);
        if bound.ip().is_unspecified() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}:{}", bound.port())
        } else {
            bound.to_string()
        }
    }
}
