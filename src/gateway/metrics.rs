//! The gateway's Prometheus metrics. The `service` label only ever holds names that resolved
//! to an instance (else `_unresolved`), so callers cannot grow the series count with junk.
//!
//! A labelled series is looked up once per service and event loop and kept (`SeriesCache`),
//! not once per request: prometheus' label lookup (hashing, a lock, two reference counts)
//! showed as a tenth of the gateway's CPU per proxied request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use super::resolve::Source;

/// One service's series, as one event loop uses them.
pub struct ServiceSeries {
    name: String,
    requests: IntCounterVec,
    by_code: Mutex<Vec<(StatusCode, IntCounter)>>,
    durations: HistogramVec,
    /// Created at the first answer from an instance, so that names that never reached one
    /// get no empty histogram.
    upstream_duration: OnceLock<Histogram>,
}

impl ServiceSeries {
    pub fn observe_upstream(&self, took: Duration) {
        self.upstream_duration
            .get_or_init(|| self.durations.with_label_values(&[self.name.as_str()]))
            .observe(took.as_secs_f64());
    }

    /// Counts a request answered with `code`.
    pub fn count(&self, code: StatusCode) {
        let mut by_code = self
            .by_code
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, counter)) = by_code.iter().find(|(c, _)| *c == code) {
            counter.inc();
            return;
        }
        let counter = self
            .requests
            .with_label_values(&[self.name.as_str(), code.as_str()]);
        counter.inc();
        by_code.push((code, counter));
    }
}

pub struct GatewayMetrics {
    registry: Registry,
    requests: IntCounterVec,
    /// By `Source`, in its declaration order.
    resolutions: [IntCounter; 5],
    upstream_duration: HistogramVec,
    pub errors: IntCounterVec,
    pub breaker_open: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_oldest_age: prometheus::Gauge,
}

impl GatewayMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "Requests through /v2/, by service and answered status code.",
            ),
            &["service", "code"],
        )?;
        let resolutions = IntCounterVec::new(
            Opts::new(
                "gateway_resolutions_total",
                "How services were resolved: cache, registry, stale, env, none.",
            ),
            &["source"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "gateway_upstream_duration_seconds",
                "Time from sending a request upstream to its response headers.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["service"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "gateway_errors_total",
                "Requests the gateway failed, by kind (upstream_connect, upstream_timeout, ...).",
            ),
            &["kind"],
        )?;
        let breaker_open = IntGauge::new(
            "gateway_circuit_breaker_open",
            "1 while the breaker in front of the registry is open, else 0.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(resolutions.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let cache_entries = IntGauge::new(
            "gateway_cache_entries",
            "Services in the gateway's resolution cache, as of the last scrape.",
        )?;
        let cache_oldest_age = prometheus::Gauge::new(
            "gateway_cache_oldest_age_seconds",
            "Age of the oldest resolution in the cache, as of the last scrape: above the cache TTL, stale answers are being kept.",
        )?;
        registry.register(Box::new(breaker_open.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_oldest_age.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        for kind in [
            "bad_request",
            "payload_too_large",
            "no_instance",
            "upstream_connect",
            "upstream_timeout",
            "upstream_error",
        ] {
            errors.with_label_values(&[kind]);
        }
        let resolutions = [
            Source::Cache,
            Source::Registry,
            Source::Stale,
            Source::Env,
            Source::None,
        ]
        .map(|source| resolutions.with_label_values(&[source.as_str()]));
        Ok(GatewayMetrics {
            registry,
            requests,
            resolutions,
            upstream_duration,
            errors,
            breaker_open,
            cache_entries,
            cache_oldest_age,
        })
    }

    pub fn resolved(&self, source: Source) -> &IntCounter {
        &self.resolutions[source as usize]
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// The series one event loop has used, by service; each loop has its own, so that counting
/// a request takes no lock another loop holds.
pub struct SeriesCache {
    metrics: Arc<GatewayMetrics>,
    by_service: RwLock<HashMap<String, Arc<ServiceSeries>>>,
}

impl SeriesCache {
    pub fn new(metrics: Arc<GatewayMetrics>) -> Self {
        SeriesCache {
            metrics,
            by_service: RwLock::new(HashMap::new()),
        }
    }

    /// The series of `service` (a resolved name, or `_unresolved`).
    pub fn service(&self, service: &str) -> Arc<ServiceSeries> {
        if let Some(series) = self
            .by_service
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
        {
            return series.clone();
        }
        self.by_service
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(service.to_string())
            .or_insert_with(|| {
                Arc::new(ServiceSeries {
                    name: service.to_string(),
                    requests: self.metrics.requests.clone(),
                    by_code: Mutex::new(Vec::new()),
                    durations: self.metrics.upstream_duration.clone(),
                    upstream_duration: OnceLock::new(),
                })
            })
            .clone()
    }
}
