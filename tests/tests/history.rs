//! Operators' habits over netsim, simulated time, through the real backend, router and store:
//! each device's history (`GET /inventory/{id}/history`: samples with RTT, presence changes,
//! kept across a restart, gone with the device), the audit log's filters (actor, action,
//! since/until), batches on an explicit list of devices, and pages of the inventory.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anchorage_sim::{Sim, lossy};
use axum::http::StatusCode;
use serde_json::{Value, json};

/// `method path` through the console router with the owner token: (status, JSON).
async fn call(sim: &Sim, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let token = sim.anchor().owner_token().unwrap();
    let body = body.map(|b| ("application/json", b.to_string()));
    sim.console_call(&token, method, path, body).await
}

async fn get(sim: &Sim, path: &str) -> (StatusCode, Value) {
    call(sim, "GET", path, None).await
}

fn presences(history: &Value) -> Vec<String> {
    history["presence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["presence"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn history_has_samples_and_presence_changes_survives_a_restart_and_goes_with_the_device() {
    let mut sim = Sim::start(0x4157, lossy(0.0), |c| {
        c.history.interval = Duration::from_secs(2);
        c.presence.heartbeat_interval = Duration::from_secs(1);
    })
    .await;
    let node = sim.add_node("historian");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(60)).await);
    // A few sampling intervals.
    tokio::time::sleep(Duration::from_secs(9)).await;

    let path = format!("/console/v1/inventory/{id}/history");
    let (status, h) = get(&sim, &path).await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert_eq!(h["device_id"], id.to_string());
    assert_eq!(h["interval_s"], 2.0);
    let samples = h["samples"].as_array().unwrap().clone();
    assert!(samples.len() >= 3, "a sample every 2 s: {h}");
    assert!(
        samples
            .iter()
            .all(|s| s["rtt_ms"].as_f64().is_some_and(|r| r > 0.0)),
        "every sample of a live session has its RTT: {h}"
    );
    assert!(samples.iter().all(|s| s["heartbeat_age_s"].is_number()));
    assert_eq!(samples.last().unwrap()["presence"], "online");
    assert_eq!(presences(&h), ["online"], "{h}");

    // A clean stop: offline at once, a presence change.
    agent.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, h) = get(&sim, &path).await;
    assert_eq!(presences(&h), ["online", "offline"], "{h}");
    let before = h["samples"].as_array().unwrap().len();

    // The window is bounded, and asked for in whole hours.
    for bad in ["0", "49", "x"] {
        let (status, body) = get(&sim, &format!("{path}?hours={bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "hours={bad}: {body}");
    }
    let (status, _) = get(&sim, &format!("{path}?hours=48")).await;
    assert_eq!(status, StatusCode::OK);

    // A restart on the same data directory keeps it.
    sim.restart().await;
    let (status, h) = get(&sim, &path).await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert_eq!(
        h["samples"].as_array().unwrap().len(),
        before,
        "the samples survive a restart: {h}"
    );
    assert_eq!(presences(&h)[..2], ["online", "offline"], "{h}");

    // A removed device's history goes with it, also from the store.
    let (status, body) = call(
        &sim,
        "POST",
        &format!("/console/v1/devices/{id}/revoke"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(&sim, "DELETE", &format!("/console/v1/devices/{id}"), None).await;
    assert!(status.is_success(), "{status} {body}");
    let services = sim.anchor().services().clone();
    let gone = anchorage_sim::eventually(Duration::from_secs(10), || {
        let services = services.clone();
        async move {
            let left = tokio::task::spawn_blocking(move || {
                let snapshot = services.stores.runtime.load().unwrap();
                snapshot.history.iter().filter(|(d, _)| *d == id).count()
            })
            .await
            .unwrap();
            (left == 0).then_some(())
        }
    })
    .await;
    assert!(
        gone.is_some(),
        "the store still holds the removed device's history"
    );
    assert!(services.history.view(&id, 0).samples.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_audit_log_filters_by_device_actor_action_and_time() {
    let sim = Sim::start(0xa0d17, lossy(0.0), |_| {}).await;
    let one = sim.add_node("audited-one");
    let two = sim.add_node("audited-two");
    let id_one = sim.pair(&one).await.device_id;
    sim.pair(&two).await;
    let (status, all) = get(&sim, "/console/v1/audit").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let all = all.as_array().unwrap().clone();
    let actions = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(all.iter().any(|e| e["action"] == "pairing.approve"));
    let actor = all.iter().find(|e| e["action"] == "pairing.mint").unwrap()["actor"]
        .as_str()
        .unwrap()
        .to_string();

    // By action: exactly, or everything under a prefix.
    let (_, v) = get(&sim, "/console/v1/audit?action=pairing.approve").await;
    assert_eq!(actions(&v), ["pairing.approve", "pairing.approve"], "{v}");
    let (_, v) = get(&sim, "/console/v1/audit?action=pairing").await;
    assert!(!actions(&v).is_empty());
    assert!(actions(&v).iter().all(|a| a.starts_with("pairing.")), "{v}");
    let (_, v) = get(&sim, "/console/v1/audit?action=pair").await;
    assert!(actions(&v).is_empty(), "a prefix ends at a dot: {v}");

    // By actor: part of its name or token id, any case.
    let part = actor[..actor.len().min(4)].to_uppercase();
    let (_, v) = get(&sim, &format!("/console/v1/audit?actor={part}")).await;
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == actor.as_str()),
        "{v}"
    );
    assert!(!v.as_array().unwrap().is_empty());
    let (_, v) = get(&sim, "/console/v1/audit?actor=nobody-like-this").await;
    assert!(actions(&v).is_empty(), "{v}");

    // By device, with the others.
    let (_, v) = get(
        &sim,
        &format!("/console/v1/audit?target={id_one}&action=pairing.approve"),
    )
    .await;
    assert_eq!(actions(&v), ["pairing.approve"], "{v}");

    // By time: everything is before a minute from now and after a minute ago.
    let now = time::OffsetDateTime::from(sim.anchor().services().clock.now());
    let at = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
            .replace('+', "%2B")
    };
    let later = at(now + time::Duration::minutes(1));
    let earlier = at(now - time::Duration::minutes(1));
    let (_, v) = get(&sim, &format!("/console/v1/audit?since={later}")).await;
    assert!(actions(&v).is_empty(), "{v}");
    let (_, v) = get(&sim, &format!("/console/v1/audit?until={earlier}")).await;
    assert!(actions(&v).is_empty(), "{v}");
    let (_, v) = get(
        &sim,
        &format!("/console/v1/audit?since={earlier}&until={later}"),
    )
    .await;
    assert_eq!(v.as_array().unwrap().len(), all.len(), "{v}");
    let (status, v) = get(&sim, "/console/v1/audit?since=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_runs_on_exactly_the_devices_listed() {
    let sim = Sim::start(0xba7c4, lossy(0.0), |_| {}).await;
    let one = sim.add_node("listed-one");
    let two = sim.add_node("listed-two");
    let three = sim.add_node("not-listed");
    let id_one = sim.pair(&one).await.device_id;
    let id_two = sim.pair(&two).await.device_id;
    sim.pair(&three).await;

    let body = json!({
        "selector": "",
        "devices": [id_one.to_string(), id_two.to_string()],
        "capability": "echo",
        "timeout_ms": 5000,
    });
    let (status, batch) = call(&sim, "POST", "/console/v1/batches", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{batch}");
    let mut ids: Vec<String> = batch["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want = vec![id_one.to_string(), id_two.to_string()];
    want.sort();
    assert_eq!(ids, want, "{batch}");

    // With a selector too: both must hold.
    let body = json!({
        "selector": "no-such-label=here",
        "devices": [id_one.to_string()],
        "capability": "echo",
    });
    let (status, err) = call(&sim, "POST", "/console/v1/batches", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err.to_string().contains(&id_one.to_string()), "{err}");

    let body = json!({ "selector": "", "devices": [], "capability": "echo" });
    let (status, err) = call(&sim, "POST", "/console/v1/batches", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let body = json!({ "selector": "", "devices": ["not-a-device-id"], "capability": "echo" });
    let (status, err) = call(&sim, "POST", "/console/v1/batches", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

/// The entry of `id` in an inventory answer.
fn entry_of<'a>(inventory: &'a Value, id: &str) -> &'a Value {
    inventory["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {inventory}"))
}

/// A page of the inventory is built from the outline of the whole fleet, then completed: its
/// entries are whole (device and node parts, labels, actions: what the one device's entry
/// shows), ordered and counted as the whole inventory's.
#[tokio::test(start_paused = true)]
async fn a_page_of_the_inventory_has_whole_entries_in_order() {
    let sim = Sim::start(0x9a6e, lossy(0.0), |_| {}).await;
    let mut agents = Vec::new();
    let mut nodes = Vec::new();
    for name in ["page-a", "page-b", "page-c", "page-d", "page-e"] {
        let node = sim.add_node(name);
        sim.pair(&node).await;
        // Four connected, one never registered (a warning, so first in problem order).
        if name != "page-e" {
            agents.push(node.start_agent(sim.addr(), |_| {}));
        }
        nodes.push(node);
    }
    for a in &agents {
        assert!(a.registered(1, Duration::from_secs(60)).await);
    }
    let (status, whole) = get(&sim, "/console/v1/inventory").await;
    assert_eq!(status, StatusCode::OK, "{whole}");

    let mut seen = Vec::new();
    for offset in [0, 2, 4] {
        let (status, page) = get(
            &sim,
            &format!("/console/v1/inventory?limit=2&offset={offset}&sort=problems"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["page"]["total"], 5, "{page}");
        assert_eq!(
            page["summary"], whole["summary"],
            "counted over all of them"
        );
        for d in page["devices"].as_array().unwrap() {
            let id = d["device_id"].as_str().unwrap();
            let full = entry_of(&whole, id);
            assert_eq!(d["device"], full["device"], "the device part of {id}");
            assert!(d["device"]["cert_serial"].is_string(), "{d}");
            assert_eq!(d["labels"], full["labels"]);
            assert_eq!(d["warnings"], full["warnings"]);
            let (status, one) = get(&sim, &format!("/console/v1/inventory/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{one}");
            for part in ["device", "labels", "actions", "warnings", "trust"] {
                assert_eq!(d[part], one[part], "the {part} of {id} on a page and alone");
            }
            assert_eq!(d["actions"], json!(["invoke", "rotate", "revoke"]), "{d}");
            assert!(
                d["labels"]["node.anchorage/platform"].is_string(),
                "the platform fact among the labels: {d}"
            );
            if d["name"] == "page-e" {
                assert!(d["node"].is_null(), "never registered: {d}");
            } else {
                let node = &d["node"];
                assert_eq!(node["name"], full["node"]["name"], "{d}");
                assert_eq!(node["capabilities"], full["node"]["capabilities"]);
                assert!(!node["capabilities"].as_array().unwrap().is_empty(), "{d}");
                assert!(node["remote_addr"].is_string(), "{d}");
            }
            seen.push(d["name"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        seen,
        ["page-e", "page-a", "page-b", "page-c", "page-d"],
        "problems first, then by name, across pages"
    );

    // A search narrows the pages and their count.
    let (status, found) = get(&sim, "/console/v1/inventory?limit=10&q=PAGE-B").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["page"]["total"], 1, "{found}");
    assert_eq!(found["summary"]["devices"], 1, "{found}");
    assert_eq!(found["devices"][0]["name"], "page-b");
    assert!(found["devices"][0]["node"]["capabilities"].is_array());
}
