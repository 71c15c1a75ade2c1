//! Durable state of the transaction manager, in Redis: users, panel
//! records and versioned documents. Every change a user saved is in Redis
//! before the API answers, so nothing is lost when a node restarts.
//!
//! Keys: `nexus:user:{name}` (hash), `nexus:panel:{id}` (JSON),
//! `nexus:panels:{owner}` (set), `nexus:doc:{id}` (hash: owner, version,
//! state), `nexus:docs:{owner}` (set), `nexus:doc:{id}:log` (stream of
//! applied patches, for history). This module checks versions; it does not
//! check who may do what (see `api.rs`).

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Where a panel runs: developed in Studio, or deployed as an App.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PanelMode {
    Studio,
    App,
}

/// A panel record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Panel {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub mode: PanelMode,
    /// Where the panel's code lives (a path or URL).
    pub source: String,
}

/// A versioned JSON document. `version` starts at 1 and grows by one with
/// every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Document {
    pub id: String,
    pub owner: String,
    pub version: u64,
    pub state: Value,
}

/// One applied change, as kept in the document's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    pub version: u64,
    /// The JSON merge patch (RFC 7396) that produced `version`.
    pub patch: Value,
}

/// The outcome of a versioned write.
#[derive(Debug, PartialEq)]
pub enum Write {
    Applied(Document),
    /// The document is at `current`, not at the version the writer saw.
    Stale {
        current: u64,
    },
    Missing,
}

/// Compare-and-set of a document: applies only at the expected version.
const PATCH_SCRIPT: &str = r"
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {2, 0} end
if v ~= ARGV[1] then return {1, tonumber(v)} end
local next = tonumber(v) + 1
redis.call('HSET', KEYS[1], 'version', next, 'state', ARGV[2])
redis.call('XADD', KEYS[2], '*', 'version', next, 'patch', ARGV[3])
return {0, next}
";

#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
}

fn user_key(name: &str) -> String {
    format!("nexus:user:{name}")
}
fn panel_key(id: &str) -> String {
    format!("nexus:panel:{id}")
}
fn panels_key(owner: &str) -> String {
    format!("nexus:panels:{owner}")
}
fn docs_key(owner: &str) -> String {
    format!("nexus:docs:{owner}")
}
fn doc_key(id: &str) -> String {
    format!("nexus:doc:{id}")
}
fn doc_log_key(id: &str) -> String {
    format!("nexus:doc:{id}:log")
}

