//! `/health` and `/metrics`: what the load balancer, orchestrators and Prometheus ask.
//!
//! `/health` pings the store itself (not through the breaker) so it says what is true now:
//! - `healthy` (200): the store answers and the breaker is closed;
//! - `degraded` (200): the store answers but the breaker has not closed yet, or the store is
//!   unreachable and reads are being served from the fallback cache;
//! - `unhealthy` (503): the store is unreachable and there is nothing cached to serve.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::AppState;
use crate::breaker::BreakerState;

pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let registry = &state.registry;
    let backend = registry.backend();
    let ping = registry.ping().await;
    let breaker = registry.breaker();
    let cache_entries = registry.cache_entries();
    let active = match &ping {
        Ok(_) => registry
            .service_names()
            .await
            .ok()
            .filter(|r| r.stale_age.is_none())
            .map(|r| r.value.len()),
        Err(_) => None,
    };
    if let Some(n) = active {
        state
            .metrics
            .active_services
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let (status, code) = match (&ping, breaker.state) {
        (Ok(_), BreakerState::Closed) => ("healthy", StatusCode::OK),
        (Ok(_), _) => ("degraded", StatusCode::OK),
        (Err(_), _) if cache_entries > 0 => ("degraded", StatusCode::OK),
        (Err(_), _) => ("unhealthy", StatusCode::SERVICE_UNAVAILABLE),
    };
    let mut component = match &ping {
        Ok(latency) => json!({"status": "up", "latency_ms": latency.as_secs_f64() * 1000.0}),
        Err(e) => json!({"status": "down", "error": e.to_string()}),
    };
    component["circuit_breaker"] = json!({
        "state": breaker.state.as_str(),
        "failures": breaker.failures,
        "threshold": registry.breaker_threshold(),
        "retry_in_ms": breaker.retry_in.map(|d| d.as_millis()),
    });
    if let Some(master) = registry.master() {
        component["master"] = json!(master);
    }
    let mut components = serde_json::Map::new();
    components.insert(backend.to_string(), component);
    components.insert(
        "cache".into(),
        json!({
            "status": "up",
            "entries": cache_entries,
            "max_stale_s": registry.stale_max_age().as_secs(),
        }),
    );
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
    state.registry.refresh_gauges().await;
    state
        .metrics
        .cache_entries
        .set(i64::try_from(state.registry.cache_entries()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
