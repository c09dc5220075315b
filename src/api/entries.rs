//! Handlers for the entries themselves: register, heartbeat, deregister, list, get, discover,
//! promote. Each validates its whole input first, then makes exactly one store call.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::body::JsonBody;
use super::error::ApiError;
use crate::model::{Instance, Status, Target, rfc3339, service_id};
use crate::validate::{
    DeregisterBody, FieldError, HeartbeatBody, PromoteBody, RegisterBody, instance_id_rule,
    service_name_rule,
};

type ApiResult<T> = Result<T, ApiError>;

pub const STALE_HEADER: &str = "x-rollcall-stale";
pub const STALE_AGE_HEADER: &str = "x-rollcall-stale-age";

pub async fn register(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let reg = body.validate()?;
    let done = state.registry.register(&reg).await?;
    tracing::info!(
        service = %reg.service_name,
        instance = %reg.instance_id,
        endpoint = %reg.descriptor.endpoint,
        ttl_s = reg.ttl.as_secs(),
        created = done.created,
        "registered"
    );
    let verb = if done.created {
        "registered"
    } else {
        "re-registered"
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "message": format!("Service {} {verb}", reg.service_name),
            "service_name": reg.service_name,
            "instance_id": reg.instance_id,
            "service_id": service_id(&reg.service_name, &reg.instance_id),
            "endpoint": reg.descriptor.endpoint,
            "ttl_s": reg.ttl.as_secs(),
            "created": done.created,
            "registered_at": rfc3339(done.registered_at),
        })),
    ))
}

pub async fn heartbeat(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<HeartbeatBody>,
) -> ApiResult<Json<Value>> {
    let (target, report) = body.validate()?;
    let refreshed = state.registry.heartbeat(&target, &report).await?;
    if refreshed.count == 0 {
        return Err(ApiError::NotFound(format!(
            "{} is not registered or has expired; register again",
            describe(&target)
        )));
    }
    tracing::debug!(target_desc = %describe(&target), count = refreshed.count, "heartbeat");
    Ok(Json(json!({
        "message": "Heartbeat received",
        "service_name": target.service_name,
        "instance_id": target.instance_id,
        "instances_refreshed": refreshed.count,
    })))
}

pub async fn deregister_path(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    service_name_rule("service_name", &name)?;
    let mut instance_id = None;
    for (key, value) in query_pairs(query.as_deref(), &["instance_id"])? {
        if key == "instance_id" {
            instance_id_rule("instance_id", &value)?;
            instance_id = Some(value);
        }
    }
    deregister(
        &state,
        Target {
            service_name: name,
            instance_id,
        },
    )
    .await
}

pub async fn deregister_body(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<DeregisterBody>,
) -> ApiResult<Json<Value>> {
    deregister(&state, body.validate()?).await
}

async fn deregister(state: &AppState, target: Target) -> ApiResult<Json<Value>> {
    let removed = state.registry.deregister(&target).await?;
    if removed == 0 {
        return Err(ApiError::NotFound(format!(
            "{} is not registered",
            describe(&target)
        )));
    }
    tracing::info!(target_desc = %describe(&target), removed, "deregistered");
    Ok(Json(json!({
        "message": format!("Service {} deregistered", target.service_name),
        "service_name": target.service_name,
        "instance_id": target.instance_id,
        "instances_removed": removed,
    })))
}

pub async fn list(State(state): State<AppState>) -> ApiResult<Response> {
    let names = state.registry.service_names().await?;
    if names.stale_age.is_none() {
        state
            .metrics
            .active_services
            .set(i64::try_from(names.value.len()).unwrap_or(i64::MAX));
    }
    Ok(with_staleness(names.stale_age, Json(names.value)))
}

pub async fn get_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    service_name_rule("service_name", &name)?;
    let read = state.registry.instances(&name).await?;
    let instances = &read.value;
    let Some(chosen) = Instance::pick_representative(instances) else {
        return Err(ApiError::NotFound(format!(
            "service {name} has no live instance"
        )));
    };
    // The top level describes one instance, in the shape old clients read.
    let mut body = instance_json(chosen);
    body["instances"] = instances.iter().map(instance_json).collect();
    body["stale"] = Value::Bool(read.stale_age.is_some());
    if let Some(age) = read.stale_age {
        body["stale_age_s"] = json!(age.as_secs_f64());
    }
    Ok(with_staleness(read.stale_age, Json(body)))
}

pub async fn discover(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let filter = DiscoverFilter::parse(query.as_deref())?;
    let read = match &filter.name {
        Some(name) => state.registry.instances(name).await?,
        None => state.registry.all_instances().await?,
    };
    let found: Vec<Value> = read
        .value
        .iter()
        .filter(|i| filter.matches(i))
        .map(instance_json)
        .collect();
    Ok(with_staleness(read.stale_age, Json(found)))
}

