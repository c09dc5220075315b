//! Shared set-up for the integration tests: a real `redis-server` on a free port in its own
//! temp dir, registry replicas in-process on port 0, and an HTTP client. Everything started
//! here is stopped when the `Cluster` is dropped, also when a test fails.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollcall::launch::RedisServer;
use rollcall::server::{self, Options, ReplicaHandle};
use rollcall::store::{MasterSource, RedisConfig, RedisStore};
use serde_json::Value;
use tempfile::TempDir;

pub struct Cluster {
    pub replicas: Vec<ReplicaHandle>,
    pub redis: RedisServer,
    pub http: reqwest::Client,
    _dir: TempDir,
}

pub fn redis_config(url: String) -> RedisConfig {
    RedisConfig {
        source: MasterSource::Direct(url),
        key_prefix: "rollcall:".into(),
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(500),
        min_replica_acks: 0,
        replica_ack_timeout: Duration::from_millis(500),
    }
}

impl Cluster {
    pub async fn start(replicas: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let redis = RedisServer::start(dir.path(), None)
            .await
            .expect("redis-server starts (apt-get install redis-server)");
        let mut handles = Vec::new();
        for _ in 0..replicas {
            let store = RedisStore::new(&redis_config(redis.url())).expect("store");
            let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
            handles.push(
                server::spawn(addr, Arc::new(store), Options::default())
                    .await
                    .expect("replica starts"),
            );
        }
        Cluster {
            replicas: handles,
            redis,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn url(&self, replica: usize, path: &str) -> String {
        format!("{}{path}", self.replicas[replica].url())
    }

    pub async fn send(
        &self,
        replica: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(replica, path))
            .header("X-Registry-Token", "legacy-clients-send-this");
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("request reaches the replica");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    pub async fn get(&self, replica: usize, path: &str) -> (u16, Value) {
        self.send(replica, reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, replica: usize, path: &str, body: &str) -> (u16, Value) {
        self.send(replica, reqwest::Method::POST, path, Some(body))
            .await
    }

    pub async fn delete(&self, replica: usize, path: &str) -> (u16, Value) {
        self.send(replica, reqwest::Method::DELETE, path, None)
            .await
    }

    /// Every key in Redis with its type and value: a snapshot to compare before/after.
    pub async fn redis_dump(&self) -> BTreeMap<String, String> {
        let client = redis::Client::open(self.redis.url()).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut out = BTreeMap::new();
        for key in keys {
            let dump: Vec<u8> = redis::cmd("DUMP")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            out.insert(key, format!("{dump:?}"));
        }
        out
    }
}

/// Polls `check` until it answers true or `timeout` passes; answers whether it did.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The full HA topology (3 Redis, 3 Sentinels, 3 registry processes, nginx) in a temp dir,
/// with timeouts shortened so failures are noticed quickly.
pub struct Ha {
    pub topology: rollcall::launch::Topology,
    pub http: reqwest::Client,
    _dir: TempDir,
}

impl Ha {
    pub async fn start() -> Ha {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spec = rollcall::launch::TopologySpec::standard(
            env!("CARGO_BIN_EXE_rollcall").into(),
            dir.path().to_path_buf(),
        );
        spec.gateway = false;
        spec.serve_args = [
            "--redis-timeout",
            "500ms",
            "--redis-connect-timeout",
            "500ms",
            "--replica-ack-timeout",
            "500ms",
            "--breaker-cooldown",
            "300ms",
            "--snapshot-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        let topology = rollcall::launch::Topology::start(spec)
            .await
            .expect("the HA topology starts (apt-get install redis-server redis-sentinel nginx)");
        Ha {
            topology,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn lb(&self) -> String {
        self.topology.lb_url()
    }

    /// Registers `n` services through the load balancer and answers their names.
    pub async fn seed(&self, n: usize) -> Vec<String> {
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("seed-{i}");
            let resp = self
                .http
                .post(format!("{}/register", self.lb()))
                .json(&serde_json::json!({"service_name": name, "endpoint": format!("http://seed{i}:80"), "ttl_s": 600}))
                .send()
                .await
                .expect("seed");
            assert_eq!(resp.status().as_u16(), 201, "seeding {name}");
            names.push(name);
        }
        names
    }

    /// Instance ids of `service` as the registry answers them through the load balancer.
    pub async fn instance_ids(&self, service: &str) -> std::collections::BTreeSet<String> {
        let resp = self
            .http
            .get(format!("{}/services/{service}", self.lb()))
            .send()
            .await
            .expect("lookup");
        assert_eq!(resp.status().as_u16(), 200, "lookup of {service}");
        let body: Value = resp.json().await.expect("json");
        body["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .filter_map(|i| i["instance_id"].as_str().map(String::from))
            .collect()
    }

    /// `GET /health` of every registry replica.
    pub async fn replica_health(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for r in &self.topology.registries {
            let body = match self.http.get(format!("{}/health", r.url())).send().await {
                Ok(resp) => resp.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            out.push(body);
        }
        out
    }
}

/// Which of `keys` are missing on the Redis at `url`.
pub async fn missing_keys(url: &str, keys: &[String]) -> Vec<String> {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut missing = Vec::new();
    for key in keys {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        if !exists {
            missing.push(key.clone());
        }
    }
    missing
}

/// The body of `GET url` as text (a `/metrics` page, say).
pub async fn fetch_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url)
        .send()
        .await
        .expect("the server answers")
        .text()
        .await
        .expect("a text body")
}
