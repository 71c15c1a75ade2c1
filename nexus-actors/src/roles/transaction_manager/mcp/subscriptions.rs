//! `subscriptions/listen` (MCP 2026-07-28) on document resources: a caller
//! names up to [`MAX_URIS`] of their documents and gets
//! `notifications/resources/updated`, with the new version in `_meta`, each
//! time one changes through any node, until the request ends.
//!
//! Changes arrive the way WebSocket sessions get them: a [`Listener`] actor
//! per listen subscribes each document's channel through the node's Redis
//! bridge, whose table is a node's one fan-out. Every URI's owner is checked
//! before anything is subscribed; someone else's document is refused like
//! a missing one. A client that stops reading its stream is dropped and
//! counted (`nexus_mcp_listens_too_slow_total`), never holding the bridge;
//! listens are capped per user and per node. A listen ends with its token
//! (checked again every [`TOKEN_CHECK`], as WebSocket sessions do) and with
//! the node's drain.
//!
//! This module owns listens. It reads no document's state: a notification
//! says only which document changed and to which version. The legacy
//! `resources/subscribe` needs MCP sessions, which the stateless `/mcp`
//! does not keep, and is not offered.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix::ArbiterHandle;
use rmcp::model::{
    MetaObject, NotificationMetaObject, ResourceUpdatedNotification, ResourceUpdatedNotificationParam,
    ServerNotification, SubscriptionFilter,
};
use rmcp::service::{SubscriptionContext, SubscriptionSendError};
use rmcp::ErrorData as McpError;
use serde::Deserialize as _;
use serde_json::json;
use tokio::sync::mpsc;

use super::resources::{document_id, owned, unavailable, PREFIX};
use crate::bus::redis::{RedisBus, Subscribe, Topic, Unsubscribe};
use crate::bus::BusEvent;
use crate::envelope::Payload;
use crate::kernel::{Behaviour, Ctx, Handler, Kernel, Link, Reply};
use crate::platform::auth::{Audience, Auth};
use crate::platform::channels;
use crate::platform::drain::Drain;
use crate::roles::transaction_manager::api::documents::DocumentChanged;
use crate::roles::transaction_manager::documents::Documents;
use crate::roles::transaction_manager::session::TOKEN_CHECK;

/// Documents one listen may follow.
pub(super) const MAX_URIS: usize = 256;
/// Listens one user may hold open on a node.
pub(super) const MAX_PER_USER: usize = 16;
/// Listens a node holds open.
pub(super) const MAX_PER_NODE: usize = 10_000;
/// Changes waiting for a listen's client; more means it does not read.
/// As large as the listener's mailbox: a reading client is never judged
/// by a burst, only by [`SEND_WITHIN`].
const QUEUE: usize = 1024;
/// How often a listen's stream carries a ping, by which a client gone away
/// is noticed.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// How long a notification may wait for the client to take it.
pub(super) const SEND_WITHIN: Duration = Duration::from_secs(10);

/// The node's listens. Cheap to clone.
#[derive(Clone)]
pub struct Listens {
    kernel: Kernel,
    /// Where listeners run: a listen itself runs on rmcp's task, outside
    /// any actix arbiter.
    arbiter: ArbiterHandle,
    subscribe: Link<Subscribe>,
    unsubscribe: Link<Unsubscribe>,
    open: Arc<Mutex<HashMap<String, usize>>>,
    too_slow: prometheus::IntCounter,
    drain: Drain,
}

impl Listens {
    /// Listens of `kernel`'s node, through `bridge`, their listeners on
    /// `arbiter`, until `drain`.
    pub fn new(kernel: Kernel, bridge: &RedisBus, arbiter: ArbiterHandle, drain: Drain) -> Self {
        let too_slow = kernel.metrics().mcp_listens_too_slow.clone();
        Listens {
            arbiter,
            drain,
            subscribe: bridge.link("mcp"),
            unsubscribe: bridge.link("mcp"),
            kernel,
            open: Arc::default(),
            too_slow,
        }
    }

