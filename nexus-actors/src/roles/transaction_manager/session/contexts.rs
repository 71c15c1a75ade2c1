//! Following contexts for a session's client: the records the LLM manager
//! journals, as it publishes them on `nexus:context:{id}`.
//!
//! Following one goes in this order, so that a refused request leaves
//! nothing behind: the id is a UUID (the decoder refuses anything else),
//! the context exists and is the user's (or the user is an admin; anyone
//! else is told it does not exist), then the Redis subscription, then a
//! `context_followed` frame. Records come only after that frame; the client
//! then reads what it lacks from `GET /api/contexts/{id}/events?from=` and
//! drops duplicates by offset. Pub/sub is at-most-once, so after the bus
//! was down every followed context gets `context_followed` again.
//!
//! A session follows at most [`MAX_FOLLOWED_CONTEXTS`] contexts.

use std::collections::HashMap;

use super::Session;
use crate::bus::redis::{Subscribe, Topic, Unsubscribe};
use crate::bus::BusMessage;
use crate::kernel::{Ctx, Handler, Message, Reply, SendError};
use crate::platform::channels;
use crate::roles::transaction_manager::contexts::{ContextError, NO_CONTEXTS};
use crate::roles::transaction_manager::protocol::{ErrorCode, ServerFrame};
use crate::semantic::records::Journaled;

/// Contexts one session may follow at once.
pub const MAX_FOLLOWED_CONTEXTS: usize = 16;

/// The contexts a session follows.
#[derive(Debug, Default)]
pub(super) struct FollowedContexts {
    /// By id: which follow it is, and whether it is subscribed (checked and confirmed).
    followed: HashMap<String, (u64, bool)>,
    /// Follows started so far (numbers them).
    follows: u64,
}

/// What checking and subscribing `context` for follow `follow` came to.
struct ContextChecked {
    context: String,
    follow: u64,
    outcome: Result<(), ContextError>,
}

impl Message for ContextChecked {
    type Reply = ();
}

fn topic(context: &str) -> Topic {
    Topic::Channel(channels::context(context))
}

impl Session {
    /// Starts following `context`; when it is followed already, says so again.
    pub(super) fn follow_context(&mut self, context: String, ctx: &mut Ctx<Self>) {
        let Some(contexts) = self.state.contexts.clone() else {
            self.error(ErrorCode::Unavailable, NO_CONTEXTS, ctx);
            return;
        };
        if let Some(&(_, subscribed)) = self.contexts.followed.get(&context) {
            if subscribed {
                self.send(&ServerFrame::ContextFollowed { context }, ctx);
            }
            return;
        }
        if self.contexts.followed.len() >= MAX_FOLLOWED_CONTEXTS {
            let message = format!("a session follows at most {MAX_FOLLOWED_CONTEXTS} contexts; unfollow one first");
            self.error(ErrorCode::TooManyContexts, message, ctx);
            return;
        }
        let Some(me) = &self.me else { return };
        self.contexts.follows += 1;
        let follow = self.contexts.follows;
        self.contexts.followed.insert(context.clone(), (follow, false));
        let (user, admin) = (self.user.clone(), self.admin);
        let (bridge, unsubscribe, session) =
            (self.bus.subscribe.clone(), self.bus.unsubscribe.clone(), me.id().to_owned());
        let (told, subscriber) = (me.link::<ContextChecked>("store"), me.link("redis-bridge"));
        actix::spawn(async move {
            // Before any side effect: a refused request subscribes nothing.
            let outcome = contexts.visible(&context, &user, admin).await.map(|_| ());
            let subscribed = outcome.is_ok();
            if subscribed {
                let request = Subscribe { topic: topic(&context), subscriber };
                // A failed SUBSCRIBE means the connection is going down: the
                // bridge subscribes again on reconnection, and the BusUp after
                // the BusDown tells the client to catch up.
                if let Ok(Err(error)) = bridge.ask(request).await {
                    tracing::debug!(%context, %error, "subscription not confirmed; it resumes with the bus");
                }
            }
            if let Err(SendError::Closed(done)) = told.tell(ContextChecked { context, follow, outcome }) {
                // The session ended meanwhile: nobody unsubscribes for it but this task.
                if subscribed {
                    let _ = unsubscribe.tell(Unsubscribe { topic: topic(&done.context), subscriber: session });
                }
            }
        });
    }

    /// Stops following `context`.
    pub(super) fn unfollow_context(&mut self, context: &str) {
        if self.contexts.followed.remove(context).is_some() {
            self.unsubscribe_context(context);
        }
    }

    /// Stops following every context (the session ends).
    pub(super) fn unfollow_contexts(&mut self) {
        let followed: Vec<String> = self.contexts.followed.drain().map(|(context, _)| context).collect();
        for context in followed {
            self.unsubscribe_context(&context);
        }
    }

    fn unsubscribe_context(&self, context: &str) {
        if let Some(me) = &self.me {
            let _ = self.bus.unsubscribe.tell(Unsubscribe { topic: topic(context), subscriber: me.id().to_owned() });
        }
    }

    /// The bus is back after being down: what was published meanwhile is
    /// lost from pub/sub, so every followed context is caught up again.
    pub(super) fn contexts_resumed(&mut self, ctx: &mut Ctx<Self>) {
        let subscribed: Vec<String> =
            self.contexts.followed.iter().filter(|(_, (_, s))| *s).map(|(context, _)| context.clone()).collect();
        for context in subscribed {
            self.send(&ServerFrame::ContextFollowed { context }, ctx);
        }
    }

    /// A record published on a context's channel: forwarded if the context is followed and subscribed.
    pub(super) fn context_record(&mut self, m: &BusMessage, ctx: &mut Ctx<Self>) {
        let Ok(Journaled { context, offset, record }) = m.envelope.payload() else { return };
        let subscribed = self.contexts.followed.get(&context).is_some_and(|&(_, s)| s);
        if !subscribed || m.channel != channels::context(&context) {
            return;
        }
        let record = serde_json::to_value(record).unwrap_or_default();
        self.send(&ServerFrame::ContextRecord { context, offset, record }, ctx);
    }
}

impl Handler<ContextChecked> for Session {
    fn handle(&mut self, msg: ContextChecked, ctx: &mut Ctx<Self>) -> Reply<()> {
        let ContextChecked { context, follow, outcome } = msg;
        let Some(entry) = self.contexts.followed.get_mut(&context).filter(|(f, _)| *f == follow) else {
            // Unfollowed while the check ran, perhaps before its subscription
            // reached the bridge.
            if outcome.is_ok() && !self.contexts.followed.contains_key(&context) {
                self.unsubscribe_context(&context);
            }
            return Reply::Now(());
        };
        match outcome {
            Ok(()) => {
                entry.1 = true;
                self.send(&ServerFrame::ContextFollowed { context }, ctx);
            }
            Err(error) => {
                self.contexts.followed.remove(&context);
                let code = match &error {
                    ContextError::NotFound => ErrorCode::NotFound,
                    ContextError::Store(e) if e.is_unavailable() => ErrorCode::Unavailable,
                    _ => ErrorCode::Internal,
                };
                tracing::info!(%context, %error, user = %self.user, "not following a context");
                self.error(code, format_args!("context {context}: {error}"), ctx);
            }
        }
        Reply::Now(())
    }
}
