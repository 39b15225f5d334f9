//! Counters kept per link, per host and per network (and per proxy direction).
//!
//! Plain `Copy` structs that derive `Eq`, so two runs with the same seed can be compared with
//! `assert_eq!`. Every datagram offered to a link ends up, once the network is quiet, either
//! delivered or dropped for exactly one cause; duplicates count as extra offered datagrams:
//! `sent + duplicated == delivered + dropped.total()` plus whatever is still in flight.

use std::fmt;
use std::ops::AddAssign;

/// Traffic counters for one link direction, one host, a whole network or a proxy direction.
///
/// Packet and byte counts are UDP payloads; `queued_bytes` counts wire bytes (payload plus the
/// IP and UDP headers), as the bandwidth queue does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams offered to the link by a sending socket (each GSO segment counts once).
    pub sent: u64,
    /// Payload bytes of the datagrams in `sent`.
    pub sent_bytes: u64,
    /// Datagrams handed to a receiving socket's reader (in the proxy: sent on the real socket).
    pub delivered: u64,
    /// Payload bytes of the datagrams in `delivered`.
    pub delivered_bytes: u64,
    /// Extra copies made by the link's duplication.
    pub duplicated: u64,
    /// Datagrams dropped, by cause.
    pub dropped: Drops,
    /// Wire bytes waiting in the bandwidth queue at the time of the snapshot.
    pub queued_bytes: u64,
}

/// Dropped datagrams, one field per cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Random loss (independent or Gilbert–Elliott).
    pub loss: u64,
    /// The bandwidth queue was full (drop-tail).
    pub queue_full: u64,
    /// Larger than the link MTU (payload plus IP and UDP headers).
    pub mtu: u64,
    /// The two hosts were partitioned from each other.
    pub partition: u64,
    /// The sending or receiving host was down.
    pub host_down: u64,
    /// Nothing listens at the destination address (unknown host, closed port, or an address
    /// the host left by rebinding); in the proxy, the real socket refused the datagram.
    pub no_route: u64,
    /// The receiving socket's buffer was full.
    pub recv_buffer: u64,
    /// The reader's buffer was smaller than the datagram.
    pub truncated: u64,
}

impl Drops {
    /// All drops, whatever the cause.
    pub fn total(&self) -> u64 {
        self.loss
            + self.queue_full
            + self.mtu
            + self.partition
            + self.host_down
            + self.no_route
            + self.recv_buffer
            + self.truncated
    }

    pub(crate) fn record(&mut self, cause: DropCause) {
        let field = match cause {
            DropCause::Loss => &mut self.loss,
            DropCause::QueueFull => &mut self.queue_full,
            DropCause::Mtu => &mut self.mtu,
            DropCause::Partition => &mut self.partition,
            DropCause::HostDown => &mut self.host_down,
            DropCause::NoRoute => &mut self.no_route,
            DropCause::RecvBuffer => &mut self.recv_buffer,
            DropCause::Truncated => &mut self.truncated,
        };
        *field += 1;
    }
}

/// Why a datagram was dropped; mirrors the fields of [`Drops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropCause {
    Loss,
    QueueFull,
    Mtu,
    Partition,
    HostDown,
    NoRoute,
    RecvBuffer,
    Truncated,
}

/// Counters for one host: what it sent (`tx`, summed over its outgoing links) and what was
/// sent to it (`rx`, summed over its incoming links).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Datagrams this host sent, and what became of them.
    pub tx: Counters,
    /// Datagrams other hosts sent to this host, and what became of them.
    pub rx: Counters,
}

impl Counters {
    /// Fraction of offered datagrams (including duplicates) that were dropped, or 0 if none.
    pub fn drop_rate(&self) -> f64 {
        let offered = self.sent + self.duplicated;
        if offered == 0 {
            0.0
        } else {
            self.dropped.total() as f64 / offered as f64
        }
    }
}

impl AddAssign for Drops {
    fn add_assign(&mut self, o: Self) {
        self.loss += o.loss;
        self.queue_full += o.queue_full;
        self.mtu += o.mtu;
        self.partition += o.partition;
        self.host_down += o.host_down;
        self.no_route += o.no_route;
        self.recv_buffer += o.recv_buffer;
        self.truncated += o.truncated;
    }
}

impl AddAssign for Counters {
    fn add_assign(&mut self, o: Self) {
        self.sent += o.sent;
        self.sent_bytes += o.sent_bytes;
        self.delivered += o.delivered;
        self.delivered_bytes += o.delivered_bytes;
        self.duplicated += o.duplicated;
        self.dropped += o.dropped;
        self.queued_bytes += o.queued_bytes;
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.dropped;
        write!(
            f,
            "sent {} ({} B), delivered {} ({} B), duplicated {}, dropped {} \
             [loss {}, queue-full {}, mtu {}, partition {}, host-down {}, no-route {}, \
             recv-buffer {}, truncated {}], queued {} B",
            self.sent,
            self.sent_bytes,
            self.delivered,
            self.delivered_bytes,
            self.duplicated,
            d.total(),
            d.loss,
            d.queue_full,
            d.mtu,
            d.partition,
            d.host_down,
            d.no_route,
            d.recv_buffer,
            d.truncated,
            self.queued_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_sums_cover_every_cause() {
        let causes = [
            DropCause::Loss,
            DropCause::QueueFull,
            DropCause::Mtu,
            DropCause::Partition,
            DropCause::HostDown,
            DropCause::NoRoute,
            DropCause::RecvBuffer,
            DropCause::Truncated,
        ];
        let mut d = Drops::default();
        for c in causes {
            d.record(c);
        }
        assert_eq!(d.total(), causes.len() as u64);
        let mut sum = Drops::default();
        sum += d;
        sum += d;
        assert_eq!(sum.total(), 2 * causes.len() as u64);
        let c = Counters {
            sent: 10,
            dropped: d,
            ..Counters::default()
        };
        assert!((c.drop_rate() - 0.8).abs() < 1e-9);
        assert!(c.to_string().contains("dropped 8"));
    }
}
