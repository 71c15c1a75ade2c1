//! The context directory in Redis: which contexts exist, who owns them,
//! and where each one's journal is (partition, first and last offsets,
//! snapshots). It is an index: the journal on Kafka is the truth, and
//! nothing here is needed to fold it except where to start reading.
//!
//! Keys: `nexus:context:{id}` (JSON [`ContextInfo`] as created),
//! `nexus:context:{id}:journal` (hash: `partition`, `first`, `last`),
//! `nexus:contexts:{owner}`
//! (sorted set of the owner's context ids by creation time) and
//! `nexus:context:{id}:snapshots` (sorted set: score the offset a snapshot
//! folds up to, member the snapshot record's own offset) and
//! `nexus:context:{id}:fences` (sorted set: score a fence record's offset,
//! member `<offset> <writer>`; the latest [`MAX_FENCES`]; a writer fencing
//! again a context it fenced last is not noted again).

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::records::{is_context_id, ForkPoint};
use crate::platform::store::{Redis, StoreError};

/// A context as the directory knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContextInfo {
    /// The context id (a UUID).
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// The model asked for, if any.
    pub model: Option<String>,
    /// The tools its model is offered.
    pub tools: Vec<String>,
    /// Where it was forked from.
    pub parent: Option<ForkPoint>,
    /// When it was created.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// Its partition of `semantic.events`, once its first record is journaled.
    pub partition: Option<i32>,
    /// The offset of its first journal record.
    pub first_offset: Option<i64>,
    /// The offset of its last journal record the LLM manager reported.
    pub last_offset: Option<i64>,
}

const CREATE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
";

/// Sets the partition once, lowers the first offset and raises the last.
/// An unknown offset (negative: a delivery the broker confirmed without
/// one) notes nothing: as the first, it would make the journal unreadable.
const JOURNALED_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local offset = tonumber(ARGV[2])
if offset < 0 then return 0 end
redis.call('HSETNX', KEYS[2], 'partition', ARGV[1])
local first = tonumber(redis.call('HGET', KEYS[2], 'first'))
if first == nil or offset < first then redis.call('HSET', KEYS[2], 'first', offset) end
local last = tonumber(redis.call('HGET', KEYS[2], 'last'))
if last == nil or offset > last then redis.call('HSET', KEYS[2], 'last', offset) end
return 1
";

/// Notes fence `ARGV[1]` of writer `ARGV[2]` unless the context is gone
/// (0) or the writer's lease in `KEYS[3]` has run out by Redis's clock
/// (-1); a writer that fenced last is not noted again (0); the latest
/// `ARGV[3]` fences are kept. 1: noted.
const FENCED_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lapses = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[2]))
if lapses == nil or lapses <= ms then return -1 end
local last = redis.call('ZRANGE', KEYS[2], -1, -1)[1]
if last and string.sub(last, string.find(last, ' ') + 1) == ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1] .. ' ' .. ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[3]) + 1))
return 1
";

/// Where a context's journal is: partition, first and last offsets.
type JournalAt = (Option<i32>, Option<i64>, Option<i64>);

/// Why a context could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The owner already has this many contexts.
    #[error("you already have {0} contexts")]
    Quota(usize),
    /// A context with this id exists.
    #[error("context exists")]
    Exists,
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The directory. Cheap to clone.
#[derive(Clone)]
pub struct ContextDirectory {
    redis: Redis,
}

fn info_key(id: &str) -> String {
    format!("nexus:context:{id}")
}

fn owner_key(owner: &str) -> String {
    format!("nexus:contexts:{owner}")
}

fn journal_key(id: &str) -> String {
    format!("nexus:context:{id}:journal")
}

fn snapshots_key(id: &str) -> String {
    format!("nexus:context:{id}:snapshots")
}

fn fences_key(id: &str) -> String {
    format!("nexus:context:{id}:fences")
}

