//! `Session`: one actor per WebSocket connection of a logged-in user.
//!
//! It follows documents for its client: it subscribes to their Redis
//! channels through the `RedisBridge`, and sends each document's changes
//! without gaps. The client says the last version it has when it
//! subscribes; the session catches it up from the document's history, or
//! with a snapshot. A gap in what arrives live (pub/sub is at-most-once; a
//! `BusDown`/`BusUp`; a dropped message) triggers the same catch-up, so the
//! client always ends with the server's state.
//!
//! It also follows the user's panels for the client (`subscribe_panels`):
//! panel record changes and the instance states the panel manager announces
//! on the same channel, each forwarded only to its owner.
//!
//! Outbound policy: frames go through a bounded queue
//! ([`OUTBOUND_QUEUE`]); a client that stops reading until it is full is
//! disconnected with close code 4008, never stalling others. It reconnects
//! with its last version and loses nothing.

use std::collections::{HashMap, HashSet};

use actix::{ActorContext, AsyncContext};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message as WsMessage};
use tokio::sync::{mpsc, watch};

use super::api::documents::DocumentChanged;
use super::api::TmState;
use super::documents::PRESENCE_TTL_SECS;
use super::protocol::{decode, ClientFrame, Participant, ServerFrame, MAX_CURSOR, MAX_FRAME};
use crate::bus::redis::{Publish, RedisBridge, Subscribe, Topic, Unsubscribe};
use crate::bus::BusEvent;
use crate::envelope::{Envelope, Payload};
use crate::instance::InstanceChanged;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply};
use crate::platform::auth::{extract::bearer, Audience, Auth};
use crate::platform::channels::{self, panels as panels_channel};
use crate::platform::{ApiError, PanelChanged};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Frames waiting for a client before it is considered too slow.
pub const OUTBOUND_QUEUE: usize = 1024;
/// Pause before retrying a catch-up that failed on Redis.
const CATCH_UP_RETRY: std::time::Duration = std::time::Duration::from_millis(250);
/// Close code when the client went away.
const CLOSE_NORMAL: u16 = 1000;
/// Close code for a client too slow to read what it asked for.
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// Announced on `nexus:doc:{id}` when someone starts or stops following it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceChanged {
    pub doc: String,
    pub present: Vec<Participant>,
}

impl Payload for PresenceChanged {
    const TYPE: &'static str = "nexus.presence.changed";
}

/// Announced on `nexus:doc:{id}` when a participant's cursor moves.
#[derive(Debug, Serialize, Deserialize)]
pub struct CursorMoved {
    pub doc: String,
    pub session: String,
    pub user: String,
    pub position: Value,
}

impl Payload for CursorMoved {
    const TYPE: &'static str = "nexus.cursor.moved";
}

/// A text frame from the client.
struct ClientText(String);
impl Message for ClientText {
    type Reply = ();
}

/// The connection ended.
struct Disconnected;
impl Message for Disconnected {
    type Reply = ();
}

/// What a catch-up of `doc` from `since` found: the version and the frames
/// that bring the client there, or why not.
struct CaughtUp {
    doc: String,
    since: Option<u64>,
    outcome: Result<(u64, Vec<ServerFrame>), (&'static str, String)>,
}
impl Message for CaughtUp {
    type Reply = ();
}

pub struct Session {
    user: String,
    state: web::Data<TmState>,
    /// This session's links to the node's `RedisBridge`, made once: a link
    /// registers its graph edge when it is made.
    bus: BridgeLinks,
    out: mpsc::Sender<String>,
    /// Tells the connection's reader and writer to let go of the socket,
    /// with the close code to send.
    shutdown: watch::Sender<Option<u16>>,
    too_slow: prometheus::IntCounter,
    /// Followed documents and the last version the client was sent (None:
    /// a catch-up is under way).
    docs: HashMap<String, Option<u64>>,
    /// Whether the client follows its panel records.
    panels: bool,
    /// Followed documents whose client asked for presence and cursors.
    wants_presence: HashSet<String>,
    /// Followed documents whose presence lists this session.
    joined: HashSet<String>,
    me: Option<ActorRef<Session>>,
}

fn channel(doc: &str) -> String {
    channels::document(doc)
}

impl Session {
    fn send(&mut self, frame: &ServerFrame, ctx: &mut Ctx<Self>) {
        if self.out.try_send(frame.encode()).is_err() && self.shutdown.borrow().is_none() {
            self.too_slow.inc();
            tracing::warn!(user = %self.user, "nexus_sessions_too_slow_total: outbound queue full; disconnecting");
            self.leave(CLOSE_TOO_SLOW, ctx);
        }
    }

