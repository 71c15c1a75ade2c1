//! The frames a session has for its client, on their way out: a bounded
//! queue the session pushes to and the connection's task takes from
//! ([`super::connection`]). It decides nothing about documents.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytestring::ByteString;
use tokio::sync::Notify;

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

    /// Resolves once a frame is pushed (perhaps one already taken).
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