impl Store {
    /// Runs a read, once more if the connection had dropped: the connection
    /// manager reports a dead connection once, then reconnects.
    async fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match f(self.conn.clone()).await {
            Err(e) if e.is_io_error() || e.is_connection_dropped() => Ok(f(self.conn.clone()).await?),
            result => Ok(result?),
        }
    }

    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        Ok(Store { conn: client.get_connection_manager().await? })
    }

    /// Creates a user unless the name is taken; false when it is.
    pub async fn create_user(&self, name: &str, password_hash: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.hset_nx(user_key(name), "password_hash", password_hash).await?)
    }

    /// Creates a user or sets its password.
    pub async fn set_user(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        Ok(c.hset(user_key(name), "password_hash", password_hash).await?)
    }

    pub async fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.read(|mut c| async move { c.hget(user_key(name), "password_hash").await }).await
    }

    /// The shared token-signing secret: the first node to ask creates it.
    pub async fn signing_secret(&self) -> Result<Vec<u8>, StoreError> {
        let mut c = self.conn.clone();
        let fresh: [u8; 32] = rand::random();
        let _: bool = c.set_nx("nexus:jwt-secret", fresh.as_slice()).await?;
        Ok(c.get("nexus:jwt-secret").await?)
    }

    pub async fn put_panel(&self, panel: &Panel) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(panel).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        redis::pipe()
            .atomic()
            .set(panel_key(&panel.id), json)
            .sadd(panels_key(&panel.owner), &panel.id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    pub async fn panel(&self, id: &str) -> Result<Option<Panel>, StoreError> {
        let json: Option<String> = self.read(|mut c| async move { c.get(panel_key(id)).await }).await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(format!("panel {id}: {e}")))).transpose()
    }

    pub async fn panels_of(&self, owner: &str) -> Result<Vec<Panel>, StoreError> {
        let ids: Vec<String> = self.read(|mut c| async move { c.smembers(panels_key(owner)).await }).await?;
        let mut panels = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(panel) = self.panel(&id).await? {
                panels.push(panel);
            }
        }
        panels.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(panels)
    }

    pub async fn delete_panel(&self, panel: &Panel) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(panel_key(&panel.id))
            .srem(panels_key(&panel.owner), &panel.id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    pub async fn create_document(&self, id: &str, owner: &str, state: &Value) -> Result<Document, StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset_multiple(
                doc_key(id),
                &[("owner", owner.to_owned()), ("version", "1".to_owned()), ("state", state.to_string())],
            )
            .sadd(docs_key(owner), id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(Document { id: id.to_owned(), owner: owner.to_owned(), version: 1, state: state.clone() })
    }

    pub async fn document(&self, id: &str) -> Result<Option<Document>, StoreError> {
        let (owner, version, state): (Option<String>, Option<u64>, Option<String>) = self
            .read(|mut c| async move {
                redis::cmd("HMGET").arg(doc_key(id)).arg("owner").arg("version").arg("state").query_async(&mut c).await
            })
            .await?;
        let (Some(owner), Some(version), Some(state)) = (owner, version, state) else { return Ok(None) };
        let state = serde_json::from_str(&state).map_err(|e| StoreError::Corrupt(format!("document {id}: {e}")))?;
        Ok(Some(Document { id: id.to_owned(), owner, version, state }))
    }

    pub async fn documents_of(&self, owner: &str) -> Result<Vec<Document>, StoreError> {
        let ids: Vec<String> = self.read(|mut c| async move { c.smembers(docs_key(owner)).await }).await?;
        let mut docs = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(doc) = self.document(&id).await? {
                docs.push(doc);
            }
        }
        docs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(docs)
    }

    /// Applies `patch` to `doc` (as the caller read it) if the document is
    /// still at `expected` in Redis.
    pub async fn patch_document(&self, mut doc: Document, expected: u64, patch: &Value) -> Result<Write, StoreError> {
        let id = doc.id.clone();
        if doc.version != expected {
            return Ok(Write::Stale { current: doc.version });
        }
        merge_patch(&mut doc.state, patch);
        let mut c = self.conn.clone();
        let (status, version): (u8, u64) = redis::Script::new(PATCH_SCRIPT)
            .key(doc_key(&id))
            .key(doc_log_key(&id))
            .arg(expected)
            .arg(doc.state.to_string())
            .arg(patch.to_string())
            .invoke_async(&mut c)
            .await?;
        Ok(match status {
            0 => Write::Applied(Document { version, ..doc }),
            1 => Write::Stale { current: version },
            _ => Write::Missing,
        })
    }

    /// Changes after `since`, oldest first.
    pub async fn history(&self, id: &str, since: u64) -> Result<Vec<Change>, StoreError> {
        let reply: redis::streams::StreamRangeReply =
            self.read(|mut c| async move { c.xrange_all(doc_log_key(id)).await }).await?;
        let mut changes = Vec::new();
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

    pub async fn delete_document(&self, doc: &Document) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(doc_key(&doc.id))
            .del(doc_log_key(&doc.id))
            .srem(docs_key(&doc.owner), &doc.id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }
}

impl Store {
    /// Adds a participant to a document's presence; returns everyone present.
    pub async fn presence_join(
        &self,
        doc: &str,
        session: &str,
        user: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.conn.clone();
        let key = format!("nexus:presence:{doc}");
        redis::pipe()
            .atomic()
            .hset(&key, session, user)
            .set_ex(alive_key(session), 1, PRESENCE_TTL_SECS)
            .query_async::<()>(&mut c)
            .await?;
        self.present(&key).await
    }

    /// Removes a participant; returns who is left.
    pub async fn presence_leave(&self, doc: &str, session: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.conn.clone();
        let key = format!("nexus:presence:{doc}");
        let _: () = c.hdel(&key, session).await?;
        self.present(&key).await
    }

    /// Keeps a session's presence entries alive; a session refreshes this
    /// well within [`PRESENCE_TTL_SECS`].
    pub async fn presence_alive(&self, session: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        Ok(c.set_ex(alive_key(session), 1, PRESENCE_TTL_SECS).await?)
    }

    /// Everyone present at `key`; entries of sessions that stopped
    /// refreshing (their node died) are removed on the way.
    async fn present(&self, key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut c = self.conn.clone();
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

/// Seconds a session's presence outlives its last refresh.
pub const PRESENCE_TTL_SECS: u64 = 60;

fn alive_key(session: &str) -> String {
    format!("nexus:presence-alive:{session}")
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
}
