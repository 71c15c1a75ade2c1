//! The frames a session has for its client, on their way out, and how the
//! socket is to close: a bounded queue the session pushes to and the
//! connection's task takes from ([`super::connection`]). It decides
//! nothing about documents.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytestring::ByteString;
use tokio::sync::Notify;

use super::socket::Closing;

/// Frames kept in a queue's buffer when it runs empty; past that its
/// memory goes back (a queue that once held many keeps none idle).
const KEPT_EMPTY: usize = 16;

/// The frames a session has for its client, in order: the session pushes,
/// the connection takes. Bounded; emptied at once when the session lets go, so a
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
    /// The session let go, or the connection is gone.
    closed: bool,
    /// How the session let go, for the connection to close with.
    closing: Option<Closing>,
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

    /// The session lets go: the socket closes with `closing`, every frame
    /// waiting is dropped and those to come are refused. Only the first
    /// word counts.
    pub(crate) fn close(&self, closing: Closing) {
        let mut waiting = self.lock();
        if !waiting.closed {
            waiting.closing = Some(closing);
        }
        waiting.closed = true;
        waiting.frames = VecDeque::new();
        drop(waiting);
        self.0.ready.notify_one();
    }

    /// The connection is gone: frames are refused from now on.
    pub(super) fn disconnect(&self) {
        let mut waiting = self.lock();
        waiting.closed = true;
        waiting.frames = VecDeque::new();
    }

    /// Whether the session let go or the connection is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// How the session let go, once it has.
    pub(super) fn closing(&self) -> Option<Closing> {
        self.lock().closing
    }

    /// Resolves once a frame is pushed (perhaps one already taken) or the
    /// session lets go.
    pub(super) fn ready(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.0.ready.notified()
    }

    /// The first frame waiting, if any.
    pub(super) fn pop(&self) -> Option<ByteString> {
        let mut waiting = self.lock();
        let frame = waiting.frames.pop_front();
        if waiting.frames.is_empty() && waiting.frames.capacity() > KEPT_EMPTY {
            waiting.frames = VecDeque::new();
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::{Closing, FrameQueue, Refused};

    #[test]
    fn a_queue_is_bounded_and_emptied_and_closed_when_the_session_lets_go() {
        let queue = FrameQueue::new(3);
        for i in 0..3 {
            queue.push(format!("{i}").into()).unwrap();
        }
        assert_eq!(queue.push("3".into()), Err(Refused::Full));
        assert_eq!(queue.pop().as_deref(), Some("0"), "in order");
        queue.close(Closing::TOO_SLOW);
        assert_eq!(queue.pop(), None, "nothing is kept for a client that does not read");
        assert_eq!(queue.push("after".into()), Err(Refused::Closed), "nor queued after it let go");
        queue.close(Closing::NORMAL);
        assert_eq!(queue.closing(), Some(Closing::TOO_SLOW), "the first word counts");
        let gone = FrameQueue::new(1);
        gone.disconnect();
        assert_eq!((gone.push("x".into()), gone.closing()), (Err(Refused::Closed), None));
        let big = FrameQueue::new(1024);
        for i in 0..1024 {
            big.push(format!("{i}").into()).unwrap();
        }
        while big.pop().is_some() {}
        assert!(big.lock().frames.capacity() <= super::KEPT_EMPTY, "an emptied queue gives its memory back");
    }
}
