//! The bodies the gateway passes through: the caller's request body, held so that a failed
//! connect can hand it to another instance, and the response body, with an idle limit.
//!
//! The request body sits in a `BodySlot` that the outgoing request borrows lazily: hyper
//! polls a body only once a connection exists, so when the connect fails the body is still in
//! the slot, untouched, and the request can go to another instance. (hyper's client consumes
//! its request; nothing in the ecosystem hands the body back, hence this small wrapper.) A
//! request without a body (most GETs) needs no slot at all.
//!
//! `IdleTimeout` is written here rather than taken from tower-http: its `TimeoutBody` arms a
//! timer before looking at the body, on every body. Most proxied bodies are complete when
//! first polled, so that timer is pure cost on every request (measured: about 4 % of the
//! gateway's CPU per request); this one is armed only when the body makes the caller wait.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::pool::PooledBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of a body that stayed silent for longer than its idle limit.
#[derive(Debug, thiserror::Error)]
#[error("body idle for more than {0:?}")]
pub struct IdleTimeoutError(Duration);

/// A body that fails once it has made its reader wait `idle` without a frame.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` measures the current wait (else it is left over from an earlier one).
    armed: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: None,
            armed: false,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let sleep = match &mut this.sleep {
            Some(sleep) => {
                if !this.armed {
                    sleep.as_mut().reset(Instant::now() + this.idle);
                }
                sleep
            }
            None => this.sleep.insert(Box::pin(tokio::time::sleep(this.idle))),
        };
        this.armed = true;
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeoutError(this.idle))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Inner = IdleTimeout<Limited<Incoming>>;

/// Holds the caller's request body until an attempt starts reading it.
#[derive(Clone)]
pub struct BodySlot(Option<Arc<Mutex<Option<Inner>>>>);

fn lock(slot: &Mutex<Option<Inner>>) -> MutexGuard<'_, Option<Inner>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BodySlot {
    pub fn new(body: Incoming, limit: usize, idle: Duration) -> Self {
        if body.is_end_stream() {
            return BodySlot(None);
        }
        BodySlot(Some(Arc::new(Mutex::new(Some(IdleTimeout::new(
            Limited::new(body, limit),
            idle,
        ))))))
    }

    /// True while no attempt has read any of the body.
    pub fn untouched(&self) -> bool {
        self.0.as_deref().is_none_or(|slot| lock(slot).is_some())
    }

    pub fn body(&self) -> SlotBody {
        SlotBody {
            slot: self.0.clone(),
            taken: None,
        }
    }
}

pub struct SlotBody {
    /// `None` for a request without a body.
    slot: Option<Arc<Mutex<Option<Inner>>>>,
    taken: Option<Inner>,
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.taken.is_none() {
            let Some(slot) = &this.slot else {
                return Poll::Ready(None);
            };
            match lock(slot).take() {
                Some(b) => this.taken = Some(b),
                None => return Poll::Ready(Some(Err("request body already sent".into()))),
            }
        }
        match this.taken.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match (&self.taken, &self.slot) {
            (Some(b), _) => b.is_end_stream(),
            (None, None) => true,
            (None, Some(slot)) => lock(slot).as_ref().is_some_and(HttpBody::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.taken, &self.slot) {
            (Some(b), _) => b.size_hint(),
            (None, None) => SizeHint::with_exact(0),
            (None, Some(slot)) => lock(slot)
                .as_ref()
                .map(HttpBody::size_hint)
                .unwrap_or_default(),
        }
    }
}

/// What the gateway answers with: a relayed upstream body, or one of its own.
pub enum ResponseBody {
    Proxied(IdleTimeout<PooledBody>),
    Local(Body),
}

impl From<Body> for ResponseBody {
    fn from(body: Body) -> Self {
        ResponseBody::Local(body)
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Proxied(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Proxied(b) => b.is_end_stream(),
            ResponseBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Proxied(b) => b.size_hint(),
            ResponseBody::Local(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that sends one frame, then waits forever.
    struct Stalls(bool);

    impl HttpBody for Stalls {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_after_its_idle_limit_and_not_before() {
        let mut body = IdleTimeout::new(Stalls(false), Duration::from_secs(5));
        let first = body.frame().await.expect("a frame").expect("ok");
        assert_eq!(first.into_data().expect("data"), "first");
        let started = Instant::now();
        let err = body.frame().await.expect("a frame").expect_err("idle");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(err.to_string().contains("idle"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_body_never_arms_the_timer() {
        let mut body = IdleTimeout::new(
            http_body_util::Full::new(Bytes::from_static(b"ok")),
            Duration::from_secs(5),
        );
        assert_eq!(
            body.frame()
                .await
                .expect("frame")
                .expect("ok")
                .into_data()
                .expect("data"),
            "ok"
        );
        assert!(body.sleep.is_none());
    }
}
