//! [`ControlPlaneClient`]: a typed client of the console API, used by `anchorctl` and tests.
//!
//! One async method per route, with the [`api`](crate::api) types. Methods that name a device
//! or an invocation take anything that displays as its id: a [`DeviceId`] or [`InvocationId`],
//! or the text an operator typed, which the console judges (a malformed id is a 404 there, as an
//! unknown one).
//!
//! `http://` and `https://`. Over https the client trusts only the CA certificates it is given
//! ([`CaCertificates`], the anchor's `ca.pem` or an operator's own CA), never the platform's
//! roots: [`ControlPlaneClient::with_ca`]. TLS is rustls on ring. A certificate that does not
//! verify is [`ClientError::Certificate`].
//!
//! Cancel safety: every method may be dropped at any await point; that drops the HTTP request.
//! A mutation the server already received may still take effect.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::api::*;

/// How long to wait for a TCP connection to the console.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Overall limit of an ordinary request (not `invoke`, not `events`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Default deadline of an invocation, as the anchor applies it (`timeout_ms` absent).
pub const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a waiting `invoke` allows beyond the invocation's own deadline before giving up.
pub const INVOKE_MARGIN: Duration = Duration::from_secs(15);

/// Longest line the event-stream parser buffers before it gives up on the stream.
pub const MAX_SSE_LINE: usize = 8 * 1024 * 1024;

/// Why a console call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The console answered with an error (`{code, message}`).
    #[error("{code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's stable error code, e.g. `not_found`, `forbidden`.
        code: String,
        /// The API's message.
        message: String,
    },
    /// No answer: connection refused or reset, timeout. The message names the URL.
    #[error("{}", describe_http(.0))]
    Http(reqwest::Error),
    /// An answer that is not what the API promises.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// The base URL cannot be used.
    #[error("bad console URL: {0}")]
    BadUrl(String),
    /// The CA certificates given for https cannot be used (not PEM certificates, none at all).
    #[error("bad CA certificate: {0}")]
    BadCa(String),
    /// The console's TLS certificate does not verify against the CA given (another anchor's
    /// or no anchor's CA), or does not name the URL's host. The message names the URL.
    #[error("{0}")]
    Certificate(String),
    /// The token cannot be sent in an HTTP header.
    #[error("bad token: {0}")]
    BadToken(String),
    /// The console refused a policy file (400 `invalid_policy`): every error with its line.
    #[error("{message}")]
    InvalidPolicy {
        /// The API's message.
        message: String,
        /// Every error, in file order.
        errors: Vec<PolicyProblem>,
    },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code, if the console answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A client of one anchor's console.
#[derive(Clone)]
pub struct ControlPlaneClient {
    base: Url,
    auth: HeaderValue,
    http: reqwest::Client,
}

impl fmt::Debug for ControlPlaneClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneClient")
            .field("base", &self.base.as_str())
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The CA certificates an `https://` console's certificate must chain to.
#[derive(Clone)]
pub struct CaCertificates {
    roots: Arc<rustls::RootCertStore>,
}

impl fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCertificates")
            .field("certificates", &self.roots.len())
            .finish()
    }
}

impl CaCertificates {
    /// Every `CERTIFICATE` block of a PEM file (the anchor's `ca.pem`, or a bundle).
    pub fn from_pem(pem: &[u8]) -> Result<CaCertificates, ClientError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ClientError::BadCa(format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::BadCa(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::BadCa(
                "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        Ok(CaCertificates {
            roots: Arc::new(roots),
        })
    }

    /// The rustls client configuration that trusts these and nothing else.
    fn client_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::BadCa(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth())
    }
}

impl ControlPlaneClient {
    /// A client of the console at `base_url` (`http://host:port`, optionally with a path
    /// prefix; a trailing slash is fine) that sends `token` as its bearer token. An `https://`
    /// URL needs [`with_ca`](Self::with_ca).
    pub fn new(base_url: &str, token: impl Into<String>) -> Result<Self, ClientError> {
        Self::with_ca(base_url, token, None)
    }

