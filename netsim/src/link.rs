//! Link conditions ([`LinkConfig`], [`Loss`], [`Preset`]) and the pure engine that applies them.
//!
//! The engine decides, for one datagram offered to one link direction at time `now`, whether it
//! is dropped (and why) or when it arrives. It never reads a clock, spawns a task or touches a
//! socket, so the virtual network and the real-socket proxy share it, and it is unit-tested
//! with plain instants.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

use crate::counters::DropCause;
use crate::rng::Rng;

/// IPv4 plus UDP header bytes, counted against the MTU, the rate and the queue.
pub const IPV4_UDP_HEADER: usize = 28;
/// IPv6 plus UDP header bytes, counted against the MTU, the rate and the queue.
pub const IPV6_UDP_HEADER: usize = 48;
/// Default bandwidth queue: 256 KiB of wire bytes.
pub const DEFAULT_QUEUE_BYTES: usize = 256 * 1024;
/// Default MTU (IP packet size, as on Ethernet).
pub const DEFAULT_MTU: usize = 1500;
/// Default extra delay of a reordered datagram.
pub const DEFAULT_REORDER_DELAY: Duration = Duration::from_millis(10);
/// Largest latency, jitter or reorder delay a link accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);
/// Smallest rate a link accepts, in bits per second.
pub const MIN_RATE: u64 = 1_000;
/// Largest bandwidth queue a link accepts, in bytes.
pub const MAX_QUEUE_BYTES: usize = 1 << 30;

/// Conditions of one link direction.
///
/// A datagram goes through the stages in this order: MTU check, loss, bandwidth queue
/// (drop-tail), latency with jitter, reordering, duplication. Jitter alone never reorders:
/// datagrams keep their order unless `reorder` picks one to be held back by `reorder_delay`,
/// so that the datagrams behind it overtake it. `Default` is an ideal link: no loss, no delay,
/// unlimited rate, 1500-byte MTU.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Which datagrams are lost.
    pub loss: Loss,
    /// One-way delay added to every datagram.
    pub latency: Duration,
    /// Each datagram's delay varies uniformly within `latency ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability that a datagram is held back by `reorder_delay` and overtaken.
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Bandwidth in bits per second (wire bytes, headers included); `None` is unlimited.
    pub rate: Option<u64>,
    /// Bytes the bandwidth queue holds before it drops new datagrams (drop-tail). Only used
    /// with a `rate`.
    pub queue_bytes: usize,
    /// Largest IP packet (payload plus IP and UDP headers); larger datagrams are dropped.
    pub mtu: usize,
}

/// A loss model.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Loss {
    /// No random loss.
    #[default]
    None,
    /// Each datagram is lost independently with this probability.
    Independent(f64),
    /// Bursty loss: a two-state Gilbert–Elliott channel.
    Bursty(GilbertElliott),
}

/// Parameters of a Gilbert–Elliott channel.
///
/// The channel is in a good or a bad state; before each datagram it moves from good to bad
/// with `p_good_to_bad` and from bad to good with `p_bad_to_good`, then loses the datagram
/// with the loss probability of the state it is in. The mean bad burst lasts
/// `1 / p_bad_to_good` datagrams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state, per datagram.
    pub p_good_to_bad: f64,
    /// Probability of moving from the bad to the good state, per datagram.
    pub p_bad_to_good: f64,
    /// Loss probability in the good state.
    pub loss_in_good: f64,
    /// Loss probability in the bad state.
    pub loss_in_bad: f64,
}

/// Named link conditions modelled on real links, from good to bad.
///
/// The numbers are per direction; see [`LinkConfig::preset`] and `docs/netsim.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Preset {
    /// Wired LAN: 0.5 ms, 1 Gbit/s, no loss.
    Lan,
    /// Home Wi-Fi: 4 ± 3 ms, 50 Mbit/s, about 1 % bursty loss.
    Wifi,
    /// LTE: 35 ± 10 ms, 20 Mbit/s, 0.5 % loss, 1428-byte MTU.
    Lte,
    /// Congested 3G: 150 ± 60 ms, 384 kbit/s, about 4 % bursty loss, bufferbloat.
    Congested3g,
    /// Geostationary satellite: 300 ± 15 ms, 15 Mbit/s, 1 % loss.
    Satellite,
    /// Hostile: 30 % loss, 100 ± 50 ms, 1 Mbit/s, reordering and duplication, 1280-byte MTU.
    Hostile,
}

