//! The invocation service: the unfinished invocations and the driver of their rules.
//!
//! [`Invocations`] wraps the sans-IO [`machine::Queue`] and carries out its effects: records
//! go to the ordered [`Writer`] (so every later state lands after an earlier one), events to
//! the bus, counts to the metrics. Dispatches and retries are handed back to the caller as
//! [`Next`] steps: the IO side (`crate::dispatch`) runs them on the node's connection.

pub mod copies;
pub mod machine;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anchorage_mesh::DeviceId;
use anchorage_wire::invoke::InvocationId;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::nodes::SessionId;
use crate::records::{InvocationRecord, InvocationState};
use crate::store::{RuntimeStore, RuntimeWrite, StoreError, Writer};

pub use machine::{Claim, Ending, Reply};

/// Default invocation timeout.
pub const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest invocation timeout.
pub const MAX_INVOKE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Parses a user-given invocation timeout, clamped to the allowed range.
pub fn invoke_timeout(ms: Option<u64>) -> Duration {
    ms.map_or(DEFAULT_INVOKE_TIMEOUT, Duration::from_millis)
        .clamp(Duration::from_millis(1), MAX_INVOKE_TIMEOUT)
}

/// A step for the IO side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send this on its session now.
    Dispatch(Claim),
    /// Offer this invocation again at this time (Unix ms).
    RetryAt(InvocationId, u64),
}

/// Someone waiting for an invocation to end; handed the final record when it does, so the
/// waiter need not read it back from the store.
#[derive(Debug, Default)]
struct Waiter {
    notify: Notify,
    done: Mutex<Option<InvocationRecord>>,
}

/// The invocation service.
#[derive(Debug)]
pub struct Invocations {
    queue: Mutex<machine::Queue>,
    copies: copies::ResultCopies,
    waiters: Mutex<HashMap<[u8; 16], Arc<Waiter>>>,
    store: Arc<dyn RuntimeStore>,
    writer: Writer,
    clock: Clock,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
}

impl Invocations {
    /// The service, holding again what was unfinished at the last stop.
    pub fn new(
        unfinished: Vec<InvocationRecord>,
        output_limit: usize,
        store: Arc<dyn RuntimeStore>,
        writer: Writer,
        clock: Clock,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
    ) -> Invocations {
        let mut queue = machine::Queue::new(output_limit);
        queue.restore(unfinished);
        Invocations {
            queue: Mutex::new(queue),
            copies: copies::ResultCopies::default(),
            waiters: Mutex::new(HashMap::new()),
            store,
            writer,
            clock,
            events,
            metrics,
        }
    }

    /// Dispatches waiting for a datagram copy of their result.
    pub fn copies(&self) -> &copies::ResultCopies {
        &self.copies
    }

