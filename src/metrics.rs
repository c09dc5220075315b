//! The registry's Prometheus metrics, with the names existing dashboards and alerts use.
//!
//! Names are a contract (DESIGN.md "Metrics"): `registry_operations_total{operation,status}`,
//! `registry_operation_duration_seconds{operation}`, `registry_active_services`,
//! `registry_circuit_breaker_open`. Label values come from fixed tables only, never from
//! request data, so the series count stays bounded whatever clients send.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct RegistryMetrics {
    registry: Registry,
    pub operations: IntCounterVec,
    pub duration: HistogramVec,
    pub active_services: IntGauge,
    pub breaker_open: IntGauge,
    pub breaker_transitions: IntCounterVec,
    pub stale_reads: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_entries: IntGauge,
    pub store_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub instances: IntGaugeVec,
    pub failovers: IntCounter,
    pub expirations: IntCounter,
}

/// Registry operations, one per API route that reads or changes entries.
pub const OPERATIONS: &[&str] = &[
    "register",
    "heartbeat",
    "deregister",
    "list",
    "get",
    "discover",
    "promote",
];

impl RegistryMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let operations = IntCounterVec::new(
            Opts::new(
                "registry_operations_total",
                "Registry operations by operation and outcome (success, not_found, invalid, unavailable, error).",
            ),
            &["operation", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_operation_duration_seconds",
                "Time to serve a registry operation, including the store round trip.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["operation"],
        )?;
        let active_services = IntGauge::new(
            "registry_active_services",
            "Service names with at least one live instance, as of the last scrape or listing.",
        )?;
        let breaker_open = IntGauge::new(
            "registry_circuit_breaker_open",
            "1 while the circuit breaker in front of Redis is open, else 0.",
        )?;
        registry.register(Box::new(operations.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(active_services.clone()))?;
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "registry_circuit_breaker_transitions_total",
                "Circuit breaker state changes, by the state entered (open, half_open, closed).",
            ),
            &["state"],
        )?;
        let stale_reads = IntCounter::new(
            "registry_stale_reads_total",
            "Reads answered from the fallback cache because the store was unreachable.",
        )?;
        let cache_entries = IntGauge::new(
            "registry_fallback_cache_entries",
            "Answers held in the fallback cache, as of the last scrape.",
        )?;
        let cache_misses = IntCounter::new(
            "registry_fallback_cache_misses_total",
            "Reads that found the store unreachable and nothing cached to answer with.",
        )?;
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_redis_command_duration_seconds",
                "Time of one store call (a Lua script or PING, plus WAIT for changes), by call.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["call"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                "registry_store_errors_total",
                "Failed store calls by kind: unavailable, corrupt, not_replicated, failover_in_progress, circuit_open.",
            ),
            &["kind"],
        )?;
        let instances = IntGaugeVec::new(
            Opts::new(
                "registry_instances",
                "Live instances by the status their heartbeats report, as of the last scrape.",
            ),
            &["status"],
        )?;
        let failovers = IntCounter::new(
            "registry_redis_failovers_total",
            "Times this replica found the Redis master at a new address (a failover).",
        )?;
        registry.register(Box::new(cache_misses.clone()))?;
        registry.register(Box::new(store_duration.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        let expirations = IntCounter::new(
            "registry_expirations_total",
            "Instances Redis expired because their TTL ran out (heartbeats stopped), as seen by this replica.",
        )?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(expirations.clone()))?;
        registry.register(Box::new(breaker_open.clone()))?;
        registry.register(Box::new(breaker_transitions.clone()))?;
        registry.register(Box::new(stale_reads.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Pre-create the success series so dashboards show 0 instead of "no data" at start.
        for kind in [
            "unavailable",
            "corrupt",
            "not_replicated",
            "failover_in_progress",
            "circuit_open",
        ] {
            store_errors.with_label_values(&[kind]);
        }
        for status in ["ok", "degraded"] {
            instances.with_label_values(&[status]);
        }
        for state in ["open", "half_open", "closed"] {
            breaker_transitions.with_label_values(&[state]);
        }
        for op in OPERATIONS {
            operations.with_label_values(&[op, "success"]);
            duration.with_label_values(&[op]);
        }
        Ok(RegistryMetrics {
            registry,
            operations,
            duration,
            active_services,
            breaker_open,
            breaker_transitions,
            stale_reads,
            cache_misses,
            cache_entries,
            store_duration,
            store_errors,
            instances,
            failovers,
            expirations,
        })
    }

    pub fn observe(&self, operation: &str, status: &str, seconds: f64) {
        self.operations
            .with_label_values(&[operation, status])
            .inc();
        self.duration
            .with_label_values(&[operation])
            .observe(seconds);
    }

    /// The text exposition format; an encoding failure yields what was encoded so far.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Maps an HTTP status to the bounded `status` label.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "success",
        404 => "not_found",
        400..=499 => "invalid",
        503 => "unavailable",
        _ => "error",
    }
}