/// A [`LinkConfig`] that cannot be simulated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkConfigError {
    /// A probability was not a number between 0 and 1.
    #[error("{name} must be a probability between 0 and 1, got {value}")]
    Probability {
        /// Which field.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// A delay was larger than [`MAX_DELAY`].
    #[error("{name} of {value:?} exceeds the maximum of {MAX_DELAY:?}")]
    Delay {
        /// Which field.
        name: &'static str,
        /// The value given.
        value: Duration,
    },
    /// The rate was below [`MIN_RATE`].
    #[error("rate of {0} bit/s is below the minimum of {MIN_RATE} bit/s")]
    Rate(u64),
    /// The queue was larger than [`MAX_QUEUE_BYTES`].
    #[error("queue of {0} bytes exceeds the maximum of {MAX_QUEUE_BYTES} bytes")]
    Queue(usize),
}

/// A preset name that is not one of [`Preset::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown link preset {name:?}; expected one of: lan, wifi, lte, congested-3g, satellite, hostile"
)]
pub struct PresetParseError {
    /// The name given.
    pub name: String,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            loss: Loss::None,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_delay: DEFAULT_REORDER_DELAY,
            duplicate: 0.0,
            rate: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            mtu: DEFAULT_MTU,
        }
    }
}

impl LinkConfig {
    /// An ideal link: no loss, no delay, unlimited rate, 1500-byte MTU (same as `Default`).
    pub fn ideal() -> Self {
        Self::default()
    }

    /// The conditions of a named preset.
    pub fn preset(preset: Preset) -> Self {
        let ms = Duration::from_millis;
        match preset {
            Preset::Lan => Self {
                latency: Duration::from_micros(500),
                jitter: Duration::from_micros(100),
                rate: Some(1_000_000_000),
                queue_bytes: 1024 * 1024,
                ..Self::default()
            },
            Preset::Wifi => Self {
                loss: Loss::Bursty(GilbertElliott {
                    p_good_to_bad: 0.01,
                    p_bad_to_good: 0.3,
                    loss_in_good: 0.0,
                    loss_in_bad: 0.3,
                }),
                latency: ms(4),
                jitter: ms(3),
                reorder: 0.001,
                reorder_delay: ms(5),
                rate: Some(50_000_000),
                queue_bytes: 256 * 1024,
                ..Self::default()
            },
            Preset::Lte => Self {
                loss: Loss::Independent(0.005),
                latency: ms(35),
                jitter: ms(10),
                reorder: 0.005,
                reorder_delay: ms(10),
                rate: Some(20_000_000),
                queue_bytes: 512 * 1024,
                mtu: 1428,
                ..Self::default()
            },
            Preset::Congested3g => Self {
                loss: Loss::Bursty(GilbertElliott {
                    p_good_to_bad: 0.02,
                    p_bad_to_good: 0.25,
                    loss_in_good: 0.005,
                    loss_in_bad: 0.5,
                }),
                latency: ms(150),
                jitter: ms(60),
                reorder: 0.01,
                reorder_delay: ms(30),
                duplicate: 0.001,
                rate: Some(384_000),
                queue_bytes: 64 * 1024,
                mtu: 1400,
            },
            Preset::Satellite => Self {
                loss: Loss::Independent(0.01),
                latency: ms(300),
                jitter: ms(15),
                rate: Some(15_000_000),
                queue_bytes: 1024 * 1024,
                ..Self::default()
            },
            Preset::Hostile => Self {
                loss: Loss::Independent(0.30),
                latency: ms(100),
                jitter: ms(50),
                reorder: 0.05,
                reorder_delay: ms(50),
                duplicate: 0.02,
                rate: Some(1_000_000),
                queue_bytes: 32 * 1024,
                mtu: 1280,
            },
        }
    }

