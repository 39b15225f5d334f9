//! The console's axum router: `/console/v1` REST routes, the event stream, `/metrics` and
//! `/healthz`, with bearer-token authentication and a permission check in every handler.
//!
//! Layout: [`router`] / [`router_with_options`] assemble one `Router` per area (pairing,
//! devices, tokens, runtime, operations). Every `/console/v1` handler takes an [`Auth`] and
//! states its permission with [`require`] before it touches the backend. A layer around those
//! routes fails closed: a handler that answers 2xx without having called [`require`] gets its
//! answer replaced by a 500 and a logged error, so a route added without a check cannot leak.
//! The one route any valid token may call, `GET /whoami`, says so with [`any_permission`].
//!
//! A token may also be limited to part of the fleet (a label selector) and to capability
//! patterns ([`Scope`]). The same handlers check that after the permission: a route about one
//! device answers 403 `out_of_scope` for a device outside the selector (naming the rule),
//! a listing leaves those devices out, and the event stream does not send their events. See
//! [`InScope`] and [`check_device`].
//!
//! Errors are always `{code, message}` JSON, also for axum's own rejections (bad body, unknown
//! route, wrong method): see [`ApiError`].

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue, WWW_AUTHENTICATE,
};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tracing::{Instrument, debug, error, field, info_span, warn};

use crate::api::*;
use crate::backend::Backend;
use crate::error::{ApiError, SetPolicyError};
use crate::metrics_layer::MetricsFormat;

mod policy;

/// Largest request body the console accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Time a client has to send a whole request body once its head is read; a body still
/// arriving after it is a 408 `request_timeout` (hyper's header read timeout covers only the
/// head, and a request in flight is never idle, so without this a body sent a byte at a time
/// would hold its connection for ever).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of the keep-alive comments on the event stream.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often an open event stream checks that its token still holds `observability.read`;
/// a stream of a revoked token ends within this (with a `stream.closed` event saying why).
pub const SSE_TOKEN_RECHECK: Duration = Duration::from_millis(500);
/// Every how many token rechecks a scoped event stream re-reads which devices it covers.
pub const SSE_SCOPE_REFRESH_TICKS: u32 = 4;
/// The `kind` of the last event of a stream the anchor ends itself.
pub const STREAM_CLOSED: &str = "stream.closed";

/// Longest text `GET /console/v1/qr` renders (a pairing URI is far shorter).
pub const MAX_QR_TEXT: usize = 2048;

/// Content type of `/metrics` unless OpenMetrics is asked for (Prometheus text format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = crate::metrics_layer::PROMETHEUS_CONTENT_TYPE;

/// Options of [`router_with_options`].
#[derive(Debug, Clone, Default)]
pub struct RouterOptions {
    /// Serve `GET /metrics` without a bearer token (for Prometheus scrapers). When false,
    /// `/metrics` requires a token with `observability.read`.
    pub public_metrics: bool,
    /// When this turns `true`, open event streams end, so a graceful HTTP shutdown does not
    /// wait for them forever. `None`: streams end only when the backend's event sender is
    /// dropped.
    pub shutdown: Option<watch::Receiver<bool>>,
}

/// The console router with default [`RouterOptions`] (`/metrics` requires a token).
pub fn router<B: Backend>(backend: Arc<B>) -> Router {
    router_with_options(backend, RouterOptions::default())
}

/// The console router.
///
/// Routes: `/console/v1/...` (bearer token and a per-route permission), `GET /metrics`,
/// `GET /healthz`, and the web page at `/` (see [`crate::web`]).
pub fn router_with_options<B: Backend>(backend: Arc<B>, options: RouterOptions) -> Router {
    let state = AppState {
        backend,
        shutdown: options.shutdown.clone(),
    };

    let v1 = Router::new()
        .merge(pairing_routes())
        .merge(device_routes())
        .merge(token_routes())
        .merge(runtime_routes())
        .merge(batch_routes())
        .merge(mesh_routes())
        .merge(policy::routes())
        .route("/qr", get(qr::<B>))
        .route("/whoami", get(whoami))
        .route_layer(middleware::from_fn(enforce_permission_check))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            mark_stale::<B>,
        ));

    let metrics_route = if options.public_metrics {
        Router::new().route("/metrics", get(metrics_public::<B>))
    } else {
        Router::new()
            .route("/metrics", get(metrics::<B>))
            .route_layer(middleware::from_fn(enforce_permission_check))
    };

    Router::new()
        .nest("/console/v1", v1)
        .merge(metrics_route)
        .merge(crate::web::routes())
        .route("/healthz", get(healthz::<B>))
        .fallback(not_found)
        // After every route: applies to the routes registered so far.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.backend.clone(),
            crate::metrics_layer::record::<B>,
        ))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

/// The bearer token of an `Authorization: Bearer <token>` header.
///
/// `None` when the header is missing, repeated, not UTF-8, of another scheme, or the token is
/// empty or contains whitespace. The scheme is matched case-insensitively (RFC 7235).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some(token)
}

/// The authenticated caller of a `/console/v1` route.
///
/// Extracting it answers 401 (with `WWW-Authenticate: Bearer`) for a missing, malformed or
/// unknown token. It does not check a permission: the handler does, with [`require`].
#[derive(Debug)]
pub struct Auth {
    principal: Principal,
    check: PermissionCheck,
}

