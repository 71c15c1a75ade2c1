//! What the panel manager, the traffic gateway, the sidecar and the
//! watchdog agree on about panel instances: their states, the routes the
//! gateway follows, and the messages between them on the transactional bus.
//! Types and key names only; no behaviour lives here.
//!
//! Redis, all written by the panel manager unless said otherwise:
//! * `nexus:routes` (hash): panel id → [`PanelRoute`] JSON. A panel with no
//!   field is unknown to the gateway (404).
//! * `nexus:routes:changed` (channel): [`RouteChanged`] after every write.
//! * `nexus:instances:{panel}` (hash): instance id → [`InstanceStatus`] JSON.
//! * `nexus:panel:{id}:last-request` (string, unix ms): written by gateways
//!   at most once a second per panel; read for scale to zero.
//! * `nexus:panel-manager:activate` (channel): [`Activate`], from gateways.
//! * `nexus:instance:{instance}:control` (channel): [`ExpireInstance`], from
//!   the instance's watchdog.
//! * Instance states are also announced to the owner on `nexus:panels:{owner}`
//!   as [`InstanceChanged`], next to the panel record changes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::envelope::Payload;

/// The header the sidecar sends the panel's instance-specific secret in,
/// with every `/manifest` and `/mcp/*` request. The panel gets the secret
/// in its environment (`NEXUS_SIDECAR_TOKEN`) and may refuse requests
/// without it; the gateway never forwards this header from outside.
pub const SIDECAR_TOKEN_HEADER: &str = "x-nexus-sidecar-token";

/// The environment variable the panel and its sidecar find the secret of
/// [`SIDECAR_TOKEN_HEADER`] in.
pub const SIDECAR_TOKEN_ENV: &str = "NEXUS_SIDECAR_TOKEN";

/// The hash of every panel's route.
pub const ROUTES_KEY: &str = "nexus:routes";

/// `nexus:instances:{panel}`.
pub fn instances_key(panel: &str) -> String {
    format!("nexus:instances:{panel}")
}

/// `nexus:panel:{id}:last-request`.
pub fn last_request_key(panel: &str) -> String {
    format!("nexus:panel:{panel}:last-request")
}

/// Where an instance runs: developed in Studio (exactly one, state kept in
/// its work dir) or deployed as an App (0..N copies of an immutable
/// snapshot, scaled to zero when idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMode {
    /// Developed: one instance on the panel's volume.
    Studio,
    /// Deployed: copies of a snapshot.
    App,
}

/// The life of one instance. `Idle` is `Ready` without requests lately;
/// `Failed` is final (the reason says why), `Stopped` is final too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// The driver is starting it.
    Pending,
    /// Running, not answering `/manifest` yet (or restarting after a crash).
    Starting,
    /// Serving.
    Ready,
    /// Serving, without a request lately.
    Idle,
    /// Being stopped.
    Stopping,
    /// Ended on request (final).
    Stopped,
    /// Ended by a failure (final).
    Failed,
}

impl InstanceState {
    /// Whether the gateway may send it requests.
    pub fn serves(self) -> bool {
        matches!(self, InstanceState::Ready | InstanceState::Idle)
    }

    /// Whether it has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, InstanceState::Stopped | InstanceState::Failed)
    }
}

/// How the user's process is isolated. `Process` still has its own network
/// namespace; `None` is the loud fallback without root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// gVisor (`runsc`) in the instance's network namespace.
    Gvisor,
    /// A process in new user, mount, PID, IPC and UTS namespaces
    /// (bubblewrap), in the instance's network namespace.
    Namespaces,
    /// A plain process in the instance's network namespace, as its own
    /// uid: it shares the host's filesystem and processes. Unisolated.
    Process,
    /// A plain process on the host network: no isolation at all.
    None,
}

/// One instance as the panel manager reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceStatus {
    /// The instance id (`<panel>-<random>`).
    pub instance: String,
    /// The panel it serves.
    pub panel: String,
    /// The panel's owner.
    pub owner: String,
    /// Studio or App.
    pub mode: InstanceMode,
    /// Its state now.
    pub state: InstanceState,
    /// Decided by the driver when it starts the instance: read it from
    /// `starting` on (while `pending` it says `none`).
    pub isolation: Isolation,
    /// Why it failed or stopped, and any warning (e.g. no isolation).
    pub reason: Option<String>,
    /// The last lines of the user process's log, when it failed.
    pub log_tail: Vec<String>,
    /// How often the user process was restarted after crashing.
    pub restarts: u32,
    /// Unix milliseconds of the last state change.
    pub since_ms: u64,
}

/// Where the gateway reaches one serving instance (host addresses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Endpoint {
    /// The instance.
    pub instance: String,
    /// `host:port` of the panel's HTTP server.
    pub addr: String,
    /// `host:port` of the Studio instance's watchdog.
    pub watchdog: Option<String>,
    /// The secret the gateway sends the watchdog with each heartbeat
    /// (`X-Nexus-Watchdog-Token`), so the panel's own code, which can reach
    /// the watchdog on its loopback, cannot keep itself alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_token: Option<String>,
}

/// Everything the gateway needs to route one panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PanelRoute {
    /// The panel.
    pub panel: String,
    /// Its owner: the only user a Studio instance (or a private App) is served to.
    pub owner: String,
    /// What serves it now.
    pub mode: InstanceMode,
    /// Instances that serve now; empty while stopped or scaled to zero.
    pub endpoints: Vec<Endpoint>,
    /// An App with a deployed snapshot: with no endpoints, a request starts
    /// one (the activator) instead of getting a 503.
    pub activatable: bool,
}

/// A route was written or removed: read `nexus:routes` again for `panel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteChanged {
    /// The panel whose route changed.
    pub panel: String,
}

impl Payload for RouteChanged {
    const TYPE: &'static str = "nexus.route.changed";
}

/// A gateway holds requests for `panel`, an App with no instance: start one.
/// Gateways repeat it while they wait; panel managers start at most one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activate {
    /// The App to start.
    pub panel: String,
}

impl Payload for Activate {
    const TYPE: &'static str = "nexus.panel.activate";
}

/// From a Studio instance's watchdog: no heartbeat for too long, delete me.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpireInstance {
    /// The instance to delete.
    pub instance: String,
    /// Why (for its final status).
    pub reason: String,
}

impl Payload for ExpireInstance {
    const TYPE: &'static str = "nexus.instance.expire";
}

/// An instance changed state; announced on `nexus:panels:{owner}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceChanged {
    /// The instance's status now.
    pub status: InstanceStatus,
}

impl Payload for InstanceChanged {
    const TYPE: &'static str = "nexus.instance.changed";
}
