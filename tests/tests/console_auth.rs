//! Access control of the console over the REAL anchor backend (issue 4): every `/console/v1`
//! route (and `/metrics`) answers 401 without a valid token, 403 with a token lacking the
//! route's permission, and neither with the right one. Requests go through the router with
//! `tower::ServiceExt::oneshot`, no network.
//!
//! The route table is the one of `console/tests/routes.rs`, which checks the same rules over an
//! in-memory backend; here the tokens are real ones, stored hashed by the anchor.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use anchorage_console::Backend;
use anchorage_console::api::{CreatedToken, Permission};
use anchorage_daemon::backend::AnchorBackend;
use anchorage_daemon::{Anchor, AnchorConfig, Clock};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

/// A route, the permission it requires, and what it answers with that permission on a fresh
/// anchor (`None`: runtime routes that may still answer 503 today; only "not 401/403" is
/// asserted for them).
struct Case {
    method: &'static str,
    uri: &'static str,
    body: Option<&'static str>,
    permission: Permission,
    expect: Option<StatusCode>,
}

const fn case(
    method: &'static str,
    uri: &'static str,
    body: Option<&'static str>,
    permission: Permission,
    expect: Option<StatusCode>,
) -> Case {
    Case {
        method,
        uri,
        body,
        permission,
        expect,
    }
}

use Permission::{NodesInvoke, ObservabilityRead as Read, TokensManage, TrustOperate};

const OK: Option<StatusCode> = Some(StatusCode::OK);
const CREATED: Option<StatusCode> = Some(StatusCode::CREATED);
const NOT_FOUND: Option<StatusCode> = Some(StatusCode::NOT_FOUND);
const RUNTIME: Option<StatusCode> = None;

