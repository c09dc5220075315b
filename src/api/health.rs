//! `/health` and `/metrics`: what the load balancer and Prometheus ask.
//!
//! `/health` answers 503 when the store cannot be reached, so that nginx and orchestrators take
//! a replica that cannot serve out of rotation: readiness means a store round trip succeeded.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::AppState;

pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let backend = state.store.backend();
    let ping = state.store.ping().await;
    let active = match &ping {
        Ok(_) => state.store.service_names().await.ok().map(|n| n.len()),
        Err(_) => None,
    };
    if let Some(n) = active {
        state
            .metrics
            .active_services
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let (status, code, component) = match &ping {
        Ok(latency) => (
            "healthy",
            StatusCode::OK,
            json!({"status": "up", "latency_ms": latency.as_secs_f64() * 1000.0}),
        ),
        Err(e) => (
            "unhealthy",
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "down", "error": e.to_string()}),
        ),
    };
    let mut components = serde_json::Map::new();
    components.insert(backend.to_string(), component);
    (
        code,
        Json(json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "backend": backend,
            "components": components,
            "active_services": active,
            "uptime_s": state.started.elapsed().as_secs(),
        })),
    )
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(names) = state.store.service_names().await {
        state
            .metrics
            .active_services
            .set(i64::try_from(names.len()).unwrap_or(i64::MAX));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