    /// Like [`new`](Self::new), trusting `ca` for an `https://` URL (required for one;
    /// unused for `http://`).
    pub fn with_ca(
        base_url: &str,
        token: impl Into<String>,
        ca: Option<&CaCertificates>,
    ) -> Result<Self, ClientError> {
        let base = parse_base_url(base_url)?;
        let token = token.into();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ClientError::BadToken(
                "a token is non-empty and has no spaces or control characters".into(),
            ));
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ClientError::BadToken("a token is printable ASCII (check the token file)".into())
        })?;
        auth.set_sensitive(true);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // The API never redirects; following one could send the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("anchorage-console/", env!("CARGO_PKG_VERSION")));
        if base.scheme() == "https" {
            let ca = ca.ok_or_else(|| {
                ClientError::BadUrl(format!(
                    "{base}: an https console needs the CA certificate to pin (the anchor's \
                     ca.pem); platform roots are not used"
                ))
            })?;
            builder = builder
                .use_preconfigured_tls(ca.client_config()?)
                .https_only(true);
        }
        let http = builder.build().map_err(ClientError::Http)?;
        Ok(ControlPlaneClient { base, auth, http })
    }

    /// The console's base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// The token's own id, name and permissions (`GET /whoami`; any valid token).
    pub async fn whoami(&self) -> Result<Principal, ClientError> {
        self.json(self.api(Method::GET, &["whoami"])?).await
    }

    // Pairing

    /// Mints a pairing code (`POST /pairing/codes`).
    pub async fn mint_code(&self, req: MintCodeRequest) -> Result<MintedCode, ClientError> {
        let rb = self.api(Method::POST, &["pairing", "codes"])?.json(&req);
        self.json(rb).await
    }

    /// Lists pairing codes (`GET /pairing/codes`).
    pub async fn list_codes(&self) -> Result<Vec<PairingCodeInfo>, ClientError> {
        self.json(self.api(Method::GET, &["pairing", "codes"])?)
            .await
    }

    /// Lists pairing requests, optionally only those in `state` (`GET /pairing/requests`).
    pub async fn list_requests(
        &self,
        state: Option<RequestState>,
    ) -> Result<Vec<PairingRequest>, ClientError> {
        let mut rb = self.api(Method::GET, &["pairing", "requests"])?;
        if let Some(state) = state {
            rb = rb.query(&[("state", state.as_str())]);
        }
        self.json(rb).await
    }

    /// One pairing request (`GET /pairing/requests/{id}`).
    pub async fn request(&self, id: &str) -> Result<PairingRequest, ClientError> {
        self.json(self.api(Method::GET, &["pairing", "requests", id])?)
            .await
    }

    /// Approves a pairing request (`POST /pairing/requests/{id}/approve`).
    pub async fn approve(&self, id: &str) -> Result<PairingRequest, ClientError> {
        self.approve_labelled(id, Default::default()).await
    }

    /// Approves a pairing request, giving the device `labels` besides its code's.
    pub async fn approve_labelled(
        &self,
        id: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<PairingRequest, ClientError> {
        let mut rb = self.api(Method::POST, &["pairing", "requests", id, "approve"])?;
        if !labels.is_empty() {
            rb = rb.json(&crate::api::ApproveRequest { labels });
        }
        self.json(rb).await
    }

    /// Rejects a pairing request (`POST /pairing/requests/{id}/reject`).
    pub async fn reject(
        &self,
        id: &str,
        reason: Option<String>,
    ) -> Result<PairingRequest, ClientError> {
        let rb = self
            .api(Method::POST, &["pairing", "requests", id, "reject"])?
            .json(&ReasonBody { reason });
        self.json(rb).await
    }

    // Devices

    /// Lists devices (`GET /devices`).
    pub async fn list_devices(&self) -> Result<Vec<Device>, ClientError> {
        self.list_devices_filtered(&DeviceFilter::default()).await
    }

    /// The devices `filter` keeps (`GET /devices?selector=&trust=`).
    pub async fn list_devices_filtered(
        &self,
        filter: &DeviceFilter,
    ) -> Result<Vec<Device>, ClientError> {
        let rb = self
            .api(Method::GET, &["devices"])?
            .query(&filter.query_pairs());
        self.json(rb).await
    }

    /// Sets and removes a device's labels (`PATCH /devices/{id}/labels`).
    pub async fn label(
        &self,
        id: &(impl fmt::Display + ?Sized),
        req: &crate::api::LabelRequest,
    ) -> Result<Device, ClientError> {
        let rb = self
            .api(Method::PATCH, &["devices", &id.to_string(), "labels"])?
            .json(req);
        self.json(rb).await
    }

    /// One device (`GET /devices/{id}`).
    pub async fn device(&self, id: &(impl fmt::Display + ?Sized)) -> Result<Device, ClientError> {
        self.json(self.api(Method::GET, &["devices", &id.to_string()])?)
            .await
    }

    /// Revokes a device (`POST /devices/{id}/revoke`).
    pub async fn revoke(
        &self,
        id: &(impl fmt::Display + ?Sized),
        reason: Option<String>,
    ) -> Result<Device, ClientError> {
        let rb = self
            .api(Method::POST, &["devices", &id.to_string(), "revoke"])?
            .json(&ReasonBody { reason });
        self.json(rb).await
    }

    /// Asks a device to rotate its certificate (`POST /devices/{id}/rotate`).
    pub async fn rotate(&self, id: &(impl fmt::Display + ?Sized)) -> Result<Device, ClientError> {
        self.json(self.api(Method::POST, &["devices", &id.to_string(), "rotate"])?)
            .await
    }

    /// Removes a device (`DELETE /devices/{id}`).
    pub async fn remove(&self, id: &(impl fmt::Display + ?Sized)) -> Result<(), ClientError> {
        self.send(self.api(Method::DELETE, &["devices", &id.to_string()])?)
            .await
            .map(drop)
    }

    // Tokens

    /// Creates a token (`POST /tokens`); the answer holds its secret, shown only once.
    pub async fn create_token(&self, req: CreateTokenRequest) -> Result<CreatedToken, ClientError> {
        let rb = self.api(Method::POST, &["tokens"])?.json(&req);
        self.json(rb).await
    }

    /// Lists tokens (`GET /tokens`).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.json(self.api(Method::GET, &["tokens"])?).await
    }

    /// Revokes a token (`DELETE /tokens/{id}`).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo, ClientError> {
        self.json(self.api(Method::DELETE, &["tokens", id])?).await
    }

    // Mesh policy

    /// The mesh policy in force (`GET /policy`).
    pub async fn policy(&self) -> Result<PolicyInfo, ClientError> {
        self.json(self.api(Method::GET, &["policy"])?).await
    }

    /// Sets the mesh policy from the TOML file `text` (`PUT /policy`); a file with errors is
    /// [`ClientError::InvalidPolicy`].
    pub async fn set_policy(&self, text: impl Into<String>) -> Result<PolicyInfo, ClientError> {
        let rb = self
            .api(Method::PUT, &["policy"])?
            .header(reqwest::header::CONTENT_TYPE, "application/toml")
            .body(text.into());
        self.json(rb).await
    }

    /// The newest versions of the policy, newest first (`GET /policy/history`).
    pub async fn policy_history(
        &self,
        limit: Option<usize>,
    ) -> Result<Vec<PolicyVersionInfo>, ClientError> {
        let mut rb = self.api(Method::GET, &["policy", "history"])?;
        if let Some(limit) = limit {
            rb = rb.query(&[("limit", limit)]);
        }
        self.json(rb).await
    }

    /// Whether the policy lets `from` do `action` on `to` (`GET /policy/test`); each device
    /// is an id, a unique id prefix, or a name.
    pub async fn policy_test(
        &self,
        from: &str,
        to: &str,
        action: &PolicyAction,
    ) -> Result<PolicyTestResult, ClientError> {
        let (key, value) = match action {
            PolicyAction::Capability(c) => ("capability", c.as_str()),
            PolicyAction::Service(s) => ("service", s.as_str()),
        };
        let rb = self.api(Method::GET, &["policy", "test"])?.query(&[
            ("from", from),
            ("to", to),
            (key, value),
        ]);
        self.json(rb).await
    }

    // Runtime

    /// The inventory (`GET /inventory`).
    pub async fn inventory(&self) -> Result<Inventory, ClientError> {
        self.inventory_filtered(&DeviceFilter::default()).await
    }

    /// The inventory of the devices `filter` keeps (`GET /inventory?selector=&presence=&trust=`).
    pub async fn inventory_filtered(
        &self,
        filter: &DeviceFilter,
    ) -> Result<Inventory, ClientError> {
        let rb = self
            .api(Method::GET, &["inventory"])?
            .query(&filter.query_pairs());
        self.json(rb).await
    }

    /// One device's inventory entry (`GET /inventory/{id}`).
    pub async fn inventory_device(
        &self,
        id: &(impl fmt::Display + ?Sized),
    ) -> Result<InventoryDevice, ClientError> {
        self.json(self.api(Method::GET, &["inventory", &id.to_string()])?)
            .await
    }

    /// The peer connections of the mesh (`GET /mesh`).
    pub async fn mesh(&self) -> Result<crate::api::MeshView, ClientError> {
        self.json(self.api(Method::GET, &["mesh"])?).await
    }

    /// Registered nodes (`GET /nodes`).
    pub async fn list_nodes(&self) -> Result<Vec<Node>, ClientError> {
        self.json(self.api(Method::GET, &["nodes"])?).await
    }

    /// One node (`GET /nodes/{id}`).
    pub async fn node(&self, id: &(impl fmt::Display + ?Sized)) -> Result<Node, ClientError> {
        self.json(self.api(Method::GET, &["nodes", &id.to_string()])?)
            .await
    }

    /// Invokes a capability (`POST /nodes/{id}/invoke`).
    ///
    /// Unless `req.async_`, waits for the result up to the invocation's deadline plus
    /// [`INVOKE_MARGIN`]. The answer may still be `queued` or `dispatched` (the anchor answered
    /// 202); check [`InvocationState::is_final`].
    pub async fn invoke(
        &self,
        device_id: &(impl fmt::Display + ?Sized),
        req: InvokeRequest,
    ) -> Result<Invocation, ClientError> {
        let timeout = if req.async_ {
            REQUEST_TIMEOUT
        } else {
            req.timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_INVOKE_TIMEOUT)
                .saturating_add(INVOKE_MARGIN)
        };
        let rb = self
            .builder(Method::POST, &["nodes", &device_id.to_string(), "invoke"])?
            .timeout(timeout)
            .json(&req);
        self.json(rb).await
    }

    /// Invocations, newest first (`GET /invocations`).
    pub async fn list_invocations(
        &self,
        query: InvocationQuery,
    ) -> Result<Vec<Invocation>, ClientError> {
        let mut rb = self.api(Method::GET, &["invocations"])?;
        if let Some(device_id) = &query.device_id {
            rb = rb.query(&[("device_id", device_id.to_string())]);
        }
        if let Some(limit) = query.limit {
            rb = rb.query(&[("limit", limit)]);
        }
        self.json(rb).await
    }

    /// Creates a batch (`POST /batches`): answers at once, every invocation `queued`; follow
    /// it with [`ControlPlaneClient::batch`].
    pub async fn create_batch(&self, req: &BatchRequest) -> Result<Batch, ClientError> {
        let rb = self.api(Method::POST, &["batches"])?.json(req);
        self.json(rb).await
    }

    /// One batch with its invocations (`GET /batches/{id}`).
    pub async fn batch(&self, id: &(impl fmt::Display + ?Sized)) -> Result<Batch, ClientError> {
        self.json(self.api(Method::GET, &["batches", &id.to_string()])?)
            .await
    }

    /// Batches, newest first (`GET /batches`).
    pub async fn list_batches(&self, limit: Option<usize>) -> Result<Vec<BatchInfo>, ClientError> {
        let mut rb = self.api(Method::GET, &["batches"])?;
        if let Some(limit) = limit {
            rb = rb.query(&[("limit", limit)]);
        }
        self.json(rb).await
    }

    /// The audit log, newest first (`GET /audit`).
    pub async fn audit(&self, query: AuditQuery) -> Result<Vec<AuditEntry>, ClientError> {
        let mut rb = self.api(Method::GET, &["audit"])?;
        if let Some(target) = &query.target {
            rb = rb.query(&[("target", target)]);
        }
        if let Some(limit) = query.limit {
            rb = rb.query(&[("limit", limit)]);
        }
        self.json(rb).await
    }

    /// One invocation (`GET /invocations/{id}`).
    pub async fn invocation(
        &self,
        id: &(impl fmt::Display + ?Sized),
    ) -> Result<Invocation, ClientError> {
        self.json(self.api(Method::GET, &["invocations", &id.to_string()])?)
            .await
    }

    /// Follows the event stream (`GET /events`).
    ///
    /// Returns once the console accepted the subscription: every event published after that
    /// arrives on the stream. `lagged` notices (events the anchor dropped for this slow
    /// subscriber) are logged and skipped. The stream ends when the anchor closes it; an
    /// undecodable event is an `Err` item and the stream goes on.
    pub async fn events(
        &self,
    ) -> Result<impl Stream<Item = Result<Event, ClientError>> + Send + 'static, ClientError> {
        let rb = self
            .builder(Method::GET, &["events"])?
            .header(ACCEPT, "text/event-stream");
        let response = self.send(rb).await?;
        Ok(decode_events(response.bytes_stream()))
    }

    // Operations

    /// The Prometheus metrics text (`GET /metrics`).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = self.url(&["metrics"])?;
        let rb = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.auth.clone())
            .timeout(REQUEST_TIMEOUT);
        self.send(rb).await?.text().await.map_err(transport_error)
    }

    /// Whether the anchor is ready (`GET /healthz`: 200 → `true`, 503 → `false`).
    pub async fn healthz(&self) -> Result<bool, ClientError> {
        let url = self.url(&["healthz"])?;
        let response = self
            .http
            .get(url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(transport_error)?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::SERVICE_UNAVAILABLE => Ok(false),
            _ => Err(api_error(response).await),
        }
    }

    /// The anchor's version from `GET /healthz` (no token needed), waiting at most `limit`
    /// for the answer; `None` from an anchor that does not say.
    pub async fn anchor_version(&self, limit: Duration) -> Result<Option<String>, ClientError> {
        let url = self.url(&["healthz"])?;
        let response = self
            .http
            .get(url)
            .timeout(limit)
            .send()
            .await
            .map_err(ClientError::Http)?;
        if !matches!(
            response.status(),
            StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE
        ) {
            return Err(api_error(response).await);
        }
        let body: serde_json::Value = response.json().await.map_err(ClientError::Http)?;
        Ok(body
            .get("version")
            .and_then(|v| v.as_str())
            .map(|v| v.chars().take(64).collect()))
    }

    // Plumbing

    /// `base + segments`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::BadUrl(format!("{} cannot take a path", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// A request to `/console/v1/<segments>` with the token and no overall timeout.
    fn builder(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder, ClientError> {
        let mut full = vec!["console", "v1"];
        full.extend_from_slice(segments);
        let url = self.url(&full)?;
        Ok(self
            .http
            .request(method, url)
            .header(AUTHORIZATION, self.auth.clone()))
    }

    /// A request to `/console/v1/<segments>` with the token and [`REQUEST_TIMEOUT`].
    fn api(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder, ClientError> {
        Ok(self.builder(method, segments)?.timeout(REQUEST_TIMEOUT))
    }

    /// Sends; a non-2xx answer becomes [`ClientError::Api`].
    async fn send(&self, rb: RequestBuilder) -> Result<Response, ClientError> {
        let response = rb.send().await.map_err(transport_error)?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(api_error(response).await)
        }
    }

    /// Sends and decodes a JSON answer.
    async fn json<T: DeserializeOwned>(&self, rb: RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(rb).await?;
        let url = response.url().clone();
        let bytes = response.bytes().await.map_err(transport_error)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Decode(format!(
                "{} answered with JSON of another shape: {e}",
                url.path()
            ))
        })
    }
}

