//! Prometheus for real: Debian's `prometheus` scrapes a real cluster (3 registry replicas and
//! the gateway) through `prometheus/prometheus.yml`, sees the traffic that was sent, every
//! series the dashboard and the alert rules use, and the breaker opening when Redis stops.
//! `promtool` checks the config and the rules.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::eventually;
use rollcall::launch::{Prometheus, Topology, TopologySpec};
use serde_json::Value;

const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/prometheus/alerts.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/rollcall.json");

/// The value of a PromQL query that answers one number, if it does.
async fn scalar(http: &reqwest::Client, prometheus: &str, query: &str) -> Option<f64> {
    let encoded = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("query", query)
        .finish();
    let body: Value = http
        .get(format!("{prometheus}/api/v1/query?{encoded}"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

/// Every `registry_*` / `gateway_*` name in a text (PromQL inside JSON or YAML).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["registry_", "gateway_"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(prefix) {
            let start = from + at;
            let before_ok = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(text.len(), |n| start + n);
            if before_ok {
                names.insert(text[start..end].to_string());
            }
            from = end;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_cluster_its_traffic_and_the_breaker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = TopologySpec::standard(
        env!("CARGO_BIN_EXE_rollcall").into(),
        dir.path().to_path_buf(),
    );
    spec.serve_args = ["--redis-timeout", "300ms", "--breaker-cooldown", "300ms"]
        .map(String::from)
        .to_vec();
    let mut topology = Topology::start(spec).await.expect("cluster starts");
    let registries: Vec<String> = topology
        .registries
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.port()))
        .collect();
    let gateway = topology.gateway.as_ref().expect("gateway").url();
    let gateways = vec![gateway.trim_start_matches("http://").to_string()];
    let prometheus = Prometheus::start(
        dir.path(),
        None,
        Duration::from_secs(1),
        &registries,
        &gateways,
    )
    .await
    .expect("prometheus starts (apt-get install prometheus)");
    let prom = prometheus.url();

    let config = dir
        .path()
        .join(format!("prometheus-{}", prometheus.port()))
        .join("prometheus.yml");
    for args in [
        vec![
            "check".to_string(),
            "config".into(),
            config.display().to_string(),
        ],
        vec!["check".to_string(), "rules".into(), ALERTS.into()],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let http = reqwest::Client::new();
    let lb = topology.lb_url();
    for i in 0..7 {
        let resp = http
            .post(format!("{lb}/register"))
            .json(&serde_json::json!({"service_name": format!("mon-{i}"), "endpoint": lb}))
            .send()
            .await
            .expect("register");
        assert_eq!(resp.status().as_u16(), 201);
    }
    for _ in 0..5 {
        let resp = http
            .get(format!("{gateway}/v2/mon-0/lb-health"))
            .send()
            .await
            .expect("gateway");
        assert_eq!(resp.status().as_u16(), 200);
    }
    let resp = http
        .get(format!("{gateway}/v2/not-registered/x"))
        .send()
        .await
        .expect("gateway");
    assert_eq!(resp.status().as_u16(), 503);

    let wait = |query: &'static str, want: f64| {
        let (http, prom) = (http.clone(), prom.clone());
        async move {
            let ok = eventually(Duration::from_secs(20), || async {
                scalar(&http, &prom, query).await == Some(want)
            })
            .await;
            assert!(
                ok,
                "`{query}` should be {want}, is {:?}",
                scalar(&http, &prom, query).await
            );
        }
    };
    wait(r#"count(up == 1)"#, 4.0).await;
    wait(
        r#"sum(registry_operations_total{operation="register",status="success"})"#,
        7.0,
    )
    .await;
    wait(r#"sum(gateway_requests_total{code="200"})"#, 5.0).await;
    wait(r#"sum(gateway_requests_total{code="503"})"#, 1.0).await;
    wait(r#"max(registry_active_services)"#, 7.0).await;
    wait(r#"max(registry_circuit_breaker_open)"#, 0.0).await;

    let mut used = metric_names(&std::fs::read_to_string(DASHBOARD).expect("dashboard"));
    used.extend(metric_names(
        &std::fs::read_to_string(ALERTS).expect("alerts"),
    ));
    assert!(
        used.len() > 10,
        "the dashboard and rules use metrics: {used:?}"
    );
    for name in &used {
        let query = format!(r#"count({{__name__="{name}"}})"#);
        let present = eventually(Duration::from_secs(10), || async {
            scalar(&http, &prom, &query).await.is_some_and(|n| n >= 1.0)
        })
        .await;
        assert!(
            present,
            "{name} (used by the dashboard or the alerts) is not scraped"
        );
    }

    for r in &mut topology.redis {
        r.stop();
    }
    // Scrapes call the store too, so the breakers open even without other traffic.
    wait(r#"max(registry_circuit_breaker_open)"#, 1.0).await;
    wait(r#"min(registry_circuit_breaker_open)"#, 1.0).await;
}
