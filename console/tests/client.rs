//! A real console server on 127.0.0.1:0 (over the in-memory test backend), driven by
//! `ControlPlaneClient` and by `anchorctl`'s `run`, as an operator would.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anchorage_console::api::*;
use anchorage_console::cli::{self, CliError, exit};
use anchorage_console::client::{ClientError, ControlPlaneClient};
use anchorage_console::routes::router;
use futures_util::StreamExt;

use common::*;

async fn serve() -> (SocketAddr, Arc<TestBackend>) {
    let backend = Arc::new(TestBackend::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(backend.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, backend)
}

fn client(addr: SocketAddr, token: &str) -> ControlPlaneClient {
    ControlPlaneClient::new(&format!("http://{addr}/"), token).unwrap()
}

#[tokio::test]
async fn client_round_trips_typed_calls() {
    let (addr, _backend) = serve().await;
    let c = client(addr, "owner");

    let devices = c.list_devices().await.unwrap();
    assert_eq!(devices[0].device_id, device_id());
    assert_eq!(c.device(DEVICE).await.unwrap().name, "kitchen-pi");

    let code = c
        .mint_code(MintCodeRequest {
            method: PairMethod::Qr,
            ttl_secs: Some(120),
            labels: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(code.method, PairMethod::Qr);
    assert!(code.uri.unwrap().starts_with("anchorage://pair"));

    let pending = c
        .list_requests(Some(RequestState::PendingApproval))
        .await
        .unwrap();
    assert_eq!(pending[0].request_id, REQUEST);
    let rejected = c.reject(REQUEST, Some("not ours".into())).await.unwrap();
    assert_eq!(rejected.state, RequestState::Rejected);
    assert_eq!(rejected.reason.as_deref(), Some("not ours"));

    let inv = c
        .invoke(
            DEVICE,
            InvokeRequest {
                capability: "echo".into(),
                input: serde_json::json!({"hello": "mesh"}),
                timeout_ms: Some(5_000),
                async_: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(inv.state, InvocationState::Succeeded);
    assert_eq!(inv.output, Some(serde_json::json!({"hello": "mesh"})));

    let list = c
        .list_invocations(InvocationQuery {
            device_id: Some(device_id()),
            limit: Some(1),
        })
        .await
        .unwrap();
    assert_eq!(list.len(), 1);

    let token = c
        .create_token(CreateTokenRequest {
            name: Some("ci".into()),
            permissions: vec![Permission::ObservabilityRead],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(token.permissions, vec![Permission::ObservabilityRead]);

    c.remove(DEVICE).await.unwrap();
    assert!(c.metrics().await.unwrap().contains("anchorage_up 1"));
    assert!(c.healthz().await.unwrap());
}

#[tokio::test]
async fn api_errors_keep_their_status_and_code() {
    let (addr, backend) = serve().await;

    let err = client(addr, "owner").device("NOPE").await.unwrap_err();
    match &err {
        ClientError::Api {
            status,
            code,
            message,
        } => {
            assert_eq!((*status, code.as_str()), (404, "not_found"));
            assert!(message.contains("NOPE"), "{message}");
        }
        other => panic!("expected an API error, got {other:?}"),
    }

    let err = client(addr, "wrong").list_devices().await.unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(401), Some("unauthorized"))
    );

    let err = client(addr, "only:observability.read")
        .approve(REQUEST)
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some("forbidden")));
    assert!(err.to_string().contains("trust.operate"), "{err}");
    assert!(!backend.calls().contains(&"approve"));

    backend
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(!client(addr, "owner").healthz().await.unwrap());
}

#[tokio::test]
async fn an_unreachable_anchor_is_an_http_error_naming_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = client(addr, "owner").list_devices().await.unwrap_err();
    assert!(matches!(err, ClientError::Http(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&addr.to_string()), "{message}");
    assert_eq!(cli::exit_code(&err), exit::UNAVAILABLE);
}

#[tokio::test]
async fn events_arrive_on_the_client_stream() {
    let (addr, backend) = serve().await;
    let stream = client(addr, "only:observability.read")
        .events()
        .await
        .unwrap();
    let mut stream = std::pin::pin!(stream);
    // Subscribed once `events()` returned.
    assert_eq!(backend.events.receiver_count(), 1);
    let first = event(1, "pairing.requested");
    let second = event(2, "presence");
    backend.events.send(first.clone()).unwrap();
    backend.events.send(second.clone()).unwrap();
    let got1 = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let got2 = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((got1, got2), (first, second));

    let err = client(addr, "none").events().await.err().unwrap();
    assert_eq!(err.code(), Some("forbidden"));
}

// ---------------------------------------------------------------------------------------------
// anchorctl, in-process

/// Runs `anchorctl <args>` against `addr` with `token`; returns (result, stdout).
async fn anchorctl(addr: SocketAddr, token: &str, args: &[&str]) -> (Result<(), CliError>, String) {
    let url = format!("http://{addr}");
    let mut argv = vec!["anchorctl", "--url", &url, "--token", token];
    argv.extend_from_slice(args);
    let cli = cli::parse_from(argv).unwrap();
    let mut out = Vec::new();
    let result = cli::run(cli, &mut out, std::future::pending()).await;
    (result, String::from_utf8(out).unwrap())
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout}"))
}

#[tokio::test]
async fn anchorctl_json_output_has_the_contract_fields() {
    let (addr, _backend) = serve().await;

    let (r, out) = anchorctl(
        addr,
        "owner",
        &["pair", "code", "--method", "qr", "--ttl", "2m", "--json"],
    )
    .await;
    r.unwrap();
    let code = json(&out);
    for field in ["code_id", "code", "method", "expires_at", "uri"] {
        assert!(
            code.get(field).is_some(),
            "pair code --json lacks {field}: {out}"
        );
    }
    assert_eq!(code["method"], "qr");

    let (r, out) = anchorctl(
        addr,
        "owner",
        &["--json", "pair", "list", "--state", "pending_approval"],
    )
    .await;
    r.unwrap();
    let list = json(&out);
    for field in [
        "request_id",
        "device_id",
        "device_name",
        "state",
        "sas",
        "requested_at",
        "expires_at",
    ] {
        assert!(
            list[0].get(field).is_some(),
            "pair list --json lacks {field}"
        );
    }

    let (r, out) = anchorctl(addr, "owner", &["device", "show", DEVICE, "--json"]).await;
    r.unwrap();
    let device = json(&out);
    for field in ["device_id", "name", "trust", "cert_expires_at"] {
        assert!(
            device.get(field).is_some(),
            "device show --json lacks {field}"
        );
    }

    let (r, out) = anchorctl(
        addr,
        "owner",
        &[
            "token",
            "create",
            "--perm",
            "nodes.invoke",
            "--perm",
            "observability.read",
            "--name",
            "ci",
            "--json",
        ],
    )
    .await;
    r.unwrap();
    let token = json(&out);
    assert_eq!(
        token["permissions"],
        serde_json::json!(["observability.read", "nodes.invoke"])
    );
    assert!(token["token"].is_string() && token["id"].is_string());

    let (r, out) = anchorctl(addr, "owner", &["inventory", "--json"]).await;
    r.unwrap();
    let inv = json(&out);
    let d = &inv["devices"][0];
    for field in [
        "device_id",
        "name",
        "trust",
        "presence",
        "heartbeat_age_ms",
        "loss_rate",
        "rtt_ms",
        "warnings",
    ] {
        assert!(
            d.get(field).is_some(),
            "inventory --json device lacks {field}"
        );
    }
    assert_eq!(
        d["capabilities"],
        serde_json::json!({"total": 1, "available": 1, "unavailable": 0})
    );
    assert!(inv["summary"].is_object() && inv["instances"].is_array());

    let (r, out) = anchorctl(addr, "owner", &["device", "remove", DEVICE, "--json"]).await;
    r.unwrap();
    assert_eq!(json(&out)["removed"], true);
}

#[tokio::test]
async fn anchorctl_invoke_exit_status_follows_the_invocation() {
    let (addr, _backend) = serve().await;

    let (r, out) = anchorctl(
        addr,
        "owner",
        &[
            "invoke",
            DEVICE,
            "echo",
            "--input",
            r#"{"a":1}"#,
            "--timeout",
            "5s",
            "--json",
        ],
    )
    .await;
    r.unwrap();
    let inv = json(&out);
    assert_eq!(inv["state"], "succeeded");
    assert_eq!(inv["output"], serde_json::json!({"a": 1}));
    for field in ["invocation_id", "state", "output", "error"] {
        assert!(inv.get(field).is_some(), "invoke --json lacks {field}");
    }

    let (r, out) = anchorctl(addr, "owner", &["invoke", DEVICE, "fail", "--json"]).await;
    let err = r.unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::FAILURE, "failed"));
    assert_eq!(
        json(&out)["error"],
        "exit status 3",
        "the result is still printed"
    );

    let (r, _) = anchorctl(addr, "owner", &["invoke", DEVICE, "slow"]).await;
    assert_eq!(r.unwrap_err().code, "still_running");
    let (r, out) = anchorctl(
        addr,
        "owner",
        &["invoke", DEVICE, "slow", "--async", "--json"],
    )
    .await;
    r.unwrap();
    assert_eq!(json(&out)["state"], "queued");

    let (r, out) = anchorctl(
        addr,
        "owner",
        &["invoke", DEVICE, "echo", "--input", r#"{"hello":"#],
    )
    .await;
    let err = r.unwrap_err();
    assert_eq!(err.exit, exit::BAD_INPUT);
    assert!(err.message.contains("--input"), "{}", err.message);
    assert!(out.is_empty());

    let (r, _) = anchorctl(
        addr,
        "owner",
        &[
            "invoke",
            DEVICE,
            "echo",
            "--input-file",
            "/nonexistent/input.json",
        ],
    )
    .await;
    let err = r.unwrap_err();
    assert_eq!(err.exit, exit::BAD_INPUT);
    assert!(
        err.message.contains("/nonexistent/input.json"),
        "{}",
        err.message
    );

    // Human output: the state line, then the output.
    let (r, out) = anchorctl(
        addr,
        "owner",
        &["invoke", DEVICE, "echo", "--input", "[1,2]"],
    )
    .await;
    r.unwrap();
    assert!(out.starts_with("succeeded"), "{out}");
    assert!(out.contains("[\n  1,\n  2\n]"), "{out}");
}

#[tokio::test]
async fn anchorctl_exit_codes_for_failures() {
    let (addr, _backend) = serve().await;

    // Neither an id, nor a name, nor an id prefix: anchorctl says so from the device list.
    let (r, _) = anchorctl(addr, "owner", &["device", "show", "NOPE"]).await;
    let err = r.unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::FAILURE, "not_found"));
    assert_eq!(
        format!("error: {err}"),
        "error: not_found: device \"NOPE\" not found"
    );
    // A well-formed id the backend does not know: its 404.
    let (r, _) = anchorctl(addr, "owner", &["device", "show", OTHER_DEVICE]).await;
    let err = r.unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::FAILURE, "not_found"));
    assert_eq!(
        format!("error: {err}"),
        format!("error: not_found: no such thing: {OTHER_DEVICE}")
    );

    let (r, _) = anchorctl(addr, "wrong", &["device", "list"]).await;
    assert_eq!(r.unwrap_err().exit, exit::AUTH);
    let (r, _) = anchorctl(
        addr,
        "only:observability.read",
        &["device", "revoke", DEVICE],
    )
    .await;
    let err = r.unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::AUTH, "forbidden"));

    let (r, _) = anchorctl(addr, "owner", &["pair", "code", "--ttl", "25h"]).await;
    let err = r.unwrap_err();
    assert_eq!(err.exit, exit::BAD_INPUT);
    assert!(err.message.contains("30s to 1d"), "{}", err.message);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let (r, _) = anchorctl(dead, "owner", &["nodes"]).await;
    let err = r.unwrap_err();
    assert_eq!(
        (err.exit, err.code.as_str()),
        (exit::UNAVAILABLE, "unreachable")
    );
}

