//! Presence and cursors of a session: who follows a document with
//! presence (listed in Redis, at most [`MAX_PRESENT`] sessions a document),
//! and cursor moves, announced on the document's channel. A join that
//! races with the follow's end is undone; a failed one is retried by the
//! next catch-up.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Session;
use crate::bus::redis::Publisher;
use crate::envelope::{Envelope, Payload};
use crate::kernel::{Ctx, Handler, Message, Reply};
use crate::platform::channels;
use crate::roles::transaction_manager::api::TmState;
use crate::roles::transaction_manager::protocol::{ErrorCode, Participant};

/// Sessions a document's presence lists; more follow it without presence.
pub const MAX_PRESENT: usize = 64;

/// Announced on `nexus:doc:{id}` when someone starts or stops following it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceChanged {
    /// The document.
    pub doc: String,
    /// Everyone following it now.
    pub present: Vec<Participant>,
}

impl Payload for PresenceChanged {
    const TYPE: &'static str = "nexus.presence.changed";
}

/// Announced on `nexus:doc:{id}` when a participant's cursor moves.
#[derive(Debug, Serialize, Deserialize)]
pub struct CursorMoved {
    /// The document.
    pub doc: String,
    /// The participant's session.
    pub session: String,
    /// Its user.
    pub user: String,
    /// Where the cursor is.
    pub position: Value,
}

impl Payload for CursorMoved {
    const TYPE: &'static str = "nexus.cursor.moved";
}

/// What became of joining `doc`'s presence for follow `follow`.
struct PresenceJoined {
    doc: String,
    follow: u64,
    outcome: Joining,
}

impl Message for PresenceJoined {
    type Reply = ();
}

/// How a presence join ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joining {
    /// Listed, and everyone told.
    Joined,
    /// [`MAX_PRESENT`] others were there: left again at once.
    Full,
    /// Redis failed: not listed; the catch-up after Redis is back joins again.
    Failed,
}

impl Session {
    /// Adds this session to `doc`'s presence and tells everyone; a full
    /// presence is left again at once.
    pub(super) fn join_presence(&self, doc: &str, follow: u64) {
        let Some(me) = &self.me else { return };
        let (state, publish, told) = (self.state.clone(), self.bus.publish.clone(), me.link("store"));
        let (doc, session, user) = (doc.to_owned(), me.id().to_owned(), self.user.clone());
        actix::spawn(async move {
            let outcome = match state.documents.presence_join(&doc, &session, &user).await {
                Ok(present) if present.len() > MAX_PRESENT => {
                    let _ = state.documents.presence_leave(&doc, &session).await;
                    Joining::Full
                }
                Ok(present) => {
                    announce_presence(&state, &publish, doc.clone(), present);
                    Joining::Joined
                }
                Err(error) => {
                    tracing::debug!(%doc, %error, "presence not joined");
                    Joining::Failed
                }
            };
            let _ = told.tell(PresenceJoined { doc, follow, outcome });
        });
    }

    /// Removes this session from `doc`'s presence and tells everyone.
    pub(super) fn leave_presence(&self, doc: &str) {
        let Some(me) = &self.me else { return };
        let (state, publish, doc, session) =
            (self.state.clone(), self.bus.publish.clone(), doc.to_owned(), me.id().to_owned());
        actix::spawn(async move {
            if let Ok(present) = state.documents.presence_leave(&doc, &session).await {
                announce_presence(&state, &publish, doc, present);
            }
        });
    }

    /// Publishes an ephemeral event about `doc` (a cursor move) on its
    /// channel. When too many publishes wait for Redis the event is dropped
    /// (counted in `nexus_bus_errors_total{kind="publish_busy"}`): the next
    /// move supersedes it.
    fn announce<P: Payload>(&self, doc: &str, payload: P) {
        let envelope = Envelope::new(self.state.node.clone(), payload).into_untyped();
        self.bus.publish.publish_shard_detached(channels::document(doc), envelope);
    }

    /// Announces the client's cursor in `doc`, which it must follow with
    /// presence.
    pub(super) fn cursor(&mut self, doc: String, position: Value, ctx: &mut Ctx<Self>) {
        let (true, Some(me)) = (self.docs.get(&doc).is_some_and(|f| f.joined), &self.me) else {
            let message = format!("subscribe to {doc} with presence before moving a cursor in it");
            self.error(ErrorCode::NotFollowing, message, ctx);
            return;
        };
        let moved = CursorMoved { doc: doc.clone(), session: me.id().to_owned(), user: self.user.clone(), position };
        self.announce(&doc, moved);
    }
}

fn announce_presence(state: &TmState, publish: &Publisher, doc: String, present: Vec<(String, String)>) {
    let present = present.into_iter().map(|(session, user)| Participant { session, user }).collect();
    let envelope = Envelope::new(state.node.clone(), PresenceChanged { doc: doc.clone(), present }).into_untyped();
    publish.publish_shard_detached(channels::document(&doc), envelope);
}

impl Handler<PresenceJoined> for Session {
    fn handle(&mut self, msg: PresenceJoined, ctx: &mut Ctx<Self>) -> Reply<()> {
        let joined = self.docs.get(&msg.doc).is_some_and(|f| f.joined);
        let current = self.docs.get_mut(&msg.doc).filter(|f| f.follow == msg.follow && f.joined);
        match (current, msg.outcome) {
            (Some(followed), Joining::Full) => {
                followed.joined = false;
                followed.presence = false;
                let message = format!("{} has {MAX_PRESENT} participants already; following without presence", msg.doc);
                self.error(ErrorCode::PresenceFull, message, ctx);
            }
            (Some(followed), Joining::Failed) => followed.joined = false,
            // Unfollowed (or presence turned off) while joining: the leave
            // may have run before the join.
            (None, Joining::Joined) if !joined => self.leave_presence(&msg.doc),
            _ => {}
        }
        Reply::Now(())
    }
}
