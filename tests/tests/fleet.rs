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
    let router = anchorage_console::router(sim.anchor().backend());
    let token = sim.anchor().owner_token().unwrap();
    let resp = router
        .oneshot(
            Request::get(path)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
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
