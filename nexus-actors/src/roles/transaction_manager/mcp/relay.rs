//! Relaying a session's SSE answers to their client through a short queue,
//! so that a client which does not read holds up nothing but its own
//! connection: rmcp's session worker writes every answer of a session on
//! one task and waits while a stream is full, which would stall the
//! session's every request and notification.
//!
//! This module owns the queue and how its end is told. It knows nothing of
//! sessions: [`super::sessions`] says what each end means.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;

/// Frames waiting for the client; when it takes none of them for the
/// relay's `within`, it does not read.
pub(super) const QUEUE: usize = 64;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The answer is whole.
    Finished,
    /// The client went away (its connection closed) before it was.
    ClientGone,
    /// The client took nothing for `within`; the answer was given up.
    Stalled,
}

/// `body`'s frames through a queue of [`QUEUE`], calling `on_frame` for
/// each one and `on_end` once, however it ends.
pub(super) fn relay<S>(
    body: S,
    within: Duration,
    on_frame: impl Fn() + Send + 'static,
    on_end: impl FnOnce(End) + Send + 'static,
) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut body = Box::pin(body);
        let end = loop {
            let Some(frame) = body.next().await else { break End::Finished };
            on_frame();
            match tokio::time::timeout(within, tx.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break End::ClientGone,
                Err(_) => break End::Stalled,
            }
        };
        // Given up before it is told: a stalled session's worker is free again.
        drop(body);
        on_end(end);
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    fn frames() -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures::stream::repeat_with(|| Ok(Bytes::from_static(b": ping\n\n")))
    }

    type Relayed =
        (Box<dyn Stream<Item = Result<Bytes, Infallible>> + Unpin>, Arc<Mutex<Option<End>>>, Arc<AtomicUsize>);

    /// A relay of `body`, how it ended once it did, and the frames it saw.
    fn watched<S>(body: S) -> Relayed
    where
        S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    {
        let (ended, seen) = (Arc::new(Mutex::new(None)), Arc::new(AtomicUsize::new(0)));
        let (end, count) = (ended.clone(), seen.clone());
        let relayed = relay(
            body,
            Duration::from_millis(200),
            move || {
                count.fetch_add(1, Ordering::Relaxed);
            },
            move |how| *end.lock().unwrap() = Some(how),
        );
        (Box::new(Box::pin(relayed)), ended, seen)
    }

    #[tokio::test]
    async fn a_relay_gives_up_a_body_its_client_does_not_read() {
        let (relayed, ended, _) = watched(frames());
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(*ended.lock().unwrap(), Some(End::Stalled), "nobody took the frames");
        // What was queued is still delivered, then the relay ends.
        assert_eq!(relayed.count().await, QUEUE);
    }

    #[tokio::test]
    async fn a_relay_passes_a_reading_clients_frames_and_ends_with_its_body() {
        let (relayed, ended, seen) = watched(frames().take(QUEUE * 4));
        let mut relayed = relayed;
        let mut taken = 0;
        while relayed.next().await.is_some() {
            taken += 1;
            if taken % QUEUE == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert_eq!(taken, QUEUE * 4);
        assert_eq!(seen.load(Ordering::Relaxed), QUEUE * 4);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(*ended.lock().unwrap(), Some(End::Finished));
    }

    #[tokio::test]
    async fn a_relay_notes_a_client_gone_away() {
        let (relayed, ended, _) = watched(frames());
        drop(relayed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*ended.lock().unwrap(), Some(End::ClientGone));
    }
}
