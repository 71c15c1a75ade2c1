//! The `local` driver's counters. The driver does not register them: the
//! node registers them in its registry ([`LocalMetrics::register`]).
//! Labels come from enums.

use prometheus::{IntCounter, IntCounterVec, Opts};

/// One of the trusted processes beside a panel, for the `process` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Helper {
    Sidecar,
    Watchdog,
}

impl Helper {
    /// The `nexus` subcommand, the log file's stem and the `process` label.
    pub(super) fn name(self) -> &'static str {
        match self {
            Helper::Sidecar => "sidecar",
            Helper::Watchdog => "watchdog",
        }
    }
}

/// The driver's counters. Cheap to clone.
#[derive(Clone)]
pub struct LocalMetrics {
    /// `nexus_local_instances_started_total{isolation}`
    pub started: IntCounterVec,
    /// `nexus_local_panel_exits_total{mode}`: user processes that ended on their own.
    pub panel_exits: IntCounterVec,
    /// `nexus_local_helper_restarts_total{process}`: sidecars and watchdogs restarted after dying.
    pub helper_restarts: IntCounterVec,
    /// `nexus_local_stale_namespaces_swept_total`: namespaces of this driver's
    /// instances left by a crash, deleted (with what ran in them) at start.
    pub stale_swept: IntCounter,
    /// `nexus_local_sandbox_probes_total{outcome}`: `runsc` probe runs, `ok` or `failed`.
    pub sandbox_probes: IntCounterVec,
    /// `nexus_local_log_rotations_total`: instance logs rotated past their cap.
    pub log_rotations: IntCounter,
    /// `nexus_local_unlimited_instances_total`: instances started without
    /// memory, CPU and process limits, for want of usable cgroups.
    pub unlimited: IntCounter,
}

impl LocalMetrics {
    pub(super) fn new() -> LocalMetrics {
        let counter = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric definition")
        };
        LocalMetrics {
            started: counter("nexus_local_instances_started_total", "Instances started, by isolation", "isolation"),
            panel_exits: counter("nexus_local_panel_exits_total", "User processes that ended on their own", "mode"),
            helper_restarts: counter(
                "nexus_local_helper_restarts_total",
                "Sidecars and watchdogs restarted after dying",
                "process",
            ),
            stale_swept: IntCounter::new(
                "nexus_local_stale_namespaces_swept_total",
                "Namespaces of instances left by a crash, deleted at start",
            )
            .expect("valid metric definition"),
            sandbox_probes: counter("nexus_local_sandbox_probes_total", "runsc probe runs, by outcome", "outcome"),
            log_rotations: IntCounter::new("nexus_local_log_rotations_total", "Instance logs rotated past their cap")
                .expect("valid metric definition"),
            unlimited: IntCounter::new(
                "nexus_local_unlimited_instances_total",
                "Instances started without resource limits, for want of usable cgroups",
            )
            .expect("valid metric definition"),
        }
    }

    /// Registers the counters in `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.started.clone()))?;
        registry.register(Box::new(self.panel_exits.clone()))?;
        registry.register(Box::new(self.helper_restarts.clone()))?;
        registry.register(Box::new(self.sandbox_probes.clone()))?;
        registry.register(Box::new(self.log_rotations.clone()))?;
        registry.register(Box::new(self.unlimited.clone()))?;
        registry.register(Box::new(self.stale_swept.clone()))
    }
}
