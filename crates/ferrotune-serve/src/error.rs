//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status, so client libraries raise their usual exception types
//! (`BadRequestError`, `AuthenticationError`, `NotFoundError`, `RateLimitError`...).
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// One failed request: what the client is told.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`,
    /// `server_error`...
    pub kind: &'static str,
    /// The request field at fault, where there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    /// 400: the request is malformed or a value is out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        )
    }

    /// 400 naming the field at fault (message prefixed with it, `param` set).
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::bad_request(format!("{field}: {message}")).param(field)
    }

    /// 401: missing or wrong API key (OpenAI's code `invalid_api_key`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            message.into(),
        )
        .code("invalid_api_key")
    }

    /// 403: the request is understood but not allowed (an adapter path outside
    /// `--adapter-dir`, runtime loading switched off).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message.into())
            .code("permission_denied")
    }

    /// 404 for an unknown `model` (or `base:ADAPTER`).
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            message.into(),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 404 for a path the server does not have.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {method} {path}"),
        )
        .code("unknown_url")
    }

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("method {method} is not allowed on {path}"),
        )
        .code("method_not_allowed")
    }

    /// 409: the request conflicts with the server's state (adapter name taken or in use).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            message.into(),
        )
        .code("conflict")
    }

    /// 408: the body did not arrive within `--body-timeout`.
    pub fn body_timeout(t: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {} s (--body-timeout)",
                t.as_secs_f64()
            ),
        )
        .code("request_timeout")
    }

    /// 413: the body is over `--max-body`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than this server's limit of {limit} bytes (--max-body)"
            ),
        )
        .code("request_too_large")
    }

    /// 429: every slot is busy and the queue is full.
    pub fn queue_full(retry_after_s: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is at capacity (every sequence slot busy, queue full); retry after {retry_after_s} s"
            ),
        )
        .code("rate_limit_exceeded");
        e.retry_after = Some(retry_after_s);
        e
    }

    /// 503: shutting down (new requests are refused while in-flight ones finish).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            message.into(),
        )
        .code("service_unavailable")
    }

    /// 504: the request ran past the server's `--timeout` without the scheduler ending it.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "server_error", message.into()).code("timeout")
    }

    /// 500: the model failed while generating.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message.into(),
        )
    }

    /// The JSON body (also sent as an SSE event when a stream fails half-way).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = crate::json_response(self.status, &self.body());
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// A client's string as an error message quotes it: at most 100 characters (a 100 KB model
/// name is not sent back whole).
pub fn quoted(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()),
        None => s.to_string(),
    }
}
