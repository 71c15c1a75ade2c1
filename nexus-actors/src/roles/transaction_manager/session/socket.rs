//! The WebSocket side of a session: `GET /ws` authenticates the upgrade and
//! starts a [`Session`], a reader task hands the client's text frames to
//! it with backpressure, and a writer task is the only place that awaits
//! the client, draining a bounded queue. Neither decides anything about
//! documents; the session does.

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message as WsMessage};
use bytestring::ByteString;
use tokio::sync::{mpsc, watch};

use super::frames::ChangeFrames;
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
/// How long a client that does not read gets to take the close frame.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

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

    let (response, ws, stream) = actix_ws::handle(&req, body)?;
    let stream = stream.max_frame_size(MAX_FRAME);
    let (out, outbound) = mpsc::channel::<ByteString>(OUTBOUND_QUEUE);
    let (shutdown, writer_stop) = watch::channel(None);
    let reader_stop = shutdown.subscribe();
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
    write(ws.clone(), outbound, writer_stop, deps.drain.started());
    read(ws, stream, session.link("client"), session.link("client"), reader_stop);
    Ok(response)
}

/// Writer: the only place that awaits the client.
fn write(
    mut writer: actix_ws::Session,
    mut outbound: mpsc::Receiver<ByteString>,
    mut stop: watch::Receiver<Option<Closing>>,
    drain: impl std::future::Future<Output = ()> + 'static,
) {
    actix::spawn(async move {
        let mut drain = std::pin::pin!(drain);
        let mut restart = false;
        loop {
            let text = tokio::select! {
                _ = stop.changed() => break,
                () = &mut drain => {
                    restart = true;
                    break;
                }
                text = outbound.recv() => match text {
                    Some(text) => text,
                    None => break,
                },
            };
            tokio::select! {
                _ = stop.changed() => break,
                sent = writer.text(text) => if sent.is_err() { return },
            }
        }
        let closing = match restart {
            true => Closing::RESTART,
            false => stop.borrow().unwrap_or(Closing::NORMAL),
        };
        let description = (!closing.reason.is_empty()).then(|| closing.reason.to_owned());
        let reason = CloseReason { code: CloseCode::from(closing.code), description };
        // A client that does not read may never take the close frame either.
        let _ = tokio::time::timeout(CLOSE_GRACE, writer.close(Some(reason))).await;
    });
}

/// Reader: hands text frames to the session, with backpressure.
fn read(
    mut control: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
    text: Link<ClientText>,
    gone: Link<Disconnected>,
    mut stop: watch::Receiver<Option<Closing>>,
) {
    actix::spawn(async move {
        loop {
            let frame = tokio::select! {
                // The session is gone: drop our handle so the socket closes.
                _ = stop.changed() => return,
                frame = stream.recv() => match frame {
                    Some(frame) => frame,
                    None => break,
                },
            };
            match frame {
                Ok(WsMessage::Text(t)) => {
                    if text.ask(ClientText(t.to_string())).await.is_err() {
                        break;
                    }
                }
                Ok(WsMessage::Ping(bytes)) => {
                    let _ = control.pong(&bytes).await;
                }
                Ok(WsMessage::Close(_)) => break,
                Ok(WsMessage::Binary(_)) => {
                    let _ = text.ask(ClientText(String::from("{\"type\":\"binary frames are not supported\"}"))).await;
                }
                Ok(_) => {}
                Err(error) => {
                    let code = match error {
                        actix_ws::ProtocolError::Overflow => CloseCode::Size,
                        _ => CloseCode::Protocol,
                    };
                    tracing::info!(%error, "closing websocket on a bad frame");
                    let _ = control.close(Some(CloseReason { code, description: Some(error.to_string()) })).await;
                    let _ = gone.tell(Disconnected);
                    return;
                }
            }
        }
        let _ = gone.tell(Disconnected);
    });
}
