//! One session's socket once upgraded: a single task owns it. It reads the
//! client's frames and hands the text ones to the session one at a time
//! (the next is decoded once the session has taken the last: backpressure),
//! answers pings, and writes what the session queued ([`FrameQueue`]),
//! the frames waiting together in one write. It ends with a close frame:
//! the session's code when the session lets go, 1012 when the node drains,
//! its own when the client broke the protocol. Its buffers are sized to
//! need: an idle session holds none. It decides nothing about documents.

use std::io::ErrorKind;
use std::pin::pin;
use std::time::Duration;

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Message, ProtocolError};
use bytes::{Buf, BytesMut};
use futures::future::{Fuse, FusedFuture, FutureExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use super::outbound::FrameQueue;
use super::socket::{Closing, OpenSession};
use super::{ClientText, Disconnected};
use crate::kernel::{AskError, Link};
use crate::platform::drain::Drain;
use crate::platform::server::linger;
use crate::roles::transaction_manager::protocol::MAX_FRAME;

/// Bytes of frames gathered for one write, at most about: a long queue goes
/// out in writes of a useful size, never in one buffer as large as itself.
/// Also the most a client that reads nothing can make its pongs pile up.
const CHUNK: usize = 16 * 1024;
/// Room made in the read buffer before a read, at least (the codec makes
/// room for a whole frame once its header is in).
const READ_SIZE: usize = 4 * 1024;
/// How long a frame may take to arrive whole once it began: a client that
/// announces a large frame and goes quiet does not hold its buffer.
const FRAME_DEADLINE: Duration = Duration::from_secs(20);
/// The longest a frame's header is: what a frame of [`MAX_FRAME`] may take
/// in the read buffer beyond its payload.
const MAX_FRAME_HEADER: usize = 14;
/// The longest close reason a close frame carries (RFC 6455: 125 bytes of
/// payload, 2 of them the code).
const MAX_CLOSE_REASON: usize = 123;
/// How long the close frame has to go out and the client to close in turn;
/// a client that reads nothing (one too slow) is dropped after it.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Of that, how long the client has to close in turn once the close frame
/// is out.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// What the session is told for a binary frame: it answers with an error.
const BINARY: &str = "{\"type\":\"binary frames are not supported\"}";

/// Where the connection hands what the client sent.
pub(super) struct Client {
    pub(super) text: Link<ClientText>,
    pub(super) gone: Link<Disconnected>,
}

/// A session's socket and what it serves.
pub(super) struct Connection {
    pub(super) io: TcpStream,
    /// What was read past the upgrade's request, not yet decoded.
    pub(super) read: BytesMut,
    /// The session's frames (a full queue is a client too slow, which the
    /// session handles), and how to close once it lets go.
    pub(super) frames: FrameQueue,
    /// Open sessions close with 1012 when the node drains.
    pub(super) drain: Drain,
    pub(super) client: Client,
    /// Counts it among the node's open sessions while it runs.
    pub(super) open: OpenSession,
}

/// How the socket ends.
enum Ending {
    /// With this close frame.
    Close(CloseReason),
    /// The client left or the socket failed: nothing more to write.
    Gone,
}

impl Ending {
    fn close(closing: Closing) -> Ending {
        let description = (!closing.reason.is_empty()).then(|| closing.reason.to_owned());
        Ending::Close(CloseReason { code: CloseCode::from(closing.code), description })
    }

    /// The client broke the protocol.
    fn refused(code: CloseCode, mut description: String) -> Ending {
        tracing::info!(error = %description, "closing websocket on a bad frame");
        let mut end = description.len().min(MAX_CLOSE_REASON);
        while !description.is_char_boundary(end) {
            end -= 1;
        }
        description.truncate(end);
        Ending::Close(CloseReason { code, description: Some(description) })
    }

    fn codec_refused(error: &ProtocolError) -> Ending {
        let code = match error {
            ProtocolError::Overflow => CloseCode::Size,
            _ => CloseCode::Protocol,
        };
        Ending::refused(code, error.to_string())
    }
}

/// Tells the session its connection is gone, however the task ends (even
/// dropped unfinished, by a server stopping): it lets go, and the frames
/// it queued go with the queue.
struct Leaving {
    frames: FrameQueue,
    gone: Link<Disconnected>,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.frames.disconnect();
        let _ = self.gone.tell(Disconnected);
    }
}

