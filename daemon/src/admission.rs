//! Who may try to pair, how often (sans-IO: every call takes the time). The bootstrap driver
//! asks; the configuration holds the numbers.
//!
//! The UDP port is public, so anyone can open bootstrap connections. Three limits keep one
//! place from burning or starving codes for everyone (docs/security.md has the numbers):
//!
//! - **Failures per source.** Every pairing attempt that ends without reaching an operator
//!   (wrong or unknown code, bad proof, protocol error, a node that gave up) takes a token
//!   from its source's bucket, and from one bucket for all sources. With its bucket empty a
//!   source is answered `overloaded` before any work is done, until a token comes back.
//! - **Guesses per source and code id.** A source that failed `guesses_per_code` times at
//!   one code id is refused that id for [`GUESS_LOCKOUT`] after its last failure. It is one
//!   less than the attempts that burn a code, so no single source can burn one. The count is
//!   kept for every id tried, known or not, so the refusal says nothing about whether the id
//!   exists.
//! - **Attempts in flight**, per source and in total, so held connections cannot pile up.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64). Memory is
//! bounded: idle sources are forgotten once their bucket is full again, and the guess table
//! holds at most [`MAX_GUESS_ENTRIES`], forgetting the oldest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// How long a source stays refused at a code id after its last counted failure there.
pub const GUESS_LOCKOUT: Duration = Duration::from_secs(5 * 60);
/// Most (source, code id) failure counts kept.
pub const MAX_GUESS_ENTRIES: usize = 65_536;
/// Most sources tracked at once; beyond, new sources are refused as if the anchor were busy.
pub const MAX_SOURCES: usize = 65_536;

/// The limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairingLimits {
    /// Failed attempts a source may make per minute (also its burst).
    pub failures_per_source_per_minute: u32,
    /// Failed attempts all sources together may make per minute (also the burst).
    pub failures_per_minute: u32,
    /// Failures a source may make at one code id before it is locked out of it.
    pub guesses_per_code: u32,
    /// Bootstrap connections one source may hold at once.
    pub in_flight_per_source: usize,
    /// Bootstrap connections held at once in total.
    pub in_flight: usize,
}

impl PairingLimits {
    /// The defaults, for codes that burn after `max_attempts` wrong secrets.
    pub fn defaults(max_attempts: u32) -> PairingLimits {
        PairingLimits {
            failures_per_source_per_minute: 10,
            failures_per_minute: 600,
            guesses_per_code: max_attempts.saturating_sub(1).max(1),
            in_flight_per_source: 64,
            in_flight: 1024,
        }
    }
}

/// Why an attempt is not even looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The source failed too often; it may try again after `retry_after`.
    Source {
        /// When a token is back.
        retry_after: Duration,
    },
    /// The source failed at this code id too often.
    CodeLocked {
        /// When the lockout ends.
        retry_after: Duration,
    },
    /// Too many attempts in flight or failing everywhere: the anchor is busy.
    Busy,
}

/// A source: an IPv4 address, or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => Source::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// A token bucket refilled continuously: `capacity` tokens per minute.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn full(capacity: u32, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(capacity),
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, capacity: u32, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        let cap = f64::from(capacity);
        self.tokens = (self.tokens + elapsed * cap / 60_000.0).min(cap);
        self.at_ms = now_ms.max(self.at_ms);
    }

    /// Time until one token is there (zero if one is).
    fn wait(&self, capacity: u32) -> Duration {
        if self.tokens >= 1.0 || capacity == 0 {
            return Duration::ZERO;
        }
        let ms = (1.0 - self.tokens) * 60_000.0 / f64::from(capacity);
        Duration::from_millis(ms.ceil() as u64)
    }

    fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    fn is_full(&self, capacity: u32) -> bool {
        self.tokens >= f64::from(capacity)
    }
}

#[derive(Debug)]
struct SourceState {
    failures: Bucket,
    in_flight: usize,
}

#[derive(Debug, Clone, Copy)]
struct Guesses {
    count: u32,
    last_ms: u64,
}

/// The limiter: one per anchor, behind a mutex (every call is a few map operations).
#[derive(Debug)]
pub struct Limiter {
    limits: PairingLimits,
    total: Bucket,
    in_flight: usize,
    sources: HashMap<Source, SourceState>,
    guesses: HashMap<(Source, String), Guesses>,
}

