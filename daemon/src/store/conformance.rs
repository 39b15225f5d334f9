//! The conformance suite every store backend must pass, written against [`TrustStore`] and
//! [`RuntimeStore`] only.
//!
//! A backend's tests call [`suite!`](crate::store::conformance::suite) with a function that
//! makes a fresh [`Backend`]; each check opens it, writes, drops it, opens it again and
//! reads, as fjall's own tests do.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test suite: failing loudly is the point

use std::sync::{Arc, Mutex};

use anchorage_mesh::DeviceId;
use anchorage_wire::invoke::InvocationId;

use super::*;

/// A backend under test: each `open` returns stores over the same state, so what one wrote
/// and committed, the next one reads.
pub trait Backend {
    /// Opens the stores (the previous ones are dropped first).
    fn open(&self) -> Result<Stores, StoreError>;
}

/// Expands to one `#[test]` per check, each on a fresh backend from `$make()`.
#[macro_export]
#[doc(hidden)]
macro_rules! __store_conformance_suite {
    ($make:path) => {
        $crate::__store_conformance_suite!(@each $make;
            write_drop_reopen_check,
            aborted_transactions_write_nothing,
            concurrent_read_modify_writes_lose_nothing,
            a_code_is_consumed_once,
            watchers_see_each_commit_in_order,
            removing_a_device_removes_its_runtime_records,
            labels_are_kept_per_device_and_go_with_it,
            label_changes_reach_watchers,
            audit_is_newest_first_filtered_and_bounded,
            invocations_load_query_and_prune,
            batches_load_query_and_prune,
            token_limits_and_uses_are_kept_and_watched,
            the_writer_keeps_order_and_barriers_wait,
            the_policy_is_versioned_kept_and_watched,
            history_is_kept_in_order_trimmed_and_forgotten,
        );
    };
    (@each $make:path; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::store::conformance::$check(&$make());
            }
        )*
    };
}
pub use crate::__store_conformance_suite as suite;

fn device(n: u8) -> DeviceId {
    DeviceId::from_bytes([n; anchorage_mesh::identity::DEVICE_ID_LEN])
}

fn code(id: &str) -> CodeRecord {
    CodeRecord {
        code_id: id.into(),
        method: CodeMethod::Pin,
        secret: "123456".into(),
        state: CodeState::Active,
        failed_attempts: 0,
        created_at_ms: 1,
        expires_at_ms: 1_000_000,
        ttl_ms: 999_999,
        created_by: "tester".into(),
    }
}

fn device_record(n: u8) -> DeviceRecord {
    DeviceRecord {
        device_id: device(n),
        name: format!("node-{n}"),
        platform: "linux".into(),
        trust: DeviceTrust::Trusted,
        cert_serial: vec![n, 1, 2],
        cert_der: vec![n; 8],
        cert_not_before_ms: 1,
        cert_not_after_ms: 2,
        paired_at_ms: 1,
        revoked_at_ms: None,
        revoked_reason: None,
        rotation_pending: false,
    }
}

fn token(id: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: "ci".into(),
        secret_hash: [7; 32],
        permissions: vec!["observability.read".into()],
        created_at_ms: 5,
        created_by: "tester".into(),
        revoked_at_ms: None,
    }
}

fn audit(at_ms: u64, target: &str) -> AuditRecord {
    AuditRecord {
        at_ms,
        actor: "tester".into(),
        action: "test".into(),
        target: target.into(),
        detail: String::new(),
    }
}

fn invocation(n: u8, state: InvocationState, created_at_ms: u64) -> InvocationRecord {
    let mut id = [n; 16];
    id[..8].copy_from_slice(&created_at_ms.to_be_bytes());
    InvocationRecord {
        id,
        device_id: device(1),
        capability: "echo".into(),
        input: b"{}".to_vec(),
        state,
        requested_by: "tester".into(),
        created_at_ms,
        deadline_ms: created_at_ms + 30_000,
        dispatched_at_ms: None,
        finished_at_ms: state.is_final().then_some(created_at_ms + 10),
        output: Vec::new(),
        truncated: false,
        error: None,
        duration_ms: None,
    }
}

