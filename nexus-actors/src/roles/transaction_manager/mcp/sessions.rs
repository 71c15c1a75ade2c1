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
//! This module owns which user each session is, the caps (sessions per
//! user and per node, subscriptions per session; a user's least recently
//! used session makes way for a new one, `nexus_mcp_sessions_evicted_total`), each session's
//! subscriptions (followed through the Redis bridge like a listen's, see
//! [`super::follow`]), and the end of a session: by `DELETE`, idleness,
//! its token ending, the node draining, or its client not reading, which is
//! dropped and counted (`nexus_mcp_sessions_too_slow_total`). It checks no
//! document's owner: `/mcp` does so before anything is subscribed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage, ServerNotification};
use rmcp::service::Peer;
use rmcp::transport::common::server_side_http::ServerSseMessage;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, LocalSessionWorker, SessionConfig,
};
use rmcp::transport::streamable_http_server::{SessionId, SessionManager};
use rmcp::transport::worker::WorkerTransport;
use rmcp::{ErrorData as McpError, RoleServer};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::follow::{merge, updated, Follow, Following, Update};
use super::subscriptions::{Credentials, Listens, SEND_WITHIN};
use crate::kernel::Kernel;
use crate::platform::drain::Drain;
use crate::platform::ApiError;
use crate::roles::transaction_manager::session::TOKEN_CHECK;

/// Sessions one user may hold on a node.
pub(super) const MAX_PER_USER: usize = 16;
/// Sessions a node holds.
pub(super) const MAX_PER_NODE: usize = 10_000;
/// Documents one session may subscribe to.
pub(super) const MAX_SUBSCRIPTIONS: usize = 256;
/// A session without a request or a notification for this long ends.
pub(super) const IDLE: Duration = Duration::from_secs(30 * 60);
/// Frames of a session's answer waiting for its client; when the client
/// takes none of them for [`SEND_WITHIN`], it does not read.
const RELAY_QUEUE: usize = 64;

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
    /// Sessions being created, by user: counted against the caps.
    pending: HashMap<String, usize>,
}

struct Entry {
    user: String,
    /// When the session's latest request came.
    last_used: Instant,
    /// The token of the session's latest request, checked while it follows documents.
    credentials: Option<Credentials>,
    subscribed: BTreeSet<String>,
    /// The session's follower, once it subscribed to something.
    follower: Option<mpsc::Sender<Command>>,
    /// Ends the follower with the session.
    ended: CancellationToken,
}

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
        config.keep_alive = Some(IDLE);
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
        let (stop, drain) = (inner.stop.clone(), drain.clone());
        tokio::spawn(async move {
            // Held here, the drain ends only when it is given.
            drain.started().await;
            stop.cancel();
        });
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

    /// Room for one more session of `user`, held until it is registered or
    /// dropped. A user at [`MAX_PER_USER`] loses the session they used
    /// least recently: clients seldom end theirs, and a new one is more
    /// likely wanted than the oldest (whose client, told 404, begins anew).
    pub(super) fn reserve(&self, user: &str) -> Result<Reservation, ApiError> {
        let evicted = {
            let mut table = self.inner.table();
            let total = table.sessions.len() + table.pending.values().sum::<usize>();
            let pending = table.pending.get(user).copied().unwrap_or(0);
            let mine = table.sessions.values().filter(|e| e.user == user).count() + pending;
            let mut evicted = None;
            if mine >= MAX_PER_USER {
                let oldest = table.sessions.iter().filter(|(_, e)| e.user == user).min_by_key(|(_, e)| e.last_used);
                let Some(oldest) = oldest.map(|(id, _)| id.clone()) else {
                    return Err(ApiError::Quota { what: "MCP sessions being created", limit: MAX_PER_USER });
                };
                if let Some(entry) = table.sessions.remove(&oldest) {
                    entry.ended.cancel();
                    self.inner.open.dec();
                }
                evicted = Some(oldest);
            } else if total >= MAX_PER_NODE {
                return Err(ApiError::Busy { retry_after: 5 });
            }
            *table.pending.entry(user.to_owned()).or_default() += 1;
            evicted
        };
        if let Some(id) = evicted {
            self.inner.evicted.inc();
            tracing::info!(user, session = %id, "nexus_mcp_sessions_evicted_total: a user's least recently used MCP session ended for a new one");
            self.inner.end(&id);
        }
        Ok(Reservation { sessions: self.clone(), user: user.to_owned() })
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
        let commands = {
            let mut table = self.inner.table();
            let entry = table.sessions.get_mut(id).filter(|e| e.user == user).ok_or_else(no_session)?;
            if !entry.subscribed.contains(doc) && entry.subscribed.len() >= MAX_SUBSCRIPTIONS {
                let message = format!("a session subscribes to at most {MAX_SUBSCRIPTIONS} documents");
                return Err(McpError::invalid_request(message, None));
            }
            entry.subscribed.insert(doc.to_owned());
            match &entry.follower {
                Some(commands) => commands.clone(),
                None => {
                    let (tx, rx) = mpsc::channel(8);
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
                    entry.follower = Some(tx.clone());
                    tx
                }
            }
        };
        let (reply, done) = oneshot::channel();
        commands.send(Command::Add(doc.to_owned(), reply)).await.map_err(|_| no_session())?;
        done.await.map_err(|_| no_session())?
    }

    /// Ends session `id`'s subscription to `doc`, if it has one.
    pub(super) async fn unsubscribe(&self, id: &str, user: &str, doc: &str) -> Result<(), McpError> {
        let commands = {
            let mut table = self.inner.table();
            let entry = table.sessions.get_mut(id).filter(|e| e.user == user).ok_or_else(no_session)?;
            if !entry.subscribed.remove(doc) {
                return Ok(());
            }
            entry.follower.clone()
        };
        if let Some(commands) = commands {
            let _ = commands.send(Command::Remove(doc.to_owned())).await;
        }
        Ok(())
    }

    /// Session `id`'s client left its answers unread: it is dropped and counted.
    pub(super) fn stalled(&self, id: &str) {
        self.inner.too_slow.inc();
        tracing::warn!(session = id, "nexus_mcp_sessions_too_slow_total: an MCP client stopped reading; session ended");
        self.inner.end(id);
    }

    /// `body`, an SSE answer of session `id`, relayed to its client through
    /// a short queue: a client that takes nothing from it for
    /// [`SEND_WITHIN`] no longer holds up the session, which is ended.
    pub(super) fn relay<S>(&self, id: String, body: S) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static
    where
        S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    {
        let sessions = self.clone();
        relay(body, SEND_WITHIN, move || sessions.stalled(&id))
    }
}