    /// The document URIs of `requested` this server follows, deduplicated
    /// (a listen of more than [`MAX_URIS`] is refused once it runs);
    /// nothing else (no list changes).
    pub(super) fn accepted(requested: &SubscriptionFilter) -> SubscriptionFilter {
        let mut uris: Vec<String> = requested
            .resource_subscriptions
            .iter()
            .flatten()
            .filter(|uri| document_id(uri).is_some())
            .cloned()
            .collect();
        uris.sort_unstable();
        uris.dedup();
        let mut filter = SubscriptionFilter::new();
        filter.resource_subscriptions = Some(uris);
        filter
    }

    /// Runs one listen for `caller` until its request ends, its client
    /// stops reading, its token ends, or the node drains.
    pub(super) async fn listen(
        &self,
        caller: &Credentials,
        documents: &Documents,
        context: SubscriptionContext,
    ) -> Result<(), McpError> {
        let user = caller.user.as_str();
        let mut uris = context.accepted().resource_subscriptions.clone().unwrap_or_default();
        // rmcp keeps the client's repeats: a document is followed once.
        uris.sort_unstable();
        uris.dedup();
        if uris.is_empty() || uris.len() > MAX_URIS {
            let message = format!("a listen follows 1 to {MAX_URIS} of your documents (nexus://documents/{{id}})");
            return Err(McpError::invalid_params(message, None));
        }
        // Before any side effect: every URI is the caller's. The versions
        // seen now tell what changed before the subscriptions were live.
        let mut seen = BTreeMap::new();
        for uri in &uris {
            let doc = owned(documents, user, uri).await?;
            seen.insert(doc.to_owned(), documents.version(doc).await.map_err(unavailable)?.unwrap_or(0));
        }
        let _slot = self.admit(user)?;
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = format!("mcp-listen-{}", uuid::Uuid::now_v7());
        let listener = {
            let (tx, overflowed) = (tx.clone(), overflowed.clone());
            let listener = move || Listener { updates: tx.clone(), overflowed: overflowed.clone(), down: false };
            self.kernel.spawn_on(&self.arbiter, id.clone(), listener)
        };
        drop(tx);
        let mut following = Following { listens: self, listener: id, docs: Vec::new(), stop: listener.clone() };
        for doc in seen.keys() {
            // Noted first: a subscription the bridge took is given up however this ends.
            following.docs.push(doc.clone());
            let request = Subscribe { topic: topic(doc), subscriber: listener.link("redis-bridge") };
            match self.subscribe.ask(request).await {
                Ok(Ok(())) => {}
                // The bridge subscribes it again when Redis is back, and the
                // `Up` that follows its `Down` announces every document.
                Ok(Err(error)) => tracing::debug!(%doc, %error, "listen's subscription not confirmed yet"),
                Err(_) => return Err(McpError::internal_error("the node is stopping", None)),
            }
        }
        let mut changed = BTreeMap::new();
        for (doc, before) in seen {
            let now = documents.version(&doc).await.map_err(unavailable)?.unwrap_or(0);
            if now > before {
                changed.insert(doc, now);
            }
        }
        let sink = context.sink().clone();
        let drained = self.drain.started();
        tokio::pin!(drained);
        let mut check = tokio::time::interval_at(tokio::time::Instant::now() + TOKEN_CHECK, TOKEN_CHECK);
        loop {
            if changed.is_empty() {
                let first = tokio::select! {
                    update = rx.recv() => update,
                    () = context.cancelled() => return Ok(()),
                    // Ended: the client goes on through another node.
                    () = &mut drained => return Ok(()),
                    _ = check.tick() => {
                        caller.still_valid().await?;
                        continue;
                    }
                };
                let Some(first) = first else { return Ok(()) };
                merge(&mut changed, first, &following.docs);
            }
            // What waits is merged: one notification per document, at its latest version.
            while let Ok(next) = rx.try_recv() {
                merge(&mut changed, next, &following.docs);
            }
            if overflowed.load(Ordering::Relaxed) {
                return Err(self.dropped(user));
            }
            for (doc, version) in std::mem::take(&mut changed) {
                let sent = sink.send(ServerNotification::ResourceUpdatedNotification(updated(&doc, version)));
                match tokio::time::timeout(SEND_WITHIN, sent).await {
                    Ok(Ok(())) => {}
                    // The client's request ended meanwhile.
                    Ok(Err(SubscriptionSendError::SubscriptionClosed)) => return Ok(()),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "a listen's notification was refused");
                        return Err(McpError::internal_error(error.to_string(), None));
                    }
                    Err(_) => return Err(self.dropped(user)),
                }
            }
        }
    }

    /// A place for one more listen of `user`, given back when dropped.
    fn admit(&self, user: &str) -> Result<Slot<'_>, McpError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.get(user).copied().unwrap_or(0);
        if mine >= MAX_PER_USER || total >= MAX_PER_NODE {
            let message = format!("too many listens open (at most {MAX_PER_USER} a user, {MAX_PER_NODE} a node)");
            return Err(McpError::invalid_request(message, None));
        }
        open.insert(user.to_owned(), mine + 1);
        Ok(Slot { open: &self.open, user: user.to_owned() })
    }

    fn dropped(&self, user: &str) -> McpError {
        self.too_slow.inc();
        tracing::warn!(user, "nexus_mcp_listens_too_slow_total: a listen's client stopped reading; dropped");
        McpError::internal_error("the client did not read its notifications in time", None)
    }
}