fn open(b: &dyn Backend) -> Stores {
    b.open().expect("the backend opens")
}

/// Everything written and committed is read back after the store is dropped and reopened.
pub fn write_drop_reopen_check(b: &dyn Backend) {
    let request = RequestRecord {
        request_id: "req_1".into(),
        code_id: "ABCD".into(),
        device_id: device(1),
        device_name: "node-1".into(),
        platform: "linux".into(),
        csr_der: vec![1, 2, 3],
        sas: "12-34".into(),
        keys: anchorage_mesh::pairing::AfterKeys {
            result: [1; 32],
            resume: [2; 32],
        },
        state: RequestState::PendingApproval,
        requested_at_ms: 1,
        expires_at_ms: 2,
        cert_der: None,
        decided_by: None,
        decided_at_ms: None,
        reason: None,
    };
    let revocation = RevocationRecord {
        at_ms: 3,
        reason: "lost".into(),
    };
    {
        let s = open(b);
        transact(&*s.trust, |txn| {
            txn.put_code(&code("ABCD"))?;
            txn.put_request(&request)?;
            txn.put_device(&device_record(1))?;
            txn.put_token(&token("tok1"))?;
            txn.revoke(&Revoked::Device(device(2)), &revocation)?;
            txn.revoke(&Revoked::Serial(vec![9, 9]), &revocation)?;
            txn.audit(&audit(10, "ABCD"))?;
            Ok::<_, StoreError>(())
        })
        .expect("commit");
        s.runtime
            .apply(&[
                RuntimeWrite::Node(node(1)),
                RuntimeWrite::Presence(
                    device(1),
                    PresenceRecord {
                        last_seen_ms: 42,
                        stopped_cleanly: true,
                    },
                ),
                RuntimeWrite::Invocation(invocation(1, InvocationState::Queued, 100)),
            ])
            .expect("runtime writes");
    }
    let s = open(b);
    assert_eq!(s.trust.codes().unwrap(), vec![code("ABCD")]);
    assert_eq!(s.trust.request("req_1").unwrap(), Some(request));
    assert_eq!(s.trust.request("nope").unwrap(), None);
    assert_eq!(s.trust.devices().unwrap(), vec![device_record(1)]);
    assert_eq!(s.trust.device(&device(1)).unwrap(), Some(device_record(1)));
    assert_eq!(s.trust.device(&device(3)).unwrap(), None);
    assert_eq!(s.trust.tokens().unwrap(), vec![token("tok1")]);
    let mut revs = s.trust.revocations().unwrap();
    revs.sort_by_key(|(k, _)| matches!(k, Revoked::Serial(_)));
    assert_eq!(
        revs,
        vec![
            (Revoked::Device(device(2)), revocation.clone()),
            (Revoked::Serial(vec![9, 9]), revocation),
        ]
    );
    assert_eq!(
        s.trust.audit_newest(10, &|_| true).unwrap(),
        vec![audit(10, "ABCD")]
    );
    let snap = s.runtime.load().unwrap();
    assert_eq!(snap.nodes, vec![node(1)]);
    assert_eq!(
        snap.presence,
        vec![(
            device(1),
            PresenceRecord {
                last_seen_ms: 42,
                stopped_cleanly: true
            }
        )]
    );
    assert_eq!(
        snap.unfinished,
        vec![invocation(1, InvocationState::Queued, 100)]
    );
}

fn node(n: u8) -> NodeRecord {
    NodeRecord {
        device_id: device(n),
        name: format!("node-{n}"),
        platform: "linux".into(),
        agent_version: "0.1.0".into(),
        capabilities: vec![CapabilityRecord {
            name: "echo".into(),
            available: true,
            reason: None,
            description: "echo".into(),
        }],
        first_registered_at_ms: 1,
        registered_at_ms: 2,
    }
}

