//! A node's hold on its name: one live node per name, cluster-wide. Roles
//! key what a node owns by its name (the panel manager's instances, the
//! LLM manager's leases), so two live nodes of one name would take each
//! other's state for a previous life's and remove it.
//!
//! The lease is `nexus:node:{name}` in Redis, holding who holds it (host,
//! pid, process start time, a random tag), set only if absent, renewed
//! every [`LeaseTimes::renew`] and gone [`LeaseTimes::ttl`] after the last
//! renewal. A node that finds its name held refuses to start, unless the
//! holder is a process of this host that is gone (a crashed previous life
//! here): that lease is taken over at once instead of after its TTL.
//!
//! It also names a node that is given no name: `nexus-<host>-<random>`,
//! kept in the data directory so the same node keeps its name across
//! restarts (and with it what it owns).

use std::path::Path;
use std::time::Duration;

use prometheus::IntCounter;

use super::store::{Redis, StoreError};

/// How long a lease lives, and how often its holder renews it.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    /// Gone this long after the last renewal.
    pub ttl: Duration,
    /// How often the holder renews it.
    pub renew: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        LeaseTimes { ttl: Duration::from_secs(15), renew: Duration::from_secs(5) }
    }
}

/// Why a node may not have its name.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A live node holds it.
    #[error(
        "node name {name:?} is held by a live node ({holder}; its lease ends {expires_in_ms} ms after its last \
         renewal): give this node another name (--name, NEXUS_NODE_NAME)"
    )]
    Held {
        /// The name.
        name: String,
        /// Who holds it.
        holder: String,
        /// When the holder's lease ends unless renewed.
        expires_in_ms: i64,
    },
    /// The name is not one a node may have (see [`check_name`]).
    #[error("node name {name:?} refused: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Redis could not be asked.
    #[error("node name lease: {0}")]
    Store(#[from] StoreError),
}

/// Renews the lease only while it is still the caller's.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// Deletes the lease only while it is the caller's (or the given stale holder's).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A held name; renewed until [`NodeLease::release`] (or the process ends).
pub struct NodeLease {
    redis: Redis,
    key: String,
    holder: String,
    renewing: tokio::task::JoinHandle<()>,
}

impl NodeLease {
    /// Takes `name` for this process, or says who holds it. `lost` counts
    /// renewals that found the lease taken by another holder.
    pub async fn acquire(
        redis: &Redis,
        name: &str,
        times: LeaseTimes,
        lost: IntCounter,
    ) -> Result<NodeLease, LeaseError> {
        check_name(name).map_err(|why| LeaseError::BadName { name: name.to_owned(), why })?;
        let key = format!("nexus:node:{name}");
        let holder = this_holder();
        let ttl_ms = times.ttl.as_millis() as u64;
        // At most twice: once more after taking over a dead holder's lease.
        for _ in 0..2 {
            let mut conn = redis.conn();
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&holder)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn)
                .await
                .map_err(StoreError::from)?;
            if set.is_some() {
                tracing::info!(name, %holder, "node name leased");
                let renewing = tokio::spawn(renew(redis.clone(), key.clone(), holder.clone(), times, lost));
                return Ok(NodeLease { redis: redis.clone(), key, holder, renewing });
            }
            let current: Option<String> =
                redis::cmd("GET").arg(&key).query_async(&mut conn).await.map_err(StoreError::from)?;
            let Some(current) = current else { continue };
            if !is_dead_here(&current) {
                let expires_in_ms: i64 =
                    redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.map_err(StoreError::from)?;
                return Err(LeaseError::Held { name: name.to_owned(), holder: current, expires_in_ms });
            }
            tracing::info!(name, previous = %current, "node name taken over from a process of this host that is gone");
            let _: i64 = redis::Script::new(RELEASE)
                .key(&key)
                .arg(&current)
                .invoke_async(&mut conn)
                .await
                .map_err(StoreError::from)?;
        }
        let current: Option<String> =
            redis::cmd("GET").arg(&key).query_async(&mut redis.conn()).await.map_err(StoreError::from)?;
        Err(LeaseError::Held { name: name.to_owned(), holder: current.unwrap_or_default(), expires_in_ms: 0 })
    }

    /// Gives the name back (a graceful stop): the next node of this name
    /// need not wait for the lease to end.
    pub async fn release(self) {
        self.renewing.abort();
        let released: Result<i64, _> =
            redis::Script::new(RELEASE).key(&self.key).arg(&self.holder).invoke_async(&mut self.redis.conn()).await;
        if let Err(error) = released {
            tracing::warn!(key = %self.key, %error, "node name lease not released; it ends on its own");
        }
    }
}

impl Drop for NodeLease {
    /// Dropped unreleased (a start that failed later): no longer renewed,
    /// the lease ends on its own.
    fn drop(&mut self) {
        self.renewing.abort();
    }
}