    fn error(&mut self, code: &str, message: String, ctx: &mut Ctx<Self>) {
        self.send(&ServerFrame::Error { code: code.to_owned(), message }, ctx);
    }

    /// Unsubscribes everything, closes the socket with `code` and stops.
    fn leave(&mut self, code: u16, ctx: &mut Ctx<Self>) {
        let docs: Vec<String> = self.docs.keys().cloned().collect();
        for doc in docs {
            self.unfollow(&doc);
        }
        if let (true, Some(me)) = (self.panels, &self.me) {
            let topic = Topic::Channel(panels_channel(&self.user));
            let _ = self.bus.unsubscribe.tell(Unsubscribe { topic, subscriber: me.id().to_owned() });
        }
        let _ = self.shutdown.send(Some(code));
        ctx.stop();
    }

    fn unfollow(&mut self, doc: &str) {
        self.wants_presence.remove(doc);
        let was_present = self.joined.remove(doc);
        if self.docs.remove(doc).is_none() {
            return;
        }
        let Some(me) = &self.me else { return };
        let session = me.id().to_owned();
        let unsubscribe = Unsubscribe { topic: Topic::Channel(channel(doc)), subscriber: session.clone() };
        let _ = self.bus.unsubscribe.tell(unsubscribe);
        if !was_present {
            return;
        }
        let (state, publish, doc) = (self.state.clone(), self.bus.publish.clone(), doc.to_owned());
        actix::spawn(async move {
            if let Ok(present) = state.documents.presence_leave(&doc, &session).await {
                announce_presence(&state, &publish, doc, present);
            }
        });
    }

    /// Adds this session to the document's presence and tells everyone.
    fn join(&mut self, doc: &str) {
        let Some(me) = &self.me else { return };
        self.joined.insert(doc.to_owned());
        let (state, publish) = (self.state.clone(), self.bus.publish.clone());
        let (doc, session, user) = (doc.to_owned(), me.id().to_owned(), self.user.clone());
        actix::spawn(async move {
            if let Ok(present) = state.documents.presence_join(&doc, &session, &user).await {
                announce_presence(&state, &publish, doc, present);
            }
        });
    }

    /// Publishes an ephemeral event about `doc` (a cursor move) on its
    /// channel. When the bridge is saturated the event is dropped (counted
    /// in `nexus_mailbox_dropped_total`): the next move supersedes it.
    fn announce<P: Payload>(&self, doc: &str, payload: P) {
        let envelope = Envelope::new(self.state.node.clone(), payload).into_untyped();
        let _ = self.bus.publish.try_tell(Publish { channel: channel(doc), envelope });
    }