/// A transaction whose body fails leaves nothing behind and tells no watcher.
pub fn aborted_transactions_write_nothing(b: &dyn Backend) {
    let s = open(b);
    let seen = Arc::new(Mutex::new(0usize));
    let counter = seen.clone();
    s.trust.watch(Arc::new(move |_| {
        *counter.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }));
    let result: Result<(), StoreError> = transact(&*s.trust, |txn| {
        txn.put_code(&code("GONE"))?;
        txn.put_token(&token("gone"))?;
        Err(StoreError::Backend("the body changed its mind".into()))
    });
    assert!(result.is_err());
    drop(s);
    let s = open(b);
    assert!(s.trust.codes().unwrap().is_empty());
    assert!(s.trust.tokens().unwrap().is_empty());
    assert_eq!(*seen.lock().unwrap_or_else(|e| e.into_inner()), 0);
}

/// Read-modify-writes from many threads at once: none is lost.
pub fn concurrent_read_modify_writes_lose_nothing(b: &dyn Backend) {
    const THREADS: u32 = 8;
    const EACH: u32 = 25;
    let s = open(b);
    transact(&*s.trust, |txn| txn.put_code(&code("CNTR"))).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            let trust = s.trust.clone();
            scope.spawn(move || {
                for _ in 0..EACH {
                    transact(&*trust, |txn| {
                        let mut c = txn.code("CNTR")?.expect("the code exists");
                        c.failed_attempts += 1;
                        txn.put_code(&c)
                    })
                    .expect("commit");
                }
            });
        }
    });
    drop(s);
    let s = open(b);
    let c = s.trust.codes().unwrap();
    assert_eq!(c[0].failed_attempts, THREADS * EACH);
}

/// Many sessions try to consume one code at once: exactly one succeeds.
pub fn a_code_is_consumed_once(b: &dyn Backend) {
    let s = open(b);
    transact(&*s.trust, |txn| txn.put_code(&code("ONCE"))).unwrap();
    let winners = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let trust = s.trust.clone();
                scope.spawn(move || {
                    transact(&*trust, |txn| {
                        let mut c = txn.code("ONCE")?.expect("the code exists");
                        if c.state != CodeState::Active {
                            return Ok::<_, StoreError>(false);
                        }
                        c.state = CodeState::Consumed;
                        txn.put_code(&c)?;
                        Ok(true)
                    })
                    .expect("commit")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .filter(|won| *won)
            .count()
    });
    assert_eq!(winners, 1);
}

/// Watchers hear every committed change, with increasing revisions, before `transact`
/// returns to its caller.
pub fn watchers_see_each_commit_in_order(b: &dyn Backend) {
    let s = open(b);
    let seen: Arc<Mutex<Vec<Revision<TrustChange>>>> = Arc::default();
    let sink = seen.clone();
    s.trust.watch(Arc::new(move |c| {
        sink.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
    }));
    transact(&*s.trust, |txn| txn.put_token(&token("t1"))).unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the watcher ran before transact returned"
    );
    let mut revoked = token("t1");
    revoked.revoked_at_ms = Some(9);
    transact(&*s.trust, |txn| {
        txn.put_token(&revoked)?;
        txn.revoke(
            &Revoked::Device(device(4)),
            &RevocationRecord {
                at_ms: 9,
                reason: "r".into(),
            },
        )
    })
    .unwrap();
    transact(&*s.trust, |txn| txn.unrevoke(&Revoked::Device(device(4)))).unwrap();
    let seen = seen.lock().unwrap().clone();
    let changes: Vec<&TrustChange> = seen.iter().map(|r| &r.change).collect();
    assert_eq!(
        changes,
        vec![
            &TrustChange::Token(token("t1")),
            &TrustChange::Token(revoked),
            &TrustChange::Revocation(
                Revoked::Device(device(4)),
                Some(RevocationRecord {
                    at_ms: 9,
                    reason: "r".into()
                })
            ),
            &TrustChange::Revocation(Revoked::Device(device(4)), None),
        ]
    );
    assert!(seen[0].rev < seen[1].rev);
    assert_eq!(seen[1].rev, seen[2].rev, "one commit, one revision");
    assert!(seen[2].rev < seen[3].rev);
}

