//! A real `redis-server` on a loopback port, configured from `redis-sentinel/redis.conf`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{LaunchError, ManagedProcess, free_port, render, wait_until};

const TEMPLATE: &str = include_str!("../../redis-sentinel/redis.conf");
const PORT_ATTEMPTS: usize = 5;

pub struct RedisServer {
    process: ManagedProcess,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a master with its data and log in `dir` (created if missing) and waits until it
    /// answers PING. With `port` None a free port is picked, and picked again if another
    /// process takes it first.
    pub async fn start(dir: &Path, port: Option<u16>) -> Result<Self, LaunchError> {
        Self::start_with(dir, port, None).await
    }

    /// Starts a replica of the master on `master_port`.
    pub async fn start_replica(
        dir: &Path,
        port: Option<u16>,
        master_port: u16,
    ) -> Result<Self, LaunchError> {
        Self::start_with(dir, port, Some(master_port)).await
    }

    async fn start_with(
        dir: &Path,
        port: Option<u16>,
        replica_of: Option<u16>,
    ) -> Result<Self, LaunchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LaunchError::io(format!("creating {}", dir.display()), e))?;
        let attempts = if port.is_some() { 1 } else { PORT_ATTEMPTS };
        let mut last = None;
        for _ in 0..attempts {
            let port = match port {
                Some(p) => p,
                None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
            };
            match Self::start_on(dir, port, replica_of).await {
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

    async fn start_on(dir: &Path, port: u16, replica_of: Option<u16>) -> Result<Self, LaunchError> {
        let node_dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| LaunchError::io(format!("creating {}", node_dir.display()), e))?;
        let config = config("127.0.0.1", port, &node_dir);
        let config_path = node_dir.join("redis.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| LaunchError::io(format!("writing {}", config_path.display()), e))?;
        let mut args = vec![config_path.display().to_string()];
        if let Some(master) = replica_of {
            args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
        }
        let mut process = ManagedProcess::spawn(
            format!("redis-server:{port}"),
            "redis-server",
            args,
            &node_dir.join("redis.log"),
            "redis-server",
            "redis-server",
        )?;
        wait_for_ping(&mut process, port).await?;
        Ok(RedisServer {
            process,
            port,
            dir: node_dir,
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

    /// Starts it again on the same port with the same data, and waits for PING.
    pub async fn restart(&mut self) -> Result<(), LaunchError> {
        self.process.respawn()?;
        wait_for_ping(&mut self.process, self.port).await
    }
}

/// `redis-sentinel/redis.conf` with its placeholders filled.
pub fn config(bind: &str, port: u16, dir: &Path) -> String {
    render(
        TEMPLATE,
        &[
            ("bind", bind),
            ("port", &port.to_string()),
            ("dir", &dir.display().to_string()),
        ],
    )
}

/// Polls PING until it answers, the process dies, or the launch deadline passes.
pub(super) async fn wait_for_ping(
    process: &mut ManagedProcess,
    port: u16,
) -> Result<(), LaunchError> {
    let url = format!("redis://127.0.0.1:{port}");
    wait_until(process, || query::<String>(&url, redis::cmd("PING")))
        .await
        .map(|_| ())
}

/// One command on a fresh connection, bounded to half a second.
pub(super) async fn query<T: redis::FromRedisValue>(
    url: &str,
    cmd: redis::Cmd,
) -> Result<T, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_millis(500), cmd.query_async(&mut conn))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())
}
