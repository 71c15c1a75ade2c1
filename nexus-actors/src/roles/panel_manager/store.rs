//! The panel manager's state in Redis: instance statuses, routes, deployed
//! App records, activation claims and which instances a node runs.
//!
//! Keys (besides those of [`crate::instance`]):
//! * `nexus:app:{panel}` (JSON [`AppRecord`]): the deployed snapshot.
//! * `nexus:panel:{id}:activating` (string, node name, expires): the claim
//!   of the panel manager that starts an App for the activator.
//! * `nexus:panel-manager:{node}:instances` (hash instance → panel): the
//!   instances a node started and has not seen end, to clear after a crash.
//!
//! This module reads and writes; it decides nothing and announces nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::driver::{Location, Snapshot};
use crate::instance::{instances_key, last_request_key, InstanceState, InstanceStatus, PanelRoute, ROUTES_KEY};

pub use crate::platform::StoreError;

/// A deployed App: which snapshot it runs and how many copies are wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The panel id.
    pub panel: String,
    /// The panel's owner.
    pub owner: String,
    /// The snapshot's version.
    pub version: u64,
    /// Where the driver keeps the snapshot.
    pub location: Location,
    /// How many instances should run.
    pub replicas: u32,
}

impl AppRecord {
    /// The snapshot this App runs.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { panel: self.panel.clone(), version: self.version, location: self.location.clone() }
    }
}

/// Sets the App record `ARGV[1]` unless the stored one is of a newer
/// version than `ARGV[2]`.
const PUT_APP_SCRIPT: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, record = pcall(cjson.decode, stored)
  if ok and type(record) == 'table' and tonumber(record.version) and tonumber(record.version) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// `nexus:app:{panel}`.
pub fn app_key(panel: &str) -> String {
    format!("nexus:app:{panel}")
}

/// `nexus:panel:{id}:activating`.
pub fn activating_key(panel: &str) -> String {
    format!("nexus:panel:{panel}:activating")
}

/// `nexus:panel-manager:{node}:instances`.
pub fn node_instances_key(node: &str) -> String {
    format!("nexus:panel-manager:{node}:instances")
}

/// Releases an activation claim only if this node still holds it.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The panel manager's keys. Cheap to clone.
#[derive(Clone)]
pub struct PmStore {
    conn: ConnectionManager,
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, raw: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: Serialize>(value: &T) -> String {
    // Plain data with string keys always serialises.
    serde_json::to_string(value).unwrap_or_default()
}

impl PmStore {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        Ok(PmStore { conn: client.get_connection_manager().await? })
    }

    /// Writes an instance's status and keeps the node's index of running
    /// instances in step: listed while live, removed once final.
    pub async fn put_status(&self, node: &str, status: &InstanceStatus) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        // Atomic: a status and the index move together, so that a reader
        // telling this node's instances from others' never sees one alone.
        let mut pipe = redis::pipe();
        pipe.atomic().hset(instances_key(&status.panel), &status.instance, encode(status)).ignore();
        if status.state.is_final() {
            pipe.hdel(node_instances_key(node), &status.instance).ignore();
        } else {
            pipe.hset(node_instances_key(node), &status.instance, &status.panel).ignore();
        }
        pipe.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Every status recorded for `panel`; corrupt entries are skipped.
    pub async fn statuses(&self, panel: &str) -> Result<Vec<InstanceStatus>, StoreError> {
        let mut c = self.conn.clone();
        let raw: HashMap<String, String> = c.hgetall(instances_key(panel)).await?;
        let mut statuses: Vec<InstanceStatus> = raw
            .values()
            .filter_map(|v| match decode::<InstanceStatus>("instance status", v) {
                Ok(s) => Some(s),
                Err(error) => {
                    tracing::warn!(panel, %error, "skipping a corrupt instance status");
                    None
                }
            })
            .collect();
        statuses.sort_by(|a, b| (a.since_ms, &a.instance).cmp(&(b.since_ms, &b.instance)));
        Ok(statuses)
    }