/// Removing a device also removes its registration and last-seen.
pub fn removing_a_device_removes_its_runtime_records(b: &dyn Backend) {
    {
        let s = open(b);
        transact(&*s.trust, |txn| {
            txn.put_device(&device_record(1))?;
            txn.put_device(&device_record(2))
        })
        .unwrap();
        s.runtime
            .apply(&[
                RuntimeWrite::Node(node(1)),
                RuntimeWrite::Node(node(2)),
                RuntimeWrite::Presence(
                    device(1),
                    PresenceRecord {
                        last_seen_ms: 1,
                        stopped_cleanly: false,
                    },
                ),
            ])
            .unwrap();
        transact(&*s.trust, |txn| txn.remove_device(&device(1))).unwrap();
    }
    let s = open(b);
    assert_eq!(s.trust.devices().unwrap(), vec![device_record(2)]);
    let snap = s.runtime.load().unwrap();
    assert_eq!(snap.nodes, vec![node(2)]);
    assert!(snap.presence.is_empty());
}

/// Labels persist per device, an empty set deletes them, and removing the device removes them.
pub fn labels_are_kept_per_device_and_go_with_it(b: &dyn Backend) {
    let labels = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    {
        let s = open(b);
        transact(&*s.trust, |txn| {
            txn.put_device(&device_record(1))?;
            txn.put_device(&device_record(2))?;
            txn.put_device(&device_record(3))?;
            txn.put_labels(
                &LabelOwner::Device(device(1)),
                &labels(&[("site", "lab"), ("role", "camera")]),
            )?;
            txn.put_labels(&LabelOwner::Device(device(2)), &labels(&[("site", "home")]))?;
            txn.put_labels(&LabelOwner::Device(device(3)), &labels(&[("x", "y")]))?;
            txn.put_labels(
                &LabelOwner::Code("K7QFM2XA".into()),
                &labels(&[("site", "lab")]),
            )
        })
        .unwrap();
        transact(&*s.trust, |txn| {
            assert_eq!(
                txn.labels(&LabelOwner::Device(device(2)))?,
                Some(labels(&[("site", "home")])),
                "a transaction reads what is stored"
            );
            txn.put_labels(&LabelOwner::Device(device(3)), &Labels::new())?;
            txn.remove_device(&device(2))
        })
        .unwrap();
    }
    let s = open(b);
    let mut all = s.trust.all_labels().unwrap();
    all.sort_by_key(|(owner, _)| format!("{owner:?}"));
    assert_eq!(
        all,
        vec![
            (
                LabelOwner::Code("K7QFM2XA".into()),
                labels(&[("site", "lab")])
            ),
            (
                LabelOwner::Device(device(1)),
                labels(&[("role", "camera"), ("site", "lab")])
            ),
        ]
    );
    assert_eq!(
        s.trust.labels_of(&LabelOwner::Device(device(1))).unwrap(),
        Some(labels(&[("site", "lab"), ("role", "camera")]))
    );
    assert_eq!(
        s.trust.labels_of(&LabelOwner::Device(device(3))).unwrap(),
        None
    );
}

/// Setting and clearing labels reaches watchers (the trust directory follows them).
pub fn label_changes_reach_watchers(b: &dyn Backend) {
    let s = open(b);
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        s.trust.watch(Arc::new(move |c| {
            if let TrustChange::Labels(..) = c.change {
                seen.lock().unwrap().push(c.change.clone());
            }
        }));
    }
    let owner = LabelOwner::Device(device(1));
    let labels: Labels = [("site".to_string(), "lab".to_string())].into();
    transact(&*s.trust, |txn| txn.put_labels(&owner, &labels)).unwrap();
    transact(&*s.trust, |txn| txn.put_labels(&owner, &Labels::new())).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            TrustChange::Labels(owner.clone(), Some(labels)),
            TrustChange::Labels(owner, None),
        ]
    );
}

/// The audit log reads newest first, filtered, at most `limit`.
pub fn audit_is_newest_first_filtered_and_bounded(b: &dyn Backend) {
    let s = open(b);
    for i in 0..20u64 {
        let target = if i % 2 == 0 { "even" } else { "odd" };
        transact(&*s.trust, |txn| txn.audit(&audit(100 + i, target))).unwrap();
    }
    // Two in the same millisecond keep their commit order.
    transact(&*s.trust, |txn| {
        txn.audit(&audit(500, "same-a"))?;
        txn.audit(&audit(500, "same-b"))
    })
    .unwrap();
    let newest = s.trust.audit_newest(3, &|_| true).unwrap();
    let targets: Vec<&str> = newest.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, vec!["same-b", "same-a", "odd"]);
    let odd = s.trust.audit_newest(100, &|r| r.target == "odd").unwrap();
    assert_eq!(odd.len(), 10);
    assert!(odd.windows(2).all(|w| w[0].at_ms > w[1].at_ms));
}

