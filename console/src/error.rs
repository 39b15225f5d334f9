//! The console's one error type, rendered as `{code, message}` JSON with a stable code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// The JSON body of every error response: `{code, message}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine code, e.g. `unauthorized`, `forbidden`, `not_found`.
    pub code: String,
    /// Human-readable message (never internals).
    pub message: String,
}

/// An error answered by the console API.
///
/// Internal errors are logged where they happen and shown only as `internal`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine code.
    pub code: &'static str,
    /// Message for people.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401: no or unknown token.
    pub fn unauthorized() -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }

    /// 403: the token lacks `permission`.
    pub fn forbidden(permission: impl std::fmt::Display) -> ApiError {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token lacks the {permission} permission"),
        )
    }

    /// 403: the token's scope (selector or capability patterns) does not cover the request;
    /// `message` says which rule refused it.
    pub fn out_of_scope(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "out_of_scope", message)
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 409: the request conflicts with the current state.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 410: the thing expired.
    pub fn gone(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::GONE, "expired", message)
    }

    /// 414: the request target is longer than the console reads.
    pub fn uri_too_long(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::URI_TOO_LONG, "uri_too_long", message)
    }

    /// 431: too many header lines, or a header section larger than the console reads.
    pub fn headers_too_large(message: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            message,
        )
    }

    /// 400: a free-text field is longer than `limit` characters. The message names the field
    /// and the limit.
    pub fn text_too_long(field: &str, chars: usize, limit: usize) -> ApiError {
        Self::bad_request(format!(
            "`{field}` is {chars} characters long; at most {limit} are allowed"
        ))
    }

    /// 503: shutting down or overloaded.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 500. Log the cause before returning this; it is not shown.
    pub fn internal() -> ApiError {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the anchor's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

/// Why `PUT /console/v1/policy` failed: the file has errors (400 `invalid_policy` with every
/// error and its line), or anything else an [`ApiError`] says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetPolicyError {
    /// The file has errors; nothing was changed.
    #[error("the policy has {} error(s)", .0.len())]
    Invalid(Vec<PolicyProblem>),
    /// Another failure.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl IntoResponse for SetPolicyError {
    fn into_response(self) -> Response {
        match self {
            SetPolicyError::Invalid(errors) => {
                let body = InvalidPolicyBody {
                    code: INVALID_POLICY.to_string(),
                    message: match errors.len() {
                        1 => "the policy has 1 error; nothing was changed".to_string(),
                        n => format!("the policy has {n} errors; nothing was changed"),
                    },
                    errors,
                };
                (StatusCode::BAD_REQUEST, Json(body)).into_response()
            }
            SetPolicyError::Api(e) => e.into_response(),
        }
    }
}

/// Something wrong in a policy file, where it is (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyProblem {
    /// Line.
    pub line: usize,
    /// Column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// The body of a refused `PUT /console/v1/policy` (400): `{code: "invalid_policy", message,
/// errors}`. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidPolicyBody {
    /// Always `invalid_policy`.
    pub code: String,
    /// For people: how many errors.
    pub message: String,
    /// Every error found, in file order.
    pub errors: Vec<PolicyProblem>,
}

/// The error code of a policy file with errors.
pub const INVALID_POLICY: &str = "invalid_policy";
