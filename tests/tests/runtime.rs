//! The node runtime end to end over netsim (issue 5): registration, heartbeats, presence,
//! invocations, under loss, partitions, address changes and anchor restarts. Simulated time.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{DeviceId, InvocationState, InvokeRequest, Presence, TrustState};
use anchorage_netsim::LinkConfig;
use anchorage_node::RunConfig;
use anchorage_node::capability::CommandSpec;
use anchorage_sim::{Sim, SimNode, eventually, lossy};

const SEED: u64 = 0x5e0;

fn invoke_req(
    capability: &str,
    input: serde_json::Value,
    timeout_ms: u64,
    async_: bool,
) -> InvokeRequest {
    InvokeRequest {
        capability: capability.into(),
        input,
        timeout_ms: Some(timeout_ms),
        async_,
    }
}

async fn presence_of(sim: &Sim, id: DeviceId) -> Presence {
    sim.backend().inventory_device(id).await.unwrap().presence
}

async fn wait_presence(sim: &Sim, id: DeviceId, want: Presence, limit: Duration) -> bool {
    eventually(limit, || async {
        (presence_of(sim, id).await == want).then_some(())
    })
    .await
    .is_some()
}

async fn paired_running(sim: &Sim, name: &str) -> (SimNode, DeviceId, anchorage_sim::RunningAgent) {
    let node = sim.add_node(name);
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(60)).await,
        "{name} registers"
    );
    (node, id, agent)
}

#[tokio::test(start_paused = true)]
async fn a_registered_node_is_online_and_answers_system_health() {
    let sim = Sim::start(SEED, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(1)
    })
    .await;
    let (_node, id, agent) = paired_running(&sim, "edge-1").await;
    assert!(wait_presence(&sim, id, Presence::Online, Duration::from_secs(10)).await);
    let inv = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("system.health", serde_json::Value::Null, 10_000, false),
        )
        .await
        .unwrap();
    assert_eq!(inv.state, InvocationState::Succeeded, "{inv:?}");
    assert_eq!(inv.output.as_ref().unwrap()["status"], "ok");
    let entry = sim.backend().inventory_device(id).await.unwrap();
    assert_eq!(entry.trust, TrustState::Trusted);
    assert!(
        entry.capabilities.total >= 4 && entry.capabilities.unavailable == 0,
        "{:?}",
        entry.capabilities
    );
    assert!(entry.connected && entry.connected_since.is_some());
    // Heartbeats flow, answered by QUIC's ACK alone: the node measures RTT and (no) loss on
    // its connection, and no heartbeat ack datagram comes back.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(agent.stats.heartbeats_sent.load(Ordering::Relaxed) >= 5);
    assert_eq!(agent.stats.acks_received.load(Ordering::Relaxed), 0);
    assert!(agent.stats.rtt_ms().is_some());
    assert_eq!(agent.stats.loss_rate(), Some(0.0));
    let entry = sim.backend().inventory_device(id).await.unwrap();
    assert!(entry.heartbeat_age_ms.unwrap() <= 2_000, "{entry:?}");
    assert_eq!(entry.loss_rate, Some(0.0));
    // A clean stop is offline at once.
    agent.stop().await.unwrap();
    assert!(wait_presence(&sim, id, Presence::Offline, Duration::from_millis(500)).await);
}

