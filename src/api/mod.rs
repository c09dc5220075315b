//! The registry's HTTP API: shared state, the router, and the layers around it.
//!
//! Handlers live in `entries` (the registry's entries) and `health` (health and metrics); this module wires
//! them with the cross-cutting layers: body limit, request timeout, and per-operation metrics.

mod body;
mod entries;
mod error;
mod health;

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
use crate::registry::Registry;

/// Everything a handler needs; cheap to clone (all shared behind `Arc`).
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
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
    pub fn new(registry: Arc<Registry>, metrics: Arc<RegistryMetrics>, config: &ApiConfig) -> Self {
        AppState {
            registry,
            metrics,
            max_body_bytes: config.max_body_bytes,
            started: Instant::now(),
        }
    }
}

pub fn router(state: AppState, config: &ApiConfig) -> Router {
    Router::new()
        .route("/register", post(entries::register))
        .route(
            "/heartbeat",
            post(entries::heartbeat).put(entries::heartbeat),
        )
        .route("/deregister", post(entries::deregister_body))
        .route("/deregister/{name}", delete(entries::deregister_path))
        .route("/services", get(entries::list))
        .route("/services/{name}", get(entries::get_service))
        .route("/discover", get(entries::discover))
        .route("/promote", post(entries::promote))
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
