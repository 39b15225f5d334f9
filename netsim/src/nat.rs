//! NAT boxes: their configuration ([`NatConfig`]), their counters ([`NatCounters`]) and the
//! pure translation table behind them.
//!
//! The table takes `now` as an argument and never reads a clock: the network's router feeds it
//! each datagram that reaches a NAT and forwards what it returns. Behaviours follow RFC 4787's
//! terms (mapping and filtering behaviour, refresh direction, hairpinning), as Tailscale's
//! natlab and iroh's patchbay model them.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::AddAssign;
use std::time::Duration;

use tokio::time::Instant;

use crate::rng::Rng;

/// How long an idle mapping lives by default: 30 s, the UDP timeout of common home routers
/// (and of Linux conntrack for a flow that saw no reply stream).
pub const DEFAULT_MAPPING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle mapping lives in [`NatConfig::carrier_grade`]: 120 s, RFC 4787's minimum
/// recommended UDP timeout (REQ-5), which carrier-grade NATs tend to follow.
pub const CARRIER_GRADE_MAPPING_TIMEOUT: Duration = Duration::from_secs(120);
/// Lowest public port a NAT hands out; ports are drawn from here to 65535.
pub const FIRST_NAT_PORT: u16 = 1024;

/// Which public port a NAT gives to an outbound flow (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MappingBehavior {
    /// One public port per private address and port, whatever the destination: what the
    /// anchor observes is what every peer will see ("cone" NATs).
    EndpointIndependent,
    /// A new public port per destination address and port ("symmetric" NAT): the port the
    /// anchor observes is useless to a peer.
    EndpointDependent,
}

/// Which inbound datagrams a NAT lets through a live mapping (RFC 4787 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilteringBehavior {
    /// Any source may send to a live mapping ("full cone").
    EndpointIndependent,
    /// Only addresses the private host has sent to through this mapping, from any port
    /// ("restricted cone").
    AddressDependent,
    /// Only the exact addresses and ports the private host has sent to ("port-restricted
    /// cone"; also what symmetric NATs do).
    AddressAndPortDependent,
}

/// How a NAT box behaves. Build one from a preset and adjust fields.
///
/// The default is [`port_restricted_cone`](Self::port_restricted_cone), the common home router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// Which public port an outbound flow gets.
    pub mapping: MappingBehavior,
    /// Which inbound datagrams reach the private host.
    pub filtering: FilteringBehavior,
    /// A mapping, and each remote's permission to send through it, expire this long after
    /// their last refresh. Outbound datagrams always refresh.
    pub mapping_timeout: Duration,
    /// Whether an admitted inbound datagram also refreshes the mapping and its sender's
    /// permission. Off by default: keep-alives must then be sent from the inside, which is
    /// what a node behind an unknown NAT has to assume.
    pub refresh_on_inbound: bool,
    /// Whether a private host may reach another private host of the same NAT through the
    /// NAT's public address and the other's mapping. Without it such datagrams are dropped.
    pub hairpinning: bool,
    /// A firewall: when set, datagrams go out only to these addresses, and come in only from
    /// them (still subject to `filtering`); everything else is dropped as
    /// [`NatDrops::not_allowed`].
    pub allow_only: Option<Vec<IpAddr>>,
}

/// Datagrams a NAT translated and dropped. Plain `Copy` counters, comparable across runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatCounters {
    /// Datagrams from the inside sent on with the public source address.
    pub outbound: u64,
    /// Datagrams to a public port delivered to the private address behind it.
    pub inbound: u64,
    /// Of those, datagrams from the inside to the NAT's own public address, turned around
    /// (each also counts once in `outbound` and once in `inbound`).
    pub hairpinned: u64,
    /// Mappings created (a new public port given out).
    pub mappings_created: u64,
    /// Datagrams dropped, by cause.
    pub dropped: NatDrops,
}

/// Datagrams a NAT dropped, one field per cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatDrops {
    /// Inbound to a public port with no live mapping: never mapped, or expired.
    pub unmapped: u64,
    /// Inbound to a live mapping from a source the filtering behaviour refuses.
    pub filtered: u64,
    /// From the inside to the NAT's own public address while hairpinning is off.
    pub hairpin: u64,
    /// To or from an address outside a firewall's allow-list.
    pub not_allowed: u64,
    /// Outbound while every public port was taken by a live mapping.
    pub ports_exhausted: u64,
}

