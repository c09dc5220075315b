//! The gateway's one error type and its mapping to responses.
//!
//! Like pingora's errors, each says where it came from (the caller, the upstream service, or
//! the gateway itself) and whether retrying the request is safe, both in the JSON body and in
//! the `kind` label of `gateway_errors_total`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller sent something unusable.
    Downstream,
    /// The service behind the gateway failed.
    Upstream,
    /// The gateway could not find where to send the request.
    Gateway,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Gateway => "gateway",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("service {service} has no known instance (tried: {tried})")]
    NoInstance { service: String, tried: String },
    #[error("could not connect to {service} at {upstream}: {detail}")]
    Connect {
        service: String,
        upstream: String,
        detail: String,
    },
    #[error("{service} at {upstream} sent no response headers within {after_ms} ms")]
    Timeout {
        service: String,
        upstream: String,
        after_ms: u128,
    },
    #[error("{service} at {upstream} failed mid-request: {detail}")]
    Upstream {
        service: String,
        upstream: String,
        detail: String,
    },
}

impl GatewayError {
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::PayloadTooLarge(_) => "payload_too_large",
            GatewayError::NoInstance { .. } => "no_instance",
            GatewayError::Connect { .. } => "upstream_connect",
            GatewayError::Timeout { .. } => "upstream_timeout",
            GatewayError::Upstream { .. } => "upstream_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::NoInstance { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Connect { .. } | GatewayError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn side(&self) -> Side {
        match self {
            GatewayError::BadRequest(_) | GatewayError::PayloadTooLarge(_) => Side::Downstream,
            GatewayError::NoInstance { .. } => Side::Gateway,
            GatewayError::Connect { .. }
            | GatewayError::Timeout { .. }
            | GatewayError::Upstream { .. } => Side::Upstream,
        }
    }

    /// Whether the caller may resend the request as is: true only when the upstream cannot
    /// have seen it.
    fn retry_safe(&self) -> bool {
        matches!(
            self,
            GatewayError::NoInstance { .. } | GatewayError::Connect { .. }
        )
    }

    fn service(&self) -> Option<&str> {
        match self {
            GatewayError::NoInstance { service, .. }
            | GatewayError::Connect { service, .. }
            | GatewayError::Timeout { service, .. }
            | GatewayError::Upstream { service, .. } => Some(service),
            _ => None,
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(kind = self.kind(), error = %self, "gateway error");
        }
        let body = json!({
            "error": self.kind(),
            "detail": self.to_string(),
            "service": self.service(),
            "source": self.side().as_str(),
            "retry_safe": self.retry_safe(),
        });
        (status, Json(body)).into_response()
    }
}
