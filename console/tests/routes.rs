//! The console router over an in-memory backend, request by request
//! (`tower::ServiceExt::oneshot`): authentication, permissions, error bodies, statuses, SSE.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anchorage_console::api::*;
use anchorage_console::routes::{RouterOptions, router, router_with_options};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode, header};
use futures_util::StreamExt;
use tower::ServiceExt;

use common::*;

/// Every `/console/v1` route (and `/metrics`) with the permission it requires, a request that
/// succeeds with exactly that permission, and the success status.
struct Case {
    method: &'static str,
    uri: &'static str,
    body: Option<&'static str>,
    permission: Permission,
    ok: StatusCode,
}

const fn case(
    method: &'static str,
    uri: &'static str,
    body: Option<&'static str>,
    permission: Permission,
    ok: StatusCode,
) -> Case {
    Case {
        method,
        uri,
        body,
        permission,
        ok,
    }
}

use Permission::{NodesInvoke, ObservabilityRead as Read, TokensManage, TrustOperate};

#[rustfmt::skip]
const ROUTES: &[Case] = &[
    case("POST", "/console/v1/pairing/codes", Some(r#"{"method":"pin"}"#), TrustOperate, StatusCode::CREATED),
    case("GET", "/console/v1/pairing/codes", None, Read, StatusCode::OK),
    case("GET", "/console/v1/pairing/requests?state=pending_approval", None, Read, StatusCode::OK),
    case("GET", "/console/v1/pairing/requests/REQ-1", None, Read, StatusCode::OK),
    case("POST", "/console/v1/pairing/requests/REQ-1/approve", None, TrustOperate, StatusCode::OK),
    case("POST", "/console/v1/pairing/requests/REQ-1/reject", None, TrustOperate, StatusCode::OK),
    case("GET", "/console/v1/devices", None, Read, StatusCode::OK),
    case("GET", "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt", None, Read, StatusCode::OK),
    case("POST", "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/revoke", None, TrustOperate, StatusCode::OK),
    case("POST", "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/rotate", None, TrustOperate, StatusCode::OK),
    case("DELETE", "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt", None, TrustOperate, StatusCode::NO_CONTENT),
    case("PATCH", "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/labels", Some(r#"{"set":{"role":"camera"}}"#), TrustOperate, StatusCode::OK),
    case("GET", "/console/v1/devices?selector=site%3Dlab", None, Read, StatusCode::OK),
    case("GET", "/console/v1/inventory?selector=site%3Dlab", None, Read, StatusCode::OK),
    case("POST", "/console/v1/tokens", Some(r#"{"permissions":["observability.read"]}"#), TokensManage, StatusCode::CREATED),
    case("GET", "/console/v1/tokens", None, TokensManage, StatusCode::OK),
    case("DELETE", "/console/v1/tokens/TOK-1", None, TokensManage, StatusCode::OK),
    case("GET", "/console/v1/inventory", None, Read, StatusCode::OK),
    case("GET", "/console/v1/inventory/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt", None, Read, StatusCode::OK),
    case("GET", "/console/v1/inventory/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt", None, Read, StatusCode::OK),
    case("GET", "/console/v1/nodes", None, Read, StatusCode::OK),
    case("GET", "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt", None, Read, StatusCode::OK),
    case("POST", "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke", Some(r#"{"capability":"echo","input":1}"#), NodesInvoke, StatusCode::OK),
    case("GET", "/console/v1/invocations?device_id=aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt&limit=5", None, Read, StatusCode::OK),
    case("GET", "/console/v1/invocations/0123456789abcdef0123456789abcdef", None, Read, StatusCode::OK),
    case("GET", "/console/v1/events", None, Read, StatusCode::OK),
    case("GET", "/console/v1/audit?target=aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt&limit=5", None, Read, StatusCode::OK),
    case("GET", "/console/v1/qr?text=anchorage%3A%2F%2Fpair", None, TrustOperate, StatusCode::OK),
    case("POST", "/console/v1/batches", Some(r#"{"selector":"site=lab","capability":"echo"}"#), NodesInvoke, StatusCode::CREATED),
    case("GET", "/console/v1/batches?limit=5", None, Read, StatusCode::OK),
    case("GET", "/console/v1/batches/0123456789abcdef0123456789abcdef", None, Read, StatusCode::OK),
    case("GET", "/metrics", None, Read, StatusCode::OK),
];

fn app() -> (Router, Arc<TestBackend>) {
    let backend = Arc::new(TestBackend::new());
    (router(backend.clone()), backend)
}

fn build(method: &str, uri: &str, auth: Option<&str>, body: Option<&str>) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(auth) = auth {
        req = req.header(header::AUTHORIZATION, auth);
    }
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap()
}

async fn send(app: Router, req: Request<Body>) -> Response<Body> {
    app.oneshot(req).await.unwrap()
}

async fn body_bytes(res: Response<Body>) -> Bytes {
    axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap()
}

/// Asserts an error answer: status, JSON content type, exactly `{code, message}`.
async fn assert_error(res: Response<Body>, status: StatusCode, code: &str) -> String {
    assert_eq!(res.status(), status);
    let content_type = res.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let value: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    let object = value.as_object().unwrap();
    assert_eq!(
        object.len(),
        2,
        "error body has exactly code and message: {value}"
    );
    assert_eq!(object["code"], code, "{value}");
    let message = object["message"].as_str().unwrap().to_owned();
    assert!(!message.is_empty());
    message
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// What a token limited to `site=home` (the one device is `site=lab`) gets on a route.
enum OutOfScope {
    /// 403 `out_of_scope`.
    Refused,
    /// The usual answer, without the device (a listing).
    Hidden,
    /// The usual answer (nothing about devices in it, or the route refuses scoped tokens
    /// anyway).
    Same,
}

fn out_of_scope(c: &Case) -> OutOfScope {
    let path = c.uri.split('?').next().unwrap();
    let one_device = path.contains("aaaq-") || path.starts_with("/console/v1/invocations/");
    let request = path.starts_with("/console/v1/pairing/requests/");
    if one_device || request || path == "/metrics" || c.method == "POST" && path.ends_with("/codes")
    {
        OutOfScope::Refused
    } else if path.starts_with("/console/v1/batches/") {
        // Created by the owner: a scoped token sees only its own batches.
        OutOfScope::Refused
    } else if matches!(
        path,
        "/console/v1/devices"
            | "/console/v1/inventory"
            | "/console/v1/nodes"
            | "/console/v1/invocations"
            | "/console/v1/audit"
            | "/console/v1/pairing/codes"
            | "/console/v1/pairing/requests"
            | "/console/v1/batches"
    ) && c.method == "GET"
    {
        OutOfScope::Hidden
    } else {
        OutOfScope::Same
    }
}

#[tokio::test]
async fn every_route_checks_a_scoped_token_inside_and_outside_its_scope() {
    let device = "aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt";
    for c in ROUTES {
        if c.uri.ends_with("/events") {
            continue; // a stream: tests/tests/fleet.rs follows one with a scoped token
        }
        // Inside: the device and the code are site=lab, the capability echo matches `ec*`.
        let expected_inside = match c.permission {
            TokensManage => StatusCode::FORBIDDEN,
            _ if c.uri == "/metrics" => StatusCode::FORBIDDEN,
            // The scoped token did not create the owner's batch.
            _ if c.uri.starts_with("/console/v1/batches/") => StatusCode::FORBIDDEN,
            _ => c.ok,
        };
        // A code minted by a scoped token must carry labels its selector matches.
        let inside_body = if c.method == "POST" && c.uri.ends_with("/pairing/codes") {
            Some(r#"{"method":"pin","labels":{"site":"lab"}}"#)
        } else {
            c.body
        };
        let (router, _) = app();
        let res = send(
            router,
            build(
                c.method,
                c.uri,
                Some(&bearer("scoped:site=lab")),
                inside_body,
            ),
        )
        .await;
        assert_eq!(
            res.status(),
            expected_inside,
            "inside: {} {}",
            c.method,
            c.uri
        );
        if expected_inside.is_success() && c.method == "GET" && c.uri.contains("devices") {
            let body = body_bytes(res).await;
            assert!(
                String::from_utf8_lossy(&body).contains(device),
                "inside: {} {} leaves out the device",
                c.method,
                c.uri
            );
        }

        // Outside.
        if c.permission == TokensManage {
            continue; // refused for the permission already
        }
        let (router, _) = app();
        let res = send(
            router,
            build(c.method, c.uri, Some(&bearer("scoped:site=home")), c.body),
        )
        .await;
        let what = format!("outside: {} {}", c.method, c.uri);
        match out_of_scope(c) {
            OutOfScope::Refused => {
                let message = assert_error(res, StatusCode::FORBIDDEN, "out_of_scope").await;
                assert!(message.contains("site=home"), "{what}: {message}");
            }
            OutOfScope::Hidden => {
                assert_eq!(res.status(), StatusCode::OK, "{what}");
                let body = String::from_utf8_lossy(&body_bytes(res).await).into_owned();
                assert!(!body.contains(device), "{what} shows the device: {body}");
                assert!(!body.contains("K7QF"), "{what} shows the code: {body}");
            }
            OutOfScope::Same => {
                if c.uri == "/console/v1/batches" {
                    // A batch covers only the token's devices: none here.
                    assert_eq!(res.status(), StatusCode::CREATED, "{what}");
                    let batch: Batch = serde_json::from_slice(&body_bytes(res).await).unwrap();
                    assert_eq!(batch.info.total, 0, "{what}");
                } else {
                    assert_eq!(res.status(), c.ok, "{what}");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_scoped_token_may_run_only_its_capabilities() {
    let (router, _) = app();
    let res = send(
        router,
        build(
            "POST",
            "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke",
            Some(&bearer("scoped:site=lab")),
            Some(r#"{"capability":"fail"}"#),
        ),
    )
    .await;
    let message = assert_error(res, StatusCode::FORBIDDEN, "out_of_scope").await;
    assert!(message.contains("ec*"), "{message}");
    let (router, _) = app();
    let res = send(
        router,
        build(
            "POST",
            "/console/v1/batches",
            Some(&bearer("scoped:site=lab")),
            Some(r#"{"selector":"","capability":"shell"}"#),
        ),
    )
    .await;
    assert_error(res, StatusCode::FORBIDDEN, "out_of_scope").await;
}

#[tokio::test]
async fn every_route_refuses_a_missing_malformed_or_unknown_token() {
    for c in ROUTES {
        for auth in [
            None,
            Some("Basic b3duZXI6b3duZXI="),
            Some("Bearer"),
            Some("owner"),
            Some("Bearer wrong-token"),
        ] {
            let (app, backend) = app();
            let res = send(app, build(c.method, c.uri, auth, c.body)).await;
            assert_eq!(
                res.status(),
                StatusCode::UNAUTHORIZED,
                "{} {} {auth:?}",
                c.method,
                c.uri
            );
            let challenge = res.headers().get(header::WWW_AUTHENTICATE).cloned();
            assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
            assert!(
                challenge.is_some(),
                "{} {}: no WWW-Authenticate",
                c.method,
                c.uri
            );
            assert!(
                backend.calls().is_empty(),
                "{} {} reached the backend",
                c.method,
                c.uri
            );
        }
    }
}

#[tokio::test]
async fn every_route_refuses_a_token_lacking_its_permission() {
    for c in ROUTES {
        for token in [format!("all-but:{}", c.permission), "none".to_string()] {
            let (app, backend) = app();
            let res = send(app, build(c.method, c.uri, Some(&bearer(&token)), c.body)).await;
            assert_eq!(
                res.status(),
                StatusCode::FORBIDDEN,
                "{} {} {token}",
                c.method,
                c.uri
            );
            let message = assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
            assert!(
                message.contains(c.permission.as_str()),
                "{} {}: {message}",
                c.method,
                c.uri
            );
            assert!(
                backend.calls().is_empty(),
                "{} {} reached the backend without {}",
                c.method,
                c.uri,
                c.permission
            );
        }
    }
}

#[tokio::test]
async fn every_route_answers_with_exactly_its_permission() {
    for c in ROUTES {
        let (app, backend) = app();
        let token = bearer(&format!("only:{}", c.permission));
        let res = send(app, build(c.method, c.uri, Some(&token), c.body)).await;
        assert_eq!(res.status(), c.ok, "{} {}", c.method, c.uri);
        assert!(
            !backend.calls().is_empty(),
            "{} {} did not reach the backend",
            c.method,
            c.uri
        );
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        match c.uri {
            "/console/v1/events" => assert_eq!(content_type, "text/event-stream"),
            "/metrics" => assert!(content_type.starts_with("text/plain; version=0.0.4")),
            u if u.starts_with("/console/v1/qr") => assert_eq!(content_type, "image/svg+xml"),
            _ if c.ok == StatusCode::NO_CONTENT => assert!(body_bytes(res).await.is_empty()),
            _ => {
                assert!(content_type.starts_with("application/json"), "{}", c.uri);
                serde_json::from_slice::<serde_json::Value>(&body_bytes(res).await).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn owner_token_reaches_every_route() {
    for c in ROUTES {
        let (app, _) = app();
        let res = send(app, build(c.method, c.uri, Some("Bearer owner"), c.body)).await;
        assert_eq!(res.status(), c.ok, "{} {}", c.method, c.uri);
    }
}

#[tokio::test]
async fn answers_are_typed_as_the_api_promises() {
    let (app, _) = app();
    let res = send(
        app.clone(),
        build(
            "GET",
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt",
            Some("Bearer owner"),
            None,
        ),
    )
    .await;
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    let device: Device = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(device.device_id.to_string(), DEVICE);

    let res = send(
        app.clone(),
        build(
            "POST",
            "/console/v1/pairing/codes",
            Some("Bearer owner"),
            Some(r#"{"method":"qr","ttl_secs":120}"#),
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let code: MintedCode = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(code.method, PairMethod::Qr);
    assert!(code.uri.is_some());
    assert_eq!(code.expires_at, now() + time::Duration::seconds(120));

    let res = send(
        app,
        build("GET", "/console/v1/inventory", Some("Bearer owner"), None),
    )
    .await;
    let inventory: Inventory = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(inventory.devices[0].device_id.to_string(), DEVICE);
}

#[tokio::test]
async fn minting_without_a_body_uses_the_defaults() {
    let (app, _) = app();
    let res = send(
        app,
        build(
            "POST",
            "/console/v1/pairing/codes",
            Some("Bearer owner"),
            None,
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let code: MintedCode = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(code.method, PairMethod::Pin);
    assert_eq!(code.expires_at, now() + time::Duration::seconds(600));
}

#[tokio::test]
async fn bad_json_bodies_are_400_bad_request() {
    for (uri, body) in [
        ("/console/v1/tokens", r#"{"permissions":"#),
        ("/console/v1/tokens", r#"{"permissions":["root"]}"#),
        ("/console/v1/tokens", r#"{"permissions":[]}"#),
        ("/console/v1/tokens", ""),
        (
            "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke",
            r#"{"input":1}"#,
        ),
        (
            "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke",
            r#"[1,2]"#,
        ),
        (
            "/console/v1/pairing/codes",
            r#"{"method":"carrier-pigeon"}"#,
        ),
        (
            "/console/v1/pairing/requests/REQ-1/reject",
            r#"{"reason":5}"#,
        ),
        (
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/revoke",
            "not json",
        ),
    ] {
        let (app, backend) = app();
        let res = send(app, build("POST", uri, Some("Bearer owner"), Some(body))).await;
        let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(!message.contains("panic"), "{uri} {body}: {message}");
        assert!(
            backend.calls().is_empty(),
            "{uri} {body:?} reached the backend"
        );
    }
}

#[tokio::test]
async fn a_bad_body_from_a_caller_without_permission_is_still_403() {
    let (app, _) = app();
    let res = send(
        app,
        build(
            "POST",
            "/console/v1/tokens",
            Some("Bearer only:observability.read"),
            Some("{"),
        ),
    )
    .await;
    assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
}

#[tokio::test]
async fn a_non_json_content_type_is_415_json() {
    let (app, _) = app();
    let req = Request::post("/console/v1/tokens")
        .header(header::AUTHORIZATION, "Bearer owner")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("permissions=x"))
        .unwrap();
    assert_error(
        send(app, req).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
}

#[tokio::test]
async fn oversized_bodies_are_413_json() {
    let (app, backend) = app();
    let big = format!(
        r#"{{"capability":"echo","input":"{}"}}"#,
        "x".repeat(2 << 20)
    );
    let res = send(
        app,
        build(
            "POST",
            "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke",
            Some("Bearer owner"),
            Some(&big),
        ),
    )
    .await;
    assert_error(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(backend.calls().is_empty());
}

#[tokio::test]
async fn bad_query_parameters_are_400() {
    for uri in [
        "/console/v1/pairing/requests?state=bogus",
        "/console/v1/invocations?limit=many",
        "/console/v1/qr",
        "/console/v1/qr?text=",
    ] {
        let (app, backend) = app();
        let res = send(app, build("GET", uri, Some("Bearer owner"), None)).await;
        assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(backend.calls().is_empty(), "{uri}");
    }
    let (app, _) = app();
    let res = send(
        app,
        build(
            "GET",
            "/console/v1/pairing/requests?state=bogus",
            Some("Bearer owner"),
            None,
        ),
    )
    .await;
    let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(
        message.contains("pending_approval"),
        "lists the valid states: {message}"
    );
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    for (uri, auth) in [
        ("/console/v1/nope", Some("Bearer owner")),
        ("/console/v1/nope", None),
        (
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/explode",
            Some("Bearer owner"),
        ),
        ("/console/v2/devices", Some("Bearer owner")),
    ] {
        let (app, _) = app();
        let res = send(app, build("GET", uri, auth, None)).await;
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    }
    // Beside the web page's assets, nothing is served outside the API.
    for uri in ["/assets/nope.js", "/index.html", "/favicon.ico"] {
        let (app, _) = app();
        let res = send(app, build("GET", uri, None, None)).await;
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    }
}

#[tokio::test]
async fn whoami_answers_any_valid_token_with_itself() {
    let mut tokens = vec!["owner".to_string(), "none".to_string()];
    for p in Permission::ALL {
        tokens.push(format!("only:{p}"));
        tokens.push(format!("all-but:{p}"));
    }
    for token in tokens {
        let (app, backend) = app();
        let res = send(
            app,
            build("GET", "/console/v1/whoami", Some(&bearer(&token)), None),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK, "{token}");
        assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
        let value: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["name", "permissions", "scope", "token_id"],
            "{value}"
        );
        let principal: Principal = serde_json::from_value(value).unwrap();
        assert_eq!(principal, principal_for(&token).unwrap());
        assert!(backend.calls().is_empty(), "whoami needs only the token");
    }
}

#[tokio::test]
async fn whoami_refuses_a_missing_or_unknown_token() {
    for auth in [None, Some("Bearer"), Some("Bearer wrong-token")] {
        let (app, _) = app();
        let res = send(app, build("GET", "/console/v1/whoami", auth, None)).await;
        assert!(res.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let (app, _) = app();
    let res = send(
        app,
        build("POST", "/console/v1/whoami", Some("Bearer owner"), None),
    )
    .await;
    assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn the_web_page_is_served_without_a_token_under_a_strict_csp() {
    for (uri, content_type, needle) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<title>Anchorage console</title>",
        ),
        (
            "/assets/app.js",
            "text/javascript; charset=utf-8",
            "/console/v1",
        ),
        ("/assets/style.css", "text/css; charset=utf-8", ".badge"),
    ] {
        let (app, backend) = app();
        let res = send(app, build("GET", uri, None, None)).await;
        assert_eq!(res.status(), StatusCode::OK, "{uri}");
        let headers = res.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{uri}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{uri}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{uri}");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        for directive in [
            "default-src 'self'",
            "img-src 'self' blob: data:",
            "style-src 'self'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{uri}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{uri}: {csp}");
        let body = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
        assert!(body.contains(needle), "{uri}");
        assert!(backend.calls().is_empty());
    }
    // Only GET: a form posted without its script lands here, not anywhere else.
    let (app, _) = app();
    let res = send(app, build("POST", "/", None, None)).await;
    assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn unknown_ids_are_404_json_from_the_backend() {
    let (app, _) = app();
    let res = send(
        app,
        build(
            "GET",
            "/console/v1/devices/NOPE",
            Some("Bearer owner"),
            None,
        ),
    )
    .await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn malformed_ids_are_404_or_400_before_the_backend_but_after_the_permission_check() {
    for (method, uri, message) in [
        ("GET", "/console/v1/devices/NOPE", "device NOPE not found"),
        (
            "POST",
            "/console/v1/devices/NOPE/revoke",
            "device NOPE not found",
        ),
        ("GET", "/console/v1/nodes/NOPE", "device NOPE not found"),
        ("GET", "/console/v1/inventory/NOPE", "device NOPE not found"),
        (
            "GET",
            "/console/v1/invocations/NOPE",
            "invocation NOPE not found",
        ),
    ] {
        let (router, backend) = app();
        let res = send(router, build(method, uri, Some("Bearer owner"), None)).await;
        let got = assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
        assert!(got.contains(message), "{uri}: {got}");
        assert!(backend.calls().is_empty(), "{uri}: {:?}", backend.calls());

        let (router, _) = app();
        let res = send(router, build(method, uri, Some("Bearer none"), None)).await;
        assert_error(res, StatusCode::FORBIDDEN, "forbidden").await;
    }
    let (router, backend) = app();
    let res = send(
        router,
        build(
            "GET",
            "/console/v1/invocations?device_id=NOPE",
            Some("Bearer owner"),
            None,
        ),
    )
    .await;
    let got = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(got.contains("invalid device id \"NOPE\""), "{got}");
    assert!(backend.calls().is_empty());

    // Every accepted form of an id reaches the backend as the same device.
    for form in [DEVICE.to_uppercase(), DEVICE.replace('-', "")] {
        let (router, backend) = app();
        let uri = format!("/console/v1/devices/{form}");
        let res = send(router, build("GET", &uri, Some("Bearer owner"), None)).await;
        assert_eq!(res.status(), StatusCode::OK, "{uri}");
        assert_eq!(backend.calls(), ["device"]);
    }
}

#[tokio::test]
async fn wrong_methods_are_405_json() {
    for (method, uri) in [
        ("PUT", "/console/v1/devices"),
        (
            "GET",
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/revoke",
        ),
        ("POST", "/console/v1/inventory"),
        ("DELETE", "/healthz"),
    ] {
        let (app, _) = app();
        let res = send(app, build(method, uri, Some("Bearer owner"), None)).await;
        let allow = res.headers().get(header::ALLOW).cloned();
        assert_error(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
        assert!(allow.is_some(), "{method} {uri}: no Allow header");
    }
}

#[tokio::test]
async fn invoke_answers_200_when_final_and_202_while_running() {
    for (body, status, state) in [
        (
            r#"{"capability":"echo","input":{"a":1}}"#,
            StatusCode::OK,
            InvocationState::Succeeded,
        ),
        (
            r#"{"capability":"fail"}"#,
            StatusCode::OK,
            InvocationState::Failed,
        ),
        (
            r#"{"capability":"missing"}"#,
            StatusCode::OK,
            InvocationState::Rejected,
        ),
        (
            r#"{"capability":"slow","timeout_ms":10}"#,
            StatusCode::ACCEPTED,
            InvocationState::Dispatched,
        ),
        (
            r#"{"capability":"echo","async":true}"#,
            StatusCode::ACCEPTED,
            InvocationState::Queued,
        ),
    ] {
        let (app, _) = app();
        let res = send(
            app,
            build(
                "POST",
                "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke",
                Some("Bearer owner"),
                Some(body),
            ),
        )
        .await;
        assert_eq!(res.status(), status, "{body}");
        let inv: Invocation = serde_json::from_slice(&body_bytes(res).await).unwrap();
        assert_eq!(inv.state, state, "{body}");
        if state == InvocationState::Succeeded {
            assert_eq!(inv.output, Some(serde_json::json!({"a": 1})));
        }
    }
}

#[tokio::test]
async fn reasons_are_optional_and_passed_through() {
    for (uri, body, want) in [
        ("/console/v1/pairing/requests/REQ-1/reject", None, None),
        (
            "/console/v1/pairing/requests/REQ-1/reject",
            Some("{}"),
            None,
        ),
        (
            "/console/v1/pairing/requests/REQ-1/reject",
            Some(r#"{"reason":"unknown box"}"#),
            Some("unknown box"),
        ),
        (
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/revoke",
            None,
            None,
        ),
        (
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/revoke",
            Some(r#"{"reason":"stolen"}"#),
            Some("stolen"),
        ),
    ] {
        let (app, backend) = app();
        let res = send(app, build("POST", uri, Some("Bearer owner"), body)).await;
        assert_eq!(res.status(), StatusCode::OK, "{uri} {body:?}");
        assert_eq!(
            backend.last_reason.lock().unwrap().clone(),
            Some(want.map(String::from)),
            "{uri} {body:?}"
        );
    }
}

#[tokio::test]
async fn healthz_needs_no_token_and_reports_readiness() {
    let (app, backend) = app();
    let res = send(app.clone(), build("GET", "/healthz", None, None)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    // The version is the anchor's: `anchorctl --version` shows it.
    assert_eq!(
        body,
        serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })
    );

    backend
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let res = send(app, build("GET", "/healthz", None, None)).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(body["status"], "starting");
}

#[tokio::test]
async fn the_replaced_control_planes_inventory_path_answers_as_ours() {
    let id = "aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt";
    let ours = format!("/console/v1/inventory/{id}");
    let theirs = format!("/console/v1/inventory/devices/{id}");
    for token in [
        "Bearer owner",
        "Bearer none",
        "Bearer scoped:site=elsewhere",
    ] {
        let (app, _) = app();
        let a = send(app.clone(), build("GET", &ours, Some(token), None)).await;
        let b = send(app, build("GET", &theirs, Some(token), None)).await;
        assert_eq!(a.status(), b.status(), "{token}");
        assert_eq!(body_bytes(a).await, body_bytes(b).await, "{token}");
    }
    let (app, _) = app();
    let res = send(app, build("GET", &theirs, Some("Bearer owner"), None)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let entry: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(entry["device_id"], id);
}

#[tokio::test]
async fn metrics_need_a_token_unless_made_public() {
    let (app, _) = app();
    let res = send(app, build("GET", "/metrics", None, None)).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthorized").await;

    let backend = Arc::new(TestBackend::new());
    let app = router_with_options(
        backend,
        RouterOptions {
            public_metrics: true,
            ..Default::default()
        },
    );
    let res = send(app.clone(), build("GET", "/metrics", None, None)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(
        String::from_utf8(body_bytes(res).await.to_vec())
            .unwrap()
            .contains("anchorage_up 1")
    );
    // The rest of the API still needs its token.
    let res = send(app, build("GET", "/console/v1/devices", None, None)).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

/// SSE event blocks (`event`, `id`, `data`) read off a response body; comments skipped.
struct SseReader {
    stream: axum::body::BodyDataStream,
    text: String,
}

impl SseReader {
    fn new(body: Body) -> Self {
        SseReader {
            stream: body.into_data_stream(),
            text: String::new(),
        }
    }

    async fn next(&mut self, count: usize) -> Vec<(String, Option<String>, String)> {
        let mut events = Vec::new();
        while events.len() < count {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let (mut kind, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    let field = |name: &str| {
                        line.strip_prefix(name)
                            .map(|v| v.strip_prefix(' ').unwrap_or(v).to_string())
                    };
                    if let Some(v) = field("event:") {
                        kind = v;
                    } else if let Some(v) = field("id:") {
                        id = Some(v);
                    } else if let Some(v) = field("data:") {
                        data.push_str(&v);
                    }
                }
                if !data.is_empty() {
                    events.push((kind, id, data));
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
                .await
                .expect("an SSE event within 5 s")
                .expect("the stream is still open")
                .unwrap();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        events
    }
}

async fn read_sse(body: Body, count: usize) -> Vec<(String, Option<String>, String)> {
    SseReader::new(body).next(count).await
}

#[tokio::test]
async fn sse_delivers_published_events() {
    let (app, backend) = app();
    let res = send(
        app,
        build(
            "GET",
            "/console/v1/events",
            Some("Bearer only:observability.read"),
            None,
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    // The handler subscribed before answering.
    assert_eq!(backend.events.receiver_count(), 1);
    let published = event(42, "presence");
    backend.events.send(published.clone()).unwrap();
    let got = read_sse(res.into_body(), 1).await;
    assert_eq!(got[0].0, "presence");
    assert_eq!(got[0].1.as_deref(), Some("42"));
    let decoded: Event = serde_json::from_str(&got[0].2).unwrap();
    assert_eq!(decoded, published);
}

#[tokio::test]
async fn sse_reports_lag_and_goes_on() {
    let backend = Arc::new(TestBackend::with_event_capacity(2));
    let app = router(backend.clone());
    let res = send(
        app,
        build("GET", "/console/v1/events", Some("Bearer owner"), None),
    )
    .await;
    for seq in 1..=5 {
        backend.events.send(event(seq, "invocation")).unwrap();
    }
    let mut reader = SseReader::new(res.into_body());
    let got = reader.next(3).await;
    assert_eq!(got[0].0, "lagged");
    let lag: serde_json::Value = serde_json::from_str(&got[0].2).unwrap();
    assert_eq!(lag["skipped"], 3);
    assert_eq!(
        (got[1].1.as_deref(), got[2].1.as_deref()),
        (Some("4"), Some("5"))
    );
    // The same stream goes on after the lag.
    backend.events.send(event(6, "presence")).unwrap();
    let got = reader.next(1).await;
    assert_eq!(
        (got[0].0.as_str(), got[0].1.as_deref()),
        ("presence", Some("6"))
    );
}

#[tokio::test]
async fn sse_ends_when_the_router_shuts_down() {
    let backend = Arc::new(TestBackend::new());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let app = router_with_options(
        backend.clone(),
        RouterOptions {
            shutdown: Some(stop_rx),
            ..Default::default()
        },
    );
    let res = send(
        app,
        build("GET", "/console/v1/events", Some("Bearer owner"), None),
    )
    .await;
    stop.send(true).unwrap();
    let body = tokio::time::timeout(Duration::from_secs(5), body_bytes(res))
        .await
        .expect("the stream ends on shutdown");
    assert!(
        String::from_utf8_lossy(&body).starts_with(":"),
        "only the opening comment"
    );
}

#[tokio::test]
async fn qr_is_svg_and_not_cached() {
    let (app, _) = app();
    let res = send(
        app,
        build(
            "GET",
            "/console/v1/qr?text=hello",
            Some("Bearer owner"),
            None,
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/svg+xml");
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-store");
    assert!(body_bytes(res).await.starts_with(b"<svg"));
}

#[tokio::test]
async fn unknown_body_fields_are_400_naming_the_field() {
    for (uri, body) in [
        ("/console/v1/pairing/codes", r#"{"method":"pin","ttl":60}"#),
        (
            "/console/v1/pairing/requests/REQ-1/reject",
            r#"{"reason":"no","ttl":60}"#,
        ),
        (
            "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/revoke",
            r#"{"ttl":60}"#,
        ),
        (
            "/console/v1/tokens",
            r#"{"permissions":["observability.read"],"ttl":60}"#,
        ),
        (
            "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke",
            r#"{"capability":"echo","ttl":60}"#,
        ),
    ] {
        let (app, backend) = app();
        let res = send(app, build("POST", uri, Some("Bearer owner"), Some(body))).await;
        let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(message.contains("unknown field `ttl`"), "{uri}: {message}");
        assert!(backend.calls().is_empty(), "{uri} reached the backend");
    }
}

#[tokio::test]
async fn free_text_over_the_limit_is_400_naming_field_and_limit() {
    let long = "é".repeat(MAX_TEXT_CHARS + 1);
    let device = "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt";
    for (uri, field, body) in [
        (
            "/console/v1/pairing/requests/REQ-1/reject".to_string(),
            "reason",
            serde_json::json!({ "reason": long }),
        ),
        (
            format!("{device}/revoke"),
            "reason",
            serde_json::json!({ "reason": long }),
        ),
        (
            "/console/v1/tokens".to_string(),
            "name",
            serde_json::json!({ "name": long, "permissions": ["observability.read"] }),
        ),
        (
            "/console/v1/nodes/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/invoke".to_string(),
            "capability",
            serde_json::json!({ "capability": long }),
        ),
    ] {
        let (app, backend) = app();
        let body = body.to_string();
        let res = send(app, build("POST", &uri, Some("Bearer owner"), Some(&body))).await;
        let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(message.contains(&format!("`{field}`")), "{uri}: {message}");
        assert!(message.contains("at most 512"), "{uri}: {message}");
        assert!(backend.calls().is_empty(), "{uri} reached the backend");
    }
    // Exactly at the limit (in characters, not bytes) is fine.
    let (app, backend) = app();
    let body = serde_json::json!({ "reason": "é".repeat(MAX_TEXT_CHARS) }).to_string();
    let uri = format!("{device}/revoke");
    let res = send(app, build("POST", &uri, Some("Bearer owner"), Some(&body))).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        backend.last_reason.lock().unwrap().clone(),
        Some(Some("é".repeat(MAX_TEXT_CHARS)))
    );
}

#[tokio::test]
async fn token_events_reach_only_tokens_that_may_manage_tokens() {
    let (app, backend) = app();
    let open = |token: &'static str| {
        let app = app.clone();
        async move {
            let res = send(
                app,
                build("GET", "/console/v1/events", Some(&bearer(token)), None),
            )
            .await;
            assert_eq!(res.status(), StatusCode::OK);
            SseReader::new(res.into_body())
        }
    };
    let mut reader = open("only:observability.read").await;
    // observability.read, nodes.invoke and tokens.manage.
    let mut manager = open("all-but:trust.operate").await;
    assert_eq!(backend.events.receiver_count(), 2);
    backend.events.send(event(1, "token")).unwrap();
    backend.events.send(event(2, "pairing.code")).unwrap();
    backend.events.send(event(3, "presence")).unwrap();
    let seen = |events: Vec<(String, Option<String>, String)>| {
        events
            .into_iter()
            .map(|(kind, id, _)| format!("{kind}#{}", id.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seen(reader.next(2).await),
        ["pairing.code#2", "presence#3"],
        "a token without tokens.manage is not told about tokens"
    );
    assert_eq!(
        seen(manager.next(3).await),
        ["token#1", "pairing.code#2", "presence#3"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_finishes_is_408_json() {
    let (app, backend) = app();
    // A head, then a body that sends one byte and stops.
    let body = Body::from_stream(
        futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{")) })
            .chain(futures_util::stream::pending()),
    );
    let req = Request::builder()
        .method("POST")
        .uri("/console/v1/tokens")
        .header(header::AUTHORIZATION, "Bearer owner")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap();
    let res = send(app, req).await;
    let message = assert_error(res, StatusCode::REQUEST_TIMEOUT, "request_timeout").await;
    assert!(message.contains("30 s"), "{message}");
    assert!(backend.calls().is_empty());
}

#[tokio::test]
async fn labels_are_set_and_removed_and_bad_ones_are_400s_that_say_why() {
    let (app, backend) = app();
    let uri = "/console/v1/devices/aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt/labels";
    let res = send(
        app.clone(),
        build(
            "PATCH",
            uri,
            Some(&bearer("owner")),
            Some(r#"{"set":{"role":"camera"},"remove":["site"]}"#),
        ),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let device: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(device["labels"]["role"], "camera");
    assert!(device["labels"].get("site").is_none(), "{device}");
    assert_eq!(backend.calls(), vec!["label"]);
    for (body, says) in [
        (r#"{"set":{"node.anchorage/os":"beos"}}"#, "reserved"),
        (r#"{"set":{"-bad":"x"}}"#, "label key"),
        (r#"{"set":{"role":"has space"}}"#, "label value"),
        (r#"{"remove":["node.anchorage/os"]}"#, "reserved"),
        (r#"{}"#, "nothing to change"),
        (r#"{"sett":{}}"#, "unknown field"),
    ] {
        let res = send(
            app.clone(),
            build("PATCH", uri, Some(&bearer("owner")), Some(body)),
        )
        .await;
        let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(message.contains(says), "{body}: {message}");
    }
}

#[tokio::test]
async fn listings_filter_by_selector_and_a_bad_one_says_where() {
    let (app, _) = app();
    for (selector, count) in [
        ("site%3Dlab", 1),
        ("site%21%3Dlab", 0),
        ("node.anchorage%2Fos%20in%20(linux%2Cbsd)", 1),
        ("%21site", 0),
        ("", 1),
    ] {
        let res = send(
            app.clone(),
            build(
                "GET",
                &format!("/console/v1/devices?selector={selector}"),
                Some(&bearer("owner")),
                None,
            ),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&body_bytes(res).await).unwrap();
        assert_eq!(list.len(), count, "{selector}");
        let res = send(
            app.clone(),
            build(
                "GET",
                &format!("/console/v1/inventory?selector={selector}"),
                Some(&bearer("owner")),
                None,
            ),
        )
        .await;
        let inv: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
        assert_eq!(
            inv["devices"].as_array().unwrap().len(),
            count,
            "{selector}"
        );
        assert_eq!(
            inv["summary"]["devices"], count,
            "the summary follows the filter"
        );
    }
    let res = send(
        app,
        build(
            "GET",
            "/console/v1/devices?selector=site%3Dlab%2C",
            Some(&bearer("owner")),
            None,
        ),
    )
    .await;
    let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(
        message.contains("at character 10") && message.contains("a label key"),
        "{message}"
    );
}

#[tokio::test]
async fn presence_and_trust_filters_combine_with_the_selector() {
    let (app, _) = app();
    let count = |v: &serde_json::Value| v["devices"].as_array().unwrap().len();
    for (q, want) in [
        ("trust=trusted", 1),
        ("trust=revoked", 0),
        ("presence=online&selector=site%3Dlab", 1),
        ("presence=offline&selector=site%3Dlab", 0),
        ("presence=online&trust=revoked", 0),
    ] {
        let res = send(
            app.clone(),
            build(
                "GET",
                &format!("/console/v1/inventory?{q}"),
                Some(&bearer("owner")),
                None,
            ),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK, "{q}");
        let inv: serde_json::Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
        assert_eq!(count(&inv), want, "{q}");
    }
    let res = send(
        app.clone(),
        build(
            "GET",
            "/console/v1/inventory?presence=sleepy",
            Some(&bearer("owner")),
            None,
        ),
    )
    .await;
    let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(message.contains("online"), "names the presences: {message}");
    let res = send(
        app,
        build(
            "GET",
            "/console/v1/devices?presence=online",
            Some(&bearer("owner")),
            None,
        ),
    )
    .await;
    let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(message.contains("inventory"), "{message}");
}

#[tokio::test]
async fn a_bad_batch_request_is_a_400_that_says_what_is_wrong() {
    for (body, needle) in [
        (
            r#"{"selector":"site in (lab","capability":"echo"}"#,
            "at character",
        ),
        (r#"{"selector":"site=lab","capability":""}"#, "capability"),
        (
            r#"{"selector":"site=lab","capability":"echo","max_concurrency":0}"#,
            "max_concurrency",
        ),
        (
            r#"{"selector":"site=lab","capability":"echo","devices":["x"]}"#,
            "invalid device id \"x\"",
        ),
        (r#"{"capability":"echo"}"#, "selector"),
    ] {
        let (router, backend) = app();
        let res = send(
            router,
            build(
                "POST",
                "/console/v1/batches",
                Some(&bearer("owner")),
                Some(body),
            ),
        )
        .await;
        let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(message.contains(needle), "{body}: {message}");
        assert!(backend.calls().is_empty(), "{body} reached the backend");
    }
}

/// A fleet of 2,501 devices: an operator walks the inventory a page at a time and sees every
/// device exactly once, in order; the counters count the whole fleet on every page; problems
/// first puts the offline ones on the first page; the search finds one device among them; a
/// page size the anchor does not serve is a 400 that says the bounds.
#[tokio::test]
async fn the_inventory_of_a_big_fleet_comes_a_page_at_a_time() {
    const FLEET: usize = 2500;
    let (app, backend) = app();
    backend
        .more_entries
        .lock()
        .unwrap()
        .extend((0..FLEET).map(fleet_entry));
    let get = |uri: String| {
        let app = app.clone();
        async move {
            let res = send(app, build("GET", &uri, Some(&bearer("owner")), None)).await;
            assert_eq!(res.status(), StatusCode::OK, "{uri}");
            let bytes = axum::body::to_bytes(res.into_body(), 64 << 20)
                .await
                .unwrap();
            serde_json::from_slice::<Inventory>(&bytes).unwrap()
        }
    };

    let first = get("/console/v1/inventory?limit=100".into()).await;
    assert_eq!(first.devices.len(), 100);
    assert_eq!(
        first.summary.devices,
        FLEET as u64 + 1,
        "counts every device"
    );
    let page = first.page.clone().unwrap();
    assert_eq!((page.total, page.offset, page.limit), (2501, 0, Some(100)));

    // Every page in turn: each device once, in the unpaged order.
    let everything = get("/console/v1/inventory".into()).await;
    assert_eq!(everything.devices.len(), FLEET + 1, "no limit: all of them");
    let mut walked = Vec::new();
    let mut offset = 0;
    loop {
        let inv = get(format!("/console/v1/inventory?limit=1000&offset={offset}")).await;
        assert_eq!(inv.summary.devices, FLEET as u64 + 1);
        if inv.devices.is_empty() {
            break;
        }
        offset += inv.devices.len();
        walked.extend(inv.devices.into_iter().map(|d| d.device_id));
    }
    let unpaged: Vec<DeviceId> = everything.devices.iter().map(|d| d.device_id).collect();
    assert_eq!(walked, unpaged);

    // Problems first: the offline devices (every seventh) lead, by name.
    let problems = get("/console/v1/inventory?sort=problems&limit=50".into()).await;
    assert!(
        problems
            .devices
            .iter()
            .all(|d| d.presence == Presence::Offline)
    );
    assert_eq!(problems.devices[0].name, "node-00003");
    assert_eq!(problems.page.unwrap().sort, "problems");
    let newest = get("/console/v1/inventory?sort=-heartbeat&limit=1".into()).await;
    assert_eq!(
        newest.devices[0].name, "node-02499",
        "largest heartbeat age first"
    );

    // A search and a filter narrow the whole fleet, and the counters follow them.
    let found = get("/console/v1/inventory?q=NODE-0123&limit=5".into()).await;
    assert_eq!(
        found.page.as_ref().unwrap().total,
        10,
        "node-01230 to node-01239"
    );
    assert_eq!(found.summary.devices, 10);
    assert_eq!(found.devices.len(), 5);
    assert!(
        found
            .devices
            .iter()
            .all(|d| d.name.starts_with("node-0123"))
    );
    let offline =
        get("/console/v1/inventory?presence=offline&selector=site%3Ddepot&limit=10".into()).await;
    assert_eq!(offline.summary.offline, offline.summary.devices);
    assert_eq!(offline.devices.len(), 10);

    // Past the end: nothing, with the total still said.
    let past = get("/console/v1/inventory?limit=10&offset=9999".into()).await;
    assert!(past.devices.is_empty());
    assert_eq!(past.page.unwrap().total, 2501);

    for (q, says) in [
        ("limit=0", "at least 1"),
        ("limit=1001", "at most 1000"),
        ("sort=age", "problems"),
    ] {
        let res = send(
            app.clone(),
            build(
                "GET",
                &format!("/console/v1/inventory?{q}"),
                Some(&bearer("owner")),
                None,
            ),
        )
        .await;
        let message = assert_error(res, StatusCode::BAD_REQUEST, "bad_request").await;
        assert!(message.contains(says), "{q}: {message}");
    }
}
