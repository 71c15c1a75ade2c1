//! The WebSocket side of a session: a `GET /ws` upgrade is authenticated
//! (a bearer header, or `?token=` since browsers cannot set headers on a
//! WebSocket) before anything else, answered, and its connection handed to
//! a [`Connection`] serving a new [`Session`]. Nothing here decides
//! anything about documents; the session does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_http::body::BodySize;
use actix_http::{Method, Request, Response, StatusCode};
use actix_web::{web, HttpResponse};
use bytes::BytesMut;
use futures::SinkExt;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::Instrument;

use super::connection::{Client, Connection};
use super::frames::ChangeFrames;
use super::outbound::FrameQueue;
use super::{BridgeLinks, Session};
use crate::bus::redis::RedisBus;
use crate::kernel::Kernel;
use crate::platform::auth::{extract::bearer, Audience};
use crate::platform::drain::Drain;
use crate::platform::server::{answer, Upgraded, Upgrades};
use crate::platform::{ApiError, ErrorBody, UserRole};
use crate::roles::transaction_manager::api::TmState;

/// Sessions a node holds at once, unless told otherwise: about what
/// actix-server's connection limit allowed two workers before sessions left
/// the server's connections. Each is an open file too (README, "Open files").
pub const MAX_SESSIONS: usize = 50_000;
/// Frames waiting for a client before it is considered too slow.
pub const OUTBOUND_QUEUE: usize = 1024;
/// Close code for a client too slow to read what it asked for.
pub const CLOSE_TOO_SLOW: u16 = 4008;
/// Close code for a session whose token was revoked (a logout) or expired:
/// the client logs in again.
pub const CLOSE_TOKEN_ENDED: u16 = 4001;
/// Close code when the client went away.
const CLOSE_NORMAL: u16 = 1000;
/// Close code when the session failed (a bug): the client may reconnect.
const CLOSE_INTERNAL: u16 = 1011;
/// Close code when the node drains (a restart): reconnect, to another node.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

/// How long a session's socket is quiet before TCP checks its peer is there.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between those checks; three unanswered end the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

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
    pub(super) const INTERNAL: Closing = Closing { code: CLOSE_INTERNAL, reason: "internal error" };

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
    /// The sessions open on the node.
    open: OpenSessions,
}

impl SessionDeps {
    /// Sessions of `kernel` over `bridge`, until `drain`, at most
    /// [`MAX_SESSIONS`] at once.
    pub fn new(kernel: Kernel, bridge: RedisBus, drain: Drain) -> Self {
        let open = OpenSessions::with_limit(MAX_SESSIONS);
        SessionDeps { kernel, bridge, frames: ChangeFrames::default(), drain, open }
    }

    /// At most `limit` sessions at once; past that an upgrade is refused
    /// with 503 (another node takes it).
    pub fn with_max_sessions(mut self, limit: usize) -> Self {
        self.open = OpenSessions::with_limit(limit);
        self
    }

    /// The sessions open on the node, for a drain to wait on.
    pub fn open(&self) -> OpenSessions {
        self.open.clone()
    }
}

/// How many sessions a node has open (upgrades being answered included),
/// and how many it takes. A session's task runs beside the HTTP server's
/// connections, not as one of them: the server's own connection limit does
/// not count it, and a drain waits here for the close frames to go out
/// before the server stops.
#[derive(Clone)]
pub struct OpenSessions(Arc<Open>);

struct Open {
    count: AtomicUsize,
    limit: usize,
    none: Notify,
}

impl OpenSessions {
    fn with_limit(limit: usize) -> Self {
        OpenSessions(Arc::new(Open { count: AtomicUsize::new(0), limit, none: Notify::new() }))
    }

    /// One more session, unless the node has as many as it takes.
    fn enter(&self) -> Option<OpenSession> {
        let session = OpenSession(self.0.clone());
        if self.0.count.fetch_add(1, Ordering::AcqRel) >= self.0.limit {
            // Dropping it counts it out again.
            return None;
        }
        Some(session)
    }

    /// Sessions open now.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Resolves once no session is open.
    pub async fn closed(&self) {
        loop {
            let none = self.0.none.notified();
            if self.count() == 0 {
                return;
            }
            none.await;
        }
    }
}

