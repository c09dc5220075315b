//! A real `prometheus` scraping the registry replicas and gateways, configured from
//! `prometheus/prometheus.yml` with the rules of `prometheus/alerts.yml`.

use std::path::Path;
use std::time::Duration;

use super::{LaunchError, ManagedProcess, free_port, render, wait_http_ok};

const TEMPLATE: &str = include_str!("../../prometheus/prometheus.yml");
/// The alert rules, written next to the rendered config.
pub const ALERTS: &str = include_str!("../../prometheus/alerts.yml");

/// `prometheus/prometheus.yml` with its placeholders filled; targets are `host:port`.
pub fn config(
    scrape_interval: Duration,
    rules: &Path,
    registries: &[String],
    gateways: &[String],
) -> String {
    let quoted = |list: &[String]| {
        list.iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    render(
        TEMPLATE,
        &[
            (
                "scrape_interval",
                &humantime::format_duration(scrape_interval).to_string(),
            ),
            ("rules", &rules.display().to_string()),
            ("registry_targets", &quoted(registries)),
            ("gateway_targets", &quoted(gateways)),
        ],
    )
}

/// Writes the config and the rules into `dir`; answers the config's path.
pub fn write_config(
    dir: &Path,
    scrape_interval: Duration,
    registries: &[String],
    gateways: &[String],
) -> Result<std::path::PathBuf, LaunchError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LaunchError::io(format!("creating {}", dir.display()), e))?;
    let rules = dir.join("alerts.yml");
    std::fs::write(&rules, ALERTS)
        .map_err(|e| LaunchError::io(format!("writing {}", rules.display()), e))?;
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config(scrape_interval, &rules, registries, gateways))
        .map_err(|e| LaunchError::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

pub struct Prometheus {
    process: ManagedProcess,
    port: u16,
}

impl Prometheus {
    pub async fn start(
        dir: &Path,
        port: Option<u16>,
        scrape_interval: Duration,
        registries: &[String],
        gateways: &[String],
    ) -> Result<Self, LaunchError> {
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
        };
        let node_dir = dir.join(format!("prometheus-{port}"));
        let config = write_config(&node_dir, scrape_interval, registries, gateways)?;
        let mut process = ManagedProcess::spawn(
            format!("prometheus:{port}"),
            "prometheus",
            vec![
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", node_dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ],
            &node_dir.join("prometheus.log"),
            "prometheus",
            "prometheus",
        )?;
        let url = format!("http://127.0.0.1:{port}/-/ready");
        wait_http_ok(&mut process, &url).await?;
        Ok(Prometheus { process, port })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}
