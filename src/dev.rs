//! `rollcall dev`: the registry and its Redis on this machine, started from the system's
//! `redis-server` through the same launcher the tests use, stopped cleanly on Ctrl-C.

use std::sync::Arc;

use crate::cli::DevArgs;
use crate::launch::{LaunchError, RedisServer};
use crate::server::{self, shutdown_signal};
use crate::store::RedisStore;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("registry replica: {0}")]
    Replica(String),
}

pub async fn run(args: DevArgs) -> Result<(), DevError> {
    // `_temp` is held for the whole run: dropping it removes the temporary data directory.
    let (dir, _temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("rollcall-dev-")
                .tempdir()
                .map_err(|e| LaunchError::io("creating a temporary directory", e))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut redis = RedisServer::start(&dir.join("redis"), args.redis_port).await?;
    tracing::info!(url = %redis.url(), pid = redis.process().pid(), "redis-server ready");

    let store = RedisStore::new(
        &args
            .tuning
            .redis(crate::store::MasterSource::Direct(redis.url())),
    )
    .map_err(|e| DevError::Replica(e.to_string()))?;
    let replica = server::spawn(args.listen, Arc::new(store), args.tuning.options())
        .await
        .map_err(|e| DevError::Replica(format!("cannot listen on {}: {e}", args.listen)))?;

    println!("rollcall dev is up");
    println!("  registry  {}", replica.url());
    println!("  redis     {}", redis.url());
    println!("  data      {}", dir.display());
    println!("Try: curl {}/health    Stop: Ctrl-C", replica.url());

    shutdown_signal().await;
    if let Err(e) = replica.stop().await {
        tracing::warn!(error = %e, "replica did not stop cleanly");
    }
    redis.stop();
    tracing::info!("stopped");
    Ok(())
}
