//! The panel manager's table: the instances this node runs, per panel,
//! and the bookkeeping of claims, deletions, generations and drains that
//! outlives a restart of the manager actor.
//!
//! Plain data with the questions asked of it (what runs, what the route
//! should be, how many instances an owner runs here); it sends nothing and
//! decides no policy.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::super::lifecycle::PodLifecycle;
use super::super::store::AppRecord;
use crate::instance::{Endpoint, InstanceMode, InstanceState, PanelRoute};
use crate::kernel::ActorRef;

/// An instance on its way out.
pub(super) enum Leaving {
    /// Out of the route, stopped once the drain is over. `idle`: a scale to
    /// zero decided on the gateway's last request `decided_on`, which a
    /// newer request cancels.
    Draining { seq: u64, reason: String, idle: bool, decided_on: Option<u64> },
    /// Asked to stop.
    Stopping,
}

/// One instance this node runs.
pub(super) struct Live {
    pub(super) lifecycle: ActorRef<PodLifecycle>,
    pub(super) mode: InstanceMode,
    /// The App version it runs (0 for Studio).
    pub(super) version: u64,
    pub(super) state: InstanceState,
    pub(super) endpoint: Option<Endpoint>,
    /// When it first served (unix ms), for scale to zero.
    pub(super) serving_since_ms: Option<u64>,
    /// Set once it is leaving: it no longer counts as running.
    pub(super) leaving: Option<Leaving>,
}

impl Live {
    /// Not yet leaving for good: a scale to zero still gives way to a stop.
    pub(super) fn may_stop(&self) -> bool {
        matches!(self.leaving, None | Some(Leaving::Draining { idle: true, .. }))
    }
}

/// What this node knows of one panel.
#[derive(Default)]
pub(super) struct PanelEntry {
    pub(super) owner: String,
    pub(super) app: Option<AppRecord>,
    pub(super) instances: BTreeMap<String, Live>,
    /// The route last handed to the reporter; `None` until the panel has one.
    pub(super) route: Option<PanelRoute>,
}

impl PanelEntry {
    /// The instances of `mode` that are not leaving.
    pub(super) fn running(&self, mode: InstanceMode) -> impl Iterator<Item = (&String, &Live)> {
        self.instances.iter().filter(move |(_, l)| l.mode == mode && l.leaving.is_none())
    }

    /// The route the panel should have now.
    pub(super) fn wanted_route(&self, panel: &str) -> PanelRoute {
        let mode = if self.app.is_some() { InstanceMode::App } else { InstanceMode::Studio };
        let endpoints =
            self.running(mode).filter(|(_, l)| l.state.serves()).filter_map(|(_, l)| l.endpoint.clone()).collect();
        PanelRoute {
            panel: panel.to_owned(),
            owner: self.owner.clone(),
            mode,
            endpoints,
            activatable: self.app.is_some(),
        }
    }
}

/// What outlives restarts of the manager actor.
#[derive(Default)]
pub(super) struct Table {
    pub(super) panels: HashMap<String, PanelEntry>,
    /// Panels whose activation claim is being decided.
    pub(super) claiming: HashSet<String>,
    /// Panels whose activation claim this node holds until an instance serves.
    pub(super) claimed: HashSet<String>,
    /// Deleted panels waiting for their last instance to end.
    pub(super) forgetting: HashSet<String>,
    /// Per panel, bumped by every Deploy, Undeploy and deletion: a claim
    /// or deploy decided at an older generation is dropped. Kept after a
    /// panel is forgotten, so a late result still finds it newer.
    pub(super) generations: HashMap<String, u64>,
    /// Numbers the drains, so a late drain timer cannot end a newer drain.
    pub(super) drains: u64,
    /// Per panel, the replicas a Scale adds while its record is written
    /// (numbered, owner, how many): they count against the owner's quota
    /// until the Scale is applied or given up.
    pub(super) scaling: HashMap<String, (u64, String, usize)>,
    /// Numbers the Scales.
    pub(super) scales: u64,
}

impl Table {
    pub(super) fn generation(&self, panel: &str) -> u64 {
        self.generations.get(panel).copied().unwrap_or(0)
    }

    pub(super) fn bump(&mut self, panel: &str) -> u64 {
        let generation = self.generations.entry(panel.to_owned()).or_default();
        *generation += 1;
        *generation
    }

    /// How many instances `owner` runs on this node, leaving ones aside
    /// (they end within a drain and a stop grace), and the panel `except`
    /// aside when given (a deploy replaces all of its instances).
    /// The owner's instances here, and those a Scale is about to add.
    pub(super) fn running_of(&self, owner: &str, except: Option<&str>) -> usize {
        let running: usize = self
            .panels
            .iter()
            .filter(|(panel, entry)| entry.owner == owner && Some(panel.as_str()) != except)
            .map(|(_, entry)| entry.instances.values().filter(|l| l.leaving.is_none()).count())
            .sum();
        let scaling: usize = self
            .scaling
            .iter()
            .filter(|(panel, (_, of, _))| of == owner && Some(panel.as_str()) != except)
            .map(|(_, (_, _, adding))| adding)
            .sum();
        running + scaling
    }
}
