//! The socket's write side: the body of the upgrade's response, polled by
//! the connection's own HTTP/1 task. It takes the session's queued frames
//! and the reader's control frames straight from their queues and encodes
//! them, those waiting together into one chunk, so a frame costs no task of
//! its own between the session and the socket. It ends with a close frame:
//! the session's code when the session lets go, 1012 when the node drains,
//! the reader's when the client broke the protocol. It decides nothing
//! about documents.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use actix_codec::Encoder;
use actix_http::ws::{CloseCode, CloseReason, Codec, Message};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};

use super::socket::Closing;

/// Bytes of waiting frames encoded into one chunk of the body, at most
/// about: a long queue goes out in writes of a useful size, never in one
/// buffer as large as the queue.
const CHUNK: usize = 16 * 1024;

/// What the reader has the writer send.
pub(super) enum Control {
    /// The answer to a client's ping.
    Pong(Bytes),
    /// The client broke the protocol: close with this, and write no more.
    Close(CloseReason),
}

/// The write side of one session's socket, until it becomes a body.
pub(super) struct Outbound {
    /// The session's frames, in order (bounded: a full queue is a client
    /// too slow, which the session handles).
    pub(super) frames: mpsc::Receiver<ByteString>,
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
                frame = self.out.frames.recv() => match frame {
                    Some(text) => return Next::More(self.chunk(text)),
                    None => break Closing::NORMAL,
                },
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
                text = self.out.frames.try_recv().ok();
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
