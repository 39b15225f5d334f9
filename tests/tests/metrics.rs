//! `/metrics` is valid Prometheus text and its counters move with heartbeats and invocations
//! (issue 6). Through the real router and backend, on netsim, simulated time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::InvokeRequest;
use anchorage_sim::{Sim, lossy, prom};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

async fn scrape(sim: &Sim) -> prom::Exposition {
    let router = anchorage_console::router(sim.anchor().backend());
    let token = sim.anchor().owner_token().unwrap();
    let resp = router
        .oneshot(
            Request::get("/metrics")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test(start_paused = true)]
async fn metrics_parse_and_move_with_heartbeats_and_invocations() {
    let sim = Sim::start(0x6e0, lossy(0.0), |c| {
        c.presence.heartbeat_interval = Duration::from_secs(1)
    })
    .await;
    let before = scrape(&sim).await;
    assert_eq!(before.value("anchorage_up", &[]), Some(1.0));
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

    let node = sim.add_node("metered");
    let id = sim.pair(&node).await.device_id;
    let agent = node.start_agent(sim.addr(), |_| {});
    assert!(agent.registered(1, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    for _ in 0..3 {
        let inv = sim
            .backend()
            .invoke(
                &sim.owner,
                id,
                InvokeRequest {
                    capability: "echo".into(),
                    input: serde_json::json!(1),
                    timeout_ms: Some(10_000),
                    async_: false,
                },
            )
            .await
            .unwrap();
        assert!(inv.state.is_final());
    }
    let after = scrape(&sim).await;
    let hb = after
        .value("anchorage_heartbeats_received_total", &[])
        .unwrap();
    assert!(hb >= 8.0, "heartbeats counted: {hb}");
    assert_eq!(
        after.value(
            "anchorage_invocations_total",
            &[("state", "succeeded"), ("capability", "echo")]
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
    assert!(after.value("anchorage_store_bytes", &[]).unwrap() > 0.0);
}
