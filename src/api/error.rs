//! The registry API's one error type and its mapping to HTTP responses.
//!
//! Every handler returns `Result<_, ApiError>`, so the status code, the JSON shape
//! (`{error, detail, field?}`) and the `Retry-After` header are decided here and nowhere else.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;
use crate::validate::FieldError;

/// How long clients should wait before retrying, unless the breaker knows better.
pub const RETRY_AFTER_S: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all (syntax error, empty, truncated).
    #[error("malformed JSON body: {0}")]
    Malformed(String),
    /// The JSON is well-formed but a field has the wrong type or an invalid value.
    #[error("invalid field {0}")]
    Invalid(FieldError),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The store cannot serve the request now; the client may retry after `retry_after_s`.
    #[error("{detail}")]
    Unavailable {
        code: &'static str,
        detail: String,
        retry_after_s: u64,
    },
    /// A bug or foreign data in the store; never caused by the request itself.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "malformed_json",
            ApiError::Invalid(_) => "invalid_field",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unavailable { code, .. } => code,
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => ApiError::Unavailable {
                code: "store_unavailable",
                detail: format!(
                    "the registry store is unreachable; nothing was changed, retry later ({detail})"
                ),
                retry_after_s: RETRY_AFTER_S,
            },
            StoreError::CircuitOpen { retry_in } => ApiError::Unavailable {
                code: "store_unavailable",
                detail: format!(
                    "the registry store is unreachable (circuit breaker open); nothing was \
                     changed, retry in {} ms",
                    retry_in.as_millis()
                ),
                retry_after_s: u64::try_from(retry_in.as_millis().div_ceil(1000))
                    .unwrap_or(u64::MAX)
                    .max(1),
            },
            StoreError::FailoverInProgress { .. } => ApiError::Unavailable {
                code: "failover_in_progress",
                detail: e.to_string(),
                retry_after_s: RETRY_AFTER_S,
            },
            StoreError::NotReplicated(detail) => ApiError::Unavailable {
                code: "not_replicated",
                detail,
                retry_after_s: RETRY_AFTER_S,
            },
            StoreError::Corrupt(detail) => ApiError::Internal(detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Unavailable { detail, .. } => tracing::warn!(%detail, "store unavailable"),
            ApiError::Internal(d) => tracing::error!(detail = %d, "internal error"),
            _ => {}
        }
        let body = match &self {
            ApiError::Invalid(f) => json!({
                "error": self.code(),
                "field": f.field,
                "detail": format!("`{}` {}", f.field, f.reason),
            }),
            _ => json!({"error": self.code(), "detail": self.to_string()}),
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::Unavailable { retry_after_s, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}
