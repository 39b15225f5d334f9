//! The anchors a node knows, and the order it tries them in. Pure: no sockets, no clock.
//!
//! A node starts from *seeds*: the `--anchor` flags, the configuration's `anchor`/`anchors`,
//! or the anchor it paired with. Once connected it learns every live anchor of its cluster
//! from [`ControlDown::Anchors`](anchorage_wire::control::ControlDown::Anchors). An
//! [`AnchorSet`] holds both: the anchor of the connection in use first, then the anchors as last
//! told, then the seeds that are not among them, without duplicates and at most
//! [`MAX_KNOWN`]. The seeds stay whatever an anchor says, so a name given by a person (or a
//! load-balanced DNS name) is never forgotten.
//!
//! The agent dials [`AnchorSet::current`] and reports each outcome; the set moves on and says
//! how long to pause ([`Pause`]):
//!
//! - an attempt that failed (no handshake, no registration) moves on at once; only when every
//!   anchor failed in one round is the pause the agent's capped exponential backoff;
//! - an established connection that was lost moves on after a short random pause, so a fleet
//!   that loses one anchor at once spreads over the others; a connection that did not last
//!   [`STABLE_CONNECTION`](crate::agent::STABLE_CONNECTION) counts as a failed attempt of its
//!   round too, so an anchor that accepts and drops nodes at once is not hammered.
//!
//! [`SilenceWatch`] is the rule that declares an anchor silent (see
//! [`ANCHOR_SILENCE`]).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anchorage_wire::limits::{MAX_ANCHORS, MAX_NAME_LEN};

/// The most anchors a node keeps (the wire's limit on [`ControlDown::Anchors`]).
///
/// [`ControlDown::Anchors`]: anchorage_wire::control::ControlDown::Anchors
pub const MAX_KNOWN: usize = MAX_ANCHORS;
/// The longest `HOST:PORT` a node accepts, in bytes (the wire's limit on one anchor address).
pub const MAX_ADDR_LEN: usize = MAX_NAME_LEN;

/// With another anchor to go to, an anchor from which nothing at all was received for this
/// long is given up on (and a handshake that takes longer fails). Above the node's 5 s
/// keep-alive, which a live anchor acknowledges at once.
pub const ANCHOR_SILENCE: Duration = Duration::from_secs(6);

/// An anchor's QUIC address as a node dials it: `HOST:PORT`, where `HOST` is a name (resolved
/// at each attempt), an IPv4 address or a bracketed IPv6 address. Compared as text: `a:7444`
/// given twice is one anchor.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AnchorAddr(String);

/// Why a text is not an anchor address, or a list of them is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorAddrError {
    /// Nothing was given.
    #[error("empty anchor address (expected HOST:PORT)")]
    Empty,
    /// Longer than [`MAX_ADDR_LEN`].
    #[error("an anchor address of {0} bytes is longer than {MAX_ADDR_LEN}")]
    TooLong(usize),
    /// Not `HOST:PORT` with a port from 1 to 65535.
    #[error("{0:?} is not HOST:PORT")]
    NotHostPort(String),
    /// More than [`MAX_KNOWN`] different addresses.
    #[error("{0} anchor addresses; at most {MAX_KNOWN} are kept")]
    TooMany(usize),
}

impl AnchorAddr {
    /// The address as text, e.g. `anchor.example:7444`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The socket address when the host is an IP address: dialing it needs no resolver.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.0.parse().ok()
    }
}

impl FromStr for AnchorAddr {
    type Err = AnchorAddrError;

    fn from_str(s: &str) -> Result<AnchorAddr, AnchorAddrError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AnchorAddrError::Empty);
        }
        if s.len() > MAX_ADDR_LEN {
            return Err(AnchorAddrError::TooLong(s.len()));
        }
        let bad = || AnchorAddrError::NotHostPort(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if !port.parse::<u16>().is_ok_and(|p| p != 0) {
            return Err(bad());
        }
        let host_ok = match host.strip_prefix('[') {
            // An IPv6 address must be bracketed, or its colons would be read as the port's.
            Some(v6) => v6
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
            None => {
                !host.is_empty()
                    && !host
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control() || "[]:,/@".contains(c))
            }
        };
        if !host_ok {
            return Err(bad());
        }
        Ok(AnchorAddr(s.to_string()))
    }
}

