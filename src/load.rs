//! Steady background traffic against a registry, with an exact account of what failed.
//!
//! The HA tests, `rollcall load` (which the chaos scripts run) and the benchmarks all drive
//! load through this, so "0 failed requests" means the same thing everywhere. Lookups read
//! services that exist; registrations create new instances, and every one answered 201 is
//! remembered so that the caller can check afterwards that none was lost. Traffic is bounded
//! in rate and stops on request or after its duration.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Registry base URL (usually the load balancer).
    pub base_url: String,
    /// Services to look up with `GET /services/{name}`; they must exist.
    pub read_services: Vec<String>,
    /// Concurrent lookup loops.
    pub readers: usize,
    /// Concurrent registration loops (0: read-only load).
    pub writers: usize,
    /// Pause between two requests of one loop.
    pub pause: Duration,
    /// Name of the service the writers register instances of.
    pub write_service: String,
    /// Stop after this long even if not asked to.
    pub max_duration: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Also send requests through a gateway: (gateway URL, service, path).
    pub gateway: Option<(String, String, String)>,
}

impl LoadSpec {
    pub fn new(base_url: impl Into<String>) -> Self {
        LoadSpec {
            base_url: base_url.into(),
            read_services: Vec::new(),
            readers: 4,
            writers: 2,
            pause: Duration::from_millis(10),
            write_service: "load-writer".into(),
            max_duration: Duration::from_secs(120),
            timeout: Duration::from_secs(5),
            gateway: None,
        }
    }
}

/// The outcome of one kind of request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub sent: u64,
    pub failed: u64,
    /// Answers that came from a fallback cache (`X-Rollcall-Stale: true`).
    pub stale: u64,
    pub max_latency_ms: f64,
    /// Failures by status code ("error" for transport errors).
    pub failures_by_kind: BTreeMap<String, u64>,
    /// When the first and the last failure happened, in seconds since the load started.
    pub first_failure_s: Option<f64>,
    pub last_failure_s: Option<f64>,
    /// Successful answers by how the gateway resolved the service (gateway requests only).
    pub resolutions: BTreeMap<String, u64>,
    /// Latencies of successful requests, for percentiles.
    #[serde(skip)]
    latencies_ms: Vec<f64>,
}

impl Tally {
    fn record(&mut self, at: Duration, latency: Duration, outcome: Result<bool, String>) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.sent += 1;
        self.max_latency_ms = self.max_latency_ms.max(ms);
        match outcome {
            Ok(stale) => {
                self.latencies_ms.push(ms);
                if stale {
                    self.stale += 1;
                }
            }
            Err(kind) => {
                self.failed += 1;
                *self.failures_by_kind.entry(kind).or_default() += 1;
                let s = at.as_secs_f64();
                self.first_failure_s.get_or_insert(s);
                self.last_failure_s = Some(s);
            }
        }
    }

    /// The `q` quantile (0..=1) of successful latencies, in ms.
    pub fn percentile_ms(&self, q: f64) -> f64 {
        let mut v = self.latencies_ms.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        let rank = (q * (v.len() - 1) as f64).round() as usize;
        v[rank.min(v.len() - 1)]
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub duration_s: f64,
    pub reads: Tally,
    pub writes: Tally,
    /// Requests through the gateway, when one was given.
    pub gateway: Tally,
    /// Instance ids of `write_service` whose registration was answered 201.
    #[serde(skip)]
    pub acknowledged: Vec<String>,
}

impl LoadReport {
    /// One line per kind of request, for logs and the chaos scripts.
    pub fn summary(&self) -> String {
        let line = |name: &str, t: &Tally| {
            format!(
                "{name:<7} sent {:>6}  failed {:>5}  stale {:>5}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  failures {:?}",
                t.sent,
                t.failed,
                t.stale,
                t.percentile_ms(0.5),
                t.percentile_ms(0.99),
                t.max_latency_ms,
                t.failures_by_kind
            )
        };
        let mut out = format!(
            "{}\n{}",
            line("reads", &self.reads),
            line("writes", &self.writes)
        );
        if self.gateway.sent > 0 {
            out.push_str(&format!(
                "\n{}  resolutions {:?}",
                line("gateway", &self.gateway),
                self.gateway.resolutions
            ));
        }
        out
    }
}

struct Shared {
    started: Instant,
    report: Mutex<LoadReport>,
}

pub struct LoadHandle {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
}

impl LoadHandle {
    /// Stops every loop (each finishes its request in flight) and returns the report.
    pub async fn stop(mut self) -> LoadReport {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let mut report = self
            .shared
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        report.duration_s = self.shared.started.elapsed().as_secs_f64();
        report
    }

    /// Time since the load started: to line events up with failure times.
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Requests sent so far: (reads, writes, acknowledged writes).
    pub fn progress(&self) -> (u64, u64, usize) {
        let r = lock(&self.shared);
        (r.reads.sent, r.writes.sent, r.acknowledged.len())
    }

