//! The registry's domain types, shared by the HTTP layer and every store.
//!
//! They exist apart from the wire formats so that validation happens once, at the edge
//! (`validate`), and the stores only ever see values that are already known to be good.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};

/// Health a service reports about itself in its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "ok" => Some(Status::Ok),
            "degraded" => Some(Status::Degraded),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The part of an instance that only changes when it registers again.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Descriptor {
    pub endpoint: String,
    pub health_endpoint: String,
    pub metadata: Map<String, Value>,
    #[serde(rename = "type")]
    pub kind: String,
    pub caps: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// A validated registration: everything needed to upsert one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub service_name: String,
    pub instance_id: String,
    pub role: String,
    pub ttl: Duration,
    pub descriptor: Descriptor,
}

/// Which instances a heartbeat, promotion or deregistration is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service_name: String,
    /// `None` means every live instance of the service.
    pub instance_id: Option<String>,
}

/// Load figures a heartbeat may carry; absent fields leave the stored value unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatReport {
    pub status: Option<Status>,
    pub p95_ms: Option<f64>,
    pub queue_depth: Option<u64>,
    pub load: Option<f64>,
}

/// What a store answers after an upsert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// False when the instance was live already and this was a re-registration.
    pub created: bool,
    pub registered_at: SystemTime,
}

/// One live instance as a store returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub service_name: String,
    pub instance_id: String,
    pub role: String,
    pub ttl: Duration,
    pub descriptor: Descriptor,
    pub registered_at: SystemTime,
    pub last_heartbeat: SystemTime,
    pub status: Status,
    pub p95_ms: Option<f64>,
    pub queue_depth: Option<u64>,
    pub load: Option<f64>,
    pub ttl_remaining: Duration,
}

impl Instance {
    /// The single opaque id PAS-style clients heartbeat with.
    pub fn service_id(&self) -> String {
        service_id(&self.service_name, &self.instance_id)
    }

    /// Serves old clients that expect one instance per name: healthy first, then the freshest.
    pub fn pick_representative(instances: &[Instance]) -> Option<&Instance> {
        instances.iter().max_by(|a, b| {
            (a.status == Status::Ok, a.last_heartbeat, &a.instance_id).cmp(&(
                b.status == Status::Ok,
                b.last_heartbeat,
                &b.instance_id,
            ))
        })
    }
}

/// Joins name and instance id; names never contain `/`, so the first `/` splits them again.
pub fn service_id(service_name: &str, instance_id: &str) -> String {
    format!("{service_name}/{instance_id}")
}

pub fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn from_millis_since_epoch(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// RFC 3339 with milliseconds in UTC, the form the replaced registries answered with.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
impl Registration {
    /// A plain registration for unit tests: endpoint `http://<instance_id>`.
    pub(crate) fn sample(service_name: &str, instance_id: &str, ttl: Duration) -> Self {
        Registration {
            service_name: service_name.into(),
            instance_id: instance_id.into(),
            role: "production".into(),
            ttl,
            descriptor: Descriptor {
                endpoint: format!("http://{instance_id}"),
                health_endpoint: "/health".into(),
                metadata: Default::default(),
                kind: "service".into(),
                caps: vec![],
                labels: Default::default(),
            },
        }
    }
}
