//! The Redis store: one hash per instance with a TTL, plus two sorted-set indexes.
//!
//! Every change is one Lua script (see `lua/`), so a replica that dies mid-request never leaves
//! half an entry, and scripts read Redis's own clock so replicas with skewed clocks agree on
//! what has expired. Lookups walk the per-service index: O(instances of that service), never a
//! scan of the keyspace. Every call is bounded (see `link`), so a hung Redis fails the request
//! fast instead of holding it.
//!
//! Changes other than heartbeats are acknowledged only once `min_replica_acks` replicas have
//! them (`WAIT`), so a failover cannot lose a registration the caller was told about. A
//! heartbeat lost in a failover costs at most one early expiry, which the client repairs by
//! re-registering on the 404.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};

use super::link::{LinkConfig, MasterLink, MasterSource};
use super::{Refreshed, Store, StoreError};
use crate::model::{
    Descriptor, HeartbeatReport, Instance, Registered, Registration, Status, Target,
    from_millis_since_epoch,
};

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub source: MasterSource,
    /// Prefix of every key, so that several registries can share one Redis.
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Replicas that must confirm a change before it is acknowledged (0: do not wait).
    pub min_replica_acks: u32,
    /// How long to wait for those confirmations.
    pub replica_ack_timeout: Duration,
}

struct Scripts {
    register: Script,
    heartbeat: Script,
    deregister: Script,
    promote: Script,
    read: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("lua/common.lua"),
            include_str!(concat!("lua/", $file))
        ))
    };
}

impl Scripts {
    fn load() -> Self {
        Scripts {
            register: script!("register.lua"),
            heartbeat: script!("heartbeat.lua"),
            deregister: script!("deregister.lua"),
            promote: script!("promote.lua"),
            read: script!("read.lua"),
        }
    }
}

pub struct RedisStore {
    link: Arc<MasterLink>,
    prefix: String,
    min_acks: u32,
    ack_timeout: Duration,
    write_limit: Duration,
    scripts: Arc<Scripts>,
}

impl RedisStore {
    /// Builds the store without connecting: a replica must start (and say it is not ready)
    /// while Redis is still coming up.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        if let MasterSource::Direct(url) = &config.source {
            redis::Client::open(url.as_str())
                .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))?;
        }
        let link = MasterLink::new(LinkConfig {
            source: config.source.clone(),
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
            pool_size: 4,
            instance_key_prefix: format!("{}i:", config.key_prefix),
        });
        Ok(RedisStore {
            link,
            prefix: config.key_prefix.clone(),
            min_acks: config.min_replica_acks,
            ack_timeout: config.replica_ack_timeout,
            write_limit: config.command_timeout + config.replica_ack_timeout,
            scripts: Arc::new(Scripts::load()),
        })
    }

    /// Runs a change, then waits until every connected replica (and at least
    /// `min_replica_acks`) confirms it. Too few confirmations is an error: the change is on
    /// the master but could still be lost in a failover.
    async fn write<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send,
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let min = self.min_acks;
        let wait_ms = u64::try_from(self.ack_timeout.as_millis()).unwrap_or(u64::MAX);
        let (value, acks, wanted) = self
            .link
            .run_write(self.write_limit, |mut conn, connected| {
                let fut = op(conn.clone());
                let wanted = if min == 0 { 0 } else { min.max(connected) };
                async move {
                    let value = fut.await?;
                    if wanted == 0 {
                        return Ok((value, 0, 0));
                    }
                    let acks: u32 = redis::cmd("WAIT")
                        .arg(wanted)
                        .arg(wait_ms)
                        .query_async(&mut conn)
                        .await?;
                    Ok((value, acks, wanted))
                }
            })
            .await?;
        if acks < wanted {
            return Err(StoreError::NotReplicated(format!(
                "the change reached the Redis master but only {acks} of its {wanted} \
                 replica(s) confirmed it within {wait_ms} ms; it may be lost if the master \
                 fails now. Retrying is safe"
            )));
        }
        Ok(value)
    }

    async fn read_instances(&self, mode: &str, name: &str) -> Result<Vec<Instance>, StoreError> {
        let rows: Vec<Vec<String>> = self
            .link
            .run(|mut conn| {
                let scripts = self.scripts.clone();
                let (prefix, mode, name) =
                    (self.prefix.clone(), mode.to_string(), name.to_string());
                async move {
                    scripts
                        .read
                        .arg(prefix)
                        .arg(mode)
                        .arg(name)
                        .invoke_async(&mut conn)
                        .await
                }
            })
            .await?;
        rows.into_iter().map(parse_instance).collect()
    }
}

