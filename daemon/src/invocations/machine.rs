//! The invocation lifecycle, without IO.
//!
//! `queued → dispatched → succeeded | failed | timed_out`, and `rejected` at creation for an
//! unknown or unavailable capability. [`Queue`] holds the unfinished invocations and decides
//! every transition from `now` and inputs, returning what to do: [`Claim`]s to send on a
//! session, records to persist, events to publish.
//!
//! Each dispatch is an *attempt*, bound to the session it went out on. The races this rules
//! out:
//! - a node registers again while an invocation is dispatched on its old, dead session: the
//!   new session takes it over at once (a new attempt), whatever the order of the events;
//! - a stream is lost after a newer attempt started, or an older attempt's `busy` arrives: it
//!   is ignored (only the current attempt can put work back in the queue);
//! - a result arrives after its stream was reported lost: a final result from any attempt
//!   ends the invocation if nothing else has (the node ran it once; it drops duplicates);
//! - the deadline passes while dispatched: the invocation times out and is never dispatched
//!   again; a result after that is ignored.

use std::collections::HashMap;

use anchorage_mesh::DeviceId;
use anchorage_wire::invoke::InvocationId;

use crate::events::AnchorEvent;
use crate::nodes::SessionId;
use crate::records::{InvocationRecord, InvocationState};

/// One dispatch to make: send invocation `id` on `session`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The invocation.
    pub id: InvocationId,
    /// The target.
    pub device: DeviceId,
    /// Which attempt this is; results of other attempts are judged by the rules above.
    pub attempt: u32,
    /// The session it goes out on.
    pub session: SessionId,
    /// Capability name.
    pub capability: String,
    /// Input JSON.
    pub input: Vec<u8>,
    /// Deadline, Unix ms.
    pub deadline_ms: u64,
}

/// How a dispatch ended, as the dispatcher saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A final result from the node.
    Done(Ending),
    /// The node is busy with it or saw it already; offer it again shortly.
    Retry,
    /// The stream broke before a result.
    Lost,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    /// Final state.
    pub state: InvocationState,
    /// Output (truncated to the limit by [`Queue`]).
    pub output: Vec<u8>,
    /// The node truncated it already.
    pub truncated: bool,
    /// Error detail.
    pub error: Option<String>,
    /// Time on the node.
    pub duration_ms: Option<u64>,
}

impl Ending {
    /// Ended without output, for a reason.
    pub fn because(state: InvocationState, error: &str) -> Ending {
        Ending {
            state,
            output: Vec::new(),
            truncated: false,
            error: Some(error.to_string()),
            duration_ms: None,
        }
    }
}

/// What the queue's driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write this record (ordered after every earlier write of it).
    Persist(InvocationRecord),
    /// Publish this event.
    Publish(AnchorEvent),
    /// Send this on its session.
    Dispatch(Claim),
    /// Offer this invocation again at this time (Unix ms), on whatever session is live then.
    RetryAt(InvocationId, u64),
    /// This record is final: persist it, wait until it is on disk, then [`Queue::forget`] it
    /// and tell whoever waits. It stays readable from the queue until then.
    Finished(InvocationRecord),
}

#[derive(Debug)]
struct Entry {
    record: InvocationRecord,
    attempt: u32,
    /// The session of the current attempt, while dispatched.
    on: Option<SessionId>,
}

/// Pause before offering again an invocation the node reported busy, or whose stream broke
/// while the session lived on.
pub const REDISPATCH_DELAY_MS: u64 = 500;

/// The unfinished invocations.
#[derive(Debug)]
pub struct Queue {
    active: HashMap<[u8; 16], Entry>,
    output_limit: usize,
}

fn event(r: &InvocationRecord) -> Effect {
    Effect::Publish(AnchorEvent::invocation(r))
}

impl Queue {
    /// An empty queue; outputs are kept up to `output_limit` bytes.
    pub fn new(output_limit: usize) -> Queue {
        Queue {
            active: HashMap::new(),
            output_limit,
        }
    }

    /// Takes back what was unfinished before a restart: it is queued again (the node drops
    /// duplicates), and dispatched when its node registers.
    pub fn restore(&mut self, records: impl IntoIterator<Item = InvocationRecord>) {
        self.adopt(records);
    }

