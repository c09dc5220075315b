//! `rollcall dev`: the whole HA topology on this machine (like `consul agent -dev`), started
//! from the system's `redis-server`, `redis-sentinel` and `nginx` through the same launcher the
//! tests use. It writes a state file for the chaos scripts, restarts dead processes on SIGUSR1,
//! and stops everything cleanly on Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};

use tokio::signal::unix::{SignalKind, signal};

use crate::cli::DevArgs;
use crate::launch::{LaunchError, Ports, Prometheus, Topology, TopologySpec};

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("{0}")]
    Setup(String),
}

/// The name of the file in the data directory that marks it as rollcall's own.
pub const STATE_FILE: &str = "state.json";
/// The same facts as shell variables, for the chaos scripts (`source state.env`).
pub const STATE_ENV: &str = "state.env";

pub async fn run(args: DevArgs) -> Result<(), DevError> {
    let dir = args.data_dir.clone();
    prepare_dir(&dir)?;
    let bin = std::env::current_exe()
        .map_err(|e| DevError::Setup(format!("cannot find the rollcall binary: {e}")))?;
    let base = args.port_base;
    let port = |offset: u16| base.checked_add(offset);
    let spec = TopologySpec {
        ports: Ports {
            lb: Some(args.lb_port),
            redis_base: port(0),
            sentinel_base: port(10),
            registry_base: port(20),
            gateway: Some(args.gateway_port),
        },
        ..TopologySpec::standard(bin, dir.clone())
    };
    println!(
        "starting Redis master + 2 replicas, 3 Sentinels, 3 registry replicas, nginx, gateway ..."
    );
    let mut topology = Topology::start(spec).await?;
    let mut prometheus = None;
    if args.prometheus {
        let registries: Vec<String> = topology
            .registries
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port()))
            .collect();
        let gateways: Vec<String> = topology
            .gateway
            .iter()
            .map(|g| format!("127.0.0.1:{}", g.port()))
            .collect();
        prometheus = Some(
            Prometheus::start(
                &dir,
                Some(args.prometheus_port),
                std::time::Duration::from_secs(5),
                &registries,
                &gateways,
            )
            .await?,
        );
    }
    let state_path = dir.join(STATE_FILE);
    write_state(&mut topology, &state_path)?;

    println!();
    println!("rollcall dev is up");
    println!("  registry (nginx LB)  {}", topology.lb_url());
    if let Some(g) = &topology.gateway {
        println!("  gateway              {}/v2/<service>/<path>", g.url());
    }
    for r in &topology.registries {
        println!("  registry replica     {}", r.url());
    }
    for r in &topology.redis {
        println!("  redis                {}", r.url());
    }
    println!(
        "  sentinels            {}  (master set: {})",
        topology.sentinel_addrs().join(","),
        crate::launch::MASTER_NAME
    );
    if let Some(p) = &prometheus {
        println!(
            "  prometheus           {}  (alerts: {}/alerts)",
            p.url(),
            p.url()
        );
    }
    println!("  state file           {}", state_path.display());
    println!("Try: curl {}/health", topology.lb_url());
    println!(
        "Stop: Ctrl-C.  Restart killed processes: kill -USR1 {}",
        std::process::id()
    );

    let mut usr1 = signal(SignalKind::user_defined1())
        .map_err(|e| DevError::Setup(format!("cannot listen for SIGUSR1: {e}")))?;
    let shutdown = crate::server::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = usr1.recv() => {
                restart_dead(&mut topology).await;
                write_state(&mut topology, &state_path)?;
            }
        }
    }
    println!("stopping ...");
    if let Some(p) = &mut prometheus {
        p.process().terminate(std::time::Duration::from_secs(5));
    }
    topology.stop();
    let _ = std::fs::remove_file(&state_path);
    let _ = std::fs::remove_file(state_path.with_file_name(STATE_ENV));
    println!("stopped");
    Ok(())
}

