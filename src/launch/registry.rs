//! `rollcall serve` replicas and `rollcall gateway` as their own OS processes, so that chaos
//! tests can kill them for real.

use std::path::Path;
use std::time::Duration;

use super::{LaunchError, ManagedProcess, free_port, wait_http_ok};

pub struct RegistryProcess {
    process: ManagedProcess,
    port: u16,
}

impl RegistryProcess {
    /// Runs `bin serve --listen 127.0.0.1:<port> <args…>` and waits until `/health` answers
    /// 200 (which requires Redis to answer too).
    pub async fn start(
        bin: &Path,
        dir: &Path,
        port: Option<u16>,
        args: &[String],
    ) -> Result<Self, LaunchError> {
        Self::start_command(bin, dir, port, "serve", "registry", args).await
    }

    /// Runs `bin gateway --listen 127.0.0.1:<port> --registry-url <registry>`.
    pub async fn start_gateway(
        bin: &Path,
        dir: &Path,
        port: Option<u16>,
        registry: &str,
    ) -> Result<Self, LaunchError> {
        let args = ["--registry-url".to_string(), registry.to_string()];
        Self::start_command(bin, dir, port, "gateway", "gateway", &args).await
    }

    async fn start_command(
        bin: &Path,
        dir: &Path,
        port: Option<u16>,
        command: &str,
        role: &str,
        args: &[String],
    ) -> Result<Self, LaunchError> {
        let port = match port {
            Some(p) => p,
            None => free_port().map_err(|e| LaunchError::io("picking a free port", e))?,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| LaunchError::io(format!("creating {}", dir.display()), e))?;
        let mut argv = vec![
            command.to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        argv.extend(args.iter().cloned());
        let process = ManagedProcess::spawn(
            format!("{role}:{port}"),
            &bin.display().to_string(),
            argv,
            &dir.join(format!("{role}-{port}.log")),
            "rollcall",
            "rollcall (cargo build)",
        )?;
        let mut replica = RegistryProcess { process, port };
        replica.wait_ready().await?;
        Ok(replica)
    }

    async fn wait_ready(&mut self) -> Result<(), LaunchError> {
        let url = format!("{}/health", self.url());
        wait_http_ok(&mut self.process, &url).await
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

    /// SIGTERM: the replica finishes in-flight requests and exits.
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }

    /// Starts it again on the same port and waits until it is healthy.
    pub async fn restart(&mut self) -> Result<(), LaunchError> {
        self.process.respawn()?;
        self.wait_ready().await
    }
}