    /// Takes unfinished invocations queued by another anchor of the cluster for a node this
    /// anchor now holds (those it already has stay as they are). Returns how many were new.
    pub fn adopt(&mut self, records: impl IntoIterator<Item = InvocationRecord>) -> usize {
        let mut new = 0;
        for mut record in records {
            if record.state.is_final() || self.active.contains_key(&record.id) {
                continue;
            }
            record.state = InvocationState::Queued;
            self.active.insert(
                record.id,
                Entry {
                    record,
                    attempt: 0,
                    on: None,
                },
            );
            new += 1;
        }
        new
    }

    /// Lets go of the unfinished invocations of `device` without ending them: another anchor
    /// holds its session and dispatches them from the store. Returns how many went.
    pub fn hand_over(&mut self, device: &DeviceId) -> usize {
        let before = self.active.len();
        self.active
            .retain(|_, e| e.record.device_id != *device || e.record.state.is_final());
        before - self.active.len()
    }

    /// Lets go of one unfinished invocation (see [`Queue::hand_over`]).
    pub fn hand_over_one(&mut self, id: &InvocationId) {
        if self
            .active
            .get(&id.0)
            .is_some_and(|e| !e.record.state.is_final())
        {
            self.active.remove(&id.0);
        }
    }

    /// A new invocation. `rejection` says why it cannot run (then it ends `rejected` at once);
    /// `live` is the node's live session, if any.
    pub fn create(
        &mut self,
        mut record: InvocationRecord,
        rejection: Option<String>,
        live: Option<SessionId>,
        now_ms: u64,
    ) -> Vec<Effect> {
        if let Some(error) = rejection {
            record.state = InvocationState::Rejected;
            record.finished_at_ms = Some(now_ms);
            record.error = Some(error);
            return vec![Effect::Persist(record.clone()), event(&record)];
        }
        record.state = InvocationState::Queued;
        let id = record.id;
        let mut effects = vec![Effect::Persist(record.clone()), event(&record)];
        self.active.insert(
            id,
            Entry {
                record,
                attempt: 0,
                on: None,
            },
        );
        if let Some(session) = live {
            effects.extend(self.claim(&id, session, now_ms));
        }
        effects
    }

    /// A node's session `session` is live (it just registered): every unfinished invocation
    /// of the node that is queued, or dispatched on another (older) session, goes to it.
    pub fn session_up(
        &mut self,
        device: &DeviceId,
        session: SessionId,
        now_ms: u64,
    ) -> Vec<Effect> {
        let ids: Vec<[u8; 16]> = self
            .active
            .values()
            .filter(|e| {
                e.record.device_id == *device
                    && match e.record.state {
                        InvocationState::Queued => true,
                        InvocationState::Dispatched => e.on != Some(session),
                        _ => false,
                    }
            })
            .map(|e| e.record.id)
            .collect();
        let mut effects = Vec::new();
        for id in ids {
            if let Some(e) = self.active.get_mut(&id)
                && e.record.state == InvocationState::Dispatched
            {
                // The older attempt is abandoned; whatever it reports is judged as stale.
                e.record.state = InvocationState::Queued;
                e.on = None;
            }
            effects.extend(self.claim(&id, session, now_ms));
        }
        effects
    }

    /// Offers a queued invocation again (after [`Effect::RetryAt`]) on `live`, if any.
    pub fn retry(
        &mut self,
        id: &InvocationId,
        live: Option<SessionId>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let Some(session) = live else {
            return Vec::new();
        };
        self.claim(&id.0, session, now_ms)
    }

    fn claim(&mut self, id: &[u8; 16], session: SessionId, now_ms: u64) -> Vec<Effect> {
        let Some(e) = self.active.get_mut(id) else {
            return Vec::new();
        };
        if e.record.state != InvocationState::Queued {
            return Vec::new();
        }
        if now_ms >= e.record.deadline_ms {
            return self.finish(
                id,
                Ending::because(
                    InvocationState::TimedOut,
                    "the deadline passed before the node could take it",
                ),
                now_ms,
            );
        }
        e.attempt += 1;
        e.on = Some(session);
        e.record.state = InvocationState::Dispatched;
        e.record.dispatched_at_ms = Some(now_ms);
        let claim = Claim {
            id: InvocationId(e.record.id),
            device: e.record.device_id,
            attempt: e.attempt,
            session,
            capability: e.record.capability.clone(),
            input: e.record.input.clone(),
            deadline_ms: e.record.deadline_ms,
        };
        vec![
            Effect::Persist(e.record.clone()),
            event(&e.record),
            Effect::Dispatch(claim),
        ]
    }

