//! The storage seam: what the HTTP layer needs from wherever entries live.
//!
//! Two implementations sit behind it: `RedisStore`, the real one (keys with a TTL in Redis,
//! shared by every replica), and `MemoryStore`, for single-node trials and fast unit tests of
//! the HTTP layer. Resilience (circuit breaker, fallback cache) wraps a store from the outside
//! rather than living inside either.

mod link;
mod memory;
mod redis;

use std::time::Duration;

use async_trait::async_trait;

use crate::model::{HeartbeatReport, Instance, Registered, Registration, Target};

pub use self::link::MasterSource;
pub use self::memory::MemoryStore;
pub use self::redis::{RedisConfig, RedisStore};

/// Why a store could not answer. None of these is the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or did not answer in time: worth retrying.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something this code does not understand: a bug or a foreign key.
    #[error("store returned unexpected data: {0}")]
    Corrupt(String),
    /// The change reached the master but too few replicas confirmed it in time. It is not
    /// acknowledged; retrying is safe because every change is idempotent.
    #[error("{0}")]
    NotReplicated(String),
    /// Sentinel is moving the master: changes are refused until the new master is known.
    #[error("a Redis failover is under way; nothing was acknowledged, retry in {} ms", retry_in.as_millis())]
    FailoverInProgress { retry_in: Duration },
    /// The circuit breaker in front of the store is open: the call was not even made.
    #[error("the circuit breaker is open after repeated store failures; next probe in {} ms", retry_in.as_millis())]
    CircuitOpen { retry_in: Duration },
}

impl StoreError {
    /// The `kind` label of `registry_store_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::NotReplicated(_) => "not_replicated",
            StoreError::FailoverInProgress { .. } => "failover_in_progress",
            StoreError::CircuitOpen { .. } => "circuit_open",
        }
    }

    /// The store could not be reached at all (as opposed to answering something unexpected):
    /// the case in which cached answers may stand in.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::CircuitOpen { .. }
        )
    }
}

/// The result of a heartbeat: how many instances were refreshed (0 = unknown or expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    pub count: usize,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or replaces one instance and (re)starts its TTL.
    async fn register(&self, reg: &Registration) -> Result<Registered, StoreError>;

    /// Restarts the TTL of the targeted live instances and records the report.
    async fn heartbeat(
        &self,
        target: &Target,
        report: &HeartbeatReport,
    ) -> Result<Refreshed, StoreError>;

    /// Removes the targeted instances; answers how many were live.
    async fn deregister(&self, target: &Target) -> Result<usize, StoreError>;

    /// Sets the role of the targeted live instances; answers how many there were.
    async fn promote(&self, target: &Target, role: &str) -> Result<usize, StoreError>;

    /// Every live instance of one service: costs O(instances of that service).
    async fn instances(&self, service_name: &str) -> Result<Vec<Instance>, StoreError>;

    /// Every live instance of every service (discovery without a name).
    async fn all_instances(&self) -> Result<Vec<Instance>, StoreError>;

    /// Names that have at least one live instance, sorted.
    async fn service_names(&self) -> Result<Vec<String>, StoreError>;

    /// A round trip to the backend, for readiness.
    async fn ping(&self) -> Result<Duration, StoreError>;

    /// "redis" or "memory", for `/health` and the start-up log.
    fn backend(&self) -> &'static str;

    /// The address of the node serving the store now, where that can change (failover).
    fn master(&self) -> Option<String> {
        None
    }

    /// How many times the master was found at a new address since start.
    fn failovers(&self) -> u64 {
        0
    }

    /// How many instances this replica saw expire since start.
    fn expirations(&self) -> u64 {
        0
    }
}