impl Auth {
    /// The caller, whatever it may do. Use [`require`] to get it for an operation.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
}

/// The caller, for a route that any valid token may call (`GET /console/v1/whoami`).
///
/// Counts as the route's permission check. Only for answers that tell a token about itself.
pub fn any_permission(auth: &Auth) -> &Principal {
    auth.check.0.store(true, Ordering::Relaxed);
    &auth.principal
}

/// The caller, if it holds `permission`; 403 `forbidden` otherwise.
pub fn require(auth: &Auth, permission: Permission) -> Result<&Principal, ApiError> {
    if auth.principal.can(permission) {
        auth.check.0.store(true, Ordering::Relaxed);
        Ok(&auth.principal)
    } else {
        debug!(token_id = %auth.principal.token_id, %permission, "permission denied");
        Err(ApiError::forbidden(permission))
    }
}

impl<B: Backend> FromRequestParts<AppState<B>> for Auth {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState<B>,
    ) -> Result<Self, Self::Rejection> {
        let Some(token) = bearer(&parts.headers) else {
            return Err(unauthorized());
        };
        let Some(principal) = state.backend.authenticate(token).await else {
            return Err(unauthorized());
        };
        tracing::Span::current().record("token_id", principal.token_id.as_str());
        let check = parts
            .extensions
            .get::<PermissionCheck>()
            .cloned()
            .unwrap_or_default();
        Ok(Auth { principal, check })
    }
}

// ---------------------------------------------------------------------------------------------
// Scope: the part of the fleet a token limited to a selector sees

/// The devices a caller may see: every device, or those its selector matches.
#[derive(Debug, Clone, Default)]
pub struct InScope(Option<std::collections::HashSet<DeviceId>>);

impl InScope {
    /// The devices `who` sees, read from the backend only when its scope limits devices.
    async fn of<B: Backend>(backend: &B, who: &Principal) -> Result<InScope, ApiError> {
        if !who.scope.limits_devices() {
            return Ok(InScope(None));
        }
        let devices = backend.list_devices().await?;
        Ok(InScope(Some(
            devices
                .into_iter()
                .filter(|d| who.scope.covers(&d.labels))
                .map(|d| d.device_id)
                .collect(),
        )))
    }

    /// Whether the caller sees `device`.
    pub fn has(&self, device: &DeviceId) -> bool {
        self.0.as_ref().is_none_or(|set| set.contains(device))
    }
}

/// 403 `out_of_scope` unless `device` is in `who`'s scope (404 if there is no such device
/// and the scope limits devices).
pub async fn check_device<B: Backend>(
    backend: &B,
    who: &Principal,
    device: DeviceId,
) -> Result<(), ApiError> {
    if !who.scope.limits_devices() {
        return Ok(());
    }
    let found = backend.device(device).await?;
    who.check_device(&device, &found.labels)
}

/// 403 `out_of_scope` for a token limited to a selector, on a route that shows the whole
/// fleet at once (metrics).
fn refuse_scoped(who: &Principal, what: &str) -> Result<(), ApiError> {
    if who.scope.limits_devices() {
        return Err(who.refused_by_selector(format_args!("{what} covers the whole fleet")));
    }
    Ok(())
}

/// 403 `out_of_scope` unless a pairing code with `labels` pairs devices into `who`'s scope.
fn check_code_labels(
    who: &Principal,
    code: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    if who.scope.covers(labels) {
        Ok(())
    } else {
        Err(who.refused_by_selector(format_args!("the labels of {code} do not match it (a code it mints must carry labels its selector matches)")))
    }
}

// ---------------------------------------------------------------------------------------------
// State, extractors, middleware

/// Shared state of the handlers.
struct AppState<B> {
    backend: Arc<B>,
    shutdown: Option<watch::Receiver<bool>>,
}

