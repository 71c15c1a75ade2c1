//! `Session`: one actor per WebSocket connection of a logged-in user.
//!
//! It follows documents for its client and sends each document's changes
//! without gaps. Following one goes in this order, so that a refused
//! request leaves nothing behind and nothing published falls between:
//! the id is a UUID (the decoder refuses anything else), the document
//! exists and is the user's, the Redis subscription (through the node's
//! `RedisBridge`) is confirmed, then what the client lacks after the
//! version it says it has is fetched ([`sync`]: the changes from the
//! history, or a snapshot when it is far behind or the history was
//! trimmed). Any error ends the follow and unsubscribes; only an
//! unreachable Redis is retried, with a bounded backoff.
//!
//! A gap in what arrives live (pub/sub is at-most-once; a `BusDown` then
//! `BusUp`; a dropped message; a change announced without its patch because
//! it was too large) triggers the same catch-up, so the client always ends
//! with the server's state.
//!
//! It also follows the user's panels for the client (`subscribe_panels`):
//! panel record changes and the instance states the panel manager announces
//! on the same channel, each forwarded only to its owner. And it follows
//! LLM contexts (`follow_context`, see [`contexts`]): their records as the
//! LLM manager journals them, for the context's owner or an admin.
//!
//! Bounds: a session follows at most [`MAX_FOLLOWED`] documents and has at
//! most one fetch under way per document; a document's presence lists at
//! most [`MAX_PRESENT`] sessions. Frames go out through a bounded queue
//! ([`OUTBOUND_QUEUE`]); a client that stops reading until it is full is
//! disconnected with close code 4008, never stalling others. The session
//! re-checks its token every [`TOKEN_CHECK`] and after Redis comes back; a
//! revoked (logged out) or expired one closes the socket with 4001.

mod connection;
mod contexts;
mod frames;
mod outbound;
mod presence;
mod socket;
mod sync;

use std::collections::HashMap;
use std::time::Duration;

use actix::{ActorContext, AsyncContext};
use actix_web::web;
use bytestring::ByteString;

pub use self::connection::CLOSE_GRACE;
use self::contexts::FollowedContexts;
pub use self::contexts::MAX_FOLLOWED_CONTEXTS;
use self::frames::{ChangeFrames, EncodedChange};
use self::outbound::{FrameQueue, Refused};
pub use self::presence::{CursorMoved, PresenceChanged, MAX_PRESENT};
use self::socket::Closing;
pub use self::socket::{
    not_upgraded, upgrades, OpenSessions, SessionDeps, CLOSE_SERVICE_RESTART, CLOSE_TOKEN_ENDED, CLOSE_TOO_SLOW,
    MAX_SESSIONS, OUTBOUND_QUEUE,
};
use self::sync::{Fetched, SyncError};
use super::api::documents::DocumentChanged;
use super::api::TmState;
use super::documents::PRESENCE_TTL_SECS;
use super::protocol::{decode, ClientFrame, ErrorCode, ServerFrame};
use crate::bus::redis::{Publisher, Subscribe, Topic, Unsubscribe};
use crate::bus::{Bus, BusEvent};
use crate::envelope::Payload;
use crate::instance::InstanceChanged;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Link, Message, Reply, SendError};
use crate::platform::auth::Audience;
use crate::platform::channels::{self, panels as panels_channel};
use crate::platform::PanelChanged;
use crate::semantic::records::Journaled;

/// Documents one session may follow at once.
pub const MAX_FOLLOWED: usize = 256;
/// How often a session checks that its token still holds.
pub const TOKEN_CHECK: Duration = Duration::from_secs(15);
/// First pause before retrying a fetch that found Redis unreachable; it
/// doubles up to [`RETRY_MAX`], for at most [`RETRIES`] tries. Then the
/// next `BusUp` or announced change tries again.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
const RETRIES: u32 = 8;

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

/// What a fetch of `doc` from `since`, started for follow `follow`, found.
struct Synced {
    doc: String,
    follow: u64,
    since: Option<u64>,
    outcome: Result<Fetched, SyncError>,
}
impl Message for Synced {
    type Reply = ();
}