#[tokio::test(start_paused = true)]
async fn fifty_nodes_on_a_lossy_link_stay_online_for_an_hour() {
    let sim = Sim::start(SEED + 1, lossy(0.10), |_| {}).await;
    let mut nodes = Vec::new();
    for i in 0..50 {
        nodes.push(paired_running(&sim, &format!("fleet-{i:02}")).await);
    }
    let started = std::time::Instant::now();
    let mut worst = 0;
    for minute in 0..60 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let inv = sim.backend().inventory().await.unwrap();
        let not_online: Vec<_> = inv
            .devices
            .iter()
            .filter(|d| d.presence != Presence::Online && d.presence != Presence::Degraded)
            .map(|d| (&d.name, d.presence))
            .collect();
        assert!(not_online.is_empty(), "minute {minute}: {not_online:?}");
        worst = worst.max(inv.summary.degraded);
    }
    for (_, id, _) in &nodes {
        let inv = sim
            .backend()
            .invoke(
                &sim.owner,
                *id,
                invoke_req("system.health", serde_json::Value::Null, 20_000, false),
            )
            .await
            .unwrap();
        assert_eq!(inv.state, InvocationState::Succeeded, "{inv:?}");
    }
    let received = sim.anchor().shared_metrics().0;
    assert!(received > 50 * 200, "heartbeats flowed: {received}");
    eprintln!(
        "an hour of 50 nodes took {:?} real time; at most {worst} degraded at once",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_node_goes_stale_then_offline_then_comes_back() {
    let sim = Sim::start(SEED + 2, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(5);
        c.presence.stale_after = Duration::from_secs(60);
        c.presence.offline_after = Duration::from_secs(180);
    })
    .await;
    let (node, id, agent) = paired_running(&sim, "cut-off").await;
    assert!(wait_presence(&sim, id, Presence::Online, Duration::from_secs(10)).await);
    sim.net
        .partition(&[node.host.id()], &[sim.anchor_host.id()]);
    let cut = tokio::time::Instant::now();
    assert!(wait_presence(&sim, id, Presence::Stale, Duration::from_secs(90)).await);
    let stale_at = cut.elapsed();
    assert!(
        stale_at >= Duration::from_secs(55) && stale_at <= Duration::from_secs(70),
        "stale after {stale_at:?}"
    );
    assert!(wait_presence(&sim, id, Presence::Offline, Duration::from_secs(200)).await);
    let offline_at = cut.elapsed();
    assert!(
        offline_at >= Duration::from_secs(175) && offline_at <= Duration::from_secs(190),
        "offline after {offline_at:?}"
    );
    sim.net.heal();
    let healed = tokio::time::Instant::now();
    assert!(wait_presence(&sim, id, Presence::Online, Duration::from_secs(60)).await);
    let back = healed.elapsed();
    assert!(
        back <= Duration::from_secs(35),
        "online again {back:?} after healing (backoff cap 30 s)"
    );
    assert!(
        agent.registered(2, Duration::from_secs(5)).await,
        "it reconnected"
    );
}

#[tokio::test(start_paused = true)]
async fn invocations_under_loss_offline_delivery_and_deadlines() {
    let mut link = lossy(0.20);
    link.jitter = Duration::from_millis(30);
    let sim = Sim::start(SEED + 3, link, |_| {}).await;
    let (node, id, agent) = paired_running(&sim, "lossy").await;

    // Under 20 % loss and jitter an echo round-trips intact.
    let input = serde_json::json!({"hello": "world", "n": [1, 2, 3]});
    let inv = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("echo", input.clone(), 30_000, false),
        )
        .await
        .unwrap();
    assert_eq!(inv.state, InvocationState::Succeeded);
    assert_eq!(inv.output.unwrap(), input);

    // Offline: queued, persisted, delivered when the node returns.
    agent.stop().await.unwrap();
    let queued = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("echo", serde_json::json!("later"), 600_000, true),
        )
        .await
        .unwrap();
    assert_eq!(queued.state, InvocationState::Queued);
    // And one whose deadline passes while the node is away.
    let doomed = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("echo", serde_json::json!("too late"), 5_000, true),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let d = sim
        .backend()
        .invocation(doomed.invocation_id)
        .await
        .unwrap();
    assert_eq!(d.state, InvocationState::TimedOut);
    let agent = node.start_agent(sim.addr(), |_| {});
    let done = eventually(Duration::from_secs(60), || async {
        let r = sim
            .backend()
            .invocation(queued.invocation_id)
            .await
            .unwrap();
        r.state.is_final().then_some(r)
    })
    .await
    .expect("delivered once the node returned");
    assert_eq!(done.state, InvocationState::Succeeded, "{done:?}");
    assert_eq!(done.output.unwrap(), serde_json::json!("later"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        agent.stats.invocations_run.load(Ordering::Relaxed),
        1,
        "the timed-out one never ran on the node"
    );
    let list = sim
        .backend()
        .list_invocations(anchorage_console::api::InvocationQuery {
            device_id: Some(id),
            limit: None,
        })
        .await
        .unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].invocation_id, doomed.invocation_id, "newest first");
}