impl<B> Clone for AppState<B> {
    fn clone(&self) -> Self {
        AppState {
            backend: self.backend.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// Set by [`require`]; read by [`enforce_permission_check`] after the handler ran.
#[derive(Debug, Clone, Default)]
struct PermissionCheck(Arc<AtomicBool>);

fn unauthorized() -> Response {
    let mut response = ApiError::unauthorized().into_response();
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"anchorage\""),
    );
    response
}

/// Fails closed when a handler answered success without checking a permission.
async fn enforce_permission_check(mut req: Request, next: Next) -> Response {
    let check = PermissionCheck::default();
    req.extensions_mut().insert(check.clone());
    let path = req.uri().path().to_owned();
    let mut response = next.run(req).await;
    if response.status().is_success() && !check.0.load(Ordering::Relaxed) {
        error!(%path, "BUG: console route answered without a permission check; refusing");
        return ApiError::internal().into_response();
    }
    // Answers carry secrets (pairing codes, tokens): no cache may keep them.
    if !response.headers().contains_key(CACHE_CONTROL) {
        response
            .headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A span per request (method and path; never the query, which may hold a pairing URI, nor the
/// token), and a guarantee that every error answer is `{code, message}` JSON.
async fn request_span(req: Request, next: Next) -> Response {
    let span = info_span!(
        "console",
        method = %req.method(),
        path = %req.uri().path(),
        token_id = field::Empty,
    );
    async move {
        let started = Instant::now();
        let response = json_errors(next.run(req).await).await;
        debug!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        response
    }
    .instrument(span)
    .await
}

/// The header on every console answer given from the anchor's last view of a shared store
/// it cannot reach: since when (RFC 3339).
pub const STALE_HEADER: &str = "anchorage-stale-since";

async fn mark_stale<B: Backend>(
    State(state): State<AppState<B>>,
    req: Request,
    next: Next,
) -> Response {
    let mut response = next.run(req).await;
    if let Some(since) = state.backend.stale_since()
        && let Ok(text) = since.format(&time::format_description::well_known::Rfc3339)
        && let Ok(value) = axum::http::HeaderValue::from_str(&text)
    {
        response.headers_mut().insert(STALE_HEADER, value);
    }
    response
}

/// Rewrites an error answer that is not JSON (a rejection axum produced itself) as
/// `{code, message}`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let mut error = ApiError::new(status, code_for_status(status), text);
    if status.is_server_error() || error.message.is_empty() {
        // Do not show what a server error said; it may be internal.
        error.message = status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase();
    }
    let mut rewritten = error.into_response();
    for (name, value) in parts.headers.iter() {
        if name != CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

/// The stable code for an error status axum produced.
fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::GONE => "expired",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not allow that method",
    )
}

/// A path parameter; a malformed one is a 400 JSON error.
struct Id(String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// The device a path names. Parsed after the permission check, like a body; a malformed id
/// names no device, so it is a 404 like an unknown one.
fn device_id(id: &str) -> Result<DeviceId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("device {id} not found")))
}

/// The query of `GET /invocations` as written: the device id is parsed by the handler, so a
/// malformed one gets its own message.
#[derive(Deserialize)]
struct InvocationsQuery {
    device_id: Option<String>,
    limit: Option<usize>,
}

/// A request body, read but not yet parsed: handlers parse it after their permission check,
/// so a caller without the permission learns nothing from a 400.
struct RawBody {
    content_type: Option<HeaderValue>,
    bytes: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(CONTENT_TYPE).cloned();
        let bytes = tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {} s",
                        BODY_READ_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map_err(|e| {
                let status = e.status();
                ApiError::new(status, code_for_status(status), e.body_text())
            })?;
        Ok(RawBody {
            content_type,
            bytes,
        })
    }
}

impl RawBody {
    /// The body as JSON, [validated](Validate); required. An unknown field is a 400 whose
    /// message names it (serde's "unknown field `x`, expected one of ...").
    fn json<T: DeserializeOwned + Validate>(&self) -> Result<T, ApiError> {
        self.check_content_type()?;
        if self.bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("a JSON body is required"));
        }
        let body: T = serde_json::from_slice(&self.bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        body.validate()?;
        Ok(body)
    }

    /// The body as JSON, or `T::default()` when it is empty.
    fn json_or_default<T: DeserializeOwned + Validate + Default>(&self) -> Result<T, ApiError> {
        if self.bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        self.json()
    }

    /// JSON, or no content type at all (curl without `-H`); anything else is refused.
    fn check_content_type(&self) -> Result<(), ApiError> {
        let Some(value) = &self.content_type else {
            return Ok(());
        };
        let essence = value
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json" || essence.ends_with("+json") {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
            ))
        }
    }
}

/// The query string as `T`, parsed after the permission check.
fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

// ---------------------------------------------------------------------------------------------
// Pairing

fn pairing_routes<B: Backend>() -> Router<AppState<B>> {
    Router::new()
        .route("/pairing/codes", post(mint_code::<B>).get(list_codes::<B>))
        .route("/pairing/requests", get(list_requests::<B>))
        .route("/pairing/requests/{id}", get(request::<B>))
        .route("/pairing/requests/{id}/approve", post(approve::<B>))
        .route("/pairing/requests/{id}/reject", post(reject::<B>))
}

async fn mint_code<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    body: RawBody,
) -> Result<(StatusCode, Json<MintedCode>), ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let req: MintCodeRequest = body.json_or_default()?;
    check_code_labels(who, "the new code", &req.labels)?;
    let code = st.backend.mint_code(who, req).await?;
    Ok((StatusCode::CREATED, Json(code)))
}

async fn list_codes<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
) -> Result<Json<Vec<PairingCodeInfo>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let mut codes = st.backend.list_codes().await?;
    codes.retain(|c| who.scope.covers(&c.labels));
    Ok(Json(codes))
}

#[derive(Deserialize)]
struct RequestsQuery {
    state: Option<String>,
}

async fn list_requests<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Vec<PairingRequest>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let q: RequestsQuery = query(&uri)?;
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<RequestState>().map_err(|_| {
            ApiError::bad_request(format!(
                "unknown request state {s:?}; expected one of: pending_approval, approved, \
                 completed, rejected, expired"
            ))
        })?),
    };
    let mut requests = st.backend.list_requests(state).await?;
    if who.scope.limits_devices() {
        let codes = code_labels(&*st.backend).await?;
        requests.retain(|r| {
            who.scope
                .covers(codes.get(&r.code_id).unwrap_or(&Default::default()))
        });
    }
    Ok(Json(requests))
}

async fn request<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<PairingRequest>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let request = st.backend.request(&id).await?;
    check_request(&*st.backend, who, &request, &Default::default()).await?;
    Ok(Json(request))
}

/// The labels of every pairing code, by code id.
async fn code_labels<B: Backend>(
    backend: &B,
) -> Result<std::collections::HashMap<String, std::collections::BTreeMap<String, String>>, ApiError>
{
    Ok(backend
        .list_codes()
        .await?
        .into_iter()
        .map(|c| (c.code_id, c.labels))
        .collect())
}