    /// Lets the load run until `reads` more lookups and `acks` more acknowledged
    /// registrations have happened, or `timeout` passes; answers whether they did.
    pub async fn run_until(&self, reads: u64, acks: usize, timeout: Duration) -> bool {
        let (r0, _, a0) = self.progress();
        let deadline = Instant::now() + timeout;
        loop {
            let (r, _, a) = self.progress();
            if r >= r0 + reads && a >= a0 + acks {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts the loops on the current runtime.
pub fn start(spec: LoadSpec) -> Result<LoadHandle, String> {
    let http = reqwest::Client::builder()
        .timeout(spec.timeout)
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| e.to_string())?;
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        started: Instant::now(),
        report: Mutex::new(LoadReport::default()),
    });
    let spec = Arc::new(spec);
    let mut tasks = JoinSet::new();
    if !spec.read_services.is_empty() {
        for n in 0..spec.readers {
            tasks.spawn(read_loop(
                n,
                spec.clone(),
                http.clone(),
                shared.clone(),
                stopped.clone(),
            ));
        }
    }
    if spec.gateway.is_some() {
        for n in 0..2 {
            tasks.spawn(gateway_loop(
                n,
                spec.clone(),
                http.clone(),
                shared.clone(),
                stopped.clone(),
            ));
        }
    }
    for n in 0..spec.writers {
        tasks.spawn(write_loop(
            n,
            spec.clone(),
            http.clone(),
            shared.clone(),
            stopped.clone(),
        ));
    }
    Ok(LoadHandle {
        stop,
        tasks,
        shared,
    })
}

fn keep_going(spec: &LoadSpec, shared: &Shared, stopped: &watch::Receiver<bool>) -> bool {
    !*stopped.borrow() && shared.started.elapsed() < spec.max_duration
}

async fn read_loop(
    n: usize,
    spec: Arc<LoadSpec>,
    http: reqwest::Client,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut i = n;
    while keep_going(&spec, &shared, &stopped) {
        let name = &spec.read_services[i % spec.read_services.len()];
        i += 1;
        let at = shared.started.elapsed();
        let t = Instant::now();
        let outcome = match http
            .get(format!("{}/services/{name}", spec.base_url))
            .send()
            .await
        {
            Ok(resp) if resp.status().as_u16() == 200 => {
                let stale = resp
                    .headers()
                    .get("x-rollcall-stale")
                    .is_some_and(|v| v == "true");
                // Read the body: a reset mid-body is a failure too.
                resp.bytes().await.map(|_| stale).map_err(|_| "body".into())
            }
            Ok(resp) => Err(resp.status().as_u16().to_string()),
            Err(_) => Err("error".into()),
        };
        let latency = t.elapsed();
        lock(&shared).reads.record(at, latency, outcome);
        pause(&spec, &mut stopped).await;
    }
}

async fn gateway_loop(
    _n: usize,
    spec: Arc<LoadSpec>,
    http: reqwest::Client,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let Some((gateway, service, path)) = spec.gateway.clone() else {
        return;
    };
    let url = format!("{gateway}/v2/{service}{path}");
    while keep_going(&spec, &shared, &stopped) {
        let at = shared.started.elapsed();
        let t = Instant::now();
        let outcome = match http.get(&url).send().await {
            Ok(resp) if resp.status().is_success() => {
                let source = resp
                    .headers()
                    .get("x-rollcall-resolution")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
                    .to_string();
                resp.bytes()
                    .await
                    .map(|_| source)
                    .map_err(|_| "body".to_string())
            }
            Ok(resp) => Err(resp.status().as_u16().to_string()),
            Err(_) => Err("error".into()),
        };
        let latency = t.elapsed();
        {
            let mut report = lock(&shared);
            let tally = &mut report.gateway;
            match outcome {
                Ok(source) => {
                    *tally.resolutions.entry(source).or_default() += 1;
                    tally.record(at, latency, Ok(false));
                }
                Err(e) => tally.record(at, latency, Err(e)),
            }
        }
        pause(&spec, &mut stopped).await;
    }
}

async fn write_loop(
    n: usize,
    spec: Arc<LoadSpec>,
    http: reqwest::Client,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut i: u64 = 0;
    while keep_going(&spec, &shared, &stopped) {
        i += 1;
        let instance = format!("w{n}-{i}");
        let body = json!({
            "service_name": spec.write_service,
            "endpoint": format!("http://10.9.{}.{}:8000", n % 250, i % 250),
            "instance_id": instance,
            "ttl_s": 600,
        });
        let at = shared.started.elapsed();
        let t = Instant::now();
        let outcome = match http
            .post(format!("{}/register", spec.base_url))
            .json(&body)
            .send()
            .await
        {
            Ok(resp) if resp.status().as_u16() == 201 => Ok(false),
            Ok(resp) => Err(resp.status().as_u16().to_string()),
            Err(_) => Err("error".into()),
        };
        let latency = t.elapsed();
        {
            let mut report = lock(&shared);
            if outcome.is_ok() {
                report.acknowledged.push(instance);
            }
            report.writes.record(at, latency, outcome);
        }
        pause(&spec, &mut stopped).await;
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, LoadReport> {
    shared
        .report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn pause(spec: &LoadSpec, stopped: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(spec.pause) => {}
        _ = stopped.changed() => {}
    }
}

/// `rollcall load`: seeds services, drives load for the duration, checks that every
/// acknowledged registration is still there, prints a report and a verdict. Answers whether
/// the expectations held.
pub async fn command(args: &crate::cli::LoadArgs) -> Result<bool, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let run = std::process::id();
    let mut seeds = Vec::new();
    for i in 0..args.seed {
        let name = format!("load-seed-{run}-{i}");
        let resp = http
            .post(format!("{}/register", args.url))
            .json(&json!({"service_name": name, "endpoint": format!("http://seed{i}.invalid:80"), "ttl_s": 3600}))
            .send()
            .await
            .map_err(|e| format!("cannot seed {name} at {}: {e}", args.url))?;
        if resp.status().as_u16() != 201 {
            return Err(format!("seeding {name} answered {}", resp.status()));
        }
        seeds.push(name);
    }
    let write_service = format!("load-writer-{run}");
    let gateway = match &args.gateway {
        Some(gw) => {
            // A service whose instance is the load balancer itself: nginx answers
            // `/lb-health` even with every registry replica down, so what the gateway sees is
            // its own resolution (registry, cache, stale), not the upstream's.
            let name = format!("load-gw-{run}");
            let resp = http
                .post(format!("{}/register", args.url))
                .json(&json!({"service_name": name, "endpoint": args.url, "ttl_s": 3600}))
                .send()
                .await
                .map_err(|e| format!("cannot register {name}: {e}"))?;
            if resp.status().as_u16() != 201 {
                return Err(format!("registering {name} answered {}", resp.status()));
            }
            seeds.push(name.clone());
            Some((
                gw.trim_end_matches('/').to_string(),
                name,
                "/lb-health".to_string(),
            ))
        }
        None => None,
    };
    let read_services: Vec<String> = seeds
        .iter()
        .filter(|s| s.starts_with("load-seed-"))
        .cloned()
        .collect();
    let spec = LoadSpec {
        read_services,
        readers: args.readers,
        writers: args.writers,
        pause: args.pause,
        write_service: write_service.clone(),
        max_duration: args.duration,
        gateway,
        ..LoadSpec::new(args.url.clone())
    };
    println!(
        "load: {:?} against {} ({} readers, {} writers)",
        args.duration, args.url, args.readers, args.writers
    );
    let handle = start(spec)?;
    tokio::time::sleep(args.duration).await;
    let report = handle.stop().await;
    println!("{}", report.summary());
    if let (Some(a), Some(b)) = (report.writes.first_failure_s, report.writes.last_failure_s) {
        println!("writes failed from {a:.2} s to {b:.2} s into the run");
    }

    let lost = match lookup_ids(&http, &args.url, &write_service).await {
        Ok(present) => {
            let lost = report
                .acknowledged
                .iter()
                .filter(|id| !present.contains(*id))
                .count();
            println!(
                "acknowledged registrations lost: {lost} of {}",
                report.acknowledged.len()
            );
            Some(lost)
        }
        Err(e) => {
            println!("acknowledged registrations: could not verify ({e})");
            None
        }
    };
    for name in seeds.iter().chain([&write_service]) {
        let _ = http
            .delete(format!("{}/deregister/{name}", args.url))
            .send()
            .await;
    }

    let mut broken = Vec::new();
    if args.expect_no_failed_reads && report.reads.failed > 0 {
        broken.push(format!("{} lookups failed", report.reads.failed));
    }
    if args.expect_no_failed_writes && report.writes.failed > 0 {
        broken.push(format!("{} registrations failed", report.writes.failed));
    }
    if let (Some(limit), Some(a), Some(b)) = (
        args.max_write_outage,
        report.writes.first_failure_s,
        report.writes.last_failure_s,
    ) && b - a > limit.as_secs_f64()
    {
        broken.push(format!(
            "registrations failed for {:.2} s (limit {limit:?})",
            b - a
        ));
    }
    if args.expect_no_failed_gateway && report.gateway.failed > 0 {
        broken.push(format!("{} gateway requests failed", report.gateway.failed));
    }
    if lost.is_some_and(|n| n > 0) {
        broken.push("acknowledged registrations were lost".into());
    }
    if broken.is_empty() {
        println!("verdict: PASS");
        Ok(true)
    } else {
        println!("verdict: FAIL ({})", broken.join("; "));
        Ok(false)
    }
}

async fn lookup_ids(
    http: &reqwest::Client,
    url: &str,
    service: &str,
) -> Result<std::collections::BTreeSet<String>, String> {
    let resp = http
        .get(format!("{url}/services/{service}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().as_u16() == 404 {
        return Ok(Default::default());
    }
    if resp.status().as_u16() != 200 {
        return Err(format!("lookup answered {}", resp.status()));
    }
    let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    Ok(body["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["instance_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}
