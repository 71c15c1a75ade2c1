//! Panel records: which panels exist, who owns them, how they run and
//! whether their App is public — the record every role checks ownership
//! against — and the announcement of their changes.
//!
//! Keys: `nexus:panel:{id}` (JSON [`Panel`]) and `nexus:panels:{owner}`
//! (set of the owner's panel ids). Changes are announced on
//! [`super::channels::panels`] as [`PanelChanged`].
//!
//! This module reads and writes records; who may change which is decided
//! by the API.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::store::{Redis, StoreError};
use crate::envelope::Payload;

/// Where a panel runs: developed in Studio, or deployed as an App.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PanelMode {
    /// Developed: one instance, its files persist.
    Studio,
    /// Deployed: a snapshot, scaled to zero when idle.
    App,
}

/// A panel record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Panel {
    /// A UUID, chosen by the platform.
    pub id: String,
    /// What the owner calls it.
    pub name: String,
    /// The user who owns it; only they reach it (and its Studio).
    pub owner: String,
    /// How it runs.
    pub mode: PanelMode,
    /// Where the panel's code comes from (`template:<name>`).
    pub source: String,
    /// Whether the deployed App is served to anyone, not only its owner.
    /// A Studio instance is always private.
    #[serde(default)]
    pub public: bool,
}

/// Announced on `nexus:panels:{owner}` when a panel record is created,
/// changed (`panel` is its new state) or deleted (`panel` is null).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PanelChanged {
    /// The panel's id.
    pub id: String,
    /// The record now; `None` once deleted.
    pub panel: Option<Panel>,
}

impl Payload for PanelChanged {
    const TYPE: &'static str = "nexus.panel.changed";
}

/// Whether `id` has the shape of a panel id (a UUID), so that garbage
/// never reaches a Redis key.
pub fn is_panel_id(id: &str) -> bool {
    // Only the form the platform writes: braced, URN and upper-case
    // spellings of one UUID would each name keys of their own.
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// The key of panel `id`'s record.
pub fn panel_key(id: &str) -> String {
    format!("nexus:panel:{id}")
}

fn panels_key(owner: &str) -> String {
    format!("nexus:panels:{owner}")
}

/// Stores a new record only while the owner has fewer than ARGV[3] panels.
const CREATE_SCRIPT: &str = r"
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
";

/// The panel records in Redis. Cheap to clone.
#[derive(Clone)]
pub struct PanelRecords {
    redis: Redis,
}

impl PanelRecords {
    /// Records over an existing connection.
    pub fn new(redis: Redis) -> Self {
        PanelRecords { redis }
    }

    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(PanelRecords::new(Redis::connect(url).await?))
    }

    /// Stores a new record unless its owner already has `max` panels;
    /// false when they do.
    pub async fn create(&self, panel: &Panel, max: usize) -> Result<bool, StoreError> {
        let json = serde_json::to_string(panel).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let created: i64 = redis::Script::new(CREATE_SCRIPT)
            .key(panel_key(&panel.id))
            .key(panels_key(&panel.owner))
            .arg(&panel.id)
            .arg(json)
            .arg(max)
            .invoke_async(&mut self.redis.conn())
            .await?;
        Ok(created == 1)
    }

    /// Stores a record, new or changed, without a quota check.
    pub async fn put(&self, panel: &Panel) -> Result<(), StoreError> {
        let json = serde_json::to_string(panel).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        redis::pipe()
            .atomic()
            .set(panel_key(&panel.id), json)
            .sadd(panels_key(&panel.owner), &panel.id)
            .query_async::<()>(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    /// The record of `id`, if there is one. An id that is not a UUID is
    /// never looked up.
    pub async fn get(&self, id: &str) -> Result<Option<Panel>, StoreError> {
        if !is_panel_id(id) {
            return Ok(None);
        }
        let json: Option<String> = self.redis.read(|mut c| async move { c.get(panel_key(id)).await }).await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(format!("panel {id}: {e}")))).transpose()
    }

    /// Every record of `owner`, by id.
    pub async fn of(&self, owner: &str) -> Result<Vec<Panel>, StoreError> {
        let ids: Vec<String> = self.redis.read(|mut c| async move { c.smembers(panels_key(owner)).await }).await?;
        let mut panels = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(panel) = self.get(&id).await? {
                panels.push(panel);
            }
        }
        panels.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(panels)
    }

    /// Deletes a record.
    pub async fn delete(&self, panel: &Panel) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .del(panel_key(&panel.id))
            .srem(panels_key(&panel.owner), &panel.id)
            .query_async::<()>(&mut self.redis.conn())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_public_reads_as_private() {
        let old = r#"{"id":"x","name":"n","owner":"ada","mode":"app","source":"template:python_minimal"}"#;
        let panel: Panel = serde_json::from_str(old).expect("an old record decodes");
        assert!(!panel.public);
    }

    #[test]
    fn only_uuids_are_panel_ids() {
        assert!(is_panel_id("0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11"));
        assert!(!is_panel_id("x:log"));
        assert!(!is_panel_id("0190A5A4-7A3C-7CC2-8A55-6F0B7F2B1C11"), "upper case");
        assert!(!is_panel_id("{0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11}"), "braced");
        assert!(!is_panel_id("urn:uuid:0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11"));
        assert!(!is_panel_id(""));
    }
}
