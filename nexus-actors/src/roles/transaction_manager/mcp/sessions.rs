//! MCP sessions: what a client of 2025-11-25 or earlier gets when it
//! `initialize`s (`Mcp-Session-Id`), and the one place such a client can
//! `resources/subscribe` to its documents and hear
//! `notifications/resources/updated` on its stream (`GET /mcp`) when one
//! changes through any node.
//!
//! A session lives in the memory of the node that created it (rmcp's
//! [`LocalSessionManager`] underneath): behind a load balancer, requests
//! carrying `Mcp-Session-Id` go to that node (sticky routing); anywhere
//! else the session is unknown, answered 404, and the client starts a new
//! one, as MCP says it must. Requests without a session stay stateless
//! and go to any node; 2026-07-28 clients follow documents through
//! `subscriptions/listen` instead.
//!
//! This module owns which user each session is (noted as rmcp begins it,
//! before its handshake runs), the caps (sessions per user and per node,
//! subscriptions per session: a user's least recently used session makes
//! way for a new one, `nexus_mcp_sessions_evicted_total`), each session's
//! subscriptions (followed through the Redis bridge like a listen's, see
//! [`super::follow`]), and the end of a session: by `DELETE`, idleness,
//! its token ending, the node draining, or its client not reading, which
//! is dropped and counted (`nexus_mcp_sessions_too_slow_total`; see
//! [`super::relay`]). It checks no document's owner: `/mcp` does so
//! before anything is subscribed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, GetExtensions as _, RequestId, ServerJsonRpcMessage, ServerNotification};
use rmcp::service::Peer;
use rmcp::transport::common::server_side_http::ServerSseMessage;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, LocalSessionWorker, SessionConfig,
};
use rmcp::transport::streamable_http_server::{SessionId, SessionManager};
use rmcp::transport::worker::WorkerTransport;
use rmcp::{ErrorData as McpError, RoleServer};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::follow::{merge, updated, Follow, Following, Update};
use super::relay::{relay, End};
use super::subscriptions::{Credentials, Listens, SEND_WITHIN};
use super::McpUser;
use crate::kernel::Kernel;
use crate::platform::drain::Drain;
use crate::platform::ApiError;
use crate::roles::transaction_manager::session::TOKEN_CHECK;

/// Sessions one user may hold on a node.
pub(super) const MAX_PER_USER: usize = 16;
/// Sessions a node holds; past them, `initialize` is answered without one.
pub(super) const MAX_PER_NODE: usize = 10_000;
/// Documents one session may subscribe to.
pub(super) const MAX_SUBSCRIPTIONS: usize = 256;
/// A session without a request or a notification for this long ends.
pub(super) const IDLE: Duration = Duration::from_secs(30 * 60);
/// How often idle sessions, sessions rmcp ended unseen, or began unnoted,
/// are looked for.
const SWEEP: Duration = Duration::from_secs(60);
/// Subscription changes of one session waiting for its follower.
const COMMANDS: usize = 64;

/// The node's MCP sessions. Cheap to clone: every HTTP worker of the node
/// shares them.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    local: LocalSessionManager,
    table: Mutex<Table>,
    /// Where the node has a Redis bridge to follow documents through.
    follow: Option<Follow>,
    /// Ends every session when the node drains.
    stop: CancellationToken,
    too_slow: prometheus::IntCounter,
    evicted: prometheus::IntCounter,
    open: prometheus::IntGauge,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<String, Entry>,
    /// Sessions being begun, by user.
    pending: HashMap<String, usize>,
}

struct Entry {
    user: String,
    /// When the session was last used: a request, or a frame on one of its streams.
    last_used: Instant,
    /// The token of the session's latest request, checked while it follows documents.
    credentials: Option<Credentials>,
    subscribed: BTreeSet<String>,
    /// The session's follower, once it subscribed to something.
    follower: Option<mpsc::Sender<Command>>,
    /// Whether its own stream (`GET`) is open: rmcp sends notifications
    /// on the first one only (a second is a shadow that gets pings), so
    /// they go out only while that one is.
    streaming: bool,
    /// Answers to its requests being relayed now.
    answering: usize,
    /// Ends the follower with the session.
    ended: CancellationToken,
}