impl From<SocketAddr> for AnchorAddr {
    fn from(addr: SocketAddr) -> AnchorAddr {
        AnchorAddr(addr.to_string())
    }
}

impl fmt::Display for AnchorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AnchorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Parses anchor addresses as a person gives them: each value one address or a comma-separated
/// list (`a:7444,b:7444`; spaces and empty items are ignored). Duplicates are dropped, the
/// order is kept; more than [`MAX_KNOWN`] different addresses are refused.
pub fn parse_list<S: AsRef<str>>(
    values: impl IntoIterator<Item = S>,
) -> Result<Vec<AnchorAddr>, AnchorAddrError> {
    let mut out = Vec::new();
    for value in values {
        let value = value.as_ref();
        let mut any = false;
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            any = true;
            push_unique(&mut out, item.parse()?);
            if out.len() > MAX_KNOWN {
                return Err(AnchorAddrError::TooMany(out.len()));
            }
        }
        if !any {
            return Err(AnchorAddrError::Empty);
        }
    }
    Ok(out)
}

fn push_unique(list: &mut Vec<AnchorAddr>, addr: AnchorAddr) {
    if !list.contains(&addr) {
        list.push(addr);
    }
}

/// How long the agent pauses before its next attempt (it draws the durations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// None: try the next anchor at once.
    None,
    /// A random pause up to [`FAILOVER_SPREAD`](crate::agent::FAILOVER_SPREAD), after a lost
    /// connection.
    Spread,
    /// The capped exponential backoff: every anchor failed in this round.
    Backoff,
}

/// The anchors a node knows and which one it tries now.
#[derive(Debug, Clone)]
pub struct AnchorSet {
    /// Given by a person or saved at pairing; kept whatever an anchor says.
    seeds: Vec<AnchorAddr>,
    /// As last told by an anchor (or saved in the state directory from the last time).
    told: Vec<AnchorAddr>,
    /// The rotation: `told` then `seeds`, deduplicated and bounded.
    list: Vec<AnchorAddr>,
    current: usize,
    /// Attempts that failed since this round began.
    failed: usize,
}

impl AnchorSet {
    /// A set of `told` (the anchors as last told, tried first) and `seeds`; `None` when both
    /// are empty. Beyond [`MAX_KNOWN`] addresses, the last are dropped.
    pub fn new(seeds: Vec<AnchorAddr>, told: Vec<AnchorAddr>) -> Option<AnchorSet> {
        let mut set = AnchorSet {
            seeds: bounded(seeds),
            told: bounded(told),
            list: Vec::new(),
            current: 0,
            failed: 0,
        };
        set.list = merge(None, &set.told, &set.seeds);
        (!set.list.is_empty()).then_some(set)
    }

    /// The anchor to dial now (or connected now).
    pub fn current(&self) -> &AnchorAddr {
        // `list` is never empty: `new` refuses an empty set and `update` keeps the current.
        &self.list[self.current]
    }

    /// Every anchor, in the order they are tried.
    pub fn addrs(&self) -> &[AnchorAddr] {
        &self.list
    }

    /// The anchors as last told by an anchor (what the state directory keeps).
    pub fn told(&self) -> &[AnchorAddr] {
        &self.told
    }

    /// How many anchors are known.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Always false: a set has at least one anchor. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether there is another anchor to go to, so that a silent one is given up on.
    pub fn several(&self) -> bool {
        self.list.len() >= 2
    }

    /// Replaces the anchors as told (by the anchor connected now, which sends itself first).
    /// The current anchor stays current and first, whatever name the anchor knows itself by;
    /// then come `told`, then the seeds. Returns whether `told` differs from before.
    pub fn update(&mut self, told: Vec<AnchorAddr>) -> bool {
        let told = bounded(told);
        let changed = told != self.told;
        let current = self.current().clone();
        self.told = told;
        self.list = merge(Some(current), &self.told, &self.seeds);
        self.current = 0;
        changed
    }

