//! A real `nginx` load-balancing the registry replicas, configured from `nginx/nginx.conf`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{LaunchError, ManagedProcess, free_port, render, wait_http_ok};

const TEMPLATE: &str = include_str!("../../nginx/nginx.conf");

/// `nginx/nginx.conf` with its placeholders filled; `upstreams` are `host:port`.
pub fn config(listen: &str, dir: &Path, upstreams: &[String]) -> String {
    let servers: Vec<String> = upstreams
        .iter()
        .map(|a| format!("server {a} max_fails=0;"))
        .collect();
    render(
        TEMPLATE,
        &[
            ("listen", listen),
            ("dir", &dir.display().to_string()),
            ("upstreams", &servers.join("\n        ")),
        ],
    )
}

/// The nginx binary: Debian installs it outside a normal user's PATH.
pub fn binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

pub struct Nginx {
    process: ManagedProcess,
    port: u16,
}

impl Nginx {
    /// The load balancer of `nginx/nginx.conf` in front of `upstreams`.
    pub async fn start(
        dir: &Path,
        port: Option<u16>,
        upstreams: &[SocketAddr],
    ) -> Result<Self, LaunchError> {
        let upstreams: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
        Self::start_with(dir, port, "/lb-health", |listen, node_dir| {
            config(listen, node_dir, &upstreams)
        })
        .await
    }

    /// nginx with another config (benchmarks): `render(listen, dir)` writes it, and `ready`
    /// is a path that answers 200 once it serves.
    pub async fn start_with(
        dir: &Path,
        port: Option<u16>,
        ready: &str,
        render: impl Fn(&str, &Path) -> String,
    ) -> Result<Self, LaunchError> {
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
        };
        let node_dir = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| LaunchError::io(format!("creating {}", node_dir.display()), e))?;
        let config = render(&format!("127.0.0.1:{port}"), &node_dir);
        let config_path = node_dir.join("nginx.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| LaunchError::io(format!("writing {}", config_path.display()), e))?;
        let mut process = ManagedProcess::spawn(
            format!("nginx:{port}"),
            binary(),
            vec![
                "-e".into(),
                node_dir.join("error.log").display().to_string(),
                "-p".into(),
                node_dir.display().to_string(),
                "-c".into(),
                config_path.display().to_string(),
            ],
            &node_dir.join("nginx.out"),
            "nginx",
            "nginx",
        )?;
        let url = format!("http://127.0.0.1:{port}{ready}");
        wait_http_ok(&mut process, &url).await?;
        Ok(Nginx { process, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(5));
    }
}