    /// Fetches what the client lacks after `since` (or a snapshot) and
    /// tells this session when it has it. With `subscribe`, the Redis
    /// subscription is confirmed first, so nothing published after the
    /// fetch can be missed.
    fn catch_up(&mut self, doc: String, since: Option<u64>, subscribe: bool) {
        self.docs.insert(doc.clone(), None);
        let (Some(me), state, user) = (self.me.clone(), self.state.clone(), self.user.clone()) else { return };
        let link = me.link::<CaughtUp>("store");
        let subscription = subscribe.then(|| {
            let request = Subscribe { topic: Topic::Channel(channel(&doc)), subscriber: me.link("redis-bridge") };
            (self.bus.subscribe.clone(), request)
        });
        actix::spawn(async move {
            if let Some((bridge, request)) = subscription {
                // While Redis is down the bridge subscribes on reconnection
                // and the BusUp that follows triggers another catch-up.
                let _ = bridge.ask(request).await;
            }
            let outcome = fetch(&state, &user, &doc, since).await;
            let _ = link.tell(CaughtUp { doc, since, outcome });
        });
    }
}

fn announce_presence(state: &TmState, publish: &Link<Publish>, doc: String, present: Vec<(String, String)>) {
    let present = present.into_iter().map(|(session, user)| Participant { session, user }).collect();
    let envelope = Envelope::new(state.node.clone(), PresenceChanged { doc: doc.clone(), present }).into_untyped();
    let _ = publish.tell(Publish { channel: channel(&doc), envelope });
}

impl Session {
    fn changed(&mut self, change: DocumentChanged, ctx: &mut Ctx<Self>) {
        match self.docs.get(&change.id).copied() {
            Some(Some(sent)) if change.version == sent + 1 => {
                self.docs.insert(change.id.clone(), Some(change.version));
                let frame = ServerFrame::Change { doc: change.id, version: change.version, patch: change.patch };
                self.send(&frame, ctx);
            }
            Some(Some(sent)) if change.version > sent + 1 => self.catch_up(change.id, Some(sent), false),
            _ => {}
        }
    }
}

/// Changes after `since` when the history has all of them, else a snapshot.
async fn fetch(
    state: &TmState,
    user: &str,
    doc: &str,
    since: Option<u64>,
) -> Result<(u64, Vec<ServerFrame>), (&'static str, String)> {
    let internal = |e: crate::platform::StoreError| ("internal", e.to_string());
    let Some(current) = state.documents.get(doc).await.map_err(internal)? else {
        return Err(("not_found", format!("document {doc} not found")));
    };
    if current.owner != user {
        return Err(("forbidden", format!("document {doc} belongs to another user")));
    }
    if let Some(since) = since.filter(|s| *s <= current.version) {
        let changes = state.documents.history(doc, since, super::documents::HISTORY_LEN).await.map_err(internal)?;
        let contiguous = changes.iter().enumerate().all(|(i, c)| c.version == since + 1 + i as u64);
        if contiguous && changes.last().map_or(since, |c| c.version) == current.version {
            let frames = changes
                .into_iter()
                .map(|c| ServerFrame::Change { doc: doc.to_owned(), version: c.version, patch: c.patch })
                .collect();
            return Ok((current.version, frames));
        }
    }
    let frame = ServerFrame::Snapshot { doc: doc.to_owned(), version: current.version, state: current.state };
    Ok((current.version, vec![frame]))
}

impl Behaviour for Session {
    const KIND: &'static str = "session";
    const MAILBOX: usize = 256;