    /// The attempt at the current anchor failed before the node registered: moves on to the
    /// next anchor, at once unless that completed a round in which every anchor failed.
    pub fn failed(&mut self) -> Pause {
        self.advance();
        self.failed += 1;
        if self.failed >= self.list.len() {
            self.failed = 0;
            Pause::Backoff
        } else {
            Pause::None
        }
    }

    /// The established connection to the current anchor was lost: moves on to the next
    /// anchor after a random pause. A connection that was not `stable` also counts as a
    /// failed attempt of the round (and may complete it: then the pause is the backoff).
    pub fn lost(&mut self, stable: bool) -> Pause {
        if stable {
            self.failed = 0;
            self.advance();
            return Pause::Spread;
        }
        match self.failed() {
            Pause::Backoff => Pause::Backoff,
            _ => Pause::Spread,
        }
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.list.len();
    }
}

fn bounded(list: Vec<AnchorAddr>) -> Vec<AnchorAddr> {
    let mut out = Vec::with_capacity(list.len().min(MAX_KNOWN));
    for a in list {
        if out.len() == MAX_KNOWN {
            break;
        }
        push_unique(&mut out, a);
    }
    out
}

fn merge(first: Option<AnchorAddr>, told: &[AnchorAddr], seeds: &[AnchorAddr]) -> Vec<AnchorAddr> {
    let mut out = Vec::new();
    for a in first
        .into_iter()
        .chain(told.iter().cloned())
        .chain(seeds.iter().cloned())
    {
        if out.len() == MAX_KNOWN {
            break;
        }
        push_unique(&mut out, a);
    }
    out
}

/// Declares a connection silent when its count of received datagrams has not moved for a
/// while. Fed with the count and the time, it never reads either itself.
#[derive(Debug, Clone)]
pub struct SilenceWatch {
    limit: Duration,
    received: u64,
    since: Instant,
}

impl SilenceWatch {
    /// Watching from `now`, with `received` datagrams so far; silent after `limit`.
    pub fn new(limit: Duration, received: u64, now: Instant) -> SilenceWatch {
        SilenceWatch {
            limit,
            received,
            since: now,
        }
    }

    /// Records the count at `now`; true once it has not moved for the limit.
    pub fn is_silent(&mut self, received: u64, now: Instant) -> bool {
        if received != self.received {
            self.received = received;
            self.since = now;
            return false;
        }
        now.saturating_duration_since(self.since) >= self.limit
    }
}

/// Why `HOST:PORT` did not resolve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The resolver failed (or the text is not `HOST:PORT`).
    #[error("cannot resolve {addr}: {source} (expected HOST:PORT)")]
    Lookup {
        /// What was given.
        addr: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The name resolved to nothing.
    #[error("{0} resolved to no address")]
    NoAddress(String),
}