/// Unfinished invocations come back at start-up; queries are newest first; pruning removes
/// old and excess finished ones and never an unfinished one.
pub fn invocations_load_query_and_prune(b: &dyn Backend) {
    let s = open(b);
    let mut writes = Vec::new();
    for i in 0..10u8 {
        let state = if i < 8 {
            InvocationState::Succeeded
        } else {
            InvocationState::Queued
        };
        writes.push(RuntimeWrite::Invocation(invocation(
            i,
            state,
            1_000 + u64::from(i),
        )));
    }
    s.runtime.apply(&writes).unwrap();
    let newest = s.runtime.invocations_newest(3, &|_| true).unwrap();
    assert_eq!(
        newest.iter().map(|r| r.created_at_ms).collect::<Vec<_>>(),
        vec![1_009, 1_008, 1_007]
    );
    let id = InvocationId(invocation(3, InvocationState::Succeeded, 1_003).id);
    assert_eq!(
        s.runtime.invocation(&id).unwrap().map(|r| r.created_at_ms),
        Some(1_003)
    );
    // Finished before 1_012 (created 1_000..=1_001, finished +10): two go by age; then keep at
    // most 4 of the remaining six finished ones.
    assert_eq!(s.runtime.prune_invocations(1_012, 4).unwrap(), 4);
    drop(s);
    let s = open(b);
    let left = s.runtime.invocations_newest(100, &|_| true).unwrap();
    assert_eq!(
        left.iter().map(|r| r.created_at_ms).collect::<Vec<_>>(),
        vec![1_009, 1_008, 1_007, 1_006, 1_005, 1_004]
    );
    assert_eq!(s.runtime.load().unwrap().unfinished.len(), 2);
}

fn batch(n: u8, created_at_ms: u64, finished_at_ms: Option<u64>) -> BatchRecord {
    BatchRecord {
        id: invocation(n, InvocationState::Queued, created_at_ms).id,
        selector: "site=lab".into(),
        capability: "echo".into(),
        input: b"null".to_vec(),
        requested_by: "owner (t)".into(),
        created_at_ms,
        deadline_ms: created_at_ms + 30_000,
        max_concurrency: Some(2),
        members: (0..3)
            .map(|i| BatchMember {
                device_id: device(i),
                name: format!("d{i}"),
                invocation_id: [n.wrapping_add(i); 16],
            })
            .collect(),
        finished_at_ms,
    }
}

/// A batch reads back whole; only unfinished ones load at start-up; finished ones past the
/// cut are pruned.
pub fn batches_load_query_and_prune(b: &dyn Backend) {
    let s = open(b);
    let writes = vec![
        RuntimeWrite::Batch(batch(1, 1_000, Some(2_000))),
        RuntimeWrite::Batch(batch(2, 1_100, None)),
        RuntimeWrite::Batch(batch(3, 1_200, Some(9_000))),
    ];
    s.runtime.apply(&writes).unwrap();
    drop(s);
    let s = open(b);
    assert_eq!(
        s.runtime.batch(&batch(2, 1_100, None).id).unwrap(),
        Some(batch(2, 1_100, None))
    );
    let newest = s.runtime.batches_newest(2).unwrap();
    assert_eq!(
        newest.iter().map(|b| b.created_at_ms).collect::<Vec<_>>(),
        vec![1_200, 1_100]
    );
    let loaded = s.runtime.load().unwrap().batches;
    assert_eq!(loaded, vec![batch(2, 1_100, None)]);
    // Ending is a rewrite of the same key.
    s.runtime
        .apply(&[RuntimeWrite::Batch(batch(2, 1_100, Some(3_000)))])
        .unwrap();
    assert!(s.runtime.load().unwrap().batches.is_empty());
    assert_eq!(s.runtime.prune_batches(5_000).unwrap(), 2);
    let left = s.runtime.batches_newest(10).unwrap();
    assert_eq!(left, vec![batch(3, 1_200, Some(9_000))]);
}

