//! The command line: one binary, `rollcall`, with a subcommand per role. Every flag can also
//! be set through an environment variable (`ROLLCALL_…`), which is how containers configure it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::ApiConfig;
use crate::breaker::BreakerConfig;
use crate::logging::LogFormat;
use crate::registry::ResilienceConfig;
use crate::server::{Options, StoreConfig};
use crate::store::{MasterSource, RedisConfig};

#[derive(Debug, Parser)]
#[command(
    name = "rollcall",
    version,
    about = "A highly-available service registry and discovery gateway",
    long_about = "rollcall keeps track of which HTTP services are alive and where.\n\
        Services register and heartbeat; entries expire by TTL in Redis; any replica\n\
        answers any request.\n\n\
        Quick start:  rollcall dev        (the whole HA cluster on this machine)\n\
        Production:   rollcall serve --sentinels s1:26379,s2:26379,s3:26379"
)]
pub struct Cli {
    /// Log format: human-readable text or one JSON object per line. Level: RUST_LOG.
    #[arg(
        long,
        env = "ROLLCALL_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a registry replica (stateless; entries live in Redis).
    Serve(Box<ServeArgs>),
    /// Run the whole HA cluster on this machine (Redis master + 2 replicas, 3 Sentinels,
    /// 3 registry replicas, nginx, gateway); Ctrl-C stops everything.
    Dev(DevArgs),
    /// Run the gateway: routes /v2/<service>/<path> to a live instance of the service.
    Gateway(Box<GatewayArgs>),
    /// Drive steady lookups and registrations against a registry and report what failed
    /// (the chaos scripts run this while they break things).
    Load(LoadArgs),
    /// Run one piece of the topology (redis, sentinel, nginx) in the foreground from
    /// rollcall's config files: what the docker-compose services run.
    #[command(subcommand)]
    Node(crate::node::Node),
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to serve the gateway on.
    #[arg(long, env = "ROLLCALL_GATEWAY_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,

    /// The registry, through its load balancer. Services it does not know are looked up in
    /// `<SERVICE>_URL` environment variables.
    #[arg(
        long,
        env = "ROLLCALL_REGISTRY_URL",
        default_value = "http://127.0.0.1:8888"
    )]
    pub registry_url: String,

    /// How long a resolution is served from the local cache without asking the registry.
    #[arg(long, env = "ROLLCALL_GATEWAY_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// How long the last good resolution keeps serving while the registry is unreachable,
    /// before the env var is tried.
    #[arg(long, env = "ROLLCALL_GATEWAY_STALE_FOR", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stale_for: Duration,

    /// Longest wait for the registry's answer.
    #[arg(long, env = "ROLLCALL_GATEWAY_REGISTRY_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub registry_timeout: Duration,

    /// Consecutive registry failures that open the gateway's circuit breaker.
    #[arg(long, env = "ROLLCALL_GATEWAY_BREAKER_THRESHOLD", default_value_t = 3)]
    pub breaker_threshold: u32,

    /// How long the breaker stays open before the registry is tried again.
    #[arg(long, env = "ROLLCALL_GATEWAY_BREAKER_COOLDOWN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub breaker_cooldown: Duration,

    /// Longest wait for a connection to an upstream instance (then the next one is tried).
    #[arg(long, env = "ROLLCALL_GATEWAY_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Longest wait for an upstream's response headers (504 after).
    #[arg(long, env = "ROLLCALL_GATEWAY_RESPONSE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,

    /// Longest pause inside a request or response body before the exchange is cut.
    #[arg(long, env = "ROLLCALL_GATEWAY_BODY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,

    /// Largest request body passed upstream, in bytes (413 above).
    #[arg(long, env = "ROLLCALL_GATEWAY_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Consecutive connect failures after which an instance is skipped.
    #[arg(long, env = "ROLLCALL_GATEWAY_EJECT_AFTER", default_value_t = 3)]
    pub eject_after: u32,

    /// How long an ejected instance is skipped.
    #[arg(long, env = "ROLLCALL_GATEWAY_EJECT_FOR", default_value = "10s", value_parser = humantime::parse_duration)]
    pub eject_for: Duration,

    /// Event-loop threads, each with its own socket on --listen (default: one per core).
    #[arg(long, env = "ROLLCALL_GATEWAY_WORKERS")]
    pub workers: Option<usize>,
}

