//! The registry as the HTTP layer sees it: a store behind a circuit breaker, with a fallback
//! cache of the last good answers.
//!
//! - Every store call goes through the breaker; only "unreachable" errors count as failures.
//! - Every successful read refreshes the cache, and so do registrations, deregistrations and
//!   promotions (patched in place). Entries older than `stale_max_age` are evicted.
//! - A read that cannot reach the store (error, or breaker open) is served from the cache if
//!   it has the answer, marked stale with its age; otherwise the error stands.
//! - While the breaker is closed and the store answers, the store is the truth: the cache is
//!   never consulted, so replicas never disagree because of it.
//! - Writes are never cached or queued: while the store is unreachable they fail with 503 and
//!   `Retry-After`, so no 2xx can quietly disappear.
//! - A background prober pings the store once the cool-down has passed, so the breaker closes
//!   within moments of the store returning even when no request arrives.
//! - A background refresher reads the whole registry every `snapshot_interval`, so a replica
//!   can answer for any service during an outage, not only for the ones it happened to serve.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use moka::sync::Cache;
use tokio::time::Instant;

use crate::breaker::{Breaker, BreakerConfig, BreakerSnapshot, BreakerState};
use crate::metrics::RegistryMetrics;
use crate::model::{HeartbeatReport, Instance, Registered, Registration, Status, Target};
use crate::store::{Refreshed, Store, StoreError};

#[derive(Debug, Clone, Copy)]
pub struct ResilienceConfig {
    pub breaker: BreakerConfig,
    /// The oldest cached answer a read may be served while the store is unreachable.
    pub stale_max_age: Duration,
    pub cache_capacity: u64,
    /// How often the whole registry is read into the cache while the store answers.
    pub snapshot_interval: Duration,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            breaker: BreakerConfig {
                threshold: 3,
                cooldown: Duration::from_millis(500),
            },
            stale_max_age: Duration::from_secs(60),
            cache_capacity: 10_000,
            snapshot_interval: Duration::from_secs(5),
        }
    }
}

/// A read's answer; `stale_age` is set when it came from the fallback cache.
#[derive(Debug, Clone)]
pub struct Read<T> {
    pub value: T,
    pub stale_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Names,
    All,
    Service(String),
}

#[derive(Debug, Clone)]
enum Value {
    Names(Vec<String>),
    Instances(Vec<Instance>),
}

#[derive(Debug, Clone)]
struct Entry {
    value: Value,
    fetched_at: Instant,
}

pub struct Registry {
    store: Arc<dyn Store>,
    breaker: Arc<Breaker>,
    cache: Cache<Key, Arc<Entry>>,
    metrics: Arc<RegistryMetrics>,
    config: ResilienceConfig,
}