/// 403 `out_of_scope` unless the device of `request`, with its code's labels and `extra`,
/// would be in `who`'s scope.
async fn check_request<B: Backend>(
    backend: &B,
    who: &Principal,
    request: &PairingRequest,
    extra: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    if !who.scope.limits_devices() {
        return Ok(());
    }
    let mut labels = code_labels(backend)
        .await?
        .remove(&request.code_id)
        .unwrap_or_default();
    labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    check_code_labels(who, &format!("request {}", request.request_id), &labels)
}

async fn approve<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
    body: RawBody,
) -> Result<Json<PairingRequest>, ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let crate::api::ApproveRequest { labels } = body.json_or_default()?;
    if who.scope.limits_devices() {
        let request = st.backend.request(&id).await?;
        check_request(&*st.backend, who, &request, &labels).await?;
    }
    Ok(Json(st.backend.approve_labelled(who, &id, labels).await?))
}

async fn reject<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
    body: RawBody,
) -> Result<Json<PairingRequest>, ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let ReasonBody { reason } = body.json_or_default()?;
    if who.scope.limits_devices() {
        let request = st.backend.request(&id).await?;
        check_request(&*st.backend, who, &request, &Default::default()).await?;
    }
    Ok(Json(st.backend.reject(who, &id, reason).await?))
}

// ---------------------------------------------------------------------------------------------
// Devices

fn device_routes<B: Backend>() -> Router<AppState<B>> {
    Router::new()
        .route("/devices", get(list_devices::<B>))
        .route("/devices/{id}", get(device::<B>).delete(remove::<B>))
        .route("/devices/{id}/revoke", post(revoke::<B>))
        .route("/devices/{id}/rotate", post(rotate::<B>))
        .route("/devices/{id}/labels", axum::routing::patch(label::<B>))
}

#[derive(Deserialize)]
struct FilterQuery {
    selector: Option<String>,
    presence: Option<String>,
    trust: Option<String>,
}

/// What a listing's `?selector=&presence=&trust=` keeps, parsed once.
struct Filter {
    selector: anchorage_wire::labels::Selector,
    presence: Option<Presence>,
    trust: Option<TrustState>,
}

impl Filter {
    /// The filter of `uri`'s query (nothing given: everything), or a 400 saying what is wrong.
    fn of(uri: &Uri) -> Result<Filter, ApiError> {
        let q: FilterQuery = query(uri)?;
        let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(e.to_string());
        let given = |v: Option<String>| v.filter(|s| !s.is_empty());
        Ok(Filter {
            selector: q
                .selector
                .as_deref()
                .unwrap_or("")
                .parse()
                .map_err(|e| bad(&e))?,
            presence: given(q.presence)
                .map(|p| p.parse::<Presence>())
                .transpose()
                .map_err(|e| bad(&e))?,
            trust: given(q.trust)
                .map(|t| t.parse::<TrustState>())
                .transpose()
                .map_err(|e| bad(&e))?,
        })
    }

    fn is_everything(&self) -> bool {
        self.selector.is_empty() && self.presence.is_none() && self.trust.is_none()
    }

    fn keeps_device(&self, d: &Device) -> bool {
        self.selector.matches(&d.labels) && self.trust.is_none_or(|t| t == d.trust)
    }

    fn keeps_entry(&self, d: &InventoryDevice) -> bool {
        self.selector.matches(&d.labels)
            && self.trust.is_none_or(|t| t == d.trust)
            && self.presence.is_none_or(|p| p == d.presence)
    }
}

async fn list_devices<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Vec<Device>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let filter = Filter::of(&uri)?;
    if filter.presence.is_some() {
        return Err(ApiError::bad_request(
            "presence filters the inventory (GET /inventory?presence=...), not the device list",
        ));
    }
    let mut devices = st.backend.list_devices().await?;
    devices.retain(|d| filter.keeps_device(d) && who.scope.covers(&d.labels));
    Ok(Json(devices))
}

async fn label<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
    body: RawBody,
) -> Result<Json<Device>, ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let id = device_id(&id)?;
    let req: crate::api::LabelRequest = body.json()?;
    let changes = req.changes()?;
    if who.scope.limits_devices() {
        let mut labels = st.backend.device(id).await?.labels;
        who.check_device(&id, &labels)?;
        for change in &changes {
            change.apply(&mut labels);
        }
        if !who.scope.covers(&labels) {
            return Err(who.refused_by_selector(format_args!(
                "these changes would take device {id} out of it"
            )));
        }
    }
    Ok(Json(st.backend.label(who, id, changes).await?))
}

async fn device<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<Device>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let device = st.backend.device(device_id(&id)?).await?;
    who.check_device(&device.device_id, &device.labels)?;
    Ok(Json(device))
}

async fn revoke<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
    body: RawBody,
) -> Result<Json<Device>, ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let id = device_id(&id)?;
    let ReasonBody { reason } = body.json_or_default()?;
    check_device(&*st.backend, who, id).await?;
    Ok(Json(st.backend.revoke(who, id, reason).await?))
}

async fn rotate<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<Device>, ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let id = device_id(&id)?;
    check_device(&*st.backend, who, id).await?;
    Ok(Json(st.backend.rotate(who, id).await?))
}