impl GatewayArgs {
    pub fn config(&self) -> crate::gateway::GatewayConfig {
        let mut c = crate::gateway::GatewayConfig::new(Some(
            self.registry_url.trim_end_matches('/').to_string(),
        ));
        c.resolver.cache_ttl = self.cache_ttl;
        c.resolver.stale_for = self.stale_for;
        c.resolver.registry_timeout = self.registry_timeout;
        c.resolver.breaker = BreakerConfig {
            threshold: self.breaker_threshold.max(1),
            cooldown: self.breaker_cooldown,
        };
        c.ejection.after_failures = self.eject_after.max(1);
        c.ejection.for_duration = self.eject_for;
        c.connect_timeout = self.connect_timeout;
        c.response_timeout = self.response_timeout;
        c.body_idle_timeout = self.body_idle_timeout;
        c.max_body_bytes = self.max_body_bytes;
        c
    }
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Registry URL, usually the load balancer.
    #[arg(
        long,
        env = "ROLLCALL_LOAD_URL",
        default_value = "http://127.0.0.1:8888"
    )]
    pub url: String,

    /// How long to drive load.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Concurrent lookup loops.
    #[arg(long, default_value_t = 4)]
    pub readers: usize,

    /// Concurrent registration loops.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,

    /// Pause between two requests of one loop.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub pause: Duration,

    /// Services registered before the load starts, then looked up by the readers.
    #[arg(long, default_value_t = 5)]
    pub seed: usize,

    /// Also send requests through this gateway (to a service registered for the run whose
    /// instance is the load balancer at --url), and report how they were resolved.
    #[arg(long, env = "ROLLCALL_LOAD_GATEWAY")]
    pub gateway: Option<String>,

    /// Fail if any request through the gateway failed.
    #[arg(long)]
    pub expect_no_failed_gateway: bool,

    /// Fail (exit 1) if any lookup failed.
    #[arg(long)]
    pub expect_no_failed_reads: bool,

    /// Fail if any registration failed.
    #[arg(long)]
    pub expect_no_failed_writes: bool,

    /// Fail if registrations kept failing for longer than this (first to last failure).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_write_outage: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve the registry API on.
    #[arg(long, env = "ROLLCALL_LISTEN", default_value = "0.0.0.0:8888")]
    pub listen: SocketAddr,

    /// A single Redis to keep entries in, e.g. redis://127.0.0.1:6379/0. Without it (and
    /// without --sentinels) an in-memory store is used: single node only, lost on restart.
    #[arg(long, env = "ROLLCALL_REDIS_URL", conflicts_with = "sentinels")]
    pub redis_url: Option<String>,

    /// Redis Sentinels (host:port,host:port,...) that name the current master; failovers are
    /// followed without a restart.
    #[arg(long, env = "ROLLCALL_SENTINELS", value_delimiter = ',')]
    pub sentinels: Vec<String>,

    /// The master set the Sentinels watch.
    #[arg(long, env = "ROLLCALL_SENTINEL_MASTER", default_value = "mymaster")]
    pub sentinel_master: String,

    #[command(flatten)]
    pub tuning: Tuning,
}

/// Knobs shared by `serve` and `dev`.
#[derive(Debug, Clone, Args)]
pub struct Tuning {
    /// Prefix of every Redis key, so several registries can share one Redis.
    #[arg(long, env = "ROLLCALL_KEY_PREFIX", default_value = "rollcall:")]
    pub key_prefix: String,

    /// Longest wait for one Redis command before the request fails with 503.
    #[arg(long, env = "ROLLCALL_REDIS_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Longest wait for a connection to Redis (or an answer from the Sentinels).
    #[arg(long, env = "ROLLCALL_REDIS_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub redis_connect_timeout: Duration,

    /// Redis replicas that must confirm a registration, deregistration or promotion before it
    /// is acknowledged (WAIT). Default: 1 with --sentinels, 0 with --redis-url.
    #[arg(long, env = "ROLLCALL_MIN_REPLICA_ACKS")]
    pub min_replica_acks: Option<u32>,

