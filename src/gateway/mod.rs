//! `rollcall gateway`: routes `ANY /v2/<service>/<path>` to a live instance of the service.
//!
//! `resolve` finds the instances (cache → registry → stale → env var), `balance` picks one,
//! `proxy` forwards the request over a kept-alive connection from `pool` and streams the
//! answer back (`body`). A connect failure is retried once on another instance, since nothing
//! was sent; an idempotent request whose kept-alive connection died under it, once on a new
//! connection. `drain` lets a stopping gateway finish what is in flight. `/gateway/status`,
//! `/health` and `/metrics` describe the gateway itself.

mod balance;
mod body;
mod drain;
mod error;
mod metrics;
mod pool;
mod proxy;
mod resolve;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::convert::Infallible;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use self::balance::Balancer;
pub use self::balance::EjectionConfig;
use self::body::{BodySlot, ResponseBody};
use self::drain::Drain;
pub use self::error::GatewayError;
use self::metrics::{GatewayMetrics, SeriesCache};
use self::pool::{Pool, PoolConfig};
use self::proxy::{Outgoing, SendError};
pub use self::resolve::{EnvSource, ResolverConfig, Source, env_var_name};
use self::resolve::{Resolver, Upstream};
use crate::breaker::{BreakerConfig, BreakerState};
use crate::validate::service_name_rule;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub resolver: ResolverConfig,
    pub ejection: EjectionConfig,
    pub connect_timeout: Duration,
    /// Longest wait for an upstream's response headers (504 after).
    pub response_timeout: Duration,
    /// Longest pause inside a request or response body.
    pub body_idle_timeout: Duration,
    pub max_body_bytes: usize,
}

impl GatewayConfig {
    /// The defaults of DESIGN.md: 5 s cache, breaker opening after 3 failures, 60 s of
    /// stale-if-error.
    pub fn new(registry_url: Option<String>) -> Self {
        GatewayConfig {
            resolver: ResolverConfig {
                registry_url,
                cache_ttl: Duration::from_secs(5),
                stale_for: Duration::from_secs(60),
                registry_timeout: Duration::from_secs(1),
                breaker: BreakerConfig {
                    threshold: 3,
                    cooldown: Duration::from_secs(5),
                },
                env: EnvSource::Process,
            },
            ejection: EjectionConfig {
                after_failures: 3,
                for_duration: Duration::from_secs(10),
            },
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}

/// One event loop's view of the gateway: everything shared, except the upstream connection
/// pool, which belongs to the loop that drives its connections.
struct Gateway {
    config: GatewayConfig,
    resolver: Arc<Resolver>,
    balancer: Arc<Balancer>,
    pool: Arc<Pool>,
    metrics: Arc<GatewayMetrics>,
    series: SeriesCache,
}

impl Gateway {
    /// Another event loop's gateway: same cache, balancer and metrics, its own pool.
    fn sibling(&self) -> Arc<Gateway> {
        Arc::new(Gateway {
            config: self.config.clone(),
            resolver: self.resolver.clone(),
            balancer: self.balancer.clone(),
            pool: upstream_pool(&self.config),
            metrics: self.metrics.clone(),
            series: SeriesCache::new(self.metrics.clone()),
        })
    }
}

fn upstream_pool(config: &GatewayConfig) -> Arc<Pool> {
    Pool::new(PoolConfig {
        connect_timeout: config.connect_timeout,
        idle_timeout: Duration::from_secs(90),
        prune_every: Duration::from_secs(30),
        max_idle_per_instance: 256,
    })
}

fn build(config: GatewayConfig) -> io::Result<Arc<Gateway>> {
    let metrics =
        Arc::new(GatewayMetrics::new().map_err(|e| io::Error::other(format!("metrics: {e}")))?);
    let on_transition = {
        let metrics = metrics.clone();
        move |state: BreakerState| {
            metrics
                .breaker_open
                .set(i64::from(state != BreakerState::Closed));
            tracing::warn!(state = state.as_str(), "registry circuit breaker");
        }
    };
    let balancer = Balancer::new(config.ejection);
    let resolver = Arc::new(
        Resolver::new(config.resolver.clone(), balancer.clone(), on_transition)
            .map_err(io::Error::other)?,
    );
    let pool = upstream_pool(&config);
    Ok(Arc::new(Gateway {
        balancer,
        resolver,
        pool,
        series: SeriesCache::new(metrics.clone()),
        metrics,
        config,
    }))
}

/// Answers one request: the gateway's own endpoints, else `/v2/…` proxying.
async fn handle(
    gw: Arc<Gateway>,
    client_ip: HeaderValue,
    req: hyper::Request<Incoming>,
) -> Response<ResponseBody> {
    let own = match (req.method(), req.uri().path()) {
        (&Method::GET, "/gateway/status") => status(&gw).into_response(),
        (&Method::GET, "/health") => health(&gw).into_response(),
        (&Method::GET, "/metrics") => metrics_text(&gw).into_response(),
        _ => return route(&gw, client_ip, req).await,
    };
    own.map(ResponseBody::from)
}

/// Serves HTTP/1.1 connections from `listener` until `shutdown` resolves, then lets open
/// exchanges finish (for up to `DRAIN`). hyper's connection builder is used directly rather
/// than `axum::serve`: the gateway needs no router or HTTP/2 sniffing, and every microsecond
/// per request shows next to nginx.
async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let drain = Drain::default();
    let _pruner = {
        let pool = gw.pool.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut every = tokio::time::interval(pool.prune_every());
            loop {
                every.tick().await;
                pool.prune();
            }
        }))
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        no_delay(&stream);
        let gw = gw.clone();
        // The caller's address as `X-Forwarded-For` wants it, formatted once per connection.
        let client_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            let gw = gw.clone();
            let client_ip = client_ip.clone();
            async move { Ok::<_, Infallible>(handle(gw, client_ip, req).await) }
        });
        // Head and body copied into one buffer and sent with one write: for the small
        // messages most requests are, cheaper than a vectored write (measured: p50 -3 %).
        let conn = hyper::server::conn::http1::Builder::new()
            .writev(false)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), service);
        let conn = drain.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, drain.shutdown()).await.is_err() {
        tracing::warn!("open connections did not finish within {DRAIN:?}; closing them");
    }
    Ok(())
}

