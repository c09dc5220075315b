//! The whole HA topology of DESIGN.md on one machine: a Redis master with replicas, Sentinels
//! watching them, registry replicas (separate processes) following the master through the
//! Sentinels, and nginx in front. `rollcall dev`, the HA tests, the chaos scripts and the
//! benchmarks all start it through `Topology::start`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::try_join_all;
use serde_json::{Value, json};

use super::{LaunchError, MASTER_NAME, Nginx, RedisServer, RegistryProcess, Sentinel};

/// Fixed ports for a topology everyone can find (`rollcall dev`); `None` picks free ones.
#[derive(Debug, Clone, Default)]
pub struct Ports {
    pub lb: Option<u16>,
    /// Registry replica i listens on `registry_base + i`.
    pub registry_base: Option<u16>,
    /// Redis node i (0 = initial master) listens on `redis_base + i`.
    pub redis_base: Option<u16>,
    /// Sentinel i listens on `sentinel_base + i`.
    pub sentinel_base: Option<u16>,
    pub gateway: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct TopologySpec {
    /// The `rollcall` binary to run the registry replicas with.
    pub bin: PathBuf,
    /// Where every process keeps its config, data and log.
    pub dir: PathBuf,
    pub registries: usize,
    pub redis_replicas: usize,
    pub sentinels: usize,
    pub ports: Ports,
    /// Extra `rollcall serve` flags (tests shorten timeouts with these).
    pub serve_args: Vec<String>,
    /// Also run `rollcall gateway` in front of the load balancer.
    pub gateway: bool,
}

impl TopologySpec {
    /// DESIGN.md's topology: 3 registries, a master + 2 replicas, 3 Sentinels.
    pub fn standard(bin: PathBuf, dir: PathBuf) -> Self {
        TopologySpec {
            bin,
            dir,
            registries: 3,
            redis_replicas: 2,
            sentinels: 3,
            ports: Ports::default(),
            serve_args: Vec::new(),
            gateway: true,
        }
    }
}

pub struct Topology {
    pub spec: TopologySpec,
    /// Node 0 is the initial master; after a failover ask `master_index`.
    pub redis: Vec<RedisServer>,
    pub sentinels: Vec<Sentinel>,
    pub registries: Vec<RegistryProcess>,
    pub nginx: Nginx,
    pub gateway: Option<RegistryProcess>,
}

fn nth(base: Option<u16>, i: usize) -> Option<u16> {
    base.and_then(|b| u16::try_from(i).ok().and_then(|i| b.checked_add(i)))
}

impl Topology {
    pub async fn start(spec: TopologySpec) -> Result<Topology, LaunchError> {
        let dir = spec.dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| LaunchError::io(format!("creating {}", dir.display()), e))?;

        let master = RedisServer::start(&dir, nth(spec.ports.redis_base, 0)).await?;
        let master_port = master.port();
        let replicas =
            try_join_all((1..=spec.redis_replicas).map(|i| {
                RedisServer::start_replica(&dir, nth(spec.ports.redis_base, i), master_port)
            }))
            .await?;
        let mut redis = vec![master];
        redis.extend(replicas);

        let mut sentinels = try_join_all(
            (0..spec.sentinels)
                .map(|i| Sentinel::start(&dir, nth(spec.ports.sentinel_base, i), master_port)),
        )
        .await?;
        let others = spec.sentinels.saturating_sub(1);
        for s in &mut sentinels {
            s.wait_sees(others, spec.redis_replicas).await?;
        }
        tracing::info!(
            master = master_port,
            replicas = spec.redis_replicas,
            sentinels = spec.sentinels,
            "Redis and Sentinels ready"
        );

