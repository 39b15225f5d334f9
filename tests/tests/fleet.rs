//! Fleet operations end to end over netsim, simulated time: device labels and selectors
//! (issue 12, first part), through the real backend, router and store.

#![allow(clippy::unwrap_used)]

use anchorage_console::Backend;
use anchorage_console::api::{AuditQuery, MintCodeRequest, PairMethod};
use anchorage_sim::{Sim, lossy};
use anchorage_wire::labels::LabelChange;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

/// `GET path` through the console router with the owner token: (status, JSON).
async fn get(sim: &Sim, path: &str) -> (StatusCode, serde_json::Value) {
    let token = sim.anchor().owner_token().unwrap();
    call(sim, &token, "GET", path, None).await
}

fn set(k: &str, v: &str) -> LabelChange {
    LabelChange::Set(k.into(), v.into())
}

#[tokio::test(start_paused = true)]
async fn labels_select_devices_survive_a_restart_are_audited_and_leave_with_the_device() {
    let mut sim = Sim::start(0xf1ee7, lossy(0.0), |_| {}).await;
    let camera = sim.add_node("camera");
    let display = sim.add_node("display");
    let camera_id = sim.pair(&camera).await.device_id;
    let display_id = sim.pair(&display).await.device_id;
    let backend = sim.backend();
    backend
        .label(
            &sim.owner,
            camera_id,
            vec![set("site", "lab"), set("role", "camera")],
        )
        .await
        .unwrap();
    backend
        .label(
            &sim.owner,
            display_id,
            vec![set("site", "lab"), set("role", "display")],
        )
        .await
        .unwrap();

    let names = |v: &serde_json::Value| -> Vec<String> {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    for (selector, want) in [
        ("site%3Dlab", vec!["camera", "display"]),
        ("role%21%3Dcamera", vec!["display"]),
        ("role%20in%20(camera%2Cprinter)", vec!["camera"]),
        ("site%3Dlab%2C%21role", vec![]),
        ("node.anchorage%2Fplatform", vec!["camera", "display"]),
    ] {
        let (status, inv) = get(&sim, &format!("/console/v1/inventory?selector={selector}")).await;
        assert_eq!(status, StatusCode::OK, "{inv}");
        assert_eq!(names(&inv), want, "{selector}");
        assert_eq!(inv["summary"]["devices"], want.len(), "{selector}");
    }
    let (_, inv) = get(&sim, "/console/v1/inventory").await;
    let camera_entry = inv["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "camera")
        .unwrap();
    assert_eq!(camera_entry["labels"]["role"], "camera");
    assert!(
        camera_entry["labels"]["node.anchorage/platform"].is_string(),
        "the platform the node reported is a label: {camera_entry}"
    );

    let audit = backend
        .audit(AuditQuery {
            target: Some(camera_id.to_string()),
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    let labelled = audit.iter().find(|a| a.action == "device.label").unwrap();
    assert_eq!(labelled.detail, "site=lab role=camera");

    // Labels are in the store, not in memory.
    sim.restart().await;
    let device = sim.backend().device(camera_id).await.unwrap();
    assert_eq!(device.labels["site"], "lab");
    sim.backend()
        .label(
            &sim.owner,
            camera_id,
            vec![LabelChange::Remove("site".into())],
        )
        .await
        .unwrap();
    let (_, inv) = get(&sim, "/console/v1/inventory?selector=site%3Dlab").await;
    assert_eq!(names(&inv), vec!["display"]);

    // A removed device takes its labels with it; pairing again starts bare.
    sim.backend()
        .revoke(&sim.owner, display_id, None)
        .await
        .unwrap();
    sim.backend().remove(&sim.owner, display_id).await.unwrap();
    let (_, inv) = get(&sim, "/console/v1/inventory?selector=site%3Dlab").await;
    assert_eq!(names(&inv), Vec::<String>::new());
    let err = sim
        .backend()
        .label(&sim.owner, display_id, vec![set("site", "lab")])
        .await
        .unwrap_err();
    assert_eq!(err.code, "not_found");
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_device_gets_its_codes_labels_and_the_approvers_when_approved() {
    let sim = Sim::start(0xf1ee8, lossy(0.05), |_| {}).await;
    let minted = sim
        .backend()
        .mint_code(
            &sim.owner,
            MintCodeRequest {
                method: PairMethod::Pin,
                ttl_secs: None,
                labels: labels(&[("site", "lab"), ("role", "camera")]),
            },
        )
        .await
        .unwrap();
    assert_eq!(minted.labels["site"], "lab");
    let codes = sim.backend().list_codes().await.unwrap();
    let listed = codes.iter().find(|c| c.code_id == minted.code_id).unwrap();
    assert_eq!(
        listed.labels, minted.labels,
        "pair codes shows what the code carries"
    );
    let node = sim.add_node("cam-1");
    let task = node.spawn_pair(sim.addr(), &minted.code);
    let req = sim.wait_pending("cam-1").await;
    sim.backend()
        .approve_labelled(
            &sim.owner,
            &req.request_id,
            labels(&[("rack", "r1"), ("role", "ptz")]),
        )
        .await
        .unwrap();
    let paired = task.await.unwrap().unwrap();
    let device = sim.backend().device(paired.device_id).await.unwrap();
    assert_eq!(device.labels["site"], "lab", "{:?}", device.labels);
    assert_eq!(device.labels["rack"], "r1");
    assert_eq!(
        device.labels["role"], "ptz",
        "the approver's label wins over the code's"
    );

    // Reserved keys are refused at every door.
    for err in [
        sim.backend()
            .mint_code(
                &sim.owner,
                MintCodeRequest {
                    method: PairMethod::Pin,
                    ttl_secs: None,
                    labels: labels(&[("node.anchorage/os", "beos")]),
                },
            )
            .await
            .unwrap_err(),
        sim.backend()
            .label(
                &sim.owner,
                paired.device_id,
                vec![set("node.anchorage/os", "beos")],
            )
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code, "bad_request");
        assert!(err.message.contains("reserved"), "{}", err.message);
    }
    let audit = sim
        .backend()
        .audit(AuditQuery {
            target: Some(paired.device_id.to_string()),
            limit: Some(20),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.action == "device.label" && a.detail == "rack=r1 role=ptz site=lab"),
        "{audit:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Batches

use std::time::Duration;

use anchorage_console::api::{
    Batch, BatchRequest, CreateTokenRequest, DeviceId, InvocationState, Permission,
};
use anchorage_sim::{RunningAgent, SimNode, eventually};

/// Pairs and starts a node, labelled `labels`.
async fn labelled_node(
    sim: &Sim,
    name: &str,
    pairs: &[(&str, &str)],
) -> (SimNode, DeviceId, RunningAgent) {
    let node = sim.add_node(name);
    let id = sim.pair(&node).await.device_id;
    let changes = pairs.iter().map(|(k, v)| set(k, v)).collect();
    sim.backend().label(&sim.owner, id, changes).await.unwrap();
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(60)).await,
        "{name} registers"
    );
    (node, id, agent)
}

fn batch_req(selector: &str, capability: &str, timeout_ms: u64) -> BatchRequest {
    BatchRequest {
        selector: selector.parse().unwrap(),
        capability: capability.into(),
        input: serde_json::json!({ "hello": "fleet" }),
        timeout_ms: Some(timeout_ms),
        max_concurrency: None,
        devices: None,
    }
}

/// Polls the batch until it is done (panics after `limit`).
async fn finished(sim: &Sim, batch: &Batch, limit: Duration) -> Batch {
    let id = batch.info.batch_id;
    eventually(limit, || async {
        let b = sim.backend().batch(id).await.unwrap();
        b.info.done.then_some(b)
    })
    .await
    .unwrap_or_else(|| panic!("batch {id} did not finish within {limit:?}"))
}

fn state_of(batch: &Batch, device: DeviceId) -> InvocationState {
    batch
        .invocations
        .iter()
        .find(|i| i.device_id == device)
        .unwrap_or_else(|| panic!("{device} is not in the batch"))
        .state
}

#[tokio::test(start_paused = true)]
async fn a_batch_over_fifty_nodes_shows_who_answered_who_came_back_and_who_never_did() {
    let sim = Sim::start(0xba7c4, lossy(0.02), |_| {}).await;
    let mut nodes = Vec::new();
    for i in 0..50 {
        nodes.push(labelled_node(&sim, &format!("lab-{i:02}"), &[("site", "lab")]).await);
    }
    // Not matched by the selector: never part of the batch.
    let (_, elsewhere, _elsewhere_agent) = labelled_node(&sim, "home-1", &[("site", "home")]).await;

    // Five go offline and will come back within the deadline, two never come back.
    let mut returning = Vec::new();
    let mut gone = Vec::new();
    for _ in 0..5 {
        let (node, id, agent) = nodes.pop().unwrap();
        agent.stop().await.unwrap();
        returning.push((node, id));
    }
    for _ in 0..2 {
        let (node, id, agent) = nodes.pop().unwrap();
        agent.stop().await.unwrap();
        gone.push((node, id));
    }

    let mut events = sim.backend().subscribe();
    let created = sim
        .backend()
        .create_batch(&sim.owner, batch_req("site=lab", "echo", 60_000))
        .await
        .unwrap();
    assert_eq!(created.info.total, 50);
    assert_eq!(created.info.pending, 50, "{:?}", created.info);
    assert!(created.invocations.iter().all(|i| i.device_id != elsewhere));

    // The offline ones wait; the rest answer.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let midway = sim.backend().batch(created.info.batch_id).await.unwrap();
    assert_eq!(midway.info.succeeded, 43, "{:?}", midway.info);
    assert_eq!(midway.info.pending, 7);
    for (_, id) in returning.iter().chain(&gone) {
        assert_eq!(
            state_of(&midway, *id),
            InvocationState::Queued,
            "{id} waits"
        );
    }
    // Subscribers were told of the last of those results too, not only of the ones before.
    let mut told = None;
    while let Ok(e) = events.try_recv() {
        if e.kind == "batch" {
            told = Some(e.data);
        }
    }
    let told = told.expect("batch events while it ran");
    assert_eq!(told["succeeded"], 43, "{told}");
    assert_eq!(told["pending"], 7, "{told}");

    let mut back = Vec::new();
    for (node, _) in &returning {
        back.push(node.start_agent(sim.addr(), |_| {}));
    }
    let done = finished(&sim, &created, Duration::from_secs(90)).await;
    let i = &done.info;
    assert_eq!(
        (
            i.total,
            i.succeeded,
            i.failed,
            i.timed_out,
            i.rejected,
            i.pending
        ),
        (50, 48, 0, 2, 0, 0),
        "{i:?}"
    );
    for (_, id) in &returning {
        assert_eq!(
            state_of(&done, *id),
            InvocationState::Succeeded,
            "{id} came back"
        );
    }
    for (_, id) in &gone {
        assert_eq!(
            state_of(&done, *id),
            InvocationState::TimedOut,
            "{id} never came back"
        );
    }
    for inv in done
        .invocations
        .iter()
        .filter(|i| i.state == InvocationState::Succeeded)
    {
        assert_eq!(
            inv.output,
            Some(serde_json::json!({ "hello": "fleet" })),
            "{}",
            inv.name
        );
        // Each is an ordinary invocation too.
        let single = sim.backend().invocation(inv.invocation_id).await.unwrap();
        assert_eq!(single.device_id, inv.device_id);
        assert_eq!(single.state, InvocationState::Succeeded);
    }

    // Progress was published, and the last batch event says what the batch says.
    let mut last = None;
    while let Ok(e) = events.try_recv() {
        if e.kind == "batch" {
            last = Some(e);
        }
    }
    let last = last.expect("batch events were published");
    assert_eq!(last.data["done"], true, "{}", last.data);
    assert_eq!(last.data["succeeded"], 48);
    assert_eq!(last.data["timed_out"], 2);

    let listed = sim.backend().list_batches(10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], done.info);
    for agent in back {
        agent.stop().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_batch_survives_an_anchor_restart_and_finishes_after_it() {
    let mut sim = Sim::start(0xba7c5, lossy(0.0), |_| {}).await;
    let (_a, a, _agent_a) = labelled_node(&sim, "a", &[("role", "camera")]).await;
    let (_b, b, _agent_b) = labelled_node(&sim, "b", &[("role", "camera")]).await;
    let (sleeper, c, agent_c) = labelled_node(&sim, "c", &[("role", "camera")]).await;
    agent_c.stop().await.unwrap();
    let created = sim
        .backend()
        .create_batch(&sim.owner, batch_req("role=camera", "echo", 600_000))
        .await
        .unwrap();
    let partial = eventually(Duration::from_secs(30), || async {
        let b = sim.backend().batch(created.info.batch_id).await.unwrap();
        (b.info.succeeded == 2).then_some(b)
    })
    .await
    .expect("the two online nodes answer");
    assert_eq!(state_of(&partial, c), InvocationState::Queued);

    sim.restart().await;
    let after = sim.backend().batch(created.info.batch_id).await.unwrap();
    assert_eq!(after.info.total, 3);
    assert_eq!(after.info.succeeded, 2, "results survive: {:?}", after.info);
    assert_eq!(state_of(&after, a), InvocationState::Succeeded);
    assert_eq!(state_of(&after, b), InvocationState::Succeeded);
    assert_eq!(state_of(&after, c), InvocationState::Queued);

    // The offline node comes back after the restart and gets its invocation.
    let _agent_c = sleeper.start_agent(sim.addr(), |_| {});
    let done = finished(&sim, &created, Duration::from_secs(90)).await;
    assert_eq!(done.info.succeeded, 3, "{:?}", done.info);
    assert!(sim.backend().list_batches(5).await.unwrap()[0].done);
}

#[tokio::test(start_paused = true)]
async fn with_a_concurrency_limit_an_unanswered_invocation_holds_its_place_until_the_deadline() {
    let sim = Sim::start(0xba7c6, lossy(0.0), |_| {}).await;
    let mut nodes = Vec::new();
    for name in ["p", "q", "r", "s"] {
        nodes.push(labelled_node(&sim, name, &[("rack", "r1")]).await);
    }
    // One at a time, in device id order: the first device is offline, so it holds the only
    // slot until the deadline and the others' turn never comes.
    nodes.sort_by_key(|(_, id, _)| *id);
    let (_, first, first_agent) = nodes.remove(0);
    first_agent.stop().await.unwrap();
    let mut req = batch_req("rack=r1", "echo", 20_000);
    req.max_concurrency = Some(1);
    let created = sim.backend().create_batch(&sim.owner, req).await.unwrap();
    assert_eq!(created.info.max_concurrency, Some(1));
    let done = finished(&sim, &created, Duration::from_secs(60)).await;
    assert_eq!(done.info.timed_out, 4, "{:?}", done.info);
    assert_eq!(state_of(&done, first), InvocationState::TimedOut);
    let never_started = done
        .invocations
        .iter()
        .filter(|i| {
            i.error
                .as_deref()
                .is_some_and(|e| e.contains("before its turn"))
        })
        .count();
    assert_eq!(never_started, 3, "{:?}", done.invocations);

    // All online: one at a time still finishes them all.
    let mut req = batch_req("rack=r1,!missing", "echo", 20_000);
    req.max_concurrency = Some(1);
    sim.backend()
        .label(&sim.owner, first, vec![set("missing", "yes")])
        .await
        .unwrap();
    let created = sim.backend().create_batch(&sim.owner, req).await.unwrap();
    let done = finished(&sim, &created, Duration::from_secs(60)).await;
    assert_eq!(
        (done.info.total, done.info.succeeded),
        (3, 3),
        "{:?}",
        done.info
    );
}

// ---------------------------------------------------------------------------------------------
// Scoped tokens

/// `method path` through the console router with `token`: (status, JSON or null).
async fn call(
    sim: &Sim,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let body = body.map(|b| ("application/json", b.to_string()));
    sim.console_call(token, method, path, body).await
}

#[tokio::test(start_paused = true)]
async fn a_scoped_token_cannot_see_or_touch_a_device_outside_its_scope_anywhere() {
    let sim = Sim::start(0x5c0be, lossy(0.0), |_| {}).await;
    let (_l, lab, _lab_agent) = labelled_node(&sim, "lab-cam", &[("site", "lab")]).await;
    let (_h, home, _home_agent) = labelled_node(&sim, "home-cam", &[("site", "home")]).await;
    let created = sim
        .backend()
        .create_token(
            &sim.owner,
            CreateTokenRequest {
                name: Some("lab-ops".into()),
                permissions: vec![
                    Permission::ObservabilityRead,
                    Permission::NodesInvoke,
                    Permission::TrustOperate,
                ],
                selector: "site=lab".parse().unwrap(),
                capabilities: vec!["system.*".into(), "echo".into()],
                expires_in_secs: Some(3600),
            },
        )
        .await
        .unwrap();
    let token = created.token.clone();
    let (lab_s, home_s) = (lab.to_string(), home.to_string());

    // The event stream, opened before anything happens.
    let router = anchorage_console::router(sim.anchor().backend());
    let stream = router
        .oneshot(
            Request::get("/console/v1/events")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut stream = stream.into_body().into_data_stream();

    // Lists show only the lab device.
    for path in [
        "/console/v1/devices",
        "/console/v1/inventory",
        "/console/v1/nodes",
        "/console/v1/invocations",
        "/console/v1/audit",
    ] {
        let (status, body) = call(&sim, &token, "GET", path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        let text = body.to_string();
        assert!(
            !text.contains(&home_s),
            "{path} shows the home device: {text}"
        );
    }
    let (_, devices) = call(&sim, &token, "GET", "/console/v1/devices", None).await;
    assert_eq!(devices.as_array().unwrap().len(), 1);
    assert_eq!(devices[0]["device_id"], lab_s.as_str());
    assert_eq!(
        devices[0]["labels"]["node.anchorage/agent-version"],
        env!("CARGO_PKG_VERSION"),
        "the agent version the node registered with is a label: {devices}"
    );
    let (_, inventory) = call(&sim, &token, "GET", "/console/v1/inventory", None).await;
    assert_eq!(
        inventory["summary"]["devices"], 1,
        "{}",
        inventory["summary"]
    );

    // Every route about the home device refuses, naming the rule.
    let echo = serde_json::json!({ "capability": "echo", "input": 1 });
    for (method, path, body) in [
        ("GET", format!("/console/v1/devices/{home}"), None),
        ("GET", format!("/console/v1/inventory/{home}"), None),
        ("GET", format!("/console/v1/nodes/{home}"), None),
        (
            "POST",
            format!("/console/v1/nodes/{home}/invoke"),
            Some(echo.clone()),
        ),
        ("POST", format!("/console/v1/devices/{home}/revoke"), None),
        ("POST", format!("/console/v1/devices/{home}/rotate"), None),
        (
            "PATCH",
            format!("/console/v1/devices/{home}/labels"),
            Some(serde_json::json!({ "set": { "site": "lab" } })),
        ),
        ("DELETE", format!("/console/v1/devices/{home}"), None),
    ] {
        let (status, err) = call(&sim, &token, method, &path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {err}");
        assert_eq!(err["code"], "out_of_scope", "{method} {path}");
        assert!(
            err["message"].as_str().unwrap().contains("site=lab"),
            "{method} {path}: {err}"
        );
    }
    // The home device is untouched.
    let home_now = sim.backend().device(home).await.unwrap();
    assert_eq!(home_now.trust, anchorage_console::api::TrustState::Trusted);
    assert_eq!(home_now.labels["site"], "home");

    // Inside: it runs what its patterns allow, and nothing else.
    let (status, done) = call(
        &sim,
        &token,
        "POST",
        &format!("/console/v1/nodes/{lab}/invoke"),
        Some(echo.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["state"], "succeeded");
    let (status, err) = call(
        &sim,
        &token,
        "POST",
        &format!("/console/v1/nodes/{lab}/invoke"),
        Some(serde_json::json!({ "capability": "desktop.open_url" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        err["message"].as_str().unwrap().contains("system.*"),
        "{err}"
    );
    // An owner's invocation on the home device is not in its list or reachable by id.
    let theirs = sim
        .backend()
        .invoke(
            &sim.owner,
            home,
            anchorage_console::api::InvokeRequest {
                capability: "echo".into(),
                input: serde_json::json!(2),
                timeout_ms: Some(10_000),
                async_: false,
            },
        )
        .await
        .unwrap();
    let (status, _) = call(
        &sim,
        &token,
        "GET",
        &format!("/console/v1/invocations/{}", theirs.invocation_id),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // It cannot label its device out of its own scope.
    let (status, err) = call(
        &sim,
        &token,
        "PATCH",
        &format!("/console/v1/devices/{lab}/labels"),
        Some(serde_json::json!({ "set": { "site": "home" } })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    // A batch with it covers only its devices, even with a wider selector.
    let (status, batch) = call(
        &sim,
        &token,
        "POST",
        "/console/v1/batches",
        Some(serde_json::json!({ "selector": "", "capability": "echo" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{batch}");
    assert_eq!(batch["total"], 1);
    assert_eq!(batch["invocations"][0]["device_id"], lab_s.as_str());
    // The owner's batches are not its own.
    let owners = sim
        .backend()
        .create_batch(&sim.owner, batch_req("", "echo", 10_000))
        .await
        .unwrap();
    let (status, _) = call(
        &sim,
        &token,
        "GET",
        &format!("/console/v1/batches/{}", owners.info.batch_id),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, listed) = call(&sim, &token, "GET", "/console/v1/batches", None).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // Metrics cover the whole fleet.
    let (status, _) = call(&sim, &token, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Something happens to the home device that every unscoped subscriber would hear of.
    sim.backend()
        .label(&sim.owner, home, vec![set("floor", "2")])
        .await
        .unwrap();
    sim.backend()
        .label(&sim.owner, lab, vec![set("floor", "1")])
        .await
        .unwrap();

    // The stream carried the lab device's events and none of the home device's.
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut stream).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("\"floor\":\"1\"") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the lab device's label event arrived: {text}");
    assert!(text.contains(&lab_s), "{text}");
    assert!(
        !text.contains(&home_s),
        "the stream told of the home device: {text}"
    );
    assert!(
        text.contains("event: batch"),
        "its own batch's progress: {text}"
    );

    // Listed with its limits, expiry and last use.
    let tokens = sim.backend().list_tokens().await.unwrap();
    let listed = tokens.iter().find(|t| t.id == created.id).unwrap();
    assert_eq!(listed.scope.selector.to_string(), "site=lab");
    assert_eq!(listed.scope.capabilities, ["system.*", "echo"]);
    assert!(listed.expires_at.is_some());
    assert!(listed.last_used_at.is_some(), "{listed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_token_stops_working_when_it_expires() {
    let sim = Sim::start(0x5c0bf, lossy(0.0), |_| {}).await;
    let created = sim
        .backend()
        .create_token(
            &sim.owner,
            CreateTokenRequest {
                name: Some("short".into()),
                permissions: vec![Permission::ObservabilityRead],
                expires_in_secs: Some(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, _) = call(&sim, &created.token, "GET", "/console/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(61)).await;
    let (status, err) = call(&sim, &created.token, "GET", "/console/v1/devices", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    // A scoped token cannot be given tokens.manage (it could mint itself an unscoped one).
    let err = sim
        .backend()
        .create_token(
            &sim.owner,
            CreateTokenRequest {
                permissions: vec![Permission::TokensManage],
                selector: "site=lab".parse().unwrap(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, "bad_request");
}
