//! Batches (IO driver): one capability on every device a selector matched, as one invocation
//! per device.
//!
//! A batch is written once when it is created, with the invocation id of each device chosen
//! then, and once more when its last invocation ends. Its counts are never stored: they are
//! read from its invocations, so they cannot disagree with them.
//!
//! The driver task of a batch creates its invocations (all at once, or at most
//! `max_concurrency` unfinished at a time), waits for each to end and publishes the batch's
//! progress as `batch` events (at most every [`PROGRESS_INTERVAL`], and at the end). After a
//! restart, [`resume`] drives every unfinished batch again: invocations that exist are waited
//! for (the invocation service restored them), missing ones are created, and those whose turn
//! never came before the deadline are recorded `timed_out`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use anchorage_console::api::{Batch, BatchInfo, BatchInvocation, InvocationState};
use anchorage_wire::invoke::InvocationId;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::clock::to_odt;
use crate::events::AnchorEvent;
use crate::records::{BatchMember, BatchRecord, InvocationRecord};
use crate::services::Services;
use crate::store::{RuntimeWrite, StoreError};

/// Most devices one batch may cover.
pub const MAX_BATCH_DEVICES: usize = 100_000;
/// Most bytes of input one batch may copy into its invocations (input size × devices).
pub const MAX_BATCH_INPUT_BYTES: usize = 64 << 20;
/// Least time between two progress events of one batch.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How long a waiter sleeps between looks at one invocation (it is woken when it ends).
const WAIT_SLICE: Duration = Duration::from_secs(5);

/// Writes a new batch, waits until it is on disk, and starts its driver.
pub async fn create(s: &Arc<Services>, batch: BatchRecord) -> Result<(), StoreError> {
    s.writer.put(RuntimeWrite::Batch(batch.clone())).await;
    s.writer.barrier().await?;
    let driver = s.clone();
    s.spawn(async move { drive(driver, batch, false).await });
    Ok(())
}