/// Fences kept per context: a writer fenced off further back than this many
/// changes of writer has long stopped writing (a record of it landing
/// between fences trimmed away would stand again).
pub const MAX_FENCES: isize = 256;

/// A context's fences, in offset order: `(offset, writer)` of each
/// [`ContextFenced`](super::records::ContextFenced) a writer noted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fences(Vec<(i64, String)>);

impl Fences {
    /// Fences at these offsets, by these writers, in any order.
    pub fn new(mut fences: Vec<(i64, String)>) -> Self {
        fences.sort();
        Fences(fences)
    }

    /// Whether a record at `offset` made by `source` is a fenced-off
    /// writer's: `source` fenced the context before it, and someone else
    /// has fenced it since. Records of a source that never fenced (a test,
    /// the tool registry's records) always stand.
    pub fn stale(&self, offset: i64, source: &str) -> bool {
        let before = &self.0[..self.0.partition_point(|(at, _)| *at <= offset)];
        match before.last() {
            Some((_, current)) => current != source && before.iter().any(|(_, writer)| writer == source),
            None => false,
        }
    }
}

impl ContextDirectory {
    /// The directory over an existing connection.
    pub fn new(redis: Redis) -> Self {
        ContextDirectory { redis }
    }

    /// Records a new context unless its owner already has `max`.
    pub async fn create(&self, info: &ContextInfo, max: usize) -> Result<(), CreateError> {
        let json = serde_json::to_string(info).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let created: i64 = redis::Script::new(CREATE_SCRIPT)
            .key(info_key(&info.id))
            .key(owner_key(&info.owner))
            .arg(&info.id)
            .arg(json)
            .arg(max)
            .arg(info.created_at.timestamp_millis())
            .invoke_async(&mut self.redis.conn())
            .await
            .map_err(StoreError::from)?;
        match created {
            1 => Ok(()),
            0 => Err(CreateError::Quota(max)),
            _ => Err(CreateError::Exists),
        }
    }

    /// The context `id`, if it exists. An id that is not a UUID is never looked up.
    pub async fn get(&self, id: &str) -> Result<Option<ContextInfo>, StoreError> {
        if !is_context_id(id) {
            return Ok(None);
        }
        let (json, at): (Option<String>, JournalAt) = self
            .redis
            .read(|mut c| async move {
                redis::pipe()
                    .get(info_key(id))
                    .cmd("HMGET")
                    .arg(journal_key(id))
                    .arg(&["partition", "first", "last"])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let Some(json) = json else { return Ok(None) };
        let mut info: ContextInfo =
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("context {id}: {e}")))?;
        (info.partition, info.first_offset, info.last_offset) = at;
        Ok(Some(info))
    }

    /// The context `id` if `user` may see it: its owner, or an admin.
    /// `None` for anyone else, as for a missing one.
    pub async fn visible(&self, id: &str, user: &str, admin: bool) -> Result<Option<ContextInfo>, StoreError> {
        Ok(self.get(id).await?.filter(|info| admin || info.owner == user))
    }

