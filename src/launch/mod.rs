//! Starts and stops the real processes rollcall runs on: `redis-server` today, the whole
//! topology as it grows. `rollcall dev`, the integration tests and the benchmarks all go
//! through this code, so what is tested is what developers run.
//!
//! Every process is owned by a guard that kills it when dropped (also when a test panics),
//! and is started with a parent-death signal so that not even a killed test runner leaves
//! one behind.

pub mod nginx;
mod ports;
mod process;
pub mod prometheus;
pub mod redis;
mod registry;
pub mod sentinel;
mod topology;

pub use self::nginx::Nginx;
pub use self::ports::free_port;
pub use self::process::ManagedProcess;
pub use self::prometheus::Prometheus;
pub use self::redis::RedisServer;
pub use self::registry::RegistryProcess;
pub use self::sentinel::{MASTER_NAME, Sentinel};
pub use self::topology::{Ports, Topology, TopologySpec};

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a started process may take to answer before the launch counts as failed.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("`{binary}` is not installed; install it with: apt-get install {package}")]
    Missing {
        binary: &'static str,
        package: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} did not become ready: {detail}\n--- last lines of its log ---\n{log}")]
    NotReady {
        name: String,
        detail: String,
        log: String,
    },
}

impl LaunchError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LaunchError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Polls `check` until it succeeds, the process exits, or `READY_TIMEOUT` passes.
pub(crate) async fn wait_until<T, F, Fut>(
    process: &mut ManagedProcess,
    mut check: F,
) -> Result<T, LaunchError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !process.is_running() {
            return Err(LaunchError::NotReady {
                name: process.name().to_string(),
                detail: "the process exited".into(),
                log: process.log_tail(20),
            });
        }
        match check().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                return Err(LaunchError::NotReady {
                    name: process.name().to_string(),
                    detail: format!("not ready within {READY_TIMEOUT:?}: {e}"),
                    log: process.log_tail(20),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Polls `GET url` until it answers 200 (see `wait_until`).
pub(crate) async fn wait_http_ok(
    process: &mut ManagedProcess,
    url: &str,
) -> Result<(), LaunchError> {
    wait_until(process, || async {
        match http_status(url).await? {
            200 => Ok(()),
            s => Err(format!("{url} answered {s}")),
        }
    })
    .await
}

/// Answers the HTTP status of `GET url`, for readiness checks.
async fn http_status(url: &str) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(1000))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// Fills the `{{key}}` placeholders of a config template from the repository.
pub fn render(template: &str, vars: &[(&str, &str)]) -> String {
    vars.iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn render_substitutes_every_placeholder() {
        let out = super::render(
            "port {{port}}\ndir {{dir}}\nport2 {{port}}",
            &[("port", "7"), ("dir", "/d")],
        );
        assert_eq!(out, "port 7\ndir /d\nport2 7");
    }
}