/// Marks a request rmcp routed through session `.0` (set by [`Sessions`]
/// as rmcp hands it on, so a request served statelessly never has one).
#[derive(Debug, Clone)]
pub(super) struct InSession(pub(super) String);

/// What a session's follower is asked to do.
enum Command {
    Add(String, oneshot::Sender<Result<(), McpError>>),
    Remove(String),
}

impl Sessions {
    /// The sessions of `kernel`'s node, following documents as `listens`
    /// do where there are any, all ended when `drain` starts.
    pub fn new(kernel: &Kernel, listens: Option<&Listens>, drain: &Drain) -> Self {
        let metrics = kernel.metrics();
        let mut config = SessionConfig::default();
        // Idleness is the sweep's to judge.
        config.keep_alive = None;
        let mut local = LocalSessionManager::default();
        local.session_config = config;
        let inner = Arc::new(Inner {
            local,
            table: Mutex::default(),
            follow: listens.map(|l| l.follow().clone()),
            stop: CancellationToken::new(),
            too_slow: metrics.mcp_sessions_too_slow.clone(),
            evicted: metrics.mcp_sessions_evicted.clone(),
            open: metrics.mcp_sessions.clone(),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner), drain.clone()));
        Sessions { inner }
    }

    /// What rmcp's endpoints end their sessions with.
    pub(super) fn stop_token(&self) -> CancellationToken {
        self.inner.stop.child_token()
    }

    /// Whether a node follows documents for its sessions.
    pub(super) fn can_follow(&self) -> bool {
        self.inner.follow.is_some()
    }

    /// Lets `user` use session `id`, whose request carries `credentials`.
    /// Someone else's session is unknown, like one that never was.
    pub(super) fn check(&self, id: &str, user: &str, credentials: Option<Credentials>) -> Result<(), ApiError> {
        let mut table = self.inner.table();
        match table.sessions.get_mut(id).filter(|entry| entry.user == user) {
            Some(entry) => {
                entry.last_used = Instant::now();
                if credentials.is_some() {
                    entry.credentials = credentials;
                }
                Ok(())
            }
            None => Err(ApiError::NotFound("session")),
        }
    }

    /// Room for `user` to begin a session, held until the `initialize`
    /// is answered; `None` when the node takes no more sessions (it is
    /// full or draining), and the `initialize` is served without one.
    pub(super) fn reserve(&self, user: &str) -> Result<Option<Reservation>, ApiError> {
        if self.inner.stop.is_cancelled() {
            return Ok(None);
        }
        let mut table = self.inner.table();
        let pending = table.pending.get(user).copied().unwrap_or(0);
        if pending >= MAX_PER_USER {
            return Err(ApiError::Quota { what: "MCP sessions being begun", limit: MAX_PER_USER });
        }
        if table.sessions.len() + table.pending.values().sum::<usize>() >= MAX_PER_NODE {
            return Ok(None);
        }
        table.pending.insert(user.to_owned(), pending + 1);
        Ok(Some(Reservation { sessions: self.clone(), user: user.to_owned() }))
    }

    /// Notes session `id` as `user`'s, before its handshake runs.
    fn note(&self, id: &str, user: &str, credentials: Option<Credentials>) {
        let entry = Entry {
            user: user.to_owned(),
            last_used: Instant::now(),
            credentials,
            subscribed: BTreeSet::new(),
            follower: None,
            streaming: false,
            answering: 0,
            ended: CancellationToken::new(),
        };
        if self.inner.table().sessions.insert(id.to_owned(), entry).is_none() {
            self.inner.open.inc();
        }
        tracing::debug!(user, session = id, "an MCP session began");
    }

    /// Once session `id` of `user` is begun: a user past [`MAX_PER_USER`]
    /// loses the session that is busy least (following nothing, streaming
    /// nothing, answering nothing) and was used least recently: clients
    /// seldom end theirs, and a new one is likelier wanted than the oldest,
    /// whose client, told 404, begins anew.
    fn make_way(&self, id: &str, user: &str) {
        let evicted = {
            let table = self.inner.table();
            let count = table.sessions.values().filter(|e| e.user == user).count();
            let mine = table.sessions.iter().filter(|(other, e)| e.user == user && other.as_str() != id);
            let busy = |e: &Entry| e.streaming || e.answering > 0 || !e.subscribed.is_empty();
            let oldest = mine.min_by_key(|(_, e)| (busy(e), e.last_used)).map(|(other, _)| other.clone());
            oldest.filter(|_| count > MAX_PER_USER)
        };
        if let Some(old) = evicted {
            self.inner.evicted.inc();
            tracing::info!(user, session = %old, "nexus_mcp_sessions_evicted_total: a user's MCP session ended for a new one");
            self.inner.end(&old);
        }
    }

    /// Subscribes session `id` of `user` to `doc` (checked to be theirs),
    /// its notifications going out through `peer`.
    pub(super) async fn subscribe(
        &self,
        id: &str,
        user: &str,
        doc: &str,
        peer: &Peer<RoleServer>,
    ) -> Result<(), McpError> {
        let Some(follow) = &self.inner.follow else {
            return Err(McpError::internal_error("this node follows no documents", None));
        };
        let (added, reply) = {
            let mut table = self.inner.table();
            let entry = table.sessions.get_mut(id).filter(|e| e.user == user).ok_or_else(no_session)?;
            if !entry.subscribed.contains(doc) && entry.subscribed.len() >= MAX_SUBSCRIPTIONS {
                let message = format!("a session subscribes to at most {MAX_SUBSCRIPTIONS} documents");
                return Err(McpError::invalid_request(message, None));
            }
            let commands = entry.follower.get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel(COMMANDS);
                let (following, updates) = follow.start("mcp-session");
                let follower = Follower {
                    sessions: Arc::downgrade(&self.inner),
                    id: id.to_owned(),
                    peer: peer.clone(),
                    following,
                    updates,
                    commands: rx,
                };
                tokio::spawn(follower.run(entry.ended.clone()));
                tx
            });
            // Sent under the lock: the follower takes a session's changes in the order the table took them.
            let (reply, done) = oneshot::channel();
            commands.try_send(Command::Add(doc.to_owned(), reply)).map_err(|_| busy())?;
            (entry.subscribed.insert(doc.to_owned()), done)
        };
        let outcome = reply.await.unwrap_or_else(|_| Err(no_session()));
        if outcome.is_err() && added {
            if let Some(entry) = self.inner.table().sessions.get_mut(id) {
                entry.subscribed.remove(doc);
            }
        }
        outcome
    }

    /// Ends session `id`'s subscription to `doc`, if it has one.
    pub(super) fn unsubscribe(&self, id: &str, user: &str, doc: &str) -> Result<(), McpError> {
        let mut table = self.inner.table();
        let entry = table.sessions.get_mut(id).filter(|e| e.user == user).ok_or_else(no_session)?;
        if !entry.subscribed.contains(doc) {
            return Ok(());
        }
        if let Some(commands) = &entry.follower {
            commands.try_send(Command::Remove(doc.to_owned())).map_err(|_| busy())?;
        }
        entry.subscribed.remove(doc);
        Ok(())
    }

    /// `body`, an SSE answer of session `id`, relayed to its client: the
    /// session's own stream when `own` (its `GET`), else the answer to
    /// `request`, which is cancelled if the client goes away first. A
    /// client that takes nothing for [`SEND_WITHIN`] has its session
    /// dropped and counted.
    pub(super) fn relay<S>(
        &self,
        id: String,
        own: bool,
        request: Option<RequestId>,
        body: S,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static
    where
        S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    {
        // The first of its own streams is the one rmcp sends notifications on.
        let main = self.inner.with_entry(&id, |entry| {
            if own {
                !std::mem::replace(&mut entry.streaming, true)
            } else {
                entry.answering += 1;
                false
            }
        });
        let main = main.unwrap_or(false);
        let (touching, ending) = (self.clone(), self.clone());
        let touched = id.clone();
        let on_frame = move || {
            touching.inner.with_entry(&touched, |entry| entry.last_used = Instant::now());
        };
        let on_end = move |end| {
            ending.inner.with_entry(&id, |entry| {
                if main {
                    entry.streaming = false;
                } else if !own {
                    entry.answering = entry.answering.saturating_sub(1);
                }
            });
            match (end, request.filter(|_| !own)) {
                (End::Stalled, _) => ending.stalled(&id),
                (End::ClientGone, Some(request)) => ending.cancel(id, request),
                _ => {}
            }
        };
        relay(body, SEND_WITHIN, on_frame, on_end)
    }

    /// Session `id`'s client left its answers unread: it is dropped and counted.
    fn stalled(&self, id: &str) {
        if self.inner.table().sessions.contains_key(id) {
            self.inner.too_slow.inc();
            tracing::warn!(
                session = id,
                "nexus_mcp_sessions_too_slow_total: an MCP client stopped reading; session ended"
            );
            self.inner.end(id);
        }
    }

    /// Tells session `id` its client cancelled `request`, as if it had
    /// said so: rmcp's sessions cancel a request only when told.
    fn cancel(&self, id: String, request: RequestId) {
        let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
            "params": {"requestId": request, "reason": "the client went away"}});
        let Ok(note) = serde_json::from_value::<ClientJsonRpcMessage>(note) else { return };
        let sessions = self.clone();
        tokio::spawn(async move {
            let _ = sessions.inner.local.accept_message(&SessionId::from(id), note).await;
        });
    }
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_entry<T>(&self, id: &str, change: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        self.table().sessions.get_mut(id).map(change)
    }

    /// Ends session `id` (in the background: its worker may be busy).
    fn end(self: &Arc<Self>, id: &str) {
        self.forget(id);
        let (inner, id): (Arc<Inner>, SessionId) = (self.clone(), id.into());
        tokio::spawn(async move {
            if let Err(error) = inner.local.close_session(&id).await {
                tracing::warn!(%error, "an MCP session did not close");
            }
        });
    }

    /// Forgets session `id`, ending its follower.
    fn forget(&self, id: &str) {
        if let Some(entry) = self.table().sessions.remove(id) {
            entry.ended.cancel();
            self.open.dec();
        }
    }
}