/// Starts the drivers of the batches unfinished at the last stop.
pub fn resume(s: &Arc<Services>) {
    let batches = std::mem::take(
        &mut *s
            .unfinished_batches
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    for batch in batches {
        debug!(batch = %InvocationId(batch.id), "resuming batch");
        let driver = s.clone();
        s.spawn(async move { drive(driver, batch, true).await });
    }
}

/// Deletes batches that ended before the invocation retention (blocking).
pub fn prune(s: &Services) -> Result<usize, StoreError> {
    let keep = u64::try_from(s.live.retention().max_age.as_millis()).unwrap_or(u64::MAX);
    s.stores
        .runtime
        .prune_batches(s.clock.now_ms().saturating_sub(keep))
}

/// The invocation record a batch creates for `member`.
fn invocation_of(batch: &BatchRecord, member: &BatchMember, now_ms: u64) -> InvocationRecord {
    InvocationRecord::queued(
        member.invocation_id,
        member.device_id,
        batch.capability.clone(),
        batch.input.clone(),
        batch.requested_by.clone(),
        now_ms,
        batch.deadline_ms,
    )
}

/// The counts of a batch as its driver sees them, and when they were last published.
struct Progress {
    state: Mutex<ProgressState>,
}

struct ProgressState {
    info: BatchInfo,
    states: Vec<InvocationState>,
    last: Instant,
    /// A change is not published yet and a catch-up publish is scheduled.
    catching_up: bool,
}

impl Progress {
    fn new(batch: &BatchRecord) -> Progress {
        let states = vec![InvocationState::Queued; batch.members.len()];
        let mut info = info_of(batch);
        info.tally(states.iter().copied());
        Progress {
            state: Mutex::new(ProgressState {
                info,
                states,
                last: Instant::now(),
                catching_up: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Member `index` ended in `state`. The counts are published at once if the last event
    /// is [`PROGRESS_INTERVAL`] old, else once that much has passed (so no change waits for
    /// the next one to be told).
    fn ended(self: &Arc<Self>, s: &Arc<Services>, index: usize, state: InvocationState) {
        let wait = {
            let mut p = self.lock();
            if let Some(slot) = p.states.get_mut(index) {
                *slot = state;
            }
            let since = p.last.elapsed();
            if since >= PROGRESS_INTERVAL {
                publish(s, &mut p);
                return;
            }
            if p.catching_up {
                return;
            }
            p.catching_up = true;
            PROGRESS_INTERVAL - since
        };
        let (progress, services) = (self.clone(), s.clone());
        s.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = services.cancel.cancelled() => return,
            }
            let mut p = progress.lock();
            if p.catching_up {
                publish(&services, &mut p);
            }
        });
    }

    /// Publishes the counts now.
    fn publish(&self, s: &Services) {
        publish(s, &mut self.lock());
    }
}

fn publish(s: &Services, p: &mut ProgressState) {
    p.info.tally(p.states.iter().copied());
    p.last = Instant::now();
    p.catching_up = false;
    s.events.publish(AnchorEvent::Batch(p.info.clone()));
}

async fn drive(s: Arc<Services>, batch: BatchRecord, resumed: bool) {
    let id = InvocationId(batch.id);
    let total = batch.members.len();
    let limit = batch
        .max_concurrency
        .map_or(total, |n| n as usize)
        .clamp(1, total.max(1));
    let permits = Arc::new(Semaphore::new(limit));
    let progress = Arc::new(Progress::new(&batch));
    progress.publish(&s);
    // After a restart some invocations exist already (finished, or restored unfinished).
    let existing: Vec<Option<InvocationRecord>> = if resumed {
        let (reader, ids) = (
            s.clone(),
            batch
                .members
                .iter()
                .map(|m| InvocationId(m.invocation_id))
                .collect::<Vec<_>>(),
        );
        match crate::store::blocking(move || {
            ids.iter()
                .map(|i| reader.invocations.get(i))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        {
            Ok(found) => found,
            Err(e) => {
                warn!(batch = %id, error = %e, "cannot read a batch's invocations; not resumed");
                return;
            }
        }
    } else {
        vec![None; total]
    };
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(batch.deadline_ms.saturating_sub(s.clock.now_ms()));
    let mut waits = JoinSet::new();
    for (index, (member, found)) in batch.members.iter().zip(existing).enumerate() {
        let invocation = InvocationId(member.invocation_id);
        if let Some(r) = &found
            && r.state.is_final()
        {
            progress.ended(&s, index, r.state);
            continue;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.ok(),
            () = tokio::time::sleep_until(deadline) => None,
            () = s.cancel.cancelled() => return,
        };
        let now = s.clock.now_ms();
        if found.is_none() {
            let mut record = invocation_of(&batch, member, now);
            if permit.is_none() || now >= batch.deadline_ms {
                // Its turn never came before the deadline.
                record.state = InvocationState::TimedOut;
                record.finished_at_ms = Some(now);
                record.error = Some("the batch's deadline passed before its turn came".into());
                s.invocations.record_final(record).await;
                progress.ended(&s, index, InvocationState::TimedOut);
                continue;
            }
            let created = crate::dispatch::create(&s, record).await;
            if created.state.is_final() {
                progress.ended(&s, index, created.state);
                continue;
            }
        }
        let (waiter, progress) = (s.clone(), progress.clone());
        waits.spawn(async move {
            let _permit = permit;
            let state = loop {
                match waiter.invocations.wait_final(invocation, WAIT_SLICE).await {
                    Ok(Some(r)) if r.state.is_final() => break r.state,
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(%invocation, error = %e, "cannot read an invocation of a batch");
                        tokio::time::sleep(WAIT_SLICE).await;
                    }
                }
            };
            progress.ended(&waiter, index, state);
        });
    }
    loop {
        tokio::select! {
            next = waits.join_next() => if next.is_none() { break },
            () = s.cancel.cancelled() => return,
        }
    }
    // Every invocation is on disk (the service writes the final record before telling its
    // waiters); now the batch itself ends.
    let mut done = batch;
    done.finished_at_ms = Some(s.clock.now_ms());
    s.writer.put(RuntimeWrite::Batch(done)).await;
    if let Err(e) = s.writer.barrier().await {
        warn!(batch = %id, error = %e, "the end of a batch was not written");
    }
    progress.publish(&s);
}

/// A batch's counts and times, without its invocations (those are added by [`view`]).
fn info_of(b: &BatchRecord) -> BatchInfo {
    BatchInfo {
        batch_id: InvocationId(b.id),
        selector: b.selector.clone(),
        capability: b.capability.clone(),
        requested_by: b.requested_by.clone(),
        created_at: to_odt(b.created_at_ms),
        deadline_at: to_odt(b.deadline_ms),
        max_concurrency: b.max_concurrency,
        ..Default::default()
    }
}

/// A batch as the API shows it, every invocation in its current state (blocking: reads the
/// store for finished ones).
pub fn view(s: &Services, b: &BatchRecord) -> Result<Batch, StoreError> {
    let mut invocations = Vec::with_capacity(b.members.len());
    for m in &b.members {
        let id = InvocationId(m.invocation_id);
        let (state, output, error) = match s.invocations.get(&id)? {
            Some(r) => {
                let api = crate::inventory::invocation_api(&r);
                (api.state, api.output, api.error)
            }
            None if b.finished_at_ms.is_some() => (
                InvocationState::TimedOut,
                None,
                Some("the invocation's record is no longer kept".into()),
            ),
            None => (InvocationState::Queued, None, None),
        };
        invocations.push(BatchInvocation {
            device_id: m.device_id,
            name: m.name.clone(),
            invocation_id: id,
            state,
            output,
            error,
        });
    }
    let mut info = info_of(b);
    info.tally(invocations.iter().map(|i| i.state));
    Ok(Batch { info, invocations })
}

/// A new batch as the API shows it: every invocation `queued` (no store read).
pub fn view_new(b: &BatchRecord) -> Batch {
    let mut info = info_of(b);
    info.tally(b.members.iter().map(|_| InvocationState::Queued));
    Batch {
        info,
        invocations: b
            .members
            .iter()
            .map(|m| BatchInvocation {
                device_id: m.device_id,
                name: m.name.clone(),
                invocation_id: InvocationId(m.invocation_id),
                state: InvocationState::Queued,
                output: None,
                error: None,
            })
            .collect(),
    }
}
