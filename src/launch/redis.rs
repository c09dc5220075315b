//! A real `redis-server` on a loopback port, configured from `redis-sentinel/redis.conf`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{LaunchError, ManagedProcess, READY_TIMEOUT, free_port, render};

const TEMPLATE: &str = include_str!("../../redis-sentinel/redis.conf");
const PORT_ATTEMPTS: usize = 5;

pub struct RedisServer {
    process: ManagedProcess,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts redis-server with its data and log in `dir` (created if missing) and waits until
    /// it answers PING. With `port` None a free port is picked, and picked again if another
    /// process takes it first.
    pub async fn start(dir: &Path, port: Option<u16>) -> Result<Self, LaunchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LaunchError::io(format!("creating {}", dir.display()), e))?;
        let attempts = if port.is_some() { 1 } else { PORT_ATTEMPTS };
        let mut last = None;
        for _ in 0..attempts {
            let port = match port {
                Some(p) => p,
                None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
            };
            match Self::start_on(dir, port).await {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(LaunchError::NotReady {
            name: "redis-server".into(),
            detail: "no attempt was made".into(),
            log: String::new(),
        }))
    }

    async fn start_on(dir: &Path, port: u16) -> Result<Self, LaunchError> {
        let dir_text = dir.display().to_string();
        let port_text = port.to_string();
        let config = render(
            TEMPLATE,
            &[
                ("bind", "127.0.0.1"),
                ("port", &port_text),
                ("dir", &dir_text),
            ],
        );
        let config_path = dir.join(format!("redis-{port}.conf"));
        std::fs::write(&config_path, config)
            .map_err(|e| LaunchError::io(format!("writing {}", config_path.display()), e))?;
        let mut cmd = Command::new("redis-server");
        cmd.arg(&config_path);
        let mut process = ManagedProcess::spawn(
            format!("redis-server:{port}"),
            cmd,
            &dir.join(format!("redis-{port}.log")),
            "redis-server",
            "redis-server",
        )?;
        wait_for_ping(&mut process, port).await?;
        Ok(RedisServer {
            process,
            port,
            dir: dir.to_path_buf(),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    /// Graceful stop (SIGTERM): Redis flushes its append-only file first.
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(5));
    }
}

/// Polls PING until it answers, the process dies, or `READY_TIMEOUT` passes.
pub(super) async fn wait_for_ping(
    process: &mut ManagedProcess,
    port: u16,
) -> Result<(), LaunchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let url = format!("redis://127.0.0.1:{port}");
    loop {
        if !process.is_running() {
            return Err(LaunchError::NotReady {
                name: process.name().to_string(),
                detail: "the process exited".into(),
                log: process.log_tail(20),
            });
        }
        let last_error = match ping(&url).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(LaunchError::NotReady {
                name: process.name().to_string(),
                detail: format!("no PONG within {READY_TIMEOUT:?}: {last_error}"),
                log: process.log_tail(20),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(format!("unexpected answer {pong:?}"))
    }
}
