//! Where a service is: local cache (fresh for `cache_ttl`) → the registry through the load
//! balancer, behind its own circuit breaker → the last good answer for `stale_for` while the
//! registry is unreachable (stale-if-error) → the `<SERVICE>_URL` environment variable → none.
//!
//! Concurrent misses for one service wait for a single registry call instead of stampeding it.
//! The cache is a plain read-locked map rather than moka: a hit is on every proxied request,
//! and moka's per-read bookkeeping showed in the benchmark; entries age out by their own
//! timestamps and the map is pruned when it grows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use std::sync::{Mutex as StdMutex, RwLock};

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::balance::{Balancer, UpstreamState};
use super::pool::Target;
use crate::breaker::{Breaker, BreakerConfig, BreakerSnapshot, BreakerState};

/// Where a resolution came from; also the `source` label of the resolution metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Registry,
    Stale,
    Env,
    None,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Registry => "registry",
            Source::Stale => "stale",
            Source::Env => "env",
            Source::None => "none",
        }
    }
}

/// One instance the gateway may send a request to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The registered endpoint (may carry a path prefix).
    pub url: String,
    pub healthy: bool,
    pub load: Option<f64>,
    pub p95_ms: Option<f64>,
    /// The balancer's in-flight and ejection state for this URL.
    pub state: Arc<UpstreamState>,
    /// The instance id as a ready header value (`X-Rollcall-Instance`), built once.
    pub instance_header: Option<axum::http::HeaderValue>,
    /// `url` parsed for connecting, or why it cannot be proxied to.
    pub target: Result<Arc<Target>, String>,
}