/// Adds `update` to what is to be announced.
fn merge(changed: &mut BTreeMap<String, u64>, update: Update, followed: &[String]) {
    match update {
        Update::Changed { doc, version } => {
            let at = changed.entry(doc).or_insert(version);
            *at = (*at).max(version);
        }
        // Changes may have been missed while the bus was down: each document
        // is announced, at the version known if one came since, else without.
        Update::Resync => {
            for doc in followed {
                changed.entry(doc.clone()).or_insert(0);
            }
        }
    }
}

/// `notifications/resources/updated` for `doc`, with `version` in `_meta`
/// when it is known (not zero).
fn updated(doc: &str, version: u64) -> ResourceUpdatedNotification {
    let mut notification =
        ResourceUpdatedNotification::new(ResourceUpdatedNotificationParam::new(format!("{PREFIX}{doc}")));
    if version > 0 {
        let mut meta = MetaObject::default();
        meta.0.insert("version".into(), json!(version));
        // In the extensions: the sink adds the subscription id there.
        notification.extensions.insert(NotificationMetaObject(meta));
    }
    notification
}

/// Who is listening: checked again every [`TOKEN_CHECK`], as WebSocket
/// sessions are, so a listen ends with its token (logout, revocation,
/// expiry, the user's removal).
#[derive(Clone)]
pub(super) struct Credentials {
    pub(super) user: String,
    pub(super) token: String,
    pub(super) auth: Auth,
}

impl Credentials {
    async fn still_valid(&self) -> Result<(), McpError> {
        let Err(error) = self.auth.verify(&self.token, &Audience::Api).await else { return Ok(()) };
        let Some(reason) = error.ended() else {
            tracing::debug!(%error, "a listen's token not checked; trying again later");
            return Ok(());
        };
        tracing::info!(user = %self.user, reason, "an MCP listen ended with its token");
        Err(McpError::invalid_request(format!("the listen ended: {reason}"), None))
    }
}

fn topic(doc: &str) -> Topic {
    Topic::Shard(channels::document(doc))
}

/// One open listen of a user, counted while it lives.
struct Slot<'a> {
    open: &'a Mutex<HashMap<String, usize>>,
    user: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// The subscriptions of one listen, given up however it ends.
