//! Which LLM manager owns which partition of `semantic.commands`, leased
//! in Redis, and how far each partition's commands are done.
//!
//! Every node renews its lease each [`RENEW`]; a lease not renewed for
//! [`TTL`] lapses and its node drops out. Partitions go round-robin over
//! the live nodes in name order, so every node computes the same
//! assignment, and a killed node's partitions move once its lease lapses.
//! (The inbox gives partitions up at once and takes new ones only once the
//! assignment has held for a few renewals, so that the previous owner has
//! seen it too and let them go.)
//! (Tansu 0.6's group coordinator keeps a killed member in its group, so
//! a Kafka consumer group never hands its partitions to anyone; leases
//! do not depend on the broker for this.) A node started again under its
//! name drops its dead predecessor's lease at once
//! ([`Lease::evict_predecessors`]). A node whose own renewals fail
//! for `TTL - RENEW` gives up every partition before anyone else may take them.
//!
//! A node can also be paused (SIGSTOP, a frozen VM) past its lease and
//! then go on as if nothing happened, while another node has taken its
//! partitions. So it acts on its lease only while the lease is
//! [`Lease::held`]: renewed within the last `TTL - RENEW` by its own clock.
//! Its inbox takes no command and its journal writer starts no write
//! otherwise (a write already handed to the broker may still land: the
//! next owner's fence makes readers leave it out, see
//! [`ContextFenced`](crate::semantic::records::ContextFenced)), and after a gap — by its own clock, or by
//! Redis's, which a frozen machine's clock cannot vouch for — it gives its
//! partitions up and takes them again only as a newcomer would. The
//! renewal that finds the lease lapsed does not make it held again: only
//! [`Lease::rearm`], once the partitions are given up and their contexts
//! halted, does, so no write slips through in between.
//!
//! The next offset to read of each partition is kept here too, written
//! only once every command before it has its turn on the journal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use redis::AsyncCommands;

use crate::platform::store::{Redis, StoreError};

/// How often a node renews its lease.
pub const RENEW: Duration = Duration::from_millis(1000);
/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_millis(5000);

/// The live members (LLM manager processes), by when each lease lapses (ms
/// since the epoch, Redis's clock).
pub const MEMBERS: &str = "nexus:llm-managers:members";
const OFFSETS: &str = "nexus:llm-managers:offsets";

/// Renews `ARGV[1]` until Redis's now + `ARGV[2]` ms, drops lapsed members,
/// returns `1` when `ARGV[1]`'s lease had run out or was gone (by Redis's
/// clock, which a frozen machine's own clock cannot vouch for), else `0`,
/// then the live members in name order.
const RENEW_SCRIPT: &str = r"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
local lapsed = '0'
if not before or tonumber(before) <= ms then lapsed = '1' end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
table.insert(members, 1, lapsed)
return members
";

/// Removes the members named `ARGV[1]…` other than `ARGV[2]`.
const EVICT_SCRIPT: &str = r"
local gone = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #ARGV[1]) == ARGV[1] and m ~= ARGV[2] then
    redis.call('ZREM', KEYS[1], m)
    gone = gone + 1
  end
end
return gone
";

/// One node's lease. Cheap to clone.
#[derive(Clone)]
pub struct Lease {
    redis: Redis,
    /// The node's name; the member is `{node}/{a process's id}`.
    node: String,
    member: String,
    renewed: Arc<Mutex<Renewed>>,
}

/// When the last successful renewal was asked for (none: not held), and
/// whether it counts: a renewal that found the lease lapsed counts only
/// once [`Lease::rearm`] says the node has let go.
#[derive(Debug, Default)]
struct Renewed {
    at: Option<Instant>,
    armed: bool,
}

impl Lease {
    /// The lease of a new member named after `node` (unique per process).
    pub fn new(redis: Redis, node: &str) -> Self {
        Lease {
            redis,
            node: node.to_owned(),
            member: format!("{node}/{}", uuid::Uuid::now_v7().simple()),
            renewed: Arc::default(),
        }
    }

