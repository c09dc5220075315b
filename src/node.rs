//! `rollcall node`: runs one piece of the topology in the foreground from the repository's own
//! config files, for containers (docker-compose) where `rollcall dev` does not fit. The config
//! is rendered exactly as `rollcall dev` renders it, then the process is replaced by
//! `redis-server`, `redis-sentinel`, `nginx` or `prometheus` so that signals reach it directly.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Args, Subcommand};

use crate::launch::{nginx, prometheus, redis, sentinel};

#[derive(Debug, Subcommand)]
pub enum Node {
    /// A Redis data node (master, or replica with --replica-of).
    Redis(RedisNode),
    /// A Redis Sentinel watching the master set `mymaster`.
    Sentinel(SentinelNode),
    /// The nginx load balancer in front of the registry replicas.
    Nginx(NginxNode),
    /// Prometheus scraping the registry replicas and gateways, with rollcall's alert rules.
    Prometheus(PrometheusNode),
}

#[derive(Debug, Args)]
pub struct PrometheusNode {
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub listen: String,
    /// Registry replicas, host:port,host:port,...
    #[arg(long, value_delimiter = ',', required = true)]
    pub registries: Vec<String>,
    /// Gateways, host:port,...
    #[arg(long, value_delimiter = ',', required = true)]
    pub gateways: Vec<String>,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub scrape_interval: std::time::Duration,
    #[arg(long, default_value = "/prometheus")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RedisNode {
    #[arg(long, default_value_t = 6379)]
    pub port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: String,
    /// host:port of the master to replicate.
    #[arg(long)]
    pub replica_of: Option<String>,
    #[arg(long, default_value = "/data")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct SentinelNode {
    #[arg(long, default_value_t = 26379)]
    pub port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: String,
    /// host:port of the initial master.
    #[arg(long)]
    pub master: String,
    #[arg(long, default_value = "/data")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct NginxNode {
    #[arg(long, default_value = "0.0.0.0:8888")]
    pub listen: String,
    /// Registry replicas, host:port,host:port,...
    #[arg(long, value_delimiter = ',', required = true)]
    pub upstreams: Vec<String>,
    #[arg(long, default_value = "/tmp/rollcall-nginx")]
    pub dir: PathBuf,
}

/// Renders the config and replaces this process with the server; returns only on failure.
pub fn run(node: Node) -> String {
    let result = match node {
        Node::Redis(n) => prepare(
            &n.dir,
            "redis.conf",
            &redis::config(&n.bind, n.port, &n.dir),
        )
        .map(|conf| {
            let mut cmd = Command::new("redis-server");
            cmd.arg(conf);
            if let Some((host, port)) = n.replica_of.as_deref().and_then(|m| m.rsplit_once(':')) {
                cmd.args(["--replicaof", host, port]);
            }
            cmd
        }),
        Node::Sentinel(n) => split(&n.master).and_then(|(host, port)| {
            prepare(
                &n.dir,
                "sentinel.conf",
                &sentinel::config(&n.bind, n.port, &n.dir, host, port),
            )
            .map(|conf| {
                let mut cmd = Command::new("redis-sentinel");
                cmd.arg(conf);
                cmd
            })
        }),
        Node::Nginx(n) => prepare(
            &n.dir,
            "nginx.conf",
            &nginx::config(&n.listen, &n.dir, &n.upstreams),
        )
        .map(|conf| {
            let mut cmd = Command::new(nginx::binary());
            cmd.arg("-e")
                .arg(n.dir.join("error.log"))
                .arg("-p")
                .arg(&n.dir)
                .arg("-c")
                .arg(conf);
            cmd
        }),
        Node::Prometheus(n) => {
            prometheus::write_config(&n.dir, n.scrape_interval, &n.registries, &n.gateways)
                .map_err(|e| e.to_string())
                .map(|conf| {
                    let mut cmd = Command::new("prometheus");
                    cmd.arg(format!("--config.file={}", conf.display()))
                        .arg(format!(
                            "--storage.tsdb.path={}",
                            n.dir.join("data").display()
                        ))
                        .arg(format!("--web.listen-address={}", n.listen));
                    cmd
                })
        }
    };
    match result {
        Ok(mut cmd) => {
            let program = cmd.get_program().to_string_lossy().into_owned();
            let error = cmd.exec();
            format!("cannot start {program}: {error}")
        }
        Err(e) => e,
    }
}

fn split(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("expected host:port, got {addr:?}"))?;
    let port = port
        .parse()
        .map_err(|e| format!("bad port in {addr:?}: {e}"))?;
    Ok((host, port))
}

fn prepare(dir: &Path, name: &str, config: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, config).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}
