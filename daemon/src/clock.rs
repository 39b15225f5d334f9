//! The anchor's wall clock.
//!
//! Records carry wall-clock times (Unix milliseconds). In production that is the system clock.
//! Under netsim, tokio's clock is paused and advanced by the simulation, so the anchor reads a
//! wall clock that moves with tokio's: a fixed start plus tokio's elapsed time. Pure rules take
//! the time as an argument; only this type reads a clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the anchor's notion of "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The operating system's clock.
    System,
    /// A wall clock driven by tokio's (possibly paused) clock, starting at `start`.
    Tokio {
        /// Wall time at `origin`.
        start: SystemTime,
        /// tokio's instant at creation.
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's time, starting at the system time now.
    pub fn tokio() -> Clock {
        Clock::Tokio {
            start: SystemTime::now(),
            origin: tokio::time::Instant::now(),
        }
    }

    /// Now.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { start, origin } => *start + origin.elapsed(),
        }
    }

    /// Now, as Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        to_ms(self.now())
    }
}

/// Unix milliseconds of a time (0 before the epoch).
pub fn to_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The time of Unix milliseconds.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// An RFC 3339 timestamp for the console API.
pub fn to_odt(ms: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from(from_ms(ms))
}
