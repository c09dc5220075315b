//! Gateway vs nginx, proxying to the same upstream on this machine, measured with wrk.
//!
//! Run with `./scripts/bench` (or `cargo bench --bench gateway`; wrk must be installed).
//! Both proxies forward `GET /hello` to an nginx that answers "ok" itself; the gateway
//! resolves the service from an env var (cached), so what is compared is the proxying.
//! Targets: gateway p50 within 1.3x of nginx's, throughput at least 70 % of nginx's.
//! Each proxy is measured with many connections (BENCH_CONNECTIONS, 32), a few
//! (BENCH_LIGHT_CONNECTIONS, 4) and one; on a 2-core machine the first two keep each proxy's
//! core busy, so their p50 is mostly queueing, while one connection shows the latency a lone
//! caller sees. Also printed: each proxy's CPU time per request (user + kernel), read from
//! /proc, which varies far less between runs than the rates do. Knobs: BENCH_SECONDS
//! (default 5), BENCH_ROUNDS (3, interleaved; medians reported), BENCH_GATEWAY_WORKERS (1, like the single nginx worker it is
//! compared with).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rollcall::gateway::{self, EnvSource, GatewayConfig};
use rollcall::launch::{Nginx, render};

// The same allocator as the `rollcall` binary, so the gateway is measured as it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time of the proxy per request, microseconds.
    user_us: f64,
    sys_us: f64,
}

/// User and kernel CPU time, in microseconds, of the threads or processes whose
/// `/proc/.../stat` files are given.
fn cpu_micros(stats: &[PathBuf]) -> (f64, f64) {
    // USER_HZ is 100 on every Linux this runs on.
    let tick_us = 10_000.0;
    let mut total = (0.0, 0.0);
    for path in stats {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        // Fields after the parenthesised command name; utime and stime are the 14th and
        // 15th of the whole line.
        let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        total.0 += field(11) * tick_us;
        total.1 += field(12) * tick_us;
    }
    total
}

/// The stat files of nginx's worker processes (the children of its master).
fn nginx_workers(master: u32) -> Vec<PathBuf> {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .map(|pid| PathBuf::from(format!("/proc/{pid}/stat")))
        .collect()
}

/// The stat files of this process's gateway worker threads.
fn gateway_threads() -> Vec<PathBuf> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|name| name.starts_with("gateway-"))
        })
        .map(|t| t.path().join("stat"))
        .collect()
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// "123.45us" / "1.23ms" / "2.00s" → ms.
fn millis(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn wrk(url: &str, seconds: u64, connections: u64, proxy: &[PathBuf]) -> Result<Sample, String> {
    let before = cpu_micros(proxy);
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .map_err(|e| format!("cannot run wrk (apt-get install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p50 = field("50%").and_then(|v| millis(&v)).ok_or("no p50")?;
    let p99 = field("99%").and_then(|v| millis(&v)).ok_or("no p99")?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(format!("errors during the run:\n{text}"));
    }
    let after = cpu_micros(proxy);
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in"))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .filter(|n| *n > 0.0)
        .ok_or_else(|| format!("no request count in wrk output:\n{text}"))?;
    Ok(Sample {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        user_us: (after.0 - before.0) / requests,
        sys_us: (after.1 - before.1) / requests,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "gateway benchmark: run it with `cargo bench --bench gateway` (or ./scripts/bench)"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let seconds = env_or("BENCH_SECONDS", 5);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| {
        std::fs::read_to_string(root.join("bench").join(name)).map_err(|e| format!("{name}: {e}"))
    };
    let upstream_conf = read("upstream.conf")?;
    let proxy_conf = read("nginx-proxy.conf")?;

    let upstream = Nginx::start_with(dir.path(), None, "/", |listen, d| {
        render(
            &upstream_conf,
            &[("listen", listen), ("dir", &d.display().to_string())],
        )
    })
    .await
    .map_err(|e| e.to_string())?;
    let upstream_addr = format!("127.0.0.1:{}", upstream.port());
    let nginx = Nginx::start_with(dir.path(), None, "/ready", |listen, d| {
        render(
            &proxy_conf,
            &[
                ("listen", listen),
                ("dir", &d.display().to_string()),
                ("upstream", &upstream_addr),
            ],
        )
    })
    .await
    .map_err(|e| e.to_string())?;

    let mut config = GatewayConfig::new(None);
    config.resolver.env =
        EnvSource::Fixed([("BENCH_URL".to_string(), format!("http://{upstream_addr}"))].into());
    // The gateway runs as `rollcall gateway` does (one single-threaded event loop per
    // worker), with as many workers as nginx has worker processes here: one.
    let workers = env_or("BENCH_GATEWAY_WORKERS", 1) as usize;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let listen = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
    let (gw_addr, _threads) =
        gateway::start_workers(listen, config, workers, stopped).map_err(|e| e.to_string())?;
    let gw_url = format!("http://{gw_addr}");
    let mut nginx = nginx;
    let nginx_cpu = nginx_workers(nginx.process().pid());
    let gateway_cpu = gateway_threads();
    if nginx_cpu.is_empty() || gateway_cpu.is_empty() {
        return Err("cannot find the proxies' processes in /proc to read their CPU time".into());
    }
    let targets = [
        (
            "nginx proxy_pass",
            format!("{}/hello", nginx.url()),
            nginx_cpu,
        ),
        (
            "rollcall gateway",
            format!("{gw_url}/v2/bench/hello"),
            gateway_cpu,
        ),
    ];
    println!(
        "gateway benchmark: wrk -t1 -d{seconds}s, {rounds} rounds, {} cores, gateway worker \
         threads: {workers}, nginx worker processes: 1",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (_, url, cpu) in &targets {
        wrk(url, 2, connections, cpu)?; // warm-up: pools, caches
    }
    let light = env_or("BENCH_LIGHT_CONNECTIONS", 4);
    let mut table = Vec::new();
    for conns in [connections, light, 1] {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, (_, url, cpu)) in targets.iter().enumerate() {
                samples[i].push(wrk(url, seconds, conns, cpu)?);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let summary: Vec<Sample> = samples
            .iter()
            .map(|s| Sample {
                rps: median(s.iter().map(|x| x.rps).collect()),
                p50_ms: median(s.iter().map(|x| x.p50_ms).collect()),
                p99_ms: median(s.iter().map(|x| x.p99_ms).collect()),
                user_us: median(s.iter().map(|x| x.user_us).collect()),
                sys_us: median(s.iter().map(|x| x.sys_us).collect()),
            })
            .collect();
        table.push((conns, summary));
    }
    println!();
    println!("| proxy | connections | requests/s | p50 | p99 | CPU per request (user + kernel) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (conns, summary) in &table {
        for ((name, _, _), x) in targets.iter().zip(summary) {
            println!(
                "| {name} | {conns} | {:.0} | {:.3} ms | {:.3} ms | {:.1} + {:.1} µs |",
                x.rps, x.p50_ms, x.p99_ms, x.user_us, x.sys_us
            );
        }
    }
    println!();
    for (conns, summary) in &table {
        let (n, g) = (&summary[0], &summary[1]);
        let throughput = g.rps / n.rps;
        let latency = g.p50_ms / n.p50_ms;
        println!(
            "{conns} connection(s), gateway/nginx: throughput {:.0} % (target >= 70 %: {}), p50 {:.2}x (target <= 1.3x: {})",
            throughput * 100.0,
            if throughput >= 0.7 { "met" } else { "MISSED" },
            latency,
            if latency <= 1.3 { "met" } else { "MISSED" }
        );
    }
    Ok(())
}
