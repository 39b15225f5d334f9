//! Dispatch (IO driver): runs the invocation service's [`Next`] steps on nodes' connections.
//!
//! Each dispatch is one bidirectional stream: request, optional progress, result; a small one
//! also travels as datagram copies beside it ([`copies`]), and the first result of either
//! path counts. What came of it goes back to the service as a [`Reply`]; the service says what to do next (another
//! session, a retry in a moment, nothing). Every task is owned by the anchor's tracker.

use std::sync::Arc;
use std::time::Duration;

use anchorage_mesh::framed::framed;
use anchorage_wire::PROTOCOL_VERSION;
use anchorage_wire::datagram::Datagram;
use anchorage_wire::invoke::{InvocationId, InvokeReply, InvokeRequest, InvokeResult, Outcome};
use tracing::{debug, warn};

use crate::invocations::{Claim, Ending, Next, Reply, copies};
use crate::records::{InvocationRecord, InvocationState};
use crate::services::Services;

/// Creates `record` on the invocation service and starts it: dispatched on the node's live
/// session now (unless the device is revoked), or queued until it registers; `rejected` at
/// once when the node's last registration says it cannot run the capability. The record is
/// queued for the store: await [`crate::invocations::Invocations::barrier`] before telling
/// anyone it exists.
pub async fn create(s: &Arc<Services>, record: InvocationRecord) -> InvocationRecord {
    // A live session proves trust without a store read: its certificate passed the live
    // revocation check at the handshake, and revoking or removing a device updates the
    // in-memory set and closes the session before the operator hears back.
    let device = record.device_id;
    let live = s
        .nodes
        .live(&device)
        .map(|(session, _)| session)
        .filter(|_| !s.trust.revocation().is_device_revoked(&device));
    let rejection = crate::inventory::rejection(s, &device, &record.capability);
    let (record, next) = s.invocations.create(record, rejection, live).await;
    if live.is_none() && s.nodes.held_elsewhere(&device) {
        // Another anchor of the cluster holds the node: it sees the record in the store and
        // dispatches it; the final record comes back the same way.
        s.invocations.hand_over_one(&InvocationId(record.id));
        end_if_abandoned(s, InvocationId(record.id), record.deadline_ms);
        return record;
    }
    // Dispatch while the record is being committed: the writer is ordered, so every later
    // state lands after it.
    spawn(s, next);
    record
}

/// How long after its deadline an invocation handed to another anchor is looked at again.
pub const HANDED_OVER_GRACE: Duration = Duration::from_secs(5);

/// Ends an invocation handed to another anchor if nobody ended it: from
/// [`HANDED_OVER_GRACE`] after its deadline on, every [`HANDED_OVER_GRACE`], if the store
/// still says it is unfinished and no anchor holds the node (its holder died and the node
/// came back nowhere), it is timed out here, so no record stays `queued` for ever.
fn end_if_abandoned(s: &Arc<Services>, id: InvocationId, deadline_ms: u64) {
    // Only the id and deadline are kept meanwhile (not the input), so a large batch handed
    // to other anchors costs a small task per invocation.
    let services = s.clone();
    s.spawn(async move {
        let s = services;
        let mut wait =
            Duration::from_millis(deadline_ms.saturating_sub(s.clock.now_ms())) + HANDED_OVER_GRACE;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = s.cancel.cancelled() => return,
            }
            wait = HANDED_OVER_GRACE;
            let store = s.stores.runtime.clone();
            let current = match crate::store::blocking(move || store.invocation(&id)).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                // etcd away: look again later.
                Err(_) => continue,
            };
            if current.state.is_final() {
                return;
            }
            let device = current.device_id;
            // Someone holds the node (its sweep ends it) or this anchor took it back: look
            // again later, until it is final (a dead holder's lease lapses within seconds).
            if s.nodes.held_elsewhere(&device)
                || s.nodes.live(&device).is_some()
                || s.invocations.device_of(&id).is_some()
            {
                continue;
            }
            let why = if current.state == InvocationState::Dispatched {
                "the deadline passed before the node answered (its anchor went away)"
            } else {
                "the deadline passed before the node could take it"
            };
            let mut ended = current;
            ended.state = InvocationState::TimedOut;
            ended.finished_at_ms = Some(s.clock.now_ms());
            ended.error = Some(why.into());
            s.invocations.record_final(ended).await;
            return;
        }
    });
}

/// Runs `steps` in tasks of their own.
pub fn spawn(services: &Arc<Services>, steps: Vec<Next>) {
    for step in steps {
        let s = services.clone();
        services.spawn(async move { run(s, step).await });
    }
}

async fn run(services: Arc<Services>, first: Next) {
    let mut pending = vec![first];
    while let Some(step) = pending.pop() {
        let next = match step {
            Next::Dispatch(claim) => dispatch(&services, claim).await,
            Next::RetryAt(id, at_ms) => {
                let wait = at_ms.saturating_sub(services.clock.now_ms());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = services.cancel.cancelled() => return,
                }
                let live = services
                    .invocations
                    .device_of(&id)
                    .and_then(|d| services.nodes.live(&d))
                    .map(|(session, _)| session);
                services.invocations.retry(&id, live).await
            }
        };
        pending.extend(next);
    }
}

