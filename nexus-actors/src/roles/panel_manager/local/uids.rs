//! The uids panel code runs as (root only), allocated in Redis: one per
//! panel, cluster-wide, from a counter that never goes back, so no two
//! panels ever share a uid (a hash of the id could collide) and a uid a
//! deleted panel held is never handed to another.
//!
//! Keys: `nexus:panel-uids` (hash: panel id → offset), `nexus:panel-uids:next`
//! (the counter). It allocates and forgets; who may run as what is the
//! driver's.

use tokio::sync::OnceCell;

use super::super::driver::DriverError;
use crate::platform::store::{Redis, StoreError};

/// The first uid handed out: far above any system or human uid, and above
/// the range panel uids were once hashed into (1,000,000,000 to
/// 1,099,999,999), whose files an older volume may still hold.
const FIRST: u32 = 1_100_000_000;
/// How many there are: `FIRST + COUNT` stays below 2^31, which some tools
/// take for negative.
const COUNT: u32 = 1_000_000_000;

const UIDS: &str = "nexus:panel-uids";
const NEXT: &str = "nexus:panel-uids:next";

/// The panel's offset, allocated on first use.
const ALLOCATE: &str = r"
local offset = redis.call('HGET', KEYS[1], ARGV[1])
if offset then return tonumber(offset) end
offset = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], offset)
return offset
";

/// Panel uids, over a connection made on first use. A panel's uid never
/// changes, so it is kept here once known: a restart needs no Redis.
pub(super) struct Uids {
    redis_url: String,
    redis: OnceCell<Redis>,
    known: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Uids {
    pub(super) fn new(redis_url: &str) -> Uids {
        Uids { redis_url: redis_url.to_owned(), redis: OnceCell::new(), known: Default::default() }
    }

    async fn redis(&self) -> Result<&Redis, DriverError> {
        self.redis.get_or_try_init(|| Redis::connect(&self.redis_url)).await.map_err(store_error)
    }

    /// The uid `panel`'s code runs as: the same on every call and node.
    pub(super) async fn of(&self, panel: &str) -> Result<u32, DriverError> {
        if let Some(uid) = self.known.lock().unwrap_or_else(|e| e.into_inner()).get(panel) {
            return Ok(*uid);
        }
        let script = &redis::Script::new(ALLOCATE);
        // Allocating is idempotent, so a retry after a dropped connection is safe.
        let offset: u64 = self
            .redis()
            .await?
            .read(|mut conn| async move { script.key(UIDS).key(NEXT).arg(panel).invoke_async(&mut conn).await })
            .await
            .map_err(store_error)?;
        let uid = match u32::try_from(offset) {
            Ok(offset) if offset < COUNT => FIRST + offset,
            _ => return Err(DriverError::Io(std::io::Error::other("every panel uid is allocated"))),
        };
        self.known.lock().unwrap_or_else(|e| e.into_inner()).insert(panel.to_owned(), uid);
        Ok(uid)
    }

    /// Forgets `panel`'s uid (the panel is gone); it is never handed out again.
    pub(super) async fn forget(&self, panel: &str) -> Result<(), DriverError> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).remove(panel);
        let mut conn = self.redis().await?.conn();
        redis::AsyncCommands::hdel::<_, _, ()>(&mut conn, UIDS, panel).await.map_err(|e| store_error(e.into()))
    }
}

fn store_error(error: StoreError) -> DriverError {
    DriverError::Io(std::io::Error::other(format!("panel uids in redis: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn every_panel_gets_its_own_uid_for_good_and_a_forgotten_one_is_never_reused() {
        let brokers = nexus_testkit::Brokers::redis("panel-uids");
        let (one, two) = (Uids::new(&brokers.redis_url()), Uids::new(&brokers.redis_url()));
        let panels: Vec<String> = (0..200).map(|_| nexus_testkit::panel_id()).collect();
        let mut uids = Vec::new();
        for panel in &panels {
            uids.push(one.of(panel).await.expect("a uid"));
        }
        let distinct: std::collections::HashSet<_> = uids.iter().collect();
        assert_eq!(distinct.len(), panels.len(), "no two panels share a uid");
        assert!(uids.iter().all(|&uid| uid >= FIRST));
        for (panel, uid) in panels.iter().zip(&uids) {
            assert_eq!(two.of(panel).await.expect("a uid"), *uid, "the same on every node");
        }
        // Panel ids are never reused; were one asked for again, it gets a new uid.
        one.forget(&panels[0]).await.expect("forgotten");
        let again = one.of(&panels[0]).await.expect("a uid");
        assert!(!uids.contains(&again), "a uid once held is never handed out again");
    }
}