async fn remove<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<StatusCode, ApiError> {
    let who = require(&auth, Permission::TrustOperate)?;
    let id = device_id(&id)?;
    check_device(&*st.backend, who, id).await?;
    st.backend.remove(who, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Tokens

fn token_routes<B: Backend>() -> Router<AppState<B>> {
    Router::new()
        .route("/tokens", post(create_token::<B>).get(list_tokens::<B>))
        .route("/tokens/{id}", delete(revoke_token::<B>))
}

async fn create_token<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    body: RawBody,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let who = require(&auth, Permission::TokensManage)?;
    let req: CreateTokenRequest = body.json()?;
    let token = st.backend.create_token(who, req).await?;
    Ok((StatusCode::CREATED, Json(token)))
}

async fn list_tokens<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    require(&auth, Permission::TokensManage)?;
    Ok(Json(st.backend.list_tokens().await?))
}

async fn revoke_token<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<TokenInfo>, ApiError> {
    let who = require(&auth, Permission::TokensManage)?;
    Ok(Json(st.backend.revoke_token(who, &id).await?))
}

// ---------------------------------------------------------------------------------------------
// Runtime: inventory, nodes, invocations, events

fn runtime_routes<B: Backend>() -> Router<AppState<B>> {
    Router::new()
        .route("/inventory", get(inventory::<B>))
        .route("/inventory/{id}", get(inventory_device::<B>))
        .route("/inventory/{id}/history", get(history::<B>))
        // The path of the control plane this one replaces: the same answer.
        .route("/inventory/devices/{id}", get(inventory_device::<B>))
        .route("/nodes", get(list_nodes::<B>))
        .route("/nodes/{id}", get(node::<B>))
        .route("/nodes/{id}/invoke", post(invoke::<B>))
        .route("/invocations", get(list_invocations::<B>))
        .route("/invocations/{id}", get(invocation::<B>))
        .route("/events", get(events::<B>))
        .route("/audit", get(audit::<B>))
}

async fn inventory<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Inventory>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let filter = Filter::of(&uri)?;
    let page = PageQuery::of(&uri)?;
    // Filtered, counted, ordered and cut on the outline; only the page's entries in full. The
    // outline's labels only when something here reads them.
    let labels = !filter.selector.is_empty() || who.scope.limits_devices() || page.needle.is_some();
    let mut inventory = st.backend.inventory_outline(labels).await?;
    if !filter.is_everything() || who.scope.limits_devices() || page.needle.is_some() {
        inventory.devices.retain(|d| {
            filter.keeps_entry(d)
                && who.scope.covers(&d.labels)
                && page.needle.as_deref().is_none_or(|n| d.mentions(n))
        });
        inventory.summary = crate::api::InventorySummary::of(&inventory.devices);
    }
    page.apply(&mut inventory);
    inventory.devices = st
        .backend
        .inventory_details(std::mem::take(&mut inventory.devices))
        .await?;
    Ok(Json(inventory))
}

#[derive(Deserialize)]
struct RawPageQuery {
    limit: Option<usize>,
    offset: Option<usize>,
    sort: Option<String>,
    q: Option<String>,
}

/// The inventory's `?limit=&offset=&sort=&q=`, parsed once.
struct PageQuery {
    limit: Option<usize>,
    offset: usize,
    sort: crate::api::InventorySort,
    /// The lowercased search text, if any.
    needle: Option<String>,
}

impl PageQuery {
    fn of(uri: &Uri) -> Result<PageQuery, ApiError> {
        let q: RawPageQuery = query(uri)?;
        let limit = match q.limit {
            Some(0) => return Err(ApiError::bad_request("limit must be at least 1")),
            Some(n) if n > crate::api::INVENTORY_MAX_PAGE => {
                return Err(ApiError::bad_request(format!(
                    "limit must be at most {}",
                    crate::api::INVENTORY_MAX_PAGE
                )));
            }
            l => l,
        };
        let sort = match q.sort.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => s.parse().map_err(ApiError::bad_request)?,
            None => crate::api::InventorySort::default(),
        };
        let needle =
            q.q.map(|t| t.trim().to_lowercase())
                .filter(|t| !t.is_empty());
        if needle
            .as_ref()
            .is_some_and(|t| t.chars().count() > crate::api::MAX_TEXT_CHARS)
        {
            return Err(ApiError::bad_request(format!(
                "q must be at most {} characters",
                crate::api::MAX_TEXT_CHARS
            )));
        }
        Ok(PageQuery {
            limit,
            offset: q.offset.unwrap_or(0),
            sort,
            needle,
        })
    }

    /// Sorts the matches and keeps this page of them (the summary already counts them all).
    fn apply(&self, inventory: &mut Inventory) {
        let devices = &mut inventory.devices;
        if self.sort != crate::api::InventorySort::default() {
            self.sort.sort(devices);
        }
        let total = devices.len();
        let start = self.offset.min(total);
        let end = self
            .limit
            .map_or(total, |l| start.saturating_add(l).min(total));
        devices.truncate(end);
        devices.drain(..start);
        inventory.page = Some(crate::api::InventoryPage {
            total: total as u64,
            offset: self.offset as u64,
            limit: self.limit.map(|l| l as u64),
            sort: self.sort.to_string(),
        });
    }
}

async fn inventory_device<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<InventoryDevice>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let entry = st.backend.inventory_device(device_id(&id)?).await?;
    who.check_device(&entry.device_id, &entry.labels)?;
    Ok(Json(entry))
}

