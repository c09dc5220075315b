//! Forwarding one request to one upstream instance: the request as the upstream sees it
//! (hop-by-hop headers out, `Host` and `X-Forwarded-*` in), one retry on a new connection when
//! a kept-alive one dies under an idempotent request, and the response relayed back.

use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, Version};
use http_body_util::LengthLimitError;

use super::body::{BodySlot, IdleTimeout, ResponseBody, SlotBody};
use super::pool::{ConnectError, ExchangeError, Pool, PooledBody, SendFailure, Target};

// Parsed once: a header name given as a string is parsed again on every use.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one connection, not the message: never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including every header that `Connection` names. One pass
/// over the names, allocating only when there is something to remove (the usual case has
/// nothing).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| HOP_BY_HOP.contains(&k.as_str()) || k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.into_iter().chain(doomed) {
        headers.remove(name);
    }
}

/// How an attempt failed.
pub enum SendError {
    /// No connection could be made, or the request was provably not sent on it.
    Connect(String),
    /// The request body broke the size limit.
    TooLarge,
    /// Connected, but no response headers in time.
    Timeout,
    /// Connected, then the exchange failed.
    Other(String),
}

/// What the caller's request looked like, for building each attempt.
pub struct Outgoing<'a> {
    pub method: &'a axum::http::Method,
    pub headers: &'a HeaderMap,
    /// Path and query after `/v2/<service>`, exactly as received: empty, `?query` or
    /// `/path…` (`Target::uri` makes it a request target).
    pub rest: &'a str,
    /// The caller's address, ready as a header value.
    pub client_ip: &'a HeaderValue,
    pub request_id: &'a HeaderValue,
}

pub async fn send(
    pool: &Arc<Pool>,
    target: &Target,
    out: &Outgoing<'_>,
    slot: &BodySlot,
    response_timeout: Duration,
) -> Result<Response<PooledBody>, SendError> {
    let uri = target.uri(out.rest).map_err(SendError::Connect)?;
    let mut fresh = false;
    loop {
        let req = upstream_request(target, out, uri.clone(), slot.body());
        let error =
            match tokio::time::timeout(response_timeout, pool.send(target, req, fresh)).await {
                Err(_) => return Err(SendError::Timeout),
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(SendFailure::Connect(ConnectError(detail)))) => {
                    return Err(SendError::Connect(detail));
                }
                Ok(Err(SendFailure::Exchange(ExchangeError::NotSent(e)))) => {
                    return Err(SendError::Connect(format!(
                        "connection closed before the request was sent: {}",
                        chain(&e)
                    )));
                }
                Ok(Err(SendFailure::Exchange(ExchangeError::Failed { error, reused }))) => {
                    // Most likely a kept-alive connection the instance closed just as the request
                    // went out (its idle timeout racing ours): one more try on a new connection,
                    // when repeating the request is harmless.
                    if reused && !fresh && out.method.is_idempotent() && slot.untouched() {
                        fresh = true;
                        continue;
                    }
                    error
                }
            };
        return Err(if caused_by_limit(&error) {
            SendError::TooLarge
        } else {
            SendError::Other(chain(&error))
        });
    }
}

/// The request as it goes to `target`: hop-by-hop headers out, `Host` and the
/// `X-Forwarded-*`/`X-Request-Id` headers in.
fn upstream_request(
    target: &Target,
    out: &Outgoing<'_>,
    uri: axum::http::Uri,
    body: SlotBody,
) -> Request<SlotBody> {
    let mut headers = out.headers.clone();
    strip_hop_by_hop(&mut headers);
    let original_host = headers.insert(header::HOST, target.host.clone());
    let forwarded = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prior) => HeaderValue::from_bytes(&[prior, b", ", out.client_ip.as_bytes()].concat())
            .unwrap_or_else(|_| out.client_ip.clone()),
        None => out.client_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, forwarded);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if let Some(host) = original_host
        && !headers.contains_key(&X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_REQUEST_ID, out.request_id.clone());
    let mut req = Request::new(body);
    *req.method_mut() = out.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

fn caused_by_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<LengthLimitError>().is_some() {
            return true;
        }
        source = err.source();
    }
    false
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(err) = source {
        parts.push(err.to_string());
        source = err.source();
    }
    parts.join(": ")
}

/// The upstream's response, hop-by-hop headers removed, body streamed with an idle limit.
pub fn relay(resp: Response<PooledBody>, idle: Duration) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ResponseBody::Proxied(IdleTimeout::new(body, idle)))
}