/// One open session, counted until dropped (the count goes up before it
/// exists).
pub(super) struct OpenSession(Arc<Open>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

/// The node's WebSocket upgrades ([`crate::platform::server`]): `GET /ws`
/// is a session; any other upgrade is refused with 404.
pub fn upgrades(state: web::Data<TmState>, deps: SessionDeps) -> Upgrades {
    Arc::new(move |req, io| Box::pin(serve(req, io, state.clone(), deps.clone())))
}

/// Answers the upgrade, and starts the session it opens on a task of its
/// own: the HTTP connection's task (actix-http's dispatcher, 2.5 KiB) and
/// what answering took (the request, the token's check) end here.
async fn serve(req: Request, io: Upgraded, state: web::Data<TmState>, deps: SessionDeps) {
    if let Some(connection) = open(req, io, state, deps).await {
        actix_rt::spawn(connection.run());
    }
}

/// Answers the upgrade; the connection of the session it opened, if it
/// did. The request, its span and the dispatcher's buffers end here: a
/// session keeps only its socket.
async fn open(req: Request, mut io: Upgraded, state: web::Data<TmState>, deps: SessionDeps) -> Option<Connection> {
    let span =
        tracing::info_span!("http.request", method = %req.method(), path = %req.path(), status = tracing::field::Empty);
    let Accepted { user, admin, token, handshake, counted } =
        match accept(&req, &state, &deps).instrument(span.clone()).await {
            Ok(accepted) => accepted,
            Err(error) => {
                let refusal = Response::from(error);
                span.record("status", refusal.status().as_u16());
                answer(io, refusal).await;
                return None;
            }
        };
    span.record("status", handshake.status().as_u16());
    if let Err(error) = io.send((handshake, BodySize::None).into()).await {
        tracing::debug!(%error, "the websocket handshake could not be sent");
        return None;
    }
    let parts = io.into_parts();
    // What the dispatcher read past the request (the client's first frames
    // perhaps) is kept, in a buffer of its size.
    let read = BytesMut::from(&parts.read_buf[..]);
    if let Err(error) = keep_alive(&parts.io) {
        tracing::debug!(%error, "a websocket's socket options could not be set");
    }
    let out = FrameQueue::new(OUTBOUND_QUEUE);
    let id = format!("session/{}", uuid::Uuid::now_v7());
    let bus = BridgeLinks {
        subscribe: deps.bridge.link("session"),
        unsubscribe: deps.bridge.link("session"),
        publish: deps.bridge.publisher.clone(),
    };
    let too_slow = deps.kernel.metrics().sessions_too_slow.clone();
    let (frames, u, queue) = (deps.frames.clone(), user.clone(), out.clone());
    let session = deps.kernel.spawn(id, move || Session {
        user: u.clone(),
        admin,
        token: token.clone(),
        state: state.clone(),
        bus: bus.clone(),
        out: queue.clone(),
        frames: frames.clone(),
        too_slow: too_slow.clone(),
        docs: HashMap::new(),
        follows: 0,
        panels: false,
        contexts: Default::default(),
        buses_down: Vec::new(),
        me: None,
    });
    tracing::info!(%user, session = session.id(), "websocket session opened");
    let client = Client { text: session.link("client"), gone: session.link("client") };
    Some(Connection { io: parts.io, read, frames: out, drain: deps.drain.clone(), client, open: counted })
}

/// A session's socket sends each frame at once (no Nagle delay behind the
/// last one), and finds a peer that vanished without a word (TCP keepalive)
/// instead of keeping its session forever.
fn keep_alive(io: &TcpStream) -> std::io::Result<()> {
    io.set_nodelay(true)?;
    let probes = TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL).with_retries(3);
    SockRef::from(io).set_tcp_keepalive(&probes)
}

/// An upgrade that passed every check, not answered yet.
struct Accepted {
    user: String,
    admin: bool,
    token: String,
    /// The handshake's response.
    handshake: Response<()>,
    /// The session, counted from its first step, so that a drain also
    /// waits for one being answered.
    counted: OpenSession,
}

/// Checks an upgrade before anything is done for it: the node's room for
/// one more session, the route, the drain, the token.
async fn accept(req: &Request, state: &TmState, deps: &SessionDeps) -> Result<Accepted, actix_web::Error> {
    let Some(counted) = deps.open.enter() else {
        tracing::warn!(
            limit = deps.open.0.limit,
            "websocket upgrade refused: the node has as many sessions as it takes"
        );
        return Err(ApiError::Unavailable("this node (session limit)").into());
    };
    if req.path() != "/ws" || req.method() != Method::GET {
        return Err(ApiError::NotFound("route").into());
    }
    if deps.drain.is_draining() {
        return Err(ApiError::Unavailable("this node (draining)").into());
    }
    let header = req.head().headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = bearer(header)
        .map(str::to_owned)
        .or_else(|| {
            let query = web::Query::<HashMap<String, String>>::from_query(req.uri().query().unwrap_or_default());
            query.ok()?.get("token").cloned()
        })
        .ok_or(ApiError::Unauthorized)?;
    let identity = state.platform.auth.verify(&token, &Audience::Api).await.map_err(ApiError::from)?;
    // The drain may have begun while the token was checked.
    if deps.drain.is_draining() {
        return Err(ApiError::Unavailable("this node (draining)").into());
    }
    let handshake = actix_http::ws::handshake(req.head())?.finish().drop_body();
    Ok(Accepted { user: identity.user, admin: identity.role == UserRole::Admin, token, handshake, counted })
}

/// `GET /ws` without `Upgrade: websocket`: the client is told what it lacks.
pub async fn not_upgraded() -> HttpResponse {
    HttpResponse::build(StatusCode::UPGRADE_REQUIRED)
        .insert_header((actix_web::http::header::UPGRADE, "websocket"))
        .json(ErrorBody {
            error: "upgrade_required".to_owned(),
            message: "GET /ws opens a WebSocket: send `Upgrade: websocket`".to_owned(),
            current_version: None,
        })
}