    fn queue(&self) -> MutexGuard<'_, machine::Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn apply(&self, effects: Vec<machine::Effect>) -> Vec<Next> {
        let mut next = Vec::new();
        for effect in effects {
            match effect {
                machine::Effect::Persist(r) => {
                    // A rejection is final at once and never reaches `finished`.
                    if r.state == InvocationState::Rejected {
                        self.metrics.invocation(r.state.as_str(), &r.capability);
                    }
                    self.writer.put(RuntimeWrite::Invocation(r)).await;
                }
                machine::Effect::Publish(e) => self.events.publish(e),
                machine::Effect::Dispatch(c) => next.push(Next::Dispatch(c)),
                machine::Effect::RetryAt(id, at) => next.push(Next::RetryAt(id, at)),
                machine::Effect::Finished(r) => self.finished(r).await,
            }
        }
        next
    }

    /// The final record: counted, written and on disk before it leaves memory, then
    /// published and its waiters told (readers fall back to the store only once it is there).
    async fn finished(&self, r: InvocationRecord) {
        self.metrics.invocation(r.state.as_str(), &r.capability);
        if matches!(
            r.state,
            InvocationState::Succeeded | InvocationState::Failed
        ) {
            let now = self.clock.now_ms();
            self.metrics
                .invocation_duration(now.saturating_sub(r.created_at_ms) as f64 / 1000.0);
        }
        let id = InvocationId(r.id);
        let event = crate::events::AnchorEvent::invocation(&r);
        self.writer.put(RuntimeWrite::Invocation(r.clone())).await;
        if let Err(e) = self.writer.barrier().await {
            tracing::warn!(error = %e, invocation = %id, "final invocation record not written");
        }
        self.queue().forget(&id);
        self.events.publish(event);
        self.hand_to_waiter(&id, r);
    }

    /// Creates an invocation: `rejection` ends it `rejected` at once; otherwise it is queued
    /// and, with `live`, dispatched. Returns the record as created and the steps to run. The
    /// record is queued for the store; await [`Invocations::barrier`] before acknowledging.
    pub async fn create(
        &self,
        record: InvocationRecord,
        rejection: Option<String>,
        live: Option<SessionId>,
    ) -> (InvocationRecord, Vec<Next>) {
        let now = self.clock.now_ms();
        let (created, effects) = {
            let mut q = self.queue();
            let effects = q.create(record.clone(), rejection, live, now);
            let created = match effects.first() {
                Some(machine::Effect::Persist(r)) => r.clone(),
                _ => record,
            };
            (created, effects)
        };
        // Counted once here as started, and once by its final state when it ends.
        if created.state == InvocationState::Queued {
            self.metrics.invocation_started(&created.capability);
        }
        (created, self.apply(effects).await)
    }

    /// Ends an invocation that was never started (a batch reached its deadline before its
    /// turn): the final record is written and published like any other.
    pub async fn record_final(&self, record: InvocationRecord) {
        debug_assert!(record.state.is_final());
        self.finished(record).await;
    }

    /// Takes the unfinished invocations other anchors queued for `device`, which registered
    /// here on `session`, and offers this session everything it has for the node.
    pub async fn adopt(
        &self,
        records: Vec<InvocationRecord>,
        device: &DeviceId,
        session: SessionId,
    ) -> Vec<Next> {
        let now = self.clock.now_ms();
        let effects = {
            let mut q = self.queue();
            let adopted = q.adopt(records);
            if adopted > 0 {
                tracing::debug!(adopted, device_id = %device, "took invocations queued by other anchors");
            }
            q.session_up(device, session, now)
        };
        self.apply(effects).await
    }

    /// Another anchor holds the session of `device` now: its unfinished invocations are
    /// that anchor's to dispatch (from the store), and this one lets go of them.
    pub fn hand_over(&self, device: &DeviceId) {
        let n = self.queue().hand_over(device);
        if n > 0 {
            tracing::debug!(handed_over = n, device_id = %device, "the node's invocations went to the anchor that holds it");
        }
    }

    /// Lets go of one unfinished invocation another anchor will dispatch.
    pub fn hand_over_one(&self, id: &InvocationId) {
        self.queue().hand_over_one(id);
    }

    /// An invocation record another anchor wrote: a final one answers whoever waits here
    /// and is published; an unfinished one for a node live here (`live`) that this anchor does
    /// not have yet is taken and dispatched (it was queued elsewhere while the node was
    /// moving here).
    pub async fn remote(&self, r: InvocationRecord, live: Option<SessionId>) -> Vec<Next> {
        let id = InvocationId(r.id);
        let event = crate::events::AnchorEvent::invocation(&r);
        if r.state.is_final() {
            self.queue().hand_over_one(&id);
            self.events.publish(event);
            self.hand_to_waiter(&id, r);
            return Vec::new();
        }
        let now = self.clock.now_ms();
        let effects = match live {
            Some(session) if !self.queue().contains(&id) => {
                let device = r.device_id;
                let mut q = self.queue();
                q.adopt([r]);
                q.session_up(&device, session, now)
            }
            _ => {
                self.events.publish(event);
                Vec::new()
            }
        };
        self.apply(effects).await
    }

    fn hand_to_waiter(&self, id: &InvocationId, r: InvocationRecord) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id.0)
            .cloned();
        if let Some(w) = waiter {
            *w.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            w.notify.notify_waiters();
        }
    }

    /// Resolves once every record queued so far is on disk.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        self.writer.barrier().await
    }

    /// A node's session is live: its waiting work goes there.
    pub async fn session_up(&self, device: &DeviceId, session: SessionId) -> Vec<Next> {
        let now = self.clock.now_ms();
        let effects = self.queue().session_up(device, session, now);
        self.apply(effects).await
    }

    /// The dispatcher's report on one attempt; `live` is the node's live session now.
    pub async fn reply(&self, claim: &Claim, reply: Reply, live: Option<SessionId>) -> Vec<Next> {
        let now = self.clock.now_ms();
        let effects = self
            .queue()
            .reply(&claim.id, claim.attempt, reply, live, now);
        self.apply(effects).await
    }

    /// Offers a queued invocation again on `live`.
    pub async fn retry(&self, id: &InvocationId, live: Option<SessionId>) -> Vec<Next> {
        let now = self.clock.now_ms();
        let effects = self.queue().retry(id, live, now);
        self.apply(effects).await
    }

    /// Times out what passed its deadline.
    pub async fn sweep(&self) {
        let now = self.clock.now_ms();
        let effects = self.queue().sweep(now);
        self.apply(effects).await;
    }

    /// The device an unfinished invocation is for.
    pub fn device_of(&self, id: &InvocationId) -> Option<DeviceId> {
        self.queue().get(id).map(|r| r.device_id)
    }

    /// Devices with unfinished work.
    pub fn devices_with_work(&self) -> Vec<DeviceId> {
        self.queue().devices()
    }

    /// The current record of an invocation (memory for unfinished ones, else the store).
    /// Blocking when it reads the store.
    pub fn get(&self, id: &InvocationId) -> Result<Option<InvocationRecord>, StoreError> {
        if let Some(r) = self.queue().get(id) {
            return Ok(Some(r.clone()));
        }
        self.store.invocation(id)
    }

    /// The newest `limit` invocations `keep` accepts, each in its current state (blocking).
    pub fn newest(
        &self,
        limit: usize,
        keep: &dyn Fn(&InvocationRecord) -> bool,
    ) -> Result<Vec<InvocationRecord>, StoreError> {
        let stored = self.store.invocations_newest(limit, keep)?;
        let q = self.queue();
        Ok(stored
            .into_iter()
            .map(|r| q.get(&InvocationId(r.id)).cloned().unwrap_or(r))
            .collect())
    }

    /// Waits until the invocation ends or `limit` passes; returns its record then.
    pub async fn wait_final(
        &self,
        id: InvocationId,
        limit: Duration,
    ) -> Result<Option<InvocationRecord>, StoreError> {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.0)
            .or_default()
            .clone();
        let deadline = tokio::time::Instant::now() + limit;
        // In a shared store another anchor may be running it: its final record arrives
        // through the store's watch ([`Invocations::remote`]), unless it is there already.
        let mut stored_checked = !self.store.shared();
        let handed = loop {
            let notified = waiter.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let done = waiter
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if done.is_some() {
                break done;
            }
            if !self.queue().contains(&id) {
                if stored_checked {
                    break None;
                }
                stored_checked = true;
                let store = self.store.clone();
                match crate::store::blocking(move || store.invocation(&id)).await {
                    Ok(Some(r)) if !r.state.is_final() => {}
                    Ok(other) => break other,
                    Err(e) => {
                        self.waiters
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id.0);
                        return Err(e);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break None;
            }
        };
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id.0);
        if handed.is_some() {
            return Ok(handed);
        }
        let current = self.queue().get(&id).cloned();
        match current {
            Some(r) => Ok(Some(r)),
            None => {
                let store = self.store.clone();
                crate::store::blocking(move || store.invocation(&id)).await
            }
        }
    }

    /// Deletes finished invocations past the retention or beyond the count limit (blocking).
    pub fn prune(&self, retention: Duration, max_records: usize) -> Result<usize, StoreError> {
        let now = self.clock.now_ms();
        let before = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        self.store.prune_invocations(before, max_records)
    }
}