/// The address of the first of `anchors` that resolves (to open a socket of its family), or
/// the first error.
pub async fn resolve_first(anchors: &[AnchorAddr]) -> Result<SocketAddr, ResolveError> {
    let mut first_error = None;
    for anchor in anchors {
        match resolve_anchor(anchor).await {
            Ok(addr) => return Ok(addr),
            Err(e) => {
                tracing::debug!(%anchor, error = %e, "an anchor's name does not resolve");
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| ResolveError::NoAddress(String::new())))
}

/// Resolves an anchor address: an IP address as it is, a name through the system resolver.
pub async fn resolve_anchor(anchor: &AnchorAddr) -> Result<SocketAddr, ResolveError> {
    match anchor.literal() {
        Some(addr) => Ok(addr),
        None => resolve(anchor.as_str()).await,
    }
}

/// Resolves `host:port` to one address (the first the system returns).
pub async fn resolve(anchor: &str) -> Result<SocketAddr, ResolveError> {
    match tokio::net::lookup_host(anchor).await {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| ResolveError::NoAddress(anchor.to_string())),
        Err(source) => Err(ResolveError::Lookup {
            addr: anchor.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> AnchorAddr {
        s.parse().unwrap()
    }

    fn set(seeds: &[&str], told: &[&str]) -> AnchorSet {
        AnchorSet::new(
            seeds.iter().map(|s| a(s)).collect(),
            told.iter().map(|s| a(s)).collect(),
        )
        .unwrap()
    }

    fn names(s: &AnchorSet) -> Vec<&str> {
        s.addrs().iter().map(AnchorAddr::as_str).collect()
    }

    #[test]
    fn addresses_are_host_and_port() {
        for ok in [
            "anchor.example:7444",
            "10.0.0.1:7444",
            "[::1]:7444",
            " a:1 ",
            "localhost:65535",
        ] {
            assert!(ok.parse::<AnchorAddr>().is_ok(), "{ok}");
        }
        assert_eq!(a(" a:1 ").as_str(), "a:1");
        for bad in [
            "",
            "anchor.example",
            "a:0",
            "a:65536",
            "a:port",
            ":7444",
            "::1:7444",
            "[::1:7444",
            "[nope]:7444",
            "a b:7444",
            "a,b:7444",
            "user@a:7444",
        ] {
            assert!(bad.parse::<AnchorAddr>().is_err(), "{bad:?}");
        }
        let long = format!("{}:7444", "a".repeat(MAX_ADDR_LEN));
        assert_eq!(
            long.parse::<AnchorAddr>(),
            Err(AnchorAddrError::TooLong(long.len()))
        );
    }

    #[test]
    fn ip_addresses_need_no_resolver() {
        assert_eq!(
            a("10.0.0.1:7444").literal(),
            Some(SocketAddr::from(([10, 0, 0, 1], 7444)))
        );
        assert!(a("[::1]:7444").literal().is_some());
        assert_eq!(a("anchor.example:7444").literal(), None);
        let sock = SocketAddr::from(([127, 0, 0, 1], 9));
        assert_eq!(AnchorAddr::from(sock).literal(), Some(sock));
    }

    #[test]
    fn lists_split_on_commas_drop_duplicates_and_are_bounded() {
        let list = parse_list(["a:1,b:2", "c:3", " b:2 , a:1,", "d:4"]).unwrap();
        let names: Vec<&str> = list.iter().map(AnchorAddr::as_str).collect();
        assert_eq!(names, ["a:1", "b:2", "c:3", "d:4"]);
        assert_eq!(parse_list([","]), Err(AnchorAddrError::Empty));
        assert_eq!(parse_list([""]), Err(AnchorAddrError::Empty));
        assert!(matches!(
            parse_list(["a:1,nope"]),
            Err(AnchorAddrError::NotHostPort(s)) if s == "nope"
        ));
        let many: Vec<String> = (1..=MAX_KNOWN as u16).map(|p| format!("a:{p}")).collect();
        assert_eq!(parse_list(&many).unwrap().len(), MAX_KNOWN);
        let too_many = format!("{},b:1", many.join(","));
        assert_eq!(
            parse_list([too_many]),
            Err(AnchorAddrError::TooMany(MAX_KNOWN + 1))
        );
        // Duplicates do not count against the bound.
        let dups = vec!["a:1"; MAX_KNOWN * 2];
        assert_eq!(parse_list(dups).unwrap().len(), 1);
    }

    #[test]
    fn told_anchors_come_first_then_the_seeds_without_duplicates() {
        let s = set(&["seed:1", "b:1"], &["a:1", "b:1"]);
        assert_eq!(names(&s), ["a:1", "b:1", "seed:1"]);
        assert_eq!(s.current().as_str(), "a:1");
        assert!(s.several());
        assert!(AnchorSet::new(Vec::new(), Vec::new()).is_none());
        let one = set(&["a:1"], &["a:1"]);
        assert_eq!(one.len(), 1);
        assert!(!one.several(), "one anchor, given twice, is one");
    }

    #[test]
    fn a_failed_attempt_moves_on_at_once_and_a_failed_round_backs_off() {
        let mut s = set(&["a:1", "b:1", "c:1"], &[]);
        assert_eq!(s.failed(), Pause::None);
        assert_eq!(s.current().as_str(), "b:1");
        assert_eq!(s.failed(), Pause::None);
        assert_eq!(s.current().as_str(), "c:1");
        assert_eq!(s.failed(), Pause::Backoff, "every anchor failed");
        assert_eq!(s.current().as_str(), "a:1");
        // The next round starts over.
        assert_eq!(s.failed(), Pause::None);
        let mut one = set(&["a:1"], &[]);
        assert_eq!(one.failed(), Pause::Backoff);
        assert_eq!(one.failed(), Pause::Backoff);
        assert_eq!(one.current().as_str(), "a:1");
    }

    #[test]
    fn a_lost_connection_fails_over_after_a_spread_pause() {
        let mut s = set(&["a:1", "b:1"], &[]);
        assert_eq!(s.lost(true), Pause::Spread);
        assert_eq!(s.current().as_str(), "b:1");
        // A stable connection began a new round: b failing is not yet a failed round.
        assert_eq!(s.failed(), Pause::None);
        assert_eq!(s.current().as_str(), "a:1");
        assert_eq!(s.failed(), Pause::Backoff);
        let mut one = set(&["a:1"], &[]);
        assert_eq!(one.lost(true), Pause::Spread, "the same anchor, spread");
        assert_eq!(one.current().as_str(), "a:1");
    }

    #[test]
    fn anchors_that_drop_nodes_at_once_end_in_backoff() {
        let mut s = set(&["a:1", "b:1"], &[]);
        assert_eq!(s.lost(false), Pause::Spread);
        assert_eq!(s.current().as_str(), "b:1");
        assert_eq!(
            s.lost(false),
            Pause::Backoff,
            "both dropped us before stable"
        );
        assert_eq!(s.current().as_str(), "a:1");
        let mut one = set(&["a:1"], &[]);
        assert_eq!(one.lost(false), Pause::Backoff);
    }

    #[test]
    fn an_update_keeps_the_current_anchor_first_and_the_seeds_last() {
        let mut s = set(&["seed:1"], &["old:1"]);
        assert_eq!(s.failed(), Pause::None);
        assert_eq!(s.current().as_str(), "seed:1");
        // Connected to seed:1, which knows itself as x:1 and knows y:1.
        assert!(s.update(vec![a("x:1"), a("y:1")]));
        assert_eq!(names(&s), ["seed:1", "x:1", "y:1"]);
        assert_eq!(s.told(), [a("x:1"), a("y:1")]);
        assert_eq!(s.current().as_str(), "seed:1");
        assert_eq!(s.lost(true), Pause::Spread);
        assert_eq!(s.current().as_str(), "x:1", "the next anchor of the list");
        // Connected to x:1, which sends itself first: nothing changed.
        assert!(!s.update(vec![a("x:1"), a("y:1")]));
        assert_eq!(names(&s), ["x:1", "y:1", "seed:1"]);
        // An anchor of the list went away; the current one is listed second.
        assert!(s.update(vec![a("y:1"), a("x:1")]));
        assert_eq!(names(&s), ["x:1", "y:1", "seed:1"]);
        assert!(s.update(vec![a("x:1")]));
        assert_eq!(names(&s), ["x:1", "seed:1"]);
    }

    #[test]
    fn sets_are_bounded() {
        let many: Vec<AnchorAddr> = (1..=200u16).map(|p| a(&format!("t:{p}"))).collect();
        let seeds: Vec<AnchorAddr> = (1..=10u16).map(|p| a(&format!("s:{p}"))).collect();
        let mut s = AnchorSet::new(seeds.clone(), many.clone()).unwrap();
        assert_eq!(s.len(), MAX_KNOWN);
        assert_eq!(s.told().len(), MAX_KNOWN);
        s.update(many);
        assert_eq!(s.len(), MAX_KNOWN);
        let s = AnchorSet::new(seeds, Vec::new()).unwrap();
        assert_eq!(s.len(), 10);
    }

    #[test]
    fn silence_is_no_datagram_for_the_limit() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = SilenceWatch::new(Duration::from_secs(6), 10, t0);
        assert!(!w.is_silent(10, ms(5_500)));
        assert!(!w.is_silent(11, ms(5_900)), "a datagram arrived");
        assert!(!w.is_silent(11, ms(11_800)));
        assert!(w.is_silent(11, ms(11_900)));
        assert!(!w.is_silent(12, ms(12_000)), "it spoke again");
    }
}