/// `GET /inventory/{id}/history`: what the inventory entry's reader may see, over time.
async fn history<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
    uri: Uri,
) -> Result<Json<crate::api::History>, ApiError> {
    use crate::api::{HISTORY_DEFAULT_HOURS, HISTORY_MAX_HOURS, HistoryQuery};
    let who = require(&auth, Permission::ObservabilityRead)?;
    let q: HistoryQuery = query(&uri)?;
    let hours = q.hours.unwrap_or(HISTORY_DEFAULT_HOURS);
    if !(1..=HISTORY_MAX_HOURS).contains(&hours) {
        return Err(ApiError::bad_request(format!(
            "hours must be between 1 and {HISTORY_MAX_HOURS}"
        )));
    }
    let id = device_id(&id)?;
    let entry = st.backend.inventory_device(id).await?;
    who.check_device(&entry.device_id, &entry.labels)?;
    Ok(Json(st.backend.history(id, hours).await?))
}

async fn list_nodes<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
) -> Result<Json<Vec<Node>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let scope = InScope::of(&*st.backend, who).await?;
    let mut nodes = st.backend.list_nodes().await?;
    nodes.retain(|n| scope.has(&n.device_id));
    Ok(Json(nodes))
}

async fn node<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<Node>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let id = device_id(&id)?;
    check_device(&*st.backend, who, id).await?;
    Ok(Json(st.backend.node(id).await?))
}

async fn invoke<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
    body: RawBody,
) -> Result<(StatusCode, Json<Invocation>), ApiError> {
    let who = require(&auth, Permission::NodesInvoke)?;
    let device_id = device_id(&id)?;
    let req: InvokeRequest = body.json()?;
    who.check_capability(&req.capability)?;
    check_device(&*st.backend, who, device_id).await?;
    let invocation = st.backend.invoke(who, device_id, req).await?;
    let status = if invocation.state.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(invocation)))
}

async fn list_invocations<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Vec<Invocation>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let q: InvocationsQuery = query(&uri)?;
    let device_id = match q.device_id.as_deref() {
        None | Some("") => None,
        Some(d) => Some(
            d.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid device id {d:?}")))?,
        ),
    };
    let q = InvocationQuery {
        device_id,
        limit: q.limit,
    };
    let scope = InScope::of(&*st.backend, who).await?;
    let mut list = st.backend.list_invocations(q).await?;
    // A scoped token's list may come out shorter than `limit`: the filter runs after it.
    list.retain(|i| scope.has(&i.device_id));
    Ok(Json(list))
}

async fn audit<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let mut q: AuditQuery = query(&uri)?;
    if q.target.as_deref() == Some("") {
        q.target = None;
    }
    let mut entries = st.backend.audit(q).await?;
    if who.scope.limits_devices() {
        // Only entries about the token's own devices (their target or detail is the id).
        let scope = InScope::of(&*st.backend, who).await?;
        entries.retain(|e| {
            [&e.target, &e.detail]
                .iter()
                .any(|t| t.parse::<DeviceId>().is_ok_and(|d| scope.has(&d)))
        });
    }
    Ok(Json(entries))
}

async fn invocation<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<Invocation>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let parsed = id
        .parse::<InvocationId>()
        .map_err(|_| ApiError::not_found(format!("invocation {id} not found")))?;
    let invocation = st.backend.invocation(parsed).await?;
    if who.scope.limits_devices() {
        check_device(&*st.backend, who, invocation.device_id).await?;
    }
    Ok(Json(invocation))
}

async fn events<B: Backend>(
    State(st): State<AppState<B>>,
    headers: axum::http::HeaderMap,
    auth: Auth,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let subscriber = require(&auth, Permission::ObservabilityRead)?.clone();
    // Subscribe before answering: whatever is published after the client has the response
    // head reaches it.
    let receiver = st.backend.subscribe();
    let scope = Arc::new(std::sync::RwLock::new(
        InScope::of(&*st.backend, &subscriber).await?,
    ));
    let token = bearer(&headers).unwrap_or_default().to_string();
    let stream = until_token_lapses(
        event_stream(BroadcastStream::new(receiver), subscriber, scope.clone()),
        st.backend.clone(),
        token,
        scope,
    );
    let stream = match st.shutdown {
        Some(mut shutdown) => stream
            .take_until(async move {
                // An error means the sender is gone: shut down as well.
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .boxed(),
        None => stream.boxed(),
    };
    let opened = futures_util::stream::once(async { Ok(SseEvent::default().comment("connected")) });
    Ok(Sse::new(opened.chain(stream)).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE)))
}

