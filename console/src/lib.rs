//! The operator console of Anchorage: HTTP API, access control, client library, `anchorctl`.
//!
//! - [`api`]: the JSON types of `/console/v1` (a contract with scripts: add, never rename).
//! - [`backend`]: the [`Backend`](backend::Backend) trait the anchor implements.
//! - [`error`]: [`ApiError`](error::ApiError), rendered as `{code, message}`.
//! - [`routes`]: the axum router, bearer-token authentication and permission checks.
//! - [`serve`]: the HTTP/1 server in front of the router (timeouts, connection caps, accept
//!   backoff, request head limits, graceful shutdown), plain or over TLS, used by the anchor.
//! - [`client`]: [`ControlPlaneClient`](client::ControlPlaneClient), used by `anchorctl` and tests.
//! - [`cli`]: `anchorctl` itself (arguments, commands, output); the binary only calls it.
//! - [`metrics_layer`]: the `/metrics` formats, the per-route request metrics middleware, and
//!   the router of the separate token-free metrics listener.
//! - [`web`]: the web page served at `/` (HTML, JS and CSS embedded in the binary).
//!
//! The REST API and the CLI are documented for operators in `docs/console.md`.

pub mod api;
pub mod backend;
pub mod cli;
pub mod client;
pub mod error;
pub mod metrics_layer;
pub mod routes;
pub mod serve;
pub mod web;

pub use backend::Backend;
pub use client::{CaCertificates, ClientError, ControlPlaneClient};
pub use error::ApiError;
pub use metrics_layer::MetricsFormat;
pub use routes::{RouterOptions, router, router_with_options};
pub use serve::{ServeOptions, serve, serve_tls};
