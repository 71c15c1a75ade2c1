//! The socket's write side: the body of the upgrade's response, polled by
//! the connection's own HTTP/1 task. It takes the session's queued frames
//! ([`FrameQueue`]) and the reader's control frames straight from their
//! queues and encodes them, those waiting together into one chunk, so a
//! frame costs no task of its own between the session and the socket. It
//! ends with a close frame: the session's code when the session lets go,
//! 1012 when the node drains, the reader's when the client broke the
//! protocol. It decides nothing about documents.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use actix_codec::Encoder;
use actix_http::ws::{CloseCode, CloseReason, Codec, Message};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::socket::Closing;

/// Bytes of waiting frames encoded into one chunk of the body, at most
/// about: a long queue goes out in writes of a useful size, never in one
/// buffer as large as the queue.
const CHUNK: usize = 16 * 1024;

/// Frames kept in a queue's buffer when it runs empty; past that its
/// memory goes back (a queue that once held many keeps none idle).
const KEPT_EMPTY: usize = 16;

/// The frames a session has for its client, in order: the session pushes,
/// the body takes. Bounded; emptied at once when the session lets go, so a
/// client that never reads pins no frames, whether or not its connection is
/// still polled.
#[derive(Clone)]
pub(crate) struct FrameQueue(Arc<Queue>);

struct Queue {
    frames: Mutex<Waiting>,
    ready: Notify,
    capacity: usize,
}

#[derive(Default)]
struct Waiting {
    frames: VecDeque<ByteString>,
    /// The session let go, or the body is gone (the connection closed).
    closed: bool,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The client is too slow: `capacity` frames wait already.
    Full,
    /// The connection is gone.
    Closed,
}

