//! The web console: one HTML page, one script and one stylesheet, embedded in the binary and
//! served at `/`, `/assets/app.js` and `/assets/style.css`.
//!
//! The page holds no data: it signs in with a bearer token (kept in the browser's
//! `sessionStorage`, never in a URL) and reads everything from `/console/v1`. So the assets
//! themselves need no token. Every asset carries a strict `Content-Security-Policy` (no inline
//! script or style, no request to another origin, no framing) and `Cache-Control: no-cache`, so
//! a browser revalidates them after the anchor is upgraded.

use axum::Router;
use axum::http::HeaderValue;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page's `Content-Security-Policy`: its own origin only; images may also be `blob:` (the
/// pairing QR code, fetched with the token) and `data:` (the empty favicon).
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'self'; img-src 'self' blob: data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// `index.html`.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// `app.js`.
pub const APP_JS: &str = include_str!("../assets/app.js");

/// `style.css`.
pub const STYLE_CSS: &str = include_str!("../assets/style.css");

/// The routes of the page: `GET /`, `GET /assets/app.js`, `GET /assets/style.css`. No token:
/// the assets hold no data.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
            ),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(INDEX_HTML.contains(r#"src="/assets/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/assets/style.css""#));
        for asset in [INDEX_HTML, APP_JS, STYLE_CSS] {
            // The SVG namespace is a name (for createElementNS), never fetched.
            let asset = asset.replace("'http://www.w3.org/2000/svg'", "");
            for external in ["http://", "https://", "//cdn", "@import"] {
                assert!(
                    !asset.contains(external),
                    "an asset refers to {external:?}: no external request of any kind"
                );
            }
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        // The CSP forbids them; a browser would silently ignore them.
        assert!(!INDEX_HTML.contains("<style"));
        assert!(!INDEX_HTML.contains("style="));
        assert!(
            !has_inline_handler(INDEX_HTML),
            "no inline event handlers (onclick=...)"
        );
        let scripts = INDEX_HTML.matches("<script").count();
        let external = INDEX_HTML.matches("<script src=").count();
        assert_eq!(scripts, external, "every <script> has a src");
    }

    /// Whether `html` has an attribute like ` onclick=`.
    fn has_inline_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.chars().take_while(char::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn the_script_never_writes_html_from_strings() {
        // Device names and the like come from the network: the script builds DOM nodes and
        // sets textContent; it never parses HTML.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}");
        }
        // The token stays in sessionStorage, never in localStorage or a URL.
        assert!(!APP_JS.contains("localStorage"));
    }
}