/// Stops a helper task when its owner ends, however it ends (an aborted `serve` included).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a stopping gateway waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves the gateway the way nginx runs its workers: `workers` threads, each a single-threaded
/// event loop with its own listening socket on the same address (SO_REUSEPORT) and its own
/// upstream pool, so a request never hops between threads. (Measured on the benchmark: a
/// single-threaded loop proxies about 40 % more requests per CPU than tokio's work-stealing
/// scheduler.) Returns once every worker has stopped after `shutdown` turned true.
pub async fn run_workers(
    listen: SocketAddr,
    config: GatewayConfig,
    workers: usize,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let (addr, threads) = start_workers(listen, config, workers, shutdown)?;
    tracing::info!(%addr, workers, "gateway workers started");
    tokio::task::spawn_blocking(move || {
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a gateway worker panicked")),
            }
        }
        Ok(())
    })
    .await
    .map_err(io::Error::other)?
}

type WorkerThread = std::thread::JoinHandle<io::Result<()>>;

/// Binds `workers` sockets to `listen` (the port of the first when it is 0) and starts a
/// thread for each; answers the bound address.
pub fn start_workers(
    listen: SocketAddr,
    config: GatewayConfig,
    workers: usize,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> io::Result<(SocketAddr, Vec<WorkerThread>)> {
    let first = build(config)?;
    let mut addr = listen;
    let mut listeners = Vec::new();
    for _ in 0..workers.max(1) {
        let l = reuseport_listener(addr)?;
        addr = l.local_addr()?;
        listeners.push(l);
    }
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let gateway = if i == 0 {
            first.clone()
        } else {
            first.sibling()
        };
        let mut stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("gateway-{i}"))
            .spawn(move || -> io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, gateway, async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    })
                    .await
                })
            })?;
        threads.push(thread);
    }
    Ok((addr, threads))
}

/// Small responses go out at once instead of waiting for the previous segment's ACK.
pub(super) fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves the gateway on `listener`, on the current runtime, until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve(listener, build(config)?, shutdown).await
}

/// An in-process gateway (tests, benchmarks); dropping the handle stops it.
pub struct GatewayHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<io::Result<()>>,
}

impl GatewayHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

pub async fn spawn(listen: SocketAddr, config: GatewayConfig) -> io::Result<GatewayHandle> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(listener, config, async move {
        let _ = stopped.await;
    }));
    Ok(GatewayHandle {
        addr,
        stop: Some(stop),
        task,
    })
}

