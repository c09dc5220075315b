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
//! - fences writes from the first sign of a failover (`+try-failover`, `+selected-slave`,
//!   `+promoted-slave`, ...) until `+switch-master` or an abort: during a planned failover the
//!   old master keeps accepting writes for seconds, and its other replicas keep confirming
//!   them, yet all of it is discarded when they resync from the promoted replica;
//! - tells the caller how many replicas the master has connected (`ROLE`, refreshed twice a
//!   second), so a write can wait for every one of them: then the replica that gets promoted
//!   has every acknowledged write, whichever it is;
//! - treats READONLY / MASTERDOWN as "the master moved": retires the generation, resolves
//!   again and retries the command once (safe: the node refused it, nothing was applied);
//! - bounds every step (connect, resolve, command) so a hung node fails fast.
//!
//! A small fixed pool of multiplexed connections is used instead of one, so a `WAIT` that
//! blocks while a replica lags holds up only a fraction of the traffic.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

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
    /// Keys whose expiry counts as an instance expiring (`<prefix>i:`).
    pub instance_key_prefix: String,
}

struct Active {
    generation: u64,
    addr: String,
    conns: Vec<MultiplexedConnection>,
    /// Replicas connected to this master at the last `ROLE`.
    replicas: AtomicU32,
}

pub struct MasterLink {
    config: LinkConfig,
    active: RwLock<Option<Arc<Active>>>,
    connecting: Mutex<()>,
    generation: AtomicU64,
    next: AtomicUsize,
    /// Writes are refused until then: a failover is under way.
    fenced_until: StdMutex<Option<Instant>>,
    /// The last master connected to, and how often that address changed.
    last_master: StdMutex<Option<String>>,
    failovers: AtomicU64,
    expirations: AtomicU64,
}

/// How long a failover may fence writes when no end is announced (Sentinel's
/// failover-timeout is 3 s in our config; this leaves room for slower set-ups).
const FENCE_LIMIT: Duration = Duration::from_secs(10);
const ROLE_REFRESH: Duration = Duration::from_millis(500);