    /// This member's name.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// Renews the lease; the live members, in name order, and whether the
    /// lease had lapsed before this renewal: it was not [`Lease::held`], or
    /// Redis had let it run out or seen it removed. A lapsed lease is not
    /// held until [`Lease::rearm`].
    pub async fn renew(&self) -> Result<(Vec<String>, bool), StoreError> {
        let asked = Instant::now();
        let mut members: Vec<String> = redis::Script::new(RENEW_SCRIPT)
            .key(MEMBERS)
            .arg(&self.member)
            .arg(TTL.as_millis() as u64)
            .invoke_async(&mut self.redis.conn())
            .await?;
        let ran_out = !members.is_empty() && members.remove(0) == "1";
        let lapsed = ran_out || !self.held();
        let mut renewed = crate::kernel::lock(&self.renewed);
        // Counted from when it was asked for: Redis's TTL starts then at the
        // earliest, so the node gives up no later than others may take over.
        renewed.at = Some(asked);
        renewed.armed = !lapsed;
        Ok((members, lapsed))
    }

    /// Makes a lease that a renewal found lapsed held again (if that
    /// renewal is recent enough): called once everything taken under the
    /// old lease is given up, so nothing started under it writes on.
    pub fn rearm(&self) {
        crate::kernel::lock(&self.renewed).armed = true;
    }

    /// Whether this node may act on its lease: renewed within the last
    /// `TTL - RENEW`, before others may count it gone, and not lapsed since
    /// it was last armed.
    pub fn held(&self) -> bool {
        let renewed = crate::kernel::lock(&self.renewed);
        renewed.armed && renewed.at.is_some_and(|at| at.elapsed() < TTL - RENEW)
    }

    /// Drops the leases of this node's earlier processes (a node killed and
    /// started again under its name): its name is its own while it runs
    /// (the node name lease), so any other member under it is dead, and its
    /// partitions need not wait for its lease to lapse.
    pub async fn evict_predecessors(&self) -> Result<(), StoreError> {
        redis::Script::new(EVICT_SCRIPT)
            .key(MEMBERS)
            .arg(format!("{}/", self.node))
            .arg(&self.member)
            .invoke_async::<i64>(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// Gives the lease up now (an orderly stop), so others need not wait for it to lapse.
    pub async fn leave(&self) {
        // Contexts still stopping write nothing more.
        *crate::kernel::lock(&self.renewed) = Renewed::default();
        let _: Result<(), _> = self.redis.conn().zrem(MEMBERS, &self.member).await;
    }

    /// The next offset to read of each of `partitions` that has one.
    pub async fn offsets(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, StoreError> {
        let fields: Vec<String> = partitions.iter().map(i32::to_string).collect();
        if fields.is_empty() {
            return Ok(HashMap::new());
        }
        let values: Vec<Option<i64>> = self
            .redis
            .read(|mut c| {
                let fields = fields.clone();
                async move { redis::cmd("HMGET").arg(OFFSETS).arg(fields).query_async(&mut c).await }
            })
            .await?;
        Ok(partitions.iter().zip(values).filter_map(|(p, v)| Some((*p, v?))).collect())
    }

    /// Notes that every command of `partition` before `next` is done.
    pub async fn done(&self, partition: i32, next: i64) -> Result<(), StoreError> {
        const RAISE: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if current == nil or tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
";
        redis::Script::new(RAISE)
            .key(OFFSETS)
            .arg(partition)
            .arg(next)
            .invoke_async::<i64>(&mut self.redis.conn())
            .await?;
        Ok(())
    }
}

/// The partitions of `partitions` that `member` owns among `members` (in name order).
pub fn owned(members: &[String], member: &str, partitions: i32) -> Vec<i32> {
    let Some(me) = members.iter().position(|m| m == member) else { return Vec::new() };
    (0..partitions).filter(|p| *p as usize % members.len() == me).collect()
}

#[cfg(test)]
mod tests {
    use super::owned;

    #[test]
    fn partitions_go_round_robin_and_every_one_has_one_owner() {
        let members: Vec<String> = ["a", "b"].map(String::from).to_vec();
        assert_eq!(owned(&members, "a", 3), [0, 2]);
        assert_eq!(owned(&members, "b", 3), [1]);
        assert_eq!(owned(&members, "gone", 3), Vec::<i32>::new());
        assert_eq!(owned(&members[..1], "a", 3), [0, 1, 2], "alone, a member owns them all");
    }
}