/// Splits `/v2/<service>/<rest>` as received (nothing decoded), answering `rest` with its
/// query; `rest` may be empty or start with `?`, `Target::uri` adds the leading `/`.
fn split_target(path_and_query: &str) -> Option<(&str, &str)> {
    let after = path_and_query.strip_prefix("/v2/")?;
    let end = after.find(['/', '?']).unwrap_or(after.len());
    Some(after.split_at(end))
}

/// The caller's `X-Request-Id` when it is usable, else a new random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers
        .get(&proxy::X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
    {
        return v.clone();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    let mut id = [0u8; 16];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

async fn route(
    gw: &Arc<Gateway>,
    client_ip: HeaderValue,
    req: hyper::Request<Incoming>,
) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let raw = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let (label, response) = match split_target(raw) {
        None => (
            "_unresolved",
            GatewayError::BadRequest(format!(
                "no route for {}; the gateway serves /v2/<service>/<path>, /gateway/status, \
                 /health and /metrics",
                parts.uri.path()
            ))
            .into_response()
            .map(ResponseBody::from),
        ),
        Some((service, rest)) => match forward(gw, service, rest, &client_ip, &parts, body).await {
            Ok((resp, upstream_time)) => {
                let series = gw.series.service(service);
                series.observe_upstream(upstream_time);
                series.count(resp.status());
                return resp;
            }
            Err((resolved, e)) => {
                gw.metrics.errors.with_label_values(&[e.kind()]).inc();
                let label = if resolved { service } else { "_unresolved" };
                (label, e.into_response().map(ResponseBody::from))
            }
        },
    };
    gw.series.service(label).count(response.status());
    response
}

/// Resolves, picks, sends (retrying a refused connect once on another instance) and relays,
/// answering the response and how long the upstream took to its headers. The bool in the
/// error says whether the service resolved, for the metric label.
async fn forward(
    gw: &Arc<Gateway>,
    service: &str,
    rest: &str,
    client_ip: &HeaderValue,
    parts: &axum::http::request::Parts,
    body: Incoming,
) -> Result<(Response<ResponseBody>, Duration), (bool, GatewayError)> {
    service_name_rule("service", service)
        .map_err(|e| (false, GatewayError::BadRequest(e.to_string())))?;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > gw.config.max_body_bytes) {
        return Err((
            false,
            GatewayError::PayloadTooLarge(gw.config.max_body_bytes),
        ));
    }
    let resolution = match gw.resolver.resolve(service).await {
        Ok(r) => r,
        Err(tried) => {
            gw.metrics.resolved(Source::None).inc();
            return Err((
                false,
                GatewayError::NoInstance {
                    service: service.to_string(),
                    tried,
                },
            ));
        }
    };
    gw.metrics.resolved(resolution.source).inc();

    let id = request_id(&parts.headers);
    let slot = BodySlot::new(body, gw.config.max_body_bytes, gw.config.body_idle_timeout);
    let out = Outgoing {
        method: &parts.method,
        headers: &parts.headers,
        rest,
        client_ip,
        request_id: &id,
    };
    let mut tried: Vec<String> = Vec::new();
    // What went wrong with the previous attempt, reported if there is no other instance.
    let mut last: Option<GatewayError> = None;
    loop {
        let Some(upstream) = gw.balancer.pick(&resolution.upstreams, &tried) else {
            let error = last.unwrap_or_else(|| GatewayError::Connect {
                service: service.to_string(),
                upstream: tried.join(", "),
                detail: "no instance left to try".into(),
            });
            return Err((true, error));
        };
        let _in_flight = gw.balancer.start(upstream);
        let started = Instant::now();
        let result = match &upstream.target {
            Ok(target) => {
                proxy::send(&gw.pool, target, &out, &slot, gw.config.response_timeout).await
            }
            Err(why) => Err(SendError::Connect(why.clone())),
        };
        match result {
            Ok(resp) => {
                let upstream_time = started.elapsed();
                gw.balancer.connected(upstream);
                let mut resp = proxy::relay(resp, gw.config.body_idle_timeout);
                annotate(&mut resp, upstream, resolution.source, &id);
                return Ok((resp, upstream_time));
            }
            Err(SendError::Connect(detail)) => {
                gw.balancer.connect_failed(upstream);
                tried.push(upstream.url.clone());
                // Safe to retry only while the body is untouched, and only once.
                if tried.len() >= 2 || !slot.untouched() {
                    return Err((
                        true,
                        GatewayError::Connect {
                            service: service.to_string(),
                            upstream: upstream.url.clone(),
                            detail,
                        },
                    ));
                }
                tracing::info!(service, upstream = %upstream.url, %detail, "connect failed; retrying on another instance");
                last = Some(GatewayError::Connect {
                    service: service.to_string(),
                    upstream: upstream.url.clone(),
                    detail,
                });
            }
            Err(SendError::TooLarge) => {
                return Err((
                    true,
                    GatewayError::PayloadTooLarge(gw.config.max_body_bytes),
                ));
            }
            Err(SendError::Timeout) => {
                return Err((
                    true,
                    GatewayError::Timeout {
                        service: service.to_string(),
                        upstream: upstream.url.clone(),
                        after_ms: gw.config.response_timeout.as_millis(),
                    },
                ));
            }
            Err(SendError::Other(detail)) => {
                // The request may have reached the instance: not repeated here (`proxy::send`
                // has already tried an idempotent one again if a kept-alive connection died).
                return Err((
                    true,
                    GatewayError::Upstream {
                        service: service.to_string(),
                        upstream: upstream.url.clone(),
                        detail,
                    },
                ));
            }
        }
    }
}

