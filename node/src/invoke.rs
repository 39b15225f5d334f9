//! Running one invocation on this node: the same for the anchor's invocation streams and for
//! peers' calls. Duplicates (by id) are answered from memory, never run twice; a request whose
//! deadline passed never starts; the output is cut to the caller's limit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anchorage_wire::invoke::{InvocationId, InvokeRequest, InvokeResult, Outcome};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::capability::{Registry, RunOutcome};

/// Invocation ids remembered for duplicate detection.
pub const SEEN_INVOCATIONS: usize = 4096;

/// Where [`handle_invocation`] counts what it did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters<'a> {
    /// Requests answered as duplicates.
    pub duplicates: &'a AtomicU64,
    /// Requests whose deadline passed before they could run.
    pub expired: &'a AtomicU64,
    /// Requests run.
    pub run: &'a AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Invocation ids already seen, with their results once finished (oldest forgotten first),
/// and which running ones the anchor asked a datagram copy of the result for.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    order: VecDeque<InvocationId>,
    results: HashMap<InvocationId, Option<InvokeResult>>,
    copy_wanted: HashSet<InvocationId>,
}

impl Seen {
    /// Records `id`; returns its earlier state if it was seen before.
    pub(crate) fn insert(&mut self, id: InvocationId) -> Option<Option<InvokeResult>> {
        if let Some(prev) = self.results.get(&id) {
            return Some(prev.clone());
        }
        self.results.insert(id, None);
        self.order.push_back(id);
        while self.order.len() > SEEN_INVOCATIONS {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
                self.copy_wanted.remove(&old);
            }
        }
        None
    }

    /// The state of `id` without recording it: `None` if never seen, `Some(None)` while it
    /// runs, `Some(Some(result))` once finished.
    pub(crate) fn peek(&self, id: &InvocationId) -> Option<Option<InvokeResult>> {
        self.results.get(id).cloned()
    }

    /// Remembers that a copy of the result of `id`, running now, was asked for.
    pub(crate) fn want_copy(&mut self, id: InvocationId) {
        if matches!(self.results.get(&id), Some(None)) {
            self.copy_wanted.insert(id);
        }
    }

    /// Whether a copy of the result of `id` was asked for while it ran (asked once).
    pub(crate) fn take_copy_wanted(&mut self, id: &InvocationId) -> bool {
        self.copy_wanted.remove(id)
    }

    pub(crate) fn finish(&mut self, id: InvocationId, result: &InvokeResult) {
        if let Some(slot) = self.results.get_mut(&id) {
            *slot = Some(result.clone());
        }
    }
}

pub(crate) fn result(
    outcome: Outcome,
    output: Vec<u8>,
    error: Option<String>,
    took: Duration,
    limit: u32,
) -> InvokeResult {
    let limit = limit as usize;
    let truncated = output.len() > limit;
    let mut output = output;
    output.truncate(limit);
    InvokeResult {
        outcome,
        output,
        truncated,
        error: error.map(|e| e.chars().take(4096).collect()),
        duration_ms: u32::try_from(took.as_millis()).unwrap_or(u32::MAX),
    }
}