struct Following<'a> {
    listens: &'a Listens,
    listener: String,
    docs: Vec<String>,
    stop: crate::kernel::ActorRef<Listener>,
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        for doc in &self.docs {
            let unsubscribe = Unsubscribe { topic: topic(doc), subscriber: self.listener.clone() };
            let _ = self.listens.unsubscribe.tell(unsubscribe);
        }
        self.stop.stop();
    }
}

/// What a listen's client is told about.
#[derive(Debug)]
enum Update {
    Changed { doc: String, version: u64 },
    Resync,
}

/// Receives a listen's document changes from the Redis bridge.
struct Listener {
    updates: mpsc::Sender<Update>,
    overflowed: Arc<AtomicBool>,
    /// The bus went down since the last `Up`.
    down: bool,
}

impl Behaviour for Listener {
    const KIND: &'static str = "mcp_listener";
}

impl Handler<BusEvent> for Listener {
    fn handle(&mut self, event: BusEvent, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let update = match event {
            BusEvent::Message(message) if message.envelope.kind == DocumentChanged::TYPE => {
                let Ok(change) = DocumentChanged::deserialize(&message.envelope.data) else { return Reply::Now(()) };
                Update::Changed { doc: change.id, version: change.version }
            }
            BusEvent::Down(_) => {
                self.down = true;
                return Reply::Now(());
            }
            // Only an `Up` after a `Down` may have missed changes (the bridge
            // also confirms a new subscription with one).
            BusEvent::Up(_) if std::mem::take(&mut self.down) => Update::Resync,
            _ => return Reply::Now(()),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.updates.try_send(update) {
            self.overflowed.store(true, Ordering::Relaxed);
        }
        Reply::Now(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDown, BusMessage, BusUp};
    use crate::envelope::Envelope;

    fn change(doc: &str, version: u64) -> BusEvent {
        let changed = DocumentChanged { id: doc.into(), version, patch: json!({"n": version}) };
        let envelope = Envelope::new("test", changed).into_untyped();
        BusEvent::Message(Arc::new(BusMessage { channel: channels::document(doc), pattern: None, envelope }))
    }

    async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an update in time").expect("open")
    }

    #[actix_rt::test]
    async fn a_listener_passes_changes_resyncs_after_an_outage_and_notes_a_client_that_does_not_read() {
        let kernel = Kernel::new("test");
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = overflowed.clone();
        let listener =
            kernel.spawn("listener", move || Listener { updates: tx.clone(), overflowed: flag.clone(), down: false });
        let bus = listener.link::<BusEvent>("test");

        // The bridge confirms a subscription with an `Up`: nothing to resync.
        bus.tell(BusEvent::Up(BusUp { bus: Bus::Redis })).expect("told");
        bus.tell(change("d", 2)).expect("told");
        assert!(matches!(next(&mut rx).await, Update::Changed { doc, version: 2 } if doc == "d"));
        let down = BusDown { bus: Bus::Redis, reason: "test".into() };
        bus.tell(BusEvent::Down(down)).expect("told");
        bus.tell(BusEvent::Up(BusUp { bus: Bus::Redis })).expect("told");
        assert!(matches!(next(&mut rx).await, Update::Resync));
        assert!(rx.try_recv().is_err(), "one resync");

        // Nobody reads: past the queue, the listen is marked for dropping.
        for version in 0..QUEUE as u64 {
            bus.tell(change("d", version)).expect("told");
            if version % 100 == 0 {
                // The mailbox is bounded too: let the listener keep up.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!overflowed.load(Ordering::Relaxed), "a full queue is not yet an overflow");
        bus.tell(change("d", 99)).expect("told");
        raised(&overflowed).await;
    }

    /// Waits (up to 5 s) until `flag` is raised.
    async fn raised(flag: &AtomicBool) {
        for _ in 0..100 {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the overflow was not noted");
    }
}