    /// The dispatcher's report on attempt `attempt`. `live` is the node's live session now.
    pub fn reply(
        &mut self,
        id: &InvocationId,
        attempt: u32,
        reply: Reply,
        live: Option<SessionId>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let Some(e) = self.active.get_mut(&id.0) else {
            return Vec::new();
        };
        if e.record.state.is_final() {
            return Vec::new();
        }
        match reply {
            Reply::Done(ending) => self.finish(&id.0, ending, now_ms),
            Reply::Retry | Reply::Lost if e.attempt != attempt => Vec::new(),
            Reply::Retry | Reply::Lost => {
                let lost_on = e.on.take();
                e.record.state = InvocationState::Queued;
                let mut effects = vec![Effect::Persist(e.record.clone()), event(&e.record)];
                match (reply, live) {
                    // A newer session is up: it takes the work now.
                    (Reply::Lost, Some(session)) if Some(session) != lost_on => {
                        effects.extend(self.claim(&id.0, session, now_ms));
                    }
                    // The same session lives on (or the node is busy): shortly.
                    (_, Some(_)) => effects.push(Effect::RetryAt(
                        *id,
                        now_ms.saturating_add(REDISPATCH_DELAY_MS),
                    )),
                    // Not connected: when the node registers again.
                    (_, None) => {}
                }
                effects
            }
        }
    }

    /// Unfinished invocations whose deadline passed time out (queued or dispatched).
    pub fn sweep(&mut self, now_ms: u64) -> Vec<Effect> {
        let expired: Vec<([u8; 16], InvocationState)> = self
            .active
            .values()
            .filter(|e| !e.record.state.is_final() && now_ms >= e.record.deadline_ms)
            .map(|e| (e.record.id, e.record.state))
            .collect();
        let mut effects = Vec::new();
        for (id, state) in expired {
            let why = if state == InvocationState::Queued {
                "the deadline passed before the node could take it"
            } else {
                "the deadline passed before the node answered"
            };
            effects.extend(self.finish(
                &id,
                Ending::because(InvocationState::TimedOut, why),
                now_ms,
            ));
        }
        effects
    }

    fn finish(&mut self, id: &[u8; 16], ending: Ending, now_ms: u64) -> Vec<Effect> {
        let Some(e) = self.active.get_mut(id) else {
            return Vec::new();
        };
        if e.record.state.is_final() {
            return Vec::new();
        }
        let r = &mut e.record;
        r.state = ending.state;
        r.finished_at_ms = Some(now_ms);
        r.truncated = ending.truncated || ending.output.len() > self.output_limit;
        r.output = ending.output;
        r.output.truncate(self.output_limit);
        r.error = ending.error;
        r.duration_ms = ending.duration_ms;
        e.on = None;
        vec![Effect::Finished(r.clone())]
    }

    /// Drops a finished invocation once its final record is on disk.
    pub fn forget(&mut self, id: &InvocationId) {
        if self
            .active
            .get(&id.0)
            .is_some_and(|e| e.record.state.is_final())
        {
            self.active.remove(&id.0);
        }
    }

    /// The current record of an unfinished (or just finished, not yet on disk) invocation.
    pub fn get(&self, id: &InvocationId) -> Option<&InvocationRecord> {
        self.active.get(&id.0).map(|e| &e.record)
    }

    /// Whether the invocation is still held (unfinished, or its final record not on disk).
    pub fn contains(&self, id: &InvocationId) -> bool {
        self.active.contains_key(&id.0)
    }

