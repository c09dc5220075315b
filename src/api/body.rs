//! A JSON body extractor whose errors name the offending field.
//!
//! axum's `Json` answers type errors with a plain-text 422 that does not say which field is
//! wrong, and ignores the body limit's 413 shape. This reads the (size-limited) bytes itself,
//! deserializes with `serde_path_to_error`, and turns every failure into an `ApiError`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::error::Category;

use super::AppState;
use super::error::ApiError;
use crate::validate::FieldError;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.max_body_bytes)
            } else {
                ApiError::Malformed(rejection.body_text())
            }
        })?;
        parse(&bytes).map(JsonBody)
    }
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Malformed(
            "the body is empty; expected a JSON object".into(),
        ));
    }
    // serde would also read a struct from a JSON array, by position; no client means that.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') && serde_json::from_slice::<IgnoredAny>(bytes).is_ok() {
        return Err(ApiError::Invalid(FieldError::new(
            "body",
            "must be a JSON object",
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            Category::Data => {
                let field = if path == "." {
                    "body".to_string()
                } else {
                    path
                };
                ApiError::Invalid(FieldError::new(field, inner.to_string()))
            }
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::Malformed(inner.to_string())
            }
        }
    })?;
    de.end().map_err(|e| ApiError::Malformed(e.to_string()))?;
    Ok(value)
}
