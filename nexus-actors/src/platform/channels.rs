//! Every Redis pub/sub channel name of the platform, each written here and
//! nowhere else. What travels on a channel is defined beside its sender;
//! who may subscribe to which is decided by the roles.

/// A user's panel records and instance states (`nexus.panel.changed`,
/// `nexus.instance.changed`).
pub fn panels(owner: &str) -> String {
    format!("nexus:panels:{owner}")
}

/// Every user's panel channel, for panel managers.
pub const PANELS_PATTERN: &str = "nexus:panels:*";

/// A document's changes, presence and cursors: a sharded channel on a
/// Redis Cluster, tagged `{<id>}` like the document's keys so that it lives
/// on their shard.
pub fn document(id: &str) -> String {
    format!("nexus:doc:{{{id}}}")
}

/// Announces that the route table changed.
pub const ROUTES_CHANGED: &str = "nexus:routes:changed";

/// Where gateways ask panel managers to start an App (`nexus.panel.activate`).
pub const ACTIVATE: &str = "nexus:panel-manager:activate";

/// Control messages for one instance (its watchdog's expiry).
pub fn instance_control(instance: &str) -> String {
    format!("nexus:instance:{instance}:control")
}

/// Tool calls for a panel's sidecars.
pub fn panel_calls(panel: &str) -> String {
    format!("nexus:panel:{panel}:calls")
}

/// What a panel publishes through its sidecar's `/proxy`, on its own
/// channel `name`.
pub fn panel_out(panel: &str, name: &str) -> String {
    format!("nexus:panel:{panel}:out:{name}")
}

/// Tool calls for the nodes serving a system tool.
pub fn system_tool(name: &str) -> String {
    format!("nexus:tools:system:{name}")
}

/// Replies to the tool calls one registry made.
pub fn tool_replies(node: &str, registry: &str) -> String {
    format!("nexus:tools:replies:{node}:{registry}")
}

/// A context's journal as it is written (`nexus.context.journaled`), for
/// the sessions that follow it.
pub fn context(id: &str) -> String {
    format!("nexus:context:{id}")
}
