//! Wire bodies and their validation into domain values.
//!
//! Every request body is checked here, completely, before any store is touched: that is what
//! makes "bad input changes nothing" hold. Each failure names the field and says why, because
//! the callers are ~100 services whose owners read these messages in their logs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;

use crate::model::{Descriptor, HeartbeatReport, Registration, Status, Target};

pub const MAX_NAME_LEN: usize = 64;
pub const MAX_INSTANCE_ID_LEN: usize = 128;
pub const MAX_TOKEN_LEN: usize = 32;
pub const MAX_ENDPOINT_LEN: usize = 2048;
pub const MAX_HEALTH_ENDPOINT_LEN: usize = 256;
pub const MAX_METADATA_KEYS: usize = 64;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
pub const MAX_CAPS: usize = 32;
pub const MIN_TTL_S: u64 = 1;
pub const MAX_TTL_S: u64 = 86_400;
pub const DEFAULT_TTL_S: u64 = 60;
pub const DEFAULT_HEALTH_ENDPOINT: &str = "/health";
pub const DEFAULT_TYPE: &str = "service";
pub const DEFAULT_ROLE: &str = "production";

/// One invalid field and the reason, as shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.field, self.reason)
    }
}

/// `POST /register`, in both spellings: the replaced registry's (`service_name`, `endpoint`)
/// and the PAS one (`name`, `url`, `type`, `role`, `caps`, `labels`, `ttl_s`).
/// Unknown fields are ignored so that clients sending extra PAS fields keep working.
#[derive(Debug, Default, Deserialize)]
pub struct RegisterBody {
    #[serde(alias = "name")]
    pub service_name: Option<String>,
    #[serde(alias = "url")]
    pub endpoint: Option<String>,
    pub health_endpoint: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub instance_id: Option<String>,
    pub ttl_s: Option<u64>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: Option<String>,
    pub caps: Option<Vec<String>>,
    pub labels: Option<BTreeMap<String, String>>,
}

/// `POST|PUT /heartbeat`: `{service_name, instance_id?}` or `{service_id}` plus load figures.
#[derive(Debug, Default, Deserialize)]
pub struct HeartbeatBody {
    #[serde(alias = "name")]
    pub service_name: Option<String>,
    pub instance_id: Option<String>,
    pub service_id: Option<String>,
    pub status: Option<String>,
    pub p95_ms: Option<f64>,
    pub queue_depth: Option<u64>,
    pub load: Option<f64>,
}

/// `POST /promote`.
#[derive(Debug, Default, Deserialize)]
pub struct PromoteBody {
    #[serde(alias = "name")]
    pub service_name: Option<String>,
    pub instance_id: Option<String>,
    pub service_id: Option<String>,
    pub role: Option<String>,
}

/// `POST /deregister` (the PAS form; `DELETE /deregister/{name}` carries no body).
#[derive(Debug, Default, Deserialize)]
pub struct DeregisterBody {
    #[serde(alias = "name")]
    pub service_name: Option<String>,
    pub instance_id: Option<String>,
    pub service_id: Option<String>,
}

impl RegisterBody {
    pub fn validate(self) -> Result<Registration, FieldError> {
        let service_name = required("service_name", self.service_name)?;
        service_name_rule("service_name", &service_name)?;
        let endpoint = required("endpoint", self.endpoint)?;
        let url = endpoint_rule("endpoint", &endpoint)?;
        let instance_id = match self.instance_id {
            Some(id) => {
                instance_id_rule("instance_id", &id)?;
                id
            }
            None => default_instance_id(&url),
        };
        let health_endpoint = self
            .health_endpoint
            .unwrap_or_else(|| DEFAULT_HEALTH_ENDPOINT.to_string());
        health_endpoint_rule("health_endpoint", &health_endpoint)?;
        let ttl_s = self.ttl_s.unwrap_or(DEFAULT_TTL_S);
        if !(MIN_TTL_S..=MAX_TTL_S).contains(&ttl_s) {
            return Err(FieldError::new(
                "ttl_s",
                format!("must be between {MIN_TTL_S} and {MAX_TTL_S} seconds, got {ttl_s}"),
            ));
        }
        let kind = self.kind.unwrap_or_else(|| DEFAULT_TYPE.to_string());
        token_rule("type", &kind, MAX_TOKEN_LEN)?;
        let role = self.role.unwrap_or_else(|| DEFAULT_ROLE.to_string());
        token_rule("role", &role, MAX_TOKEN_LEN)?;
        let metadata = self.metadata.unwrap_or_default();
        metadata_rule("metadata", &metadata)?;
        let caps = caps_rule("caps", self.caps.unwrap_or_default())?;
        let labels = self.labels.unwrap_or_default();
        labels_rule("labels", &labels)?;
        Ok(Registration {
            service_name,
            instance_id,
            role,
            ttl: Duration::from_secs(ttl_s),
            descriptor: Descriptor {
                endpoint,
                health_endpoint,
                metadata,
                kind,
                caps,
                labels,
            },
        })
    }
}

