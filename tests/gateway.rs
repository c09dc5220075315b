//! The gateway against real upstream HTTP servers and a real registry (real Redis): routing
//! fidelity, streaming, hop-by-hop headers, riding out a registry outage, losing an instance
//! under load, env-var-only services, upstream keep-alive and its safe retry, body size and
//! idle limits.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Response};
use common::Cluster;
use rollcall::gateway::{self, EnvSource, GatewayConfig, GatewayHandle};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// An HTTP server on its own runtime and thread, so that `kill` drops every connection at
/// once, like a crashed process.
struct Upstream {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(name: &'static str, release: Arc<Notify>) -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new()
                    .route(
                        "/collect",
                        axum::routing::post(|body: bytes::Bytes| async move {
                            format!("{} bytes", body.len())
                        }),
                    )
                    .route(
                        "/slow",
                        axum::routing::get(move || {
                            let release = release.clone();
                            async move { slow(release).await }
                        }),
                    )
                    .fallback(move |req: Request| echo(name, req));
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_background();
        });
        Upstream {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Answers with the request body, streamed back, and what it saw in `x-echo-*` headers; it
/// also sends hop-by-hop headers that must not reach the client.
async fn echo(name: &'static str, req: Request) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let seen: HashMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert("x-upstream", HeaderValue::from_static(name));
    h.insert(
        "x-echo-method",
        HeaderValue::from_str(parts.method.as_str()).expect("method"),
    );
    h.insert(
        "x-echo-path",
        HeaderValue::from_str(parts.uri.path_and_query().map_or("", |p| p.as_str())).expect("path"),
    );
    h.insert(
        "x-echo-headers",
        HeaderValue::from_str(&serde_json::to_string(&seen).expect("json")).expect("headers"),
    );
    h.insert("connection", HeaderValue::from_static("x-secret-hop"));
    h.insert("x-secret-hop", HeaderValue::from_static("leaked"));
    h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
    resp
}

/// Sends "first", waits until the test says so, then sends "last".
async fn slow(release: Arc<Notify>) -> Response<Body> {
    let stream = async_stream(release);
    Response::new(Body::from_stream(stream))
}

fn async_stream(
    release: Arc<Notify>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::unfold(0u8, move |step| {
        let release = release.clone();
        async move {
            match step {
                0 => Some((Ok(bytes::Bytes::from_static(b"first")), 1)),
                1 => {
                    release.notified().await;
                    Some((Ok(bytes::Bytes::from_static(b"last")), 2))
                }
                _ => None,
            }
        }
    })
}

fn config(registry: Option<String>, env: &[(&str, String)]) -> GatewayConfig {
    let mut c = GatewayConfig::new(registry);
    c.resolver.env = EnvSource::Fixed(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    );
    c.resolver.cache_ttl = Duration::from_millis(200);
    c.resolver.stale_for = Duration::from_millis(1500);
    c.resolver.registry_timeout = Duration::from_millis(300);
    c
}

async fn gateway(config: GatewayConfig) -> GatewayHandle {
    gateway::spawn("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("gateway starts")
}

async fn register(c: &Cluster, name: &str, url: &str) {
    let (status, body) = c
        .post(
            0,
            "/register",
            &json!({"service_name": name, "endpoint": url}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn routes_method_path_query_headers_and_a_large_body_byte_for_byte() {
    let c = Cluster::start(1).await;
    let up = Upstream::start("a", Arc::new(Notify::new()));
    register(&c, "echo", &up.url()).await;
    let gw = gateway(config(Some(c.replicas[0].url()), &[])).await;
    let http = reqwest::Client::new();

    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let resp = http
        .put(format!("{}/v2/echo/some/deep/path?x=1&y=%41", gw.url()))
        .header("x-custom", "kept")
        .header("host", "callers.example")
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-echo-method"], "PUT");
    assert_eq!(h["x-echo-path"], "/some/deep/path?x=1&y=%41");
    assert_eq!(h["x-rollcall-resolution"], "registry");
    let seen: HashMap<String, String> =
        serde_json::from_str(h["x-echo-headers"].to_str().expect("str")).expect("json");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["host"], up.addr.to_string(), "Host names the upstream");
    assert_eq!(seen["x-forwarded-host"], "callers.example");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen["x-forwarded-for"].contains("127.0.0.1"));
    assert!(seen.contains_key("x-request-id"));
    let echoed = resp.bytes().await.expect("body");
    assert!(
        echoed == body,
        "the 3 MiB body must round-trip byte for byte"
    );

    for method in ["GET", "POST", "DELETE", "PATCH"] {
        let resp = http
            .request(
                method.parse().expect("method"),
                format!("{}/v2/echo", gw.url()),
            )
            .send()
            .await
            .expect("send");
        assert_eq!(resp.headers()["x-echo-method"], method);
        assert_eq!(resp.headers()["x-echo-path"], "/");
        assert_eq!(resp.headers()["x-rollcall-resolution"], "cache");
    }
}

#[tokio::test]
async fn percent_encoding_is_kept_and_hop_by_hop_headers_do_not_leak() {
    let c = Cluster::start(1).await;
    let up = Upstream::start("a", Arc::new(Notify::new()));
    register(&c, "echo", &up.url()).await;
    let gw = gateway(config(Some(c.replicas[0].url()), &[])).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/v2/echo/a%2Fb%20c/%7Ex?q=a%26b", gw.url()))
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9v")
        .header("te", "trailers")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers();
    assert_eq!(h["x-echo-path"], "/a%2Fb%20c/%7Ex?q=a%26b");
    let seen: HashMap<String, String> =
        serde_json::from_str(h["x-echo-headers"].to_str().expect("str")).expect("json");
    for leaked in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            !seen.contains_key(leaked),
            "{leaked} reached the upstream: {seen:?}"
        );
    }
    for leaked in ["x-secret-hop", "proxy-authenticate"] {
        assert!(!h.contains_key(leaked), "{leaked} reached the client");
    }
}

#[tokio::test]
async fn responses_stream_instead_of_being_buffered() {
    let c = Cluster::start(1).await;
    let release = Arc::new(Notify::new());
    let up = Upstream::start("slow", release.clone());
    register(&c, "slowpoke", &up.url()).await;
    let gw = gateway(config(Some(c.replicas[0].url()), &[])).await;
    let mut resp = reqwest::Client::new()
        .get(format!("{}/v2/slowpoke/slow", gw.url()))
        .send()
        .await
        .expect("headers arrive before the body is complete");
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("the first bytes arrive while the upstream still holds the rest")
        .expect("chunk");
    assert_eq!(first.as_deref(), Some(&b"first"[..]));
    release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"last");
}

