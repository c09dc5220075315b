//! The HTTP layer on the in-memory store, driven through the router without sockets, with
//! tokio's clock paused so TTL behaviour is checked exactly and instantly.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rollcall::api::{ApiConfig, AppState, router};
use rollcall::metrics::RegistryMetrics;
use rollcall::registry::{Registry, ResilienceConfig};
use rollcall::store::MemoryStore;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api(axum::Router);

impl Api {
    fn new() -> Api {
        let config = ApiConfig::default();
        let metrics = Arc::new(RegistryMetrics::new().expect("metrics"));
        let registry = Registry::new(
            Arc::new(MemoryStore::new()),
            ResilienceConfig::default(),
            metrics.clone(),
        );
        let state = AppState::new(registry, metrics, &config);
        Api(router(state, &config))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        let resp = self.0.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn ttl_counts_from_the_last_heartbeat() {
    let api = Api::new();
    let (status, _) = api
        .call(
            "POST",
            "/register",
            Some(json!({"service_name": "a", "endpoint": "http://a:1", "ttl_s": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    tokio::time::advance(Duration::from_secs(25)).await;
    let (status, _) = api
        .call("POST", "/heartbeat", Some(json!({"service_name": "a"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = api.call("GET", "/services/a", None).await;
    assert_eq!(body["ttl_remaining"], 30);

    tokio::time::advance(Duration::from_secs(29)).await;
    let (status, body) = api.call("GET", "/services/a", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ttl_remaining"], 1);

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        api.call("GET", "/services/a", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.call("GET", "/services", None).await.1, json!([]));
    let (status, body) = api
        .call("POST", "/heartbeat", Some(json!({"service_name": "a"})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("register again")),
        "{body}"
    );
}

#[tokio::test]
async fn representative_instance_prefers_healthy_ones() {
    let api = Api::new();
    for (id, status) in [("one", "degraded"), ("two", "ok")] {
        api.call(
            "POST",
            "/register",
            Some(json!({"name": "svc", "url": format!("http://{id}:80"), "instance_id": id})),
        )
        .await;
        api.call(
            "POST",
            "/heartbeat",
            Some(json!({"service_id": format!("svc/{id}"), "status": status})),
        )
        .await;
    }
    api.call(
        "POST",
        "/heartbeat",
        Some(json!({"service_id": "svc/one", "status": "degraded"})),
    )
    .await;
    let (_, body) = api.call("GET", "/services/svc", None).await;
    assert_eq!(body["instance_id"], "two", "{body}");
    assert_eq!(body["instances"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn health_names_the_memory_backend() {
    let api = Api::new();
    let (status, body) = api.call("GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["backend"], "memory");
    assert_eq!(body["components"]["memory"]["status"], "up");
}

#[tokio::test]
async fn oversized_body_is_413_json() {
    let api = Api::new();
    let big = json!({"service_name": "a", "endpoint": "http://a:1", "metadata": {"k": "x".repeat(80_000)}});
    let (status, body) = api.call("POST", "/register", Some(big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "payload_too_large");
    assert_eq!(api.call("GET", "/services", None).await.1, json!([]));
}