/// Why a NAT dropped a datagram; mirrors the fields of [`NatDrops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NatDrop {
    Unmapped,
    Filtered,
    Hairpin,
    NotAllowed,
    PortsExhausted,
}

/// Where a translated datagram goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Translated {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    /// True if it goes to the inside (inbound or hairpinned), false if out.
    pub(crate) inward: bool,
}

/// One NAT's mappings. Pure: `now` comes from the caller.
#[derive(Debug)]
pub(crate) struct NatTable {
    config: NatConfig,
    public_ip: IpAddr,
    rng: Rng,
    /// Flow key to public port.
    ports: HashMap<FlowKey, u16>,
    /// Public port to its mapping.
    mappings: HashMap<u16, Mapping>,
    counters: NatCounters,
}

/// What a mapping is keyed by: the private endpoint, plus the destination under
/// endpoint-dependent mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    private: SocketAddr,
    remote: Option<SocketAddr>,
}

#[derive(Debug)]
struct Mapping {
    key: FlowKey,
    refreshed: Instant,
    /// Remotes the inside sent to through this mapping, with the last refresh of each.
    permissions: HashMap<SocketAddr, Instant>,
}

/// Permissions kept per mapping before expired ones are swept.
const PERMISSIONS_BEFORE_SWEEP: usize = 32;
/// Random draws for a free public port before scanning for one.
const PORT_DRAWS: usize = 16;

impl NatConfig {
    /// Endpoint-independent mapping and filtering: once mapped, anyone can send in.
    pub fn full_cone() -> Self {
        Self {
            filtering: FilteringBehavior::EndpointIndependent,
            ..Self::port_restricted_cone()
        }
    }

    /// Endpoint-independent mapping, address-dependent filtering.
    pub fn restricted_cone() -> Self {
        Self {
            filtering: FilteringBehavior::AddressDependent,
            ..Self::port_restricted_cone()
        }
    }

    /// Endpoint-independent mapping, address-and-port-dependent filtering, 30 s timeout,
    /// outbound refresh only, no hairpinning: a common home router.
    pub fn port_restricted_cone() -> Self {
        Self {
            mapping: MappingBehavior::EndpointIndependent,
            filtering: FilteringBehavior::AddressAndPortDependent,
            mapping_timeout: DEFAULT_MAPPING_TIMEOUT,
            refresh_on_inbound: false,
            hairpinning: false,
            allow_only: None,
        }
    }

    /// Endpoint-dependent mapping with address-and-port-dependent filtering: a new public
    /// port per destination (some mobile carriers, some enterprise firewalls).
    pub fn symmetric() -> Self {
        Self {
            mapping: MappingBehavior::EndpointDependent,
            ..Self::port_restricted_cone()
        }
    }

    /// A carrier-grade NAT as RFC 6888 asks for: endpoint-independent mapping,
    /// address-and-port-dependent filtering, 120 s timeout, hairpinning on.
    pub fn carrier_grade() -> Self {
        Self {
            mapping_timeout: CARRIER_GRADE_MAPPING_TIMEOUT,
            hairpinning: true,
            ..Self::port_restricted_cone()
        }
    }

    /// A firewall (which also translates, as most do) that lets UDP out only to `allowed`,
    /// and in only as replies from it: the anchor is reachable, no peer is.
    pub fn firewall(allowed: IpAddr) -> Self {
        Self {
            allow_only: Some(vec![allowed]),
            ..Self::port_restricted_cone()
        }
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        Self::port_restricted_cone()
    }
}

impl NatDrops {
    /// All drops, whatever the cause.
    pub fn total(&self) -> u64 {
        self.unmapped + self.filtered + self.hairpin + self.not_allowed + self.ports_exhausted
    }

    fn record(&mut self, cause: NatDrop) {
        let field = match cause {
            NatDrop::Unmapped => &mut self.unmapped,
            NatDrop::Filtered => &mut self.filtered,
            NatDrop::Hairpin => &mut self.hairpin,
            NatDrop::NotAllowed => &mut self.not_allowed,
            NatDrop::PortsExhausted => &mut self.ports_exhausted,
        };
        *field += 1;
    }
}

impl AddAssign for NatDrops {
    fn add_assign(&mut self, o: Self) {
        self.unmapped += o.unmapped;
        self.filtered += o.filtered;
        self.hairpin += o.hairpin;
        self.not_allowed += o.not_allowed;
        self.ports_exhausted += o.ports_exhausted;
    }
}

