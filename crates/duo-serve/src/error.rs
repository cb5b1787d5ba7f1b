//! The error type of `duo-serve`: every failure a client can see, as the OpenAI error
//! object `{"error": {"message", "type", "param", "code"}}` with its HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use duo_engine::EngineError;

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ServeError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// The request field concerned, if one.
    pub param: Option<String>,
    /// A stable code for machines.
    pub code: Option<&'static str>,
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ServeError>;

impl ServeError {
    /// 400 naming the parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: Some(param.into()), code: Some("invalid_parameter") }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>, code: &'static str) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: Some(code) }
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or invalid API key (send `Authorization: Bearer KEY`)".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), kind: "invalid_request_error", param: None, code: Some(code) }
    }

    /// 408: the body did not arrive in time.
    pub fn timeout(after: std::time::Duration) -> Self {
        let mut e = Self::bad_request(format!("the request body did not arrive within {:.0} s", after.as_secs_f64()), "request_timeout");
        e.status = StatusCode::REQUEST_TIMEOUT;
        e
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// 429.
    pub fn queue_full(waiting: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("the server is busy: {waiting} requests are waiting; retry later"),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    /// 503 while the model loads.
    pub fn loading() -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: "the model is still loading".into(), kind: "service_unavailable", param: None, code: Some("loading") }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<EngineError> for ServeError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::InvalidParameter { name, reason } => Self::invalid(name, format!("invalid `{name}`: {reason}")),
            EngineError::ContextLength { prompt, max_tokens, context } => Self {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "this model's maximum context length is {context} tokens, but {} tokens were requested ({prompt} in the prompt, {max_tokens} for the completion)",
                    prompt + max_tokens
                ),
                kind: "invalid_request_error",
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            },
            EngineError::KvBudget { .. } => Self::bad_request(e.to_string(), "kv_budget_exceeded"),
            EngineError::QueueFull { waiting } => Self::queue_full(*waiting),
            _ => Self::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}
