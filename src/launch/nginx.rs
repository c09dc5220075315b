//! A real `nginx` load-balancing the registry replicas, configured from `nginx/nginx.conf`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{LaunchError, ManagedProcess, free_port, http_status, render, wait_until};

const TEMPLATE: &str = include_str!("../../nginx/nginx.conf");

pub struct Nginx {
    process: ManagedProcess,
    port: u16,
}

impl Nginx {
    pub async fn start(
        dir: &Path,
        port: Option<u16>,
        upstreams: &[SocketAddr],
    ) -> Result<Self, LaunchError> {
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
        };
        let node_dir = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(&node_dir)
            .map_err(|e| LaunchError::io(format!("creating {}", node_dir.display()), e))?;
        let servers: Vec<String> = upstreams
            .iter()
            .map(|a| format!("server {a} max_fails=0;"))
            .collect();
        let config = render(
            TEMPLATE,
            &[
                ("listen", &format!("127.0.0.1:{port}")),
                ("dir", &node_dir.display().to_string()),
                ("upstreams", &servers.join("\n        ")),
            ],
        );
        let config_path = node_dir.join("nginx.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| LaunchError::io(format!("writing {}", config_path.display()), e))?;
        let nginx = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        let mut process = ManagedProcess::spawn(
            format!("nginx:{port}"),
            nginx,
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
        let url = format!("http://127.0.0.1:{port}/lb-health");
        wait_until(&mut process, || async {
            match http_status(&url).await? {
                200 => Ok(()),
                s => Err(format!("/lb-health answered {s}")),
            }
        })
        .await?;
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