#[tokio::test]
async fn anchorctl_human_tables() {
    let (addr, _backend) = serve().await;
    let (r, out) = anchorctl(addr, "owner", &["device", "list"]).await;
    r.unwrap();
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    // The first two columns, the id column as wide as a device id.
    assert!(header.starts_with("DEVICE "), "{out}");
    assert_eq!(header.split_whitespace().nth(1), Some("NAME"), "{out}");
    assert_eq!(header.find("NAME"), Some(DEVICE.len() + 2), "{out}");
    assert!(header.contains("TRUST"), "{out}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with(DEVICE) && row.contains("kitchen-pi") && row.contains("trusted"),
        "{out}"
    );
    // Columns line up: NAME starts at the same offset in both lines.
    assert_eq!(header.find("NAME"), row.find("kitchen-pi"), "{out}");

    let (r, out) = anchorctl(addr, "owner", &["inventory"]).await;
    r.unwrap();
    assert!(out.contains("certificate_near_expiry"), "{out}");
    assert!(out.contains("1/1"), "capabilities available/total: {out}");

    let (r, out) = anchorctl(addr, "owner", &["pair", "code"]).await;
    r.unwrap();
    assert!(out.contains("K7QF-482913"), "{out}");
    assert!(out.contains("expires"), "{out}");
}