/// Ends `events` once `token` no longer authenticates with `observability.read` (revoked,
/// expired, or its permission gone), checked every [`SSE_TOKEN_RECHECK`]; the last event is a
/// `stream.closed` whose data says why.
fn until_token_lapses<B: Backend>(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
    backend: Arc<B>,
    token: String,
    scope: Arc<std::sync::RwLock<InScope>>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<SseEvent>();
    let lapsed = async move {
        let mut tick = tokio::time::interval(SSE_TOKEN_RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checks: u32 = 0;
        loop {
            tick.tick().await;
            let Some(principal) = backend
                .authenticate(&token)
                .await
                .filter(|p| p.can(Permission::ObservabilityRead))
            else {
                break;
            };
            // A scoped stream re-reads which devices are its own now and then (label changes
            // it sees update it at once; this catches devices paired or changed unseen).
            checks = checks.wrapping_add(1);
            if principal.scope.limits_devices()
                && checks.is_multiple_of(SSE_SCOPE_REFRESH_TICKS)
                && let Ok(fresh) = InScope::of(&*backend, &principal).await
            {
                *scope.write().unwrap_or_else(|e| e.into_inner()) = fresh;
            }
        }
        let closed = Event {
            seq: 0,
            at: time::OffsetDateTime::now_utc(),
            kind: STREAM_CLOSED.into(),
            device_id: None,
            data: serde_json::json!({
                "reason": "token_invalid",
                "message": "the token was revoked, expired or lost observability.read",
            }),
        };
        if let Some(event) = sse_event(&closed) {
            let _ = closed_tx.send(event);
        }
    };
    events.take_until(lapsed).chain(
        futures_util::stream::once(async move { closed_rx.await.ok().map(Ok) })
            .filter_map(std::future::ready),
    )
}

/// Maps broadcast items to SSE events, keeping only those `subscriber` [may
/// see](Principal::may_see); a lagged receiver becomes an `event: lagged` whose data is
/// `{"skipped": n}`, and the stream goes on.
fn event_stream(
    events: impl Stream<Item = Result<Event, BroadcastStreamRecvError>> + Send + 'static,
    subscriber: Principal,
    scope: Arc<std::sync::RwLock<InScope>>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    events.filter_map(move |item| {
        if let Ok(event) = &item {
            follow_labels(&subscriber, &scope, event);
        }
        let item = match item {
            Ok(event)
                if !subscriber.may_see(&event, &|d| {
                    scope.read().unwrap_or_else(|e| e.into_inner()).has(d)
                }) =>
            {
                None
            }
            Ok(event) => sse_event(&event).map(Ok),
            Err(BroadcastStreamRecvError::Lagged(skipped)) => {
                warn!(skipped, "event stream subscriber lagged");
                Some(Ok(SseEvent::default()
                    .event("lagged")
                    .data(serde_json::json!({ "skipped": skipped }).to_string())))
            }
        };
        std::future::ready(item)
    })
}

/// One event as SSE: `event: <kind>`, `id: <seq>`, `data: <Event JSON>`.
/// A `device.labels` event moves its device into or out of a scoped subscriber's set at once.
fn follow_labels(subscriber: &Principal, scope: &std::sync::RwLock<InScope>, event: &Event) {
    if event.kind != "device.labels" || !subscriber.scope.limits_devices() {
        return;
    }
    let (Some(device), Some(labels)) = (event.device_id, event.data.get("labels")) else {
        return;
    };
    let Ok(labels) =
        serde_json::from_value::<std::collections::BTreeMap<String, String>>(labels.clone())
    else {
        return;
    };
    let mut scope = scope.write().unwrap_or_else(|e| e.into_inner());
    if let Some(set) = scope.0.as_mut() {
        if subscriber.scope.covers(&labels) {
            set.insert(device);
        } else {
            set.remove(&device);
        }
    }
}

fn sse_event(event: &Event) -> Option<SseEvent> {
    // `SseEvent::event` panics on line breaks; a kind never has them, but it is not ours.
    let kind: String = event
        .kind
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    match SseEvent::default()
        .event(kind)
        .id(event.seq.to_string())
        .json_data(event)
    {
        Ok(sse) => Some(sse),
        Err(e) => {
            error!(seq = event.seq, error = %e, "cannot encode event; skipped");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Batches: one capability on many devices

fn mesh_routes<B: Backend>() -> Router<AppState<B>> {
    Router::new().route("/mesh", get(mesh::<B>))
}

/// `GET /mesh` (observability.read): the peer connections the nodes report, those whose
/// two sides are both in the caller's scope.
async fn mesh<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
) -> Result<Json<MeshView>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let scope = InScope::of(&*st.backend, who).await?;
    let mut links = st.backend.mesh().await?;
    links.retain(|l| scope.has(&l.a) && scope.has(&l.b));
    Ok(Json(MeshView { links }))
}

fn batch_routes<B: Backend>() -> Router<AppState<B>> {
    Router::new()
        .route("/batches", post(create_batch::<B>).get(list_batches::<B>))
        .route("/batches/{id}", get(batch::<B>))
}

async fn create_batch<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    body: RawBody,
) -> Result<(StatusCode, Json<Batch>), ApiError> {
    let who = require(&auth, Permission::NodesInvoke)?;
    let req: BatchRequest = body.json()?;
    who.check_capability(&req.capability)?;
    let batch = st.backend.create_batch(who, req).await?;
    Ok((StatusCode::CREATED, Json(batch)))
}

#[derive(Deserialize)]
struct BatchesQuery {
    limit: Option<usize>,
}

/// Whether `who` sees a batch: a token limited to a selector sees the batches it created.
fn sees_batch(who: &Principal, batch: &BatchInfo) -> bool {
    !who.scope.limits_devices() || batch.requested_by == who.actor()
}

async fn list_batches<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Vec<BatchInfo>>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let q: BatchesQuery = query(&uri)?;
    let mut list = st
        .backend
        .list_batches(q.limit.unwrap_or(50).clamp(1, 200))
        .await?;
    list.retain(|b| sees_batch(who, b));
    Ok(Json(list))
}

