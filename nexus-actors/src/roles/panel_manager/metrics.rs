//! The panel manager's own counters, registered in the node's registry
//! when the role starts. Labels are enums, so a typo cannot compile.
//!
//! The instance gauges and restart counters every node has live in
//! [`crate::telemetry::Metrics`]; this module holds only what the panel
//! manager adds and decides nothing.

use prometheus::{IntCounterVec, Opts};

use crate::instance::{InstanceMode, InstanceState, Isolation};

/// The `mode` label of an instance.
pub fn mode_label(mode: InstanceMode) -> &'static str {
    match mode {
        InstanceMode::Studio => "studio",
        InstanceMode::App => "app",
    }
}

/// The `state` label of an instance.
pub fn state_label(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Pending => "pending",
        InstanceState::Starting => "starting",
        InstanceState::Ready => "ready",
        InstanceState::Idle => "idle",
        InstanceState::Stopping => "stopping",
        InstanceState::Stopped => "stopped",
        InstanceState::Failed => "failed",
    }
}

/// The `isolation` label of an instance.
pub fn isolation_label(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Gvisor => "gvisor",
        Isolation::Namespaces => "namespaces",
        Isolation::Process => "process",
        Isolation::None => "none",
    }
}

/// What was refused for being over the owner's running-instance quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaAction {
    /// `POST /api/panels/{id}/studio`.
    Studio,
    /// `POST /api/panels/{id}/deploy`.
    Deploy,
    /// `PUT /api/panels/{id}/scale` upwards.
    Scale,
    /// A gateway's activation of a scaled-to-zero App.
    Activation,
}

impl QuotaAction {
    /// The `action` label.
    pub fn label(self) -> &'static str {
        match self {
            QuotaAction::Studio => "studio",
            QuotaAction::Deploy => "deploy",
            QuotaAction::Scale => "scale",
            QuotaAction::Activation => "activation",
        }
    }
}

/// A change to a panel's files through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChange {
    /// `PUT /api/panels/{id}/files/{path}`.
    Write,
    /// `DELETE /api/panels/{id}/files/{path}`.
    Delete,
    /// `PUT /api/panels/{id}/files` with an archive.
    Upload,
}

impl FileChange {
    /// The `op` label.
    pub fn label(self) -> &'static str {
        match self {
            FileChange::Write => "write",
            FileChange::Delete => "delete",
            FileChange::Upload => "upload",
        }
    }
}

/// The panel manager's counters. Cheap to clone.
#[derive(Clone)]
pub struct PmMetrics {
    /// `nexus_panel_quota_refusals_total{action}`: starts refused because
    /// the owner ran as many instances as the quota allows.
    pub quota_refusals: IntCounterVec,
    /// `nexus_panel_file_changes_total{op,result}`: changes to panel files
    /// through the API; `result` is `ok`, `refused` (the request's fault)
    /// or `failed`.
    pub file_changes: IntCounterVec,
}

impl PmMetrics {
    /// The counters, registered in `registry`. A registry that already has
    /// them (a second panel manager on one kernel) keeps the first: these
    /// count on, unlisted, with a warning.
    pub fn register(registry: &prometheus::Registry) -> PmMetrics {
        let opts = Opts::new(
            "nexus_panel_quota_refusals_total",
            "Instance starts refused over the owner's running-instance quota, by action",
        );
        let quota_refusals = IntCounterVec::new(opts, &["action"]).expect("valid metric definition");
        let opts =
            Opts::new("nexus_panel_file_changes_total", "Changes to panel files through the API, by op and result");
        let file_changes = IntCounterVec::new(opts, &["op", "result"]).expect("valid metric definition");
        for counter in [&quota_refusals, &file_changes] {
            if let Err(error) = registry.register(Box::new(counter.clone())) {
                tracing::warn!(%error, "panel manager metrics not registered");
            }
        }
        PmMetrics { quota_refusals, file_changes }
    }

    /// Counts one change to a panel's files.
    pub fn file_changed(&self, op: FileChange, result: &'static str) {
        self.file_changes.with_label_values(&[op.label(), result]).inc();
    }

    /// Counts one refusal.
    pub fn quota_refused(&self, action: QuotaAction) {
        self.quota_refusals.with_label_values(&[action.label()]).inc();
    }
}