/// A writer tests can read while `run` still holds it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn anchorctl_events_prints_ndjson_until_shutdown() {
    let (addr, backend) = serve().await;
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (out, task) = events_cli(addr, &[], stop_rx);
    until("the subscription", || backend.events.receiver_count() == 1).await;
    backend.events.send(event(1, "presence")).unwrap();
    backend.events.send(event(2, "device.revoked")).unwrap();
    until("both events", || printed(&out).len() == 2).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("events ends at shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(
        printed(&out),
        vec![event(1, "presence"), event(2, "device.revoked")]
    );
}

/// Runs `anchorctl events --json` (plus `extra`) against `addr` until `stop`; returns its
/// output and the task.
fn events_cli(
    addr: SocketAddr,
    extra: &[&str],
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (Shared, tokio::task::JoinHandle<Result<(), CliError>>) {
    let url = format!("http://{addr}");
    let mut args = vec![
        "anchorctl",
        "--url",
        &url,
        "--token",
        "owner",
        "events",
        "--json",
    ];
    args.extend_from_slice(extra);
    let cli = cli::parse_from(args).unwrap();
    let out = Shared::default();
    let mut writer = out.clone();
    let task = tokio::spawn(async move {
        cli::run(cli, &mut writer, async {
            let _ = stop.await;
        })
        .await
    });
    (out, task)
}

/// A console server whose open event streams end while the switch is `true` (as when the
/// anchor shuts down).
async fn serve_with_stream_switch() -> (
    SocketAddr,
    Arc<TestBackend>,
    tokio::sync::watch::Sender<bool>,
) {
    let backend = Arc::new(TestBackend::new());
    let (drop_streams, rx) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = anchorage_console::router_with_options(
        backend.clone(),
        anchorage_console::RouterOptions {
            public_metrics: false,
            shutdown: Some(rx),
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, backend, drop_streams)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn printed(out: &Shared) -> Vec<Event> {
    String::from_utf8(out.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn anchorctl_events_reconnects_when_the_stream_drops() {
    let (addr, backend, drop_streams) = serve_with_stream_switch().await;
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (out, task) = events_cli(addr, &[], stop_rx);
    until("the first subscription", || {
        backend.events.receiver_count() == 1
    })
    .await;
    backend.events.send(event(1, "presence")).unwrap();
    until("the first event", || printed(&out).len() == 1).await;

    // The anchor ends every stream (as on a restart); anchorctl keeps going.
    drop_streams.send_replace(true);
    until("the stream to end", || backend.events.receiver_count() == 0).await;
    drop_streams.send_replace(false);
    until("a new subscription", || {
        backend.events.receiver_count() == 1
    })
    .await;
    backend.events.send(event(2, "device.revoked")).unwrap();
    until("the event after the reconnect", || printed(&out).len() == 2).await;
    assert!(!task.is_finished());
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        printed(&out),
        vec![event(1, "presence"), event(2, "device.revoked")]
    );
}

#[tokio::test]
async fn anchorctl_events_no_reconnect_exits_69_when_the_stream_drops() {
    let (addr, backend, drop_streams) = serve_with_stream_switch().await;
    let (_stop, stop_rx) = tokio::sync::oneshot::channel();
    let (_out, task) = events_cli(addr, &["--no-reconnect"], stop_rx);
    until("the subscription", || backend.events.receiver_count() == 1).await;
    drop_streams.send_replace(true);
    let err = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("anchorctl exits")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.exit, exit::UNAVAILABLE, "{err:?}");
}

#[tokio::test]
async fn anchorctl_events_does_not_retry_an_anchor_it_never_reached() {
    // A port nothing listens on: the first connection fails, and that is an error at once.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_stop, stop_rx) = tokio::sync::oneshot::channel();
    let (_out, task) = events_cli(addr, &[], stop_rx);
    let err = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("anchorctl exits")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.exit, exit::UNAVAILABLE, "{err:?}");
}

#[tokio::test]
async fn anchorctl_labels_codes_approvals_and_devices() {
    let (addr, backend) = serve().await;
    let (result, out) = anchorctl(
        addr,
        "owner",
        &[
            "--json",
            "pair",
            "code",
            "--label",
            "site=lab",
            "--label",
            "role=camera",
        ],
    )
    .await;
    result.unwrap();
    assert_eq!(json(&out)["labels"]["site"], "lab", "{out}");
    let (result, _) = anchorctl(
        addr,
        "owner",
        &["pair", "approve", "REQ-1", "--label", "rack=r1"],
    )
    .await;
    result.unwrap();
    let (result, out) = anchorctl(
        addr,
        "owner",
        &[
            "--json",
            "device",
            "label",
            "aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt",
            "role=camera",
            "site-",
        ],
    )
    .await;
    result.unwrap();
    let device = json(&out);
    assert_eq!(device["labels"]["role"], "camera", "{device}");
    assert!(device["labels"].get("site").is_none(), "{device}");
    assert!(backend.calls().contains(&"label"), "{:?}", backend.calls());
    // Reserved keys and malformed labels are refused before anything is sent.
    let url = format!("http://{addr}");
    for bad in [
        vec![
            "anchorctl",
            "--url",
            &url,
            "pair",
            "code",
            "--label",
            "node.anchorage/os=x",
        ],
        vec![
            "anchorctl",
            "--url",
            &url,
            "pair",
            "code",
            "--label",
            "site",
        ],
    ] {
        let err = cli::parse_from(bad.clone()).unwrap_err();
        assert!(err.to_string().contains("label"), "{bad:?}: {err}");
    }
    let (result, _) = anchorctl(
        addr,
        "owner",
        &[
            "device",
            "label",
            "aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt",
            "node.anchorage/os=x",
        ],
    )
    .await;
    assert_eq!(result.unwrap_err().exit, cli::exit::BAD_INPUT);
}

// ---------------------------------------------------------------------------------------------
// Operators' habits: names and prefixes, -o, completion, --watch, --version, exit codes

/// A second device whose id shares the fixture's first characters (`aaaq-eaye-...`).
fn twin() -> Device {
    let mut bytes: [u8; 20] = std::array::from_fn(|i| i as u8);
    bytes[19] = 0xee;
    Device {
        device_id: DeviceId::from_bytes(bytes),
        name: "garage-cam".into(),
        ..device(TrustState::Trusted)
    }
}

#[tokio::test]
async fn anchorctl_takes_devices_by_name_or_id_prefix() {
    let (addr, backend) = serve().await;
    for who in ["kitchen-pi", "KITCHEN-PI", "aaaq-eaye", "AAAQEAYE"] {
        let (r, out) = anchorctl(addr, "owner", &["-o", "json", "device", "show", who]).await;
        r.unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(json(&out)["device_id"], DEVICE, "{who}");
    }
    let (r, out) = anchorctl(
        addr,
        "owner",
        &["--json", "inventory", "show", "kitchen-pi"],
    )
    .await;
    r.unwrap();
    assert_eq!(json(&out)["device_id"], DEVICE);
    let (r, out) = anchorctl(
        addr,
        "owner",
        &["--json", "invoke", "kitchen-pi", "echo", "--input", "7"],
    )
    .await;
    r.unwrap();
    assert_eq!(json(&out)["output"], 7, "{out}");
    let (r, out) = anchorctl(
        addr,
        "owner",
        &["--json", "audit", "--target", "kitchen-pi"],
    )
    .await;
    r.unwrap();
    assert_eq!(
        json(&out)[0]["target"],
        DEVICE,
        "the name became the id: {out}"
    );
    // Pairing requests by id prefix.
    let (r, out) = anchorctl(addr, "owner", &["--json", "pair", "show", "req-"]).await;
    r.unwrap();
    assert_eq!(json(&out)["request_id"], REQUEST);

    // A near miss suggests the device.
    let (r, _) = anchorctl(addr, "owner", &["device", "revoke", "kitchn-pi"]).await;
    let err = r.unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::FAILURE, "not_found"));
    assert_eq!(
        err.message,
        format!("device \"kitchn-pi\" not found; did you mean kitchen-pi ({DEVICE})?")
    );
    assert!(!backend.calls().contains(&"revoke"), "nothing revoked");

    // Two devices sharing a prefix: both are listed, neither is touched.
    backend.more_devices.lock().unwrap().push(twin());
    let (r, _) = anchorctl(addr, "owner", &["device", "rotate", "aaaq-eaye"]).await;
    let err = r.unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::FAILURE, "ambiguous"));
    assert!(
        err.message.contains(&format!("kitchen-pi ({DEVICE})"))
            && err
                .message
                .contains(&format!("garage-cam ({})", twin().device_id)),
        "{}",
        err.message
    );
    assert!(!backend.calls().contains(&"rotate"));
    // The other one by its name.
    let (r, out) = anchorctl(addr, "owner", &["--json", "device", "show", "kitchen-pi"]).await;
    r.unwrap();
    assert_eq!(json(&out)["device_id"], DEVICE);
}

