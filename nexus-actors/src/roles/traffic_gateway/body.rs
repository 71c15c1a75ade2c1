//! Bodies as the gateway moves them: what it answers with ([`Body`]), a
//! request body on its way to an instance ([`Outgoing`], sent as
//! [`OutBody`]; it can be held and offered to a second instance as long as
//! the first never read it) and an instance's answer that counts as
//! traffic while it streams ([`Tracked`]). Limits are enforced here;
//! where a body goes is the proxy's business.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};

use super::traffic::{Traffic, TOUCH_EVERY};
use crate::kernel::lock;

/// What the gateway answers with.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps bytes into the gateway's response body type.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// The body of an instance's answer; its frames and its end count as
/// traffic, so a long download keeps the panel awake.
pub(crate) struct Tracked {
    inner: Incoming,
    traffic: Arc<Traffic>,
    panel: String,
    /// When the panel's traffic was last recorded, as this body knows it.
    /// [`Traffic::touch`] skips any call within [`TOUCH_EVERY`] of that;
    /// checking here first keeps its shared lock off every frame.
    touched: Instant,
}

impl Tracked {
    /// `inner`, recorded as `panel`'s traffic, last recorded at `touched`.
    pub(crate) fn new(inner: Incoming, traffic: Arc<Traffic>, panel: String, touched: Instant) -> Self {
        Tracked { inner, traffic, panel, touched }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            let now = Instant::now();
            if now.duration_since(self.touched) >= TOUCH_EVERY {
                self.touched = self.traffic.touch(&self.panel);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that can be offered to a second endpoint as long as the
/// first never read it.
pub(crate) enum Outgoing {
    /// Read whole (while the request was held).
    Buffered(Bytes),
    /// Still with the client; at most `limit` bytes go through.
    Streamed {
        /// The client's body until an attempt takes it.
        slot: Arc<Mutex<Option<Incoming>>>,
        /// Its size as the client declared it.
        hint: SizeHint,
        /// Whether the client declared it empty.
        end: bool,
        /// The most bytes sent on.
        limit: usize,
        /// Set once the client sent more than `limit`.
        over: Arc<AtomicBool>,
    },
}

impl Outgoing {
    /// The client's `body`, sent on with at most `limit` bytes.
    pub(crate) fn streamed(body: Incoming, limit: usize) -> Self {
        let (hint, end) = (hyper::body::Body::size_hint(&body), hyper::body::Body::is_end_stream(&body));
        Outgoing::Streamed { slot: Arc::new(Mutex::new(Some(body))), hint, end, limit, over: Arc::default() }
    }

    /// The body for one attempt to send the request.
    pub(crate) fn body(&self) -> OutBody {
        match self {
            Outgoing::Buffered(bytes) => OutBody::Bytes((!bytes.is_empty()).then(|| bytes.clone())),
            Outgoing::Streamed { slot, hint, end, limit, over } => OutBody::Stream {
                slot: slot.clone(),
                taken: None,
                hint: *hint,
                end: *end,
                seen: 0,
                limit: *limit,
                over: over.clone(),
            },
        }
    }

    /// Reads a streamed body whole, so that it can wait for an instance
    /// and be sent later. Fails when it is over the limit, when the client
    /// fails to send it, or when an attempt already read part of it.
    pub(crate) async fn buffer(&mut self) -> Result<(), Unbuffered> {
        let Outgoing::Streamed { slot, limit, .. } = self else { return Ok(()) };
        let Some(incoming) = lock(slot).take() else { return Err(Unbuffered::Consumed) };
        let bytes = match Limited::new(incoming, *limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(Unbuffered::TooLarge)
            }
            Err(error) => return Err(Unbuffered::Client(error)),
        };
        *self = Outgoing::Buffered(bytes);
        Ok(())
    }

    /// Whether the client sent more than the body limit.
    pub(crate) fn over_limit(&self) -> bool {
        matches!(self, Outgoing::Streamed { over, .. } if over.load(Ordering::Relaxed))
    }
}

/// Why a request body could not be held.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unbuffered {
    /// The client sent more than the limit.
    #[error("the request body is over the limit")]
    TooLarge,
    /// The client failed while sending it.
    #[error("reading the request body: {0}")]
    Client(BoxError),
    /// An attempt already sent part of it to an instance.
    #[error("the request body was already partly sent")]
    Consumed,
}

/// The request body as the upstream client sends it.
pub(crate) enum OutBody {
    /// A held body, or none.
    Bytes(Option<Bytes>),
    /// The client's body, streamed through with its limit counted.
    Stream {
        /// Where the client's body waits until this attempt takes it.
        slot: Arc<Mutex<Option<Incoming>>>,
        /// The body once taken.
        taken: Option<Incoming>,
        /// Its size as the client declared it.
        hint: SizeHint,
        /// Whether the client declared it empty.
        end: bool,
        /// Bytes sent on so far.
        seen: usize,
        /// The most bytes sent on.
        limit: usize,
        /// Set once the client sent more than `limit`.
        over: Arc<AtomicBool>,
    },
}

/// The error an over-long streamed body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {limit} bytes")]
pub(crate) struct BodyTooLarge {
    limit: usize,
}

impl hyper::body::Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            OutBody::Bytes(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream { slot, taken, seen, limit, over, .. } => {
                if taken.is_none() {
                    *taken = lock(slot).take();
                }
                let Some(body) = taken.as_mut() else { return Poll::Ready(None) };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        *seen += frame.data_ref().map_or(0, |d| d.len());
                        if *seen > *limit {
                            over.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: *limit }))));
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Bytes(bytes) => bytes.is_none(),
            OutBody::Stream { end, .. } => *end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Bytes(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Stream { hint, .. } => *hint,
        }
    }
}