/// The session's token no longer holds, for this reason.
struct TokenEnded(&'static str);
impl Message for TokenEnded {
    type Reply = ();
}

/// The subscription to the user's panels is confirmed (or failed: it
/// resumes with the bus).
struct PanelsSubscribed;
impl Message for PanelsSubscribed {
    type Reply = ();
}

/// One followed document.
#[derive(Debug)]
struct Followed {
    /// Which follow of the document this is: news about an earlier one
    /// (unfollowed since) is recognised and dropped.
    follow: u64,
    /// The last version the client has.
    sent: Option<u64>,
    /// The Redis subscription is confirmed (the first fetch succeeded).
    subscribed: bool,
    /// A fetch (or its retry) is under way; changes wait for it.
    fetching: bool,
    /// Another fetch is wanted after the one under way.
    again: bool,
    /// The highest version announced while fetching.
    announced: u64,
    /// Fetches in a row that found Redis unreachable.
    failures: u32,
    /// The client takes part in presence and cursors.
    presence: bool,
    /// This session is in the document's presence.
    joined: bool,
}

/// The links a session uses to reach the bridge.
#[derive(Clone)]
struct BridgeLinks {
    subscribe: Link<Subscribe>,
    unsubscribe: Link<Unsubscribe>,
    publish: Publisher,
}

/// The actor behind one WebSocket connection.
pub struct Session {
    user: String,
    /// Whether the user is an admin (who may follow anyone's context).
    admin: bool,
    /// The token the connection was opened with, checked again and again.
    token: String,
    state: web::Data<TmState>,
    /// This session's links to the node's `RedisBridge`, made once: a link
    /// registers its graph edge when it is made.
    bus: BridgeLinks,
    out: FrameQueue,
    /// The node's shared change frames.
    frames: ChangeFrames,
    too_slow: prometheus::IntCounter,
    /// Followed documents, at most [`MAX_FOLLOWED`].
    docs: HashMap<String, Followed>,
    /// Follows started so far (numbers them).
    follows: u64,
    /// Whether the client follows its panel records.
    panels: bool,
    /// Followed contexts, at most [`MAX_FOLLOWED_CONTEXTS`].
    contexts: FollowedContexts,
    /// The buses (plain Redis, its cluster) that went down since their
    /// last `BusUp`: what was published there meanwhile is lost from pub/sub.
    buses_down: Vec<Bus>,
    me: Option<ActorRef<Session>>,
}

fn doc_topic(doc: &str) -> Topic {
    Topic::Shard(channels::document(doc))
}

impl Drop for Session {
    /// A session that stops without letting go (it failed, and its
    /// supervisor restarts it with nothing followed) ends its socket: the
    /// client reconnects and follows again, instead of waiting on changes
    /// that would never come.
    fn drop(&mut self) {
        self.out.close(Closing::INTERNAL);
    }
}

impl Session {
    fn send(&mut self, frame: &ServerFrame, ctx: &mut Ctx<Self>) {
        self.send_encoded(ByteString::from(frame.encode()), ctx);
    }

    /// Queues a frame already serialised (perhaps shared with other sessions).
    fn send_encoded(&mut self, frame: ByteString, ctx: &mut Ctx<Self>) {
        // A closed queue is a session that let go or a connection that is
        // gone (the reader tells the session): nothing to count.
        if let Err(Refused::Full) = self.out.push(frame) {
            self.too_slow.inc();
            tracing::warn!(user = %self.user, "nexus_sessions_too_slow_total: outbound queue full; disconnecting");
            self.leave(Closing::TOO_SLOW, ctx);
        }
    }

    fn error(&mut self, code: ErrorCode, message: impl std::fmt::Display, ctx: &mut Ctx<Self>) {
        self.send(&ServerFrame::Error { code, message: message.to_string() }, ctx);
    }

    /// Unsubscribes everything, closes the socket and stops.
    fn leave(&mut self, closing: Closing, ctx: &mut Ctx<Self>) {
        let docs: Vec<String> = self.docs.keys().cloned().collect();
        for doc in docs {
            self.unfollow(&doc);
        }
        self.unfollow_contexts();
        if let (true, Some(me)) = (self.panels, &self.me) {
            let topic = Topic::Channel(panels_channel(&self.user));
            let _ = self.bus.unsubscribe.tell(Unsubscribe { topic, subscriber: me.id().to_owned() });
        }
        // Frames waiting go now (a client that does not read may never take
        // them), and those sent after this (the rest of a catch-up) are not
        // queued.
        self.out.close(closing);
        ctx.stop();
    }

    /// Starts following `doc` from `version`, or, when it is followed
    /// already, catches the client up from `version` again.
    fn follow(&mut self, doc: String, version: Option<u64>, presence: bool, ctx: &mut Ctx<Self>) {
        if let Some(followed) = self.docs.get_mut(&doc) {
            followed.sent = version;
            let leave_presence = followed.joined && !presence;
            followed.presence = presence;
            followed.joined &= presence;
            if leave_presence {
                self.leave_presence(&doc);
            }
            self.request_sync(&doc);
            return;
        }
        if self.docs.len() >= MAX_FOLLOWED {
            let message = format!("a session follows at most {MAX_FOLLOWED} documents; unsubscribe from one first");
            self.error(ErrorCode::TooManyDocuments, message, ctx);
            return;
        }
        self.follows += 1;
        let followed = Followed {
            follow: self.follows,
            sent: version,
            subscribed: false,
            fetching: false,
            again: false,
            announced: 0,
            failures: 0,
            presence,
            joined: false,
        };
        self.docs.insert(doc.clone(), followed);
        self.request_sync(&doc);
    }

    /// Stops following `doc`: unsubscribes and leaves its presence.
    fn unfollow(&mut self, doc: &str) {
        let Some(followed) = self.docs.remove(doc) else { return };
        self.unsubscribe(doc);
        if followed.joined {
            self.leave_presence(doc);
        }
    }

    fn unsubscribe(&self, doc: &str) {
        if let Some(me) = &self.me {
            let _ = self.bus.unsubscribe.tell(Unsubscribe { topic: doc_topic(doc), subscriber: me.id().to_owned() });
        }
    }

    /// Catches the client up on `doc`: now, or after the fetch under way.
    fn request_sync(&mut self, doc: &str) {
        let Some(followed) = self.docs.get_mut(doc) else { return };
        if followed.fetching {
            followed.again = true;
            return;
        }
        followed.fetching = true;
        followed.failures = 0;
        self.start_fetch(doc);
    }

    /// Fetches what the client lacks of `doc` in a task (checking access
    /// and subscribing first if the subscription is not confirmed yet) and
    /// tells this session the outcome.
    fn start_fetch(&mut self, doc: &str) {
        let (Some(followed), Some(me)) = (self.docs.get_mut(doc), &self.me) else { return };
        followed.again = false;
        followed.announced = 0;
        let (follow, since, subscribe) = (followed.follow, followed.sent, !followed.subscribed);
        let (state, user, doc) = (self.state.clone(), self.user.clone(), doc.to_owned());
        let (bridge, unsubscribe, session) =
            (self.bus.subscribe.clone(), self.bus.unsubscribe.clone(), me.id().to_owned());
        let (told, subscriber) = (me.link::<Synced>("store"), me.link("redis-bridge"));
        actix::spawn(async move {
            let outcome = async {
                if subscribe {
                    // Before any side effect: a refused request subscribes nothing.
                    sync::check_access(&state.documents, &user, &doc).await?;
                    let request = Subscribe { topic: doc_topic(&doc), subscriber };
                    // A failed SUBSCRIBE means the connection is going down:
                    // the bridge subscribes the topic again on reconnection,
                    // and the BusUp after the BusDown brings a catch-up.
                    if let Ok(Err(error)) = bridge.ask(request).await {
                        tracing::debug!(%doc, %error, "subscription not confirmed; it resumes with the bus");
                    }
                }
                sync::fetch(&state.documents, &user, &doc, since).await
            }
            .await;
            let done = Synced { doc, follow, since, outcome };
            if let Err(SendError::Closed(done)) = told.tell(done) {
                // The session ended while this ran: nobody unsubscribes
                // for it but this task.
                if subscribe {
                    let _ = unsubscribe.tell(Unsubscribe { topic: doc_topic(&done.doc), subscriber: session });
                }
            }
        });
    }

    /// A change announced on a followed document's channel.
    fn changed(&mut self, change: &EncodedChange, ctx: &mut Ctx<Self>) {
        let Some(followed) = self.docs.get_mut(&change.doc) else { return };
        if followed.fetching {
            followed.announced = followed.announced.max(change.version);
            return;
        }
        let Some(sent) = followed.sent else { return };
        if change.version <= sent {
            return;
        }
        // A change too large to announce comes without its patch: the
        // history has it.
        if change.version == sent + 1 && change.has_patch {
            followed.sent = Some(change.version);
            self.send_encoded(change.frame.clone(), ctx);
        } else {
            self.request_sync(&change.doc);
        }
    }

    fn synced(&mut self, msg: Synced, ctx: &mut Ctx<Self>) {
        let Synced { doc, follow, since, outcome } = msg;
        let Some(followed) = self.docs.get_mut(&doc).filter(|f| f.follow == follow) else {
            // Unfollowed while the fetch ran, perhaps before its subscription
            // reached the bridge.
            if !self.docs.contains_key(&doc) {
                self.unsubscribe(&doc);
            }
            return;
        };
        if followed.sent != since {
            // The client said another version meanwhile.
            self.start_fetch(&doc);
            return;
        }
        match outcome {
            Ok(fetched) => {
                followed.subscribed = true;
                followed.failures = 0;
                followed.sent = Some(fetched.version);
                let join = followed.presence && !followed.joined;
                followed.joined |= join;
                let again = followed.again || followed.announced > fetched.version;
                followed.fetching = again;
                if again {
                    self.start_fetch(&doc);
                }
                if join {
                    self.join_presence(&doc, follow);
                }
                for frame in &fetched.frames {
                    self.send(frame, ctx);
                }
            }
            Err(error) if error.is_unavailable() && followed.failures < RETRIES => {
                followed.failures += 1;
                let delay = RETRY_FIRST.saturating_mul(1 << (followed.failures - 1)).min(RETRY_MAX);
                tracing::warn!(%doc, %error, attempt = followed.failures, "catch-up failed; retrying");
                ctx.run_later(delay, move |s, _| {
                    let this = s.behaviour_mut();
                    if this.docs.get(&doc).is_some_and(|f| f.follow == follow && f.fetching) {
                        this.start_fetch(&doc);
                    }
                });
            }
            Err(error) if error.is_unavailable() && followed.subscribed => {
                // Still following: the next BusUp or change tries again.
                followed.fetching = false;
                tracing::warn!(%doc, %error, "catch-up failed; waiting for Redis");
                self.error(error.code(), format_args!("{error}; resyncing when Redis is back"), ctx);
            }
            Err(error) => {
                // Final (or never subscribed): no retry loop on what will
                // fail again the same way.
                tracing::warn!(%doc, %error, user = %self.user, "not following a document");
                self.unfollow(&doc);
                self.error(error.code(), error, ctx);
            }
        }
    }

    /// Checks the token in a task; one that no longer holds ends the session.
    fn check_token(&self) {
        let Some(me) = &self.me else { return };
        let (auth, token, told) = (self.state.platform.auth.clone(), self.token.clone(), me.link("auth"));
        actix::spawn(async move {
            let Err(error) = auth.verify(&token, &Audience::Api).await else { return };
            let Some(reason) = error.ended() else {
                tracing::debug!(%error, "token not checked; trying again later");
                return;
            };
            let _ = told.tell(TokenEnded(reason));
        });
    }
}

impl Behaviour for Session {
    const KIND: &'static str = "session";
    const MAILBOX: usize = 256;

    fn started(&mut self, me: &ActorRef<Self>, ctx: &mut Ctx<Self>) {
        // Restarted after a failure (whose drop closed the socket), or its
        // connection already gone: nothing to serve.
        if self.out.is_closed() {
            ctx.stop();
            return;
        }
        self.me = Some(me.clone());
        self.send(&ServerFrame::Welcome { session: me.id().to_owned(), user: self.user.clone() }, ctx);
        // Presence entries of a session whose node dies expire; a live one
        // keeps refreshing them.
        let refresh = Duration::from_secs(PRESENCE_TTL_SECS / 3);
        ctx.run_interval(refresh, |s, _| {
            let this = s.behaviour_mut();
            if let (true, Some(me)) = (this.docs.values().any(|f| f.joined), &this.me) {
                let (state, session) = (this.state.clone(), me.id().to_owned());
                actix::spawn(async move {
                    let _ = state.documents.presence_alive(&session).await;
                });
            }
        });
        ctx.run_interval(TOKEN_CHECK, |s, _| s.behaviour_mut().check_token());
    }
}

impl Handler<ClientText> for Session {
    fn handle(&mut self, ClientText(text): ClientText, ctx: &mut Ctx<Self>) -> Reply<()> {
        match decode(&text) {
            Err(error) => self.error(error.code(), error, ctx),
            Ok(ClientFrame::Subscribe { doc, version, presence }) => self.follow(doc, version, presence, ctx),
            Ok(ClientFrame::Unsubscribe { doc }) => self.unfollow(&doc),
            Ok(ClientFrame::SubscribePanels) if self.panels => self.send(&ServerFrame::PanelsFollowed, ctx),
            Ok(ClientFrame::SubscribePanels) => {
                if let Some(me) = &self.me {
                    let topic = Topic::Channel(panels_channel(&self.user));
                    let (bridge, subscriber) = (self.bus.subscribe.clone(), me.link("redis-bridge"));
                    let told = me.link::<PanelsSubscribed>("redis-bridge");
                    actix::spawn(async move {
                        if let Ok(Err(error)) = bridge.ask(Subscribe { topic, subscriber }).await {
                            tracing::debug!(%error, "panels subscription not confirmed; it resumes with the bus");
                        }
                        let _ = told.tell(PanelsSubscribed);
                    });
                    self.panels = true;
                }
            }
            Ok(ClientFrame::Cursor { doc, position }) => self.cursor(doc, position, ctx),
            Ok(ClientFrame::FollowContext { context }) => self.follow_context(context, ctx),
            Ok(ClientFrame::UnfollowContext { context }) => self.unfollow_context(&context),
        }
        Reply::Now(())
    }
}

impl Handler<Synced> for Session {
    fn handle(&mut self, msg: Synced, ctx: &mut Ctx<Self>) -> Reply<()> {
        self.synced(msg, ctx);
        Reply::Now(())
    }
}

impl Handler<TokenEnded> for Session {
    fn handle(&mut self, TokenEnded(reason): TokenEnded, ctx: &mut Ctx<Self>) -> Reply<()> {
        tracing::info!(user = %self.user, reason, "closing a session whose token ended");
        self.leave(Closing::token_ended(reason), ctx);
        Reply::Now(())
    }
}

impl Handler<PanelsSubscribed> for Session {
    fn handle(&mut self, _: PanelsSubscribed, ctx: &mut Ctx<Self>) -> Reply<()> {
        self.send(&ServerFrame::PanelsFollowed, ctx);
        Reply::Now(())
    }
}

impl Handler<BusEvent> for Session {
    fn handle(&mut self, event: BusEvent, ctx: &mut Ctx<Self>) -> Reply<()> {
        match event {
            BusEvent::Message(m) => self.bus_message(&m, ctx),
            BusEvent::Up(up) if self.buses_down.contains(&up.bus) => {
                // Whatever was published while the bus was down is gone from
                // pub/sub; the history has it. (A BusUp without a BusDown
                // before it only confirms a new subscription.)
                self.buses_down.retain(|b| *b != up.bus);
                let docs: Vec<String> = self.docs.keys().cloned().collect();
                for doc in docs {
                    self.request_sync(&doc);
                }
                self.contexts_resumed(ctx);
                if self.panels {
                    self.send(&ServerFrame::PanelsFollowed, ctx);
                }
                self.check_token();
            }
            BusEvent::Up(_) => {}
            BusEvent::Down(down) => {
                if !self.buses_down.contains(&down.bus) {
                    self.buses_down.push(down.bus);
                }
            }
        }
        Reply::Now(())
    }
}

impl Session {
    fn bus_message(&mut self, m: &crate::bus::BusMessage, ctx: &mut Ctx<Self>) {
        match m.envelope.kind.as_str() {
            Journaled::TYPE => self.context_record(m, ctx),
            DocumentChanged::TYPE => {
                let Some(change) = self.frames.change(&m.envelope) else { return };
                self.changed(&change, ctx);
            }
            PresenceChanged::TYPE => {
                let Ok(PresenceChanged { doc, present }) = m.envelope.payload() else { return };
                if self.docs.get(&doc).is_some_and(|f| f.joined) {
                    self.send(&ServerFrame::Presence { doc, present }, ctx);
                }
            }
            PanelChanged::TYPE => {
                let Ok(change) = m.envelope.payload::<PanelChanged>() else { return };
                let owned = change.panel.as_ref().is_none_or(|p| p.owner == self.user);
                if self.panels && owned && m.channel == panels_channel(&self.user) {
                    let panel = change.panel.and_then(|p| serde_json::to_value(p).ok());
                    self.send(&ServerFrame::Panel { id: change.id, panel }, ctx);
                }
            }
            InstanceChanged::TYPE => {
                // Only panel managers publish these; a malformed one is
                // their bug, not a reason to drop this client.
                let change = match m.envelope.payload::<InstanceChanged>() {
                    Ok(change) => change,
                    Err(error) => {
                        tracing::warn!(channel = %m.channel, %error, "ignoring a malformed instance change");
                        return;
                    }
                };
                let owned = change.status.owner == self.user;
                if self.panels && owned && m.channel == panels_channel(&self.user) {
                    self.send(&ServerFrame::Instance { status: change.status }, ctx);
                }
            }
            CursorMoved::TYPE => {
                let Ok(CursorMoved { doc, session, user, position }) = m.envelope.payload() else { return };
                let mine = self.me.as_ref().is_some_and(|me| me.id() == session);
                if !mine && self.docs.get(&doc).is_some_and(|f| f.joined) {
                    self.send(&ServerFrame::Cursor { doc, session, user, position }, ctx);
                }
            }
            _ => {}
        }
    }
}

impl Handler<Disconnected> for Session {
    fn handle(&mut self, _: Disconnected, ctx: &mut Ctx<Self>) -> Reply<()> {
        self.leave(Closing::NORMAL, ctx);
        Reply::Now(())
    }
}
