//! Which instance gets a request: healthy (`ok`) instances before `degraded` ones, instances
//! that keep refusing connections skipped for a while (passive outlier ejection), and among
//! the rest the less loaded of two picked at random (power of two choices), judged by the
//! `load` and then the `p95_ms` the instance reports in its heartbeats, and then by the
//! gateway's own in-flight count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

/// What the gateway knows of one instance (by URL), shared by every resolution that names
/// it. Atomics, so that the request path takes no lock.
#[derive(Debug, Default)]
pub struct UpstreamState {
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the balancer's epoch; 0 = not ejected.
    ejected_until_ms: AtomicU64,
}

pub struct Balancer {
    config: EjectionConfig,
    epoch: Instant,
    states: Mutex<HashMap<String, Arc<UpstreamState>>>,
}

/// Counts a request as in flight on its instance until dropped.
pub struct InFlight(Arc<UpstreamState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new(config: EjectionConfig) -> Arc<Self> {
        Arc::new(Balancer {
            config,
            epoch: Instant::now(),
            states: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<UpstreamState>>> {
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared state of the instance at `url`; called once per resolution, not per request.
    pub fn state(&self, url: &str) -> Arc<UpstreamState> {
        self.lock().entry(url.to_string()).or_default().clone()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_ejected(&self, state: &UpstreamState, now_ms: u64) -> bool {
        state.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Picks an instance, never one in `exclude`; `None` when nothing is left. Allocates
    /// nothing and reads the clock only while some instance is ejected: it runs per request.
    pub fn pick<'a>(&self, upstreams: &'a [Upstream], exclude: &[String]) -> Option<&'a Upstream> {
        let allowed = |u: &&Upstream| !exclude.contains(&u.url);
        if let [only] = upstreams {
            return Some(only).filter(allowed);
        }
        let any_ejection = upstreams
            .iter()
            .any(|u| u.state.ejected_until_ms.load(Ordering::Relaxed) != 0);
        let now = if any_ejection { self.now_ms() } else { 0 };
        let live = |u: &&Upstream| !self.is_ejected(&u.state, now);
        let any_live = upstreams.iter().filter(allowed).any(|u| live(&u));
        let any_healthy = upstreams
            .iter()
            .filter(allowed)
            .filter(|u| !any_live || live(u))
            .any(|u| u.healthy);
        // Everything ejected: trying one beats refusing outright.
        let eligible =
            |u: &&Upstream| allowed(u) && (!any_live || live(u)) && (!any_healthy || u.healthy);
        let nth = |k: usize| upstreams.iter().filter(eligible).nth(k);
        let score = |u: &Upstream| {
            (
                u.load.unwrap_or(0.0),
                u.p95_ms.unwrap_or(0.0),
                u.state.in_flight.load(Ordering::Relaxed),
            )
        };
        match upstreams.iter().filter(eligible).count() {
            0 => None,
            1 => nth(0),
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                // Another worker may eject an instance between these passes: then take any.
                let (Some(ua), Some(ub)) = (nth(a), nth(b)) else {
                    return upstreams.iter().find(allowed);
                };
                let (sa, sb) = (score(ua), score(ub));
                let b_wins =
                    sb.0.total_cmp(&sa.0)
                        .then(sb.1.total_cmp(&sa.1))
                        .then(sb.2.cmp(&sa.2))
                        .is_lt();
                Some(if b_wins { ub } else { ua })
            }
        }
    }

    pub fn start(&self, upstream: &Upstream) -> InFlight {
        upstream.state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(upstream.state.clone())
    }

    pub fn connected(&self, upstream: &Upstream) {
        // Read before writing: on the usual path there is nothing to reset, and a store
        // would dirty a cache line every worker shares.
        let state = &upstream.state;
        if state.consecutive_failures.load(Ordering::Relaxed) != 0 {
            state.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if state.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            state.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure; answers whether the instance is now ejected.
    pub fn connect_failed(&self, upstream: &Upstream) -> bool {
        let failures = upstream
            .state
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures >= self.config.after_failures {
            let until = self.now_ms()
                + u64::try_from(self.config.for_duration.as_millis()).unwrap_or(u64::MAX / 2);
            upstream
                .state
                .ejected_until_ms
                .store(until, Ordering::Relaxed);
            tracing::warn!(upstream = %upstream.url, "ejected after repeated connect failures");
            return true;
        }
        false
    }

    /// Instances ejected right now.
    pub fn ejected(&self) -> Vec<String> {
        let now = self.now_ms();
        let mut out: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| self.is_ejected(s, now))
            .map(|(u, _)| u.clone())
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(b: &Balancer, url: &str, healthy: bool, load: Option<f64>) -> Upstream {
        Upstream::new(b, url.into(), "", healthy, load, None)
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
        let ups = [up(&b, "a", false, None), up(&b, "b", true, None)];
        for _ in 0..50 {
            assert_eq!(b.pick(&ups, &[]).map(|u| u.url.as_str()), Some("b"));
        }
    }

    #[test]
    fn of_two_the_less_loaded_wins() {
        let b = balancer();
        let ups = [
            up(&b, "busy", true, Some(0.9)),
            up(&b, "idle", true, Some(0.1)),
        ];
        for _ in 0..50 {
            assert_eq!(b.pick(&ups, &[]).map(|u| u.url.as_str()), Some("idle"));
        }
    }

    #[test]
    fn excluded_and_ejected_instances_are_skipped() {
        let b = balancer();
        let ups = [up(&b, "a", true, None), up(&b, "b", true, None)];
        assert_eq!(
            b.pick(&ups, &["a".into()]).map(|u| u.url.as_str()),
            Some("b")
        );
        assert!(!b.connect_failed(&ups[0]));
        assert!(b.connect_failed(&ups[0]));
        assert_eq!(b.ejected(), vec!["a".to_string()]);
        for _ in 0..50 {
            assert_eq!(b.pick(&ups, &[]).map(|u| u.url.as_str()), Some("b"));
        }
        b.connected(&ups[0]);
        assert!(b.ejected().is_empty());
        assert!(b.pick(&ups, &["a".into(), "b".into()]).is_none());
    }
}
