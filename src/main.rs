//! The `rollcall` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

// The gateway allocates a little for every proxied request (headers, URIs, futures); mimalloc
// serves that measurably faster than glibc's allocator (see the README's benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use rollcall::cli::{Cli, Command};
use rollcall::server::{self, StoreConfig};
use rollcall::{dev, logging};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Dev(args) => dev::run(args).await.map_err(|e| e.to_string()),
        Command::Gateway(args) => gateway(*args).await,
        Command::Node(node) => Err(rollcall::node::run(node)),
        Command::Load(args) => match rollcall::load::command(&args).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("rollcall: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn gateway(args: rollcall::cli::GatewayArgs) -> Result<(), String> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    tracing::info!(listen = %args.listen, registry = %args.registry_url, workers, "rollcall gateway starting");
    let mut serving = tokio::spawn(rollcall::gateway::run_workers(
        args.listen,
        args.config(),
        workers,
        stopped,
    ));
    let result = tokio::select! {
        () = server::shutdown_signal() => {
            let _ = stop.send(true);
            (&mut serving).await
        }
        ended = &mut serving => ended,
    };
    result
        .map_err(|e| format!("serving: {e}"))?
        .map_err(|e| format!("cannot serve on {}: {e}", args.listen))?;
    tracing::info!("stopped");
    Ok(())
}

async fn serve(args: rollcall::cli::ServeArgs) -> Result<(), String> {
    let config = args.store();
    match &config {
        StoreConfig::Memory => tracing::warn!(
            "NO REDIS CONFIGURED: using an in-memory store. Entries are lost on restart and \
             are NOT shared with other replicas. Use --redis-url for anything but a trial."
        ),
        StoreConfig::Redis(c) => tracing::info!(source = ?c.source, "using Redis"),
    }
    let store = server::build_store(&config).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, "rollcall serve ready");
    server::run(
        listener,
        store,
        args.tuning.options(),
        server::shutdown_signal(),
    )
    .await
    .map_err(|e| format!("serving: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}
