//! Versioned documents and their presence lists, in Redis. Every change a
//! user saved is in Redis before the API answers, so nothing is lost when
//! a node restarts.
//!
//! Keys: `nexus:doc:{<id>}` (hash: owner, version, state),
//! `nexus:docs:<owner>` (set), `nexus:doc:{<id>}:log` (stream of applied
//! patches, entry id `<version>-1`, capped near [`HISTORY_LEN`]),
//! `nexus:presence:{<doc>}` (hash session → user) and
//! `nexus:presence-alive:<session>` (expiring marker).
//!
//! The store may be a Redis Cluster: no command or script spans two hash
//! slots. A document's keys share its id as their hash tag (`{<id>}`, the
//! tag its channel [`crate::platform::channels::document`] has too), so a patch is one
//! script on one shard and its announcement stays on that shard. What joins
//! a document to its owner's set takes two steps, each on its own slot:
//! creating writes the document before its id joins the set (within the
//! quota), deleting takes the id out of the set before the document goes.
//! A node that dies between the two leaves a document that no listing
//! shows and no quota counts, never an id that holds quota without a
//! document; ids like that (left by older nodes) are pruned when an owner
//! reaches their quota (at most hourly: `nexus:docs-pruned:<owner>`).
//! Documents older nodes wrote under untagged keys are moved by
//! [`Documents::adopt`] when a node starts.
//!
//! Bounds: a document's state is at most [`MAX_DOCUMENT`] bytes; its
//! history keeps about the last [`HISTORY_LEN`] changes (a client further
//! behind gets a snapshot); an owner holds at most their quota of
//! documents. This module checks versions and bounds; who may do what is
//! decided by the API.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::platform::{Redis, StoreError};

mod adopt;

/// Largest document state, encoded as JSON.
pub const MAX_DOCUMENT: usize = 1 << 20;

/// Changes kept per document, approximately (Redis trims whole nodes).
pub const HISTORY_LEN: usize = 10_000;

/// Seconds a session's presence outlives its last refresh.
pub const PRESENCE_TTL_SECS: u64 = 60;

/// Whether `id` has the shape of a document id (a UUID), so that garbage
/// such as `x:log` never reaches a Redis key.
pub fn is_document_id(id: &str) -> bool {
    // Only the form the platform writes: braced, URN and upper-case
    // spellings of one UUID would each name keys of their own.
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// A versioned JSON document. `version` starts at 1 and grows by one with
/// every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Document {
    /// A UUID, chosen by the platform.
    pub id: String,
    /// The user who owns it.
    pub owner: String,
    /// Grows by one with every change.
    pub version: u64,
    /// The document itself.
    pub state: Value,
}

/// One applied change, as kept in the document's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// The version this change made.
    pub version: u64,
    /// The JSON merge patch (RFC 7396) that produced `version`.
    pub patch: Value,
}

/// The outcome of a versioned write.
#[derive(Debug, PartialEq)]
pub enum Write {
    /// Saved; the document as it is now.
    Applied(Document),
    /// The document is at `current`, not at the version the writer saw.
    Stale {
        /// The version it is at.
        current: u64,
    },
    /// The document is gone.
    Missing,
    /// The patched state would be `bytes` long, over [`MAX_DOCUMENT`];
    /// nothing was written.
    TooLarge {
        /// Its encoded size.
        bytes: usize,
    },
}

/// Compare-and-set of a document: applies only at the expected version,
/// and appends the patch to the history under the id `{version}-1`. A log
/// written before ids were versions (larger ids) is replaced.
const PATCH_SCRIPT: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {2, 0} end
if v ~= ARGV[1] then return {1, tonumber(v)} end
local next = tonumber(v) + 1
redis.call('HSET', KEYS[1], 'version', next, 'state', ARGV[2])
local id = next .. '-1'
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id, 'version', next, 'patch', ARGV[3])
if type(added) == 'table' and added.err then
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id, 'version', next, 'patch', ARGV[3])
end
return {0, next}
";