    /// Checks that every field can be simulated.
    pub fn validate(&self) -> Result<(), LinkConfigError> {
        fn probability(name: &'static str, value: f64) -> Result<(), LinkConfigError> {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(LinkConfigError::Probability { name, value })
            }
        }
        fn delay(name: &'static str, value: Duration) -> Result<(), LinkConfigError> {
            if value <= MAX_DELAY {
                Ok(())
            } else {
                Err(LinkConfigError::Delay { name, value })
            }
        }
        match self.loss {
            Loss::None => {}
            Loss::Independent(p) => probability("loss", p)?,
            Loss::Bursty(ge) => {
                probability("p_good_to_bad", ge.p_good_to_bad)?;
                probability("p_bad_to_good", ge.p_bad_to_good)?;
                probability("loss_in_good", ge.loss_in_good)?;
                probability("loss_in_bad", ge.loss_in_bad)?;
            }
        }
        probability("reorder", self.reorder)?;
        probability("duplicate", self.duplicate)?;
        delay("latency", self.latency)?;
        delay("jitter", self.jitter)?;
        delay("reorder_delay", self.reorder_delay)?;
        if let Some(rate) = self.rate
            && rate < MIN_RATE
        {
            return Err(LinkConfigError::Rate(rate));
        }
        if self.queue_bytes > MAX_QUEUE_BYTES {
            return Err(LinkConfigError::Queue(self.queue_bytes));
        }
        Ok(())
    }
}

impl Loss {
    /// The long-run fraction of datagrams this model loses.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Independent(p) => p,
            Loss::Bursty(ge) => {
                let moves = ge.p_good_to_bad + ge.p_bad_to_good;
                if moves <= 0.0 {
                    // Never leaves the good state it starts in.
                    ge.loss_in_good
                } else {
                    let bad = ge.p_good_to_bad / moves;
                    bad * ge.loss_in_bad + (1.0 - bad) * ge.loss_in_good
                }
            }
        }
    }
}

impl Preset {
    /// Every preset, from good to bad.
    pub const ALL: [Preset; 6] = [
        Preset::Lan,
        Preset::Wifi,
        Preset::Lte,
        Preset::Congested3g,
        Preset::Satellite,
        Preset::Hostile,
    ];

    /// The preset's name, as accepted by `FromStr` and the proxy's `--preset`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Lan => "lan",
            Preset::Wifi => "wifi",
            Preset::Lte => "lte",
            Preset::Congested3g => "congested-3g",
            Preset::Satellite => "satellite",
            Preset::Hostile => "hostile",
        }
    }
}

impl From<Preset> for LinkConfig {
    fn from(preset: Preset) -> Self {
        LinkConfig::preset(preset)
    }
}

impl FromStr for Preset {
    type Err = PresetParseError;

    /// Parses a preset name, ignoring ASCII case and accepting `_` for `-`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == wanted)
            .ok_or_else(|| PresetParseError { name: s.to_owned() })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for LinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.loss {
            Loss::None => write!(f, "loss 0%")?,
            Loss::Independent(p) => write!(f, "loss {}%", p * 100.0)?,
            Loss::Bursty(ge) => write!(
                f,
                "bursty loss ~{:.2}% (good->bad {}, bad->good {}, loss {} / {})",
                self.loss.mean() * 100.0,
                ge.p_good_to_bad,
                ge.p_bad_to_good,
                ge.loss_in_good,
                ge.loss_in_bad
            )?,
        }
        write!(f, ", latency {:?} ± {:?}", self.latency, self.jitter)?;
        if self.reorder > 0.0 {
            write!(
                f,
                ", reorder {}% (+{:?})",
                self.reorder * 100.0,
                self.reorder_delay
            )?;
        }
        if self.duplicate > 0.0 {
            write!(f, ", duplicate {}%", self.duplicate * 100.0)?;
        }
        match self.rate {
            Some(rate) => write!(f, ", rate {rate} bit/s (queue {} B)", self.queue_bytes)?,
            None => write!(f, ", rate unlimited")?,
        }
        write!(f, ", mtu {}", self.mtu)
    }
}

/// What the link does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Dropped before reaching the far end.
    Drop(DropCause),
    /// Arrives at `at`; if duplicated, a copy arrives at `copy`.
    Deliver { at: Instant, copy: Option<Instant> },
}