#[tokio::test]
async fn dash_o_json_is_json_and_dash_o_text_is_text() {
    let (addr, _backend) = serve().await;
    let (r, with_json) = anchorctl(addr, "owner", &["--json", "device", "list"]).await;
    r.unwrap();
    for args in [
        &["-o", "json", "device", "list"][..],
        &["device", "list", "--output=json"],
    ] {
        let (r, out) = anchorctl(addr, "owner", args).await;
        r.unwrap();
        assert_eq!(json(&out), json(&with_json), "{args:?}");
    }
    let (r, out) = anchorctl(addr, "owner", &["device", "list", "-o", "text"]).await;
    r.unwrap();
    assert!(out.starts_with("DEVICE "), "{out}");
    let err = cli::parse_from(["anchorctl", "-o", "yaml", "nodes"]).unwrap_err();
    assert_eq!(err.exit_code(), i32::from(exit::USAGE));
}

#[tokio::test]
async fn completion_scripts_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete"),
        ("zsh", "#compdef"),
        ("fish", "complete -c"),
    ] {
        let cli = cli::parse_from(["anchorctl", "completion", shell]).unwrap();
        let mut out = Vec::new();
        cli::run(cli, &mut out, std::future::pending())
            .await
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(marker), "{shell}: {text}");
        // It knows the commands and their flags.
        assert!(
            text.contains("anchorctl") && text.contains("inventory") && text.contains("watch"),
            "{shell}"
        );
    }
}

