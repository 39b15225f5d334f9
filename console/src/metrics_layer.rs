//! The console's side of the anchor's metrics: which exposition format a scraper asked for,
//! a middleware that times every request by route, and the token-free `/metrics` router of
//! the separate metrics listener.
//!
//! The console does not own the anchor's metrics: the middleware hands each answered request
//! to [`Backend::http_request`] as an [`HttpObservation`], and the backend counts it. Its
//! route is axum's [`MatchedPath`] template (`/console/v1/devices/{id}`), never the raw path,
//! and requests no route matched are [`UNMATCHED_ROUTE`], so the labels stay bounded whatever
//! clients send.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::backend::Backend;
// Defined with the backend that receives them; named here too.
pub use crate::backend::{HttpObservation, MetricsFormat};

/// The `route` of requests no route matched (unknown paths answered 404).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl MetricsFormat {
    /// The format an `Accept` header asks for: OpenMetrics when it lists
    /// `application/openmetrics-text` with a quality at least that of plain text (as
    /// Prometheus' own scrapes do), else Prometheus text.
    pub fn negotiate(headers: &HeaderMap) -> MetricsFormat {
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for value in headers.get_all(ACCEPT) {
            let Ok(value) = value.to_str() else { continue };
            for range in value.split(',') {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default().to_ascii_lowercase();
                let q = parts
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                    .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                    .unwrap_or(1.0)
                    .clamp(0.0, 1.0);
                match media.as_str() {
                    "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                    "text/plain" | "text/*" | "*/*" => text = text.max(q),
                    _ => {}
                }
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            MetricsFormat::OpenMetrics
        } else {
            MetricsFormat::Prometheus
        }
    }

    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::Prometheus => PROMETHEUS_CONTENT_TYPE,
            MetricsFormat::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// The method as a bounded label value.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The middleware (for `Router::layer`, so the route is matched when it runs): hands every
/// answered request to the backend's [`Backend::http_request`].
pub async fn record<B: Backend>(
    State(backend): State<Arc<B>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    backend.http_request(&HttpObservation {
        route: route.as_deref().unwrap_or(UNMATCHED_ROUTE),
        method,
        status: response.status().as_u16(),
        seconds: started.elapsed().as_secs_f64(),
    });
    response
}

/// The router of the separate metrics listener: `GET /metrics` without a token, in the
/// format the scraper asks for; every other path is 404.
pub fn public_router<B: Backend>(backend: Arc<B>) -> Router {
    Router::new()
        .route("/metrics", get(public_metrics::<B>))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn_with_state(backend.clone(), record::<B>))
        .with_state(backend)
}

async fn public_metrics<B: Backend>(State(backend): State<Arc<B>>, headers: HeaderMap) -> Response {
    let format = MetricsFormat::negotiate(&headers);
    exposition(format, backend.metrics(format).await)
}

/// An exposition answered with its content type.
pub fn exposition(format: MetricsFormat, text: String) -> Response {
    ([(CONTENT_TYPE, format.content_type())], text).into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn accept(v: &str) -> MetricsFormat {
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT,
            HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
        );
        MetricsFormat::negotiate(&h)
    }

    #[test]
    fn openmetrics_only_when_preferred() {
        assert_eq!(
            MetricsFormat::negotiate(&HeaderMap::new()),
            MetricsFormat::Prometheus
        );
        assert_eq!(accept("*/*"), MetricsFormat::Prometheus);
        assert_eq!(
            accept("text/plain;version=0.0.4"),
            MetricsFormat::Prometheus
        );
        assert_eq!(
            accept("application/openmetrics-text; version=1.0.0"),
            MetricsFormat::OpenMetrics
        );
        // What Prometheus sends by default.
        assert_eq!(
            accept(
                "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ),
            MetricsFormat::OpenMetrics
        );
        assert_eq!(
            accept("application/openmetrics-text;q=0.2,text/plain;q=0.9"),
            MetricsFormat::Prometheus
        );
        assert_eq!(
            accept("application/openmetrics-text;q=0"),
            MetricsFormat::Prometheus
        );
    }
}