/// Ends every session when `drain` starts and, until then, every
/// [`SWEEP`], ends sessions unused for [`IDLE`] (a request, or a frame on
/// one of its streams, pings included: rmcp's own timer hears neither
/// frames nor pings), forgets sessions rmcp no longer has and ends those it
/// has that nobody noted (seen so twice: one may be between being begun
/// and being noted), so neither map outgrows the caps.
async fn sweep(sessions: Weak<Inner>, drain: Drain) {
    let drained = drain.started();
    tokio::pin!(drained);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + SWEEP, SWEEP);
    let mut suspects = HashSet::new();
    loop {
        tokio::select! {
            () = &mut drained => {
                if let Some(inner) = sessions.upgrade() {
                    inner.stop.cancel();
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let Some(inner) = sessions.upgrade() else { return };
        // Ours first: a session is noted only after rmcp has it, so what we
        // noted is rmcp's unless it ended.
        let (noted, idle): (HashSet<String>, Vec<String>) = {
            let table = inner.table();
            let idle = table.sessions.iter().filter(|(_, e)| e.last_used.elapsed() > IDLE);
            (table.sessions.keys().cloned().collect(), idle.map(|(id, _)| id.clone()).collect())
        };
        for id in idle {
            tracing::debug!(session = %id, "an idle MCP session ended");
            inner.end(&id);
        }
        let live: HashSet<String> = inner.local.sessions.read().await.keys().map(|id| id.to_string()).collect();
        for gone in noted.difference(&live) {
            inner.forget(gone);
        }
        let unnoted: HashSet<String> = live.difference(&noted).cloned().collect();
        for stray in unnoted.intersection(&suspects) {
            tracing::warn!(session = %stray, "an MCP session nobody noted; ended");
            inner.end(stray);
        }
        suspects = unnoted;
    }
}

fn no_session() -> McpError {
    McpError::invalid_request("the session has ended", None)
}

fn busy() -> McpError {
    McpError::invalid_request("too many subscription changes at once; try again", None)
}

/// Room for one session being begun.
pub(super) struct Reservation {
    sessions: Sessions,
    user: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut table = self.sessions.inner.table();
        if let Some(n) = table.pending.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                table.pending.remove(&self.user);
            }
        }
    }
}