/// The mutable state of one link direction: its random stream, the Gilbert–Elliott state, the
/// bandwidth queue and the tail of the in-order delivery schedule.
#[derive(Debug)]
pub(crate) struct LinkEngine {
    rng: Rng,
    in_bad_state: bool,
    busy_until: Option<Instant>,
    /// Datagrams still being serialized: (time the last bit leaves, wire bytes).
    queue: VecDeque<(Instant, usize)>,
    queued: usize,
    /// Arrival time of the last in-order datagram; jitter never schedules before it.
    fifo_tail: Option<Instant>,
}

impl LinkEngine {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            in_bad_state: false,
            busy_until: None,
            queue: VecDeque::new(),
            queued: 0,
            fifo_tail: None,
        }
    }

    /// Decides the fate of a datagram of `payload` bytes offered at `now`.
    pub(crate) fn transmit(
        &mut self,
        cfg: &LinkConfig,
        now: Instant,
        payload: usize,
        header: usize,
    ) -> Verdict {
        let wire = payload.saturating_add(header);
        if wire > cfg.mtu {
            return Verdict::Drop(DropCause::Mtu);
        }
        if self.lose(&cfg.loss) {
            return Verdict::Drop(DropCause::Loss);
        }

        self.drain(now);
        let departs = match cfg.rate {
            None => now,
            Some(rate) => {
                if self.queued.saturating_add(wire) > cfg.queue_bytes {
                    return Verdict::Drop(DropCause::QueueFull);
                }
                let start = self.busy_until.map_or(now, |busy| busy.max(now));
                let nanos = (wire as u128 * 8 * 1_000_000_000) / u128::from(rate.max(1));
                let serialize = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                let Some(departs) = start.checked_add(serialize) else {
                    return Verdict::Drop(DropCause::QueueFull);
                };
                self.busy_until = Some(departs);
                self.queue.push_back((departs, wire));
                self.queued += wire;
                departs
            }
        };

        let delay = self.delay(cfg);
        let Some(mut at) = departs.checked_add(delay) else {
            return Verdict::Drop(DropCause::QueueFull);
        };
        if self.rng.chance(cfg.reorder) {
            // Held back outside the in-order schedule, so later datagrams overtake it.
            at = at.checked_add(cfg.reorder_delay).unwrap_or(at);
        } else {
            if let Some(tail) = self.fifo_tail {
                at = at.max(tail);
            }
            self.fifo_tail = Some(at);
        }
        let copy = self.rng.chance(cfg.duplicate).then_some(at);
        Verdict::Deliver { at, copy }
    }

    /// Wire bytes still in the bandwidth queue at `now`.
    pub(crate) fn queued_bytes(&self, now: Instant) -> usize {
        self.queue
            .iter()
            .filter(|(departs, _)| *departs > now)
            .map(|(_, wire)| wire)
            .sum()
    }

    fn drain(&mut self, now: Instant) {
        while let Some(&(departs, wire)) = self.queue.front() {
            if departs > now {
                break;
            }
            self.queue.pop_front();
            self.queued -= wire;
        }
    }

    fn lose(&mut self, loss: &Loss) -> bool {
        match *loss {
            Loss::None => false,
            Loss::Independent(p) => self.rng.chance(p),
            Loss::Bursty(ge) => {
                let flip = if self.in_bad_state {
                    ge.p_bad_to_good
                } else {
                    ge.p_good_to_bad
                };
                if self.rng.chance(flip) {
                    self.in_bad_state = !self.in_bad_state;
                }
                let p = if self.in_bad_state {
                    ge.loss_in_bad
                } else {
                    ge.loss_in_good
                };
                self.rng.chance(p)
            }
        }
    }

    fn delay(&mut self, cfg: &LinkConfig) -> Duration {
        if cfg.jitter.is_zero() {
            return cfg.latency;
        }
        let jitter = cfg.jitter.as_nanos() as f64;
        let offset = (self.rng.next_f64() * 2.0 - 1.0) * jitter;
        let nanos = (cfg.latency.as_nanos() as f64 + offset).max(0.0);
        Duration::from_nanos(nanos as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cfg: &LinkConfig, n: usize, seed: u64) -> Vec<Verdict> {
        run_at(Instant::now(), cfg, n, seed)
    }

    fn run_at(now: Instant, cfg: &LinkConfig, n: usize, seed: u64) -> Vec<Verdict> {
        let mut engine = LinkEngine::new(seed);
        (0..n)
            .map(|_| engine.transmit(cfg, now, 1000, IPV4_UDP_HEADER))
            .collect()
    }

    fn lost(v: &[Verdict]) -> usize {
        v.iter()
            .filter(|v| matches!(v, Verdict::Drop(DropCause::Loss)))
            .count()
    }

    #[test]
    fn independent_loss_rate_matches() {
        let cfg = LinkConfig {
            loss: Loss::Independent(0.1),
            ..LinkConfig::default()
        };
        let v = run(&cfg, 100_000, 1);
        let rate = lost(&v) as f64 / v.len() as f64;
        assert!((0.095..0.105).contains(&rate), "seed 1: rate {rate}");
    }

    #[test]
    fn bursty_loss_matches_mean_and_is_bursty() {
        let cfg = LinkConfig::preset(Preset::Congested3g);
        let Loss::Bursty(ge) = cfg.loss else {
            panic!("congested-3g is bursty")
        };
        let unlimited = LinkConfig {
            rate: None,
            ..cfg.clone()
        };
        let mut engine = LinkEngine::new(2);
        let now = Instant::now();
        let mut losses = Vec::new();
        for _ in 0..200_000 {
            let v = engine.transmit(&unlimited, now, 100, 28);
            losses.push(matches!(v, Verdict::Drop(DropCause::Loss)));
        }
        let rate = losses.iter().filter(|l| **l).count() as f64 / losses.len() as f64;
        let mean = cfg.loss.mean();
        assert!(
            (rate - mean).abs() < 0.004,
            "seed 2: rate {rate}, mean {mean}"
        );
        // Bursty: a loss is far more likely right after a loss than on average.
        let after_loss = losses.windows(2).filter(|w| w[0]).count() as f64;
        let loss_after_loss = losses.windows(2).filter(|w| w[0] && w[1]).count() as f64;
        let conditional = loss_after_loss / after_loss;
        assert!(
            conditional > 3.0 * rate,
            "seed 2: P(loss|loss) {conditional} vs {rate}"
        );
        assert!(ge.p_bad_to_good > 0.0);
    }

    #[test]
    fn mtu_counts_headers() {
        let cfg = LinkConfig {
            mtu: 1228,
            ..LinkConfig::default()
        };
        let mut e = LinkEngine::new(0);
        let now = Instant::now();
        assert!(matches!(
            e.transmit(&cfg, now, 1200, IPV4_UDP_HEADER),
            Verdict::Deliver { .. }
        ));
        assert_eq!(
            e.transmit(&cfg, now, 1201, IPV4_UDP_HEADER),
            Verdict::Drop(DropCause::Mtu)
        );
        assert_eq!(
            e.transmit(&cfg, now, 1200, IPV6_UDP_HEADER),
            Verdict::Drop(DropCause::Mtu)
        );
    }

    #[test]
    fn rate_serializes_and_queue_drops_tail() {
        // 1 Mbit/s: a 1000-byte wire packet takes 8 ms; the queue holds 3 packets.
        let cfg = LinkConfig {
            rate: Some(1_000_000),
            queue_bytes: 3000,
            latency: Duration::from_millis(5),
            ..LinkConfig::default()
        };
        let mut e = LinkEngine::new(0);
        let now = Instant::now();
        let at: Vec<Verdict> = (0..4).map(|_| e.transmit(&cfg, now, 972, 28)).collect();
        for (i, v) in at.iter().take(3).enumerate() {
            let expected = now + Duration::from_millis(8 * (i as u64 + 1) + 5);
            assert_eq!(
                *v,
                Verdict::Deliver {
                    at: expected,
                    copy: None
                }
            );
        }
        assert_eq!(at[3], Verdict::Drop(DropCause::QueueFull));
        assert_eq!(e.queued_bytes(now), 3000);
        assert_eq!(e.queued_bytes(now + Duration::from_millis(8)), 2000);
        // Once the first packet left, there is room again.
        let later = now + Duration::from_millis(8);
        assert!(matches!(
            e.transmit(&cfg, later, 972, 28),
            Verdict::Deliver { .. }
        ));
    }

    #[test]
    fn jitter_keeps_order_and_reorder_breaks_it() {
        let jittery = LinkConfig {
            latency: Duration::from_millis(50),
            jitter: Duration::from_millis(10),
            ..LinkConfig::default()
        };
        let mut e = LinkEngine::new(3);
        let start = Instant::now();
        let mut arrivals = Vec::new();
        for i in 0..1000u64 {
            let now = start + Duration::from_micros(100 * i);
            if let Verdict::Deliver { at, .. } = e.transmit(&jittery, now, 100, 28) {
                let d = at - now;
                assert!(d >= Duration::from_millis(40), "delay {d:?}");
                assert!(d <= Duration::from_millis(60), "delay {d:?}");
                arrivals.push(at);
            }
        }
        assert!(
            arrivals.windows(2).all(|w| w[0] <= w[1]),
            "jitter alone reordered"
        );

        let reordering = LinkConfig {
            reorder: 0.1,
            reorder_delay: Duration::from_millis(20),
            ..jittery
        };
        let mut e = LinkEngine::new(3);
        let mut arrivals = Vec::new();
        for i in 0..1000u64 {
            let now = start + Duration::from_millis(i);
            if let Verdict::Deliver { at, .. } = e.transmit(&reordering, now, 100, 28) {
                arrivals.push(at);
            }
        }
        let inversions = arrivals.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(
            (50..150).contains(&inversions),
            "seed 3: {inversions} inversions"
        );
    }

    #[test]
    fn duplicates_at_the_configured_rate() {
        let cfg = LinkConfig {
            duplicate: 0.05,
            ..LinkConfig::default()
        };
        let v = run(&cfg, 20_000, 4);
        let dups = v
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver { copy: Some(_), .. }))
            .count();
        assert!((800..1200).contains(&dups), "seed 4: {dups} duplicates");
    }

    #[test]
    fn same_seed_same_verdicts() {
        let cfg = LinkConfig::preset(Preset::Hostile);
        let now = Instant::now();
        assert!(run_at(now, &cfg, 5000, 9) == run_at(now, &cfg, 5000, 9));
        assert!(run_at(now, &cfg, 5000, 9) != run_at(now, &cfg, 5000, 10));
    }

    #[test]
    fn presets_are_valid_named_and_ordered() {
        for p in Preset::ALL {
            let cfg = LinkConfig::preset(p);
            cfg.validate().expect("preset is valid");
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
            assert!(!cfg.to_string().is_empty());
        }
        assert_eq!("Congested_3G".parse::<Preset>(), Ok(Preset::Congested3g));
        assert!("dialup".parse::<Preset>().is_err());
        let hostile = LinkConfig::preset(Preset::Hostile);
        assert!((hostile.loss.mean() - 0.30).abs() < 1e-9);
        let means: Vec<f64> = Preset::ALL
            .iter()
            .map(|p| LinkConfig::preset(*p).loss.mean())
            .collect();
        assert!(means[0] < means[1] && means[4] < means[5], "{means:?}");
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad = |cfg: LinkConfig| cfg.validate().is_err();
        assert!(bad(LinkConfig {
            loss: Loss::Independent(1.5),
            ..LinkConfig::default()
        }));
        assert!(bad(LinkConfig {
            loss: Loss::Independent(f64::NAN),
            ..LinkConfig::default()
        }));
        assert!(bad(LinkConfig {
            duplicate: -0.1,
            ..LinkConfig::default()
        }));
        assert!(bad(LinkConfig {
            rate: Some(0),
            ..LinkConfig::default()
        }));
        assert!(bad(LinkConfig {
            latency: Duration::MAX,
            ..LinkConfig::default()
        }));
        assert!(bad(LinkConfig {
            queue_bytes: usize::MAX,
            ..LinkConfig::default()
        }));
    }
}