async fn batch<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    Id(id): Id,
) -> Result<Json<Batch>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let parsed = id
        .parse::<BatchId>()
        .map_err(|_| ApiError::not_found(format!("batch {id} not found")))?;
    let batch = st.backend.batch(parsed).await?;
    if !sees_batch(who, &batch.info) {
        return Err(who.refused_by_selector(format_args!("it sees only the batches it created")));
    }
    Ok(Json(batch))
}

// ---------------------------------------------------------------------------------------------
// Operations: whoami, QR, metrics, health

/// `GET /console/v1/whoami`: the token's own id, name and permissions, so that a client (the
/// web page) can offer only what the token may do. Any valid token may ask.
async fn whoami(auth: Auth) -> Json<Principal> {
    Json(any_permission(&auth).clone())
}

#[derive(Deserialize)]
struct QrQuery {
    text: Option<String>,
}

async fn qr<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Response, ApiError> {
    require(&auth, Permission::TrustOperate)?;
    let q: QrQuery = query(&uri)?;
    let text = q.text.unwrap_or_default();
    if text.is_empty() {
        return Err(ApiError::bad_request(
            "the text query parameter is required",
        ));
    }
    if text.len() > MAX_QR_TEXT {
        return Err(ApiError::bad_request(format!(
            "text is longer than {MAX_QR_TEXT} bytes"
        )));
    }
    let svg = st.backend.qr_svg(&text)?;
    Ok(([(CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

async fn metrics<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    refuse_scoped(who, "/metrics")?;
    Ok(metrics_public(State(st), headers).await)
}

/// `/metrics` in the format the `Accept` header asks for (see [`MetricsFormat::negotiate`]).
async fn metrics_public<B: Backend>(State(st): State<AppState<B>>, headers: HeaderMap) -> Response {
    let format = MetricsFormat::negotiate(&headers);
    crate::metrics_layer::exposition(format, st.backend.metrics(format).await)
}

async fn healthz<B: Backend>(State(st): State<AppState<B>>) -> Response {
    let (status, word) = if st.backend.ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    };
    (
        status,
        [(CACHE_CONTROL, "no-store")],
        // The console is built into the anchor from the same workspace: its version is the
        // anchor's (`anchorctl --version` shows it).
        Json(serde_json::json!({ "status": word, "version": env!("CARGO_PKG_VERSION") })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_accepts_the_standard_form() {
        assert_eq!(
            bearer(&headers(&["Bearer abc.DEF-123"])),
            Some("abc.DEF-123")
        );
        assert_eq!(bearer(&headers(&["bearer abc"])), Some("abc"));
        assert_eq!(bearer(&headers(&["BEARER   abc"])), Some("abc"));
        assert_eq!(bearer(&headers(&["Bearer abc  "])), Some("abc"));
    }

    #[test]
    fn bearer_refuses_anything_else() {
        assert_eq!(bearer(&headers(&[])), None);
        assert_eq!(bearer(&headers(&["Bearer"])), None);
        assert_eq!(bearer(&headers(&["Bearer "])), None);
        assert_eq!(bearer(&headers(&["Basic YWxhZGRpbjpvcGVuc2VzYW1l"])), None);
        assert_eq!(bearer(&headers(&["Bearerabc"])), None);
        assert_eq!(bearer(&headers(&["Bearer a b"])), None);
        assert_eq!(bearer(&headers(&["abc"])), None);
        assert_eq!(bearer(&headers(&["Bearer a", "Bearer b"])), None);
    }

    #[test]
    fn status_codes_map_to_stable_codes() {
        assert_eq!(
            code_for_status(StatusCode::METHOD_NOT_ALLOWED),
            "method_not_allowed"
        );
        assert_eq!(
            code_for_status(StatusCode::PAYLOAD_TOO_LARGE),
            "payload_too_large"
        );
        assert_eq!(
            code_for_status(StatusCode::UNPROCESSABLE_ENTITY),
            "bad_request"
        );
        assert_eq!(code_for_status(StatusCode::BAD_GATEWAY), "internal");
    }

    #[tokio::test]
    async fn a_route_that_skips_its_permission_check_fails_closed() {
        use axum::Extension;
        use tower::ServiceExt;

        let app = Router::new()
            .route("/forgot", get(|| async { "secret" }))
            .route(
                "/checked",
                get(|Extension(check): Extension<PermissionCheck>| async move {
                    check.0.store(true, Ordering::Relaxed);
                    "fine"
                }),
            )
            .route(
                "/refused",
                get(|| async { ApiError::forbidden(Permission::TokensManage) }),
            )
            .route_layer(middleware::from_fn(enforce_permission_check));
        let status = |uri: &'static str| {
            let app = app.clone();
            async move {
                let req = Request::builder()
                    .uri(uri)
                    .body(axum::body::Body::empty())
                    .unwrap();
                app.oneshot(req).await.unwrap().status()
            }
        };
        assert_eq!(status("/forgot").await, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status("/checked").await, StatusCode::OK);
        assert_eq!(status("/refused").await, StatusCode::FORBIDDEN);
    }

    #[test]
    fn event_kind_with_line_breaks_does_not_panic() {
        let event = Event {
            seq: 7,
            at: time::OffsetDateTime::UNIX_EPOCH,
            kind: "bad\nkind".into(),
            device_id: None,
            data: serde_json::Value::Null,
        };
        assert!(sse_event(&event).is_some());
    }
}