/// Runs `anchorctl inventory --watch` (plus `extra`) until `stop`.
fn watch_cli(
    addr: SocketAddr,
    extra: &[&str],
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (Shared, tokio::task::JoinHandle<Result<(), CliError>>) {
    let url = format!("http://{addr}");
    let mut args = vec![
        "anchorctl",
        "--url",
        &url,
        "--token",
        "owner",
        "inventory",
        "--watch",
    ];
    args.extend_from_slice(extra);
    let cli = cli::parse_from(args).unwrap();
    let out = Shared::default();
    let mut writer = out.clone();
    let task = tokio::spawn(async move {
        cli::run(cli, &mut writer, async {
            let _ = stop.await;
        })
        .await
    });
    (out, task)
}

fn text_of(out: &Shared) -> String {
    String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
}

#[tokio::test]
async fn inventory_watch_prints_again_when_presence_changes() {
    let (addr, backend) = serve().await;
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (out, task) = watch_cli(addr, &[], stop_rx);
    until("the first table", || text_of(&out).contains("online")).await;
    until("the subscription", || backend.events.receiver_count() == 1).await;
    // An event that changes nothing prints nothing.
    backend.events.send(event(1, "presence")).unwrap();
    *backend.presence.lock().unwrap() = Presence::Offline;
    backend.events.send(event(2, "presence")).unwrap();
    until("the second table", || {
        text_of(&out).matches("PRESENCE").count() == 2
    })
    .await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("--watch ends at shutdown")
        .unwrap()
        .unwrap();
    let text = text_of(&out);
    assert_eq!(text.matches("PRESENCE").count(), 2, "two tables: {text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(DEVICE)).collect();
    assert!(
        rows.len() == 2 && rows[0].contains(" online ") && rows[1].contains(" offline "),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no escapes off a terminal: {text:?}"
    );

    // --json: one document per change, one line each.
    let (addr, backend) = serve().await;
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let (out, task) = watch_cli(addr, &["--json"], stop_rx);
    until("the first line", || text_of(&out).lines().count() == 1).await;
    until("the subscription", || backend.events.receiver_count() == 1).await;
    *backend.presence.lock().unwrap() = Presence::Stale;
    backend.events.send(event(1, "presence")).unwrap();
    until("the second line", || text_of(&out).lines().count() == 2).await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let presences: Vec<String> = text_of(&out)
        .lines()
        .map(|l| {
            json(l)["devices"][0]["presence"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(presences, ["online", "stale"]);
}

#[tokio::test]
async fn version_shows_the_client_and_the_anchor() {
    let (addr, _backend) = serve().await;
    let url = format!("http://{addr}");
    let asked = cli::version_request(["anchorctl", "--url", &url, "--version"]);
    assert_eq!(asked.as_deref(), Some(url.as_str()));
    assert_eq!(cli::version_request(["anchorctl", "nodes"]), None);
    let mut out = Vec::new();
    cli::print_version(&url, &mut out).await.unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("anchorctl {version}\nanchor: {version} (http://{addr}/)\n")
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let mut out = Vec::new();
    cli::print_version(&format!("http://{dead}"), &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with(&format!("anchorctl {version}\nanchor: unreachable (")),
        "{text}"
    );
}

#[tokio::test]
async fn a_bad_url_is_bad_input_and_a_dead_one_unreachable_even_without_a_token() {
    // No --token: the token is looked for only once the URL is known to be usable.
    let run_without_token = |url: String, args: &'static [&'static str]| async move {
        let mut argv = vec!["anchorctl".to_string(), "--url".into(), url];
        argv.extend(args.iter().map(|a| a.to_string()));
        let cli = cli::parse_from(argv).unwrap();
        let mut out = Vec::new();
        cli::run(cli, &mut out, std::future::pending()).await
    };
    let err = run_without_token("ftp://x".into(), &["nodes"])
        .await
        .unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::BAD_INPUT, "bad_url"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let err = run_without_token(format!("http://{dead}"), &["nodes"])
        .await
        .unwrap_err();
    assert_eq!(
        (err.exit, err.code.as_str()),
        (exit::UNAVAILABLE, "unreachable")
    );
    let (addr, _backend) = serve().await;
    let err = run_without_token(format!("http://{addr}"), &["nodes"])
        .await
        .unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (exit::AUTH, "no_token"));
}

#[tokio::test]
async fn limit_zero_is_refused_everywhere() {
    let (addr, backend) = serve().await;
    for args in [
        &["audit", "--limit", "0"][..],
        &["batch", "list", "--limit", "0"],
        &["invocation", "list", "--limit", "0"],
    ] {
        let (r, _) = anchorctl(addr, "owner", args).await;
        let err = r.unwrap_err();
        assert_eq!(err.exit, exit::BAD_INPUT, "{args:?}");
        assert_eq!(err.message, "--limit must be at least 1", "{args:?}");
    }
    assert!(backend.calls().is_empty(), "{:?}", backend.calls());
    let (r, _) = anchorctl(addr, "owner", &["audit", "--limit", "1"]).await;
    r.unwrap();
}

#[tokio::test]
async fn invoke_shows_the_node_time_and_the_round_trip() {
    let (addr, _backend) = serve().await;
    let (r, out) = anchorctl(addr, "owner", &["invoke", DEVICE, "echo", "--input", "1"]).await;
    r.unwrap();
    let head = out.lines().next().unwrap();
    assert!(
        head.contains(" on the node, ") && head.ends_with(" round trip"),
        "{head}"
    );
    let (r, out) = anchorctl(addr, "owner", &["--json", "invoke", DEVICE, "echo"]).await;
    r.unwrap();
    let doc = json(&out);
    let rt = doc["round_trip_ms"].as_f64().unwrap();
    assert!(rt > 0.0, "{doc}");
    assert_eq!(
        (rt * 1000.0).round() / 1000.0,
        rt,
        "three decimals at most: {rt}"
    );
    assert!(
        doc.get("duration_ms").is_some(),
        "the node's time stays: {doc}"
    );
}

#[tokio::test]
async fn colours_only_when_asked_or_on_a_terminal() {
    let (addr, backend) = serve().await;
    *backend.presence.lock().unwrap() = Presence::Stale;
    let (r, out) = anchorctl(addr, "owner", &["inventory", "--color", "never"]).await;
    r.unwrap();
    assert!(out.contains("stale") && !out.contains('\u{1b}'), "{out:?}");
    let (r, out) = anchorctl(addr, "owner", &["inventory", "--color", "always"]).await;
    r.unwrap();
    assert!(out.contains("\u{1b}[33mstale\u{1b}[0m"), "yellow: {out:?}");
    // JSON never carries colour.
    let (r, out) = anchorctl(addr, "owner", &["inventory", "--json", "--color", "always"]).await;
    r.unwrap();
    assert!(!out.contains('\u{1b}'));
}
