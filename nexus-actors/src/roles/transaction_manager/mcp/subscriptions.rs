//! `subscriptions/listen` (MCP 2026-07-28) on document resources: a caller
//! names up to [`MAX_URIS`] of their documents and gets
//! `notifications/resources/updated`, with the new version in `_meta`, each
//! time one changes through any node, until the request ends.
//!
//! Changes arrive the way WebSocket sessions get them: through the node's
//! Redis bridge, followed by a [`super::follow::Following`] per listen. Every URI's owner is checked
//! before anything is subscribed; someone else's document is refused like
//! a missing one. A client that stops reading its stream is dropped and
//! counted (`nexus_mcp_listens_too_slow_total`), never holding the bridge;
//! listens are capped per user and per node. A listen ends with its token
//! (checked again every [`TOKEN_CHECK`], as WebSocket sessions do) and with
//! the node's drain.
//!
//! This module owns listens. It reads no document's state: a notification
//! says only which document changed and to which version.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix::ArbiterHandle;
use rmcp::model::{ServerNotification, SubscriptionFilter};
use rmcp::service::{SubscriptionContext, SubscriptionSendError};
use rmcp::ErrorData as McpError;

use super::follow::{merge, updated, Follow};
use super::resources::{document_id, owned, unavailable};
use crate::bus::redis::RedisBus;
use crate::kernel::Kernel;
use crate::platform::auth::{Audience, Auth};
use crate::platform::drain::Drain;
use crate::roles::transaction_manager::documents::Documents;
use crate::roles::transaction_manager::session::TOKEN_CHECK;

/// Documents one listen may follow.
pub(super) const MAX_URIS: usize = 256;
/// Listens one user may hold open on a node.
pub(super) const MAX_PER_USER: usize = 16;
/// Listens a node holds open.
pub(super) const MAX_PER_NODE: usize = 10_000;
/// How often a listen's stream carries a ping, by which a client gone away
/// is noticed.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// How long a notification may wait for the client to take it.
pub(super) const SEND_WITHIN: Duration = Duration::from_secs(10);

/// The node's listens. Cheap to clone.
#[derive(Clone)]
pub struct Listens {
    follow: Follow,
    open: Arc<Mutex<HashMap<String, usize>>>,
    too_slow: prometheus::IntCounter,
    drain: Drain,
}

impl Listens {
    /// Listens of `kernel`'s node, through `bridge`, their listeners on
    /// `arbiter`, until `drain`.
    pub fn new(kernel: Kernel, bridge: &RedisBus, arbiter: ArbiterHandle, drain: Drain) -> Self {
        let too_slow = kernel.metrics().mcp_listens_too_slow.clone();
        Listens { follow: Follow::new(kernel, bridge, arbiter), open: Arc::default(), too_slow, drain }
    }

    /// What follows documents for this node's MCP sessions too.
    pub(super) fn follow(&self) -> &Follow {
        &self.follow
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
        let (mut following, mut rx) = self.follow.start("mcp-listen");
        for doc in seen.keys() {
            following.add(doc).await?;
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
                merge(&mut changed, first, following.docs());
            }
            // What waits is merged: one notification per document, at its latest version.
            while let Ok(next) = rx.try_recv() {
                merge(&mut changed, next, following.docs());
            }
            if following.overflowed() {
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
    pub(super) async fn still_valid(&self) -> Result<(), McpError> {
        let Err(error) = self.auth.verify(&self.token, &Audience::Api).await else { return Ok(()) };
        let Some(reason) = error.ended() else {
            tracing::debug!(%error, "a listen's token not checked; trying again later");
            return Ok(());
        };
        tracing::info!(user = %self.user, reason, "an MCP listen ended with its token");
        Err(McpError::invalid_request(format!("the listen ended: {reason}"), None))
    }
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