/// Follows one session's documents and tells its client, on the session's
/// stream, when one changes. When it stops, for any reason but the
/// session's end, it ends the session: a session's subscriptions are
/// either followed or gone with it.
struct Follower {
    sessions: Weak<Inner>,
    id: String,
    peer: Peer<RoleServer>,
    following: Following,
    updates: mpsc::Receiver<Update>,
    commands: mpsc::Receiver<Command>,
}

impl Follower {
    async fn run(mut self, ended: CancellationToken) {
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + TOKEN_CHECK, TOKEN_CHECK);
        loop {
            let going_on = tokio::select! {
                () = ended.cancelled() => return,
                command = self.commands.recv() => match command {
                    Some(Command::Add(doc, reply)) => {
                        let _ = reply.send(self.following.add(&doc).await);
                        true
                    }
                    Some(Command::Remove(doc)) => {
                        self.following.remove(&doc);
                        true
                    }
                    None => false,
                },
                update = self.updates.recv() => match update {
                    Some(update) => self.announce(update).await,
                    None => false,
                },
                _ = check.tick() => self.still_valid().await,
            };
            if !going_on {
                if let Some(inner) = self.sessions.upgrade() {
                    inner.end(&self.id);
                }
                return;
            }
        }
    }

    /// Tells the client about `first` and whatever waits with it, if it
    /// holds its stream open (else a notification would be lost, and
    /// would keep an abandoned session alive); false when the session is
    /// to end.
    async fn announce(&mut self, first: Update) -> bool {
        let mut changed = BTreeMap::new();
        merge(&mut changed, first, self.following.docs());
        while let Ok(next) = self.updates.try_recv() {
            merge(&mut changed, next, self.following.docs());
        }
        let Some(inner) = self.sessions.upgrade() else { return false };
        if self.following.overflowed() {
            Sessions { inner }.stalled(&self.id);
            return false;
        }
        let streaming = inner.table().sessions.get(&self.id).is_some_and(|e| e.streaming);
        if !streaming {
            return true;
        }
        for (doc, version) in changed {
            let note = ServerNotification::ResourceUpdatedNotification(updated(&doc, version));
            // Bounded: a client that does not read is ended by its relay meanwhile.
            match tokio::time::timeout(2 * SEND_WITHIN, self.peer.send_notification(note)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, session = %self.id, "an MCP session's notification was not sent");
                    return false;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Whether the token of the session's latest request is still good.
    async fn still_valid(&self) -> bool {
        let Some(inner) = self.sessions.upgrade() else { return false };
        let credentials = inner.table().sessions.get(&self.id).and_then(|e| e.credentials.clone());
        match credentials {
            Some(credentials) => credentials.still_valid().await.is_ok(),
            None => true,
        }
    }
}

/// Marks `message` as routed through session `id`.
fn mark(message: &mut ClientJsonRpcMessage, id: &SessionId) {
    if let ClientJsonRpcMessage::Request(request) = message {
        request.request.extensions_mut().insert(InSession(id.to_string()));
    }
}

/// rmcp's local sessions, each noted as its user's as it begins, and
/// forgotten as it closes: by `DELETE`, idleness, the drain, or
/// [`Inner::end`].
impl SessionManager for Sessions {
    type Error = LocalSessionManagerError;
    type Transport = WorkerTransport<LocalSessionWorker>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.inner.local.create_session().await
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        mut message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        if let ClientJsonRpcMessage::Request(request) = &message {
            let parts = request.request.extensions().get::<http::request::Parts>();
            let user = parts.and_then(|p| p.extensions.get::<McpUser>()).map(|u| u.0.clone());
            let credentials = parts.and_then(|p| p.extensions.get::<Credentials>()).cloned();
            // Before the handshake runs: whatever happens next, the session is counted.
            match &user {
                Some(user) => self.note(id, user, credentials),
                None => tracing::warn!(session = %id, "an MCP session begun without a user; the sweep ends it"),
            }
            mark(&mut message, id);
            let answer = self.inner.local.initialize_session(id, message).await;
            match (&answer, user) {
                (Ok(_), Some(user)) => self.make_way(id, &user),
                (Err(_), _) => self.inner.forget(id),
                _ => {}
            }
            return answer;
        }
        mark(&mut message, id);
        self.inner.local.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.local.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.inner.forget(id);
        self.inner.local.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        mut message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        mark(&mut message, id);
        self.inner.local.create_stream(id, message).await
    }

    async fn accept_message(&self, id: &SessionId, message: ClientJsonRpcMessage) -> Result<(), Self::Error> {
        self.inner.local.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.local.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.local.resume(id, last_event_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(&Kernel::new("test"), None, &Drain::default())
    }

    #[actix_rt::test]
    async fn a_users_least_recently_used_idle_session_makes_way_and_no_one_elses() {
        let sessions = sessions();
        let begin = |id: &str, user: &str| {
            sessions.note(id, user, None);
            sessions.make_way(id, user);
        };
        begin("bob-1", "bob");
        for n in 0..MAX_PER_USER {
            begin(&format!("ada-{n}"), "ada");
        }
        // ada-0 is used again, ada-1 holds its stream open, ada-2 answers a
        // request: ada-3 is the one to go.
        sessions.check("ada-0", "ada", None).expect("hers");
        sessions.inner.with_entry("ada-1", |e| e.streaming = true);
        sessions.inner.with_entry("ada-2", |e| e.answering = 1);
        assert!(sessions.check("ada-0", "bob", None).is_err(), "not bob's");
        begin("ada-new", "ada");
        assert_eq!(sessions.inner.evicted.get(), 1);
        let table = sessions.inner.table();
        assert!(!table.sessions.contains_key("ada-3"), "the least recently used idle session");
        for kept in ["bob-1", "ada-0", "ada-1", "ada-2", "ada-4", "ada-new"] {
            assert!(table.sessions.contains_key(kept), "{kept}");
        }
        assert_eq!(table.sessions.values().filter(|e| e.user == "ada").count(), MAX_PER_USER);
    }

    #[actix_rt::test]
    async fn sessions_being_begun_are_capped_and_a_draining_node_begins_none() {
        let sessions = sessions();
        let held: Vec<_> =
            (0..MAX_PER_USER).map(|_| sessions.reserve("ada").expect("room").expect("a session")).collect();
        assert!(matches!(sessions.reserve("ada"), Err(ApiError::Quota { .. })));
        assert!(sessions.reserve("bob").expect("room").is_some(), "bob is not held to ada's");
        drop(held);
        assert!(!sessions.inner.table().pending.contains_key("ada"), "given back");
        assert!(sessions.reserve("ada").expect("room").is_some());
        sessions.inner.stop.cancel();
        assert!(sessions.reserve("ada").expect("no error").is_none(), "served without a session");
    }
}
