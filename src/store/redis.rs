//! The Redis store: one hash per instance with a TTL, plus two sorted-set indexes.
//!
//! Every change is one Lua script (see `lua/`), so a replica that dies mid-request never leaves
//! half an entry, and scripts read Redis's own clock so replicas with skewed clocks agree on
//! what has expired. Lookups walk the per-service index: O(instances of that service), never a
//! scan of the keyspace. Every call is bounded by `command_timeout`, so a hung Redis fails the
//! request fast instead of holding it.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{Refreshed, Store, StoreError};
use crate::model::{
    Descriptor, HeartbeatReport, Instance, Registered, Registration, Status, Target,
    from_millis_since_epoch,
};

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key, so that several registries can share one Redis.
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
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
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
}

impl RedisStore {
    /// Builds the store without connecting: a replica must start (and say it is not ready)
    /// while Redis is still coming up.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(RedisStore {
            conn,
            prefix: config.key_prefix.clone(),
            timeout: config.command_timeout,
            scripts: Scripts::load(),
        })
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Unavailable(format!(
                "Redis did not answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn read_instances(&self, mode: &str, name: &str) -> Result<Vec<Instance>, StoreError> {
        let mut conn = self.conn.clone();
        let rows: Vec<Vec<String>> = self
            .bounded(
                self.scripts
                    .read
                    .arg(&self.prefix)
                    .arg(mode)
                    .arg(name)
                    .invoke_async(&mut conn),
            )
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
        let mut conn = self.conn.clone();
        let (created, registered_at_ms): (u8, u64) = self
            .bounded(
                self.scripts
                    .register
                    .arg(&self.prefix)
                    .arg(&reg.service_name)
                    .arg(&reg.instance_id)
                    .arg(descriptor)
                    .arg(&reg.role)
                    .arg(u64::try_from(reg.ttl.as_millis()).unwrap_or(u64::MAX))
                    .invoke_async(&mut conn),
            )
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
        let mut conn = self.conn.clone();
        let count: usize = self
            .bounded(
                self.scripts
                    .heartbeat
                    .arg(&self.prefix)
                    .arg(&target.service_name)
                    .arg(target.instance_id.as_deref().unwrap_or(""))
                    .arg(opt(report.status))
                    .arg(opt(report.p95_ms))
                    .arg(opt(report.queue_depth))
                    .arg(opt(report.load))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(Refreshed { count })
    }

    async fn deregister(&self, target: &Target) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(
            self.scripts
                .deregister
                .arg(&self.prefix)
                .arg(&target.service_name)
                .arg(target.instance_id.as_deref().unwrap_or(""))
                .invoke_async(&mut conn),
        )
        .await
    }

    async fn promote(&self, target: &Target, role: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(
            self.scripts
                .promote
                .arg(&self.prefix)
                .arg(&target.service_name)
                .arg(target.instance_id.as_deref().unwrap_or(""))
                .arg(role)
                .invoke_async(&mut conn),
        )
        .await
    }

    async fn instances(&self, service_name: &str) -> Result<Vec<Instance>, StoreError> {
        self.read_instances("service", service_name).await
    }

    async fn all_instances(&self) -> Result<Vec<Instance>, StoreError> {
        self.read_instances("all", "").await
    }

    async fn service_names(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = self
            .bounded(
                self.scripts
                    .read
                    .arg(&self.prefix)
                    .arg("names")
                    .arg("")
                    .invoke_async(&mut conn),
            )
            .await?;
        names.sort();
        Ok(names)
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(started.elapsed())
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

/// Connection trouble and a master that cannot take writes are worth a retry; anything else
/// means Redis holds or answered something this code did not write.
fn classify(e: RedisError) -> StoreError {
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