/// Adds the id ARGV[1] to an owner's set unless they hold ARGV[2] already.
const RESERVE_SCRIPT: &str = r"
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

/// How often an owner's set of ids is checked for ids without a document.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

fn pruned_key(owner: &str) -> String {
    format!("nexus:docs-pruned:{owner}")
}
fn docs_key(owner: &str) -> String {
    format!("nexus:docs:{owner}")
}
fn doc_key(id: &str) -> String {
    format!("nexus:doc:{{{id}}}")
}
fn doc_log_key(id: &str) -> String {
    format!("nexus:doc:{{{id}}}:log")
}
fn presence_key(doc: &str) -> String {
    format!("nexus:presence:{{{doc}}}")
}
fn alive_key(session: &str) -> String {
    format!("nexus:presence-alive:{session}")
}

/// The outcome of creating a document.
#[derive(Debug, PartialEq)]
pub enum Created {
    /// Saved.
    Document(Document),
    /// The owner holds their quota of documents already.
    OverQuota,
    /// The state is larger than [`MAX_DOCUMENT`].
    TooLarge {
        /// Its encoded size.
        bytes: usize,
    },
}

/// The documents in Redis. Cheap to clone.
#[derive(Clone)]
pub struct Documents {
    redis: Redis,
}

impl Documents {
    /// Documents over an existing connection.
    pub fn new(redis: Redis) -> Self {
        Documents { redis }
    }

    /// Creates a document owned by `owner` unless they hold `max` already.
    pub async fn create(&self, id: &str, owner: &str, state: &Value, max: usize) -> Result<Created, StoreError> {
        let encoded = state.to_string();
        if encoded.len() > MAX_DOCUMENT {
            return Ok(Created::TooLarge { bytes: encoded.len() });
        }
        let () = redis::cmd("HSET")
            .arg(doc_key(id))
            .arg("owner")
            .arg(owner)
            .arg("version")
            .arg(1)
            .arg("state")
            .arg(encoded)
            .query_async(&mut self.redis.conn())
            .await?;
        let reserved = match self.reserve(id, owner, max).await {
            Ok(false) => match self.prune(owner).await {
                Ok(0) => Ok(false),
                Ok(_) => self.reserve(id, owner, max).await,
                Err(error) => Err(error),
            },
            reserved => reserved,
        };
        if !matches!(reserved, Ok(true)) {
            // If this fails too, the document is one no listing shows.
            let _: redis::RedisResult<()> = self.redis.conn().del(&[doc_key(id), doc_log_key(id)]).await;
        }
        Ok(match reserved? {
            true => Created::Document(Document {
                id: id.to_owned(),
                owner: owner.to_owned(),
                version: 1,
                state: state.clone(),
            }),
            false => Created::OverQuota,
        })
    }

    /// Adds `id` to `owner`'s set unless they hold `max` documents already.
    async fn reserve(&self, id: &str, owner: &str, max: usize) -> Result<bool, StoreError> {
        let reserved: i64 = redis::Script::new(RESERVE_SCRIPT)
            .key(docs_key(owner))
            .arg(id)
            .arg(max)
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(reserved == 1)
    }

    /// Removes from `owner`'s set the ids that have no document; returns
    /// how many. Safe while others create: an id joins the set only once
    /// its document is written. At most once per [`PRUNE_EVERY`] per
    /// owner: it reads every id of the set, and an owner at their quota
    /// could otherwise make each refused create cost that much.
    async fn prune(&self, owner: &str) -> Result<usize, StoreError> {
        let due: Option<String> = redis::cmd("SET")
            .arg(pruned_key(owner))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(PRUNE_EVERY.as_secs())
            .query_async(&mut self.redis.conn())
            .await?;
        if due.is_none() {
            return Ok(0);
        }
        let pruned = self.prune_now(owner).await;
        if pruned.is_err() {
            // Tried again at the next refusal, not in an hour.
            let _: redis::RedisResult<()> = self.redis.conn().del(pruned_key(owner)).await;
        }
        pruned
    }