const PROBE_INTERVAL: Duration = Duration::from_millis(100);

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        config: ResilienceConfig,
        metrics: Arc<RegistryMetrics>,
    ) -> Arc<Self> {
        let on_transition = {
            let metrics = metrics.clone();
            move |state: BreakerState| {
                metrics
                    .breaker_open
                    .set(i64::from(state != BreakerState::Closed));
                metrics
                    .breaker_transitions
                    .with_label_values(&[state.as_str()])
                    .inc();
                match state {
                    BreakerState::Open => {
                        tracing::warn!(
                            "circuit breaker OPEN: serving reads from cache, refusing writes"
                        )
                    }
                    BreakerState::HalfOpen => tracing::info!("circuit breaker half-open: probing"),
                    BreakerState::Closed => tracing::info!("circuit breaker closed: store is back"),
                }
            }
        };
        let registry = Arc::new(Registry {
            store,
            breaker: Breaker::new(config.breaker, on_transition),
            cache: Cache::builder()
                .max_capacity(config.cache_capacity)
                .time_to_live(config.stale_max_age)
                .build(),
            metrics,
            config,
        });
        tokio::spawn(probe(Arc::downgrade(&registry)));
        tokio::spawn(refresh(Arc::downgrade(&registry), config.snapshot_interval));
        registry
    }

    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    pub fn master(&self) -> Option<String> {
        self.store.master()
    }

    pub fn breaker(&self) -> BreakerSnapshot {
        self.breaker.snapshot()
    }

    pub fn breaker_threshold(&self) -> u32 {
        self.breaker.config().threshold
    }

    pub fn cache_entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn stale_max_age(&self) -> Duration {
        self.config.stale_max_age
    }

    /// A direct round trip to the store, bypassing the breaker: `/health` must say what is
    /// true now, not what the breaker last concluded.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        self.store.ping().await
    }

    async fn guarded<T>(
        &self,
        name: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(r) => {
                let e = StoreError::CircuitOpen {
                    retry_in: r.retry_in,
                };
                self.metrics
                    .store_errors
                    .with_label_values(&[e.kind()])
                    .inc();
                return Err(e);
            }
        };
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics
            .store_duration
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Err(e) => {
                self.metrics
                    .store_errors
                    .with_label_values(&[e.kind()])
                    .inc();
                if matches!(e, StoreError::Unavailable(_)) {
                    permit.failed();
                } else {
                    permit.succeeded();
                }
            }
            Ok(_) => permit.succeeded(),
        }
        result
    }

    /// Brings the scrape-time figures up to date from one read of the whole registry: active
    /// services, instances by status; then failovers and expirations seen.
    pub async fn refresh_gauges(&self) {
        if let Ok(all) = self.all_instances().await
            && all.stale_age.is_none()
        {
            let degraded = all
                .value
                .iter()
                .filter(|i| i.status == Status::Degraded)
                .count();
            let ok = all.value.len() - degraded;
            let services: std::collections::BTreeSet<&str> =
                all.value.iter().map(|i| i.service_name.as_str()).collect();
            self.metrics
                .active_services
                .set(i64::try_from(services.len()).unwrap_or(i64::MAX));
            for (status, n) in [("ok", ok), ("degraded", degraded)] {
                self.metrics
                    .instances
                    .with_label_values(&[status])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for (seen, counter) in [
            (self.store.failovers(), &self.metrics.failovers),
            (self.store.expirations(), &self.metrics.expirations),
        ] {
            let counted = counter.get();
            if seen > counted {
                counter.inc_by(seen - counted);
            }
        }
    }

    pub async fn register(&self, reg: &Registration) -> Result<Registered, StoreError> {
        let done = self.guarded("register", self.store.register(reg)).await?;
        let now = SystemTime::now();
        let instance = Instance {
            service_name: reg.service_name.clone(),
            instance_id: reg.instance_id.clone(),
            role: reg.role.clone(),
            ttl: reg.ttl,
            descriptor: reg.descriptor.clone(),
            registered_at: done.registered_at,
            last_heartbeat: now,
            status: Status::Ok,
            p95_ms: None,
            queue_depth: None,
            load: None,
            ttl_remaining: reg.ttl,
        };
        self.patch_instances(&reg.service_name, |list| {
            list.retain(|i| i.instance_id != instance.instance_id);
            list.push(instance.clone());
        });
        if let Some(entry) = self.cache.get(&Key::Names)
            && let Value::Names(names) = &entry.value
            && !names.contains(&reg.service_name)
        {
            let mut names = names.clone();
            names.push(reg.service_name.clone());
            names.sort();
            self.put(Key::Names, Value::Names(names), entry.fetched_at);
        }
        Ok(done)
    }

    pub async fn heartbeat(
        &self,
        target: &Target,
        report: &HeartbeatReport,
    ) -> Result<Refreshed, StoreError> {
        self.guarded("heartbeat", self.store.heartbeat(target, report))
            .await
    }

    pub async fn deregister(&self, target: &Target) -> Result<usize, StoreError> {
        let removed = self
            .guarded("deregister", self.store.deregister(target))
            .await?;
        self.patch_instances(&target.service_name, |list| {
            list.retain(|i| !matches_target(i, target));
        });
        let left = self
            .cache
            .get(&Key::Service(target.service_name.clone()))
            .is_some_and(|e| matches!(&e.value, Value::Instances(l) if !l.is_empty()));
        if !left
            && let Some(entry) = self.cache.get(&Key::Names)
            && let Value::Names(names) = &entry.value
        {
            let names = names
                .iter()
                .filter(|n| **n != target.service_name)
                .cloned()
                .collect();
            self.put(Key::Names, Value::Names(names), entry.fetched_at);
        }
        Ok(removed)
    }

    pub async fn promote(&self, target: &Target, role: &str) -> Result<usize, StoreError> {
        let promoted = self
            .guarded("promote", self.store.promote(target, role))
            .await?;
        self.patch_instances(&target.service_name, |list| {
            for i in list.iter_mut().filter(|i| matches_target(i, target)) {
                i.role = role.to_string();
            }
        });
        Ok(promoted)
    }

    pub async fn instances(&self, service_name: &str) -> Result<Read<Vec<Instance>>, StoreError> {
        let key = Key::Service(service_name.to_string());
        match self
            .guarded("instances", self.store.instances(service_name))
            .await
        {
            Ok(list) => {
                if list.is_empty() {
                    self.cache.invalidate(&key);
                } else {
                    self.put(key, Value::Instances(list.clone()), Instant::now());
                }
                Ok(fresh(list))
            }
            Err(e) => self.fallback_instances(&key, e),
        }
    }

    pub async fn all_instances(&self) -> Result<Read<Vec<Instance>>, StoreError> {
        match self
            .guarded("all_instances", self.store.all_instances())
            .await
        {
            Ok(list) => {
                self.put(Key::All, Value::Instances(list.clone()), Instant::now());
                Ok(fresh(list))
            }
            Err(e) => self.fallback_instances(&Key::All, e),
        }
    }

    pub async fn service_names(&self) -> Result<Read<Vec<String>>, StoreError> {
        match self
            .guarded("service_names", self.store.service_names())
            .await
        {
            Ok(names) => {
                self.put(Key::Names, Value::Names(names.clone()), Instant::now());
                Ok(fresh(names))
            }
            Err(e) if e.is_unreachable() => {
                if let Some(entry) = self.cache.get(&Key::Names)
                    && let Value::Names(names) = &entry.value
                {
                    return Ok(self.stale(names.clone(), &entry));
                }
                // Derive the names from the latest whole-registry snapshot.
                let all = self.fallback_instances(&Key::All, e)?;
                let mut names: Vec<String> =
                    all.value.into_iter().map(|i| i.service_name).collect();
                names.sort();
                names.dedup();
                Ok(Read {
                    value: names,
                    stale_age: all.stale_age,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn fallback_instances(
        &self,
        key: &Key,
        e: StoreError,
    ) -> Result<Read<Vec<Instance>>, StoreError> {
        if !e.is_unreachable() {
            return Err(e);
        }
        // A service this replica never read is answered from the whole-registry snapshot.
        let (entry, only) = match (self.cache.get(key), key) {
            (Some(entry), _) => (entry, None),
            (None, Key::Service(name)) => match self.cache.get(&Key::All) {
                Some(entry) => (entry, Some(name.as_str())),
                None => {
                    self.metrics.cache_misses.inc();
                    return Err(e);
                }
            },
            (None, _) => {
                self.metrics.cache_misses.inc();
                return Err(e);
            }
        };
        let Value::Instances(list) = &entry.value else {
            return Err(e);
        };
        let age = entry.fetched_at.elapsed();
        let aged = list
            .iter()
            .filter(|i| only.is_none_or(|name| i.service_name == name))
            .map(|i| Instance {
                ttl_remaining: i.ttl_remaining.saturating_sub(age),
                ..i.clone()
            })
            .collect();
        Ok(self.stale(aged, &entry))
    }

    fn stale<T>(&self, value: T, entry: &Entry) -> Read<T> {
        self.metrics.stale_reads.inc();
        Read {
            value,
            stale_age: Some(entry.fetched_at.elapsed()),
        }
    }

    fn put(&self, key: Key, value: Value, fetched_at: Instant) {
        self.cache
            .insert(key, Arc::new(Entry { value, fetched_at }));
    }

    /// Applies a successful write to the cached instance lists that hold the service.
    fn patch_instances(&self, service: &str, change: impl Fn(&mut Vec<Instance>)) {
        let key = Key::Service(service.to_string());
        for k in [key, Key::All] {
            let Some(entry) = self.cache.get(&k) else {
                continue;
            };
            let Value::Instances(list) = &entry.value else {
                continue;
            };
            let mut others: Vec<Instance> = Vec::new();
            let mut mine: Vec<Instance> = Vec::new();
            for i in list {
                if i.service_name == service {
                    mine.push(i.clone());
                } else {
                    others.push(i.clone());
                }
            }
            change(&mut mine);
            others.extend(mine);
            self.put(k, Value::Instances(others), entry.fetched_at);
        }
    }
}

fn fresh<T>(value: T) -> Read<T> {
    Read {
        value,
        stale_age: None,
    }
}

fn matches_target(i: &Instance, target: &Target) -> bool {
    i.service_name == target.service_name
        && target
            .instance_id
            .as_ref()
            .is_none_or(|id| *id == i.instance_id)
}

/// Keeps a whole-registry snapshot in the cache while the store answers. Ends when the
/// registry is dropped.
async fn refresh(registry: Weak<Registry>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        if registry.breaker.snapshot().state == BreakerState::Closed
            && let Err(e) = registry.all_instances().await
        {
            tracing::debug!(error = %e, "registry snapshot failed");
        }
    }
}

/// Pings the store whenever the breaker is open and cooled down, so it closes without waiting
/// for a request. Ends when the registry is dropped.
async fn probe(registry: Weak<Registry>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        if !registry.breaker.probe_due() {
            continue;
        }
        let Ok(permit) = registry.breaker.try_acquire() else {
            continue;
        };
        match registry.store.ping().await {
            Ok(_) => permit.succeeded(),
            Err(_) => permit.failed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::store::MemoryStore;

    /// The memory store, with a switch that makes every call fail as if Redis were down.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unavailable("switched off".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl Store for Flaky {
        async fn register(&self, reg: &Registration) -> Result<Registered, StoreError> {
            self.check()?;
            self.inner.register(reg).await
        }
        async fn heartbeat(
            &self,
            t: &Target,
            r: &HeartbeatReport,
        ) -> Result<Refreshed, StoreError> {
            self.check()?;
            self.inner.heartbeat(t, r).await
        }
        async fn deregister(&self, t: &Target) -> Result<usize, StoreError> {
            self.check()?;
            self.inner.deregister(t).await
        }
        async fn promote(&self, t: &Target, role: &str) -> Result<usize, StoreError> {
            self.check()?;
            self.inner.promote(t, role).await
        }
        async fn instances(&self, name: &str) -> Result<Vec<Instance>, StoreError> {
            self.check()?;
            self.inner.instances(name).await
        }
        async fn all_instances(&self) -> Result<Vec<Instance>, StoreError> {
            self.check()?;
            self.inner.all_instances().await
        }
        async fn service_names(&self) -> Result<Vec<String>, StoreError> {
            self.check()?;
            self.inner.service_names().await
        }
        async fn ping(&self) -> Result<Duration, StoreError> {
            self.check()?;
            Ok(Duration::ZERO)
        }
        fn backend(&self) -> &'static str {
            "flaky"
        }
    }

    fn registration(name: &str, id: &str) -> Registration {
        Registration::sample(name, id, Duration::from_secs(60))
    }

    fn registry(stale_max_age: Duration) -> (Arc<Registry>, Arc<Flaky>) {
        let store = Arc::new(Flaky::default());
        let config = ResilienceConfig {
            stale_max_age,
            // Long enough that the test, not the refresher, decides what is cached.
            snapshot_interval: Duration::from_secs(3600),
            ..ResilienceConfig::default()
        };
        let metrics = Arc::new(RegistryMetrics::new().expect("metrics"));
        (Registry::new(store.clone(), config, metrics), store)
    }

    #[tokio::test]
    async fn unreachable_store_serves_stale_reads_refuses_writes_then_forgets() {
        let (registry, store) = registry(Duration::from_millis(300));
        registry
            .register(&registration("a", "h:1"))
            .await
            .expect("register");
        let fresh = registry.instances("a").await.expect("read");
        assert!(fresh.stale_age.is_none());
        registry.service_names().await.expect("names");

        store.down.store(true, Ordering::SeqCst);
        let stale = registry.instances("a").await.expect("served from cache");
        assert_eq!(stale.value.len(), 1);
        assert!(stale.stale_age.is_some());
        let names = registry.service_names().await.expect("names from cache");
        assert_eq!(names.value, vec!["a".to_string()]);
        assert!(names.stale_age.is_some());
        let refused = registry.register(&registration("a", "h:2")).await;
        assert!(
            refused.is_err_and(|e| e.is_unreachable()),
            "writes are refused"
        );
        assert_eq!(registry.breaker().state, BreakerState::Open);
        assert!(matches!(
            registry.register(&registration("a", "h:2")).await,
            Err(StoreError::CircuitOpen { .. })
        ));

        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            registry.instances("a").await.is_err(),
            "answers older than stale_max_age are not served"
        );
    }

    #[tokio::test]
    async fn a_service_this_replica_never_read_comes_from_the_snapshot() {
        let (registry, store) = registry(Duration::from_secs(60));
        registry.all_instances().await.expect("snapshot");
        registry
            .register(&registration("b", "h:1"))
            .await
            .expect("register");
        store.down.store(true, Ordering::SeqCst);
        let read = registry.instances("b").await.expect("from the snapshot");
        assert_eq!(read.value.len(), 1);
        assert!(read.stale_age.is_some());
        assert!(
            registry
                .instances("never-registered")
                .await
                .expect("snapshot")
                .value
                .is_empty()
        );
    }

    #[tokio::test]
    async fn while_the_store_answers_the_cache_is_never_read() {
        let (registry, store) = registry(Duration::from_secs(60));
        registry
            .register(&registration("c", "h:1"))
            .await
            .expect("register");
        registry.instances("c").await.expect("cached");
        // Another replica deregisters it, straight in the shared store.
        let target = Target {
            service_name: "c".into(),
            instance_id: None,
        };
        store.inner.deregister(&target).await.expect("deregister");
        let read = registry.instances("c").await.expect("read");
        assert!(
            read.value.is_empty(),
            "the store is the truth while it answers"
        );
        assert!(read.stale_age.is_none());
    }

    #[tokio::test]
    async fn the_prober_closes_the_breaker_once_the_store_is_back() {
        let (registry, store) = registry(Duration::from_secs(60));
        store.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let _ = registry.service_names().await;
        }
        assert_eq!(registry.breaker().state, BreakerState::Open);
        store.down.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while registry.breaker().state != BreakerState::Closed && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            registry.breaker().state,
            BreakerState::Closed,
            "closed without any request"
        );
    }
}