#[tokio::test(start_paused = true)]
async fn a_node_that_changes_address_keeps_its_connection() {
    let sim = Sim::start(
        SEED + 4,
        LinkConfig::preset(anchorage_netsim::Preset::Wifi),
        |c| c.presence.heartbeat_interval = Duration::from_secs(2),
    )
    .await;
    let (node, id, agent) = paired_running(&sim, "roamer").await;
    let before = sim.backend().node(id).await.unwrap().remote_addr.unwrap();
    node.host.rebind();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let inv = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("system.identity", serde_json::Value::Null, 20_000, false),
        )
        .await
        .unwrap();
    assert_eq!(inv.state, InvocationState::Succeeded);
    assert_eq!(inv.output.unwrap()["device_id"], serde_json::json!(id));
    let after = sim.backend().node(id).await.unwrap().remote_addr.unwrap();
    assert_ne!(before, after, "the anchor sees the new address");
    assert_eq!(
        agent.stats.registrations.load(Ordering::Relaxed),
        1,
        "same connection, no new handshake"
    );
}

#[tokio::test(start_paused = true)]
async fn an_anchor_restart_keeps_presence_queued_work_and_results() {
    let mut sim = Sim::start(SEED + 5, lossy(0.05), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(2)
    })
    .await;
    let (_a, id_a, agent_a) = paired_running(&sim, "survivor").await;
    let (_b, id_b, agent_b) = paired_running(&sim, "sleeper").await;
    let done = sim
        .backend()
        .invoke(
            &sim.owner,
            id_a,
            invoke_req("echo", serde_json::json!(1), 20_000, false),
        )
        .await
        .unwrap();
    assert_eq!(done.state, InvocationState::Succeeded);
    agent_b.stop().await.unwrap();
    let queued = sim
        .backend()
        .invoke(
            &sim.owner,
            id_b,
            invoke_req("echo", serde_json::json!(2), 3_600_000, true),
        )
        .await
        .unwrap();

    sim.restart().await;
    // Results and queued work survived; the stopped node is still known as offline.
    let r = sim.backend().invocation(done.invocation_id).await.unwrap();
    assert_eq!(r.state, InvocationState::Succeeded);
    assert_eq!(r.output.unwrap(), serde_json::json!(1));
    assert_eq!(
        sim.backend()
            .invocation(queued.invocation_id)
            .await
            .unwrap()
            .state,
        InvocationState::Queued
    );
    assert_eq!(presence_of(&sim, id_b).await, Presence::Offline);
    // The running node comes back by itself.
    assert!(
        agent_a.registered(2, Duration::from_secs(60)).await,
        "reconnected after the restart"
    );
    assert!(wait_presence(&sim, id_a, Presence::Online, Duration::from_secs(10)).await);
    let node_b = &_b;
    let agent_b = node_b.start_agent(sim.addr(), |_| {});
    let delivered = eventually(Duration::from_secs(60), || async {
        let r = sim
            .backend()
            .invocation(queued.invocation_id)
            .await
            .unwrap();
        r.state.is_final().then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(delivered.state, InvocationState::Succeeded);
    drop(agent_b);
}

fn spec(cmd: &[&str], timeout: &str) -> CommandSpec {
    CommandSpec {
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: Some(timeout.into()),
        max_output: None,
        description: None,
    }
}

#[tokio::test(start_paused = true)]
async fn unavailable_capabilities_degrade_and_reject_and_commands_report_failures() {
    let sim = Sim::start(SEED + 6, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(1)
    })
    .await;
    let node = sim.add_node("tools");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |c| {
        // Through the node's configuration, as `[capabilities.NAME]` in its TOML file.
        let add = |c: &mut RunConfig, name: &str, s: CommandSpec| {
            c.node.capabilities.insert(name.into(), s);
        };
        add(c, "missing", spec(&["/opt/does-not-exist/tool"], "10s"));
    });
    assert!(agent.registered(1, Duration::from_secs(60)).await);
    assert!(
        wait_presence(&sim, id, Presence::Degraded, Duration::from_secs(5)).await,
        "an unavailable capability degrades the node"
    );
    let entry = sim.backend().inventory_device(id).await.unwrap();
    assert!(
        entry
            .warnings
            .contains(&"capabilities_unavailable".to_string()),
        "{:?}",
        entry.warnings
    );
    assert_eq!(entry.capabilities.unavailable, 1);

    let r = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("missing", serde_json::Value::Null, 10_000, false),
        )
        .await
        .unwrap();
    assert_eq!(r.state, InvocationState::Rejected, "{r:?}");
    let r = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("no.such.thing", serde_json::Value::Null, 10_000, false),
        )
        .await
        .unwrap();
    assert_eq!(r.state, InvocationState::Rejected);
    // The refusal lists what the node has, so the operator sees the right name.
    let error = r.error.unwrap();
    assert!(error.contains("no capability no.such.thing"), "{error}");
    assert!(
        error.contains("it has: ") && error.contains("echo") && error.contains("system.health"),
        "{error}"
    );
}

