//! The registry's HTTP API: shared state, the router, and the layers around it.
//!
//! Handlers live in `registry` (entries) and `health` (health and metrics); this module wires
//! them with the cross-cutting layers: body limit, request timeout, and per-operation metrics.

mod body;
mod error;
mod health;
mod registry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use self::error::ApiError;
use crate::metrics::{RegistryMetrics, outcome};
use crate::store::Store;

/// Everything a handler needs; cheap to clone (all shared behind `Arc`).
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<RegistryMetrics>,
    pub max_body_bytes: usize,
    pub started: Instant,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<RegistryMetrics>, config: &ApiConfig) -> Self {
        AppState {
            store,
            metrics,
            max_body_bytes: config.max_body_bytes,
            started: Instant::now(),
        }
    }
}

pub fn router(state: AppState, config: &ApiConfig) -> Router {
    Router::new()
        .route("/register", post(registry::register))
        .route(
            "/heartbeat",
            post(registry::heartbeat).put(registry::heartbeat),
        )
        .route("/deregister", post(registry::deregister_body))
        .route("/deregister/{name}", delete(registry::deregister_path))
        .route("/services", get(registry::list))
        .route("/services/{name}", get(registry::get_service))
        .route("/discover", get(registry::discover))
        .route("/promote", post(registry::promote))
        .route("/health", get(health::health))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Names the registry operation a route performs, for the metric labels.
fn operation(method: &Method, route: &str) -> Option<&'static str> {
    Some(match (route, method.as_str()) {
        ("/register", _) => "register",
        ("/heartbeat", _) => "heartbeat",
        ("/deregister" | "/deregister/{name}", _) => "deregister",
        ("/services", _) => "list",
        ("/services/{name}", _) => "get",
        ("/discover", _) => "discover",
        ("/promote", _) => "promote",
        _ => return None,
    })
}

/// Counts and times every registry operation by its outcome.
async fn track(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let op = matched.and_then(|m| operation(req.method(), m.as_str()));
    let started = Instant::now();
    let response = next.run(req).await;
    if let Some(op) = op {
        state.metrics.observe(
            op,
            outcome(response.status().as_u16()),
            started.elapsed().as_secs_f64(),
        );
    }
    response
}