impl Limiter {
    /// A limiter with every bucket full.
    pub fn new(limits: PairingLimits, now_ms: u64) -> Limiter {
        Limiter {
            limits,
            total: Bucket::full(limits.failures_per_minute, now_ms),
            in_flight: 0,
            sources: HashMap::new(),
            guesses: HashMap::new(),
        }
    }

    /// Admits a new attempt from `source`, counting it in flight until [`Limiter::finish`].
    pub fn admit(&mut self, source: Source, now_ms: u64) -> Result<(), Refused> {
        let l = self.limits;
        if self.in_flight >= l.in_flight {
            return Err(Refused::Busy);
        }
        self.total.refill(l.failures_per_minute, now_ms);
        if self.total.tokens < 1.0 {
            return Err(Refused::Busy);
        }
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_SOURCES {
            self.forget_idle_sources(now_ms);
            if self.sources.len() >= MAX_SOURCES {
                return Err(Refused::Busy);
            }
        }
        let state = self.sources.entry(source).or_insert_with(|| SourceState {
            failures: Bucket::full(l.failures_per_source_per_minute, now_ms),
            in_flight: 0,
        });
        state
            .failures
            .refill(l.failures_per_source_per_minute, now_ms);
        if state.failures.tokens < 1.0 {
            return Err(Refused::Source {
                retry_after: state.failures.wait(l.failures_per_source_per_minute),
            });
        }
        if state.in_flight >= l.in_flight_per_source {
            return Err(Refused::Busy);
        }
        state.in_flight += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// Whether `source` may try code id `code_id` now.
    pub fn may_try(&self, source: Source, code_id: &str, now_ms: u64) -> Result<(), Refused> {
        match self.guesses.get(&(source, code_id.to_string())) {
            Some(g) if g.count >= self.limits.guesses_per_code => {
                let until = g.last_ms.saturating_add(lockout_ms());
                if now_ms < until {
                    Err(Refused::CodeLocked {
                        retry_after: Duration::from_millis(until - now_ms),
                    })
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Charges a failed attempt to `source` (and, if it named one, to its code id).
    pub fn failed(&mut self, source: Source, code_id: Option<&str>, now_ms: u64) {
        let l = self.limits;
        self.total.refill(l.failures_per_minute, now_ms);
        self.total.take();
        if let Some(state) = self.sources.get_mut(&source) {
            state
                .failures
                .refill(l.failures_per_source_per_minute, now_ms);
            state.failures.take();
        }
        let Some(id) = code_id else { return };
        let key = (source, id.to_string());
        if !self.guesses.contains_key(&key) && self.guesses.len() >= MAX_GUESS_ENTRIES {
            self.forget_oldest_guess(now_ms);
        }
        let g = self.guesses.entry(key).or_insert(Guesses {
            count: 0,
            last_ms: now_ms,
        });
        if now_ms >= g.last_ms.saturating_add(lockout_ms()) {
            g.count = 0;
        }
        g.count = g.count.saturating_add(1);
        g.last_ms = now_ms;
    }

    /// An attempt admitted by [`Limiter::admit`] ended.
    pub fn finish(&mut self, source: Source, now_ms: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let l = self.limits;
        if let Some(state) = self.sources.get_mut(&source) {
            state.in_flight = state.in_flight.saturating_sub(1);
            state
                .failures
                .refill(l.failures_per_source_per_minute, now_ms);
            if state.in_flight == 0 && state.failures.is_full(l.failures_per_source_per_minute) {
                self.sources.remove(&source);
            }
        }
    }

    /// Attempts in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Sources and guess entries held (for tests of the memory bound).
    pub fn tracked(&self) -> (usize, usize) {
        (self.sources.len(), self.guesses.len())
    }

    fn forget_idle_sources(&mut self, now_ms: u64) {
        let cap = self.limits.failures_per_source_per_minute;
        self.sources.retain(|_, s| {
            s.failures.refill(cap, now_ms);
            s.in_flight > 0 || !s.failures.is_full(cap)
        });
    }

    fn forget_oldest_guess(&mut self, now_ms: u64) {
        self.guesses
            .retain(|_, g| now_ms < g.last_ms.saturating_add(lockout_ms()));
        if self.guesses.len() < MAX_GUESS_ENTRIES {
            return;
        }
        if let Some(oldest) = self
            .guesses
            .iter()
            .min_by_key(|(_, g)| g.last_ms)
            .map(|(k, _)| k.clone())
        {
            self.guesses.remove(&oldest);
        }
    }
}

fn lockout_ms() -> u64 {
    u64::try_from(GUESS_LOCKOUT.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::from(IpAddr::from([192, 0, 2, last]))
    }

    fn limiter() -> Limiter {
        Limiter::new(PairingLimits::defaults(3), 0)
    }

    #[test]
    fn a_source_that_keeps_failing_is_refused_and_others_are_not() {
        let mut l = limiter();
        for i in 0..10 {
            l.admit(src(1), i).unwrap();
            l.failed(src(1), Some(&format!("ID{i}")), i);
            l.finish(src(1), i);
        }
        let Err(Refused::Source { retry_after }) = l.admit(src(1), 10) else {
            panic!("the eleventh failure in a minute is refused");
        };
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(6));
        l.admit(src(2), 10).expect("another source is not affected");
        // One token every six seconds.
        l.admit(src(1), 6_010).expect("a token came back");
    }

    #[test]
    fn one_source_cannot_spend_every_attempt_at_a_code() {
        let mut l = limiter();
        for t in [0, 1] {
            l.may_try(src(1), "K7QFM2XA", t).unwrap();
            l.failed(src(1), Some("K7QFM2XA"), t);
        }
        assert!(matches!(
            l.may_try(src(1), "K7QFM2XA", 2),
            Err(Refused::CodeLocked { .. })
        ));
        l.may_try(src(2), "K7QFM2XA", 2)
            .expect("another source may still try (and be the honest one)");
        l.may_try(src(1), "OTHERID2", 2)
            .expect("other ids are open");
        let later = 1 + lockout_ms();
        l.may_try(src(1), "K7QFM2XA", later)
            .expect("the lockout ends");
        l.failed(src(1), Some("K7QFM2XA"), later);
        l.may_try(src(1), "K7QFM2XA", later + 1)
            .expect("the count started again after the lockout");
    }

    #[test]
    fn attempts_in_flight_are_bounded_per_source_and_in_total() {
        let mut l = Limiter::new(
            PairingLimits {
                in_flight_per_source: 2,
                in_flight: 3,
                ..PairingLimits::defaults(3)
            },
            0,
        );
        l.admit(src(1), 0).unwrap();
        l.admit(src(1), 0).unwrap();
        assert_eq!(l.admit(src(1), 0), Err(Refused::Busy));
        l.admit(src(2), 0).unwrap();
        assert_eq!(
            l.admit(src(3), 0),
            Err(Refused::Busy),
            "the total is reached"
        );
        l.finish(src(1), 0);
        l.admit(src(3), 0).unwrap();
        assert_eq!(l.in_flight(), 3);
    }

    #[test]
    fn failures_everywhere_make_the_anchor_busy_for_everyone() {
        let mut l = Limiter::new(
            PairingLimits {
                failures_per_minute: 5,
                ..PairingLimits::defaults(3)
            },
            0,
        );
        for i in 0..5 {
            l.admit(src(i), 0).unwrap();
            l.failed(src(i), None, 0);
            l.finish(src(i), 0);
        }
        assert_eq!(l.admit(src(100), 0), Err(Refused::Busy));
        l.admit(src(100), 12_000).expect("the total bucket refills");
    }

    #[test]
    fn memory_stays_bounded_and_idle_sources_are_forgotten() {
        let mut l = limiter();
        l.admit(src(1), 0).unwrap();
        l.finish(src(1), 0);
        assert_eq!(
            l.tracked().0,
            0,
            "a source that never failed leaves nothing behind"
        );
        l.admit(src(1), 0).unwrap();
        l.failed(src(1), None, 0);
        l.finish(src(1), 0);
        assert_eq!(l.tracked().0, 1, "its failure is remembered");
        l.admit(src(1), 60_000).unwrap();
        l.finish(src(1), 60_000);
        assert_eq!(l.tracked().0, 0, "once refilled it is forgotten");

        let mut l = Limiter::new(
            PairingLimits {
                failures_per_minute: u32::MAX,
                ..PairingLimits::defaults(3)
            },
            0,
        );
        for i in 0..(MAX_GUESS_ENTRIES as u64 + 100) {
            l.failed(src(1), Some(&format!("ID{i}")), i);
        }
        assert_eq!(l.tracked().1, MAX_GUESS_ENTRIES);
    }

    #[test]
    fn ipv6_sources_are_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::from(a), Source::from(b));
        assert_ne!(Source::from(a), Source::from(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(Source::from(mapped), src(1));
    }
}