/// `body`'s frames through a queue of [`RELAY_QUEUE`]; when the consumer
/// takes none for `within`, `body` is given up and `stalled` called.
fn relay<S>(
    body: S,
    within: Duration,
    stalled: impl FnOnce() + Send + 'static,
) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static
where
    S: Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RELAY_QUEUE);
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.next().await {
            match tokio::time::timeout(within, tx.send(frame)).await {
                Ok(Ok(())) => {}
                // The client went away.
                Ok(Err(_)) => return,
                Err(_) => return stalled(),
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) })
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends session `id` (in the background: its worker may be busy).
    fn end(self: &Arc<Self>, id: &str) {
        let (inner, id): (Arc<Inner>, SessionId) = (self.clone(), id.into());
        tokio::spawn(async move {
            let sessions = Sessions { inner };
            if let Err(error) = sessions.close_session(&id).await {
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

fn no_session() -> McpError {
    McpError::invalid_request("the session has ended", None)
}

/// Room for one session being created.
pub(super) struct Reservation {
    sessions: Sessions,
    user: String,
}

impl Reservation {
    /// The session is `id`: it is `user`'s from now on.
    pub(super) fn register(self, id: &str, credentials: Option<Credentials>) {
        let entry = Entry {
            user: self.user.clone(),
            last_used: Instant::now(),
            credentials,
            subscribed: BTreeSet::new(),
            follower: None,
            ended: CancellationToken::new(),
        };
        self.sessions.inner.table().sessions.insert(id.to_owned(), entry);
        self.sessions.inner.open.inc();
        tracing::debug!(user = %self.user, session = id, "an MCP session began");
    }
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
/// stream, when one changes.
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
            tokio::select! {
                () = ended.cancelled() => return,
                command = self.commands.recv() => match command {
                    Some(Command::Add(doc, reply)) => {
                        let _ = reply.send(self.following.add(&doc).await);
                    }
                    Some(Command::Remove(doc)) => self.following.remove(&doc),
                    None => return,
                },
                update = self.updates.recv() => {
                    let Some(update) = update else { return };
                    if !self.announce(update).await {
                        return self.end();
                    }
                }
                _ = check.tick() => {
                    if !self.still_valid().await {
                        return self.end();
                    }
                }
            }
        }
    }

    /// Tells the client about `first` and whatever waits with it; false
    /// when the session is to end.
    async fn announce(&mut self, first: Update) -> bool {
        let mut changed = BTreeMap::new();
        merge(&mut changed, first, self.following.docs());
        while let Ok(next) = self.updates.try_recv() {
            merge(&mut changed, next, self.following.docs());
        }
        if self.following.overflowed() {
            if let Some(inner) = self.sessions.upgrade() {
                Sessions { inner }.stalled(&self.id);
            }
            return false;
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

    fn end(&self) {
        if let Some(inner) = self.sessions.upgrade() {
            inner.end(&self.id);
        }
    }
}

/// rmcp's local sessions, with each one's entry forgotten as it closes:
/// by `DELETE`, idleness, the drain, or [`Inner::end`].
impl SessionManager for Sessions {
    type Error = LocalSessionManagerError;
    type Transport = WorkerTransport<LocalSessionWorker>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.inner.local.create_session().await
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
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
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
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
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn frames() -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures::stream::repeat_with(|| Ok(Bytes::from_static(b": ping\n\n")))
    }

    #[tokio::test]
    async fn a_relay_gives_up_a_body_its_client_does_not_read() {
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let relayed = relay(frames(), Duration::from_millis(200), move || flag.store(true, Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(stalled.load(Ordering::Relaxed), "nobody took the frames");
        // What was queued is still delivered, then the relay ends.
        assert_eq!(relayed.count().await, RELAY_QUEUE);
    }

    #[tokio::test]
    async fn a_relay_passes_a_reading_clients_frames_and_ends_with_its_body() {
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let body = frames().take(RELAY_QUEUE * 4);
        let relayed = relay(body, Duration::from_millis(200), move || flag.store(true, Ordering::Relaxed));
        let mut relayed = std::pin::pin!(relayed);
        let mut seen = 0;
        while relayed.next().await.is_some() {
            seen += 1;
            if seen % RELAY_QUEUE == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert_eq!(seen, RELAY_QUEUE * 4);
        assert!(!stalled.load(Ordering::Relaxed));
    }
}