/// Runs one invocation request to its result: duplicates answered from [`Seen`], expired
/// ones refused, unknown or unavailable capabilities rejected, at most `permits` at once.
pub(crate) async fn handle_invocation(
    req: InvokeRequest,
    registry: &Registry,
    permits: &Semaphore,
    counters: Counters<'_>,
    seen: &Mutex<Seen>,
) -> InvokeResult {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(u64::from(req.remaining_ms));
    let limit = req.output_limit;
    let earlier = lock(seen).insert(req.id);
    match earlier {
        Some(Some(done)) => {
            counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return done;
        }
        Some(None) => {
            counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return result(
                Outcome::Duplicate,
                Vec::new(),
                Some("already running".into()),
                Duration::ZERO,
                limit,
            );
        }
        None => {}
    }
    let finish = |r: InvokeResult| {
        lock(seen).finish(req.id, &r);
        r
    };
    if req.remaining_ms == 0 {
        counters.expired.fetch_add(1, Ordering::Relaxed);
        return finish(result(
            Outcome::Expired,
            Vec::new(),
            Some("deadline passed before it could start".into()),
            Duration::ZERO,
            limit,
        ));
    }
    let Some(cap) = registry.get(&req.capability) else {
        return finish(result(
            Outcome::Rejected,
            Vec::new(),
            Some(format!("unknown capability {}", req.capability)),
            Duration::ZERO,
            limit,
        ));
    };
    if let Err(why) = cap.availability() {
        return finish(result(
            Outcome::Rejected,
            Vec::new(),
            Some(format!("{} is unavailable: {why}", req.capability)),
            Duration::ZERO,
            limit,
        ));
    }
    let permit = match tokio::time::timeout_at(deadline, permits.acquire()).await {
        Ok(Ok(p)) => p,
        _ => {
            counters.expired.fetch_add(1, Ordering::Relaxed);
            return finish(result(
                Outcome::Expired,
                Vec::new(),
                Some("deadline passed while waiting for a slot".into()),
                started.elapsed(),
                limit,
            ));
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        counters.expired.fetch_add(1, Ordering::Relaxed);
        return finish(result(
            Outcome::Expired,
            Vec::new(),
            Some("deadline passed before it could start".into()),
            started.elapsed(),
            limit,
        ));
    }
    counters.run.fetch_add(1, Ordering::Relaxed);
    let outcome = match tokio::time::timeout(left, cap.run(req.input, left)).await {
        Ok(o) => o,
        Err(_) => RunOutcome::TimedOut {
            error: "deadline reached while running".into(),
        },
    };
    drop(permit);
    let took = started.elapsed();
    finish(match outcome {
        RunOutcome::Succeeded(out) => result(Outcome::Succeeded, out, None, took, limit),
        RunOutcome::Failed { error, output } => {
            result(Outcome::Failed, output, Some(error), took, limit)
        }
        RunOutcome::TimedOut { error } => {
            result(Outcome::TimedOut, Vec::new(), Some(error), took, limit)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_remembers_results_and_forgets_the_oldest() {
        let mut seen = Seen::default();
        let id = InvocationId([1; 16]);
        assert!(seen.insert(id).is_none());
        assert_eq!(seen.insert(id), Some(None));
        let r = result(Outcome::Succeeded, b"x".to_vec(), None, Duration::ZERO, 10);
        seen.finish(id, &r);
        assert_eq!(seen.insert(id), Some(Some(r)));
        for i in 0..SEEN_INVOCATIONS as u32 {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            b[15] = 9;
            seen.insert(InvocationId(b));
        }
        assert!(seen.insert(id).is_none(), "the oldest id was forgotten");
    }

    #[test]
    fn a_copy_is_wanted_only_of_what_runs_and_only_once() {
        let mut seen = Seen::default();
        let (running, done, unknown) = (
            InvocationId([1; 16]),
            InvocationId([2; 16]),
            InvocationId([3; 16]),
        );
        seen.insert(running);
        seen.insert(done);
        let r = result(Outcome::Succeeded, b"x".to_vec(), None, Duration::ZERO, 10);
        seen.finish(done, &r);
        for id in [running, done, unknown] {
            seen.want_copy(id);
        }
        assert_eq!(seen.peek(&done), Some(Some(r)));
        assert_eq!(seen.peek(&running), Some(None));
        assert_eq!(seen.peek(&unknown), None);
        assert!(
            !seen.take_copy_wanted(&done),
            "finished: answered at once instead"
        );
        assert!(!seen.take_copy_wanted(&unknown));
        assert!(seen.take_copy_wanted(&running));
        assert!(!seen.take_copy_wanted(&running), "once");
    }

    #[test]
    fn output_is_truncated_to_the_limit() {
        let r = result(
            Outcome::Succeeded,
            vec![b'a'; 100],
            None,
            Duration::ZERO,
            10,
        );
        assert_eq!(r.output.len(), 10);
        assert!(r.truncated);
    }
}