    /// Devices with unfinished work.
    pub fn devices(&self) -> Vec<DeviceId> {
        let mut d: Vec<DeviceId> = self.active.values().map(|e| e.record.device_id).collect();
        d.sort_unstable();
        d.dedup();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> DeviceId {
        DeviceId::from_bytes([1; anchorage_mesh::identity::DEVICE_ID_LEN])
    }

    fn record(n: u8, deadline_ms: u64) -> InvocationRecord {
        InvocationRecord::queued(
            [n; 16],
            device(),
            "echo".into(),
            b"{}".to_vec(),
            "op".into(),
            0,
            deadline_ms,
        )
    }

    fn claims(effects: &[Effect]) -> Vec<(u32, SessionId)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Dispatch(c) => Some((c.attempt, c.session)),
                _ => None,
            })
            .collect()
    }

    fn finished(effects: &[Effect]) -> Vec<InvocationState> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Finished(r) => Some(r.state),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn work_queued_elsewhere_is_adopted_once_and_handed_over_without_ending() {
        let mut q = Queue::new(1024);
        let mut dispatched = record(1, 10_000);
        dispatched.state = InvocationState::Dispatched;
        let mut done = record(3, 10_000);
        done.state = InvocationState::Succeeded;
        // Another anchor's records: the dispatched one is offered again (the node drops a
        // duplicate), the finished one is not taken, and a second copy changes nothing.
        assert_eq!(q.adopt([dispatched.clone(), record(2, 10_000), done]), 2);
        assert_eq!(q.adopt([dispatched]), 0);
        let fx = q.session_up(&device(), SessionId(4), 0);
        assert_eq!(claims(&fx), vec![(1, SessionId(4)); 2]);
        // The node moved on: this anchor lets go of both, writing and finishing nothing.
        q.hand_over(&device());
        assert!(q.devices().is_empty());
        assert!(finished(&q.sweep(20_000)).is_empty());
    }

    fn ok() -> Reply {
        Reply::Done(Ending {
            state: InvocationState::Succeeded,
            output: b"{}".to_vec(),
            truncated: false,
            error: None,
            duration_ms: Some(1),
        })
    }

    const A: SessionId = SessionId(1);
    const B: SessionId = SessionId(2);
    const ID: InvocationId = InvocationId([7; 16]);

    #[test]
    fn created_while_connected_is_dispatched_at_once_and_succeeds() {
        let mut q = Queue::new(1024);
        let fx = q.create(record(7, 60_000), None, Some(A), 0);
        assert_eq!(claims(&fx), vec![(1, A)]);
        assert_eq!(
            q.get(&ID).map(|r| r.state),
            Some(InvocationState::Dispatched)
        );
        let fx = q.reply(&ID, 1, ok(), Some(A), 10);
        assert_eq!(finished(&fx), vec![InvocationState::Succeeded]);
        // Readable until its final record is on disk, then gone.
        assert_eq!(
            q.get(&ID).map(|r| r.state),
            Some(InvocationState::Succeeded)
        );
        q.forget(&ID);
        assert!(!q.contains(&ID));
    }

    #[test]
    fn an_unknown_capability_is_rejected_and_never_queued() {
        let mut q = Queue::new(1024);
        let fx = q.create(
            record(7, 60_000),
            Some("no such capability".into()),
            Some(A),
            0,
        );
        assert!(claims(&fx).is_empty());
        assert!(matches!(&fx[0], Effect::Persist(r) if r.state == InvocationState::Rejected));
        assert!(!q.contains(&ID));
    }

    /// The reported bug: dispatched into a dead session; the node registers again on a new
    /// session before that stream is reported lost. The new session gets the work at once.
    #[test]
    fn registration_during_dispatch_moves_the_work_to_the_new_session() {
        let mut q = Queue::new(1024);
        q.create(record(7, 60_000), None, Some(A), 0);
        let fx = q.session_up(&device(), B, 100);
        assert_eq!(claims(&fx), vec![(2, B)]);
        // The dead stream's loss, reported late, does not requeue the new attempt.
        assert!(q.reply(&ID, 1, Reply::Lost, Some(B), 200).is_empty());
        assert_eq!(
            q.get(&ID).map(|r| r.state),
            Some(InvocationState::Dispatched)
        );
        let fx = q.reply(&ID, 2, ok(), Some(B), 300);
        assert_eq!(finished(&fx), vec![InvocationState::Succeeded]);
    }

    /// The other order: the stream is reported lost after the new session registered but
    /// before `session_up` ran for it (or without it): the live session is offered the work.
    #[test]
    fn a_stream_lost_after_a_new_session_is_up_redispatches_there() {
        let mut q = Queue::new(1024);
        q.create(record(7, 60_000), None, Some(A), 0);
        let fx = q.reply(&ID, 1, Reply::Lost, Some(B), 100);
        assert_eq!(claims(&fx), vec![(2, B)]);
        // session_up for B afterwards does not dispatch it twice.
        assert!(claims(&q.session_up(&device(), B, 110)).is_empty());
    }

    #[test]
    fn a_stream_lost_while_disconnected_waits_for_the_next_registration() {
        let mut q = Queue::new(1024);
        q.create(record(7, 60_000), None, Some(A), 0);
        let fx = q.reply(&ID, 1, Reply::Lost, None, 100);
        assert!(claims(&fx).is_empty());
        assert_eq!(q.get(&ID).map(|r| r.state), Some(InvocationState::Queued));
        assert_eq!(claims(&q.session_up(&device(), B, 200)), vec![(2, B)]);
    }

    #[test]
    fn a_stream_lost_on_a_live_session_or_busy_is_retried_shortly() {
        let mut q = Queue::new(1024);
        q.create(record(7, 60_000), None, Some(A), 0);
        let fx = q.reply(&ID, 1, Reply::Lost, Some(A), 100);
        assert!(fx.contains(&Effect::RetryAt(ID, 100 + REDISPATCH_DELAY_MS)));
        assert_eq!(claims(&q.retry(&ID, Some(A), 600)), vec![(2, A)]);
        let fx = q.reply(&ID, 2, Reply::Retry, Some(A), 700);
        assert!(fx.contains(&Effect::RetryAt(ID, 700 + REDISPATCH_DELAY_MS)));
        // A stale retry request of attempt 1 changes nothing.
        assert!(q.reply(&ID, 1, Reply::Retry, Some(A), 710).is_empty());
    }

    #[test]
    fn a_result_after_its_stream_was_reported_lost_still_ends_it_once() {
        let mut q = Queue::new(1024);
        q.create(record(7, 60_000), None, Some(A), 0);
        q.reply(&ID, 1, Reply::Lost, None, 100);
        let fx = q.reply(&ID, 1, ok(), None, 150);
        assert_eq!(finished(&fx), vec![InvocationState::Succeeded]);
        assert!(q.reply(&ID, 1, ok(), None, 160).is_empty(), "ends once");
        assert!(claims(&q.session_up(&device(), B, 200)).is_empty());
    }

    #[test]
    fn the_deadline_during_dispatch_times_it_out_and_a_late_result_is_ignored() {
        let mut q = Queue::new(1024);
        q.create(record(7, 1_000), None, Some(A), 0);
        assert!(q.sweep(999).is_empty());
        let fx = q.sweep(1_000);
        assert_eq!(finished(&fx), vec![InvocationState::TimedOut]);
        assert!(q.reply(&ID, 1, ok(), Some(A), 1_001).is_empty());
        assert_eq!(q.get(&ID).map(|r| r.state), Some(InvocationState::TimedOut));
    }

    #[test]
    fn queued_work_past_its_deadline_is_never_dispatched() {
        let mut q = Queue::new(1024);
        q.create(record(7, 1_000), None, None, 0);
        let fx = q.session_up(&device(), A, 1_500);
        assert!(claims(&fx).is_empty());
        assert_eq!(finished(&fx), vec![InvocationState::TimedOut]);
    }

    #[test]
    fn work_restored_after_a_restart_is_queued_again() {
        let mut q = Queue::new(1024);
        let mut r = record(7, 60_000);
        r.state = InvocationState::Dispatched;
        let mut done = record(8, 60_000);
        done.state = InvocationState::Succeeded;
        q.restore([r, done]);
        assert_eq!(q.devices(), vec![device()]);
        assert_eq!(claims(&q.session_up(&device(), A, 10)), vec![(1, A)]);
        assert!(!q.contains(&InvocationId([8; 16])));
    }

    #[test]
    fn output_is_kept_up_to_the_limit() {
        let mut q = Queue::new(4);
        q.create(record(7, 60_000), None, Some(A), 0);
        let fx = q.reply(
            &ID,
            1,
            Reply::Done(Ending {
                state: InvocationState::Succeeded,
                output: b"0123456789".to_vec(),
                truncated: false,
                error: None,
                duration_ms: None,
            }),
            Some(A),
            5,
        );
        match &fx[0] {
            Effect::Finished(r) => {
                assert_eq!(r.output, b"0123");
                assert!(r.truncated);
            }
            other => panic!("{other:?}"),
        }
    }
}
