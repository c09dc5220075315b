//! The connection to whichever Redis is the master right now.
//!
//! Hand-written because the crates get failover wrong in ways measured on this project: a
//! `ConnectionManager` resolved once keeps talking to the old master (READONLY forever), and a
//! Sentinel-backed pool keeps writing to the old master for seconds after `+switch-master`,
//! writes that vanish when it resyncs as a replica. So this link:
//!
//! - asks every Sentinel at once and follows the answer with the highest config epoch, then
//!   checks with `ROLE` that the node really is a master before using it;
//! - subscribes to `+switch-master` on the Sentinels and retires its connections the moment a
//!   switch is announced (a whole generation at a time);
//! - treats READONLY / MASTERDOWN as "the master moved": retires the generation, resolves
//!   again and retries the command once (safe: the node refused it, nothing was applied);
//! - bounds every step (connect, resolve, command) so a hung node fails fast.
//!
//! A small fixed pool of multiplexed connections is used instead of one, so a `WAIT` that
//! blocks while a replica lags holds up only a fraction of the traffic.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio::sync::Mutex;

use super::StoreError;

/// Where the master is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterSource {
    /// A fixed address, `redis://host:port/db`.
    Direct(String),
    /// Asked of these Sentinels (`host:port`) for the master set `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub source: MasterSource,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub pool_size: usize,
}

struct Active {
    generation: u64,
    addr: String,
    conns: Vec<MultiplexedConnection>,
}

pub struct MasterLink {
    config: LinkConfig,
    active: RwLock<Option<Arc<Active>>>,
    connecting: Mutex<()>,
    generation: AtomicU64,
    next: AtomicUsize,
}

impl MasterLink {
    pub fn new(config: LinkConfig) -> Arc<Self> {
        let link = Arc::new(MasterLink {
            config,
            active: RwLock::new(None),
            connecting: Mutex::new(()),
            generation: AtomicU64::new(0),
            next: AtomicUsize::new(0),
        });
        if let MasterSource::Sentinel { sentinels, master } = &link.config.source {
            for sentinel in sentinels {
                tokio::spawn(watch_switches(
                    Arc::downgrade(&link),
                    sentinel.clone(),
                    master.clone(),
                ));
            }
        }
        link
    }

    /// The master in use, if connected.
    pub fn master_addr(&self) -> Option<String> {
        self.current().map(|a| a.addr.clone())
    }

    fn current(&self) -> Option<Arc<Active>> {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Drops the connections of `generation` (if still current) so the next call resolves
    /// the master again.
    fn retire(&self, generation: u64, why: &str) {
        let mut active = self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if active.as_ref().is_some_and(|a| a.generation == generation) {
            tracing::info!(generation, why, "retiring Redis connections");
            *active = None;
        }
    }

    fn retire_all(&self, why: &str) {
        if let Some(a) = self.current() {
            self.retire(a.generation, why);
        }
    }

    async fn connected(&self) -> Result<Arc<Active>, StoreError> {
        if let Some(a) = self.current() {
            return Ok(a);
        }
        let _guard = self.connecting.lock().await;
        if let Some(a) = self.current() {
            return Ok(a);
        }
        let addr = self.resolve().await?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(self.config.command_timeout));
        let client = redis::Client::open(addr.as_str())
            .map_err(|e| StoreError::Unavailable(format!("bad master address {addr}: {e}")))?;
        let mut conns = Vec::with_capacity(self.config.pool_size.max(1));
        for _ in 0..self.config.pool_size.max(1) {
            let conn = bounded(
                self.config.connect_timeout,
                client.get_multiplexed_async_connection_with_config(&conn_config),
            )
            .await?;
            conns.push(conn);
        }
        if matches!(self.config.source, MasterSource::Sentinel { .. }) {
            let mut probe = conns[0].clone();
            let role: Vec<Value> = bounded(
                self.config.command_timeout,
                redis::cmd("ROLE").query_async(&mut probe),
            )
            .await?;
            let is_master = matches!(role.first(), Some(Value::BulkString(b)) if b == b"master");
            if !is_master {
                return Err(StoreError::Unavailable(format!(
                    "Sentinel named {addr} as master but it is not one (yet)"
                )));
            }
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let active = Arc::new(Active {
            generation,
            addr: addr.clone(),
            conns,
        });
        *self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(active.clone());
        tracing::info!(master = %addr, generation, "connected to Redis master");
        Ok(active)
    }

    async fn resolve(&self) -> Result<String, StoreError> {
        match &self.config.source {
            MasterSource::Direct(url) => Ok(url.clone()),
            MasterSource::Sentinel { sentinels, master } => {
                let asks = sentinels
                    .iter()
                    .map(|s| ask_sentinel(s, master, self.config.connect_timeout));
                let answers: Vec<(u64, String)> = join_all(asks)
                    .await
                    .into_iter()
                    .filter_map(Result::ok)
                    .collect();
                answers
                    .into_iter()
                    .max_by_key(|(epoch, _)| *epoch)
                    .map(|(_, addr)| addr)
                    .ok_or_else(|| {
                        StoreError::Unavailable(format!(
                            "no Sentinel of {} answered for master set {master:?}",
                            sentinels.join(",")
                        ))
                    })
            }
        }
    }

    /// Runs `op` on a connection to the current master, bounded by the command timeout.
    /// A "master moved" refusal is retried once on a freshly resolved master.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_for(self.config.command_timeout, op).await
    }