    /// One instance's status.
    pub async fn status(&self, panel: &str, instance: &str) -> Result<Option<InstanceStatus>, StoreError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = c.hget(instances_key(panel), instance).await?;
        raw.map(|r| decode("instance status", &r)).transpose()
    }

    /// Drops the oldest final statuses of `panel` beyond `keep`.
    pub async fn trim_final(&self, panel: &str, keep: usize) -> Result<(), StoreError> {
        let finals: Vec<InstanceStatus> =
            self.statuses(panel).await?.into_iter().filter(|s| s.state.is_final()).collect();
        if finals.len() <= keep {
            return Ok(());
        }
        let old: Vec<&str> = finals[..finals.len() - keep].iter().map(|s| s.instance.as_str()).collect();
        let mut c = self.conn.clone();
        c.hdel::<_, _, ()>(instances_key(panel), old).await?;
        Ok(())
    }

    /// The panel's route.
    pub async fn route(&self, panel: &str) -> Result<Option<PanelRoute>, StoreError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = c.hget(ROUTES_KEY, panel).await?;
        raw.map(|r| decode("route", &r)).transpose()
    }

    /// Writes the panel's route.
    pub async fn put_route(&self, route: &PanelRoute) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        c.hset::<_, _, _, ()>(ROUTES_KEY, &route.panel, encode(route)).await?;
        Ok(())
    }

    /// Removes everything the panel manager keeps about a deleted panel.
    pub async fn forget_panel(&self, panel: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .hdel(ROUTES_KEY, panel)
            .ignore()
            .del(app_key(panel))
            .ignore()
            .del(instances_key(panel))
            .ignore()
            .del(activating_key(panel))
            .ignore()
            .del(last_request_key(panel))
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// The panel's deployed App, if any.
    pub async fn app(&self, panel: &str) -> Result<Option<AppRecord>, StoreError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = c.get(app_key(panel)).await?;
        raw.map(|r| decode("app record", &r)).transpose()
    }

    /// Writes the panel's App record.
    pub async fn put_app(&self, app: &AppRecord) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        // Never over a newer version: a write retried after a Redis blip may
        // land after the next deploy's.
        let script = redis::Script::new(PUT_APP_SCRIPT);
        script.key(app_key(&app.panel)).arg(encode(app)).arg(app.version).invoke_async::<i64>(&mut c).await?;
        Ok(())
    }

    /// Removes the panel's App record (undeployed).
    pub async fn delete_app(&self, panel: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        c.del::<_, ()>(app_key(panel)).await?;
        Ok(())
    }

    /// Claims the activation of `panel` for `node`; false when another
    /// panel manager (or this one, earlier) holds the claim.
    pub async fn claim_activation(&self, panel: &str, node: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(activating_key(panel))
            .arg(node)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut c)
            .await?;
        Ok(set.is_some())
    }

    /// Releases the activation claim of `panel` if `node` holds it.
    pub async fn release_activation(&self, panel: &str, node: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::Script::new(RELEASE_SCRIPT).key(activating_key(panel)).arg(node).invoke_async::<i64>(&mut c).await?;
        Ok(())
    }

    /// When the gateway last forwarded a request to `panel` (unix ms). A
    /// value that is not a number counts as never.
    pub async fn last_request_ms(&self, panel: &str) -> Result<Option<u64>, StoreError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = c.get(last_request_key(panel)).await?;
        Ok(raw.and_then(|r| r.trim().parse().ok()))
    }

    /// How many instances of `panels` other nodes than `node` run: statuses
    /// neither ended nor stopping, and not in `node`'s own index (this node
    /// counts its own from memory, where they are exact).
    pub async fn running_elsewhere(&self, panels: &[String], node: &str) -> Result<usize, StoreError> {
        if panels.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn.clone();
        // One transaction: read apart, an instance of this node whose first
        // status lands between the two reads would be among the statuses
        // but not yet in the index, and be counted twice (here and by the
        // caller's table).
        let mut pipe = redis::pipe();
        pipe.atomic().hkeys(node_instances_key(node));
        for panel in panels {
            pipe.hgetall(instances_key(panel));
        }
        let mut replies = pipe.query_async::<Vec<redis::Value>>(&mut c).await?.into_iter();
        let mine: HashSet<String> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil)).map_err(redis::RedisError::from)?;
        let all = replies
            .map(redis::from_redis_value::<HashMap<String, String>>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(redis::RedisError::from)?;
        let running = all
            .iter()
            .flat_map(|statuses| statuses.iter())
            .filter(|(instance, _)| !mine.contains(*instance))
            .filter_map(|(_, raw)| decode::<InstanceStatus>("instance status", raw).ok())
            .filter(|s| !s.state.is_final() && s.state != InstanceState::Stopping)
            .count();
        Ok(running)
    }

    /// The instances `node` recorded as live (instance → panel).
    pub async fn node_instances(&self, node: &str) -> Result<HashMap<String, String>, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.hgetall(node_instances_key(node)).await?)
    }

    /// Forgets the node's index of live instances (after clearing them).
    pub async fn clear_node_instances(&self, node: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        c.del::<_, ()>(node_instances_key(node)).await?;
        Ok(())
    }
}