async fn renew(redis: Redis, key: String, holder: String, times: LeaseTimes, lost: IntCounter) {
    let ttl_ms = times.ttl.as_millis() as u64;
    let mut ticks = tokio::time::interval(times.renew);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let renewed: Result<i64, _> =
            redis::Script::new(RENEW).key(&key).arg(&holder).arg(ttl_ms).invoke_async(&mut redis.conn()).await;
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                // Gone (Redis was away past the TTL, or lost its data): taken
                // again if nobody else holds it; else another node runs
                // under this name, which the operator must know.
                let retaken: Result<Option<String>, _> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut redis.conn())
                    .await;
                if let Ok(Some(_)) = retaken {
                    tracing::warn!(%key, "this node's name lease had ended; taken again");
                    continue;
                }
                lost.inc();
                tracing::error!(%key, "nexus_node_lease_lost_total: another node holds this node's name");
            }
            Err(error) => tracing::warn!(%key, %error, "node name lease not renewed; trying again"),
        }
    }
}

/// Who this process is: `<host> boot <boot id> ns <pid namespace> pid
/// <pid> started <ticks> <tag>`; the boot and the namespace tell two hosts
/// (or containers) of one name apart.
fn this_holder() -> String {
    let pid = std::process::id();
    let started = process_start(pid).unwrap_or(0);
    let (boot, ns) = (boot_id(), pid_namespace());
    format!("{} boot {boot} ns {ns} pid {pid} started {started} {:08x}", host_name(), rand::random::<u32>())
}