/// A token's limits are written with it in one transaction and reach watchers; its last use
/// is runtime state that loads at start-up.
pub fn token_limits_and_uses_are_kept_and_watched(b: &dyn Backend) {
    let s = open(b);
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        s.trust.watch(Arc::new(move |c| {
            seen.lock().unwrap().push(c.change.clone());
        }));
    }
    let limits = TokenLimits {
        selector: "site=lab".into(),
        capabilities: vec!["system.*".into()],
        expires_at_ms: Some(5_000),
    };
    transact(&*s.trust, |txn| {
        txn.put_token_limits("tok1", &limits)?;
        txn.put_token(&token("tok1"))
    })
    .unwrap();
    assert_eq!(
        seen.lock().unwrap().first(),
        Some(&TrustChange::TokenLimits("tok1".into(), limits.clone()))
    );
    s.runtime
        .apply(&[
            RuntimeWrite::TokenUsed("tok1".into(), 4_000),
            RuntimeWrite::TokenUsed("tok1".into(), 4_500),
        ])
        .unwrap();
    drop(s);
    let s = open(b);
    assert_eq!(
        s.trust.token_limits().unwrap(),
        vec![("tok1".to_string(), limits)]
    );
    assert_eq!(
        s.runtime.load().unwrap().token_use,
        vec![("tok1".to_string(), 4_500)]
    );
}

/// Writes through the [`Writer`] land in order; a barrier resolves after they are committed.
pub fn the_writer_keeps_order_and_barriers_wait(b: &dyn Backend) {
    let s = open(b);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let writer = Writer::start(s.runtime.clone()).expect("a runtime");
        let states = [
            InvocationState::Queued,
            InvocationState::Dispatched,
            InvocationState::Queued,
            InvocationState::Dispatched,
            InvocationState::Succeeded,
        ];
        for _ in 0..50 {
            for state in states {
                writer
                    .put(RuntimeWrite::Invocation(invocation(7, state, 5)))
                    .await;
            }
        }
        writer.barrier().await.expect("barrier");
    });
    drop(rt);
    let id = InvocationId(invocation(7, InvocationState::Queued, 5).id);
    assert_eq!(
        s.runtime.invocation(&id).unwrap().map(|r| r.state),
        Some(InvocationState::Succeeded)
    );
}

/// Sets the next version of the mesh policy, as the trust service does: read the one in
/// force and write the next in one transaction. Returns the version written.
fn set_policy(trust: &dyn TrustStore, text: &str, at_ms: u64) -> u64 {
    transact(trust, |txn| {
        let version = txn.policy()?.map_or(1, |p| p.version + 1);
        txn.put_policy(&PolicyRecord {
            version,
            text: text.into(),
            updated_ms: at_ms,
            updated_by: "tester".into(),
        })?;
        Ok::<_, StoreError>(version)
    })
    .expect("commit")
}

