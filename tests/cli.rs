//! The `rollcall` binary itself: help, flag errors, start-up, and graceful shutdown on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_rollcall");

/// Kills the child if the test fails before it exits on its own.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    rollcall::launch::free_port().expect("free port")
}

/// The first of `n` consecutive ports that are free now, below the kernel's ephemeral range
/// (from 32768), where the other tests' free ports come from, so nothing else takes them.
fn free_port_block(n: u16) -> u16 {
    let start = 20_000 + (std::process::id() % 1_000) as u16 * 10;
    (0..1_000u16)
        .map(|i| 20_000 + (start - 20_000 + i * 30) % 12_000)
        .find(|base| {
            (*base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        })
        .expect("a free block of ports")
}

#[test]
fn help_lists_subcommands_and_env_vars() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("serve") && text.contains("dev"), "{text}");
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--redis-url",
        "ROLLCALL_REDIS_URL",
        "--listen",
        "ROLLCALL_LISTEN",
    ] {
        assert!(
            text.contains(needle),
            "`serve --help` lacks {needle}:\n{text}"
        );
    }
}

#[test]
fn a_bad_flag_value_is_named() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "nowhere"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--listen"), "{text}");
}

async fn wait_healthy(http: &reqwest::Client, url: &str) -> bool {
    eventually(Duration::from_secs(10), || async {
        http.get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
}

fn sigterm_and_wait(child: &mut Child) -> Option<i32> {
    let pid = Pid::from_raw(i32::try_from(child.0.id()).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.0.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test]
async fn serve_without_redis_warns_and_stops_cleanly_on_sigterm() {
    let port = free_port();
    let mut child = Child(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("ROLLCALL_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start"),
    );
    let http = reqwest::Client::new();
    assert!(wait_healthy(&http, &format!("http://127.0.0.1:{port}/health")).await);
    assert_eq!(
        sigterm_and_wait(&mut child),
        Some(0),
        "exit code after SIGTERM"
    );
    let mut stderr = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        use std::io::Read;
        e.read_to_string(&mut stderr).expect("read stderr");
    }
    assert!(stderr.contains("NO REDIS CONFIGURED"), "{stderr}");
    assert!(
        stderr
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "--log-format json must print one JSON object per line:\n{stderr}"
    );
}

#[tokio::test]
async fn serve_with_redis_keeps_entries_across_a_replica_restart() {
    let cluster = Cluster::start(0).await;
    let http = reqwest::Client::new();
    let port = free_port();
    let start = || {
        Child(
            Command::new(BIN)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .env("ROLLCALL_REDIS_URL", cluster.redis.url())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start"),
        )
    };
    let base = format!("http://127.0.0.1:{port}");
    let mut first = start();
    assert!(wait_healthy(&http, &format!("{base}/health")).await);
    let resp = http
        .post(format!("{base}/register"))
        .body(r#"{"service_name": "kept", "endpoint": "http://k:1"}"#)
        .send()
        .await
        .expect("register");
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(sigterm_and_wait(&mut first), Some(0));

    let _second = start();
    assert!(wait_healthy(&http, &format!("{base}/health")).await);
    let resp = http
        .get(format!("{base}/services/kept"))
        .send()
        .await
        .expect("get");
    assert_eq!(
        resp.status().as_u16(),
        200,
        "a replica keeps no state of its own"
    );
}

#[tokio::test]
async fn dev_brings_up_the_cluster_and_leaves_nothing_running_after_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("dev");
    let lb = free_port();
    let gateway = free_port();
    let base = free_port_block(23);
    let mut child = Child(
        Command::new(BIN)
            .args([
                "dev",
                "--lb-port",
                &lb.to_string(),
                "--port-base",
                &base.to_string(),
                "--gateway-port",
                &gateway.to_string(),
            ])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start"),
    );
    let http = reqwest::Client::new();
    assert!(
        eventually(Duration::from_secs(30), || async {
            data.join("state.env").exists()
        })
        .await,
        "rollcall dev writes its state file once the cluster is up"
    );
    assert!(wait_healthy(&http, &format!("http://127.0.0.1:{lb}/health")).await);
    assert!(wait_healthy(&http, &format!("http://127.0.0.1:{gateway}/gateway/status")).await);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("state.json")).expect("state"))
            .expect("json");
    let pids: Vec<i32> = state["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["pid"].as_i64().expect("pid") as i32)
        .collect();
    assert_eq!(
        pids.len(),
        11,
        "3 Redis, 3 Sentinels, 3 registries, nginx, gateway"
    );

    assert_eq!(sigterm_and_wait(&mut child), Some(0));
    for pid in pids {
        assert!(
            kill(Pid::from_raw(pid), None).is_err(),
            "process {pid} is still running after rollcall dev stopped"
        );
    }
    assert!(
        !data.join("state.json").exists(),
        "the state file is removed"
    );
}

#[tokio::test]
async fn gateway_runs_its_workers_and_stops_cleanly_on_sigterm() {
    let port = free_port();
    let registry = free_port();
    let mut child = Child(
        Command::new(BIN)
            .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--registry-url", &format!("http://127.0.0.1:{registry}")])
            .args(["--workers", "2"])
            .env("ENVONLY_URL", format!("http://127.0.0.1:{registry}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start"),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    assert!(wait_healthy(&http, &format!("{base}/gateway/status")).await);
    // Nothing listens on the registry port: the env var names the service, and its instance
    // refuses the connection, which the gateway reports as an upstream error.
    let resp = http
        .get(format!("{base}/v2/envonly/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 502);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "upstream_connect");
    assert_eq!(body["source"], "upstream");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("127.0.0.1:{registry}")) && detail.contains("refused"),
        "the detail names the instance and the cause: {detail}"
    );
    assert_eq!(sigterm_and_wait(&mut child), Some(0));
}