    /// How long to wait for those confirmations before answering 503 `not_replicated`.
    #[arg(long, env = "ROLLCALL_REPLICA_ACK_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub replica_ack_timeout: Duration,

    /// Consecutive Redis failures that open the circuit breaker.
    #[arg(long, env = "ROLLCALL_BREAKER_THRESHOLD", default_value_t = 3)]
    pub breaker_threshold: u32,

    /// How long the breaker stays open before probing Redis again.
    #[arg(long, env = "ROLLCALL_BREAKER_COOLDOWN", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub breaker_cooldown: Duration,

    /// Oldest cached answer served (flagged stale) while Redis is unreachable.
    #[arg(long, env = "ROLLCALL_STALE_MAX_AGE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stale_max_age: Duration,

    /// How often each replica reads the whole registry into its fallback cache.
    #[arg(long, env = "ROLLCALL_SNAPSHOT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,

    /// Largest accepted request body, in bytes; larger ones get 413.
    #[arg(long, env = "ROLLCALL_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Longest time one request may take before it is answered 408.
    #[arg(long, env = "ROLLCALL_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Port of the nginx load balancer in front of the registry replicas.
    #[arg(long, env = "ROLLCALL_DEV_LB_PORT", default_value_t = 8888)]
    pub lb_port: u16,

    /// Port of the gateway (`/v2/<service>/<path>`), pointed at the load balancer.
    #[arg(long, env = "ROLLCALL_DEV_GATEWAY_PORT", default_value_t = 8000)]
    pub gateway_port: u16,

    /// Also run Prometheus (Debian's `prometheus` package) scraping every replica and the
    /// gateway every 5 s, with rollcall's alert rules.
    #[arg(long, env = "ROLLCALL_DEV_PROMETHEUS")]
    pub prometheus: bool,

    /// Port of that Prometheus.
    #[arg(long, env = "ROLLCALL_DEV_PROMETHEUS_PORT", default_value_t = 9090)]
    pub prometheus_port: u16,

    /// First of the other ports: Redis nodes on BASE..BASE+2, Sentinels on BASE+10..BASE+12,
    /// registry replicas on BASE+20..BASE+22.
    #[arg(long, env = "ROLLCALL_DEV_PORT_BASE", default_value_t = 17000)]
    pub port_base: u16,

    /// Where every process keeps its config, data and log, and where the state file for the
    /// chaos scripts is written. Emptied at start if an earlier `rollcall dev` made it.
    #[arg(
        long,
        env = "ROLLCALL_DEV_DATA_DIR",
        default_value = "/tmp/rollcall-dev"
    )]
    pub data_dir: PathBuf,
}

impl Tuning {
    pub fn options(&self) -> Options {
        Options {
            api: ApiConfig {
                max_body_bytes: self.max_body_bytes,
                request_timeout: self.request_timeout,
            },
            resilience: ResilienceConfig {
                breaker: BreakerConfig {
                    threshold: self.breaker_threshold.max(1),
                    cooldown: self.breaker_cooldown,
                },
                stale_max_age: self.stale_max_age,
                snapshot_interval: self.snapshot_interval.max(Duration::from_millis(100)),
                ..ResilienceConfig::default()
            },
        }
    }

    pub fn redis(&self, source: MasterSource) -> RedisConfig {
        let default_acks = match source {
            MasterSource::Direct(_) => 0,
            MasterSource::Sentinel { .. } => 1,
        };
        RedisConfig {
            source,
            key_prefix: self.key_prefix.clone(),
            connect_timeout: self.redis_connect_timeout,
            command_timeout: self.redis_timeout,
            min_replica_acks: self.min_replica_acks.unwrap_or(default_acks),
            replica_ack_timeout: self.replica_ack_timeout,
        }
    }
}

impl ServeArgs {
    pub fn store(&self) -> StoreConfig {
        if let Some(url) = &self.redis_url {
            return StoreConfig::Redis(self.tuning.redis(MasterSource::Direct(url.clone())));
        }
        if !self.sentinels.is_empty() {
            return StoreConfig::Redis(self.tuning.redis(MasterSource::Sentinel {
                sentinels: self.sentinels.clone(),
                master: self.sentinel_master.clone(),
            }));
        }
        StoreConfig::Memory
    }
}