impl Upstream {
    pub fn new(
        balancer: &Balancer,
        url: String,
        instance_id: &str,
        healthy: bool,
        load: Option<f64>,
        p95_ms: Option<f64>,
    ) -> Upstream {
        Upstream {
            state: balancer.state(&url),
            instance_header: axum::http::HeaderValue::from_str(instance_id).ok(),
            target: Target::parse(&url).map(Arc::new),
            url,
            healthy,
            load,
            p95_ms,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resolution {
    pub upstreams: Arc<Vec<Upstream>>,
    pub source: Source,
}

/// Where `<SERVICE>_URL` variables are read from: the process environment, or a fixed map
/// (tests, which must not change the environment of other tests running in parallel).
#[derive(Debug, Clone)]
pub enum EnvSource {
    Process,
    Fixed(HashMap<String, String>),
}

impl EnvSource {
    fn get(&self, key: &str) -> Option<String> {
        match self {
            EnvSource::Process => std::env::var(key).ok(),
            EnvSource::Fixed(map) => map.get(key).cloned(),
        }
        .filter(|v| !v.is_empty())
    }
}

/// `osint_service` → `OSINT_SERVICE_URL`, `a-b.c` → `A_B_C_URL`: the existing deployment's
/// variables.
pub fn env_var_name(service: &str) -> String {
    format!("{}_URL", service.to_uppercase().replace(['-', '.'], "_"))
}

#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// The registry (the load balancer); `None` resolves from env vars only.
    pub registry_url: Option<String>,
    pub cache_ttl: Duration,
    pub stale_for: Duration,
    pub registry_timeout: Duration,
    pub breaker: BreakerConfig,
    pub env: EnvSource,
}

struct Entry {
    upstreams: Arc<Vec<Upstream>>,
    fetched_at: Instant,
    /// `Registry` or `Env`: only registry answers may be served stale.
    origin: Source,
}

/// Why a registry lookup gave nothing.
enum Miss {
    Unknown,
    Unreachable(String),
}

pub struct Resolver {
    config: ResolverConfig,
    http: reqwest::Client,
    cache: RwLock<HashMap<String, Arc<Entry>>>,
    locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    breaker: Arc<Breaker>,
    balancer: Arc<Balancer>,
}

/// Beyond this many cached services, entries too old to serve are dropped.
const PRUNE_ABOVE: usize = 10_000;

/// What `/gateway/status` shows of one cached service.
#[derive(Debug, Clone)]
pub struct CachedService {
    pub service: String,
    pub age: Duration,
    pub instances: usize,
}

impl Resolver {
    pub fn new(
        config: ResolverConfig,
        balancer: Arc<Balancer>,
        on_transition: impl Fn(BreakerState) + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(config.registry_timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Resolver {
            cache: RwLock::new(HashMap::new()),
            locks: StdMutex::new(HashMap::new()),
            breaker: Breaker::new(config.breaker, on_transition),
            balancer,
            http,
            config,
        })
    }

    fn entry(&self, service: &str) -> Option<Arc<Entry>> {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .cloned()
    }

    fn forget(&self, service: &str) {
        self.cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(service);
    }

    pub fn breaker(&self) -> BreakerSnapshot {
        self.breaker.snapshot()
    }

    pub fn breaker_threshold(&self) -> u32 {
        self.config.breaker.threshold
    }

    pub fn cache_ttl(&self) -> Duration {
        self.config.cache_ttl
    }

    pub fn cached(&self) -> Vec<CachedService> {
        let keep = self.config.stale_for.max(self.config.cache_ttl);
        let cache = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<CachedService> = cache
            .iter()
            .filter(|(_, e)| e.fetched_at.elapsed() < keep)
            .map(|(k, e)| CachedService {
                service: k.clone(),
                age: e.fetched_at.elapsed(),
                instances: e.upstreams.len(),
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// A cached answer younger than `cache_ttl`: `Cache` for registry answers, `Env` for
    /// env-var answers (so the metric still says the service is not in the registry).
    fn fresh(&self, service: &str) -> Option<Resolution> {
        self.entry(service)
            .filter(|e| e.fetched_at.elapsed() < self.config.cache_ttl)
            .map(|e| Resolution {
                upstreams: e.upstreams.clone(),
                source: if e.origin == Source::Env {
                    Source::Env
                } else {
                    Source::Cache
                },
            })
    }

    fn remember(&self, service: &str, upstreams: Arc<Vec<Upstream>>, origin: Source) {
        let keep = self.config.stale_for.max(self.config.cache_ttl);
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= PRUNE_ABOVE {
            cache.retain(|_, e| e.fetched_at.elapsed() < keep);
        }
        cache.insert(
            service.to_string(),
            Arc::new(Entry {
                upstreams,
                fetched_at: Instant::now(),
                origin,
            }),
        );
    }

    /// Resolves `service`; `Err` carries what was tried, for the 503 body.
    pub async fn resolve(&self, service: &str) -> Result<Resolution, String> {
        if let Some(hit) = self.fresh(service) {
            return Ok(hit);
        }
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(service.to_string())
            .or_default()
            .clone();
        let _single_flight = lock.lock().await;
        if let Some(hit) = self.fresh(service) {
            return Ok(hit);
        }
        let mut tried = vec!["cache".to_string()];
        match self.query(service).await {
            Ok(upstreams) => {
                let upstreams = Arc::new(upstreams);
                self.remember(service, upstreams.clone(), Source::Registry);
                return Ok(Resolution {
                    upstreams,
                    source: Source::Registry,
                });
            }
            Err(Miss::Unknown) => {
                self.forget(service);
                tried.push("registry (no live instance)".into());
            }
            Err(Miss::Unreachable(why)) => {
                tried.push(format!("registry ({why})"));
                if let Some(entry) = self.entry(service).filter(|e| {
                    e.origin == Source::Registry && e.fetched_at.elapsed() < self.config.stale_for
                }) {
                    return Ok(Resolution {
                        upstreams: entry.upstreams.clone(),
                        source: Source::Stale,
                    });
                }
                tried.push("stale cache (nothing recent)".into());
            }
        }
        let var = env_var_name(service);
        match self.config.env.get(&var) {
            Some(url) => {
                let instance_id = format!("env:{var}");
                let upstreams = Arc::new(vec![Upstream::new(
                    &self.balancer,
                    url,
                    &instance_id,
                    true,
                    None,
                    None,
                )]);
                // Cached like a registry answer, so env-only services do not queue on the
                // single-flight lock for every request.
                self.remember(service, upstreams.clone(), Source::Env);
                Ok(Resolution {
                    upstreams,
                    source: Source::Env,
                })
            }
            None => {
                tried.push(format!("env {var} (unset)"));
                Err(tried.join(", "))
            }
        }
    }

    async fn query(&self, service: &str) -> Result<Vec<Upstream>, Miss> {
        let Some(base) = &self.config.registry_url else {
            return Err(Miss::Unreachable("no registry configured".into()));
        };
        let permit = self
            .breaker
            .try_acquire()
            .map_err(|_| Miss::Unreachable("circuit breaker open".into()))?;
        let answer = self
            .http
            .get(format!("{base}/services/{service}"))
            .send()
            .await;
        let resp = match answer {
            Ok(r) => r,
            Err(e) => {
                permit.failed();
                return Err(Miss::Unreachable(if e.is_timeout() {
                    "timed out".into()
                } else {
                    "unreachable".into()
                }));
            }
        };
        match resp.status().as_u16() {
            200 => {}
            404 => {
                permit.succeeded();
                return Err(Miss::Unknown);
            }
            code => {
                permit.failed();
                return Err(Miss::Unreachable(format!("answered {code}")));
            }
        }
        let body: serde_json::Value = match resp.json().await {
            Ok(b) => b,
            Err(e) => {
                permit.failed();
                return Err(Miss::Unreachable(format!("unreadable answer: {e}")));
            }
        };
        permit.succeeded();
        let upstreams: Vec<Upstream> = body["instances"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|i| {
                        let url = i["endpoint"].as_str()?;
                        let instance_id = i["instance_id"].as_str().unwrap_or_default();
                        Some(Upstream::new(
                            &self.balancer,
                            url.to_string(),
                            instance_id,
                            i["status"].as_str() != Some("degraded"),
                            i["load"].as_f64(),
                            i["p95_ms"].as_f64(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if upstreams.is_empty() {
            Err(Miss::Unknown)
        } else {
            Ok(upstreams)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::env_var_name;

    #[test]
    fn env_var_names_follow_the_existing_deployment() {
        assert_eq!(env_var_name("osint_service"), "OSINT_SERVICE_URL");
        assert_eq!(env_var_name("ip-intel.v2"), "IP_INTEL_V2_URL");
    }
}