impl AddAssign for NatCounters {
    fn add_assign(&mut self, o: Self) {
        self.outbound += o.outbound;
        self.inbound += o.inbound;
        self.hairpinned += o.hairpinned;
        self.mappings_created += o.mappings_created;
        self.dropped += o.dropped;
    }
}

impl fmt::Display for NatCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.dropped;
        write!(
            f,
            "outbound {}, inbound {}, hairpinned {}, mappings {}, dropped {} \
             [unmapped {}, filtered {}, hairpin {}, not-allowed {}, ports-exhausted {}]",
            self.outbound,
            self.inbound,
            self.hairpinned,
            self.mappings_created,
            d.total(),
            d.unmapped,
            d.filtered,
            d.hairpin,
            d.not_allowed,
            d.ports_exhausted
        )
    }
}

impl NatTable {
    pub(crate) fn new(config: NatConfig, public_ip: IpAddr, seed: u64) -> Self {
        Self {
            config,
            public_ip,
            rng: Rng::new(seed),
            ports: HashMap::new(),
            mappings: HashMap::new(),
            counters: NatCounters::default(),
        }
    }

    pub(crate) fn config(&self) -> &NatConfig {
        &self.config
    }

    pub(crate) fn counters(&self) -> NatCounters {
        self.counters
    }

    /// Mappings that have not expired at `now`.
    pub(crate) fn live_mappings(&self, now: Instant) -> usize {
        self.mappings
            .values()
            .filter(|m| self.live(m.refreshed, now))
            .count()
    }

    /// Forgets every mapping, as a router reboot does.
    pub(crate) fn flush(&mut self) {
        self.ports.clear();
        self.mappings.clear();
    }