impl HeartbeatBody {
    pub fn validate(self) -> Result<(Target, HeartbeatReport), FieldError> {
        let target = target(self.service_name, self.instance_id, self.service_id)?;
        let status = match self.status {
            None => None,
            Some(s) => Some(Status::parse(&s).ok_or_else(|| {
                FieldError::new(
                    "status",
                    format!("must be \"ok\" or \"degraded\", got {s:?}"),
                )
            })?),
        };
        if let Some(p) = self.p95_ms {
            non_negative("p95_ms", p)?;
        }
        if let Some(l) = self.load {
            non_negative("load", l)?;
        }
        Ok((
            target,
            HeartbeatReport {
                status,
                p95_ms: self.p95_ms,
                queue_depth: self.queue_depth,
                load: self.load,
            },
        ))
    }
}

impl PromoteBody {
    pub fn validate(self) -> Result<(Target, String), FieldError> {
        let target = target(self.service_name, self.instance_id, self.service_id)?;
        let role = required("role", self.role)?;
        token_rule("role", &role, MAX_TOKEN_LEN)?;
        Ok((target, role))
    }
}

impl DeregisterBody {
    pub fn validate(self) -> Result<Target, FieldError> {
        target(self.service_name, self.instance_id, self.service_id)
    }
}

/// Resolves the two ways of naming instances: `service_id` ("name/instance") or
/// `service_name` with an optional `instance_id`. Both may be given only if they agree.
pub fn target(
    service_name: Option<String>,
    instance_id: Option<String>,
    service_id: Option<String>,
) -> Result<Target, FieldError> {
    if let Some(id) = service_id {
        let (name, iid) = id.split_once('/').ok_or_else(|| {
            FieldError::new(
                "service_id",
                format!("must look like \"<service_name>/<instance_id>\", got {id:?}"),
            )
        })?;
        service_name_rule("service_id", name)?;
        instance_id_rule("service_id", iid)?;
        if service_name.as_deref().is_some_and(|n| n != name) {
            return Err(FieldError::new(
                "service_name",
                "does not match the name inside `service_id`",
            ));
        }
        if instance_id.as_deref().is_some_and(|i| i != iid) {
            return Err(FieldError::new(
                "instance_id",
                "does not match the instance inside `service_id`",
            ));
        }
        return Ok(Target {
            service_name: name.to_string(),
            instance_id: Some(iid.to_string()),
        });
    }
    let service_name = service_name
        .ok_or_else(|| FieldError::new("service_name", "is required (or give `service_id`)"))?;
    service_name_rule("service_name", &service_name)?;
    if let Some(iid) = &instance_id {
        instance_id_rule("instance_id", iid)?;
    }
    Ok(Target {
        service_name,
        instance_id,
    })
}

fn required(field: &str, value: Option<String>) -> Result<String, FieldError> {
    value.ok_or_else(|| FieldError::new(field, "is required"))
}

/// Service names appear in URLs, Redis keys, env var names and metric-free logs; keeping them to
/// a conservative charset (`[A-Za-z0-9_.-]`, starting alphanumeric) keeps all four safe.
pub fn service_name_rule(field: &str, name: &str) -> Result<(), FieldError> {
    token_rule(field, name, MAX_NAME_LEN)
}

fn token_rule(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters, got {}", value.len()),
        ));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(FieldError::new(
            field,
            format!("must start with a letter or digit, got {value:?}"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(FieldError::new(
            field,
            format!("may contain only letters, digits, '_', '-' and '.', found {bad:?}"),
        ));
    }
    Ok(())
}

/// Instance ids also allow `:` and brackets so that the default (`host:port`, `[::1]:8080`)
/// is readable in listings.
pub fn instance_id_rule(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return Err(FieldError::new(field, "instance id must not be empty"));
    }
    if id.len() > MAX_INSTANCE_ID_LEN {
        return Err(FieldError::new(
            field,
            format!(
                "instance id must be at most {MAX_INSTANCE_ID_LEN} characters, got {}",
                id.len()
            ),
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '[' | ']')))
    {
        return Err(FieldError::new(
            field,
            format!(
                "instance id may contain only letters, digits and '_', '-', '.', ':', '[', ']', found {bad:?}"
            ),
        ));
    }
    Ok(())
}

