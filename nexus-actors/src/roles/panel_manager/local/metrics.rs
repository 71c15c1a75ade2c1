//! The `local` driver's counters. The driver does not register them: the
//! node registers them in its registry ([`LocalMetrics::register`]).
//! Labels come from enums.

use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};

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

/// A step of an instance's start in the driver, for the `phase` label of
/// `nexus_local_start_phase_seconds`: where a cold start's time goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StartPhase {
    /// Sandbox resolved, stale namespaces swept, uid and instance dir.
    Prepare,
    /// The App's scratch space and its copy of the snapshot (or the
    /// Studio volume's chown), and the start command read.
    Copy,
    /// The network namespace and its link.
    Network,
    /// The helpers' listeners bound, the runsc bundle written, the cgroup made.
    Sandbox,
    /// The sidecar's Redis user set.
    Credentials,
    /// Sidecar, watchdog and user process spawned.
    Spawn,
}

impl StartPhase {
    fn label(self) -> &'static str {
        match self {
            StartPhase::Prepare => "prepare",
            StartPhase::Copy => "copy",
            StartPhase::Network => "network",
            StartPhase::Sandbox => "sandbox",
            StartPhase::Credentials => "credentials",
            StartPhase::Spawn => "spawn",
        }
    }
}

/// Times one start's phases, each from the end of the one before.
pub(super) struct StartClock {
    phases: HistogramVec,
    since: Instant,
}

impl StartClock {
    /// Records `phase` as ended now.
    pub(super) fn lap(&mut self, phase: StartPhase) {
        let now = Instant::now();
        self.phases.with_label_values(&[phase.label()]).observe((now - self.since).as_secs_f64());
        self.since = now;
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
    /// `nexus_local_start_phase_seconds{phase}`: each step of a start.
    pub start_phases: HistogramVec,
    /// `nexus_local_warm_sandboxes`: warm gVisor sandboxes ready to be taken.
    pub warm_ready: IntGauge,
    /// `nexus_local_warm_sandbox_takes_total{outcome}`: App starts under
    /// gVisor that took a warm sandbox (`taken`), found none (`empty`), or
    /// found one whose zygote had died (`dead`, discarded).
    pub warm_takes: IntCounterVec,
    /// `nexus_local_warm_sandboxes_made_total{outcome}`: `ready` or `failed`.
    pub warm_made: IntCounterVec,
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
            start_phases: HistogramVec::new(
                HistogramOpts::new("nexus_local_start_phase_seconds", "Each step of an instance's start, by phase")
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]),
                &["phase"],
            )
            .expect("valid metric definition"),
            warm_ready: IntGauge::new("nexus_local_warm_sandboxes", "Warm gVisor sandboxes ready to be taken")
                .expect("valid metric definition"),
            warm_takes: counter(
                "nexus_local_warm_sandbox_takes_total",
                "App starts under gVisor, by whether they took a warm sandbox",
                "outcome",
            ),
            warm_made: counter("nexus_local_warm_sandboxes_made_total", "Warm sandboxes made, by outcome", "outcome"),
        }
    }

    /// A clock for one start's phases, running from now.
    pub(super) fn start_clock(&self) -> StartClock {
        StartClock { phases: self.start_phases.clone(), since: Instant::now() }
    }

    /// Registers the counters in `registry`.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.started.clone()))?;
        registry.register(Box::new(self.panel_exits.clone()))?;
        registry.register(Box::new(self.helper_restarts.clone()))?;
        registry.register(Box::new(self.sandbox_probes.clone()))?;
        registry.register(Box::new(self.log_rotations.clone()))?;
        registry.register(Box::new(self.unlimited.clone()))?;
        registry.register(Box::new(self.start_phases.clone()))?;
        registry.register(Box::new(self.warm_ready.clone()))?;
        registry.register(Box::new(self.warm_takes.clone()))?;
        registry.register(Box::new(self.warm_made.clone()))?;
        registry.register(Box::new(self.stale_swept.clone()))
    }
}