impl MasterLink {
    pub fn new(config: LinkConfig) -> Arc<Self> {
        let link = Arc::new(MasterLink {
            config,
            active: RwLock::new(None),
            connecting: Mutex::new(()),
            generation: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            fenced_until: StdMutex::new(None),
            last_master: StdMutex::new(None),
            failovers: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
        });
        if let MasterSource::Sentinel { sentinels, master } = &link.config.source {
            for sentinel in sentinels {
                tokio::spawn(watch_sentinel(
                    Arc::downgrade(&link),
                    sentinel.clone(),
                    master.clone(),
                ));
            }
        }
        tokio::spawn(watch_replicas(Arc::downgrade(&link)));
        tokio::spawn(watch_expirations(Arc::downgrade(&link)));
        link
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Instance keys this link saw Redis expire (keyspace notifications of the master).
    pub fn expirations(&self) -> u64 {
        self.expirations.load(Ordering::Relaxed)
    }

    /// Why writes are refused right now, if they are.
    pub fn fenced(&self) -> Option<Duration> {
        let fence = self
            .fenced_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fence.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    fn fence(&self, why: &str) {
        let mut fence = self
            .fenced_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fence.is_none_or(|until| until <= Instant::now()) {
            tracing::warn!(why, "failover under way: fencing writes");
        }
        *fence = Some(Instant::now() + FENCE_LIMIT);
    }

    fn unfence(&self, why: &str) {
        let mut fence = self
            .fenced_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fence.take().is_some_and(|until| until > Instant::now()) {
            tracing::info!(why, "failover over: writes allowed again");
        }
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
        let replicas = connected_replicas(&mut conns[0].clone(), self.config.command_timeout)
            .await
            .unwrap_or(0);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let active = Arc::new(Active {
            generation,
            addr: addr.clone(),
            conns,
            replicas: AtomicU32::new(replicas),
        });
        *self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(active.clone());
        tracing::info!(master = %addr, generation, "connected to Redis master");
        let mut last = self
            .last_master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.as_ref().is_some_and(|previous| *previous != addr) {
            self.failovers.fetch_add(1, Ordering::Relaxed);
        }
        *last = Some(addr);
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

    /// A change: refused while a failover is fenced, and handed the number of replicas the
    /// master has connected so it can wait for all of them. A fence raised while the change
    /// was under way turns its success into an error: it may be on a deposed master.
    pub async fn run_write<T, F, Fut>(&self, limit: Duration, op: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection, u32) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.check_fence()?;
        let value = self
            .run_with(limit, |conn, active| {
                op(conn, active.replicas.load(Ordering::Relaxed))
            })
            .await?;
        self.check_fence()?;
        Ok(value)
    }

    fn check_fence(&self) -> Result<(), StoreError> {
        match self.fenced() {
            Some(left) => Err(StoreError::FailoverInProgress { retry_in: left }),
            None => Ok(()),
        }
    }

    /// `run` with a longer bound, for operations that also wait for replicas.
    pub async fn run_for<T, F, Fut>(&self, limit: Duration, op: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_with(limit, |conn, _| op(conn)).await
    }

    async fn run_with<T, F, Fut>(&self, limit: Duration, op: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection, &Active) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let active = self.connected().await?;
            let i = self.next.fetch_add(1, Ordering::Relaxed) % active.conns.len();
            let conn = active.conns[i].clone();
            match tokio::time::timeout(limit, op(conn, &active)).await {
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

/// The Sentinel events that mean a failover of some master set has begun.
const FAILOVER_STARTED: &[&str] = &[
    "+try-failover",
    "+elected-leader",
    "+failover-state-select-slave",
    "+selected-slave",
    "+failover-state-send-slaveof-noone",
    "+failover-state-wait-promotion",
    "+promoted-slave",
    "+failover-state-reconf-slaves",
];
const FAILOVER_ABORTED: &[&str] = &[
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
];
const SWITCH: &str = "+switch-master";

/// The master set an event is about. Instance events read
/// "<type> <name> <ip> <port> @ <master-name> <master-ip> <master-port>"; a master's own
/// events have no "@" part, and `+switch-master` starts with the master set's name.
fn event_master<'a>(channel: &str, payload: &'a str) -> Option<&'a str> {
    let mut words = payload.split(' ');
    if channel == SWITCH {
        return words.next();
    }
    let words: Vec<&str> = words.collect();
    match words.iter().position(|w| *w == "@") {
        Some(at) => words.get(at + 1).copied(),
        None if words.first() == Some(&"master") => words.get(1).copied(),
        None => None,
    }
}

/// Follows one Sentinel's failover events for as long as the link lives, reconnecting the
/// subscription whenever it drops.
async fn watch_sentinel(link: Weak<MasterLink>, sentinel: String, master: String) {
    loop {
        let Some(strong) = link.upgrade() else { return };
        let connect_timeout = strong.config.connect_timeout;
        drop(strong);
        match subscribe_events(&sentinel, connect_timeout).await {
            Ok(mut pubsub) => {
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let Some(link) = link.upgrade() else { return };
                    let channel = msg.get_channel_name().to_string();
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if event_master(&channel, &payload) != Some(master.as_str()) {
                        continue;
                    }
                    tracing::info!(%sentinel, %channel, %payload, "Sentinel event");
                    if channel == SWITCH {
                        link.retire_all("+switch-master");
                        link.unfence("+switch-master");
                    } else if FAILOVER_STARTED.contains(&channel.as_str()) {
                        link.fence(&channel);
                        link.retire_all(&channel);
                    } else if FAILOVER_ABORTED.contains(&channel.as_str()) {
                        link.unfence(&channel);
                    }
                }
                tracing::debug!(%sentinel, "Sentinel subscription ended; reconnecting");
            }
            Err(e) => tracing::debug!(%sentinel, error = %e, "cannot subscribe to Sentinel"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Counts instance keys that Redis expires, from the current master's keyspace notifications
/// (`notify-keyspace-events Ex` in redis.conf), following the master across failovers.
async fn watch_expirations(link: Weak<MasterLink>) {
    loop {
        let Some(strong) = link.upgrade() else { return };
        let current = strong.current();
        let (limit, prefix) = (
            strong.config.connect_timeout,
            strong.config.instance_key_prefix.clone(),
        );
        drop(strong);
        let Some(active) = current else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (addr, generation) = (active.addr.clone(), active.generation);
        drop(active);
        let subscribed = async {
            let client = redis::Client::open(addr.as_str())
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let mut pubsub = bounded(limit, client.get_async_pubsub()).await?;
            bounded(limit, pubsub.psubscribe("__keyevent@*__:expired")).await?;
            Ok::<_, StoreError>(pubsub)
        };
        match subscribed.await {
            Ok(mut pubsub) => {
                let mut messages = pubsub.on_message();
                let mut check = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        msg = messages.next() => {
                            let Some(msg) = msg else { break };
                            let Some(link) = link.upgrade() else { return };
                            let key: String = msg.get_payload().unwrap_or_default();
                            if key.starts_with(&prefix) {
                                link.expirations.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ = check.tick() => {
                            let Some(link) = link.upgrade() else { return };
                            // The master moved: listen to the new one.
                            if link.current().is_none_or(|a| a.generation != generation) {
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot subscribe to expirations"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps the connected-replica count of the current master fresh.
async fn watch_replicas(link: Weak<MasterLink>) {
    loop {
        tokio::time::sleep(ROLE_REFRESH).await;
        let Some(link) = link.upgrade() else { return };
        let Some(active) = link.current() else {
            continue;
        };
        let mut conn = active.conns[0].clone();
        if let Ok(n) = connected_replicas(&mut conn, link.config.command_timeout).await {
            active.replicas.store(n, Ordering::Relaxed);
        }
    }
}

/// How many replicas `ROLE` lists on a master.
async fn connected_replicas(
    conn: &mut MultiplexedConnection,
    limit: Duration,
) -> Result<u32, StoreError> {
    let role: Vec<Value> = bounded(limit, redis::cmd("ROLE").query_async(conn)).await?;
    Ok(match role.get(2) {
        Some(Value::Array(replicas)) => u32::try_from(replicas.len()).unwrap_or(u32::MAX),
        _ => 0,
    })
}

async fn subscribe_events(
    sentinel: &str,
    limit: Duration,
) -> Result<redis::aio::PubSub, StoreError> {
    let client = redis::Client::open(format!("redis://{sentinel}"))
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut pubsub = bounded(limit, client.get_async_pubsub()).await?;
    let channels: Vec<&str> = FAILOVER_STARTED
        .iter()
        .chain(FAILOVER_ABORTED)
        .copied()
        .chain([SWITCH])
        .collect();
    bounded(limit, pubsub.subscribe(channels)).await?;
    Ok(pubsub)
}

#[cfg(test)]
mod tests {
    use super::event_master;

    #[test]
    fn sentinel_events_name_their_master_set() {
        assert_eq!(
            event_master("+switch-master", "mymaster 127.0.0.1 7000 127.0.0.1 7001"),
            Some("mymaster")
        );
        assert_eq!(
            event_master("+try-failover", "master mymaster 127.0.0.1 7000"),
            Some("mymaster")
        );
        assert_eq!(
            event_master(
                "+selected-slave",
                "slave 127.0.0.1:7001 127.0.0.1 7001 @ mymaster 127.0.0.1 7000"
            ),
            Some("mymaster")
        );
        assert_eq!(event_master("+promoted-slave", "garbage"), None);
    }
}