fn write_state(topology: &mut Topology, path: &Path) -> Result<(), DevError> {
    let mut state = topology.state();
    state["dev_pid"] = serde_json::json!(std::process::id());
    let text = serde_json::to_string_pretty(&state)
        .map_err(|e| DevError::Setup(format!("encoding the state file: {e}")))?;
    std::fs::write(path, text)
        .map_err(|e| DevError::Setup(format!("writing {}: {e}", path.display())))?;
    let env_path = path.with_file_name(STATE_ENV);
    std::fs::write(&env_path, state_env(topology))
        .map_err(|e| DevError::Setup(format!("writing {}: {e}", env_path.display())))
}

fn state_env(t: &mut Topology) -> String {
    let mut lines = vec![
        format!("ROLLCALL_DEV_PID={}", std::process::id()),
        format!("ROLLCALL_LB_URL={}", t.lb_url()),
        format!("SENTINEL_MASTER={}", crate::launch::MASTER_NAME),
        format!("NGINX_PID={}", t.nginx.process().pid()),
        format!("NGINX_PORT={}", t.nginx.port()),
        format!(
            "ROLLCALL_GATEWAY_URL={}",
            t.gateway.as_ref().map(|g| g.url()).unwrap_or_default()
        ),
        format!("REGISTRY_COUNT={}", t.registries.len()),
        format!("REDIS_COUNT={}", t.redis.len()),
        format!("SENTINEL_COUNT={}", t.sentinels.len()),
    ];
    for (i, r) in t.registries.iter_mut().enumerate() {
        lines.push(format!("REGISTRY_{i}_PID={}", r.process().pid()));
        lines.push(format!("REGISTRY_{i}_PORT={}", r.port()));
    }
    for (i, r) in t.redis.iter_mut().enumerate() {
        lines.push(format!("REDIS_{i}_PID={}", r.process().pid()));
        lines.push(format!("REDIS_{i}_PORT={}", r.port()));
    }
    for (i, s) in t.sentinels.iter_mut().enumerate() {
        lines.push(format!("SENTINEL_{i}_PID={}", s.process().pid()));
        lines.push(format!("SENTINEL_{i}_PORT={}", s.port()));
    }
    lines.join("\n") + "\n"
}

/// Brings back every process the chaos scripts killed, on its old port.
async fn restart_dead(topology: &mut Topology) {
    for r in &mut topology.redis {
        if !r.process().is_running() {
            report(r.process().name().to_string(), r.restart().await);
        }
    }
    for s in &mut topology.sentinels {
        if !s.process().is_running() {
            let name = s.process().name().to_string();
            report(name, s.process().respawn());
        }
    }
    for r in &mut topology.registries {
        if !r.process().is_running() {
            report(r.process().name().to_string(), r.restart().await);
        }
    }
    if let Some(g) = &mut topology.gateway
        && !g.process().is_running()
    {
        report(g.process().name().to_string(), g.restart().await);
    }
    if !topology.nginx.process().is_running() {
        let name = topology.nginx.process().name().to_string();
        report(name, topology.nginx.process().respawn());
    }
}

fn report(name: String, result: Result<(), LaunchError>) {
    match result {
        Ok(()) => println!("restarted {name}"),
        Err(e) => eprintln!("could not restart {name}: {e}"),
    }
}

/// Starts from a clean directory, but only deletes one that an earlier `rollcall dev` made.
fn prepare_dir(dir: &PathBuf) -> Result<(), DevError> {
    if dir.exists() {
        let ours = dir.join(STATE_FILE).exists() || dir.join(".rollcall-dev").exists();
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !ours && !empty {
            return Err(DevError::Setup(format!(
                "{} exists and was not made by rollcall dev; pick another --data-dir",
                dir.display()
            )));
        }
        if ours {
            std::fs::remove_dir_all(dir)
                .map_err(|e| DevError::Setup(format!("cleaning {}: {e}", dir.display())))?;
        }
    }
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join(".rollcall-dev"), ""))
        .map_err(|e| DevError::Setup(format!("creating {}: {e}", dir.display())))
}