impl Connection {
    /// Serves the socket until the client or the session lets go, or the
    /// node drains.
    pub(super) async fn run(self) {
        let Connection { io, mut read, frames, drain, client, open } = self;
        let leaving = Leaving { frames: frames.clone(), gone: client.gone };
        let mut codec = Codec::new().max_size(MAX_FRAME);
        // Encoded frames not yet written.
        let mut out = BytesMut::new();
        let mut asking = pin!(Fuse::terminated());
        let mut draining = pin!(drain.started());
        // When the frame now in the read buffer began to arrive.
        let mut partial_since: Option<Instant> = None;
        let ending = 'serve: loop {
            while asking.is_terminated() {
                let frame = match codec.decode(&mut read) {
                    Ok(Some(frame)) => {
                        partial_since = None;
                        frame
                    }
                    // The codec checks a frame's size only once it is all
                    // in: a client announcing a huge one must not make the
                    // buffer grow until it has sent it.
                    Ok(None) if read.len() > MAX_FRAME + MAX_FRAME_HEADER => {
                        break 'serve Ending::codec_refused(&ProtocolError::Overflow)
                    }
                    Ok(None) => {
                        if !read.is_empty() {
                            partial_since.get_or_insert_with(Instant::now);
                        }
                        break;
                    }
                    Err(error) => break 'serve Ending::codec_refused(&error),
                };
                let text = match frame {
                    Frame::Text(bytes) => match std::str::from_utf8(&bytes) {
                        Ok(text) => text.to_owned(),
                        Err(_) => {
                            break 'serve Ending::refused(CloseCode::Invalid, "a text frame that is not UTF-8".into())
                        }
                    },
                    Frame::Binary(_) => BINARY.to_owned(),
                    Frame::Ping(bytes) => {
                        // A client that floods pings and reads nothing gets
                        // no growing pile of pongs.
                        if out.len() < CHUNK {
                            encode(&mut codec, Message::Pong(bytes), &mut out);
                        }
                        continue;
                    }
                    Frame::Pong(_) => continue,
                    Frame::Close(_) => break 'serve Ending::close(Closing::NORMAL),
                    // Browsers send every message whole; nothing here would
                    // put fragments together, so they are refused, not dropped.
                    Frame::Continuation(_) => {
                        break 'serve Ending::refused(
                            CloseCode::Unsupported,
                            "fragmented messages are not supported".into(),
                        )
                    }
                };
                asking.set(client.text.ask(ClientText(text)).fuse());
            }
            // An idle session keeps no read buffer; a frame that stays
            // partial holds one only until its deadline.
            if read.is_empty() {
                read = BytesMut::new();
            }
            if let Some(closing) = frames.closing() {
                break Ending::close(closing);
            }
            // Write until the queue is empty or the socket full: frames
            // pushed in one burst wake this task once, so none may be left
            // behind waiting for a wakeup that will not come.
            loop {
                while out.len() < CHUNK {
                    let Some(text) = frames.pop() else { break };
                    encode(&mut codec, Message::Text(text), &mut out);
                }
                if out.is_empty() {
                    // Nothing waits: no write buffer kept either.
                    out = BytesMut::new();
                    break;
                }
                match io.try_write(&out) {
                    Ok(written) => out.advance(written),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break 'serve Ending::Gone,
                }
                if !out.is_empty() {
                    break;
                }
            }
            tokio::select! {
                biased;
                // Frames, or the session letting go, even while `out` is
                // full (a client too slow is closed then).
                () = frames.ready() => {}
                () = &mut draining => break Ending::close(Closing::RESTART),
                taken = &mut asking, if !asking.is_terminated() => match taken {
                    Ok(()) => {}
                    // A session that stopped has said how (`frames`, above).
                    Err(AskError::Closed(_)) => break Ending::close(Closing::NORMAL),
                    Err(_) => break Ending::close(Closing::INTERNAL),
                },
                ready = io.writable(), if !out.is_empty() => {
                    if ready.is_err() {
                        break Ending::Gone;
                    }
                }
                () = sleep_until(partial_since.unwrap_or_else(Instant::now) + FRAME_DEADLINE), if partial_since.is_some() => {
                    break Ending::refused(CloseCode::Policy, "a frame that did not arrive in time".into())
                }
                ready = io.readable(), if asking.is_terminated() => {
                    if ready.is_err() {
                        break Ending::Gone;
                    }
                    read.reserve(READ_SIZE);
                    match io.try_read_buf(&mut read) {
                        // The client closed its side without a close frame.
                        Ok(0) => break Ending::Gone,
                        Ok(_) => {}
                        Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => break Ending::Gone,
                    }
                }
            }
        };
        drop(leaving);
        if let Ending::Close(reason) = ending {
            encode(&mut codec, Message::Close(Some(reason)), &mut out);
            if tokio::time::timeout(CLOSE_GRACE, close(io, out)).await.is_err() {
                tracing::debug!("a websocket client did not take its close frame in time; dropped");
            }
        }
        drop(open);
    }
}

/// Writes the rest of `out` (a close frame last), then lingers for the
/// client's own close.
async fn close(mut io: TcpStream, out: BytesMut) {
    if let Err(error) = io.write_all(&out).await {
        tracing::debug!(%error, "a websocket's close frame could not be sent");
        return;
    }
    linger(&mut io, CLOSE_LINGER).await;
}

fn encode(codec: &mut Codec, message: Message, out: &mut BytesMut) {
    // Only a continuation out of order fails to encode; none is sent.
    if let Err(error) = codec.encode(message, out) {
        tracing::warn!(%error, "a websocket frame could not be encoded");
    }
}
