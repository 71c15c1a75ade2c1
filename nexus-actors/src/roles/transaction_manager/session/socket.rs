//! The WebSocket side of a session: `GET /ws` authenticates the upgrade and
//! starts a [`Session`]; a reader task hands the client's text frames to it
//! with backpressure, and the response's body ([`Outbound`]) writes what the
//! session queues (a bounded queue). Neither decides anything about
//! documents; the session does.

use std::collections::HashMap;

use actix_codec::Decoder;
use actix_http::body::{BodyStream, MessageBody};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, ProtocolError};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::BytesMut;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::frames::ChangeFrames;
use super::outbound::{Control, FrameQueue, Outbound};
use super::{BridgeLinks, ClientText, Disconnected, Session};
use crate::bus::redis::RedisBus;
use crate::kernel::{Kernel, Link};
use crate::platform::auth::{extract::bearer, Audience, Auth};
use crate::platform::drain::Drain;
use crate::platform::{ApiError, UserRole};
use crate::roles::transaction_manager::api::TmState;
use crate::roles::transaction_manager::protocol::MAX_FRAME;

/// Frames waiting for a client before it is considered too slow.
pub const OUTBOUND_QUEUE: usize = 1024;
/// Close code for a client too slow to read what it asked for.
pub const CLOSE_TOO_SLOW: u16 = 4008;
/// Close code for a session whose token was revoked (a logout) or expired:
/// the client logs in again.
pub const CLOSE_TOKEN_ENDED: u16 = 4001;
/// Close code when the client went away.
const CLOSE_NORMAL: u16 = 1000;
/// Close code when the node drains (a restart): reconnect, to another node.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
/// Control frames the reader may have waiting for the writer; past that a
/// ping goes unanswered (a client flooding pings gets no queue of pongs).
/// The last slot is kept for a close.
const CONTROL_QUEUE: usize = 4;
/// The longest a frame's header is: what a frame of [`MAX_FRAME`] may take
/// in the read buffer beyond its payload.
const MAX_FRAME_HEADER: usize = 14;
/// The longest close reason a close frame carries (RFC 6455: 125 bytes of
/// payload, 2 of them the code).
const MAX_CLOSE_REASON: usize = 123;

/// How a session ends its socket: the close code and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closing {
    pub(super) code: u16,
    pub(super) reason: &'static str,
}

impl Closing {
    pub(super) const NORMAL: Closing = Closing { code: CLOSE_NORMAL, reason: "" };
    pub(super) const TOO_SLOW: Closing = Closing { code: CLOSE_TOO_SLOW, reason: "client too slow" };
    pub(super) const RESTART: Closing = Closing { code: CLOSE_SERVICE_RESTART, reason: "node restarting; reconnect" };

    /// The token ended for `reason`.
    pub(super) fn token_ended(reason: &'static str) -> Closing {
        Closing { code: CLOSE_TOKEN_ENDED, reason }
    }
}

/// What `/ws` needs besides the transaction manager's state.
#[derive(Clone)]
pub struct SessionDeps {
    /// The node's kernel: sessions are its actors.
    pub kernel: Kernel,
    /// The node's Redis bridge, which sessions subscribe through.
    pub bridge: RedisBus,
    /// Change frames shared by the node's sessions.
    frames: ChangeFrames,
    /// The node's drain: no new sessions then, and open ones close with 1012.
    drain: Drain,
}

impl SessionDeps {
    /// Sessions of `kernel` over `bridge`, until `drain`.
    pub fn new(kernel: Kernel, bridge: RedisBus, drain: Drain) -> Self {
        SessionDeps { kernel, bridge, frames: ChangeFrames::default(), drain }
    }
}