impl FrameQueue {
    /// A queue of at most `capacity` frames.
    pub(crate) fn new(capacity: usize) -> Self {
        FrameQueue(Arc::new(Queue { frames: Mutex::default(), ready: Notify::new(), capacity }))
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.0.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame` behind the others.
    pub(crate) fn push(&self, frame: ByteString) -> Result<(), Refused> {
        let mut waiting = self.lock();
        if waiting.closed {
            return Err(Refused::Closed);
        }
        if waiting.frames.len() >= self.0.capacity {
            return Err(Refused::Full);
        }
        waiting.frames.push_back(frame);
        drop(waiting);
        self.0.ready.notify_one();
        Ok(())
    }

    /// Drops every frame waiting and refuses those to come: the session
    /// let go, or the connection is gone.
    pub(crate) fn close(&self) {
        let mut waiting = self.lock();
        waiting.closed = true;
        waiting.frames = VecDeque::new();
    }

    /// The first frame waiting, if any.
    fn pop(&self) -> Option<ByteString> {
        let mut waiting = self.lock();
        let frame = waiting.frames.pop_front();
        if waiting.frames.is_empty() && waiting.frames.capacity() > KEPT_EMPTY {
            waiting.frames = VecDeque::new();
        }
        frame
    }
}

/// What the reader has the writer send.
pub(super) enum Control {
    /// The answer to a client's ping.
    Pong(Bytes),
    /// The client broke the protocol: close with this, and write no more.
    Close(CloseReason),
}

/// The write side of one session's socket, until it becomes a body.
pub(super) struct Outbound {
    /// The session's frames (a full queue is a client too slow, which the
    /// session handles).
    pub(super) frames: FrameQueue,
    /// The reader's frames.
    pub(super) control: mpsc::Receiver<Control>,
    /// Set by the session when it lets go, with how to close.
    pub(super) stop: watch::Receiver<Option<Closing>>,
    /// Resolves when the node starts draining.
    pub(super) drain: Pin<Box<dyn Future<Output = ()>>>,
    /// Dropped with the body, which is when the connection is gone: the
    /// reader then stops.
    pub(super) _gone: oneshot::Sender<()>,
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.frames.close();
    }
}

/// The next chunk of the body.
enum Next {
    More(Bytes),
    /// The close frame: the body ends after it.
    Last(Bytes),
}

impl Outbound {
    /// The response body: the chunks of frames, until the close frame.
    pub(super) fn into_body(self) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static {
        let state = Writer { out: self, codec: Codec::new(), control_open: true };
        futures::stream::unfold(Some(state), |state| async move {
            let mut writer = state?;
            match writer.next().await {
                Next::More(chunk) => Some((Ok(chunk), Some(writer))),
                // Dropping the writer drops `_gone`, telling the reader.
                Next::Last(chunk) => Some((Ok(chunk), None)),
            }
        })
    }
}

struct Writer {
    out: Outbound,
    codec: Codec,
    /// Whether the reader may still send control frames.
    control_open: bool,
}

impl Writer {
    async fn next(&mut self) -> Next {
        let closing = loop {
            tokio::select! {
                biased;
                // First: a reader's close is queued before it tells the
                // session, which then lets go, and must win over that.
                control = self.out.control.recv(), if self.control_open => match control {
                    Some(Control::Pong(bytes)) => return Next::More(self.encode(Message::Pong(bytes))),
                    Some(Control::Close(reason)) => return Next::Last(self.encode(Message::Close(Some(reason)))),
                    // The reader stopped; the session says when to close.
                    None => self.control_open = false,
                },
                // A sender dropped without a word is a session that stopped.
                _ = self.out.stop.changed() => break self.out.stop.borrow().unwrap_or(Closing::NORMAL),
                () = &mut self.out.drain => break Closing::RESTART,
                () = self.out.frames.0.ready.notified() => {
                    if let Some(text) = self.out.frames.pop() {
                        return Next::More(self.chunk(text));
                    }
                }
            }
        };
        let description = (!closing.reason.is_empty()).then(|| closing.reason.to_owned());
        let reason = CloseReason { code: CloseCode::from(closing.code), description };
        Next::Last(self.encode(Message::Close(Some(reason))))
    }

    /// `first` and the frames queued behind it, up to about [`CHUNK`] bytes.
    fn chunk(&mut self, first: ByteString) -> Bytes {
        let mut buf = BytesMut::new();
        let mut text = Some(first);
        while let Some(frame) = text.take() {
            self.encode_into(Message::Text(frame), &mut buf);
            if buf.len() < CHUNK {
                text = self.out.frames.pop();
            } else {
                // Frames may be left: the next round must not wait for a push.
                self.out.frames.0.ready.notify_one();
            }
        }
        buf.freeze()
    }

    fn encode(&mut self, message: Message) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode_into(message, &mut buf);
        buf.freeze()
    }

    fn encode_into(&mut self, message: Message, buf: &mut BytesMut) {
        // Only a continuation out of order fails to encode; none is sent.
        if let Err(error) = self.codec.encode(message, buf) {
            tracing::warn!(%error, "a websocket frame could not be encoded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FrameQueue, Refused};

    #[test]
    fn a_queue_is_bounded_and_emptied_and_closed_when_the_session_lets_go() {
        let queue = FrameQueue::new(3);
        for i in 0..3 {
            queue.push(format!("{i}").into()).unwrap();
        }
        assert_eq!(queue.push("3".into()), Err(Refused::Full));
        assert_eq!(queue.pop().as_deref(), Some("0"), "in order");
        queue.close();
        assert_eq!(queue.pop(), None, "nothing is kept for a client that does not read");
        assert_eq!(queue.push("after".into()), Err(Refused::Closed), "nor queued after it let go");
        let big = FrameQueue::new(1024);
        for i in 0..1024 {
            big.push(format!("{i}").into()).unwrap();
        }
        while big.pop().is_some() {}
        assert!(big.lock().frames.capacity() <= super::KEPT_EMPTY, "an emptied queue gives its memory back");
    }
}
