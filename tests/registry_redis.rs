//! The registry API against a real Redis: the replaced registry's walk-through, the PAS
//! registration, several instances, TTL expiry, replicas sharing one Redis, and bad input.

mod common;

use std::time::Duration;

use common::{Cluster, eventually};
use serde_json::{Value, json};

const LEGACY: &str = r#"{"service_name": "osint_service", "endpoint": "http://osint:8049",
    "health_endpoint": "/health", "metadata": {"version": "1.2"}}"#;

#[tokio::test]
async fn legacy_client_walkthrough() {
    let c = Cluster::start(1).await;

    let (status, body) = c.post(0, "/register", LEGACY).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["service_name"], "osint_service");
    assert_eq!(body["instance_id"], "osint:8049");
    assert_eq!(body["ttl_s"], 60);

    let (status, body) = c.get(0, "/services").await;
    assert_eq!((status, body), (200, json!(["osint_service"])));

    let (status, body) = c.get(0, "/services/osint_service").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["endpoint"], "http://osint:8049");
    assert_eq!(body["health_endpoint"], "/health");
    assert_eq!(body["metadata"], json!({"version": "1.2"}));
    assert!(body["registered_at"].is_string());
    assert!(body["last_heartbeat"].is_string());
    let ttl = body["ttl_remaining"]
        .as_u64()
        .expect("ttl_remaining is a number");
    assert!((55..=60).contains(&ttl), "ttl_remaining {ttl}");
    assert_eq!(body["instances"].as_array().map(Vec::len), Some(1));

    let (status, body) = c
        .post(0, "/heartbeat", r#"{"service_name": "osint_service"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instances_refreshed"], 1);

    let (status, body) = c.delete(0, "/deregister/osint_service").await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = c.get(0, "/services/osint_service").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_found");
    let (status, _) = c
        .post(0, "/heartbeat", r#"{"service_name": "osint_service"}"#)
        .await;
    assert_eq!(
        status, 404,
        "a heartbeat for a gone service tells the client to re-register"
    );
    let (status, _) = c.delete(0, "/deregister/osint_service").await;
    assert_eq!(status, 404);
    assert_eq!(c.get(0, "/services").await, (200, json!([])));
}

#[tokio::test]
async fn pas_registration_discovery_heartbeat_and_promotion() {
    let c = Cluster::start(1).await;
    let (status, body) = c
        .post(
            0,
            "/register",
            r#"{"name": "test-service", "type": "model", "role": "experimental",
                "url": "http://127.0.0.1:8888", "caps": ["infer"], "ctx_limit": 32768,
                "heartbeat_interval_s": 60, "ttl_s": 90, "labels": {"zone": "eu"}}"#,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let service_id = body["service_id"].as_str().expect("service_id").to_string();
    c.post(
        0,
        "/register",
        r#"{"name": "tool-a", "type": "tool", "role": "production", "url": "http://10.0.0.9:80", "caps": ["search"]}"#,
    )
    .await;

    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_string())
            .collect()
    };
    for (query, expected) in [
        ("/discover?name=test-service", vec!["test-service"]),
        (
            "/discover?type=model&role=experimental",
            vec!["test-service"],
        ),
        ("/discover?cap=infer", vec!["test-service"]),
        ("/discover?label=zone:eu", vec!["test-service"]),
        ("/discover?type=tool", vec!["tool-a"]),
        ("/discover?type=model&role=production", vec![]),
        ("/discover?cap=infer&cap=search", vec![]),
        ("/discover?status=ok", vec!["test-service", "tool-a"]),
    ] {
        let (status, body) = c.get(0, query).await;
        assert_eq!(status, 200, "{query}: {body}");
        let mut got = names(&body);
        got.sort();
        assert_eq!(got, expected, "{query}");
    }
    let (_, found) = c.get(0, "/discover?name=test-service").await;
    assert_eq!(found[0]["url"], "http://127.0.0.1:8888");
    assert_eq!(found[0]["ttl_s"], 90);

    let (status, body) = c
        .send(
            0,
            reqwest::Method::PUT,
            "/heartbeat",
            Some(
                &json!({"service_id": service_id, "status": "degraded", "p95_ms": 123.4,
                        "queue_depth": 2, "load": 0.35})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, found) = c.get(0, "/discover?status=degraded").await;
    assert_eq!(names(&found), vec!["test-service"]);
    assert_eq!(found[0]["p95_ms"], 123.4);
    assert_eq!(found[0]["queue_depth"], 2);
    assert_eq!(found[0]["load"], 0.35);

    let (status, body) = c
        .post(
            0,
            "/promote",
            r#"{"service_name": "test-service", "role": "production"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, found) = c.get(0, "/discover?type=model&role=production").await;
    assert_eq!(names(&found), vec!["test-service"]);

    let (status, _) = c
        .post(
            0,
            "/deregister",
            &json!({"service_id": service_id}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    let (_, found) = c.get(0, "/discover?type=model").await;
    assert!(names(&found).is_empty());
}

#[tokio::test]
async fn several_instances_of_one_service() {
    let c = Cluster::start(1).await;
    for port in [8001, 8002] {
        let (status, body) = c
            .post(
                0,
                "/register",
                &json!({"service_name": "api", "endpoint": format!("http://api:{port}")})
                    .to_string(),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Re-registering the same endpoint is an upsert, not a third instance.
    let (status, body) = c
        .post(
            0,
            "/register",
            r#"{"service_name": "api", "endpoint": "http://api:8001"}"#,
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(body["created"], false);

    let (_, body) = c.get(0, "/services/api").await;
    let mut ids: Vec<&str> = body["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["instance_id"].as_str().expect("id"))
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["api:8001", "api:8002"]);

    let (status, _) = c
        .post(
            0,
            "/heartbeat",
            r#"{"service_name": "api", "instance_id": "api:8002"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = c
        .post(
            0,
            "/heartbeat",
            r#"{"service_name": "api", "instance_id": "api:9999"}"#,
        )
        .await;
    assert_eq!(status, 404);

    let (status, body) = c.delete(0, "/deregister/api?instance_id=api:8001").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = c.get(0, "/services/api").await;
    assert_eq!(body["instance_id"], "api:8002");
    assert_eq!(body["instances"].as_array().map(Vec::len), Some(1));

    c.post(
        0,
        "/register",
        r#"{"service_name": "api", "endpoint": "http://api:8003"}"#,
    )
    .await;
    let (status, body) = c.delete(0, "/deregister/api").await;
    assert_eq!(status, 200);
    assert_eq!(body["instances_removed"], 2);
    assert_eq!(c.get(0, "/services/api").await.0, 404);
}

#[tokio::test]
async fn entries_expire_by_ttl_and_leave_no_keys_behind() {
    let c = Cluster::start(1).await;
    let (status, _) = c
        .post(
            0,
            "/register",
            r#"{"service_name": "short", "endpoint": "http://s:1", "ttl_s": 1}"#,
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = c
        .post(
            0,
            "/register",
            r#"{"service_name": "kept", "endpoint": "http://k:1", "ttl_s": 2}"#,
        )
        .await;
    assert_eq!(status, 201);

    // "kept" heartbeats well within its TTL; "short" does not.
    let gone = eventually(Duration::from_secs(6), || async {
        let hb = c.post(0, "/heartbeat", r#"{"service_name": "kept"}"#).await;
        assert_eq!(
            hb.0, 200,
            "kept must stay alive while it heartbeats: {}",
            hb.1
        );
        c.get(0, "/services/short").await.0 == 404
    })
    .await;
    assert!(
        gone,
        "an instance with ttl_s=1 must vanish within a few seconds"
    );
    assert_eq!(c.get(0, "/services").await, (200, json!(["kept"])));
    let (status, _) = c
        .post(0, "/heartbeat", r#"{"service_name": "short"}"#)
        .await;
    assert_eq!(
        status, 404,
        "the heartbeat of an expired instance answers 404"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        let text = common::fetch_text(&c.http, &c.url(0, "/metrics")).await;
        text.lines().any(|l| l == "registry_expirations_total 1")
    })
    .await;
    assert!(
        counted,
        "the expiry is counted in registry_expirations_total"
    );

    let (status, _) = c.delete(0, "/deregister/kept").await;
    assert_eq!(status, 200);
    // Redis expires the instance hash itself; the indexes must not keep stale members.
    let dump = c.redis_dump().await;
    assert!(
        dump.keys().all(|k| k == "rollcall:names"),
        "only the (pruned) names index may remain: {:?}",
        dump.keys().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn replicas_sharing_redis_see_each_others_writes_at_once() {
    let c = Cluster::start(2).await;
    let (status, _) = c.post(0, "/register", LEGACY).await;
    assert_eq!(status, 201);
    let (status, body) = c.get(1, "/services/osint_service").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["endpoint"], "http://osint:8049");

    let (status, _) = c.delete(1, "/deregister/osint_service").await;
    assert_eq!(status, 200);
    assert_eq!(c.get(0, "/services/osint_service").await.0, 404);
    assert_eq!(
        c.post(0, "/heartbeat", r#"{"service_name": "osint_service"}"#)
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn concurrent_registrations_through_two_replicas_are_all_kept() {
    let c = Cluster::start(2).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = c.url(i % 2, "/register");
        let http = c.http.clone();
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"service_name": format!("svc-{}", i % 6), "endpoint": format!("http://h{i}:80")}))
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 201);
    }
    let (_, names) = c.get(1, "/services").await;
    assert_eq!(names.as_array().map(Vec::len), Some(6));
    let (_, all) = c.get(0, "/discover").await;
    assert_eq!(all.as_array().map(Vec::len), Some(60));
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let c = Cluster::start(1).await;
    c.post(0, "/register", LEGACY).await;
    let before = c.redis_dump().await;
    let huge = format!(
        r#"{{"service_name": "a", "endpoint": "http://a:1", "metadata": {{"k": "{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(&str, &str, &str, u16, Option<&str>)> = vec![
        ("POST", "/register", "", 400, None),
        ("POST", "/register", "{", 400, None),
        ("POST", "/register", "[1, 2]", 422, Some("body")),
        (
            "POST",
            "/register",
            r#"{"endpoint": "http://a:1"}"#,
            422,
            Some("service_name"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "bad name", "endpoint": "http://a:1"}"#,
            422,
            Some("service_name"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": 5, "endpoint": "http://a:1"}"#,
            422,
            Some("service_name"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "ftp://a:1"}"#,
            422,
            Some("endpoint"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "not a url"}"#,
            422,
            Some("endpoint"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "http://a:1", "ttl_s": "60"}"#,
            422,
            Some("ttl_s"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "http://a:1", "ttl_s": -1}"#,
            422,
            Some("ttl_s"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "http://a:1", "ttl_s": 0}"#,
            422,
            Some("ttl_s"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "http://a:1", "metadata": []}"#,
            422,
            Some("metadata"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "http://a:1", "caps": "x"}"#,
            422,
            Some("caps"),
        ),
        (
            "POST",
            "/register",
            r#"{"service_name": "a", "endpoint": "http://a:1", "labels": {"k": 1}}"#,
            422,
            Some("labels.k"),
        ),
        ("POST", "/register", &huge, 413, None),
        ("POST", "/heartbeat", r#"{}"#, 422, Some("service_name")),
        (
            "POST",
            "/heartbeat",
            r#"{"service_name": "osint_service", "status": "dead"}"#,
            422,
            Some("status"),
        ),
        (
            "POST",
            "/heartbeat",
            r#"{"service_name": "osint_service", "queue_depth": -3}"#,
            422,
            Some("queue_depth"),
        ),
        (
            "POST",
            "/heartbeat",
            r#"{"service_id": "no-slash"}"#,
            422,
            Some("service_id"),
        ),
        (
            "POST",
            "/heartbeat",
            r#"{"service_name": "ghost"}"#,
            404,
            None,
        ),
        (
            "POST",
            "/promote",
            r#"{"service_name": "osint_service"}"#,
            422,
            Some("role"),
        ),
        (
            "POST",
            "/promote",
            r#"{"service_name": "ghost", "role": "canary"}"#,
            404,
            None,
        ),
        ("DELETE", "/deregister/ghost", "", 404, None),
        (
            "DELETE",
            "/deregister/osint_service?instance_id=nope:1",
            "",
            404,
            None,
        ),
        (
            "DELETE",
            "/deregister/osint_service?instnce_id=osint:8049",
            "",
            422,
            Some("instnce_id"),
        ),
        ("GET", "/services/bad%20name", "", 422, Some("service_name")),
        ("GET", "/discover?rol=canary", "", 422, Some("rol")),
        ("GET", "/discover?label=nocolon", "", 422, Some("label")),
        ("GET", "/discover?status=sleepy", "", 422, Some("status")),
        ("GET", "/register", "", 405, None),
        ("GET", "/no/such/route", "", 404, None),
    ];
    for (method, path, body, want, field) in cases {
        let method: reqwest::Method = method.parse().expect("method");
        let body = if body.is_empty() { None } else { Some(body) };
        let (status, json) = c.send(0, method.clone(), path, body).await;
        let label = format!("{method} {path} {:.60}", body.unwrap_or(""));
        assert_eq!(status, want, "{label}: {json}");
        assert!(
            json["error"].is_string(),
            "{label}: error code missing: {json}"
        );
        assert!(
            json["detail"].is_string(),
            "{label}: detail missing: {json}"
        );
        if let Some(field) = field {
            assert_eq!(json["field"], field, "{label}: {json}");
            let detail = json["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains(field),
                "{label}: detail must name the field: {detail}"
            );
        }
    }
    assert_eq!(
        before,
        c.redis_dump().await,
        "bad input must not change Redis"
    );
}

#[tokio::test]
async fn a_dead_redis_answers_503_with_retry_after_never_500() {
    let mut c = Cluster::start(1).await;
    c.redis.process().kill();
    let (status, body) = c.post(0, "/register", LEGACY).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable");
    let resp = c
        .http
        .post(c.url(0, "/register"))
        .body(LEGACY)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.headers()["retry-after"], "1");
    let (status, body) = c.get(0, "/health").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["components"]["redis"]["status"], "down");
    // Bad input is still judged before the store is asked.
    assert_eq!(c.post(0, "/register", "{").await.0, 400);
    assert_eq!(c.get(0, "/services/x").await.0, 503);
}

#[tokio::test]
async fn health_and_metrics_report_the_traffic() {
    let c = Cluster::start(1).await;
    let (status, body) = c.get(0, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["components"]["redis"]["status"], "up");
    assert_eq!(body["active_services"], 0);

    c.post(0, "/register", LEGACY).await;
    c.post(
        0,
        "/register",
        r#"{"service_name": "b", "endpoint": "http://b:1"}"#,
    )
    .await;
    c.post(0, "/register", r#"{"service_name": "bad name"}"#)
        .await;
    c.get(0, "/services/ghost").await;
    c.post(0, "/heartbeat", r#"{"service_name": "b"}"#).await;

    let text = common::fetch_text(&c.http, &c.url(0, "/metrics")).await;
    for line in [
        r#"registry_operations_total{operation="register",status="success"} 2"#,
        r#"registry_operations_total{operation="register",status="invalid"} 1"#,
        r#"registry_operations_total{operation="get",status="not_found"} 1"#,
        r#"registry_operations_total{operation="heartbeat",status="success"} 1"#,
        r#"registry_operation_duration_seconds_count{operation="register"} 3"#,
        "registry_active_services 2",
        "registry_circuit_breaker_open 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert!(text.contains("process_resident_memory_bytes"));
    assert_eq!(c.get(0, "/health").await.1["active_services"], 2);
}
