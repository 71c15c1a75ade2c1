//! Moving documents that older nodes wrote to the keys this version reads.
//! Before documents could live on a Redis Cluster their keys had no hash
//! tag (`nexus:doc:<id>`, `nexus:doc:<id>:log`); in one Redis they are
//! renamed in place. A node given a cluster for documents copies those its
//! plain Redis holds, tagged or not, onto the cluster and deletes them
//! there unless they changed meanwhile. Runs as a node starts; reads and
//! writes never look at old keys. Nothing is deleted before it is copied,
//! so a node that dies halfway loses nothing (a document deleted on the
//! cluster before the next start can come back from its old copy).

use redis::AsyncCommands;

use super::{doc_key, doc_log_key, docs_key, is_document_id, Documents};
use crate::platform::{Redis, StoreError};

/// Renames an untagged document (KEYS[1], its log KEYS[2]) to its tagged
/// keys (KEYS[3], KEYS[4]), unless there is a tagged one already. One
/// Redis only: the keys are in different slots.
const RENAME_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[4]) end
redis.call('RENAME', KEYS[1], KEYS[3])
return 1
";

/// Held on the plain Redis while a node copies documents to the cluster,
/// so that two starting nodes do not copy one document at once; renewed
/// after each document, released only by the node holding it.
const COPY_LOCK: &str = "nexus:documents:copying";
const COPY_LOCK_MS: u64 = 300_000;

/// Deletes KEYS[1] (a lock) if it still holds ARGV[1] (its holder's token).
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Renews KEYS[1] (a lock) for ARGV[2] ms if it still holds ARGV[1].
const RENEW_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// The field of a copied document that says which version was copied:
/// the source may go only if it is not newer than that.
const COPIED_VERSION: &str = "copied_version";

/// Deletes a copied document (KEYS[1], its log KEYS[2]) if it is still at
/// version ARGV[1] or older: one changed after it was copied is kept.
const DELETE_COPIED_SCRIPT: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if v > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
";

/// History entries read from the old log per round trip: at most this
/// many patches (each within the API's body limit) are held at once.
const LOG_PAGE: usize = 16;

/// The id an old document key names, if it is a document (not its log);
/// tagged keys only when `tagged` is set.
fn old_document(key: &str, tagged: bool) -> Option<&str> {
    let rest = key.strip_prefix("nexus:doc:")?;
    let id = match rest.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        Some(id) if tagged => id,
        Some(_) => return None,
        None => rest,
    };
    is_document_id(id).then_some(id)
}

impl Documents {
    /// Moves the documents older nodes left where this version does not
    /// look: those under untagged keys in this store when `plain` is
    /// `None` (this store is that Redis), or every document in `plain`
    /// when this store is a cluster. Returns how many moved. A document
    /// that cannot be moved is left where it is (logged, tried again at
    /// the next start); only a failed scan is an error.
    pub async fn adopt(&self, plain: Option<&Redis>) -> Result<usize, StoreError> {
        let Some(source) = plain else { return self.rename_untagged().await };
        let token = uuid::Uuid::new_v4().to_string();
        let locked: Option<String> = redis::cmd("SET")
            .arg(COPY_LOCK)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(COPY_LOCK_MS)
            .query_async(&mut source.conn())
            .await?;
        if locked.is_none() {
            tracing::info!("another node is copying documents to the cluster");
            return Ok(0);
        }
        let copied = self.copy_all(source, &token).await;
        let released: redis::RedisResult<i64> =
            redis::Script::new(RELEASE_SCRIPT).key(COPY_LOCK).arg(&token).invoke_async(&mut source.conn()).await;
        if let Err(error) = released {
            tracing::warn!(%error, "the lock of the copy to the cluster is left to expire");
        }
        copied
    }

    async fn rename_untagged(&self) -> Result<usize, StoreError> {
        let mut scan = self.redis.conn();
        let mut keys = scan.scan_match::<_, String>("nexus:doc:*").await?;
        let mut moved = 0;
        while let Some(key) = keys.next_item().await.transpose()? {
            let Some(id) = old_document(&key, false) else { continue };
            let renamed: redis::RedisResult<i64> = redis::Script::new(RENAME_SCRIPT)
                .key(&key)
                .key(format!("{key}:log"))
                .key(doc_key(id))
                .key(doc_log_key(id))
                .invoke_async(&mut self.redis.conn())
                .await;
            match renamed {
                Ok(renamed) => moved += renamed as usize,
                Err(error) => tracing::warn!(%error, document = id, "a document under an old key was not moved"),
            }
        }
        if moved > 0 {
            tracing::info!(moved, "documents under older nodes' keys moved to this version's");
        }
        Ok(moved)
    }