    fn started(&mut self, me: &ActorRef<Self>, ctx: &mut Ctx<Self>) {
        self.me = Some(me.clone());
        self.send(&ServerFrame::Welcome { session: me.id().to_owned(), user: self.user.clone() }, ctx);
        // Presence entries of a session whose node dies expire; a live one
        // keeps refreshing them.
        let refresh = std::time::Duration::from_secs(PRESENCE_TTL_SECS / 3);
        ctx.run_interval(refresh, |s, _| {
            let this = s.behaviour_mut();
            if let (false, Some(me)) = (this.joined.is_empty(), &this.me) {
                let (state, session) = (this.state.clone(), me.id().to_owned());
                actix::spawn(async move {
                    let _ = state.documents.presence_alive(&session).await;
                });
            }
        });
    }
}

impl Handler<ClientText> for Session {
    fn handle(&mut self, ClientText(text): ClientText, ctx: &mut Ctx<Self>) -> Reply<()> {
        match decode(&text) {
            Err(error) => self.error(error.code(), error.to_string(), ctx),
            Ok(ClientFrame::Subscribe { doc, version, presence }) => {
                let new = !self.docs.contains_key(&doc);
                if presence {
                    self.wants_presence.insert(doc.clone());
                }
                self.catch_up(doc, version, new);
            }
            Ok(ClientFrame::Unsubscribe { doc }) => self.unfollow(&doc),
            Ok(ClientFrame::SubscribePanels) => {
                if let Some(me) = &self.me {
                    let topic = Topic::Channel(panels_channel(&self.user));
                    let _ = self.bus.subscribe.tell(Subscribe { topic, subscriber: me.link("redis-bridge") });
                    self.panels = true;
                }
            }
            Ok(ClientFrame::Cursor { doc, position }) => {
                if !self.joined.contains(&doc) {
                    self.error(
                        "not_following",
                        format!("subscribe to {doc} with presence before moving a cursor in it"),
                        ctx,
                    );
                } else if position.to_string().len() > MAX_CURSOR {
                    self.error("bad_frame", format!("cursor position is over {MAX_CURSOR} bytes"), ctx);
                } else if let Some(me) = &self.me {
                    let moved = CursorMoved {
                        doc: doc.clone(),
                        session: me.id().to_owned(),
                        user: self.user.clone(),
                        position,
                    };
                    self.announce(&doc, moved);
                }
            }
        }
        Reply::Now(())
    }
}

impl Handler<CaughtUp> for Session {
    fn handle(&mut self, msg: CaughtUp, ctx: &mut Ctx<Self>) -> Reply<()> {
        let Some(entry) = self.docs.get(&msg.doc).copied() else { return Reply::Now(()) };
        match msg.outcome {
            Ok((version, frames)) => {
                if entry.is_some_and(|sent| sent >= version) {
                    return Reply::Now(());
                }
                if self.wants_presence.contains(&msg.doc) && !self.joined.contains(&msg.doc) {
                    self.join(&msg.doc);
                }
                self.docs.insert(msg.doc, Some(version));
                for frame in &frames {
                    self.send(frame, ctx);
                }
            }
            Err(("internal", message)) => {
                // Redis is unreachable for now: try again; the client keeps
                // what it has.
                tracing::warn!(doc = %msg.doc, %message, "catch-up failed; retrying");
                let (doc, since) = (msg.doc, msg.since);
                ctx.run_later(CATCH_UP_RETRY, move |s, _| s.behaviour_mut().catch_up(doc, since, false));
            }
            Err((code, message)) => {
                self.docs.remove(&msg.doc);
                self.error(code, message, ctx);
            }
        }
        Reply::Now(())
    }
}

impl Handler<BusEvent> for Session {
    fn handle(&mut self, event: BusEvent, ctx: &mut Ctx<Self>) -> Reply<()> {
        match event {
            BusEvent::Message(m) => match m.envelope.kind.as_str() {
                DocumentChanged::TYPE => {
                    let Ok(change) = m.envelope.typed::<DocumentChanged>() else { return Reply::Now(()) };
                    self.changed(change.data, ctx);
                }
                PresenceChanged::TYPE => {
                    let Ok(presence) = m.envelope.typed::<PresenceChanged>() else { return Reply::Now(()) };
                    let PresenceChanged { doc, present } = presence.data;
                    if self.joined.contains(&doc) {
                        self.send(&ServerFrame::Presence { doc, present }, ctx);
                    }
                }
                PanelChanged::TYPE => {
                    let Ok(change) = m.envelope.typed::<PanelChanged>() else { return Reply::Now(()) };
                    let owned = change.data.panel.as_ref().is_none_or(|p| p.owner == self.user);
                    if self.panels && owned && m.channel == panels_channel(&self.user) {
                        let panel = change.data.panel.and_then(|p| serde_json::to_value(p).ok());
                        self.send(&ServerFrame::Panel { id: change.data.id, panel }, ctx);
                    }
                }
                InstanceChanged::TYPE => {
                    // Only panel managers publish these; a malformed one is
                    // their bug, not a reason to drop this client.
                    let change = match m.envelope.typed::<InstanceChanged>() {
                        Ok(change) => change.data,
                        Err(error) => {
                            tracing::warn!(channel = %m.channel, %error, "ignoring a malformed instance change");
                            return Reply::Now(());
                        }
                    };
                    let owned = change.status.owner == self.user;
                    if self.panels && owned && m.channel == panels_channel(&self.user) {
                        self.send(&ServerFrame::Instance { status: change.status }, ctx);
                    }
                }
                CursorMoved::TYPE => {
                    let Ok(cursor) = m.envelope.typed::<CursorMoved>() else { return Reply::Now(()) };
                    let CursorMoved { doc, session, user, position } = cursor.data;
                    let mine = self.me.as_ref().is_some_and(|me| me.id() == session);
                    if !mine && self.joined.contains(&doc) {
                        self.send(&ServerFrame::Cursor { doc, session, user, position }, ctx);
                    }
                }
                _ => {}
            },
            BusEvent::Up(_) => {
                // Whatever was published while the bus was down is gone from
                // pub/sub; the history has it.
                let followed: Vec<(String, Option<u64>)> = self.docs.iter().map(|(d, v)| (d.clone(), *v)).collect();
                for (doc, sent) in followed {
                    if let Some(sent) = sent {
                        self.catch_up(doc, Some(sent), false);
                    }
                }
            }
            BusEvent::Down(_) => {}
        }
        Reply::Now(())
    }
}

impl Handler<Disconnected> for Session {
    fn handle(&mut self, _: Disconnected, ctx: &mut Ctx<Self>) -> Reply<()> {
        self.leave(CLOSE_NORMAL, ctx);
        Reply::Now(())
    }
}

/// The links a session uses to reach the bridge.
#[derive(Clone)]
struct BridgeLinks {
    subscribe: Link<Subscribe>,
    unsubscribe: Link<Unsubscribe>,
    publish: Link<Publish>,
}

/// What `/ws` needs besides the transaction manager's state.
#[derive(Clone)]
pub struct SessionDeps {
    pub kernel: Kernel,
    pub bridge: ActorRef<RedisBridge>,
}

/// `GET /ws`: authenticates the upgrade (bearer header, or `?token=` since
/// browsers cannot set headers on a WebSocket), then starts a `Session`.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<TmState>,
    deps: web::Data<SessionDeps>,
) -> Result<HttpResponse, actix_web::Error> {
    let auth = req.app_data::<web::Data<Auth>>().ok_or(ApiError::Unauthorized)?;
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = bearer(header)
        .map(str::to_owned)
        .or_else(|| web::Query::<HashMap<String, String>>::from_query(req.query_string()).ok()?.get("token").cloned())
        .ok_or(ApiError::Unauthorized)?;
    let user = auth.verify(&token, &Audience::Api).await.map_err(ApiError::from)?.user;

    let (response, ws, stream) = actix_ws::handle(&req, body)?;
    let mut stream = stream.max_frame_size(MAX_FRAME);
    let (out, mut outbound) = mpsc::channel::<String>(OUTBOUND_QUEUE);
    let (shutdown, mut writer_stop) = watch::channel(None);
    let mut reader_stop = shutdown.subscribe();
    let id = format!("session/{}", uuid::Uuid::now_v7());
    let bus = BridgeLinks {
        subscribe: deps.bridge.link("session"),
        unsubscribe: deps.bridge.link("session"),
        publish: deps.bridge.link("session"),
    };
    let (s, b, u) = (state.clone(), bus, user.clone());
    let too_slow = deps.kernel.metrics().sessions_too_slow.clone();
    let session = deps.kernel.spawn(id, move || Session {
        user: u.clone(),
        state: s.clone(),
        bus: b.clone(),
        out: out.clone(),
        shutdown: shutdown.clone(),
        too_slow: too_slow.clone(),
        docs: HashMap::new(),
        panels: false,
        wants_presence: HashSet::new(),
        joined: HashSet::new(),
        me: None,
    });
    tracing::info!(%user, session = session.id(), "websocket session opened");

    // Writer: the only place that awaits the client.
    let mut writer = ws.clone();
    actix::spawn(async move {
        loop {
            let text = tokio::select! {
                _ = writer_stop.changed() => break,
                text = outbound.recv() => match text {
                    Some(text) => text,
                    None => break,
                },
            };
            tokio::select! {
                _ = writer_stop.changed() => break,
                sent = writer.text(text) => if sent.is_err() { return },
            }
        }
        let code = writer_stop.borrow().unwrap_or(CLOSE_NORMAL);
        let description = (code == CLOSE_TOO_SLOW).then(|| "client too slow".to_owned());
        let reason = CloseReason { code: CloseCode::from(code), description };
        // A client that does not read may never take the close frame either.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer.close(Some(reason))).await;
    });

    // Reader: hands text frames to the session, with backpressure.
    let text: Link<ClientText> = session.link("client");
    let gone: Link<Disconnected> = session.link("client");
    let mut control = ws;
    actix::spawn(async move {
        loop {
            let frame = tokio::select! {
                // The session is gone: drop our handle so the socket closes.
                _ = reader_stop.changed() => return,
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
    Ok(response)
}
