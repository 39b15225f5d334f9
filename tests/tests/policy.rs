//! The mesh policy as operators set, see, test and audit it: through the real backend,
//! router and fjall store of an anchor over netsim (simulated time), and with the real
//! `anchord` and `anchorctl` binaries over loopback.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::Permission;
use anchorage_sim::procs::{self, bins, command};
use anchorage_sim::{Sim, lossy};
use anchorage_wire::labels::LabelChange;
use axum::http::StatusCode;

const POLICY: &str = r#"# displays may watch cameras
[[allow]]
name = "displays watch cameras"
from = "role=display"
to = "role=camera"
capabilities = ["camera.*", "system.health"]
services = ["rtsp"]
"#;

/// Two mistakes: a bad selector on line 3 and an unknown key on line 5.
const BAD: &str = r#"[[allow]]
from = "role=display"
to = "role in ("
capabilities = ["echo"]
servces = ["web"]
"#;

/// One request through the console router: (status, JSON body).
async fn call(
    sim: &Sim,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let body = body.map(|b| ("application/toml", b.to_string()));
    sim.console_call(token, method, path, body).await
}

fn set(k: &str, v: &str) -> LabelChange {
    LabelChange::Set(k.into(), v.into())
}

#[tokio::test(start_paused = true)]
async fn the_policy_is_set_shown_tested_audited_refused_when_wrong_and_survives_a_restart() {
    let mut sim = Sim::start(0x9011c7, lossy(0.0), |_| {}).await;
    let camera = sim.add_node("camera-1");
    let display = sim.add_node("display-1");
    let camera_id = sim.pair(&camera).await.device_id;
    let display_id = sim.pair(&display).await.device_id;
    let backend = sim.backend();
    backend
        .label(&sim.owner, camera_id, vec![set("role", "camera")])
        .await
        .unwrap();
    backend
        .label(&sim.owner, display_id, vec![set("role", "display")])
        .await
        .unwrap();
    let owner = sim.anchor().owner_token().unwrap();
    let mut events = sim.backend().subscribe();

    // The default: version 0, no rules, nothing allowed.
    let (status, p) = call(&sim, &owner, "GET", "/console/v1/policy", None).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["version"], 0);
    assert_eq!(p["rules"], serde_json::json!([]));
    assert!(p["updated_at"].is_null());
    let test = "/console/v1/policy/test?from=display-1&to=camera-1&capability=camera.snapshot";
    let (_, t) = call(&sim, &owner, "GET", test, None).await;
    assert_eq!(t["allowed"], false, "{t}");

    // Set: version 1, in force at once, announced.
    let (status, p) = call(&sim, &owner, "PUT", "/console/v1/policy", Some(POLICY)).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["version"], 1);
    assert_eq!(p["text"], POLICY);
    assert!(p["updated_by"].as_str().unwrap().contains("owner"), "{p}");
    assert_eq!(
        p["rules"],
        serde_json::json!([{
            "index": 1, "line": 2, "name": "displays watch cameras",
            "from": "role=display", "to": "role=camera",
            "capabilities": ["camera.*", "system.health"], "services": ["rtsp"],
        }])
    );
    assert_eq!(sim.anchor().services().policy.current().version, 1);
    let event = loop {
        let e = events.try_recv().unwrap();
        if e.kind == "policy" {
            break e;
        }
    };
    assert_eq!(event.data["version"], 1);

    // Test: the rule that allows it, by name, prefix or id; refused the other way round.
    let (status, t) = call(&sim, &owner, "GET", test, None).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["allowed"], true);
    assert_eq!(t["rule"], 1);
    assert_eq!(t["line"], 2);
    assert_eq!(t["name"], "displays watch cameras");
    assert_eq!(
        t["reason"],
        "allowed by rule 1 (\"displays watch cameras\", line 2)"
    );
    assert_eq!(t["from"]["name"], "display-1");
    assert_eq!(t["to"]["device_id"], camera_id.to_string());
    let prefix = &camera_id.compact()[..8];
    let (_, t) = call(
        &sim,
        &owner,
        "GET",
        &format!("/console/v1/policy/test?from={display_id}&to={prefix}&service=rtsp"),
        None,
    )
    .await;
    assert_eq!(t["allowed"], true, "{t}");
    let (_, t) = call(
        &sim,
        &owner,
        "GET",
        "/console/v1/policy/test?from=camera-1&to=display-1&capability=camera.snapshot",
        None,
    )
    .await;
    assert_eq!(t["allowed"], false, "{t}");
    assert!(t["rule"].is_null());
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .starts_with("refused: no rule allows"),
        "{t}"
    );
    let (status, e) = call(
        &sim,
        &owner,
        "GET",
        "/console/v1/policy/test?from=nobody&to=camera-1&capability=echo",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");

    // A file with errors: each with its line, and nothing changes.
    let (status, e) = call(&sim, &owner, "PUT", "/console/v1/policy", Some(BAD)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["code"], "invalid_policy");
    let lines: Vec<u64> = e["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["line"].as_u64().unwrap())
        .collect();
    assert!(!lines.is_empty(), "{e}");
    assert!(
        lines.iter().all(|l| *l == 3 || *l == 5),
        "errors point at the wrong lines: {e}"
    );
    let (_, p) = call(&sim, &owner, "GET", "/console/v1/policy", None).await;
    assert_eq!(p["version"], 1, "a refused file changed the policy");

    // A read-only token sees it but cannot set it.
    let reader = sim
        .anchor()
        .services()
        .trust
        .create_token(
            "test",
            "reader".into(),
            vec![Permission::ObservabilityRead],
            Default::default(),
            None,
        )
        .unwrap()
        .token;
    let (status, _) = call(&sim, &reader, "GET", "/console/v1/policy", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, e) = call(&sim, &reader, "PUT", "/console/v1/policy", Some("")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{e}");
    assert_eq!(e["code"], "forbidden");

    // A second version; the history has both, newest first.
    let (status, p) = call(&sim, &owner, "PUT", "/console/v1/policy", Some("")).await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["version"], 2);
    let (_, h) = call(&sim, &owner, "GET", "/console/v1/policy/history", None).await;
    let versions: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![2, 1]);
    assert_eq!(h[1]["text"], POLICY);

    // The audit log says who set which version.
    let (_, audit) = call(&sim, &owner, "GET", "/console/v1/audit?target=policy", None).await;
    let sets: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "policy.set")
        .map(|a| {
            (
                a["actor"].as_str().unwrap().to_string(),
                a["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(sets.len(), 2, "{audit}");
    assert!(sets[0].1.starts_with("version 2"), "{sets:?}");
    assert!(sets[1].1.starts_with("version 1, 1 rule"), "{sets:?}");
    assert!(
        sets.iter().all(|(actor, _)| actor.contains("owner")),
        "{sets:?}"
    );

    // Put version 1's text back as version 3, then restart: still in force.
    let (_, p) = call(&sim, &owner, "PUT", "/console/v1/policy", Some(POLICY)).await;
    assert_eq!(p["version"], 3);
    sim.restart().await;
    let owner = sim.anchor().owner_token().unwrap();
    assert_eq!(sim.anchor().services().policy.current().version, 3);
    let (_, p) = call(&sim, &owner, "GET", "/console/v1/policy", None).await;
    assert_eq!(p["version"], 3);
    assert_eq!(p["text"], POLICY);
    let (_, t) = call(&sim, &owner, "GET", test, None).await;
    assert_eq!(t["allowed"], true, "{t}");
}

/// `anchorctl policy set/show` against a real `anchord`, across a restart.
#[test]
fn anchorctl_sets_shows_and_refuses_policy_files_with_the_real_binaries() {
    const LIMIT: Duration = Duration::from_secs(20);
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let good = scratch.path().join("mesh.toml");
    let bad = scratch.path().join("bad.toml");
    std::fs::write(&good, POLICY).unwrap();
    std::fs::write(&bad, BAD).unwrap();
    let ctl = |console: &str, args: &[&str]| {
        procs::run(
            "anchorctl",
            command(&bins().anchorctl, scratch.path())
                .args(["--url", console, "--token-file"])
                .arg(data.join("owner.token"))
                .args(args),
            LIMIT,
        )
    };

    let anchord = procs::Anchord::start(&data, "127.0.0.1:0", "127.0.0.1:0", &[], scratch.path());
    let console = anchord.ready.console.clone();
    let out = ctl(&console, &["policy", "set", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout, "policy version 1 set (1 rule)\n");

    let out = ctl(&console, &["policy", "set", bad.to_str().unwrap()]);
    assert_eq!(out.code(), Some(65), "{} {}", out.stdout, out.stderr);
    let shown = bad.display().to_string();
    let located: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{shown}:")))
        .collect();
    assert!(!located.is_empty(), "{}", out.stderr);
    assert!(
        located
            .iter()
            .all(|l| l.starts_with(&format!("{shown}:3:")) || l.starts_with(&format!("{shown}:5:"))),
        "{}",
        out.stderr
    );

    let out = ctl(&console, &["policy", "show"]);
    assert!(out.status.success(), "{}", out.stderr);
    let (header, text) = out.stdout.split_once('\n').unwrap();
    assert!(header.starts_with("# policy version 1, set "), "{header}");
    assert!(header.contains("owner"), "{header}");
    assert_eq!(text, POLICY);
    drop(anchord);

    let anchord = procs::Anchord::start(&data, "127.0.0.1:0", "127.0.0.1:0", &[], scratch.path());
    let out = ctl(&anchord.ready.console, &["--json", "policy", "show"]);
    assert!(out.status.success(), "{}", out.stderr);
    let p = out.json();
    assert_eq!(p["version"], 1, "{p}");
    assert_eq!(p["text"], POLICY);
    let out = ctl(
        &anchord.ready.console,
        &["policy", "test", "a", "b", "echo"],
    );
    assert_eq!(
        out.code(),
        Some(1),
        "unknown devices are an error: {}",
        out.stderr
    );
    assert!(out.stderr.contains("not_found"), "{}", out.stderr);
}
