//! Errors of the Batch API in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
//! so the official clients raise their own exception types (401 → AuthenticationError, 404 →
//! NotFoundError, 400 → BadRequestError…). Every handler returns these.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`…
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Self {
        Self { status, message: message.into(), kind, param: param.map(str::to_string), code: code.map(str::to_string) }
    }

    /// 400: the request is wrong; `param` names the field.
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message, param, Some(code))
    }

    /// 401: no key, or a key this server does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message, None, Some("invalid_api_key"))
    }

    /// 404: no such object for this tenant (another tenant's objects are not found either).
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No such {what} object: {id}"), Some("id"), Some("not_found"))
    }

    /// 404 for a route this server does not have.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {method} {path}"),
            None,
            Some("unknown_url"),
        )
    }

    /// 409: the object is in a state that does not allow this.
    pub fn conflict(message: impl Into<String>, code: &str) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message, None, Some(code))
    }

    /// 413: an upload larger than the tenant may store.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message, Some("file"), Some("file_too_large"))
    }

    /// 429: a per-tenant limit on concurrent work.
    pub fn limit(message: impl Into<String>, code: &str) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message, None, Some(code))
    }

    /// 500: the server failed; the message says what it was doing.
    pub fn internal(context: impl std::fmt::Display) -> Self {
        tracing::error!("{context}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", context.to_string(), None, Some("internal_error"))
    }
}

/// axum's own rejections (a body over the limit, a bad query string, a body that is not
/// multipart) in OpenAI's shape, keeping their status.
impl<R: axum::response::IntoResponse + std::fmt::Display> From<Rejection<R>> for ApiError {
    fn from(Rejection(r): Rejection<R>) -> Self {
        let message = r.to_string();
        let status = r.into_response().status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_request" };
        Self::new(status, "invalid_request_error", message, None, Some(code))
    }
}

/// Wraps an axum rejection for the conversion above.
pub struct Rejection<R>(pub R);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}