/// Commands are real processes: this test runs on real time (a paused clock would jump ahead
/// while a child process works), still over netsim.
#[tokio::test]
async fn command_capabilities_take_json_in_and_out_and_report_failures_and_timeouts() {
    let sim = Sim::start(SEED + 7, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(1)
    })
    .await;
    let node = sim.add_node("tools");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |c| {
        // Through the node's configuration, as `[capabilities.NAME]` in its TOML file.
        let add = |c: &mut RunConfig, name: &str, s: CommandSpec| {
            c.node.capabilities.insert(name.into(), s);
        };
        add(c, "jq.identity", spec(&["cat"], "10s"));
        add(
            c,
            "boom",
            spec(&["sh", "-c", "echo broken >&2; exit 7"], "10s"),
        );
        add(c, "slow", spec(&["sleep", "30"], "1s"));
    });
    assert!(agent.registered(1, Duration::from_secs(30)).await);
    let input = serde_json::json!({"k": [1, 2]});
    let r = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("jq.identity", input.clone(), 10_000, false),
        )
        .await
        .unwrap();
    assert_eq!(r.state, InvocationState::Succeeded, "{r:?}");
    assert_eq!(r.output.unwrap(), input);
    let r = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("boom", serde_json::Value::Null, 10_000, false),
        )
        .await
        .unwrap();
    assert_eq!(r.state, InvocationState::Failed, "{r:?}");
    let err = r.error.unwrap();
    assert!(
        err.contains("exit code 7") && err.contains("broken"),
        "{err}"
    );
    let r = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("slow", serde_json::Value::Null, 10_000, false),
        )
        .await
        .unwrap();
    assert_eq!(r.state, InvocationState::TimedOut, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_revoked_or_removed_node_gets_no_invocation_even_while_still_connected() {
    let sim = Sim::start(SEED + 9, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(1)
    })
    .await;
    let (_a, revoked, agent_a) = paired_running(&sim, "to-revoke").await;
    let (_b, removed, agent_b) = paired_running(&sim, "to-remove").await;
    for id in [revoked, removed] {
        assert!(wait_presence(&sim, id, Presence::Online, Duration::from_secs(10)).await);
    }
    // Invoking a live node is answered without a store read; revoking and removing must still
    // take effect the moment the call returns, before the session has wound down.
    let sim = &sim;
    let refused = |id: DeviceId| async move {
        let err = sim
            .backend()
            .invoke(
                &sim.owner,
                id,
                invoke_req("echo", serde_json::json!("hi"), 5_000, false),
            )
            .await
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 404, "{err:?}");
    };
    sim.backend()
        .revoke(&sim.owner, revoked, Some("lost laptop".into()))
        .await
        .unwrap();
    refused(revoked).await;
    sim.backend().remove(&sim.owner, removed).await.unwrap();
    refused(removed).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    for agent in [&agent_a, &agent_b] {
        assert_eq!(agent.stats.invocations_run.load(Ordering::Relaxed), 0);
    }
}

/// The node's process dies without closing its connection (`kill -9`): its host goes down
/// first, so not even quinn's close on drop leaves it. Then a new process starts on a new
/// port, as `anchor-node run` would.
async fn kill_and_restart(node: &mut SimNode, agent: anchorage_sim::RunningAgent) {
    node.host.set_up(false);
    agent.task.abort();
    let _ = agent.task.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.host.set_up(true);
    node.endpoint = node.host.endpoint(0, None).unwrap();
}

