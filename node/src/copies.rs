//! The node's side of invocation copies: small requests the anchor also sends as datagrams
//! beside their streams, and the result copies that answer them (the anchor's side and why:
//! `anchorage_daemon::invocations::copies`).
//!
//! A request copy is run like the stream's request, through the same duplicate-id check, so
//! an invocation runs once whichever copy arrives first. Each copy asks for the result: one
//! that finished is answered at once from memory, one still running when it finishes, one not
//! seen yet once it has run. The stream's request still gets its answer on the stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anchorage_wire::datagram::{Datagram, ResultCopy};
use anchorage_wire::invoke::{InvocationId, InvokeRequest, InvokeResult, Outcome};
use tokio::sync::Semaphore;

use crate::capability::Registry;
use crate::invoke::{Counters, Seen, handle_invocation};
use crate::stats::AgentStats;

/// Invocations started by a copy (their stream not seen yet) running at once; copies beyond
/// are dropped (the stream still brings the request).
pub const MAX_COPY_RUNS: usize = 128;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What serving copies on one connection needs. Cheap to clone.
#[derive(Clone)]
pub(crate) struct CopyServer {
    pub conn: quinn::Connection,
    pub registry: Registry,
    pub permits: Arc<Semaphore>,
    pub stats: Arc<AgentStats>,
    pub seen: Arc<Mutex<Seen>>,
    pub running: Arc<AtomicUsize>,
}

impl CopyServer {
    /// Answers a request copy from the anchor.
    pub(crate) fn serve(&self, req: InvokeRequest) {
        self.stats.invoke_copies.fetch_add(1, Ordering::Relaxed);
        let id = req.id;
        let earlier = lock(&self.seen).peek(&id);
        match earlier {
            Some(Some(done)) => self.send_result(id, &done),
            Some(None) => lock(&self.seen).want_copy(id),
            None => {
                if self.running.fetch_add(1, Ordering::Relaxed) >= MAX_COPY_RUNS {
                    self.running.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let this = self.clone();
                tokio::spawn(async move {
                    let counters = Counters {
                        duplicates: &this.stats.duplicates,
                        expired: &this.stats.invocations_expired,
                        run: &this.stats.invocations_run,
                    };
                    let result =
                        handle_invocation(req, &this.registry, &this.permits, counters, &this.seen)
                            .await;
                    this.running.fetch_sub(1, Ordering::Relaxed);
                    if result.outcome == Outcome::Duplicate {
                        // The stream's request got there first: answer once that one ends.
                        let now = lock(&this.seen).peek(&id);
                        match now {
                            Some(Some(done)) => this.send_result(id, &done),
                            _ => lock(&this.seen).want_copy(id),
                        }
                    } else {
                        this.send_result(id, &result);
                    }
                });
            }
        }
    }

    /// After the stream's request of `id` ended with `result`: a copy of it if one was asked
    /// for meanwhile, a moment after the stream's answer so the two take different packets.
    pub(crate) fn finished(&self, id: InvocationId, result: &InvokeResult) {
        if !lock(&self.seen).take_copy_wanted(&id) {
            return;
        }
        let this = self.clone();
        let result = result.clone();
        let gap = (self.conn.rtt() / 8).clamp(Duration::from_millis(1), Duration::from_millis(25));
        tokio::spawn(async move {
            tokio::time::sleep(gap).await;
            this.send_result(id, &result);
        });
    }

    fn send_result(&self, id: InvocationId, result: &InvokeResult) {
        let copy = Datagram::ResultCopy(ResultCopy {
            id,
            result: result.clone(),
        });
        let Ok(bytes) = copy.encode() else {
            // Larger than a datagram: the stream carries it.
            return;
        };
        if self
            .conn
            .max_datagram_size()
            .is_some_and(|max| bytes.len() <= max)
            && self.conn.send_datagram(bytes.into()).is_ok()
        {
            self.stats.result_copies.fetch_add(1, Ordering::Relaxed);
        }
    }
}