    /// The contexts of `owner`, newest first, at most `limit`.
    pub async fn list(&self, owner: &str, limit: usize) -> Result<Vec<ContextInfo>, StoreError> {
        let key = owner_key(owner);
        let stop = limit.saturating_sub(1) as isize;
        let ids: Vec<String> = self
            .redis
            .read(|mut c| {
                let key = key.clone();
                async move { c.zrevrange(key, 0, stop).await }
            })
            .await?;
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(info) = self.get(&id).await? {
                found.push(info);
            }
        }
        Ok(found)
    }

    /// Forgets a context that never reached the journal (its creation
    /// command could not be produced).
    pub async fn remove(&self, info: &ContextInfo) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .del(info_key(&info.id))
            .del(journal_key(&info.id))
            .del(snapshots_key(&info.id))
            .del(fences_key(&info.id))
            .zrem(owner_key(&info.owner), &info.id)
            .query_async::<()>(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Notes that a record of `id` landed at `offset` of `partition`.
    pub async fn journaled(&self, id: &str, partition: i32, offset: i64) -> Result<(), StoreError> {
        redis::Script::new(JOURNALED_SCRIPT)
            .key(info_key(id))
            .key(journal_key(id))
            .arg(partition)
            .arg(offset)
            .invoke_async::<i64>(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Notes that `writer` fenced `id` with the record at `offset` of
    /// `partition` (noted as journaled too), if `writer` is live in
    /// `writers` (a sorted set of writers by when they lapse, in ms since
    /// the epoch) by Redis's clock: false when it is not, and the fence
    /// does not count (a machine frozen past its lease, with its clock,
    /// must not fence out the context's real owner).
    pub async fn fenced(
        &self,
        id: &str,
        partition: i32,
        offset: i64,
        writer: &str,
        writers: &str,
    ) -> Result<bool, StoreError> {
        let noted: i64 = redis::Script::new(FENCED_SCRIPT)
            .key(info_key(id))
            .key(fences_key(id))
            .key(writers)
            .arg(offset)
            .arg(writer)
            .arg(MAX_FENCES)
            .invoke_async(&mut self.redis.conn())
            .await?;
        if noted < 0 {
            return Ok(false);
        }
        self.journaled(id, partition, offset).await?;
        Ok(true)
    }

    /// The fences of `id`.
    pub async fn fences(&self, id: &str) -> Result<Fences, StoreError> {
        let key = fences_key(id);
        let members: Vec<String> = self
            .redis
            .read(|mut c| {
                let key = key.clone();
                async move { c.zrange(key, 0, -1).await }
            })
            .await?;
        let parsed = members.iter().filter_map(|m| {
            let (offset, writer) = m.split_once(' ')?;
            Some((offset.parse().ok()?, writer.to_owned()))
        });
        Ok(Fences::new(parsed.collect()))
    }

    /// Notes a snapshot of `id` folding up to `at`, stored at `record`.
    pub async fn snapshot(&self, id: &str, at: i64, record: i64) -> Result<(), StoreError> {
        self.redis.conn().zadd::<_, _, _, ()>(snapshots_key(id), record, at).await?;
        Ok(())
    }

    /// The latest snapshot of `id` folding up to `at` or before: `(at, record offset)`.
    pub async fn snapshot_before(&self, id: &str, at: Option<i64>) -> Result<Option<(i64, i64)>, StoreError> {
        let key = snapshots_key(id);
        let max = at.map_or("+inf".to_owned(), |a| a.to_string());
        let found: Vec<(String, f64)> = self
            .redis
            .read(|mut c| {
                let (key, max) = (key.clone(), max.clone());
                async move { c.zrevrangebyscore_limit_withscores(key, max, "-inf", 0, 1).await }
            })
            .await?;
        Ok(found.into_iter().next().and_then(|(record, at)| Some((at as i64, record.parse().ok()?))))
    }
}

#[cfg(test)]
mod tests {
    use super::Fences;

    #[test]
    fn a_writer_fenced_off_is_stale_until_it_fences_again_and_others_always_stand() {
        let fences = Fences::new(vec![(30, "a".into()), (10, "a".into()), (20, "b".into())]);
        assert!(!fences.stale(5, "a"), "before any fence everything stands");
        assert!(!fences.stale(15, "a"), "a's, after its own fence");
        assert!(!fences.stale(20, "b"), "b's fence itself");
        assert!(fences.stale(21, "a"), "a's record landing after b took over");
        assert!(!fences.stale(21, "b"));
        assert!(!fences.stale(21, "recorder"), "a source that never fenced stands");
        assert!(!fences.stale(30, "a"), "a's fence taking it back");
        assert!(fences.stale(31, "b"), "now b is the one fenced off");
        assert!(!Fences::default().stale(1, "a"), "a journal without fences: everything stands");
    }
}