    /// Translates a datagram that reached the NAT: from the inside (`from_inside`) to any
    /// address, or from the outside to the public address. Counts what it did.
    pub(crate) fn translate(
        &mut self,
        now: Instant,
        from_inside: bool,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Translated, NatDrop> {
        let result = self.translate_uncounted(now, from_inside, src, dst);
        if let Err(cause) = result {
            self.counters.dropped.record(cause);
        }
        result
    }

    fn translate_uncounted(
        &mut self,
        now: Instant,
        from_inside: bool,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Translated, NatDrop> {
        if !from_inside {
            let private = self.inbound(now, src, dst.port())?;
            return Ok(Translated {
                src,
                dst: private,
                inward: true,
            });
        }
        if dst.ip() == self.public_ip && !self.config.hairpinning {
            return Err(NatDrop::Hairpin);
        }
        let public = self.outbound(now, src, dst)?;
        if dst.ip() != self.public_ip {
            return Ok(Translated {
                src: public,
                dst,
                inward: false,
            });
        }
        let private = self.inbound(now, public, dst.port())?;
        self.counters.hairpinned += 1;
        Ok(Translated {
            src: public,
            dst: private,
            inward: true,
        })
    }

    /// A datagram from `private` leaving for `remote`: returns the public source address.
    fn outbound(
        &mut self,
        now: Instant,
        private: SocketAddr,
        remote: SocketAddr,
    ) -> Result<SocketAddr, NatDrop> {
        if !self.allowed(remote.ip()) {
            return Err(NatDrop::NotAllowed);
        }
        let key = FlowKey {
            private,
            remote: match self.config.mapping {
                MappingBehavior::EndpointIndependent => None,
                MappingBehavior::EndpointDependent => Some(remote),
            },
        };
        let current = self.ports.get(&key).copied().filter(|port| {
            self.mappings
                .get(port)
                .is_some_and(|m| self.live(m.refreshed, now))
        });
        let port = match current {
            Some(port) => port,
            None => {
                if let Some(stale) = self.ports.remove(&key) {
                    self.mappings.remove(&stale);
                }
                let port = self.allocate(now).ok_or(NatDrop::PortsExhausted)?;
                self.ports.insert(key, port);
                self.mappings.insert(
                    port,
                    Mapping {
                        key,
                        refreshed: now,
                        permissions: HashMap::new(),
                    },
                );
                self.counters.mappings_created += 1;
                port
            }
        };
        let timeout = self.config.mapping_timeout;
        if let Some(mapping) = self.mappings.get_mut(&port) {
            mapping.refreshed = now;
            if mapping.permissions.len() >= PERMISSIONS_BEFORE_SWEEP {
                mapping
                    .permissions
                    .retain(|_, at| now.saturating_duration_since(*at) < timeout);
            }
            mapping.permissions.insert(remote, now);
        }
        self.counters.outbound += 1;
        Ok(SocketAddr::new(self.public_ip, port))
    }

    /// A datagram from `remote` to public `port`: returns the private destination.
    fn inbound(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        port: u16,
    ) -> Result<SocketAddr, NatDrop> {
        if !self.allowed(remote.ip()) {
            return Err(NatDrop::NotAllowed);
        }
        let timeout = self.config.mapping_timeout;
        let live = |at: Instant| now.saturating_duration_since(at) < timeout;
        let Some(mapping) = self.mappings.get_mut(&port) else {
            return Err(NatDrop::Unmapped);
        };
        if !live(mapping.refreshed) {
            let key = mapping.key;
            self.mappings.remove(&port);
            self.ports.remove(&key);
            return Err(NatDrop::Unmapped);
        }
        let admitted = match self.config.filtering {
            FilteringBehavior::EndpointIndependent => true,
            FilteringBehavior::AddressDependent => mapping
                .permissions
                .iter()
                .any(|(r, &at)| r.ip() == remote.ip() && live(at)),
            FilteringBehavior::AddressAndPortDependent => {
                mapping.permissions.get(&remote).is_some_and(|&at| live(at))
            }
        };
        if !admitted {
            return Err(NatDrop::Filtered);
        }
        if self.config.refresh_on_inbound {
            mapping.refreshed = now;
            mapping.permissions.insert(remote, now);
        }
        self.counters.inbound += 1;
        Ok(mapping.key.private)
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.config
            .allow_only
            .as_ref()
            .is_none_or(|list| list.contains(&ip))
    }

    fn live(&self, refreshed: Instant, now: Instant) -> bool {
        now.saturating_duration_since(refreshed) < self.config.mapping_timeout
    }

    /// A public port that no live mapping holds, drawn from the seeded generator; an expired
    /// mapping on it is reclaimed.
    fn allocate(&mut self, now: Instant) -> Option<u16> {
        let span = u64::from(u16::MAX - FIRST_NAT_PORT) + 1;
        let start = self.rng.next_u64() % span;
        let draws: Vec<u64> = (0..PORT_DRAWS)
            .map(|_| self.rng.next_u64() % span)
            .collect();
        let candidates = draws
            .into_iter()
            .chain((0..span).map(|i| (start + i) % span));
        let mut found = None;
        for offset in candidates {
            // `offset < span`, so the sum stays within 1024..=65535.
            let port = FIRST_NAT_PORT + offset as u16;
            match self.mappings.get(&port) {
                None => {
                    found = Some(port);
                    break;
                }
                Some(m) if !self.live(m.refreshed, now) => {
                    let key = m.key;
                    self.mappings.remove(&port);
                    self.ports.remove(&key);
                    found = Some(port);
                    break;
                }
                Some(_) => {}
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const PUBLIC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn out(t: &mut NatTable, now: Instant, from: &str, to: &str) -> SocketAddr {
        let r = t
            .translate(now, true, addr(from), addr(to))
            .expect("outbound");
        assert!(!r.inward);
        r.src
    }

    fn inb(t: &mut NatTable, now: Instant, from: &str, port: u16) -> Result<SocketAddr, NatDrop> {
        t.translate(now, false, addr(from), SocketAddr::new(PUBLIC, port))
            .map(|r| r.dst)
    }

    #[test]
    fn endpoint_independent_mapping_keeps_one_port_symmetric_gives_one_per_destination() {
        let now = Instant::now();
        let mut cone = NatTable::new(NatConfig::full_cone(), PUBLIC, 1);
        let a = out(&mut cone, now, "192.168.1.2:5000", "10.0.0.9:7444");
        let b = out(&mut cone, now, "192.168.1.2:5000", "10.0.0.8:9000");
        assert_eq!(a, b);
        assert_eq!(cone.counters().mappings_created, 1);

        let mut sym = NatTable::new(NatConfig::symmetric(), PUBLIC, 1);
        let a = out(&mut sym, now, "192.168.1.2:5000", "10.0.0.9:7444");
        let b = out(&mut sym, now, "192.168.1.2:5000", "10.0.0.9:7445");
        assert_ne!(a.port(), b.port());
        assert_eq!(sym.counters().mappings_created, 2);
    }

    #[test]
    fn filtering_admits_what_each_behaviour_promises() {
        let now = Instant::now();
        let cases = [
            (NatConfig::full_cone(), [true, true, true]),
            (NatConfig::restricted_cone(), [true, true, false]),
            (NatConfig::port_restricted_cone(), [true, false, false]),
        ];
        for (config, expect) in cases {
            let mut t = NatTable::new(config.clone(), PUBLIC, 2);
            let port = out(&mut t, now, "192.168.1.2:5000", "10.0.0.9:7444").port();
            // The remote sent to, the same address from another port, another address.
            let got = ["10.0.0.9:7444", "10.0.0.9:7445", "10.0.0.8:7444"]
                .map(|from| inb(&mut t, now, from, port).is_ok());
            assert_eq!(got, expect, "{:?}", config.filtering);
        }
    }

    #[test]
    fn mappings_expire_unless_refreshed_from_the_inside() {
        let t0 = Instant::now();
        let timeout = DEFAULT_MAPPING_TIMEOUT;
        let mut t = NatTable::new(NatConfig::port_restricted_cone(), PUBLIC, 3);
        let port = out(&mut t, t0, "192.168.1.2:5000", "10.0.0.9:7444").port();
        // Inbound does not refresh by default.
        let almost = t0 + timeout - Duration::from_millis(1);
        assert!(inb(&mut t, almost, "10.0.0.9:7444", port).is_ok());
        assert_eq!(
            inb(&mut t, t0 + timeout, "10.0.0.9:7444", port),
            Err(NatDrop::Unmapped)
        );
        assert_eq!(t.live_mappings(t0 + timeout), 0);
        assert_eq!(t.counters().dropped.unmapped, 1);

        let mut refreshed = NatConfig::port_restricted_cone();
        refreshed.refresh_on_inbound = true;
        let mut t = NatTable::new(refreshed, PUBLIC, 3);
        let port = out(&mut t, t0, "192.168.1.2:5000", "10.0.0.9:7444").port();
        assert!(inb(&mut t, almost, "10.0.0.9:7444", port).is_ok());
        assert!(inb(&mut t, t0 + timeout, "10.0.0.9:7444", port).is_ok());
    }

    #[test]
    fn hairpin_turns_around_only_when_enabled() {
        let now = Instant::now();
        for hairpinning in [false, true] {
            let config = NatConfig {
                hairpinning,
                filtering: FilteringBehavior::EndpointIndependent,
                ..NatConfig::default()
            };
            let mut t = NatTable::new(config, PUBLIC, 4);
            let b = out(&mut t, now, "192.168.1.3:6000", "10.0.0.9:7444");
            let r = t.translate(now, true, addr("192.168.1.2:5000"), b);
            if hairpinning {
                let r = r.expect("hairpinned");
                assert!(r.inward);
                assert_eq!(r.dst, addr("192.168.1.3:6000"));
                assert_eq!(r.src.ip(), PUBLIC);
                assert_eq!(t.counters().hairpinned, 1);
            } else {
                assert_eq!(r, Err(NatDrop::Hairpin));
                assert_eq!(t.counters().dropped.hairpin, 1);
            }
        }
    }

    #[test]
    fn firewall_passes_only_the_allowed_address() {
        let now = Instant::now();
        let anchor: IpAddr = "10.0.0.9".parse().expect("ip");
        let mut t = NatTable::new(NatConfig::firewall(anchor), PUBLIC, 5);
        let port = out(&mut t, now, "192.168.1.2:5000", "10.0.0.9:7444").port();
        assert!(inb(&mut t, now, "10.0.0.9:7444", port).is_ok());
        assert_eq!(
            t.translate(now, true, addr("192.168.1.2:5000"), addr("10.0.0.8:1")),
            Err(NatDrop::NotAllowed)
        );
        assert_eq!(
            inb(&mut t, now, "10.0.0.8:1", port),
            Err(NatDrop::NotAllowed)
        );
        assert_eq!(t.counters().dropped.not_allowed, 2);
    }

    #[test]
    fn ports_repeat_with_the_seed() {
        let now = Instant::now();
        let ports = |seed| {
            let mut t = NatTable::new(NatConfig::symmetric(), PUBLIC, seed);
            (0..8)
                .map(|i| {
                    out(
                        &mut t,
                        now,
                        "192.168.1.2:5000",
                        &format!("10.0.0.9:{}", 100 + i),
                    )
                })
                .map(|a| a.port())
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(6), ports(6));
        assert_ne!(ports(6), ports(7));
        assert!(ports(6).iter().all(|&p| p >= FIRST_NAT_PORT));
    }
}