    async fn copy_all(&self, source: &Redis, token: &str) -> Result<usize, StoreError> {
        let mut scan = source.conn();
        let mut keys = scan.scan_match::<_, String>("nexus:doc:*").await?;
        let mut moved = 0;
        while let Some(key) = keys.next_item().await.transpose()? {
            let Some(id) = old_document(&key, true) else { continue };
            match self.copy(source, &key, id).await {
                Ok(copied) => moved += copied as usize,
                Err(error) => tracing::warn!(%error, document = id, "a document was not copied to the cluster"),
            }
            let renewed: i64 = redis::Script::new(RENEW_SCRIPT)
                .key(COPY_LOCK)
                .arg(token)
                .arg(COPY_LOCK_MS)
                .invoke_async(&mut source.conn())
                .await?;
            if renewed == 0 {
                tracing::warn!("the lock of the copy to the cluster was lost; the rest is left to the next start");
                break;
            }
        }
        if moved > 0 {
            tracing::info!(moved, "documents copied from the plain redis to the cluster");
        }
        Ok(moved)
    }

    /// Copies the document at `key` in `source`, with its history, to this
    /// store and deletes it from `source` unless it changed meanwhile. A
    /// copy made already (by a node that died before deleting) stands: it
    /// may have changed since; the source goes only if it is not newer.
    async fn copy(&self, source: &Redis, key: &str, id: &str) -> Result<bool, StoreError> {
        let mut from = source.conn();
        let mut to = self.redis.conn();
        let old_log = format!("{key}:log");
        let exists: bool = to.exists(doc_key(id)).await?;
        let copied_version: u64 = if exists {
            // Not its version now: it may have been edited further than
            // the source, whose edits would then be lost with it.
            to.hget::<_, _, Option<u64>>(doc_key(id), COPIED_VERSION).await?.unwrap_or(0)
        } else {
            let mut fields: Vec<(String, String)> = from.hgetall(key).await?;
            let version = fields.iter().find(|(f, _)| f == "version").and_then(|(_, v)| v.parse::<u64>().ok());
            let Some(version) = version else { return Ok(false) };
            let () = to.del(doc_log_key(id)).await?;
            let mut start = "-".to_owned();
            loop {
                let page: redis::streams::StreamRangeReply = from.xrange_count(&old_log, &start, "+", LOG_PAGE).await?;
                let Some(last) = page.ids.last() else { break };
                start = format!("({}", last.id);
                let mut pipe = redis::pipe();
                for entry in &page.ids {
                    let (Some(version), Some(patch)) = (entry.get::<String>("version"), entry.get::<String>("patch"))
                    else {
                        continue;
                    };
                    pipe.cmd("XADD").arg(doc_log_key(id)).arg(&entry.id).arg("version").arg(version);
                    pipe.arg("patch").arg(patch).ignore();
                }
                let () = pipe.query_async(&mut to).await?;
            }
            fields.push((COPIED_VERSION.to_owned(), version.to_string()));
            let () = to.hset_multiple(doc_key(id), &fields).await?;
            version
        };
        // Joined to its owner's set even when the copy was there: the node
        // that made it may have died before this step.
        let owner: Option<String> = to.hget(doc_key(id), "owner").await?;
        if let Some(owner) = owner {
            let () = to.sadd(docs_key(&owner), id).await?;
        }
        let deleted: i64 = redis::Script::new(DELETE_COPIED_SCRIPT)
            .key(key)
            .key(&old_log)
            .arg(copied_version)
            .invoke_async(&mut from)
            .await?;
        if deleted == 0 {
            tracing::warn!(document = id, "changed on the plain redis after its copy to the cluster: both are kept");
        }
        Ok(!exists)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_document_keys_are_adopted() {
        let id = "0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11";
        assert_eq!(super::old_document(&format!("nexus:doc:{id}"), false), Some(id));
        assert_eq!(super::old_document(&format!("nexus:doc:{{{id}}}"), false), None, "tagged stays in one store");
        assert_eq!(super::old_document(&format!("nexus:doc:{{{id}}}"), true), Some(id));
        assert_eq!(super::old_document(&format!("nexus:doc:{id}:log"), true), None);
        assert_eq!(super::old_document("nexus:doc:x", true), None);
        assert_eq!(super::old_document(&format!("nexus:docs:{id}"), true), None);
    }
}
