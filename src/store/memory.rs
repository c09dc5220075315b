//! An in-process store with the same semantics as the Redis one.
//!
//! It serves single-node trials (`rollcall serve` without Redis) and the HTTP layer's unit tests.
//! Expiry uses tokio's clock so that TTL behaviour can be tested with paused time; it loses
//! everything on restart and is not shared between replicas, which start-up announces loudly.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Refreshed, Store, StoreError};
use crate::model::{HeartbeatReport, Instance, Registered, Registration, Status, Target};

#[derive(Default)]
pub struct MemoryStore {
    services: Mutex<BTreeMap<String, BTreeMap<String, Entry>>>,
}

struct Entry {
    instance: Instance,
    expires_at: Instant,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn snapshot(&self, now: Instant) -> Instance {
        let mut i = self.instance.clone();
        i.ttl_remaining = self.expires_at.saturating_duration_since(now);
        i
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops expired entries, so that every operation below sees live ones only.
    fn lock_pruned(&self) -> MutexGuard<'_, BTreeMap<String, BTreeMap<String, Entry>>> {
        // A poisoned lock only means another request panicked mid-way; every mutation below is
        // a single insert or remove, so the map is still consistent.
        let mut map = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, instances| {
            instances.retain(|_, e| e.live(now));
            !instances.is_empty()
        });
        map
    }

    /// Applies `f` to the targeted instances and answers how many there were.
    fn for_targets(&self, target: &Target, mut f: impl FnMut(&mut Entry)) -> usize {
        let mut map = self.lock_pruned();
        let Some(instances) = map.get_mut(&target.service_name) else {
            return 0;
        };
        match &target.instance_id {
            Some(id) => instances.get_mut(id).map(&mut f).map_or(0, |()| 1),
            None => {
                instances.values_mut().for_each(&mut f);
                instances.len()
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn register(&self, reg: &Registration) -> Result<Registered, StoreError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut map = self.lock_pruned();
        let instances = map.entry(reg.service_name.clone()).or_default();
        let previous = instances
            .get(&reg.instance_id)
            .map(|e| e.instance.registered_at);
        let registered_at = previous.unwrap_or(wall);
        instances.insert(
            reg.instance_id.clone(),
            Entry {
                instance: Instance {
                    service_name: reg.service_name.clone(),
                    instance_id: reg.instance_id.clone(),
                    role: reg.role.clone(),
                    ttl: reg.ttl,
                    descriptor: reg.descriptor.clone(),
                    registered_at,
                    last_heartbeat: wall,
                    status: Status::Ok,
                    p95_ms: None,
                    queue_depth: None,
                    load: None,
                    ttl_remaining: reg.ttl,
                },
                expires_at: now + reg.ttl,
            },
        );
        Ok(Registered {
            created: previous.is_none(),
            registered_at,
        })
    }

    async fn heartbeat(
        &self,
        target: &Target,
        report: &HeartbeatReport,
    ) -> Result<Refreshed, StoreError> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let count = self.for_targets(target, |e| {
            let i = &mut e.instance;
            i.last_heartbeat = wall;
            if let Some(s) = report.status {
                i.status = s;
            }
            if report.p95_ms.is_some() {
                i.p95_ms = report.p95_ms;
            }
            if report.queue_depth.is_some() {
                i.queue_depth = report.queue_depth;
            }
            if report.load.is_some() {
                i.load = report.load;
            }
            e.expires_at = now + i.ttl;
        });
        Ok(Refreshed { count })
    }

    async fn deregister(&self, target: &Target) -> Result<usize, StoreError> {
        let mut map = self.lock_pruned();
        let Some(instances) = map.get_mut(&target.service_name) else {
            return Ok(0);
        };
        let removed = match &target.instance_id {
            Some(id) => usize::from(instances.remove(id).is_some()),
            None => std::mem::take(instances).len(),
        };
        if instances.is_empty() {
            map.remove(&target.service_name);
        }
        Ok(removed)
    }

    async fn promote(&self, target: &Target, role: &str) -> Result<usize, StoreError> {
        Ok(self.for_targets(target, |e| e.instance.role = role.to_string()))
    }

    async fn instances(&self, service_name: &str) -> Result<Vec<Instance>, StoreError> {
        let now = Instant::now();
        let map = self.lock_pruned();
        Ok(map
            .get(service_name)
            .map(|m| m.values().map(|e| e.snapshot(now)).collect())
            .unwrap_or_default())
    }

    async fn all_instances(&self) -> Result<Vec<Instance>, StoreError> {
        let now = Instant::now();
        let map = self.lock_pruned();
        Ok(map
            .values()
            .flat_map(|m| m.values().map(|e| e.snapshot(now)))
            .collect())
    }

    async fn service_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock_pruned().keys().cloned().collect())
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        Ok(Duration::ZERO)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(name: &str, id: &str, ttl_s: u64) -> Registration {
        Registration::sample(name, id, Duration::from_secs(ttl_s))
    }

    fn one(name: &str, id: &str) -> Target {
        Target {
            service_name: name.into(),
            instance_id: Some(id.into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl_and_heartbeats_extend_it() {
        let store = MemoryStore::new();
        store
            .register(&registration("a", "h:1", 10))
            .await
            .expect("register");
        tokio::time::advance(Duration::from_secs(8)).await;
        let hb = store
            .heartbeat(&one("a", "h:1"), &HeartbeatReport::default())
            .await
            .expect("heartbeat");
        assert_eq!(hb.count, 1);
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(store.instances("a").await.expect("read").len(), 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(store.instances("a").await.expect("read").is_empty());
        assert!(store.service_names().await.expect("names").is_empty());
        let hb = store
            .heartbeat(&one("a", "h:1"), &HeartbeatReport::default())
            .await
            .expect("heartbeat");
        assert_eq!(
            hb.count, 0,
            "an expired instance must not be revived by a heartbeat"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reregistration_is_an_upsert_that_keeps_registered_at() {
        let store = MemoryStore::new();
        let first = store
            .register(&registration("a", "h:1", 10))
            .await
            .expect("first");
        assert!(first.created);
        let second = store
            .register(&registration("a", "h:1", 10))
            .await
            .expect("second");
        assert!(!second.created);
        assert_eq!(first.registered_at, second.registered_at);
        assert_eq!(store.instances("a").await.expect("read").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn name_only_targets_reach_every_instance() {
        let store = MemoryStore::new();
        store
            .register(&registration("a", "h:1", 10))
            .await
            .expect("1");
        store
            .register(&registration("a", "h:2", 10))
            .await
            .expect("2");
        let all = Target {
            service_name: "a".into(),
            instance_id: None,
        };
        assert_eq!(store.promote(&all, "canary").await.expect("promote"), 2);
        assert!(
            store
                .instances("a")
                .await
                .expect("read")
                .iter()
                .all(|i| i.role == "canary")
        );
        assert_eq!(store.deregister(&all).await.expect("deregister"), 2);
        assert_eq!(store.deregister(&all).await.expect("again"), 0);
    }
}
