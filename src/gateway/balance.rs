//! Which instance gets a request: healthy (`ok`) instances before `degraded` ones, instances
//! that keep refusing connections skipped for a while (passive outlier ejection), and among
//! the rest the less loaded of two picked at random (power of two choices), judged by the
//! load the instance reports in its heartbeats and then by the gateway's own in-flight count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::resolve::Upstream;

#[derive(Debug, Clone, Copy)]
pub struct EjectionConfig {
    /// Consecutive connect failures that eject an instance.
    pub after_failures: u32,
    /// How long it stays ejected.
    pub for_duration: Duration,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    in_flight: usize,
}

pub struct Balancer {
    config: EjectionConfig,
    health: Mutex<HashMap<String, Health>>,
}

/// Counts a request as in flight on its instance until dropped.
pub struct InFlight {
    balancer: Arc<Balancer>,
    url: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(h) = self.balancer.lock().get_mut(&self.url) {
            h.in_flight = h.in_flight.saturating_sub(1);
        }
    }
}

impl Balancer {
    pub fn new(config: EjectionConfig) -> Arc<Self> {
        Arc::new(Balancer {
            config,
            health: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Health>> {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Picks an instance, never one in `exclude`; `None` when nothing is left.
    pub fn pick(&self, upstreams: &[Upstream], exclude: &[String]) -> Option<Upstream> {
        let now = Instant::now();
        let health = self.lock();
        let ejected = |u: &Upstream| {
            health
                .get(&u.url)
                .and_then(|h| h.ejected_until)
                .is_some_and(|t| t > now)
        };
        let allowed: Vec<&Upstream> = upstreams
            .iter()
            .filter(|u| !exclude.contains(&u.url))
            .collect();
        let mut pool: Vec<&Upstream> = allowed.iter().copied().filter(|u| !ejected(u)).collect();
        if pool.is_empty() {
            // Everything is ejected: trying one beats refusing outright.
            pool = allowed;
        }
        if pool.iter().any(|u| u.healthy) {
            pool.retain(|u| u.healthy);
        }
        let score = |u: &Upstream| {
            (
                u.load.unwrap_or(0.0),
                health.get(&u.url).map_or(0, |h| h.in_flight),
            )
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (sa, sb) = (score(pool[a]), score(pool[b]));
                let better = if sb.0 < sa.0 || (sb.0 == sa.0 && sb.1 < sa.1) {
                    b
                } else {
                    a
                };
                Some(pool[better].clone())
            }
        }
    }

    pub fn start(self: &Arc<Self>, url: &str) -> InFlight {
        self.lock().entry(url.to_string()).or_default().in_flight += 1;
        InFlight {
            balancer: self.clone(),
            url: url.to_string(),
        }
    }

    pub fn connected(&self, url: &str) {
        if let Some(h) = self.lock().get_mut(url) {
            h.consecutive_failures = 0;
            h.ejected_until = None;
        }
    }

    /// A connect failure; answers whether the instance is now ejected.
    pub fn connect_failed(&self, url: &str) -> bool {
        let mut health = self.lock();
        let h = health.entry(url.to_string()).or_default();
        h.consecutive_failures += 1;
        if h.consecutive_failures >= self.config.after_failures {
            h.ejected_until = Some(Instant::now() + self.config.for_duration);
            tracing::warn!(upstream = url, "ejected after repeated connect failures");
            return true;
        }
        false
    }

    /// Instances ejected right now.
    pub fn ejected(&self) -> Vec<String> {
        let now = Instant::now();
        let mut out: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, h)| h.ejected_until.is_some_and(|t| t > now))
            .map(|(u, _)| u.clone())
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(url: &str, healthy: bool, load: Option<f64>) -> Upstream {
        Upstream {
            url: url.into(),
            instance_id: url.into(),
            healthy,
            load,
            p95_ms: None,
        }
    }

    fn balancer() -> Arc<Balancer> {
        Balancer::new(EjectionConfig {
            after_failures: 2,
            for_duration: Duration::from_secs(10),
        })
    }

    #[test]
    fn healthy_instances_come_before_degraded_ones() {
        let b = balancer();
        let ups = [up("a", false, None), up("b", true, None)];
        for _ in 0..50 {
            assert_eq!(b.pick(&ups, &[]).map(|u| u.url), Some("b".into()));
        }
    }

    #[test]
    fn of_two_the_less_loaded_wins() {
        let b = balancer();
        let ups = [up("busy", true, Some(0.9)), up("idle", true, Some(0.1))];
        for _ in 0..50 {
            assert_eq!(b.pick(&ups, &[]).map(|u| u.url), Some("idle".into()));
        }
    }

    #[test]
    fn excluded_and_ejected_instances_are_skipped() {
        let b = balancer();
        let ups = [up("a", true, None), up("b", true, None)];
        assert_eq!(b.pick(&ups, &["a".into()]).map(|u| u.url), Some("b".into()));
        assert!(!b.connect_failed("a"));
        assert!(b.connect_failed("a"));
        assert_eq!(b.ejected(), vec!["a".to_string()]);
        for _ in 0..50 {
            assert_eq!(b.pick(&ups, &[]).map(|u| u.url), Some("b".into()));
        }
        b.connected("a");
        assert!(b.ejected().is_empty());
        assert_eq!(b.pick(&ups, &["a".into(), "b".into()]), None);
    }
}