async fn dispatch(services: &Arc<Services>, claim: Claim) -> Vec<Next> {
    let reply = match services.nodes.session_conn(&claim.device, claim.session) {
        None => Reply::Lost,
        Some(conn) => {
            let remaining = claim.deadline_ms.saturating_sub(services.clock.now_ms());
            let deadline = tokio::time::Instant::now() + Duration::from_millis(remaining);
            let outcome = tokio::select! {
                r = tokio::time::timeout_at(deadline, on_stream(services, &conn, &claim, remaining)) => r,
                _ = services.cancel.cancelled() => return Vec::new(),
            };
            match outcome {
                Err(_) => Reply::Done(Ending::because(
                    InvocationState::TimedOut,
                    "the deadline passed before the node answered",
                )),
                Ok(Err(reason)) => {
                    debug!(invocation = %claim.id, %reason, "invocation stream broke");
                    Reply::Lost
                }
                Ok(Ok(result)) => reply_of(result),
            }
        }
    };
    if matches!(reply, Reply::Lost) && services.nodes.held_elsewhere(&claim.device) {
        // The node moved to another anchor, which takes the work from the store.
        services.invocations.hand_over_one(&claim.id);
        return Vec::new();
    }
    let live = services.nodes.live(&claim.device).map(|(s, _)| s);
    services.invocations.reply(&claim, reply, live).await
}

fn reply_of(result: InvokeResult) -> Reply {
    let state = match result.outcome {
        Outcome::Succeeded => InvocationState::Succeeded,
        Outcome::Failed => InvocationState::Failed,
        Outcome::TimedOut | Outcome::Expired => InvocationState::TimedOut,
        Outcome::Rejected => InvocationState::Rejected,
        Outcome::Duplicate | Outcome::Busy => return Reply::Retry,
        _ => InvocationState::Failed,
    };
    Reply::Done(Ending {
        state,
        output: result.output,
        truncated: result.truncated,
        error: result.error,
        duration_ms: Some(u64::from(result.duration_ms)),
    })
}

async fn on_stream(
    services: &Services,
    conn: &quinn::Connection,
    claim: &Claim,
    remaining_ms: u64,
) -> Result<InvokeResult, String> {
    let request = InvokeRequest {
        version: PROTOCOL_VERSION,
        id: claim.id,
        capability: claim.capability.clone(),
        input: claim.input.clone(),
        remaining_ms: u32::try_from(remaining_ms).unwrap_or(u32::MAX),
        output_limit: services.config.invocation_output_limit,
    };
    // A copy only for what fits a datagram (the stream carries everything), and only where
    // a lost packet costs more than a copy: not on a LAN that loses nothing, where copies
    // would only add work when the anchor is busy.
    let copy = (services.config.invocation_copies && copies::worth_it(conn))
        .then(|| Datagram::InvokeCopy(request.clone()).encode().ok())
        .flatten()
        .filter(|bytes| {
            conn.max_datagram_size()
                .is_some_and(|max| bytes.len() <= max)
        });
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = framed::<InvokeRequest, InvokeReply>(send, recv);
    let stream = async {
        tx.send(&request).await.map_err(|e| e.to_string())?;
        tx.finish().map_err(|e| e.to_string())?;
        loop {
            match rx.recv().await {
                Ok(Some(InvokeReply::Progress(_))) => continue,
                Ok(Some(InvokeReply::Result(r))) => return Ok(r),
                Ok(None) => return Err("stream ended without a result".into()),
                Err(e) => {
                    if e.is_peer_fault() {
                        warn!(error = %e, "bad invocation reply");
                    }
                    return Err(e.to_string());
                }
            }
        }
    };
    let Some(copy) = copy else {
        return stream.await;
    };
    let mut wait = services
        .invocations
        .copies()
        .expect(claim.id, claim.device, claim.session);
    let copies = send_copies(services, conn, copy);
    tokio::pin!(stream, copies);
    let mut copies_done = false;
    loop {
        tokio::select! {
            r = &mut stream => match r {
                // The copy that reached the node first is running it: its result comes as a
                // datagram (asked for by every copy), unless the copies run out first.
                Ok(r) if r.outcome == Outcome::Duplicate && !copies_done => {
                    let copy = tokio::select! {
                        c = wait.result() => c,
                        () = &mut copies => return Ok(r),
                    };
                    return Ok(copy);
                }
                other => return other,
            },
            r = wait.result() => {
                services.metrics.invocation_copy_won();
                return Ok(r);
            }
            () = &mut copies, if !copies_done => copies_done = true,
        }
    }
}

/// Sends the datagram copies of a request on their schedule ([`copies::Schedule`]), then
/// waits one more interval for the last one's answer.
async fn send_copies(services: &Services, conn: &quinn::Connection, copy: Vec<u8>) {
    let schedule = copies::Schedule::for_rtt(conn.rtt());
    tokio::time::sleep(schedule.first).await;
    for _ in 0..copies::MAX_COPIES {
        if conn.send_datagram(copy.clone().into()).is_err() {
            break;
        }
        services.metrics.invocation_copy_sent(copy.len());
        tokio::time::sleep(schedule.interval).await;
    }
}