/// The mesh policy: every version kept (the newest [`POLICY_HISTORY`]), the newest in force
/// after a reopen, each change seen by watchers, and versions never made twice when several
/// writers set it at once.
pub fn the_policy_is_versioned_kept_and_watched(b: &dyn Backend) {
    let s = open(b);
    assert_eq!(s.trust.policy().unwrap(), None, "a new store has no policy");
    assert!(s.trust.policy_history(10).unwrap().is_empty());
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        let seen = seen.clone();
        s.trust.watch(Arc::new(move |c| {
            if let TrustChange::Policy(p) = &c.change {
                seen.lock().unwrap().push(p.version);
            }
        }));
    }
    assert_eq!(set_policy(&*s.trust, "# first", 10), 1);
    assert_eq!(set_policy(&*s.trust, "# second", 20), 2);
    assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    drop(s);

    let s = open(b);
    let current = s.trust.policy().unwrap().expect("a policy after reopen");
    assert_eq!(
        current,
        PolicyRecord {
            version: 2,
            text: "# second".into(),
            updated_ms: 20,
            updated_by: "tester".into(),
        }
    );
    let history = s.trust.policy_history(10).unwrap();
    let versions: Vec<(u64, &str)> = history
        .iter()
        .map(|p| (p.version, p.text.as_str()))
        .collect();
    assert_eq!(versions, vec![(2, "# second"), (1, "# first")]);

    // Writers at once: each version is made exactly once.
    const THREADS: u64 = 4;
    const EACH: u64 = 5;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let trust = s.trust.clone();
            scope.spawn(move || {
                for i in 0..EACH {
                    set_policy(&*trust, &format!("# writer {t} change {i}"), 30);
                }
            });
        }
    });
    let last = 2 + THREADS * EACH;
    assert_eq!(s.trust.policy().unwrap().unwrap().version, last);
    let versions: Vec<u64> = s
        .trust
        .policy_history(1000)
        .unwrap()
        .iter()
        .map(|p| p.version)
        .collect();
    assert_eq!(versions, (1..=last).rev().collect::<Vec<_>>());

    // Past the retention, the oldest go.
    let total = POLICY_HISTORY as u64 + 3;
    for _ in last..total {
        set_policy(&*s.trust, "# later", 40);
    }
    drop(s);
    let s = open(b);
    let history = s.trust.policy_history(1000).unwrap();
    assert_eq!(history.len(), POLICY_HISTORY);
    assert_eq!(history.first().map(|p| p.version), Some(total));
    assert_eq!(
        history.last().map(|p| p.version),
        Some(total - POLICY_HISTORY as u64 + 1)
    );
    assert_eq!(s.trust.policy().unwrap().unwrap().version, total);
}

fn history_sample(at_ms: u64, rtt_ms: f64) -> HistoryEntry {
    HistoryEntry::Sample(HistorySample {
        at_ms,
        rtt_ms: Some(rtt_ms),
        loss: Some(0.25),
        heartbeat_age_ms: Some(900),
        presence: anchorage_wire::Presence::Online,
    })
}

/// History entries load by device then time (whatever order they were written in), one of the
/// same time and kind replaces the other, a removal removes exactly one entry, and forgetting
/// a device removes all of its history and nothing of another's.
pub fn history_is_kept_in_order_trimmed_and_forgotten(b: &dyn Backend) {
    let offline = HistoryEntry::Presence {
        at_ms: 20,
        presence: anchorage_wire::Presence::Offline,
    };
    {
        let s = open(b);
        s.runtime
            .apply(&[
                RuntimeWrite::History(device(2), history_sample(5, 1.0)),
                RuntimeWrite::History(device(1), history_sample(30, 3.0)),
                RuntimeWrite::History(device(1), history_sample(10, 1.0)),
                RuntimeWrite::History(device(1), offline),
                RuntimeWrite::History(device(1), history_sample(20, 2.0)),
                // The same time and kind: replaces.
                RuntimeWrite::History(device(1), history_sample(10, 1.5)),
            ])
            .unwrap();
    }
    {
        let s = open(b);
        let snap = s.runtime.load().unwrap();
        let d1: Vec<HistoryEntry> = snap
            .history
            .iter()
            .filter(|(d, _)| *d == device(1))
            .map(|(_, e)| *e)
            .collect();
        assert_eq!(
            d1,
            vec![
                history_sample(10, 1.5),
                history_sample(20, 2.0),
                offline,
                history_sample(30, 3.0),
            ]
        );
        s.runtime
            .apply(&[
                RuntimeWrite::HistoryRemove(device(1), history_sample(10, 1.5)),
                RuntimeWrite::HistoryRemove(device(1), offline),
            ])
            .unwrap();
    }
    {
        let s = open(b);
        let snap = s.runtime.load().unwrap();
        assert_eq!(
            snap.history,
            vec![
                (device(1), history_sample(20, 2.0)),
                (device(1), history_sample(30, 3.0)),
                (device(2), history_sample(5, 1.0)),
            ]
        );
        s.runtime
            .apply(&[RuntimeWrite::HistoryForget(device(1))])
            .unwrap();
    }
    let s = open(b);
    assert_eq!(
        s.runtime.load().unwrap().history,
        vec![(device(2), history_sample(5, 1.0))]
    );
}