fn endpoint_rule(field: &str, endpoint: &str) -> Result<Url, FieldError> {
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_ENDPOINT_LEN} characters"),
        ));
    }
    let url = Url::parse(endpoint)
        .map_err(|e| FieldError::new(field, format!("is not a valid URL ({e}): {endpoint:?}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FieldError::new(
            field,
            format!(
                "must be an http:// or https:// URL, got scheme {:?}",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new(
            field,
            "must not carry credentials: every caller can read registered endpoints",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(FieldError::new(
            field,
            "must not have a query or fragment: callers append their own path and query",
        ));
    }
    Ok(url)
}

/// The default instance id is `host:port` of the endpoint, so a service that restarts on the
/// same address re-registers as the same instance instead of leaving a ghost behind.
fn default_instance_id(url: &Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

fn health_endpoint_rule(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_HEALTH_ENDPOINT_LEN {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_HEALTH_ENDPOINT_LEN} characters"),
        ));
    }
    if value.starts_with('/') {
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FieldError::new(
                field,
                "must not contain whitespace or control characters",
            ));
        }
        return Ok(());
    }
    if value.starts_with("http://") || value.starts_with("https://") {
        return endpoint_rule(field, value).map(|_| ());
    }
    Err(FieldError::new(
        field,
        format!("must be a path starting with '/' or an http(s) URL, got {value:?}"),
    ))
}

fn metadata_rule(field: &str, metadata: &Map<String, Value>) -> Result<(), FieldError> {
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(FieldError::new(
            field,
            format!(
                "must have at most {MAX_METADATA_KEYS} keys, got {}",
                metadata.len()
            ),
        ));
    }
    let size = serde_json::to_vec(metadata).map(|v| v.len()).unwrap_or(0);
    if size > MAX_METADATA_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_METADATA_BYTES} bytes as JSON, got {size}"),
        ));
    }
    Ok(())
}