fn opt(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

#[async_trait]
impl Store for RedisStore {
    async fn register(&self, reg: &Registration) -> Result<Registered, StoreError> {
        let descriptor = serde_json::to_string(&reg.descriptor)
            .map_err(|e| StoreError::Corrupt(format!("descriptor does not serialize: {e}")))?;
        let ttl_ms = u64::try_from(reg.ttl.as_millis()).unwrap_or(u64::MAX);
        let (created, registered_at_ms): (u8, u64) = self
            .write(|mut conn| {
                let mut call = self.scripts.register.prepare_invoke();
                call.arg(&self.prefix)
                    .arg(&reg.service_name)
                    .arg(&reg.instance_id)
                    .arg(&descriptor)
                    .arg(&reg.role)
                    .arg(ttl_ms);
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(Registered {
            created: created == 1,
            registered_at: from_millis_since_epoch(registered_at_ms),
        })
    }

    async fn heartbeat(
        &self,
        target: &Target,
        report: &HeartbeatReport,
    ) -> Result<Refreshed, StoreError> {
        let count: usize = self
            .link
            .run(|mut conn| {
                let mut call = self.scripts.heartbeat.prepare_invoke();
                call.arg(&self.prefix)
                    .arg(&target.service_name)
                    .arg(target.instance_id.as_deref().unwrap_or(""))
                    .arg(opt(report.status))
                    .arg(opt(report.p95_ms))
                    .arg(opt(report.queue_depth))
                    .arg(opt(report.load));
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(Refreshed { count })
    }

    async fn deregister(&self, target: &Target) -> Result<usize, StoreError> {
        self.write(|mut conn| {
            let mut call = self.scripts.deregister.prepare_invoke();
            call.arg(&self.prefix)
                .arg(&target.service_name)
                .arg(target.instance_id.as_deref().unwrap_or(""));
            async move { call.invoke_async(&mut conn).await }
        })
        .await
    }

    async fn promote(&self, target: &Target, role: &str) -> Result<usize, StoreError> {
        self.write(|mut conn| {
            let mut call = self.scripts.promote.prepare_invoke();
            call.arg(&self.prefix)
                .arg(&target.service_name)
                .arg(target.instance_id.as_deref().unwrap_or(""))
                .arg(role);
            async move { call.invoke_async(&mut conn).await }
        })
        .await
    }

    async fn instances(&self, service_name: &str) -> Result<Vec<Instance>, StoreError> {
        self.read_instances("service", service_name).await
    }

    async fn all_instances(&self) -> Result<Vec<Instance>, StoreError> {
        self.read_instances("all", "").await
    }

    async fn service_names(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = self
            .link
            .run(|mut conn| {
                let mut call = self.scripts.read.prepare_invoke();
                call.arg(&self.prefix).arg("names").arg("");
                async move { call.invoke_async(&mut conn).await }
            })
            .await?;
        names.sort();
        Ok(names)
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let _: String = self
            .link
            .run(|mut conn| async move { redis::cmd("PING").query_async(&mut conn).await })
            .await?;
        Ok(started.elapsed())
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn master(&self) -> Option<String> {
        self.link.master_addr()
    }

    fn failovers(&self) -> u64 {
        self.link.failovers()
    }

    fn expirations(&self) -> u64 {
        self.link.expirations()
    }
}

fn parse_instance(flat: Vec<String>) -> Result<Instance, StoreError> {
    let mut fields: HashMap<String, String> = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        fields.insert(k, v);
    }
    let take = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("instance hash lacks field `{name}`")))
    };
    let num = |name: &str| -> Result<u64, StoreError> {
        take(name)?
            .parse::<u64>()
            .map_err(|e| StoreError::Corrupt(format!("field `{name}`: {e}")))
    };
    let float = |name: &str| fields.get(name).and_then(|v| v.parse::<f64>().ok());
    let descriptor: Descriptor = serde_json::from_str(&take("reg")?)
        .map_err(|e| StoreError::Corrupt(format!("field `reg`: {e}")))?;
    let status = Status::parse(&take("status")?)
        .ok_or_else(|| StoreError::Corrupt("field `status` is not ok/degraded".into()))?;
    // PTTL answers -1/-2 for keys without TTL or gone; both mean "no time left" here.
    let pttl = take("pttl")?.parse::<i64>().unwrap_or(0).max(0);
    Ok(Instance {
        service_name: take("name")?,
        instance_id: take("id")?,
        role: take("role")?,
        ttl: Duration::from_millis(num("ttl_ms")?),
        registered_at: from_millis_since_epoch(num("registered_at")?),
        last_heartbeat: from_millis_since_epoch(num("last_heartbeat")?),
        status,
        p95_ms: float("p95_ms"),
        queue_depth: fields.get("queue_depth").and_then(|v| v.parse().ok()),
        load: float("load"),
        ttl_remaining: Duration::from_millis(pttl.unsigned_abs()),
        descriptor,
    })
}