/// Checks and normalises the console's base URL.
pub(crate) fn parse_base_url(raw: &str) -> Result<Url, ClientError> {
    let raw = raw.trim();
    if !raw.contains("://") {
        return Err(ClientError::BadUrl(format!(
            "{raw:?} has no scheme; did you mean http://{raw}?"
        )));
    }
    let url = Url::parse(raw).map_err(|e| ClientError::BadUrl(format!("{raw:?}: {e}")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(ClientError::BadUrl(format!(
                "{raw:?}: unsupported scheme {other:?}; use http:// or https://"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ClientError::BadUrl(format!("{raw:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ClientError::BadUrl(format!(
            "{raw:?}: a base URL has no query or fragment"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ClientError::BadUrl(format!(
            "{raw:?}: credentials in the URL are not used; pass a token instead"
        )));
    }
    Ok(url)
}

/// The error of a non-2xx answer: the API's `{code, message}`, or the status when the body is
/// something else (a proxy's error page).
async fn api_error(response: Response) -> ClientError {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    error_of(status, &body)
}

/// The error a non-2xx `status` with `body` means.
fn error_of(status: StatusCode, body: &[u8]) -> ClientError {
    if status == StatusCode::BAD_REQUEST
        && let Ok(refused) = serde_json::from_slice::<InvalidPolicyBody>(body)
        && refused.code == INVALID_POLICY
    {
        return ClientError::InvalidPolicy {
            message: refused.message,
            errors: refused.errors,
        };
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { code, message }) => ClientError::Api {
            status: status.as_u16(),
            code,
            message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(200).collect();
            let mut message = format!("HTTP {status}");
            if !text.is_empty() {
                message.push_str(": ");
                message.push_str(&text);
            }
            ClientError::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message,
            }
        }
    }
}

/// A request that got no answer: [`ClientError::Certificate`] when the console's certificate
/// did not verify, [`ClientError::Http`] otherwise.
fn transport_error(e: reqwest::Error) -> ClientError {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = next {
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) =
            err.downcast_ref::<rustls::Error>()
        {
            let url = e
                .url()
                .map(|u| format!("{}://{}", u.scheme(), u.authority()))
                .unwrap_or_else(|| "the console".into());
            return ClientError::Certificate(format!(
                "the certificate of {url} does not verify: {tls}; is the CA file the \
                 anchor's ca.pem (or the CA of the console's own certificate), and the URL's \
                 host one of the names the certificate is for?"
            ));
        }
        // rustls' error comes up inside an io::Error, whose `source` skips what it wraps.
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    ClientError::Http(e)
}

/// `cannot connect to http://…: Connection refused (os error 111)`.
fn describe_http(e: &reqwest::Error) -> String {
    let url = e
        .url()
        .map(|u| {
            let mut u = u.clone();
            u.set_query(None);
            u.to_string()
        })
        .unwrap_or_else(|| "the console".into());
    let mut root = std::error::Error::source(e);
    while let Some(next) = root.and_then(std::error::Error::source) {
        root = Some(next);
    }
    let what = if e.is_timeout() {
        format!("timed out talking to {url}")
    } else if e.is_connect() {
        format!("cannot connect to {url}")
    } else if e.is_builder() {
        "cannot build the request".to_string()
    } else {
        format!("request to {url} failed")
    };
    match root {
        Some(root) => format!("{what}: {root}"),
        None => what,
    }
}

// ---------------------------------------------------------------------------------------------
// Server-sent events

/// One server-sent event as it arrived: a block with data (blocks without data are not
/// dispatched, as in a browser).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct SseMessage {
    /// The `event:` field (`message` when absent).
    event: String,
    /// The block's `id:` field.
    id: Option<String>,
    /// The `data:` lines, joined with `\n`.
    data: String,
}

/// Server-sent events from a byte stream, parsed by `sse-stream` (the WHATWG rules: `\n`,
/// `\r\n` or `\r` end a line, a blank line ends an event, `:` starts a comment, one space after
/// the colon is dropped). A line longer than [`MAX_SSE_LINE`] bytes is refused before the parser
/// buffers it. Any error (transport, invalid UTF-8, an endless line) is the last item.
fn sse_messages<S, E>(bytes: S) -> impl Stream<Item = Result<SseMessage, ClientError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<ClientError>,
{
    let mut line = 0usize;
    let guarded = bytes.map(move |chunk| {
        let chunk = chunk.map_err(Into::into)?;
        line = match chunk.iter().rposition(|&b| b == b'\n' || b == b'\r') {
            Some(end) => chunk.len() - end - 1,
            None => line.saturating_add(chunk.len()),
        };
        if line > MAX_SSE_LINE {
            return Err(ClientError::Decode(format!(
                "event stream line longer than {MAX_SSE_LINE} bytes"
            )));
        }
        Ok(chunk)
    });
    // The parser stops at its first error, so an endless line ends the stream.
    sse_stream::SseByteStream::new(guarded).filter_map(|block| {
        std::future::ready(match block {
            Ok(sse_stream::Sse {
                event,
                data: Some(data),
                id,
                ..
            }) => Some(Ok(SseMessage {
                event: event
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "message".into()),
                id,
                data,
            })),
            Ok(_) => None,
            Err(sse_stream::Error::Body(e)) => Some(Err(match e.downcast::<ClientError>() {
                Ok(e) => *e,
                Err(e) => ClientError::Decode(format!("event stream: {e}")),
            })),
            Err(e) => Some(Err(ClientError::Decode(format!("event stream: {e}")))),
        })
    })
}

/// Console events from a byte stream of SSE.
fn decode_events<S, E>(bytes: S) -> impl Stream<Item = Result<Event, ClientError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<ClientError>,
{
    sse_messages(bytes).filter_map(|message| {
        std::future::ready(match message {
            Ok(message) => to_event(message),
            Err(e) => Some(Err(e)),
        })
    })
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        transport_error(e)
    }
}

