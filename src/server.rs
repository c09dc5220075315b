//! Runs a registry replica: builds its store, serves the API, and shuts down gracefully.
//!
//! `run` takes an already-bound listener and a shutdown future (the mini-redis pattern), so
//! tests bind port 0 and stop a replica on demand; `spawn` wraps that into a handle for
//! in-process replicas (tests, `rollcall dev`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{ApiConfig, AppState, router};
use crate::metrics::RegistryMetrics;
use crate::registry::{Registry, ResilienceConfig};
use crate::store::{MemoryStore, RedisConfig, RedisStore, Store, StoreError};

/// Where a replica keeps its entries.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// Single-node trials only: not shared, lost on restart.
    Memory,
    Redis(RedisConfig),
}

pub fn build_store(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(MemoryStore::new()),
        StoreConfig::Redis(c) => Arc::new(RedisStore::new(c)?),
    })
}

/// How a replica serves: HTTP limits and the breaker/cache in front of its store.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub api: ApiConfig,
    pub resilience: ResilienceConfig,
}

/// Serves the registry API on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish before returning.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let metrics =
        Arc::new(RegistryMetrics::new().map_err(|e| io::Error::other(format!("metrics: {e}")))?);
    let registry = Registry::new(store, options.resilience, metrics.clone());
    let state = AppState::new(registry, metrics, &options.api);
    axum::serve(listener, router(state, &options.api))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An in-process replica; dropping the handle stops it.
pub struct ReplicaHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl ReplicaHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, waits for in-flight requests, and reports how serving ended.
    pub async fn stop(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Binds `listen` and serves on a background task.
pub async fn spawn(
    listen: SocketAddr,
    store: Arc<dyn Store>,
    options: Options,
) -> io::Result<ReplicaHandle> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(listener, store, options, async move {
        let _ = stopped.await;
    }));
    Ok(ReplicaHandle {
        addr,
        stop: Some(stop),
        task: Some(task),
    })
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}