        let sentinel_list = sentinels
            .iter()
            .map(Sentinel::addr)
            .collect::<Vec<_>>()
            .join(",");
        let mut serve_args = vec![
            "--sentinels".to_string(),
            sentinel_list,
            "--sentinel-master".to_string(),
            MASTER_NAME.to_string(),
        ];
        serve_args.extend(spec.serve_args.iter().cloned());
        let registries = try_join_all((0..spec.registries).map(|i| {
            RegistryProcess::start(
                &spec.bin,
                &dir,
                nth(spec.ports.registry_base, i),
                &serve_args,
            )
        }))
        .await?;
        let upstreams: Vec<SocketAddr> = registries
            .iter()
            .map(|r| SocketAddr::from(([127, 0, 0, 1], r.port())))
            .collect();
        let nginx = Nginx::start(&dir, spec.ports.lb, &upstreams).await?;
        tracing::info!(lb = %nginx.url(), "registry replicas and nginx ready");
        let gateway = if spec.gateway {
            Some(
                RegistryProcess::start_gateway(&spec.bin, &dir, spec.ports.gateway, &nginx.url())
                    .await?,
            )
        } else {
            None
        };
        Ok(Topology {
            spec,
            redis,
            sentinels,
            registries,
            nginx,
            gateway,
        })
    }

    pub fn lb_url(&self) -> String {
        self.nginx.url()
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::addr).collect()
    }

    /// Which Redis node the Sentinels name as master now (the majority answer).
    pub async fn master_index(&self) -> Option<usize> {
        let mut votes: Vec<u16> = Vec::new();
        for s in &self.sentinels {
            if let Ok(port) = s.master_port().await {
                votes.push(port);
            }
        }
        votes.sort_unstable();
        let port = votes
            .chunk_by(|a, b| a == b)
            .max_by_key(|run| run.len())
            .and_then(|run| run.first().copied())?;
        self.redis.iter().position(|r| r.port() == port)
    }

    /// Polls until the Sentinels name a master other than node `old` (a failover happened),
    /// answering the new master's index.
    pub async fn wait_for_new_master(&self, old: usize, timeout: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Some(i) = self.master_index().await
                && i != old
            {
                return Some(i);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Every process with its role, port, pid and command line: what the chaos scripts read.
    pub fn state(&mut self) -> Value {
        let mut processes = Vec::new();
        for (i, r) in self.redis.iter_mut().enumerate() {
            let role = if i == 0 {
                "redis-initial-master"
            } else {
                "redis-initial-replica"
            };
            let port = r.port();
            processes.push(entry(role, port, r.process()));
        }
        for s in &mut self.sentinels {
            let port = s.port();
            processes.push(entry("sentinel", port, s.process()));
        }
        for r in &mut self.registries {
            let port = r.port();
            processes.push(entry("registry", port, r.process()));
        }
        let port = self.nginx.port();
        processes.push(entry("nginx", port, self.nginx.process()));
        if let Some(g) = &mut self.gateway {
            let port = g.port();
            processes.push(entry("gateway", port, g.process()));
        }
        json!({
            "lb_url": self.lb_url(),
            "gateway_url": self.gateway.as_ref().map(RegistryProcess::url),
            "registry_urls": self.registries.iter().map(RegistryProcess::url).collect::<Vec<_>>(),
            "sentinels": self.sentinel_addrs(),
            "sentinel_master": MASTER_NAME,
            "dir": self.spec.dir.display().to_string(),
            "processes": processes,
        })
    }

    /// Writes `state()` as JSON to `path` (atomically: write then rename).
    pub fn write_state(&mut self, path: &Path) -> Result<(), LaunchError> {
        let text = serde_json::to_string_pretty(&self.state())
            .map_err(|e| LaunchError::io("encoding the state file", e.into()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| LaunchError::io(format!("writing {}", path.display()), e))
    }

    /// Graceful stop, front to back: gateway, nginx, registries, Sentinels, Redis.
    pub fn stop(&mut self) {
        if let Some(g) = &mut self.gateway {
            g.stop();
        }
        self.nginx.stop();
        for r in &mut self.registries {
            r.stop();
        }
        for s in &mut self.sentinels {
            s.process().terminate(Duration::from_secs(5));
        }
        for r in &mut self.redis {
            r.stop();
        }
    }
}

fn entry(role: &str, port: u16, p: &mut super::ManagedProcess) -> Value {
    json!({
        "role": role,
        "name": p.name(),
        "port": port,
        "pid": p.pid(),
        "running": p.is_running(),
        "log": p.log_path().display().to_string(),
        "argv": p.argv(),
    })
}