/// Whether `holder` names a process that no longer runs on this very host,
/// boot and pid namespace (its pid gone, or reused by a process that started
/// at another time). Anything it cannot tell is taken for alive.
fn is_dead_here(holder: &str) -> bool {
    let parts: Vec<&str> = holder.split(' ').collect();
    let [host, "boot", boot, "ns", ns, "pid", pid, "started", started, _tag] = parts.as_slice() else { return false };
    if *host != host_name() || *boot != boot_id() || *ns != pid_namespace() || *boot == "?" || *ns == "?" {
        return false;
    }
    let (Ok(pid), Ok(started)) = (pid.parse::<u32>(), started.parse::<u64>()) else { return false };
    started != 0 && process_start(pid) != Some(started)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|ns| ns.to_string_lossy().replace(' ', ""))
        .unwrap_or_else(|_| "?".into())
}

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat`
/// field 22); `None` when there is no such process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// The longest node name: a DNS label's length, as Kubernetes Pod names go.
const MAX_NAME: usize = 63;

/// Whether `name` may name a node: 1 to 63 ASCII letters, digits, `-`,
/// `_` and `.`, starting with a letter or a digit. Names key what a node
/// owns and are joined with `/` and `:` into keys (the LLM manager's
/// members are `<node>/<process>`, evicted by that prefix), so a `/` in one
/// would let a node named `a` take `a/b`'s leases for its own.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    let first = name.chars().next().ok_or("it is empty")?;
    if name.len() > MAX_NAME {
        return Err("it is longer than 63 characters");
    }
    if !first.is_ascii_alphanumeric() {
        return Err("it must start with a letter or a digit");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// This host's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The name of a node given none: `nexus-<host>-<random>`, made on first
/// use and kept in `data_dir/node-name` from then on. A data directory an
/// earlier version used already (it holds files, but no name yet) keeps
/// that version's fixed name, `legacy`, so the node still owns what it
/// recorded under it.
pub fn default_name(data_dir: &Path, legacy: &str) -> std::io::Result<String> {
    let file = data_dir.join("node-name");
    if let Ok(name) = std::fs::read_to_string(&file) {
        let name = name.trim();
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
    }
    let used_before = std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some());
    let name = if used_before {
        legacy.to_owned()
    } else {
        let host: String =
            host_name().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).take(40).collect();
        format!("nexus-{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
    };
    std::fs::create_dir_all(data_dir)?;
    let temporary = data_dir.join(format!(".node-name.{:08x}", rand::random::<u32>()));
    std::fs::write(&temporary, format!("{name}\n"))?;
    std::fs::rename(&temporary, &file)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times() -> LeaseTimes {
        LeaseTimes { ttl: Duration::from_secs(5), renew: Duration::from_millis(100) }
    }

    #[test]
    fn names_that_could_pass_for_another_nodes_keys_are_refused() {
        for good in ["n1", "nexus-node", "nexus-host-0a1b2c", "node_2.eu", &"a".repeat(63)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in ["", "a/b", "a:b", "-a", ".a", "a b", "nöde", "a*", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[actix_rt::test]
    async fn a_name_with_a_slash_is_refused_before_redis_is_asked() {
        let brokers = nexus_testkit::Brokers::redis("node-lease-names");
        let redis = Redis::connect(&brokers.redis_url()).await.expect("redis");
        let lost = IntCounter::new("lost", "lost").expect("a counter");
        let refused = NodeLease::acquire(&redis, "n1/x", times(), lost).await;
        assert!(matches!(refused, Err(LeaseError::BadName { .. })), "a name with a slash was leased");
        let key: Option<String> =
            redis::cmd("GET").arg("nexus:node:n1/x").query_async(&mut redis.conn()).await.expect("get");
        assert_eq!(key, None);
    }

    #[actix_rt::test]
    async fn a_live_holder_keeps_its_name_and_a_released_name_is_free_again() {
        let brokers = nexus_testkit::Brokers::redis("node-lease");
        let redis = Redis::connect(&brokers.redis_url()).await.expect("redis");
        let lost = IntCounter::new("lost", "lost").expect("a counter");
        let first = NodeLease::acquire(&redis, "n1", times(), lost.clone()).await.expect("a free name");
        let refused = NodeLease::acquire(&redis, "n1", times(), lost.clone()).await;
        let Err(LeaseError::Held { holder, .. }) = refused else { panic!("a held name was taken twice") };
        assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}");
        assert!(NodeLease::acquire(&redis, "n2", times(), lost.clone()).await.is_ok(), "other names are free");
        // Renewed past its TTL while held.
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.release().await;
        NodeLease::acquire(&redis, "n1", times(), lost.clone()).await.expect("free again once released");
        assert_eq!(lost.get(), 0);
    }

    #[actix_rt::test]
    async fn a_gone_process_of_this_host_is_taken_over_and_a_lost_lease_is_counted() {
        let brokers = nexus_testkit::Brokers::redis("node-lease-gone");
        let redis = Redis::connect(&brokers.redis_url()).await.expect("redis");
        let lost = IntCounter::new("lost", "lost").expect("a counter");
        let mut conn = redis.conn();
        // A previous life on this host: a pid that runs no process.
        let dead = format!("{} boot {} ns {} pid 4000000 started 1 00000000", host_name(), boot_id(), pid_namespace());
        let _: () = redis::cmd("SET").arg("nexus:node:n").arg(&dead).query_async(&mut conn).await.expect("set");
        let lease = NodeLease::acquire(&redis, "n", times(), lost.clone()).await.expect("taken over");
        // A holder of another boot (another host of this name) is never taken for dead.
        let elsewhere = format!("{} boot another-boot ns {} pid 4000000 started 1 0", host_name(), pid_namespace());
        let _: () = redis::cmd("SET").arg("nexus:node:m").arg(&elsewhere).query_async(&mut conn).await.expect("set");
        assert!(matches!(NodeLease::acquire(&redis, "m", times(), lost.clone()).await, Err(LeaseError::Held { .. })));
        // Someone else's now: the next renewal counts the loss.
        let _: () = redis::cmd("SET").arg("nexus:node:n").arg("thief").query_async(&mut conn).await.expect("set");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(lost.get() >= 1, "the lost lease was counted");
        lease.release().await;
        let kept: String = redis::cmd("GET").arg("nexus:node:n").query_async(&mut conn).await.expect("get");
        assert_eq!(kept, "thief", "a release never deletes another holder's lease");
    }

    #[actix_rt::test]
    async fn a_lease_that_ended_while_held_is_taken_again() {
        let brokers = nexus_testkit::Brokers::redis("node-lease-ended");
        let redis = Redis::connect(&brokers.redis_url()).await.expect("redis");
        let lost = IntCounter::new("lost", "lost").expect("a counter");
        let _lease = NodeLease::acquire(&redis, "r", times(), lost.clone()).await.expect("a free name");
        // As if Redis had been away past the TTL, or lost its data.
        let _: () = redis::cmd("DEL").arg("nexus:node:r").query_async(&mut redis.conn()).await.expect("del");
        tokio::time::sleep(Duration::from_millis(350)).await;
        let holder: String = redis::cmd("GET").arg("nexus:node:r").query_async(&mut redis.conn()).await.expect("get");
        assert!(holder.contains(&format!("pid {}", std::process::id())), "taken again: {holder}");
        assert_eq!(lost.get(), 0, "not lost: nobody else held it");
    }

    #[test]
    fn a_node_without_a_name_gets_one_with_its_host_and_keeps_it() {
        let dir = std::env::temp_dir().join(format!("nexus-node-name-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let name = default_name(&dir, "legacy").expect("a name");
        assert!(name.starts_with("nexus-") && name.len() > "nexus-".len() + 7, "{name}");
        assert_eq!(check_name(&name), Ok(()), "a made name is a valid one: {name}");
        assert_eq!(default_name(&dir, "legacy").expect("the same name"), name);
        let other = std::env::temp_dir().join(format!("nexus-node-name-other-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        assert_ne!(default_name(&other, "legacy").expect("a name"), name, "another data directory, another name");
        // A data directory an earlier version used keeps its fixed name.
        let earlier = std::env::temp_dir().join(format!("nexus-node-name-earlier-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&earlier);
        std::fs::create_dir_all(earlier.join("panels")).expect("mkdir");
        assert_eq!(default_name(&earlier, "nexus-node").expect("a name"), "nexus-node");
        assert_eq!(default_name(&earlier, "other").expect("kept"), "nexus-node");
        for d in [dir, other, earlier] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