fn caps_rule(field: &str, caps: Vec<String>) -> Result<Vec<String>, FieldError> {
    if caps.len() > MAX_CAPS {
        return Err(FieldError::new(
            field,
            format!("must have at most {MAX_CAPS} entries, got {}", caps.len()),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(caps.len());
    for (i, cap) in caps.into_iter().enumerate() {
        token_rule(&format!("{field}[{i}]"), &cap, MAX_NAME_LEN)?;
        if !out.contains(&cap) {
            out.push(cap);
        }
    }
    Ok(out)
}

fn labels_rule(field: &str, labels: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if labels.len() > MAX_LABELS {
        return Err(FieldError::new(
            field,
            format!(
                "must have at most {MAX_LABELS} entries, got {}",
                labels.len()
            ),
        ));
    }
    for (k, v) in labels {
        token_rule(&format!("{field}.{k}"), k, MAX_NAME_LEN)?;
        if v.len() > MAX_LABEL_VALUE_LEN {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                format!("value must be at most {MAX_LABEL_VALUE_LEN} characters"),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "value must not contain control characters",
            ));
        }
    }
    Ok(())
}

fn non_negative(field: &str, value: f64) -> Result<(), FieldError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be a finite number >= 0, got {value}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(json: Value) -> Result<Registration, FieldError> {
        serde_json::from_value::<RegisterBody>(json)
            .expect("test body deserializes")
            .validate()
    }

    #[test]
    fn legacy_spelling_gets_defaults() {
        let r = reg(
            serde_json::json!({"service_name": "osint_service", "endpoint": "http://osint:8049"}),
        )
        .expect("valid");
        assert_eq!(r.service_name, "osint_service");
        assert_eq!(r.instance_id, "osint:8049");
        assert_eq!(r.ttl, Duration::from_secs(60));
        assert_eq!(r.descriptor.health_endpoint, "/health");
        assert_eq!(r.descriptor.kind, "service");
        assert_eq!(r.role, "production");
    }

    #[test]
    fn pas_spelling_is_accepted() {
        let r = reg(serde_json::json!({
            "name": "test-service", "type": "model", "role": "experimental",
            "url": "http://127.0.0.1:8888", "caps": ["infer", "infer"], "ttl_s": 90,
            "ctx_limit": 32768, "labels": {"zone": "a"}
        }))
        .expect("valid");
        assert_eq!(r.service_name, "test-service");
        assert_eq!(r.descriptor.kind, "model");
        assert_eq!(r.descriptor.caps, vec!["infer".to_string()]);
        assert_eq!(r.ttl, Duration::from_secs(90));
    }

    #[test]
    fn default_instance_id_uses_known_ports_and_brackets_ipv6() {
        let https = reg(serde_json::json!({"name": "a", "url": "https://a.example"})).expect("ok");
        assert_eq!(https.instance_id, "a.example:443");
        let v6 = reg(serde_json::json!({"name": "a", "url": "http://[::1]:9000/api"})).expect("ok");
        assert_eq!(v6.instance_id, "[::1]:9000");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                serde_json::json!({"endpoint": "http://a:1"}),
                "service_name",
            ),
            (
                serde_json::json!({"service_name": "a b", "endpoint": "http://a:1"}),
                "service_name",
            ),
            (
                serde_json::json!({"service_name": "-a", "endpoint": "http://a:1"}),
                "service_name",
            ),
            (
                serde_json::json!({"service_name": "a/b", "endpoint": "http://a:1"}),
                "service_name",
            ),
            (serde_json::json!({"service_name": "a"}), "endpoint"),
            (
                serde_json::json!({"service_name": "a", "endpoint": "ftp://a"}),
                "endpoint",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://u:p@a:1"}),
                "endpoint",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1/?q=1"}),
                "endpoint",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "ttl_s": 0}),
                "ttl_s",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "ttl_s": 86401}),
                "ttl_s",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "instance_id": "x y"}),
                "instance_id",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "health_endpoint": "health"}),
                "health_endpoint",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "caps": ["ok", "no way"]}),
                "caps[1]",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "labels": {"k": "a\nb"}}),
                "labels.k",
            ),
            (
                serde_json::json!({"service_name": "a", "endpoint": "http://a:1", "role": ""}),
                "role",
            ),
        ];
        for (body, field) in cases {
            let err = reg(body.clone()).expect_err(&format!("{body} must be rejected"));
            assert_eq!(err.field, field, "{body}: {err}");
        }
    }

    #[test]
    fn oversized_metadata_is_rejected() {
        let big: Map<String, Value> = (0..65).map(|i| (format!("k{i}"), Value::from(i))).collect();
        let err = reg(serde_json::json!({"name": "a", "url": "http://a:1", "metadata": big}))
            .expect_err("too many keys");
        assert_eq!(err.field, "metadata");
        let huge = "x".repeat(MAX_METADATA_BYTES);
        let err =
            reg(serde_json::json!({"name": "a", "url": "http://a:1", "metadata": {"k": huge}}))
                .expect_err("too large");
        assert_eq!(err.field, "metadata");
    }

    #[test]
    fn service_id_targets_one_instance_and_must_agree() {
        let t = target(None, None, Some("svc/h:80".into())).expect("ok");
        assert_eq!(t.service_name, "svc");
        assert_eq!(t.instance_id.as_deref(), Some("h:80"));
        assert_eq!(
            target(Some("other".into()), None, Some("svc/h:80".into()))
                .expect_err("conflict")
                .field,
            "service_name"
        );
        assert_eq!(
            target(None, None, Some("nosep".into()))
                .expect_err("bad")
                .field,
            "service_id"
        );
        assert_eq!(
            target(None, None, None).expect_err("missing").field,
            "service_name"
        );
    }

    #[test]
    fn heartbeat_figures_are_checked() {
        let hb = |v: Value| {
            serde_json::from_value::<HeartbeatBody>(v)
                .expect("deserializes")
                .validate()
        };
        assert_eq!(
            hb(serde_json::json!({"service_name": "a", "status": "sick"}))
                .expect_err("bad")
                .field,
            "status"
        );
        assert_eq!(
            hb(serde_json::json!({"service_name": "a", "load": -1.0}))
                .expect_err("bad")
                .field,
            "load"
        );
        let (t, r) =
            hb(serde_json::json!({"service_name": "a", "status": "degraded", "p95_ms": 12.5}))
                .expect("ok");
        assert_eq!(t.instance_id, None);
        assert_eq!(r.status, Some(Status::Degraded));
        assert_eq!(r.p95_ms, Some(12.5));
    }
}
