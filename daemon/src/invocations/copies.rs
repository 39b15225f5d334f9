//! Copies of small invocations sent as datagrams beside their streams.
//!
//! On a lossy link a call is one request packet and one result packet; when either is lost,
//! QUIC resends it only at its probe timeout, which doubles on each further loss (seconds at
//! 20 % loss). So the dispatcher also sends a small request as a datagram
//! ([`Datagram::InvokeCopy`](anchorage_wire::datagram::Datagram::InvokeCopy)) a moment after
//! the stream, and again every [`Schedule::interval`] while no result has come, a few times;
//! the node answers each copy with a copy of the result once it has one. Whichever result
//! arrives first, on the stream or as a datagram, counts. The node's duplicate-id check runs
//! an invocation once however many copies reach it.
//!
//! [`ResultCopies`] is where a dispatch waits for a result copy: the session driver hands
//! each result copy a node sends to it, and only the dispatch that sent that invocation to
//! that device's session receives it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_wire::datagram::ResultCopy;
use anchorage_wire::invoke::{InvocationId, InvokeResult};
use tokio::sync::oneshot;

use crate::nodes::SessionId;

/// Copies of one request sent at most (the first included); QUIC's own recovery covers a
/// call beyond them.
pub const MAX_COPIES: u32 = 8;

/// Round-trip time from which copies are sent on a connection that has lost nothing.
pub const COPY_MIN_RTT: Duration = Duration::from_millis(2);

/// Whether copies are worth sending on `conn`: it lost packets, or its round trip is long
/// enough (at least [`COPY_MIN_RTT`]) that QUIC's probe timeout is expensive. On a quiet LAN
/// a loss costs QUIC's probe timeout of a few tens of milliseconds, and copies would only
/// add work while the anchor is busy.
pub fn worth_it(conn: &quinn::Connection) -> bool {
    conn.rtt() >= COPY_MIN_RTT || conn.stats().path.lost_packets > 0
}

/// When a dispatch sends the copies of its request, from the connection's round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The first copy, after the stream's request (so the two travel in different packets).
    pub first: Duration,
    /// Each further copy while no result has come.
    pub interval: Duration,
}

impl Schedule {
    /// The schedule for a connection whose smoothed round-trip time is `rtt`: the first copy
    /// a quarter of a round trip after the stream (at least 1 ms, so not in its packet), then
    /// one every round trip and a quarter (the result of the previous one is due by then).
    pub fn for_rtt(rtt: Duration) -> Schedule {
        Schedule {
            first: (rtt / 4).clamp(Duration::from_millis(1), Duration::from_millis(100)),
            interval: (rtt * 5 / 4 + Duration::from_millis(2))
                .clamp(Duration::from_millis(5), Duration::from_secs(2)),
        }
    }
}

#[derive(Debug)]
struct Waiting {
    device: DeviceId,
    session: SessionId,
    tx: oneshot::Sender<InvokeResult>,
}

/// Dispatches waiting for a result copy. Cheap to share.
#[derive(Debug, Default, Clone)]
pub struct ResultCopies {
    waiting: Arc<Mutex<HashMap<InvocationId, Waiting>>>,
}

/// A dispatch's wait for a result copy; dropping it stops the wait.
#[derive(Debug)]
pub struct CopyWait {
    id: InvocationId,
    rx: oneshot::Receiver<InvokeResult>,
    owner: ResultCopies,
}

impl CopyWait {
    /// The result copy, when one arrives (never, if the wait is dropped first).
    pub async fn result(&mut self) -> InvokeResult {
        match (&mut self.rx).await {
            Ok(r) => r,
            // The sender went away only if the entry was replaced: no copy comes here.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for CopyWait {
    fn drop(&mut self) {
        self.rx.close();
        let mut waiting = self.owner.lock();
        // Only this wait's own entry (a later dispatch of the same id may have replaced it).
        if waiting.get(&self.id).is_some_and(|w| w.tx.is_closed()) {
            waiting.remove(&self.id);
        }
    }
}

impl ResultCopies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InvocationId, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a copy of the result of `id` from `device` on `session`.
    pub fn expect(&self, id: InvocationId, device: DeviceId, session: SessionId) -> CopyWait {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            id,
            Waiting {
                device,
                session,
                tx,
            },
        );
        CopyWait {
            id,
            rx,
            owner: self.clone(),
        }
    }

    /// Hands a result copy that `device` sent on `session` to the dispatch waiting for it;
    /// `false` if none is (already answered, or not this device's invocation).
    pub fn deliver(&self, device: &DeviceId, session: SessionId, copy: ResultCopy) -> bool {
        let mut waiting = self.lock();
        let ours = waiting
            .get(&copy.id)
            .is_some_and(|w| w.device == *device && w.session == session);
        if !ours {
            return false;
        }
        let Some(w) = waiting.remove(&copy.id) else {
            return false;
        };
        w.tx.send(copy.result).is_ok()
    }

    /// Dispatches waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anchorage_wire::invoke::Outcome;

    fn device(b: u8) -> DeviceId {
        DeviceId::from_bytes([b; 20])
    }

    fn copy(id: InvocationId) -> ResultCopy {
        ResultCopy {
            id,
            result: InvokeResult {
                outcome: Outcome::Succeeded,
                output: b"{}".to_vec(),
                truncated: false,
                error: None,
                duration_ms: 1,
            },
        }
    }

    #[tokio::test]
    async fn only_the_device_and_session_it_went_to_can_answer() {
        let copies = ResultCopies::default();
        let id = InvocationId([1; 16]);
        let mut wait = copies.expect(id, device(1), SessionId(7));
        assert!(
            !copies.deliver(&device(2), SessionId(7), copy(id)),
            "another device"
        );
        assert!(
            !copies.deliver(&device(1), SessionId(8), copy(id)),
            "another session"
        );
        assert!(copies.deliver(&device(1), SessionId(7), copy(id)));
        assert_eq!(wait.result().await.output, b"{}");
        assert!(
            !copies.deliver(&device(1), SessionId(7), copy(id)),
            "answered once"
        );
        drop(wait);
        assert!(copies.is_empty());
    }

    #[test]
    fn a_dropped_wait_leaves_nothing_behind() {
        let copies = ResultCopies::default();
        for i in 0..100u8 {
            let _ = copies.expect(InvocationId([i; 16]), device(1), SessionId(1));
        }
        assert!(copies.is_empty());
    }

    #[test]
    fn copies_follow_the_round_trip() {
        let lan = Schedule::for_rtt(Duration::from_micros(200));
        assert_eq!(lan.first, Duration::from_millis(1));
        assert_eq!(lan.interval, Duration::from_millis(5));
        let lossy = Schedule::for_rtt(Duration::from_millis(100));
        assert_eq!(lossy.first, Duration::from_millis(25));
        assert_eq!(lossy.interval, Duration::from_millis(127));
        let satellite = Schedule::for_rtt(Duration::from_secs(3));
        assert_eq!(satellite.interval, Duration::from_secs(2));
    }
}
