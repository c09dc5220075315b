//! A circuit breaker: closed → open after N consecutive failures → one half-open probe after
//! a cool-down → closed on success (open again on failure).
//!
//! Hand-written because tower has none and the crates that do are stale or unstable; the
//! state machine is small. Time comes from tokio's clock, so tests drive it with paused time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub threshold: u32,
    /// How long it stays open before one probe may try again.
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What `/health` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub failures: u32,
    /// While open: how long until a probe may go.
    pub retry_in: Option<Duration>,
}

struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Instant,
    probe_in_flight: bool,
}

pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    on_transition: Box<dyn Fn(BreakerState) + Send + Sync>,
}

/// Permission to make one call. Report how it went with `succeeded`/`failed`; a permit dropped
/// without a report (the request was cancelled) frees a probe slot and changes nothing else.
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    reported: bool,
}

/// The breaker is open: the call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub retry_in: Duration,
}

impl Breaker {
    /// `on_transition` sees every change of state (for metrics and logs).
    pub fn new(
        config: BreakerConfig,
        on_transition: impl Fn(BreakerState) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Breaker {
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: Instant::now(),
                probe_in_flight: false,
            }),
            on_transition: Box::new(on_transition),
        })
    }

    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section below leaves `Inner` consistent, so a poisoned lock is usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, inner: &mut Inner, state: BreakerState) {
        if inner.state != state {
            inner.state = state;
            (self.on_transition)(state);
        }
    }

    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, Rejected> {
        let mut inner = self.lock();
        let probe = match inner.state {
            BreakerState::Closed => false,
            BreakerState::Open => {
                let elapsed = inner.opened_at.elapsed();
                if elapsed < self.config.cooldown {
                    return Err(Rejected {
                        retry_in: self.config.cooldown - elapsed,
                    });
                }
                self.set(&mut inner, BreakerState::HalfOpen);
                inner.probe_in_flight = true;
                true
            }
            BreakerState::HalfOpen => {
                if inner.probe_in_flight {
                    return Err(Rejected {
                        retry_in: self.config.cooldown,
                    });
                }
                inner.probe_in_flight = true;
                true
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        })
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let inner = self.lock();
        BreakerSnapshot {
            state: inner.state,
            failures: inner.failures,
            retry_in: (inner.state == BreakerState::Open).then(|| {
                self.config
                    .cooldown
                    .saturating_sub(inner.opened_at.elapsed())
            }),
        }
    }

    /// True when the next call would be a probe: open and cooled down.
    pub fn probe_due(&self) -> bool {
        let inner = self.lock();
        inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.config.cooldown
    }

    fn record(&self, probe: bool, success: bool) {
        let mut inner = self.lock();
        if probe {
            inner.probe_in_flight = false;
        }
        if success {
            inner.failures = 0;
            self.set(&mut inner, BreakerState::Closed);
            return;
        }
        inner.failures = inner.failures.saturating_add(1);
        let trip = match inner.state {
            BreakerState::Closed => inner.failures >= self.config.threshold,
            BreakerState::HalfOpen => probe,
            BreakerState::Open => false,
        };
        if trip {
            inner.opened_at = Instant::now();
            self.set(&mut inner, BreakerState::Open);
        }
    }
}

impl Permit {
    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, true);
    }

    pub fn failed(mut self) {
        self.reported = true;
        self.breaker.record(self.probe, false);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.lock().probe_in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn breaker() -> (Arc<Breaker>, Arc<AtomicUsize>) {
        let transitions = Arc::new(AtomicUsize::new(0));
        let seen = transitions.clone();
        let b = Breaker::new(
            BreakerConfig {
                threshold: 3,
                cooldown: Duration::from_secs(1),
            },
            move |_| {
                seen.fetch_add(1, Ordering::SeqCst);
            },
        );
        (b, transitions)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_probes_after_cooldown() {
        let (b, transitions) = breaker();
        for _ in 0..2 {
            b.try_acquire().expect("closed").failed();
        }
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        b.try_acquire().expect("closed").succeeded();
        assert_eq!(b.snapshot().failures, 0, "a success resets the count");
        for _ in 0..3 {
            b.try_acquire().expect("closed").failed();
        }
        assert_eq!(b.snapshot().state, BreakerState::Open);
        let rejected = b.try_acquire().err().expect("open rejects");
        assert_eq!(rejected.retry_in, Duration::from_secs(1));

        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(b.try_acquire().is_err());
        assert!(!b.probe_due());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.probe_due());
        let probe = b.try_acquire().expect("one probe");
        assert_eq!(b.snapshot().state, BreakerState::HalfOpen);
        assert!(b.try_acquire().is_err(), "only one probe at a time");
        probe.failed();
        assert_eq!(
            b.snapshot().state,
            BreakerState::Open,
            "a failed probe re-opens"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        b.try_acquire().expect("probe").succeeded();
        assert_eq!(b.snapshot().state, BreakerState::Closed);
        // closed→open, open→half, half→open, open→half, half→closed
        assert_eq!(transitions.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_the_slot() {
        let (b, _) = breaker();
        for _ in 0..3 {
            b.try_acquire().expect("closed").failed();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.try_acquire().expect("probe"));
        assert!(b.try_acquire().is_ok(), "the next caller may probe");
    }
}