fn killable_config(c: &mut anchorage_daemon::AnchorConfig) {
    c.presence.heartbeat_interval = Duration::from_secs(1);
    c.presence.stale_after = Duration::from_secs(3);
    c.presence.offline_after = Duration::from_secs(6);
}

/// The reported bug, step by step: kill -9 the node, wait until the inventory says offline,
/// invoke `--async`, start the node again at once. The invocation must reach the new session
/// and succeed, not sit `queued` with `dispatched_at` set until its deadline.
#[tokio::test(start_paused = true)]
async fn work_queued_for_a_killed_node_reaches_it_when_it_comes_back() {
    let sim = Sim::start(SEED + 20, lossy(0.0), killable_config).await;
    let (mut node, id, agent) = paired_running(&sim, "killed").await;
    assert!(wait_presence(&sim, id, Presence::Online, Duration::from_secs(10)).await);
    let killed = tokio::time::Instant::now();
    node.host.set_up(false);
    agent.task.abort();
    let _ = agent.task.await;
    assert!(wait_presence(&sim, id, Presence::Offline, Duration::from_secs(30)).await);
    // The anchor closed the half-open connection itself, within the documented bound.
    let inventory = sim.backend().inventory_device(id).await.unwrap();
    assert!(!inventory.connected, "the dead connection is not held open");
    assert!(killed.elapsed() < Duration::from_secs(10));
    let queued = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("echo", serde_json::json!({}), 60_000, true),
        )
        .await
        .unwrap();
    assert_eq!(queued.state, InvocationState::Queued);
    assert!(
        queued.dispatched_at.is_none(),
        "nothing dispatched into a dead session"
    );
    node.host.set_up(true);
    node.endpoint = node.host.endpoint(0, None).unwrap();
    let restarted = tokio::time::Instant::now();
    let _agent = node.start_agent(sim.addr(), |_| {});
    let done = final_state(&sim, queued.invocation_id).await;
    assert_eq!(done.state, InvocationState::Succeeded, "{done:?}");
    assert!(
        restarted.elapsed() < Duration::from_secs(10),
        "delivered as soon as the node registered, not at the deadline: {:?}",
        restarted.elapsed()
    );
}

/// The race underneath: work dispatched into the dead connection before the anchor noticed
/// it was dead, then the node registers again on a new session. The new session takes the
/// work over at once.
#[tokio::test(start_paused = true)]
async fn work_dispatched_into_a_dead_session_moves_to_the_new_one() {
    let sim = Sim::start(SEED + 21, lossy(0.0), killable_config).await;
    let (mut node, id, agent) = paired_running(&sim, "half-open").await;
    assert!(wait_presence(&sim, id, Presence::Online, Duration::from_secs(10)).await);
    kill_and_restart(&mut node, agent).await;
    // The anchor still believes the old session is live: the work goes into it.
    let inflight = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            invoke_req("echo", serde_json::json!("to the dead"), 60_000, true),
        )
        .await
        .unwrap();
    let dispatched = sim
        .backend()
        .invocation(inflight.invocation_id)
        .await
        .unwrap();
    assert_eq!(dispatched.state, InvocationState::Dispatched);
    assert!(dispatched.dispatched_at.is_some());
    let restarted = tokio::time::Instant::now();
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(10)).await);
    let done = final_state(&sim, inflight.invocation_id).await;
    assert_eq!(done.state, InvocationState::Succeeded, "{done:?}");
    assert_eq!(done.output, Some(serde_json::json!("to the dead")));
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "moved to the new session at once: {:?}",
        restarted.elapsed()
    );
    assert_eq!(agent.stats.invocations_run.load(Ordering::Relaxed), 1);
}

/// The invocation's record once it has ended (within a minute of simulated time).
async fn final_state(
    sim: &Sim,
    id: anchorage_wire::invoke::InvocationId,
) -> anchorage_console::api::Invocation {
    eventually(Duration::from_secs(60), || async {
        let r = sim.backend().invocation(id).await.unwrap();
        r.state.is_final().then_some(r)
    })
    .await
    .expect("the invocation ends")
}
