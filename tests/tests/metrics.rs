//! `/metrics` is valid Prometheus text (and OpenMetrics when asked for) and its counters move
//! with heartbeats, invocations and console requests (issues 6 and 15). Through the real router
//! and backend, on netsim, simulated time; the separate metrics listener through a real
//! in-process anchor and real HTTP.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::InvokeRequest;
use anchorage_sim::prom::{self, Format};
use anchorage_sim::{Sim, lossy};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

async fn get(sim: &Sim, path: &str, accept: Option<&str>) -> (StatusCode, String, String) {
    let router = anchorage_console::router(sim.anchor().backend());
    let token = sim.anchor().owner_token().unwrap();
    let mut req = Request::get(path).header("authorization", format!("Bearer {token}"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = router
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, ctype, String::from_utf8(bytes.to_vec()).unwrap())
}

/// A scrape as Prometheus does it without OpenMetrics: text 0.0.4, held to that format (every
/// sample's family has a `# TYPE`, counters end in `_total`).
async fn scrape(sim: &Sim) -> prom::Exposition {
    let (status, ctype, text) = get(sim, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    prom::parse_as(&text, Format::Prometheus).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn sum(e: &prom::Exposition, name: &str) -> f64 {
    e.samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

async fn invoke(sim: &Sim, id: anchorage_mesh::DeviceId, capability: &str) {
    let inv = sim
        .backend()
        .invoke(
            &sim.owner,
            id,
            InvokeRequest {
                capability: capability.into(),
                input: serde_json::json!(1),
                timeout_ms: Some(10_000),
                async_: false,
            },
        )
        .await
        .unwrap();
    assert!(inv.state.is_final(), "{inv:?}");
}

#[tokio::test(start_paused = true)]
async fn metrics_parse_and_move_with_heartbeats_and_invocations() {
    let sim = Sim::start(0x6e0, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(1);
        c.metrics.per_node = true;
    })
    .await;
    let before = scrape(&sim).await;
    assert_eq!(before.value("anchorage_up", &[]), Some(1.0));
    assert_eq!(
        before.value(
            "anchorage_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        before.value("anchorage_heartbeats_received_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        before
            .types
            .get("anchorage_invocation_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert!(
        !before.types.contains_key("anchorage_uptime_seconds"),
        "process_start_time_seconds replaces the uptime gauge"
    );
    // The process metrics, read from the OS.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        let v = before
            .value(name, &[])
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(v > 0.0, "{name} is {v}");
    }
    assert_eq!(
        before
            .types
            .get("process_cpu_seconds_total")
            .map(String::as_str),
        Some("counter")
    );
    // No device yet: no earliest node certificate expiry at all (not a 0 that alerts).
    assert_eq!(
        before.value("anchorage_node_cert_expiry_earliest_timestamp_seconds", &[]),
        None
    );
    let ca_expiry = before
        .value("anchorage_ca_cert_expiry_timestamp_seconds", &[])
        .unwrap();
    let server_expiry = before
        .value("anchorage_server_cert_expiry_timestamp_seconds", &[])
        .unwrap();
    let now = sim.anchor().services().clock.now_ms() as f64 / 1000.0;
    assert!(ca_expiry > now && server_expiry > now && server_expiry <= ca_expiry);

    let node = sim.add_node("metered");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    for _ in 0..3 {
        invoke(&sim, id, "echo").await;
    }
    // No node has it: rejected, counted under `unknown`, and never started.
    invoke(&sim, id, "made.up").await;

    // Console requests by route template, never the raw path.
    let (status, _, _) = get(&sim, "/console/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(&sim, &format!("/console/v1/devices/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(&sim, "/no/such/path/1234", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let after = scrape(&sim).await;
    let hb = after
        .value("anchorage_heartbeats_received_total", &[])
        .unwrap();
    assert!(hb >= 8.0, "heartbeats counted: {hb}");
    // Every invocation once by its final state; no state is counted on the way.
    assert_eq!(
        after.value(
            "anchorage_invocations_total",
            &[("state", "succeeded"), ("capability", "echo")]
        ),
        Some(3.0)
    );
    assert_eq!(
        after.value(
            "anchorage_invocations_total",
            &[("state", "rejected"), ("capability", "unknown")]
        ),
        Some(1.0)
    );
    assert_eq!(sum(&after, "anchorage_invocations_total"), 4.0);
    assert_eq!(sum(&after, "anchorage_invocations_started_total"), 3.0);
    assert_eq!(
        after.value(
            "anchorage_invocations_started_total",
            &[("capability", "echo")]
        ),
        Some(3.0)
    );
    assert_eq!(
        after.value("anchorage_invocation_duration_seconds_count", &[]),
        Some(3.0)
    );
    assert_eq!(
        after.value("anchorage_nodes", &[("presence", "online")]),
        Some(1.0)
    );
    assert_eq!(
        after.value("anchorage_devices", &[("trust", "trusted")]),
        Some(1.0)
    );
    assert_eq!(after.value("anchorage_connected_nodes", &[]), Some(1.0));
    assert!(
        after
            .value(
                "anchorage_pairing_outcomes_total",
                &[("outcome", "approved")]
            )
            .unwrap()
            >= 1.0
    );
    assert!(after.value("anchorage_store_size_bytes", &[]).unwrap() > 0.0);
    let node_expiry = after
        .value("anchorage_node_cert_expiry_earliest_timestamp_seconds", &[])
        .unwrap();
    assert!(node_expiry > now && node_expiry <= ca_expiry);

    // HTTP: the requests above, by template; the unmatched path under `unmatched`.
    for (route, status) in [
        ("/console/v1/devices", "200"),
        ("/console/v1/devices/{id}", "200"),
        ("unmatched", "404"),
        ("/metrics", "200"),
    ] {
        let n = after
            .value(
                "anchorage_http_requests_total",
                &[("route", route), ("method", "GET"), ("status", status)],
            )
            .unwrap_or_else(|| panic!("no {route} {status}"));
        assert!(n >= 1.0, "{route}: {n}");
    }
    assert_eq!(
        after.value(
            "anchorage_http_requests_total",
            &[("route", "/console/v1/devices")]
        ),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "anchorage_http_request_duration_seconds_count",
            &[("route", "/console/v1/devices/{id}")]
        ),
        Some(1.0)
    );
    assert!(
        after.samples.iter().all(|s| s
            .labels
            .get("route")
            .is_none_or(|r| !r.contains("1234") && !r.contains(&id.to_string()))),
        "a raw path became a label"
    );

    // QUIC: the node's connection is counted; its heartbeats arrived as DATAGRAM frames.
    assert_eq!(after.value("anchorage_quic_connections", &[]), Some(1.0));
    let datagrams = after
        .value("anchorage_quic_datagrams_received_total", &[])
        .unwrap();
    assert!(datagrams >= hb, "{datagrams} datagrams, {hb} heartbeats");
    assert!(
        after
            .value("anchorage_quic_sent_packets_total", &[])
            .unwrap()
            > 0.0
    );
    assert_eq!(
        after
            .types
            .get("anchorage_quic_sent_packets_total")
            .map(String::as_str),
        Some("counter")
    );

    // Per node (enabled here): its round trip and loss, by device id and name.
    let labels = [("device_id", &*id.to_string()), ("name", "metered")];
    assert!(after.value("anchorage_node_rtt_seconds", &labels).unwrap() > 0.0);
    assert_eq!(
        after.value("anchorage_node_heartbeat_loss_ratio", &labels),
        Some(0.0)
    );

    // The node goes away: its QUIC totals stay in the counters, its per-node series leave.
    let sent = after
        .value("anchorage_quic_sent_packets_total", &[])
        .unwrap();
    agent.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let gone = scrape(&sim).await;
    assert_eq!(gone.value("anchorage_quic_connections", &[]), Some(0.0));
    assert!(
        gone.value("anchorage_quic_sent_packets_total", &[])
            .unwrap()
            >= sent
    );
    assert_eq!(gone.value("anchorage_node_rtt_seconds", &labels), None);
}

#[tokio::test(start_paused = true)]
async fn openmetrics_when_asked_for() {
    let sim = Sim::start(0x6e1, lossy(0.0), |_| {}).await;
    let (status, ctype, text) = get(
        &sim,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    let e = prom::parse_as(&text, Format::OpenMetrics).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // OpenMetrics declares counters without `_total` and samples them with it.
    assert_eq!(
        e.types
            .get("anchorage_heartbeats_received")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        e.value("anchorage_heartbeats_received_total", &[]),
        Some(0.0)
    );
    // Without per-node metrics enabled there are no per-node series at all.
    assert!(!e.types.contains_key("anchorage_node_rtt_seconds"));
    // Plain text when plain text is preferred.
    let (_, ctype, text) = get(&sim, "/metrics", Some("text/plain")).await;
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"));
}

#[tokio::test]
async fn the_metrics_listener_serves_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = anchorage_daemon::AnchorConfig::for_tests(dir.path());
    config.metrics.listen = Some(([127, 0, 0, 1], 0).into());
    let running = anchorage_daemon::start(config).await.unwrap();
    let addr = running.metrics_addr.unwrap();
    assert_ne!(addr.port(), 0);
    assert_ne!(addr, running.console_addr);
    let http = reqwest::Client::new();

    let resp = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    let e = prom::parse_as(&text, Format::Prometheus).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(e.value("anchorage_up", &[]), Some(1.0));

    let resp = http
        .get(format!("http://{addr}/metrics"))
        .header("accept", "application/openmetrics-text")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    prom::parse_as(&text, Format::OpenMetrics).unwrap_or_else(|e| panic!("{e}\n{text}"));

    // Only /metrics there; the console's /metrics keeps its token gate.
    let resp = http
        .get(format!("http://{addr}/console/v1/devices"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http
        .get(format!("{}/metrics", running.console_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    running.shutdown().await;
}