pub async fn promote(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<PromoteBody>,
) -> ApiResult<Json<Value>> {
    let (target, role) = body.validate()?;
    let promoted = state.registry.promote(&target, &role).await?;
    if promoted == 0 {
        return Err(ApiError::NotFound(format!(
            "{} is not registered or has expired",
            describe(&target)
        )));
    }
    tracing::info!(target_desc = %describe(&target), %role, promoted, "promoted");
    Ok(Json(json!({
        "message": format!("Service {} promoted to {role}", target.service_name),
        "service_name": target.service_name,
        "instance_id": target.instance_id,
        "role": role,
        "instances_promoted": promoted,
    })))
}

/// Marks answers served from the fallback cache; JSON arrays cannot carry a `stale` field,
/// so the header is the one signal every read has.
fn with_staleness(stale_age: Option<Duration>, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    if let Some(age) = stale_age {
        let headers = response.headers_mut();
        headers.insert(STALE_HEADER, HeaderValue::from_static("true"));
        headers.insert(STALE_AGE_HEADER, HeaderValue::from(age.as_secs()));
    }
    response
}

fn describe(target: &Target) -> String {
    match &target.instance_id {
        Some(id) => format!("instance {id} of service {}", target.service_name),
        None => format!("service {}", target.service_name),
    }
}

/// One instance on the wire. Both spellings of name and address are given (`service_name` /
/// `name`, `endpoint` / `url`) so that clients of either replaced registry read it unchanged.
pub fn instance_json(i: &Instance) -> Value {
    let d = &i.descriptor;
    json!({
        "service_id": i.service_id(),
        "service_name": i.service_name,
        "name": i.service_name,
        "instance_id": i.instance_id,
        "endpoint": d.endpoint,
        "url": d.endpoint,
        "health_endpoint": d.health_endpoint,
        "metadata": d.metadata,
        "type": d.kind,
        "role": i.role,
        "caps": d.caps,
        "labels": d.labels,
        "status": i.status,
        "p95_ms": i.p95_ms,
        "queue_depth": i.queue_depth,
        "load": i.load,
        "ttl_s": i.ttl.as_secs(),
        "registered_at": rfc3339(i.registered_at),
        "last_heartbeat": rfc3339(i.last_heartbeat),
        "ttl_remaining": i.ttl_remaining.as_millis().div_ceil(1000),
    })
}

/// Splits a query string, rejecting parameters the route does not know: a typo such as
/// `?rol=canary` must not silently widen a discovery.
fn query_pairs(raw: Option<&str>, allowed: &[&str]) -> ApiResult<Vec<(String, String)>> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some((key, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(FieldError::new(
            key.clone(),
            format!(
                "is not a known query parameter (known: {})",
                allowed.join(", ")
            ),
        )
        .into());
    }
    Ok(pairs)
}

#[derive(Debug, Default)]
struct DiscoverFilter {
    name: Option<String>,
    kind: Option<String>,
    role: Option<String>,
    caps: Vec<String>,
    labels: Vec<(String, String)>,
    status: Option<Status>,
}

impl DiscoverFilter {
    fn parse(raw: Option<&str>) -> ApiResult<Self> {
        let mut f = DiscoverFilter::default();
        let known = ["name", "type", "role", "cap", "label", "status"];
        for (key, value) in query_pairs(raw, &known)? {
            match key.as_str() {
                "name" => {
                    service_name_rule("name", &value)?;
                    f.name = Some(value);
                }
                "type" => f.kind = Some(value),
                "role" => f.role = Some(value),
                "cap" => f.caps.push(value),
                "label" => {
                    let (k, v) = value.split_once(':').ok_or_else(|| {
                        FieldError::new("label", format!("must look like key:value, got {value:?}"))
                    })?;
                    f.labels.push((k.to_string(), v.to_string()));
                }
                "status" => {
                    f.status = Some(Status::parse(&value).ok_or_else(|| {
                        FieldError::new(
                            "status",
                            format!("must be \"ok\" or \"degraded\", got {value:?}"),
                        )
                    })?);
                }
                _ => {}
            }
        }
        Ok(f)
    }

    fn matches(&self, i: &Instance) -> bool {
        let d = &i.descriptor;
        self.kind.as_ref().is_none_or(|k| *k == d.kind)
            && self.role.as_ref().is_none_or(|r| *r == i.role)
            && self.status.is_none_or(|s| s == i.status)
            && self.caps.iter().all(|c| d.caps.contains(c))
            && self
                .labels
                .iter()
                .all(|(k, v)| d.labels.get(k).is_some_and(|have| have == v))
    }
}