const X_ROLLCALL_RESOLUTION: header::HeaderName =
    header::HeaderName::from_static("x-rollcall-resolution");
const X_ROLLCALL_INSTANCE: header::HeaderName =
    header::HeaderName::from_static("x-rollcall-instance");

/// Says how the request was routed, for whoever debugs it.
fn annotate(
    resp: &mut Response<ResponseBody>,
    upstream: &Upstream,
    source: Source,
    id: &HeaderValue,
) {
    let headers = resp.headers_mut();
    headers.insert(
        X_ROLLCALL_RESOLUTION,
        HeaderValue::from_static(source.as_str()),
    );
    if let Some(v) = &upstream.instance_header {
        headers.insert(X_ROLLCALL_INSTANCE, v.clone());
    }
    if !headers.contains_key(&proxy::X_REQUEST_ID) {
        headers.insert(proxy::X_REQUEST_ID, id.clone());
    }
}

fn status(gw: &Gateway) -> impl IntoResponse {
    let breaker = gw.resolver.breaker();
    let cached = gw.resolver.cached();
    axum::Json(json!({
        "gateway": "operational",
        "version": env!("CARGO_PKG_VERSION"),
        "registry": gw.config.resolver.registry_url,
        "circuit_breaker": {
            "open": breaker.state != BreakerState::Closed,
            "state": breaker.state.as_str(),
            "failures": breaker.failures,
            "threshold": gw.resolver.breaker_threshold(),
        },
        "cache": {
            "size": cached.len(),
            "ttl": gw.resolver.cache_ttl().as_secs(),
            "services": cached.iter().map(|c| c.service.clone()).collect::<Vec<_>>(),
            "entries": cached.iter().map(|c| json!({
                "service": c.service,
                "age_s": c.age.as_secs_f64(),
                "instances": c.instances,
                "fresh": c.age < gw.resolver.cache_ttl(),
            })).collect::<Vec<_>>(),
        },
        "ejected": gw.balancer.ejected(),
    }))
}

fn health(gw: &Gateway) -> impl IntoResponse {
    let breaker = gw.resolver.breaker();
    let status = if breaker.state == BreakerState::Closed {
        "healthy"
    } else {
        "degraded"
    };
    (
        StatusCode::OK,
        axum::Json(json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "registry_breaker": breaker.state.as_str(),
        })),
    )
}

fn metrics_text(gw: &Gateway) -> impl IntoResponse {
    let cached = gw.resolver.cached();
    gw.metrics
        .cache_entries
        .set(i64::try_from(cached.len()).unwrap_or(i64::MAX));
    gw.metrics.cache_oldest_age.set(
        cached
            .iter()
            .map(|c| c.age.as_secs_f64())
            .fold(0.0, f64::max),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gw.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_without_decoding() {
        assert_eq!(
            split_target("/v2/svc/a%2Fb/c?x=%41"),
            Some(("svc", "/a%2Fb/c?x=%41"))
        );
        assert_eq!(split_target("/v2/svc"), Some(("svc", "")));
        assert_eq!(split_target("/v2/svc?q=1"), Some(("svc", "?q=1")));
        assert_eq!(split_target("/v1/svc/x"), None);
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        let made = request_id(&headers);
        assert_eq!(made.len(), 16);
        assert!(made.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(made, request_id(&headers), "ids are random");
        headers.insert("x-request-id", HeaderValue::from_static("caller-1"));
        assert_eq!(request_id(&headers), "caller-1");
    }
}