    /// `run` with a longer bound, for operations that also wait for replicas.
    pub async fn run_for<T, F, Fut>(&self, limit: Duration, op: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let active = self.connected().await?;
            let i = self.next.fetch_add(1, Ordering::Relaxed) % active.conns.len();
            let conn = active.conns[i].clone();
            match tokio::time::timeout(limit, op(conn)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if master_moved(&e) => {
                    self.retire(active.generation, "master moved");
                    if attempt >= 2 {
                        return Err(StoreError::Unavailable(e.to_string()));
                    }
                }
                Ok(Err(e)) => {
                    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                        self.retire(active.generation, "connection failed");
                    }
                    return Err(classify(e));
                }
                Err(_) => {
                    self.retire(active.generation, "command timed out");
                    return Err(StoreError::Unavailable(format!(
                        "Redis did not answer within {} ms",
                        limit.as_millis()
                    )));
                }
            }
        }
    }
}

fn master_moved(e: &RedisError) -> bool {
    matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
}

/// Connection trouble and a master that cannot take writes are worth a retry; anything else
/// means Redis holds or answered something this code did not write.
pub fn classify(e: RedisError) -> StoreError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some("READONLY" | "MASTERDOWN" | "LOADING" | "BUSY" | "TRYAGAIN" | "NOREPLICAS")
        );
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Corrupt(e.to_string())
    }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            limit.as_millis()
        ))),
    }
}

/// `SENTINEL MASTER <name>` on one Sentinel: (config epoch, redis:// address).
async fn ask_sentinel(
    sentinel: &str,
    master: &str,
    limit: Duration,
) -> Result<(u64, String), StoreError> {
    let client = redis::Client::open(format!("redis://{sentinel}"))
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(limit))
        .set_response_timeout(Some(limit));
    let mut conn = bounded(
        limit,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await?;
    let fields: Vec<String> = bounded(
        limit,
        redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(master)
            .query_async(&mut conn),
    )
    .await?;
    let get = |key: &str| {
        fields
            .chunks(2)
            .find(|kv| kv.first().is_some_and(|k| k == key))
            .and_then(|kv| kv.get(1).cloned())
    };
    let flags = get("flags").unwrap_or_default();
    if flags.split(',').any(|f| f == "o_down" || f == "s_down") {
        return Err(StoreError::Unavailable(format!(
            "Sentinel {sentinel} sees master {master} as down"
        )));
    }
    let (Some(ip), Some(port)) = (get("ip"), get("port")) else {
        return Err(StoreError::Unavailable(format!(
            "Sentinel {sentinel} has no address for {master}"
        )));
    };
    let epoch = get("config-epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    Ok((epoch, format!("redis://{ip}:{port}")))
}

/// Follows `+switch-master` on one Sentinel for as long as the link lives, reconnecting the
/// subscription whenever it drops.
async fn watch_switches(link: Weak<MasterLink>, sentinel: String, master: String) {
    loop {
        let Some(strong) = link.upgrade() else { return };
        let connect_timeout = strong.config.connect_timeout;
        drop(strong);
        match subscribe_switches(&sentinel, connect_timeout).await {
            Ok(mut pubsub) => {
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let Some(link) = link.upgrade() else { return };
                    let payload: String = msg.get_payload().unwrap_or_default();
                    // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                    if payload.split(' ').next() == Some(master.as_str()) {
                        tracing::warn!(%sentinel, switch = %payload, "+switch-master");
                        link.retire_all("+switch-master");
                    }
                }
                tracing::debug!(%sentinel, "switch-master subscription ended; reconnecting");
            }
            Err(e) => tracing::debug!(%sentinel, error = %e, "cannot subscribe to Sentinel"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn subscribe_switches(
    sentinel: &str,
    limit: Duration,
) -> Result<redis::aio::PubSub, StoreError> {
    let client = redis::Client::open(format!("redis://{sentinel}"))
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut pubsub = bounded(limit, client.get_async_pubsub()).await?;
    bounded(limit, pubsub.subscribe("+switch-master")).await?;
    Ok(pubsub)
}