/// An SSE message as a console event; `None` for `lagged` notices.
fn to_event(message: SseMessage) -> Option<Result<Event, ClientError>> {
    if message.event == "lagged" {
        tracing::warn!(data = %message.data, "the anchor dropped events for this slow subscriber");
        return None;
    }
    Some(serde_json::from_str::<Event>(&message.data).map_err(|e| {
        ClientError::Decode(format!("event {:?} is not an event: {e}", message.event))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message the SSE layer reads from these chunks, then its error if it ended on one.
    async fn parse(chunks: &[&[u8]]) -> (Vec<SseMessage>, Option<ClientError>) {
        let chunks: Vec<Result<Bytes, ClientError>> = chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut items = std::pin::pin!(sse_messages(futures_util::stream::iter(chunks)));
        let mut got = Vec::new();
        while let Some(item) = items.next().await {
            match item {
                Ok(message) => got.push(message),
                Err(e) => return (got, Some(e)),
            }
        }
        (got, None)
    }

    async fn parse_all(chunks: &[&[u8]]) -> Vec<SseMessage> {
        let (got, err) = parse(chunks).await;
        assert!(err.is_none(), "{err:?}");
        got
    }

    #[tokio::test]
    async fn sse_parser_reads_fields_and_skips_comments() {
        let got = parse_all(&[b": connected\n\nevent: presence\nid: 7\ndata: {\"a\":1}\n\n"]).await;
        assert_eq!(
            got,
            vec![SseMessage {
                event: "presence".into(),
                id: Some("7".into()),
                data: "{\"a\":1}".into(),
            }]
        );
    }

    #[tokio::test]
    async fn sse_parser_handles_split_chunks_and_all_line_endings() {
        let got = parse_all(&[
            b"event: a\r",
            b"\ndata: x",
            b"\r\n\r",
            b"\ndata:y\rdata: z\r\r",
        ])
        .await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].event, "a");
        assert_eq!(got[0].data, "x");
        assert_eq!(got[1].event, "message");
        assert_eq!(
            got[1].data, "y\nz",
            "data lines join with newlines; one space dropped"
        );
    }

    #[tokio::test]
    async fn sse_parser_ignores_events_without_data_and_incomplete_tail() {
        let got = parse_all(&[b"event: nothing\n\n:keep-alive\n\ndata: tail"]).await;
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn sse_parser_refuses_endless_lines() {
        let big = vec![b'x'; MAX_SSE_LINE + 1];
        let (got, err) = parse(&[b"data: ok\n\n", &big, b"\n\n"]).await;
        assert_eq!(got.len(), 1, "what came before the endless line is read");
        assert!(
            matches!(&err, Some(ClientError::Decode(m)) if m.contains("longer than")),
            "{err:?}"
        );
        // The limit counts one line across chunks, and a line end resets it.
        let half = vec![b'x'; MAX_SSE_LINE / 2 + 1];
        let (_, err) = parse(&[b"data: ", &half, &half]).await;
        assert!(
            err.is_some(),
            "one line split over chunks is still one line"
        );
        let (got, err) = parse(&[b"data: ", &half, b"\n\ndata: ", &half, b"\n\n"]).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got.len(), 2);
    }

    #[tokio::test]
    async fn a_transport_error_ends_the_stream_as_itself() {
        let chunks: Vec<Result<Bytes, ClientError>> = vec![
            Ok(Bytes::from_static(b"data: a\n\n")),
            Err(ClientError::BadUrl("gone".into())),
            Ok(Bytes::from_static(b"data: b\n\n")),
        ];
        let items: Vec<_> = sse_messages(futures_util::stream::iter(chunks))
            .collect()
            .await;
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0].as_ref().unwrap().data, "a");
        assert!(matches!(items[1], Err(ClientError::BadUrl(_))), "{items:?}");
    }

    #[test]
    fn base_url_validation() {
        assert!(parse_base_url("http://127.0.0.1:7142").is_ok());
        assert!(parse_base_url("http://127.0.0.1:7142/").is_ok());
        assert!(parse_base_url("https://anchor.example").is_ok());
        let no_ca = ControlPlaneClient::new("https://anchor.example", "t").unwrap_err();
        assert!(
            no_ca.to_string().contains("CA certificate to pin"),
            "{no_ca}"
        );
        let bare = parse_base_url("127.0.0.1:7142").unwrap_err();
        assert!(bare.to_string().contains("http://127.0.0.1:7142"), "{bare}");
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("http://x/?a=b").is_err());
    }

    #[test]
    fn urls_are_joined_and_encoded() {
        let c = ControlPlaneClient::new("http://h:1/prefix/", "t").unwrap();
        assert_eq!(
            c.url(&["console", "v1", "devices", "a/b c"])
                .unwrap()
                .as_str(),
            "http://h:1/prefix/console/v1/devices/a%2Fb%20c"
        );
        let c = ControlPlaneClient::new("http://h:1", "t").unwrap();
        assert_eq!(c.url(&["healthz"]).unwrap().as_str(), "http://h:1/healthz");
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(matches!(
            ControlPlaneClient::new("http://h:1", "a\nb"),
            Err(ClientError::BadToken(_))
        ));
        assert!(matches!(
            ControlPlaneClient::new("http://h:1", ""),
            Err(ClientError::BadToken(_))
        ));
        let c = ControlPlaneClient::new("http://h:1", "s3cret").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn decoded_stream_skips_lagged_and_reports_bad_events() {
        let event = Event {
            seq: 3,
            at: time::OffsetDateTime::UNIX_EPOCH,
            kind: "presence".into(),
            device_id: Some(DeviceId::from_bytes([7; 20])),
            data: serde_json::json!({"presence": "online"}),
        };
        let json = serde_json::to_string(&event).unwrap();
        let text = format!(
            ": connected\n\nevent: lagged\ndata: {{\"skipped\":4}}\n\nevent: presence\nid: 3\n\
             data: {json}\n\nevent: junk\ndata: nope\n\n"
        );
        let (a, b) = text.as_bytes().split_at(text.len() / 2);
        let chunks: Vec<Result<Bytes, ClientError>> =
            vec![Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))];
        let items: Vec<_> = decode_events(futures_util::stream::iter(chunks))
            .collect()
            .await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap(), &event);
        assert!(matches!(items[1], Err(ClientError::Decode(_))));
    }
}