    async fn prune_now(&self, owner: &str) -> Result<usize, StoreError> {
        let ids: Vec<String> = self.redis.read(|mut c| async move { c.smembers(docs_key(owner)).await }).await?;
        let mut pruned = 0;
        for id in ids {
            let exists: bool = self
                .redis
                .read(|mut c| {
                    let key = doc_key(&id);
                    async move { c.exists(key).await }
                })
                .await?;
            if !exists {
                let () = self.redis.conn().srem(docs_key(owner), &id).await?;
                tracing::info!(owner, document = %id, "an id without a document left its owner's set");
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// The document `id`, if there is one. An id that is not a UUID is
    /// never looked up.
    pub async fn get(&self, id: &str) -> Result<Option<Document>, StoreError> {
        if !is_document_id(id) {
            return Ok(None);
        }
        let (owner, version, state): (Option<String>, Option<u64>, Option<String>) = self
            .redis
            .read(|mut c| async move {
                redis::cmd("HMGET").arg(doc_key(id)).arg("owner").arg("version").arg("state").query_async(&mut c).await
            })
            .await?;
        let (Some(owner), Some(version), Some(state)) = (owner, version, state) else { return Ok(None) };
        let state = serde_json::from_str(&state).map_err(|e| StoreError::Corrupt(format!("document {id}: {e}")))?;
        Ok(Some(Document { id: id.to_owned(), owner, version, state }))
    }

    /// Document `id`'s version, without reading its state.
    pub async fn version(&self, id: &str) -> Result<Option<u64>, StoreError> {
        if !is_document_id(id) {
            return Ok(None);
        }
        self.redis.read(|mut c| async move { c.hget(doc_key(id), "version").await }).await
    }

    /// Who owns document `id`, without reading its state.
    pub async fn owner(&self, id: &str) -> Result<Option<String>, StoreError> {
        if !is_document_id(id) {
            return Ok(None);
        }
        self.redis.read(|mut c| async move { c.hget(doc_key(id), "owner").await }).await
    }

    /// The ids of `owner`'s documents, in order, without reading them: one
    /// command, however many there are (at most their quota). An id whose
    /// creation failed after it was reserved stays until the periodic
    /// pruning and is listed too; reading it finds nothing.
    pub async fn ids_of(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self.redis.read(|mut c| async move { c.smembers(docs_key(owner)).await }).await?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every document of `owner`, by id.
    pub async fn of(&self, owner: &str) -> Result<Vec<Document>, StoreError> {
        let ids: Vec<String> = self.redis.read(|mut c| async move { c.smembers(docs_key(owner)).await }).await?;
        let mut docs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(doc) = self.get(&id).await? {
                docs.push(doc);
            }
        }
        docs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(docs)
    }

    /// Applies `patch` to `doc` (as the caller read it) if the document is
    /// still at `expected` in Redis and stays within [`MAX_DOCUMENT`].
    pub async fn patch(&self, mut doc: Document, expected: u64, patch: &Value) -> Result<Write, StoreError> {
        let id = doc.id.clone();
        if doc.version != expected {
            return Ok(Write::Stale { current: doc.version });
        }
        merge_patch(&mut doc.state, patch);
        let state = doc.state.to_string();
        if state.len() > MAX_DOCUMENT {
            return Ok(Write::TooLarge { bytes: state.len() });
        }
        let (status, version): (u8, u64) = redis::Script::new(PATCH_SCRIPT)
            .key(doc_key(&id))
            .key(doc_log_key(&id))
            .arg(expected)
            .arg(state)
            .arg(patch.to_string())
            .arg(HISTORY_LEN)
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(match status {
            0 => Write::Applied(Document { version, ..doc }),
            1 => Write::Stale { current: version },
            _ => Write::Missing,
        })
    }

    /// At most `limit` changes after `since`, oldest first. The first one
    /// is not `since + 1` when the history no longer reaches back that far.
    pub async fn history(&self, id: &str, since: u64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let start = format!("{}-0", since.saturating_add(1));
        let reply: redis::streams::StreamRangeReply = self
            .redis
            .read(|mut c| {
                let start = start.clone();
                async move { c.xrange_count(doc_log_key(id), start, "+", limit).await }
            })
            .await?;
        let mut changes = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let version: Option<u64> = entry.get("version");
            let patch: Option<String> = entry.get("patch");
            let (Some(version), Some(patch)) = (version, patch) else { continue };
            if version > since {
                let patch =
                    serde_json::from_str(&patch).map_err(|e| StoreError::Corrupt(format!("history of {id}: {e}")))?;
                changes.push(Change { version, patch });
            }
        }
        Ok(changes)
    }

    /// Takes a document's id out of its owner's set, then deletes the
    /// document and its history.
    pub async fn delete(&self, doc: &Document) -> Result<(), StoreError> {
        let mut conn = self.redis.conn();
        let _: () = conn.srem(docs_key(&doc.owner), &doc.id).await?;
        let _: () = conn.del(&[doc_key(&doc.id), doc_log_key(&doc.id)]).await?;
        Ok(())
    }

    /// Adds a participant to a document's presence; returns everyone present.
    pub async fn presence_join(
        &self,
        doc: &str,
        session: &str,
        user: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        // Marked alive first: an entry without its marker counts as left.
        let mut conn = self.redis.conn();
        let _: () = conn.set_ex(alive_key(session), 1, PRESENCE_TTL_SECS).await?;
        let _: () = conn.hset(presence_key(doc), session, user).await?;
        self.present(&presence_key(doc)).await
    }

    /// Removes a participant; returns who is left.
    pub async fn presence_leave(&self, doc: &str, session: &str) -> Result<Vec<(String, String)>, StoreError> {
        let _: () = self.redis.conn().hdel(presence_key(doc), session).await?;
        self.present(&presence_key(doc)).await
    }

    /// Keeps a session's presence entries alive; a session refreshes this
    /// well within [`PRESENCE_TTL_SECS`].
    pub async fn presence_alive(&self, session: &str) -> Result<(), StoreError> {
        Ok(self.redis.conn().set_ex(alive_key(session), 1, PRESENCE_TTL_SECS).await?)
    }

    /// Everyone present at `key`; entries of sessions that stopped
    /// refreshing (their node died) are removed on the way.
    async fn present(&self, key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.redis.conn();
        let all: Vec<(String, String)> = c.hgetall(key).await?;
        if all.is_empty() {
            return Ok(all);
        }
        let alive: Vec<Option<u8>> = redis::cmd("MGET")
            .arg(all.iter().map(|(s, _)| alive_key(s)).collect::<Vec<_>>())
            .query_async(&mut c)
            .await?;
        let (live, dead): (Vec<_>, Vec<_>) = all.into_iter().zip(alive).partition(|(_, alive)| alive.is_some());
        if !dead.is_empty() {
            let sessions: Vec<String> = dead.into_iter().map(|((s, _), _)| s).collect();
            let _: () = c.hdel(key, sessions).await?;
        }
        Ok(live.into_iter().map(|(entry, _)| entry).collect())
    }
}

/// JSON Merge Patch (RFC 7396): objects merge key by key, `null` removes a
/// key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(target) = target else { return };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        super::merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        let mut doc = json!({"a": [1, 2]});
        super::merge_patch(&mut doc, &json!({"a": [3], "n": {"x": 1}}));
        assert_eq!(doc, json!({"a": [3], "n": {"x": 1}}));
        let mut doc = json!([1]);
        super::merge_patch(&mut doc, &json!("s"));
        assert_eq!(doc, json!("s"));
    }

    #[test]
    fn only_uuids_are_document_ids() {
        assert!(super::is_document_id("0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11"));
        assert!(!super::is_document_id("0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11:log"));
        assert!(!super::is_document_id("*"));
        assert!(!super::is_document_id("0190a5a47a3c7cc28a556f0b7f2b1c11"), "simple form");
    }
}