#[rustfmt::skip]
const ROUTES: &[Case] = &[
    case("POST", "/console/v1/pairing/codes", Some(r#"{"method":"pin"}"#), TrustOperate, CREATED),
    case("GET", "/console/v1/pairing/codes", None, Read, OK),
    case("GET", "/console/v1/pairing/requests?state=pending_approval", None, Read, OK),
    case("GET", "/console/v1/pairing/requests/REQ-1", None, Read, NOT_FOUND),
    case("POST", "/console/v1/pairing/requests/REQ-1/approve", None, TrustOperate, NOT_FOUND),
    case("POST", "/console/v1/pairing/requests/REQ-1/reject", None, TrustOperate, NOT_FOUND),
    case("GET", "/console/v1/devices", None, Read, OK),
    case("GET", "/console/v1/devices/DEV-1", None, Read, NOT_FOUND),
    case("POST", "/console/v1/devices/DEV-1/revoke", None, TrustOperate, NOT_FOUND),
    case("POST", "/console/v1/devices/DEV-1/rotate", None, TrustOperate, NOT_FOUND),
    case("DELETE", "/console/v1/devices/DEV-1", None, TrustOperate, NOT_FOUND),
    case("POST", "/console/v1/tokens", Some(r#"{"permissions":["observability.read"]}"#), TokensManage, CREATED),
    case("GET", "/console/v1/tokens", None, TokensManage, OK),
    case("DELETE", "/console/v1/tokens/TOK-1", None, TokensManage, NOT_FOUND),
    case("GET", "/console/v1/inventory", None, Read, RUNTIME),
    case("GET", "/console/v1/inventory/DEV-1", None, Read, RUNTIME),
    case("GET", "/console/v1/nodes", None, Read, RUNTIME),
    case("GET", "/console/v1/nodes/DEV-1", None, Read, RUNTIME),
    case("POST", "/console/v1/nodes/DEV-1/invoke", Some(r#"{"capability":"echo","input":1}"#), NodesInvoke, RUNTIME),
    case("GET", "/console/v1/invocations?device_id=DEV-1&limit=5", None, Read, RUNTIME),
    case("GET", "/console/v1/invocations/INV-1", None, Read, RUNTIME),
    case("GET", "/console/v1/events", None, Read, OK),
    case("GET", "/console/v1/audit?target=DEV-1&limit=5", None, Read, OK),
    case("GET", "/console/v1/qr?text=anchorage%3A%2F%2Fpair", None, TrustOperate, OK),
    case("GET", "/metrics", None, Read, OK),
];

/// A real anchor (no sockets) with its router and tokens.
struct Fixture {
    anchor: Anchor,
    backend: Arc<AnchorBackend>,
    owner: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let anchor = Anchor::open(AnchorConfig::for_tests(dir.path()), Clock::System).unwrap();
        let backend = anchor.backend();
        let owner = anchor.owner_token().unwrap();
        Fixture {
            anchor,
            backend,
            owner,
            dir,
        }
    }

    fn app(&self) -> Router {
        anchorage_console::router(self.backend.clone())
    }

    fn token(&self, name: &str, permissions: Vec<Permission>) -> CreatedToken {
        self.anchor
            .services()
            .trust
            .create_token(
                "test",
                name.to_string(),
                permissions,
                Default::default(),
                None,
            )
            .unwrap()
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> Response<Body> {
        self.app()
            .oneshot(build(method, uri, auth, body))
            .await
            .unwrap()
    }
}

/// Opens the anchor again on `dir`; the previous store may take a moment to release its lock.
async fn reopen(dir: &std::path::Path) -> Anchor {
    let mut last = None;
    for _ in 0..100 {
        match Anchor::open(AnchorConfig::for_tests(dir), Clock::System) {
            Ok(anchor) => return anchor,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the anchor did not open again: {last:?}");
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

async fn body_bytes(res: Response<Body>) -> Bytes {
    axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts an error answer: JSON with exactly `code` and a non-empty `message`; returns both.
async fn error_body(res: Response<Body>, what: &str) -> (String, String) {
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {content_type}"
    );
    let value: Value = serde_json::from_slice(&body_bytes(res).await)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
    let object = value.as_object().unwrap();
    assert_eq!(
        object.len(),
        2,
        "{what}: error body is exactly {{code, message}}: {value}"
    );
    let code = object["code"].as_str().unwrap().to_owned();
    let message = object["message"].as_str().unwrap().to_owned();
    assert!(!code.is_empty() && !message.is_empty(), "{what}: {value}");
    (code, message)
}

/// Tokens that must all be refused with 401. `real_id` is the id of a live token, so one of
/// them presents a real id with a wrong secret.
fn bogus_auth(real_id: &str) -> Vec<Option<String>> {
    vec![
        None,
        Some("Basic b3duZXI6b3duZXI=".into()),
        Some("Bearer".into()),
        Some(bearer("wrong-token")),
        Some(bearer(
            "anc_aaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        )),
        Some(bearer(&format!(
            "anc_{real_id}_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
        ))),
    ]
}

#[tokio::test]
async fn every_route_refuses_a_missing_or_bogus_token() {
    let fx = Fixture::new();
    let live = fx.token("live", Permission::ALL.to_vec());
    for c in ROUTES {
        for auth in bogus_auth(&live.id) {
            let what = format!("{} {} {auth:?}", c.method, c.uri);
            let res = fx.send(c.method, c.uri, auth.as_deref(), c.body).await;
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
            assert!(
                res.headers().get(header::WWW_AUTHENTICATE).is_some(),
                "{what}: no WWW-Authenticate"
            );
            let (code, _) = error_body(res, &what).await;
            assert_eq!(code, "unauthorized", "{what}");
        }
    }
    // Nothing was created by the refused requests.
    let codes = fx.backend.list_codes().await.unwrap();
    assert!(
        codes.is_empty(),
        "a refused request minted a code: {codes:?}"
    );
    assert_eq!(
        fx.backend.list_tokens().await.unwrap().len(),
        2,
        "owner and live only"
    );
}

#[tokio::test]
async fn every_route_refuses_a_token_lacking_its_permission() {
    let fx = Fixture::new();
    // For each permission, a token with every other one.
    let all_but: Vec<(Permission, CreatedToken)> = Permission::ALL
        .iter()
        .map(|p| {
            let others = Permission::ALL.iter().copied().filter(|o| o != p).collect();
            (*p, fx.token(&format!("all-but-{p}"), others))
        })
        .collect();
    for c in ROUTES {
        let (_, token) = all_but.iter().find(|(p, _)| *p == c.permission).unwrap();
        let what = format!("{} {} without {}", c.method, c.uri, c.permission);
        let res = fx
            .send(c.method, c.uri, Some(&bearer(&token.token)), c.body)
            .await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{what}");
        let (code, message) = error_body(res, &what).await;
        assert_eq!(code, "forbidden", "{what}");
        assert!(message.contains(c.permission.as_str()), "{what}: {message}");
    }
    assert!(
        fx.backend.list_codes().await.unwrap().is_empty(),
        "no code minted without trust.operate"
    );
}

#[tokio::test]
async fn every_route_answers_with_exactly_its_permission() {
    let fx = Fixture::new();
    let only: Vec<(Permission, CreatedToken)> = Permission::ALL
        .iter()
        .map(|p| (*p, fx.token(&format!("only-{p}"), vec![*p])))
        .collect();
    for c in ROUTES {
        let (_, token) = only.iter().find(|(p, _)| *p == c.permission).unwrap();
        for auth in [bearer(&token.token), bearer(&fx.owner)] {
            let what = format!(
                "{} {} with {}",
                c.method,
                c.uri,
                if auth.contains(&fx.owner) {
                    "the owner token".to_string()
                } else {
                    format!("only {}", c.permission)
                }
            );
            let res = fx.send(c.method, c.uri, Some(&auth), c.body).await;
            let status = res.status();
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{what}: {status}"
            );
            if let Some(expect) = c.expect {
                assert_eq!(status, expect, "{what}");
            }
            if status.is_client_error() || status.is_server_error() {
                let (code, message) = error_body(res, &what).await;
                assert!(!message.contains("panicked"), "{what}: {code}: {message}");
            } else if c.uri == "/console/v1/events" {
                // An endless stream: check the type, do not read it.
                let ct = res.headers()[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .to_owned();
                assert_eq!(ct, "text/event-stream", "{what}");
            } else if !c.uri.starts_with("/metrics") && !c.uri.starts_with("/console/v1/qr") {
                let value: Value = serde_json::from_slice(&body_bytes(res).await)
                    .unwrap_or_else(|e| panic!("{what}: answer is not JSON: {e}"));
                assert!(value.is_object() || value.is_array(), "{what}: {value}");
            }
        }
    }
}

#[tokio::test]
async fn a_revoked_token_stops_working_at_once() {
    let fx = Fixture::new();
    let reader = fx.token("dashboard", vec![Read]);
    let res = fx
        .send(
            "GET",
            "/console/v1/devices",
            Some(&bearer(&reader.token)),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);

    let res = fx
        .send(
            "DELETE",
            &format!("/console/v1/tokens/{}", reader.id),
            Some(&bearer(&fx.owner)),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let info: Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    assert_eq!(info["id"], reader.id.as_str());
    assert!(info["revoked_at"].is_string(), "{info}");

    // The very next request is refused, on every route it could reach before.
    for c in ROUTES.iter().filter(|c| c.permission == Read) {
        let what = format!("{} {} with a revoked token", c.method, c.uri);
        let res = fx
            .send(c.method, c.uri, Some(&bearer(&reader.token)), c.body)
            .await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(error_body(res, &what).await.0, "unauthorized");
    }
    assert!(fx.backend.authenticate(&reader.token).await.is_none());

    // Revoking is idempotent and keeps the token listed as revoked; the owner still works.
    let again = fx
        .anchor
        .services()
        .trust
        .revoke_token(
            &fx.backend.authenticate(&fx.owner).await.unwrap(),
            &reader.id,
        )
        .unwrap();
    assert!(again.record.revoked_at_ms.is_some());
    let res = fx
        .send("GET", "/console/v1/devices", Some(&bearer(&fx.owner)), None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);

    // A revoked token stays revoked after a restart of the anchor.
    let Fixture {
        anchor,
        backend,
        dir,
        ..
    } = fx;
    drop(backend);
    drop(anchor);
    let reopened = reopen(dir.path()).await;
    assert!(
        reopened
            .services()
            .trust
            .authenticate(&reader.token)
            .is_none()
    );
    assert!(
        reopened
            .services()
            .trust
            .authenticate(&reopened.owner_token().unwrap())
            .is_some()
    );
}

#[tokio::test]
async fn token_secrets_are_never_listed() {
    let fx = Fixture::new();
    let res = fx
        .send(
            "POST",
            "/console/v1/tokens",
            Some(&bearer(&fx.owner)),
            Some(r#"{"name":"ci","permissions":["observability.read","nodes.invoke"]}"#),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let created: Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with(&format!("anc_{id}_")), "{token}");
    let secret = token.rsplit('_').next().unwrap().to_owned();
    assert!(secret.len() >= 32, "a high-entropy secret: {secret}");

    // The new token works, and the listing knows it, without any secret.
    let res = fx
        .send("GET", "/console/v1/tokens", Some(&bearer(&token)), None)
        .await;
    assert_eq!(
        res.status(),
        StatusCode::FORBIDDEN,
        "ci lacks tokens.manage"
    );
    let res = fx
        .send("GET", "/console/v1/tokens", Some(&bearer(&fx.owner)), None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let text = String::from_utf8(body_bytes(res).await.to_vec()).unwrap();
    let owner_secret = fx.owner.rsplit('_').next().unwrap();
    for s in [
        token.as_str(),
        secret.as_str(),
        fx.owner.as_str(),
        owner_secret,
    ] {
        assert!(!text.contains(s), "GET /tokens leaks a secret: {text}");
    }
    let list: Value = serde_json::from_str(&text).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{text}");
    for entry in list {
        let keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for forbidden in ["token", "secret", "secret_hash", "hash"] {
            assert!(!keys.contains(&forbidden), "{entry}");
        }
    }
    let ci = list.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert_eq!(ci["name"], "ci");
    assert_eq!(
        ci["permissions"],
        serde_json::json!(["observability.read", "nodes.invoke"])
    );
}

#[tokio::test]
async fn whoami_needs_a_valid_token_but_no_permission() {
    let fx = Fixture::new();
    let live = fx.token("live", vec![Read]);
    for auth in bogus_auth(&live.id) {
        let what = format!("GET /console/v1/whoami {auth:?}");
        let res = fx
            .send("GET", "/console/v1/whoami", auth.as_deref(), None)
            .await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(error_body(res, &what).await.0, "unauthorized", "{what}");
    }
    for p in Permission::ALL {
        let token = fx.token(&format!("only-{p}"), vec![p]);
        let res = fx
            .send(
                "GET",
                "/console/v1/whoami",
                Some(&bearer(&token.token)),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK, "whoami with only {p}");
        let me: Value = serde_json::from_slice(&body_bytes(res).await).unwrap();
        assert_eq!(me["token_id"], token.id.as_str(), "{me}");
        assert_eq!(me["permissions"], serde_json::json!([p.as_str()]), "{me}");
        assert!(
            !me.to_string()
                .contains(token.token.rsplit('_').next().unwrap()),
            "{me}"
        );
    }
}

/// An open event stream ends within a second of its token being revoked, with a last
/// `stream.closed` event that says why; other streams go on.
#[tokio::test]
async fn a_revoked_token_loses_its_open_event_stream() {
    use futures_util::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let running = anchorage_daemon::start(AnchorConfig::for_tests(dir.path()))
        .await
        .unwrap();
    let backend = running.anchor.backend();
    let owner = backend
        .authenticate(&running.anchor.owner_token().unwrap())
        .await
        .unwrap();
    let reader = backend
        .create_token(
            &owner,
            anchorage_console::api::CreateTokenRequest {
                name: Some("reader".into()),
                permissions: vec![Permission::ObservabilityRead],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let url = running.console_url();
    let client = |token: &str| anchorage_console::ControlPlaneClient::new(&url, token).unwrap();
    let revoked_stream = client(&reader.token).events().await.unwrap();
    let owner_stream = client(&running.anchor.owner_token().unwrap())
        .events()
        .await
        .unwrap();
    let mut revoked_stream = std::pin::pin!(revoked_stream);
    let mut owner_stream = std::pin::pin!(owner_stream);

    backend.revoke_token(&owner, &reader.id).await.unwrap();
    let revoked_at = std::time::Instant::now();
    let mut kinds = Vec::new();
    let last = loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), revoked_stream.next())
            .await
            .expect("the stream of a revoked token ends");
        match next {
            Some(Ok(event)) => kinds.push(event.kind.clone()),
            Some(Err(e)) => panic!("stream error: {e}"),
            None => break kinds.last().cloned(),
        }
    };
    assert_eq!(last.as_deref(), Some("stream.closed"), "{kinds:?}");
    assert!(
        revoked_at.elapsed() < std::time::Duration::from_millis(1500),
        "ended {:?} after the revocation",
        revoked_at.elapsed()
    );
    // The owner's stream saw the revocation and goes on.
    let seen = tokio::time::timeout(std::time::Duration::from_secs(5), owner_stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.kind, "token");
    running.shutdown().await;
}

/// A token name with a direction override (which can make a name show reversed) is refused
/// with a clear 400, like control characters.
#[tokio::test]
async fn token_names_with_direction_controls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = Anchor::open(AnchorConfig::for_tests(dir.path()), Clock::System).unwrap();
    let backend = anchor.backend();
    let owner = backend
        .authenticate(&anchor.owner_token().unwrap())
        .await
        .unwrap();
    let err = backend
        .create_token(
            &owner,
            anchorage_console::api::CreateTokenRequest {
                name: Some("ci\u{202E}nimda".into()),
                permissions: vec![Permission::ObservabilityRead],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status, StatusCode::BAD_REQUEST, "{err:?}");
    assert!(err.to_string().contains("direction"), "{err}");
}