#[tokio::test]
async fn a_registry_outage_is_ridden_out_stale_then_env_then_503() {
    let mut c = Cluster::start(1).await;
    let a = Upstream::start("a", Arc::new(Notify::new()));
    let fallback = Upstream::start("env", Arc::new(Notify::new()));
    register(&c, "phoenix", &a.url()).await;
    register(&c, "icarus", &a.url()).await;
    let gw = gateway(config(
        Some(c.replicas[0].url()),
        &[("PHOENIX_URL", fallback.url())],
    ))
    .await;
    let http = reqwest::Client::new();
    let get = |service: &'static str| {
        let http = http.clone();
        let url = format!("{}/v2/{service}/ping", gw.url());
        async move {
            let resp = http.get(url).send().await.expect("send");
            let source = resp
                .headers()
                .get("x-rollcall-resolution")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            let upstream = resp
                .headers()
                .get("x-upstream")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            (
                resp.status().as_u16(),
                source,
                upstream,
                resp.text().await.unwrap_or_default(),
            )
        }
    };
    assert_eq!(get("phoenix").await.1.as_deref(), Some("registry"));
    assert_eq!(get("icarus").await.1.as_deref(), Some("registry"));

    // Every registry replica dies.
    c.replicas.remove(0).stop().await.expect("replica stops");

    let mut phoenix = Vec::new();
    let mut icarus = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut done = false;
    while !done && std::time::Instant::now() < deadline {
        let p = get("phoenix").await;
        let i = get("icarus").await;
        let p_label = match (p.0, p.1.as_deref(), p.2.as_deref()) {
            (200, Some("cache"), Some("a")) => "cache",
            (200, Some("stale"), Some("a")) => "stale",
            (200, Some("env"), Some("env")) => "env",
            other => panic!("phoenix answered {other:?}: {}", p.3),
        };
        let i_label = match (i.0, i.1.as_deref()) {
            (200, Some("cache")) => "cache",
            (200, Some("stale")) => "stale",
            (503, None) => {
                let body: Value = serde_json::from_str(&i.3).expect("503 is JSON");
                assert_eq!(body["service"], "icarus");
                assert_eq!(body["error"], "no_instance");
                assert!(
                    body["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("ICARUS_URL"))
                );
                "503"
            }
            other => panic!("icarus answered {other:?}: {}", i.3),
        };
        if phoenix.last() != Some(&p_label) {
            phoenix.push(p_label);
        }
        if icarus.last() != Some(&i_label) {
            icarus.push(i_label);
        }
        done = p_label == "env" && i_label == "503";
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(done, "phoenix went {phoenix:?}, icarus went {icarus:?}");
    let order = |seen: &[&str], last: &str| {
        let mut expected = vec!["cache", "stale", last];
        expected.retain(|s| seen.contains(s));
        assert_eq!(seen, expected.as_slice(), "fallbacks in the wrong order");
        assert!(
            seen.contains(&"stale"),
            "the stale window was skipped: {seen:?}"
        );
    };
    order(&phoenix, "env");
    order(&icarus, "503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_of_two_instances_under_load_fails_no_idempotent_request() {
    let c = Cluster::start(1).await;
    let mut a = Upstream::start("a", Arc::new(Notify::new()));
    let b = Upstream::start("b", Arc::new(Notify::new()));
    register(&c, "pair", &a.url()).await;
    register(&c, "pair", &b.url()).await;
    let gw = Arc::new(gateway(config(Some(c.replicas[0].url()), &[])).await);
    let http = reqwest::Client::new();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (http, gw, stop) = (http.clone(), gw.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let mut served: HashMap<String, u64> = HashMap::new();
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match http.get(format!("{}/v2/pair/x", gw.url())).send().await {
                    Ok(r) if r.status().is_success() => {
                        let who = r.headers()["x-upstream"]
                            .to_str()
                            .unwrap_or("?")
                            .to_string();
                        *served.entry(who).or_default() += 1;
                    }
                    Ok(r) => failures.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (served, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_stop = http
        .get(format!("{}/gateway/status", gw.url()))
        .send()
        .await
        .expect("status")
        .json::<Value>()
        .await
        .expect("json");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut served: HashMap<String, u64> = HashMap::new();
    let mut failures = Vec::new();
    for l in loops {
        let (s, f) = l.await.expect("loop");
        for (k, v) in s {
            *served.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    eprintln!("served {served:?}, failures {}", failures.len());
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        served.get("a").is_some_and(|n| *n > 0),
        "a served before it died"
    );
    assert!(served.get("b").is_some_and(|n| *n > 0), "b took over");
    let ejected = before_stop["ejected"].as_array().expect("ejected");
    assert!(
        ejected.iter().any(|u| u.as_str() == Some(a.url().as_str())),
        "the dead instance is ejected: {before_stop}"
    );
}

#[tokio::test]
async fn env_only_services_work_without_any_registry_and_unknown_ones_get_503_json() {
    let legacy = Upstream::start("legacy", Arc::new(Notify::new()));
    let closed = format!(
        "http://127.0.0.1:{}",
        rollcall::launch::free_port().expect("port")
    );
    let gw = gateway(config(Some(closed), &[("LEGACY_SVC_URL", legacy.url())])).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v2/legacy-svc/api/v1/query?z=9", gw.url()))
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-rollcall-resolution"], "env");
    assert_eq!(resp.headers()["x-echo-path"], "/api/v1/query?z=9");
    assert_eq!(resp.text().await.expect("body"), "hello");

    let resp = http
        .get(format!("{}/v2/nope/x", gw.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "no_instance");
    assert_eq!(body["service"], "nope");
    assert_eq!(body["source"], "gateway");
    assert_eq!(body["retry_safe"], true);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("NOPE_URL")),
        "{body}"
    );

    let resp = http
        .get(format!("{}/v2/bad%20name/x", gw.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 400);

    let status: Value = http
        .get(format!("{}/gateway/status", gw.url()))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["gateway"], "operational");
    assert_eq!(status["circuit_breaker"]["threshold"], 3);
    assert!(status["cache"]["ttl"].is_number());
    let metrics = common::fetch_text(&http, &format!("{}/metrics", gw.url())).await;
    for line in [
        r#"gateway_requests_total{code="200",service="legacy-svc"} 1"#,
        r#"gateway_requests_total{code="503",service="_unresolved"} 1"#,
        r#"gateway_resolutions_total{source="env"} 1"#,
        r#"gateway_resolutions_total{source="none"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing `{line}`:\n{metrics}"
        );
    }
}

/// A bare HTTP/1.1 server that counts the connections it accepts and, once told to, answers
/// only the first request of each connection and hangs up on the next one unanswered: an
/// upstream whose keep-alive timeout fires just as the gateway reuses the connection.
struct CountingUpstream {
    addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    one_per_connection: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingUpstream {
    async fn start() -> CountingUpstream {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let one_per_connection = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, one) = (accepted.clone(), one_per_connection.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let one = one.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    for answered in 0.. {
                        // Requests here have no body: a head ends at the blank line.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        if answered > 0 && one.load(Ordering::SeqCst) {
                            return;
                        }
                        let end = buf
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .expect("head end")
                            + 4;
                        buf.drain(..end);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        CountingUpstream {
            addr,
            accepted,
            one_per_connection,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_a_reused_one_that_dies_is_retried_safely() {
    let up = CountingUpstream::start().await;
    let gw = gateway(config(None, &[("KEEP_URL", format!("http://{}", up.addr))])).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v2/keep/x", gw.url());
    for i in 0..20 {
        let resp = http.get(&url).send().await.expect("send");
        assert_eq!(resp.status().as_u16(), 200, "request {i}");
        assert_eq!(resp.text().await.expect("body"), "ok");
    }
    assert_eq!(
        up.accepted(),
        1,
        "20 sequential requests must share one upstream connection"
    );

    // From now on every reused connection dies under the request it carries.
    up.one_per_connection
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..20 {
        let resp = http.get(&url).send().await.expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        assert_eq!(
            status, 200,
            "GET {i} must be retried on a new connection: {text}"
        );
    }
    assert_eq!(up.accepted(), 21, "one new connection per retried GET");

    // Repeating a POST could do its work twice: the caller gets the failure instead.
    let resp = http.post(&url).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 502);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["retry_safe"], false, "{body}");
}

/// Sends a raw HTTP/1.1 request and answers the whole raw response (the connection is closed).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_whether_declared_or_streamed() {
    let up = Upstream::start("a", Arc::new(Notify::new()));
    let mut c = config(None, &[("SINK_URL", up.url())]);
    c.max_body_bytes = 1000;
    let gw = gateway(c).await;

    let fits = raw_exchange(
        gw.addr,
        b"POST /v2/sink/collect HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\
          content-length: 10\r\n\r\n0123456789",
    )
    .await;
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");
    assert!(fits.ends_with("10 bytes"), "{fits}");

    let declared = raw_exchange(
        gw.addr,
        b"POST /v2/sink/collect HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\
          content-length: 2000\r\n\r\n",
    )
    .await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(
        declared.contains(r#""error":"payload_too_large""#),
        "{declared}"
    );

    // Chunked: no length up front, so the limit trips while the body streams upstream.
    let chunk = format!("{:x}\r\n{}\r\n", 600, "x".repeat(600));
    let streamed = format!(
        "POST /v2/sink/collect HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\
         transfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let streamed = raw_exchange(gw.addr, streamed.as_bytes()).await;
    assert!(streamed.starts_with("HTTP/1.1 413"), "{streamed}");
    assert!(
        streamed.contains(r#""error":"payload_too_large""#),
        "{streamed}"
    );
}

#[tokio::test]
async fn a_response_body_that_stalls_is_cut_after_the_idle_limit() {
    let release = Arc::new(Notify::new());
    let up = Upstream::start("slow", release.clone());
    let mut c = config(None, &[("STALL_URL", up.url())]);
    c.body_idle_timeout = Duration::from_millis(300);
    let gw = gateway(c).await;
    let started = std::time::Instant::now();
    let answer = raw_exchange(
        gw.addr,
        b"GET /v2/stall/slow HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("first"), "{answer}");
    assert!(
        !answer.contains("last") && !answer.ends_with("0\r\n\r\n"),
        "the stalled body must be cut, not completed: {answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut after the 300 ms idle limit, took {:?}",
        started.elapsed()
    );
    release.notify_waiters();
}

#[tokio::test]
async fn stopping_lets_the_exchange_in_flight_finish_and_refuses_new_connections() {
    let release = Arc::new(Notify::new());
    let up = Upstream::start("slow", release.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (addr, threads) = gateway::start_workers(
        "127.0.0.1:0".parse().expect("addr"),
        config(None, &[("DRAINED_URL", up.url())]),
        1,
        stopped,
    )
    .expect("workers start");
    let mut resp = reqwest::Client::new()
        .get(format!("http://{addr}/v2/drained/slow"))
        .send()
        .await
        .expect("headers");
    let first = resp.chunk().await.expect("chunk");
    assert_eq!(first.as_deref(), Some(&b"first"[..]));

    stop.send(true).expect("stop");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a stopping gateway must stop accepting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .expect("the response in flight completes")
    {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"last");
    let joined = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .all(|t| t.join().expect("worker thread").is_ok())
    });
    let clean = tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .expect("workers stop once the exchange is done")
        .expect("join");
    assert!(clean, "workers stop without error");
}
