//! A real `redis-sentinel` watching the master set `mymaster`, configured from
//! `redis-sentinel/sentinel.conf`.

use std::path::Path;

use super::redis::query;
use super::{LaunchError, ManagedProcess, free_port, render, wait_until};

const TEMPLATE: &str = include_str!("../../redis-sentinel/sentinel.conf");

/// The master set name in `sentinel.conf`.
pub const MASTER_NAME: &str = "mymaster";

/// `redis-sentinel/sentinel.conf` with its placeholders filled.
pub fn config(bind: &str, port: u16, dir: &Path, master_host: &str, master_port: u16) -> String {
    render(
        TEMPLATE,
        &[
            ("bind", bind),
            ("port", &port.to_string()),
            ("dir", &dir.display().to_string()),
            ("master_host", master_host),
            ("master_port", &master_port.to_string()),
        ],
    )
}

pub struct Sentinel {
    process: ManagedProcess,
    port: u16,
}

impl Sentinel {
    pub async fn start(
        dir: &Path,
        port: Option<u16>,
        master_port: u16,
    ) -> Result<Self, LaunchError> {
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
        };
        let node_dir = dir.join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| LaunchError::io(format!("creating {}", node_dir.display()), e))?;
        let config = config("127.0.0.1", port, &node_dir, "127.0.0.1", master_port);
        let config_path = node_dir.join("sentinel.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| LaunchError::io(format!("writing {}", config_path.display()), e))?;
        let mut process = ManagedProcess::spawn(
            format!("redis-sentinel:{port}"),
            "redis-sentinel",
            vec![config_path.display().to_string()],
            &node_dir.join("sentinel.log"),
            "redis-sentinel",
            "redis-sentinel",
        )?;
        let url = format!("redis://127.0.0.1:{port}");
        wait_until(&mut process, || query::<String>(&url, redis::cmd("PING"))).await?;
        Ok(Sentinel { process, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    /// The port of the master this Sentinel currently names.
    pub async fn master_port(&self) -> Result<u16, String> {
        let (_, port): (String, String) = query(
            &format!("redis://{}", self.addr()),
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME)
                .clone(),
        )
        .await?;
        port.parse().map_err(|e| format!("bad port {port:?}: {e}"))
    }

    /// Waits until this Sentinel knows the other Sentinels and the master's replicas, so that
    /// a failover can start as soon as the master fails.
    pub async fn wait_sees(
        &mut self,
        other_sentinels: usize,
        replicas: usize,
    ) -> Result<(), LaunchError> {
        let url = format!("redis://{}", self.addr());
        wait_until(&mut self.process, || async {
            let fields: Vec<String> = query(
                &url,
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(MASTER_NAME)
                    .clone(),
            )
            .await?;
            let get = |key: &str| -> usize {
                fields
                    .chunks(2)
                    .find(|kv| kv.first().is_some_and(|k| k == key))
                    .and_then(|kv| kv.get(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let (s, r) = (get("num-other-sentinels"), get("num-slaves"));
            if s >= other_sentinels && r >= replicas {
                Ok(())
            } else {
                Err(format!(
                    "sees {s}/{other_sentinels} other Sentinels and {r}/{replicas} replicas"
                ))
            }
        })
        .await
    }
}