/// `GET /ws`: authenticates the upgrade (bearer header, or `?token=` since
/// browsers cannot set headers on a WebSocket), then starts a `Session`.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<TmState>,
    deps: web::Data<SessionDeps>,
) -> Result<HttpResponse, actix_web::Error> {
    if deps.drain.is_draining() {
        return Err(ApiError::Unavailable("this node (draining)").into());
    }
    let auth = req.app_data::<web::Data<Auth>>().ok_or(ApiError::Unauthorized)?;
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = bearer(header)
        .map(str::to_owned)
        .or_else(|| web::Query::<HashMap<String, String>>::from_query(req.query_string()).ok()?.get("token").cloned())
        .ok_or(ApiError::Unauthorized)?;
    let identity = auth.verify(&token, &Audience::Api).await.map_err(ApiError::from)?;
    let (user, admin) = (identity.user, identity.role == UserRole::Admin);

    let mut handshake = actix_http::ws::handshake(req.head())?;
    let out = FrameQueue::new(OUTBOUND_QUEUE);
    let queue = out.clone();
    let (control_tx, control) = mpsc::channel(CONTROL_QUEUE);
    let (shutdown, writer_stop) = watch::channel(None);
    let reader_stop = shutdown.subscribe();
    let (gone_tx, gone_rx) = oneshot::channel();
    let id = format!("session/{}", uuid::Uuid::now_v7());
    let bus = BridgeLinks {
        subscribe: deps.bridge.link("session"),
        unsubscribe: deps.bridge.link("session"),
        publish: deps.bridge.publisher.clone(),
    };
    let (s, u) = (state.clone(), user.clone());
    let too_slow = deps.kernel.metrics().sessions_too_slow.clone();
    let frames = deps.frames.clone();
    let session = deps.kernel.spawn(id, move || Session {
        user: u.clone(),
        admin,
        token: token.clone(),
        state: s.clone(),
        bus: bus.clone(),
        out: out.clone(),
        frames: frames.clone(),
        shutdown: shutdown.clone(),
        too_slow: too_slow.clone(),
        docs: HashMap::new(),
        follows: 0,
        panels: false,
        contexts: Default::default(),
        buses_down: Vec::new(),
        me: None,
    });
    tracing::info!(%user, session = session.id(), "websocket session opened");
    let drain = Box::pin(deps.drain.started());
    let outbound = Outbound { frames: queue, control, stop: writer_stop, drain, _gone: gone_tx };
    let client = Client { text: session.link("client"), gone: session.link("client") };
    read(body, control_tx, client, reader_stop, gone_rx);
    Ok(handshake.message_body(BodyStream::new(outbound.into_body()).boxed())?.into())
}

/// Where the reader hands what the client sent.
struct Client {
    text: Link<ClientText>,
    gone: Link<Disconnected>,
}

/// Reader: decodes the client's frames and hands the text ones to the
/// session, one at a time (backpressure), until the client leaves, breaks
/// the protocol, or the session or the connection is gone.
fn read(
    mut body: web::Payload,
    control: mpsc::Sender<Control>,
    client: Client,
    mut stop: watch::Receiver<Option<Closing>>,
    mut connection_gone: oneshot::Receiver<()>,
) {
    actix::spawn(async move {
        let mut codec = Codec::new().max_size(MAX_FRAME);
        let mut buf = BytesMut::new();
        // How the socket closes when the client broke the protocol.
        let broken: Option<(CloseCode, String)> = loop {
            let frame = match codec.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                // The codec checks a frame's size only once it is all in: a
                // client announcing a huge one must not make the buffer grow
                // until it has sent it.
                Ok(None) if buf.len() > MAX_FRAME + MAX_FRAME_HEADER => break Some(refusal(&ProtocolError::Overflow)),
                Ok(None) => {
                    if buf.is_empty() {
                        // An idle session keeps no read buffer.
                        buf = BytesMut::new();
                    }
                    let chunk = tokio::select! {
                        // The session is gone: it closes the socket.
                        _ = stop.changed() => return,
                        _ = &mut connection_gone => break None,
                        chunk = body.next() => chunk,
                    };
                    match chunk {
                        Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                        // The connection ended, cleanly or not.
                        Some(Err(_)) | None => break None,
                    }
                    continue;
                }
                Err(error) => break Some(refusal(&error)),
            };
            let text = match frame {
                Frame::Text(bytes) => match std::str::from_utf8(&bytes) {
                    Ok(text) => text.to_owned(),
                    Err(_) => break Some((CloseCode::Invalid, "a text frame that is not UTF-8".to_owned())),
                },
                Frame::Binary(_) => String::from("{\"type\":\"binary frames are not supported\"}"),
                Frame::Ping(bytes) => {
                    if control.capacity() > 1 {
                        let _ = control.try_send(Control::Pong(bytes));
                    }
                    continue;
                }
                Frame::Close(_) => break None,
                // Browsers send every message whole; nothing here would
                // put fragments together, so they are refused, not dropped.
                Frame::Continuation(_) => {
                    break Some((CloseCode::Unsupported, "fragmented messages are not supported".to_owned()))
                }
                Frame::Pong(_) => continue,
            };
            if client.text.ask(ClientText(text)).await.is_err() {
                break None;
            }
        };
        if let Some((code, description)) = broken {
            close(&control, code, description);
        }
        let _ = client.gone.tell(Disconnected);
    });
}

/// How the socket closes on a frame the codec refused.
fn refusal(error: &ProtocolError) -> (CloseCode, String) {
    let code = match error {
        ProtocolError::Overflow => CloseCode::Size,
        _ => CloseCode::Protocol,
    };
    (code, error.to_string())
}

/// Closes the socket with `code`, saying why.
fn close(control: &mpsc::Sender<Control>, code: CloseCode, mut description: String) {
    tracing::info!(error = %description, "closing websocket on a bad frame");
    let mut end = description.len().min(MAX_CLOSE_REASON);
    while !description.is_char_boundary(end) {
        end -= 1;
    }
    description.truncate(end);
    let _ = control.try_send(Control::Close(CloseReason { code, description: Some(description) }));
}
